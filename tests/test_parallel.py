"""Pipeline and tensor parallelism across real processes (gloo on 127.0.0.1) against the single-process run.

fp32, tp=1: logprobs bit-identical to pp=1 (the reference runs with one torch thread, as each rank does
on this 2-core machine). tp=2: greedy tokens equal, logprobs within 1e-4."""

from __future__ import annotations

import pytest
import torch

from support.pipeline import steps_sent_ahead
from tandem.engine import Engine

PROMPTS = [[3, 17, 92, 5], list(range(40, 77)), [250], [9, 8, 7, 6, 5, 4, 3, 2, 1, 12, 13]]
SAMPLING = {"temperature": 0, "max_new_tokens": 6, "ignore_eos": True}
IRREGULAR = ["linear_attention", "full_attention", "linear_attention", "linear_attention", "full_attention",
             "linear_attention"]

MODELS = {
    "qwen3_5_moe_mm": {"kind": "qwen3_5_moe", "fused_experts": True, "multimodal": True, "add_mtp": True,
                       "num_layers": 6, "layer_types": IRREGULAR},
    "qwen3_5_tied": {"kind": "qwen3_5", "tied": True},
    "qwen3_moe": {"kind": "qwen3_moe"},
    "llama": {"kind": "llama"},
}
# (model, tp, pp, partition)
CASES = [
    ("qwen3_5_moe_mm", 1, 2, None), ("qwen3_5_moe_mm", 1, 3, None), ("qwen3_5_moe_mm", 1, 4, None),
    ("qwen3_5_moe_mm", 1, 2, "1,5"), ("qwen3_5_moe_mm", 2, 1, None), ("qwen3_5_moe_mm", 2, 2, None),
    ("qwen3_5_tied", 1, 2, None), ("qwen3_5_tied", 2, 2, None),
    ("qwen3_moe", 1, 3, None), ("qwen3_moe", 2, 1, None),
    ("llama", 1, 4, None), ("llama", 1, 2, "1,3"), ("llama", 4, 1, None),  # tp4 > 2 KV heads: replicated
]
# pp4 and tp4 take the paths pp3 and tp2 take, with four ranks on CI's two cores (a minute together): outside CI
PARAMS = [pytest.param(*c, id=f"{c[0]}-tp{c[1]}-pp{c[2]}-{c[3]}",
                       marks=[pytest.mark.slow] if 4 in c[1:3] else []) for c in CASES]


def model_dir(ckpt, name: str):
    spec = dict(MODELS[name])
    return ckpt(spec.pop("kind"), **spec)


@pytest.fixture(scope="module")
def single_process(ckpt):
    """single_process(name): the one-process run of PROMPTS, once per model in this module."""
    runs: dict[str, list[dict]] = {}

    def get(name: str) -> list[dict]:
        if name not in runs:
            threads = torch.get_num_threads()
            torch.set_num_threads(1)
            try:
                with Engine(model_dir(ckpt, name), dtype="float32", progress=False) as engine:
                    runs[name] = engine.generate(input_ids=PROMPTS, sampling_params=SAMPLING, return_logprob=True)
            finally:
                torch.set_num_threads(threads)
        return runs[name]

    return get


@pytest.mark.parametrize("name,tp,pp,partition", PARAMS)
def test_parallel_matches_single_process(ckpt, single_process, name, tp, pp, partition):
    ref = single_process(name)
    # one micro-batch: the batch composition equals the single-process run's, so results can be bit-identical
    with Engine(model_dir(ckpt, name), tp_size=tp, pp_size=pp, dtype="float32", pp_layer_partition=partition,
                num_micro_batches=1, progress=False) as engine:
        out = engine.generate(input_ids=PROMPTS, sampling_params=SAMPLING, return_logprob=True)
        report = engine.stage_report()
    assert len(report) == tp * pp
    for expected, got in zip(ref, out):
        assert got["output_ids"] == expected["output_ids"]
        exp_lp = [lp for lp, _ in expected["meta_info"]["output_token_logprobs"]]
        got_lp = [lp for lp, _ in got["meta_info"]["output_token_logprobs"]]
        if tp == 1:
            assert got_lp == exp_lp  # bit-identical: the per-layer arithmetic does not change
        else:
            assert max(abs(a - b) for a, b in zip(got_lp, exp_lp)) < 1e-4


def test_pipelined_micro_batches_overlap_and_keep_tokens(ckpt, single_process):
    """pp=2 with two micro-batches in flight: the same greedy tokens as one process, and the two stages
    really work at the same time: stage 0 holds the next step while stage 1 still computes the previous one
    (an order the ranks record, `support.pipeline.steps_sent_ahead`)."""
    ref = single_process("qwen3_5_moe_mm")
    prompts = PROMPTS * 2
    with Engine(model_dir(ckpt, "qwen3_5_moe_mm"), pp_size=2, dtype="float32", progress=False) as engine:
        assert engine.num_micro_batches == 2
        out = engine.generate(input_ids=prompts, sampling_params=dict(SAMPLING, max_new_tokens=12),
                              return_logprob=True)
        report = engine.stage_report()
    for i, got in enumerate(out):
        expected = ref[i % len(PROMPTS)]
        assert got["output_ids"][:6] == expected["output_ids"]
        got_lp = [lp for lp, _ in got["meta_info"]["output_token_logprobs"]][:6]
        exp_lp = [lp for lp, _ in expected["meta_info"]["output_token_logprobs"]]
        assert max(abs(a - b) for a, b in zip(got_lp, exp_lp)) < 1e-4
    assert steps_sent_ahead(report), f"no step was sent ahead of the last stage: {report[-1]['steps_run']}"


def test_one_micro_batch_does_not_overlap(ckpt):
    """The control for the test above: with one step in flight the stages take turns."""
    with Engine(model_dir(ckpt, "qwen3_5_moe_mm"), pp_size=2, dtype="float32", num_micro_batches=1,
                progress=False) as engine:
        engine.generate(input_ids=PROMPTS * 2, sampling_params=dict(SAMPLING, max_new_tokens=12))
        report = engine.stage_report()
    assert steps_sent_ahead(report) == []
