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
    by_file = owned_tensors(model, model_path)
    loading = _Loading(params, where)
    total = sum(len(items) for items in by_file.values())
    with tqdm(total=total, desc=f"loading weights{where}", unit="tensor", disable=not progress, leave=False) as bar:
        for file in sorted(by_file):
            loading.read_shard(file, by_file[file], bar)
    problems = []
    missing = _missing(model, params, loading.written)
    if missing:
        problems.append(f"missing tensor(s) {_listing(missing)} (parameters never written)")
    if loading.unexpected:
        hint = ""
        if any(name.endswith("_scale_inv") for name in loading.unexpected) and model.config.quantization is None:
            hint = " (FP8 block scales, but config.json has no quantization_config)"
        problems.append(f"unexpected tensor(s) {_listing(loading.unexpected)} map to no parameter of the model{hint}")
    if problems:
        raise CheckpointError(f"checkpoint {model_path}{where}: " + "; ".join(problems))
    return loading.report


def owned_tensors(model, model_path: str | Path) -> dict[Path, list[tuple[str, list]]]:
    """file -> [(checkpoint name, its targets)] of the tensors this stage owns, decided from the names alone
    (ignorable names and other stages' tensors are never read)."""
    by_file: dict[Path, list[tuple[str, list]]] = defaultdict(list)
    for name, file in checkpoint_weight_map(model_path).items():
        normal = model.normalize_name(name)
        if normal is None or not model.owns(normal):
            continue
        by_file[file].append((name, model.targets(normal)))
    return by_file


class _Loading:
    """The state of one stage's load: the pieces written per parameter, the owned tensors that found no
    parameter, and what was read (`LoadReport`)."""

    def __init__(self, params: dict, where: str):
        self.params, self.where = params, where
        self.written: dict[str, set] = defaultdict(set)
        self.unexpected: list[str] = []
        self.report = LoadReport()

    def read_shard(self, file: Path, items: list[tuple[str, list]], bar) -> None:
        if not file.is_file():
            raise CheckpointError(f"checkpoint shard {file} listed in the index does not exist")
        with safe_open(str(file), framework="pt") as shard:
            present = set(shard.keys())
            for name, targets in items:
                if name not in present:
                    raise CheckpointError(f"checkpoint tensor {name} is listed in {INDEX_FILE} under "
                                          f"{file.name}, but that file does not contain it")
                known = [(p, s) for p, s in targets if p in self.params]
                if known:
                    self.load_tensor(name, shard.get_tensor(name), known)
                else:
                    self.unexpected.append(name)
                bar.update()

    def load_tensor(self, name: str, tensor, known: list[tuple[str, object]]) -> None:
        self.report.tensors_read.append(name)
        self.report.bytes_read += tensor.numel() * tensor.element_size()
        for param_name, shard_id in known:
            param = self.params[param_name]
            try:
                param.weight_loader(param, tensor, shard_id)
            except CheckpointError as exc:
                raise CheckpointError(f"checkpoint tensor {name}{self.where}: {exc}") from None
            self.written[param_name].add(shard_id)


def _missing(model, params: dict, written: dict[str, set]) -> list[str]:
    """The checkpoint names of every parameter piece never written."""
    missing = []
    for param_name, param in params.items():
        done = written.get(param_name, set())
        if None in done:
            continue
        if not done and len(param.shard_ids) > 1 and ".experts." in param_name:
            # a whole expert stack: name the fused tensor rather than every per-expert piece
            missing.append(f"{model.checkpoint_name_of(param_name, None)} (or its per-expert tensors)")
            continue
        missing.extend(model.checkpoint_name_of(param_name, shard_id) for shard_id in param.shard_ids
                       if shard_id not in done)
    return missing


def _listing(names: list[str], limit: int = 8) -> str:
    shown = ", ".join(names[:limit])
    return shown + (f" and {len(names) - limit} more" if len(names) > limit else "")
