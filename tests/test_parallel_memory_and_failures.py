"""What each pipeline stage holds and reads (weights, its own KV pool), and how rank failures surface.

Byte counts are computed independently from the checkpoint's safetensors headers."""

from __future__ import annotations

import itertools
import json
import os
import re
import signal
import subprocess
import sys
import time

import pytest
from safetensors.torch import load_file, save_file

from support.checkpoints import checkpoint_tensor_names
from support.processes import rank_processes
from tandem.engine import Engine
from tandem.errors import PartitionError, RankFailedError

LAYER = re.compile(r"layers\.(\d+)\.")


def text_tensors(model_dir) -> dict[str, int]:
    """Text-model checkpoint tensors -> element count (no mtp / vision tensors)."""
    out = {}
    for name, (shape, _) in checkpoint_tensor_names(model_dir).items():
        if name.startswith(("mtp.", "model.visual.")):
            continue
        count = 1
        for dim in shape:
            count *= dim
        out[name] = count
    return out


def expected_stage_bytes(model_dir, start: int, end: int, first: bool, last: bool, tied: bool, elem: int) -> int:
    total = 0
    for name, count in text_tensors(model_dir).items():
        layer = LAYER.search(name)
        if layer:
            owned = start <= int(layer.group(1)) < end
        elif "embed_tokens" in name:
            owned = first or (tied and last)
            if first and last and tied:
                owned = True  # one shared tensor on a single stage
        elif name.endswith("norm.weight"):
            owned = last
        elif name.startswith("lm_head"):
            owned = last and not tied
        else:
            raise AssertionError(f"unclassified tensor {name}")
        total += count * elem if owned else 0
    return total


TOKENS = 512


def expected_kv_bytes_per_token(model_dir, start: int, end: int, elem: int) -> int:
    raw = json.loads((model_dir / "config.json").read_text())
    text = raw.get("text_config", raw)
    kinds = text.get("layer_types") or ["full_attention"] * text["num_hidden_layers"]
    head_dim = text.get("head_dim") or text["hidden_size"] // text["num_attention_heads"]
    full = sum(kind == "full_attention" for kind in kinds[start:end])
    return full * 2 * text["num_key_value_heads"] * head_dim * elem


