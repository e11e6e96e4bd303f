"""Speculative decoding together with structured output: greedy tokens and logprobs equal the plain
(non-speculative) constrained run's, with oracle drafts (the constrained run's own tokens, one corrupted per
pass, `use_oracle`), so that spans accept every length 0..k and corrupted drafts the grammar refuses are cut
before they are verified. Sampled (seeded) runs with real NGRAM drafts give outputs the grammar accepts.
The references are checked to differ from the unconstrained run, so the grammar really shapes the tokens."""

from __future__ import annotations

import json
import re

import pytest

from tandem.engine import Engine
from tests.test_speculative_decoding import SPEC, TOLERANCE, assert_same, plain_run, prompts, use_oracle

REGEX = r"(yes|no)-[0-9]{2,30}"
SCHEMA = {"type": "object", "properties": {"a": {"type": "integer"}, "b": {"type": "string", "maxLength": 6}},
          "required": ["a", "b"], "additionalProperties": False}
GREEDY = {"temperature": 0, "max_new_tokens": 24}


def constraints(think_end: int) -> list[dict]:
    """Per prompt of `prompts()`: a regex, a JSON schema, a regex after a reasoning-end token, none, a regex."""
    return [{"regex": REGEX}, {"json_schema": json.dumps(SCHEMA)},
            {"regex": "[0-9]+", "constraint_after_token_id": think_end}, {}, {"regex": "(ab|c)+"}]


def count_cuts(engine: Engine) -> list[int]:
    """Wraps the tracker's draft cut; returns the list of drafts cut per call (appended to as it runs)."""
    tracker, cuts = engine.constraints, []
    admissible = tracker.admissible_drafts

    def record(req, drafts):
        kept = admissible(req, drafts)
        cuts.append(len(drafts) - len(kept))
        return kept

    tracker.admissible_drafts = record
    return cuts


@pytest.mark.parametrize("kind,layout", [("llama", {}), ("qwen3_5", {"pp_size": 2})], ids=["llama-pp1", "qwen3_5-pp2"])
def test_constrained_greedy_tokens_equal_the_plain_constrained_run(ckpt, kind, layout):
    model_dir = ckpt(kind, with_tokenizer=True)
    free = plain_run(model_dir, prompts(), GREEDY)
    think_end = free[2]["output_ids"][4]  # the grammar starts after this token of the free run
    sampling = [{**GREEDY, **c} for c in constraints(think_end)]
    with Engine(model_dir, dtype="float32", progress=False) as engine:
        reference = engine.generate(input_ids=prompts(), sampling_params=sampling, return_logprob=True)
    assert all(reference[i]["output_ids"] != free[i]["output_ids"] for i in (0, 1, 2, 4))
    start = free[2]["output_ids"].index(think_end) + 1  # free text up to and with the token's first occurrence
    assert reference[2]["output_ids"][:start] == free[2]["output_ids"][:start]
    with Engine(model_dir, dtype="float32", progress=False, **layout, **SPEC) as engine:
        accepted = use_oracle(engine, {tuple(p): r["output_ids"] for p, r in zip(prompts(), reference)})
        cuts = count_cuts(engine)
        got = engine.generate(input_ids=prompts(), sampling_params=sampling, return_logprob=True)
    assert_same(got, reference, TOLERANCE[kind])
    assert max(accepted) == SPEC["speculative_num_steps"] and sum(accepted) > len(accepted)
    assert any(cuts)  # some corrupted drafts were refused by the grammar before they were verified


def test_sampled_constrained_outputs_with_ngram_drafts_are_valid(ckpt):
    model_dir = ckpt("llama", with_tokenizer=True)
    cases = [({"regex": REGEX}, lambda text: re.fullmatch(REGEX, text)),
             ({"regex": "(ab|c)+"}, lambda text: re.fullmatch("(ab|c)+", text)),
             ({"json_schema": json.dumps(SCHEMA)}, lambda text: _valid_json(text))]
    with Engine(model_dir, dtype="float32", progress=False, **SPEC) as engine:
        for extra, valid in cases:
            sampling = {"temperature": 1.0, "seed": 3, "max_new_tokens": 48, "n": 3, **extra}
            results = engine.generate(input_ids=[prompts()[3], prompts()[4]], sampling_params=sampling)
            for result in results:
                if result["meta_info"]["finish_reason"]["type"] == "stop":
                    assert valid(result["text"]), (extra, result["text"])
                else:  # cut by max_new_tokens: a prefix of a valid output, which the grammar still accepts
                    assert len(result["output_ids"]) == 48
        stats = engine.cache_stats()
    assert stats["spec_verify_passes"] > 0 and stats["spec_accepted_drafts"] > 0


def _valid_json(text: str) -> bool:
    import jsonschema

    jsonschema.validate(json.loads(text), SCHEMA)
    return True
