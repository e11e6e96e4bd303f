"""The bundled model's MTP head (models/default, `mtp.*` trained by scripts/train_default_model.py): read only
with speculation, and its NEXTN drafts through Tandem's drafter accepted on the long-answer counting task
(`scripts/mtp_accept_length.py`: transformers' greedy answers and final hidden states, Tandem's drafter
walking each answer as greedy speculative decoding does), far above what no head (1 token per verify step)
or an untrained one gives."""

from __future__ import annotations

import importlib.util
from pathlib import Path

from tandem.evaluation.counting import MAX_ANSWER_TOKENS, heldout_count_problems
from tandem.loader import load_weights
from tandem.models.qwen3_5 import Qwen3_5MoeForCausalLM
from tandem.models.registry import load_model_config
from tandem.parallel.layout import ParallelLayout

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_MODEL = ROOT / "models" / "default"


def accept_script():
    spec = importlib.util.spec_from_file_location("mtp_accept_length", ROOT / "scripts" / "mtp_accept_length.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_bundled_head_is_read_only_with_speculation():
    config = load_model_config(DEFAULT_MODEL)
    assert config.mtp_num_hidden_layers == 1
    reads = {}
    for mtp in (False, True):
        model = Qwen3_5MoeForCausalLM(config, ParallelLayout.single(config.num_layers), mtp=mtp)
        reads[mtp] = {n for n in load_weights(model, DEFAULT_MODEL, progress=False).tensors_read if n.startswith("mtp.")}
    assert not reads[False] and len(reads[True]) >= 30  # fc, norms, attention, router, 8 experts, shared expert


def test_bundled_head_drafts_are_accepted_on_counting():
    script = accept_script()
    prompts = [p.completion_prompt for p in heldout_count_problems(8)]
    result = script.measure(script.Target(str(DEFAULT_MODEL)), script.Drafts(str(DEFAULT_MODEL), 3), prompts,
                            MAX_ANSWER_TOKENS)
    assert result["accept_length"] >= 2.5, result
    assert result["mean_accepted_drafts_per_position"] >= 1.5, result