@pytest.mark.parametrize("spec,pp,partition", [
    ({"kind": "qwen3_5_moe", "fused_experts": True, "multimodal": True, "add_mtp": True}, 2, None),
    ({"kind": "qwen3_5", "tied": True}, 2, "3,1"),
    ({"kind": "llama"}, 4, None),
])
def test_each_stage_holds_and_reads_only_its_own(ckpt, spec, pp, partition):
    spec = dict(spec)
    model_dir = ckpt(spec.pop("kind"), **spec)
    tied = spec.get("tied", False)
    with Engine(model_dir, pp_size=pp, dtype="float32", pp_layer_partition=partition, progress=False,
                max_total_tokens=TOKENS) as engine:
        report = engine.stage_report()
    for stage in report:
        start, end = stage["layer_start"], stage["layer_end"]
        first, last = stage["pp_rank"] == 0, stage["pp_rank"] == pp - 1
        assert stage["weight_bytes"] == expected_stage_bytes(model_dir, start, end, first, last, tied, 4)
        # the stage's KV pool: TOKENS tokens of keys and values for its own full-attention layers only
        assert stage["max_total_tokens"] == TOKENS
        assert stage["kv_cache_bytes"] == TOKENS * expected_kv_bytes_per_token(model_dir, start, end, 4)
        for name in stage["tensors_read"]:  # recorded at the loader's only read call
            layer = LAYER.search(name)
            if layer:
                assert start <= int(layer.group(1)) < end, f"stage {stage['pp_rank']} read {name}"
            assert not name.startswith(("mtp.", "model.visual."))
    bounds = [(s["layer_start"], s["layer_end"]) for s in report]
    assert bounds[0][0] == 0 and all(a[1] == b[0] for a, b in itertools.pairwise(bounds))
    # the split asked for, as given; uniform: L / pp layers each (L = 4 here, a multiple of pp)
    raw = json.loads((model_dir / "config.json").read_text())
    layers = raw.get("text_config", raw)["num_hidden_layers"]
    counts = [int(n) for n in partition.split(",")] if partition else [layers // pp] * pp
    assert layers % pp == 0 and [end - start for start, end in bounds] == counts


def test_missing_tensor_on_stage_1_names_tensor_and_stage(ckpt, tmp_path):
    source = ckpt("qwen3_5_moe")
    for file in source.iterdir():
        if file.is_file():
            (tmp_path / file.name).write_bytes(file.read_bytes())
    weights = load_file(tmp_path / "model.safetensors")
    victim = "model.layers.3.linear_attn.in_proj_a.weight"
    if victim not in weights:
        victim = next(n for n in weights if n.startswith("model.layers.3."))
    del weights[victim]
    save_file(weights, tmp_path / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(RankFailedError) as info:
        Engine(tmp_path, pp_size=2, pp_layer_partition="2,2", dtype="float32", progress=False)
    message = str(info.value)
    assert victim in message and "pp 1/2" in message
    deadline = time.monotonic() + 5
    while rank_processes() and time.monotonic() < deadline:
        time.sleep(0.1)
    assert rank_processes() == []


@pytest.mark.parametrize("partition", ["1,1", "4,0", "2,2,0", "a,b", [2.5, 1.5]])
def test_invalid_partition_refused_before_any_process_starts(ckpt, partition):
    with pytest.raises(PartitionError):
        Engine(ckpt("llama"), pp_size=2, pp_layer_partition=partition, progress=False)
    assert rank_processes() == []


def test_shutdown_leaves_no_process(ckpt):
    engine = Engine(ckpt("llama"), pp_size=2, dtype="float32", progress=False)
    assert len(rank_processes()) == 2
    engine.shutdown()
    assert rank_processes() == []


def test_health_names_a_dead_rank(ckpt):
    """A rank process that dies while the engine is idle shows in `health()` at once, before any step."""
    engine = Engine(ckpt("llama"), pp_size=2, dtype="float32", progress=False)
    try:
        assert engine.health() == (True, "")
        victim = rank_processes()[0]
        os.kill(victim, signal.SIGKILL)
        deadline = time.monotonic() + 30  # only keeps a missed death from hanging the test
        while engine.health()[0] and time.monotonic() < deadline:
            time.sleep(0.05)
        ok, reason = engine.health()
        assert not ok and re.fullmatch(r"rank [01] exited with code -9", reason), reason
    finally:
        engine.shutdown()
    assert engine.health() == (False, "the engine is shut down")
    assert rank_processes() == []


def test_two_nodes_on_localhost(ckpt):
    from tandem.executors.process import _free_port_triple

    model_dir = ckpt("llama")
    port = _free_port_triple()
    node1 = subprocess.Popen([sys.executable, "-m", "tandem.cli", "generate", "--model-path", str(model_dir),
                              "--pp-size", "2", "--dtype", "float32", "--nnodes", "2", "--node-rank", "1",
                              "--dist-init-addr", f"127.0.0.1:{port}", "--dist-auth-token", "s3cret-of-this-test"])
    try:
        with Engine(model_dir, pp_size=2, dtype="float32", nnodes=2, dist_init_addr=f"127.0.0.1:{port}",
                    dist_auth_token="s3cret-of-this-test", progress=False) as engine:
            report = engine.stage_report()
            out = engine.generate(input_ids=[[5, 6, 7]], sampling_params={"temperature": 0, "max_new_tokens": 4,
                                                                          "ignore_eos": True})
        assert [r["pp_rank"] for r in report] == [0, 1]
        with Engine(model_dir, dtype="float32", progress=False) as single:
            ref = single.generate(input_ids=[[5, 6, 7]], sampling_params={"temperature": 0, "max_new_tokens": 4,
                                                                          "ignore_eos": True})
        assert out[0]["output_ids"] == ref[0]["output_ids"]
        assert node1.wait(timeout=30) == 0
    finally:
        if node1.poll() is None:
            node1.kill()


def test_not_enough_memory_is_refused_with_the_stage_named(ckpt):
    too_many = 10 ** 12  # KV tokens: the pool alone would need far more than this machine has
    with pytest.raises(MemoryError, match="not enough memory on \\[pp 0/1 tp 0/1\\]"):
        Engine(ckpt("llama"), max_total_tokens=too_many, progress=False)
    with pytest.raises(RankFailedError, match="not enough memory on \\[pp [01]/2 tp 0/1\\]"):
        Engine(ckpt("llama"), pp_size=2, max_total_tokens=too_many, progress=False)
    assert rank_processes() == []
