"""The activation reserve with speculative decoding (`runtime/memory/activation_reserve.py`): the decode dry
run becomes verify spans of 1 + k tokens, holding the verify ledger's Gated-DeltaNet entries alive, with the
last stage judging every position and, with NEXTN, drafting with the MTP head. Each rank measures its own
reserve; the references are the plain engine's reserve and a hand-computed lower bound (one final
conv + recurrent state per request and linear-attention layer, what the ledger keeps until the commit: the
bytes of one state slot per request). The MTP head's own peak (one decoder layer over the verified rows) is
usually below the verify forward's and the judge's, so NEXTN's reserve need not exceed NGRAM's: that the dry
run drafts, and over which rows, is checked where it happens (in process, pp1)."""

from __future__ import annotations

from tandem.engine import Engine
from tandem.runtime.mtp_drafter import MTPDrafter

SIZES = dict(max_running_requests=16, context_length=256, chunked_prefill_size=32)
NGRAM = {"speculative_algorithm": "NGRAM", "speculative_num_steps": 3}
NEXTN = {"speculative_algorithm": "NEXTN", "speculative_num_steps": 3}


def reports(model_dir, **spec) -> list[dict]:
    with Engine(model_dir, pp_size=2, dtype="float32", progress=False, **SIZES, **spec) as engine:
        return engine.stage_report()


def test_verify_spans_and_the_mtp_head_are_in_the_activation_reserve(ckpt):
    model_dir = ckpt("qwen3_5", add_mtp=True)
    plain, ngram, nextn = reports(model_dir), reports(model_dir, **NGRAM), reports(model_dir, **NEXTN)
    for p, g in zip(plain, ngram):
        assert p["state_bytes_per_slot"] > 0  # both stages hold linear-attention layers
        held = SIZES["max_running_requests"] * p["state_bytes_per_slot"]
        assert g["activation_reserve_bytes"] - p["activation_reserve_bytes"] >= held, p["pp_rank"]
    first, last = 0, 1
    assert nextn[first]["activation_reserve_bytes"] == ngram[first]["activation_reserve_bytes"]
    assert nextn[last]["activation_reserve_bytes"] >= ngram[last]["activation_reserve_bytes"]  # the MTP head


def test_the_dry_run_drafts_with_the_mtp_head_over_every_verify_span(ckpt, monkeypatch):
    calls = []
    propose = MTPDrafter.propose

    def recording(self, batch, hidden, keys, page_tables, spans, kv_pool=None):
        calls.append((batch.num_tokens, [s.accepted for s in spans], self.num_steps))
        return propose(self, batch, hidden, keys, page_tables, spans, kv_pool)

    monkeypatch.setattr(MTPDrafter, "propose", recording)
    with Engine(ckpt("qwen3_5", add_mtp=True), dtype="float32", progress=False, **SIZES, **NEXTN) as engine:
        assert engine.stage_report()[0]["activation_reserve_bytes"] > 0
    requests, k = SIZES["max_running_requests"], NEXTN["speculative_num_steps"]
    assert calls == [(requests * (1 + k), [k] * requests, k)]  # before any request: the dry run alone
