"""Reads a stage's weights from a safetensors checkpoint (one file or a sharded index).

Ownership is decided from each tensor's name *before* any bytes are read or any name is mapped, so a
stage never reads, or looks up, another stage's tensors. Shards are opened lazily, one at a time. After
loading, every parameter piece must have been written and every owned tensor must have found a
parameter; otherwise a `CheckpointError` names the tensors and the stage."""

from __future__ import annotations

import json
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path

from safetensors import safe_open
from tqdm import tqdm

from tandem.errors import CheckpointError

INDEX_FILE = "model.safetensors.index.json"
SINGLE_FILE = "model.safetensors"


@dataclass
class LoadReport:
    tensors_read: list[str] = field(default_factory=list)
    bytes_read: int = 0


def checkpoint_weight_map(model_path: str | Path) -> dict[str, Path]:
    """Tensor name -> the file holding it, from the index (sharded) or the single file's header."""
    path = Path(model_path)
    index = path / INDEX_FILE
    if index.is_file():
        weight_map = json.loads(index.read_text()).get("weight_map", {})
        return {name: path / file for name, file in weight_map.items()}
    single = path / SINGLE_FILE
    if single.is_file():
        with safe_open(str(single), framework="pt") as f:
            return {name: single for name in f.keys()}
    others = sorted(p.name for p in path.glob("*.safetensors")) if path.is_dir() else []
    if len(others) == 1:
        with safe_open(str(path / others[0]), framework="pt") as f:
            return {name: path / others[0] for name in f.keys()}
    raise CheckpointError(
        f"no safetensors checkpoint in {path}: expected {SINGLE_FILE} or {INDEX_FILE}"
        + (f" (found {len(others)} .safetensors files without an index)" if others else "")
    )


def load_weights(model, model_path: str | Path, stage_label: str = "", progress: bool = True) -> LoadReport:
    """Load the stage's tensors into `model` (a `tandem.models` CausalLM: normalize_name, owns, targets,
    checkpoint_name_of). Raises CheckpointError for anything missing, unexpected or mis-shaped."""
    where = f" on {stage_label}" if stage_label else ""
    params = dict(model.named_parameters())
    written: dict[str, set] = defaultdict(set)
    unexpected: list[str] = []
    by_file: dict[Path, list[tuple[str, list]]] = defaultdict(list)
    for name, file in checkpoint_weight_map(model_path).items():
        normal = model.normalize_name(name)
        if normal is None or not model.owns(normal):
            continue  # ignorable, or another stage's: never read
        by_file[file].append((name, model.targets(normal)))
    report = LoadReport()
    total = sum(len(items) for items in by_file.values())
    with tqdm(total=total, desc=f"loading weights{where}", unit="tensor", disable=not progress, leave=False) as bar:
        for file in sorted(by_file):
            if not file.is_file():
                raise CheckpointError(f"checkpoint shard {file} listed in the index does not exist")
            with safe_open(str(file), framework="pt") as shard:
                present = set(shard.keys())
                for name, targets in by_file[file]:
                    if name not in present:
                        raise CheckpointError(f"checkpoint tensor {name} is listed in {INDEX_FILE} under "
                                              f"{file.name}, but that file does not contain it")
                    known = [(p, s) for p, s in targets if p in params]
                    if not known:
                        unexpected.append(name)
                        bar.update()
                        continue
                    tensor = shard.get_tensor(name)
                    report.tensors_read.append(name)
                    report.bytes_read += tensor.numel() * tensor.element_size()
                    for param_name, shard_id in known:
                        param = params[param_name]
                        try:
                            param.weight_loader(param, tensor, shard_id)
                        except CheckpointError as exc:
                            raise CheckpointError(f"checkpoint tensor {name}{where}: {exc}") from None
                        written[param_name].add(shard_id)
                    bar.update()
    missing = []
    for param_name, param in params.items():
        done = written.get(param_name, set())
        if None in done:
            continue
        if not done and len(param.shard_ids) > 1 and ".experts." in param_name:
            # a whole expert stack: name the fused tensor rather than every per-expert piece
            missing.append(f"{model.checkpoint_name_of(param_name, None)} (or its per-expert tensors)")
            continue
        for shard_id in param.shard_ids:
            if shard_id not in done:
                missing.append(model.checkpoint_name_of(param_name, shard_id))
    problems = []
    if missing:
        problems.append(f"missing tensor(s) {_listing(missing)} (parameters never written)")
    if unexpected:
        problems.append(f"unexpected tensor(s) {_listing(unexpected)} map to no parameter of the model")
    if problems:
        raise CheckpointError(f"checkpoint {model_path}{where}: " + "; ".join(problems))
    return report


def _listing(names: list[str], limit: int = 8) -> str:
    shown = ", ".join(names[:limit])
    return shown + (f" and {len(names) - limit} more" if len(names) > limit else "")
