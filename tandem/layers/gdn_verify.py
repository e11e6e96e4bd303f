"""Gated DeltaNet states under speculative decoding: a verify span (a request's last token plus k drafts)
must leave the conv and recurrent state exactly where the accepted tokens end, at any accepted length.

How (recompute, not per-position states): the verify forward runs the span token by token through the decode
kernels on a COPY of the request's state, so its slot keeps the state from before the span, and records the
span's inputs to the token mixer (the `in_proj_qkv` rows before the conv, `g`, `beta`: about
(C + 2 Hv) values per token and layer) in the stage's `VerifyLedger`. Once the drafts are judged, `commit`
replays the first j+1 tokens (the last token and the j accepted drafts) from those inputs on the slot itself,
with the same kernels a plain decode uses, so the state is the one j+1 decode steps leave. Keeping a state per
position instead would hold (k+1) recurrent states [Hv, Dk, Dv] float32 per request and layer from the verify
step until its commit (one pipeline round trip): with k = 3 that is 4x the state pool, which is what bounds
how many requests a hybrid model runs. The replay redoes only the short conv and the rule's recurrence, not
the projections (see docs/architecture.md for the measured cost).

One state per span is kept after all: the one after its last token (the copy the verify forward ends with).
A span whose drafts are all accepted, the common case with a good draft source, commits by writing that
state into the slot instead of replaying: one extra conv and recurrent state per verifying request and layer
until the commit, against a replay of k + 1 tokens (on the bundled model, NEXTN accepts about 3.6 of 4)."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass

import torch

from tandem.layers.gated_delta_rule import causal_conv1d_tokens, recurrent_gated_delta_rule_tokens
from tandem.layers.state_rows import StateRows


@dataclass
class VerifyInputs:
    """One verify span's token-mixer inputs in one layer."""

    mixed: torch.Tensor  # [n, C]: in_proj_qkv rows, before the causal conv
    g: torch.Tensor  # [n, Hv] float32 log-decay
    beta: torch.Tensor  # [n, Hv]
    final_conv: torch.Tensor | None = None  # [K-1, C]: the conv state after all n tokens
    final_state: torch.Tensor | None = None  # [Hv, Dk, Dv]: the recurrent state after all n tokens


class VerifyLedger:
    """A stage's verify spans awaiting their commit: state slot -> layer index -> `VerifyInputs`.
    The driver commits (or discards) a request's span before the request's next step, snapshot or reset."""

    def __init__(self):
        self._pending: dict[int, dict[int, VerifyInputs]] = {}

    def __contains__(self, slot: int) -> bool:
        return slot in self._pending

    @property
    def slots(self) -> list[int]:
        return sorted(self._pending)

    def record(self, layer_idx: int, slot: int, inputs: VerifyInputs) -> None:
        layers = self._pending.setdefault(slot, {})
        if layer_idx in layers:
            raise RuntimeError(f"state slot {slot} already has an uncommitted verify span in layer {layer_idx}")
        layers[layer_idx] = inputs

    def get(self, layer_idx: int, slot: int) -> VerifyInputs:
        inputs = self._pending.get(slot, {}).get(layer_idx)
        if inputs is None:
            raise KeyError(f"state slot {slot} has no verify span to commit in layer {layer_idx}")
        return inputs

    def drop(self, layer_idx: int, slot: int) -> None:
        layers = self._pending[slot]
        del layers[layer_idx]
        if not layers:
            del self._pending[slot]

    def discard(self, slots) -> None:
        """Forget the spans of `slots` (their requests were aborted or preempted): their states stay as
        they were before the span."""
        for slot in slots:
            self._pending.pop(slot, None)


SplitHeads = Callable[[torch.Tensor], tuple[torch.Tensor, torch.Tensor, torch.Tensor]]


def run_tokens(mixed: torch.Tensor, g: torch.Tensor, beta: torch.Tensor, weight: torch.Tensor,
               conv: torch.Tensor, state: torch.Tensor, split_heads: SplitHeads) -> torch.Tensor:
    """What n decode steps compute over n tokens of B requests (the `_tokens` kernels: the conv and the
    state-free parts once, the rule's updates token by token): mixed [B, n, C], g and beta [B, n, Hv];
    conv [B, K-1, C] and state [B, Hv, Dk, Dv] (contiguous) are updated IN PLACE.
    Returns the rule's output [B, n, Hv, Dv]."""
    q, k, v = split_heads(causal_conv1d_tokens(mixed, weight, None, conv))
    return recurrent_gated_delta_rule_tokens(q, k, v, g, beta, state)


def verify_forward(layer_idx: int, slots: list[int], mixed: torch.Tensor, g: torch.Tensor, beta: torch.Tensor,
                   weight: torch.Tensor, conv_pool: torch.Tensor, ssm_pool: torch.Tensor, split_heads: SplitHeads,
                   ledger: VerifyLedger) -> torch.Tensor:
    """Verify spans of equal length n at `slots`: outputs [B, n, Hv, Dv] for every position, computed on copies
    of the slots' states (the pools are not written); the inputs go to `ledger` for the commit."""
    index = torch.tensor(slots, dtype=torch.long, device=mixed.device)
    conv = conv_pool.index_select(0, index)  # copies: the slots keep the state from before the span
    state = ssm_pool.index_select(0, index)
    out = run_tokens(mixed, g, beta, weight, conv, state, split_heads)
    for row, slot in enumerate(slots):
        ledger.record(layer_idx, slot, VerifyInputs(mixed[row], g[row], beta[row], conv[row], state[row]))
    return out


def commit(layer_idx: int, accepted: Mapping[int, int], weight: torch.Tensor, conv_pool: torch.Tensor,
           ssm_pool: torch.Tensor, split_heads: SplitHeads, ledger: VerifyLedger) -> None:
    """accepted: state slot -> j, the number of accepted drafts (0..k): the slot's state moves on by the
    span's first j+1 tokens, exactly as j+1 decode steps would move it."""
    records = {slot: ledger.get(layer_idx, slot) for slot in accepted}  # checked before anything changes
    for slot, drafts in accepted.items():
        if not 0 <= drafts < records[slot].mixed.shape[0]:
            raise ValueError(f"state slot {slot}: {drafts} accepted drafts, but its verify span has "
                             f"{records[slot].mixed.shape[0] - 1}")
    # spans whose every draft was accepted take the verify's own final state (key 0); the others replay their
    # first j + 1 tokens, grouped by that length
    by_length: dict[int, list[int]] = {}
    for slot, drafts in accepted.items():
        whole = drafts + 1 == records[slot].mixed.shape[0] and records[slot].final_state is not None
        by_length.setdefault(0 if whole else drafts + 1, []).append(slot)
    for length, slots in by_length.items():
        group = [records[slot] for slot in slots]
        rows = StateRows(slots, conv_pool.device)
        if length == 0:
            final_conv, final_state = rows.to_slot_order(torch.stack([r.final_conv for r in group]),
                                                          torch.stack([r.final_state for r in group]))
            for pool, final in ((conv_pool, final_conv), (ssm_pool, final_state)):
                target = rows.read(pool)  # a view of the pool, or a copy that write puts back
                target.copy_(final)
                rows.write(pool, target)
            for slot in slots:
                ledger.drop(layer_idx, slot)
            continue
        mixed, g, beta = (torch.stack([getattr(r, name)[:length] for r in group])
                          for name in ("mixed", "g", "beta"))  # [B, j+1, ...]
        mixed, g, beta = rows.to_slot_order(mixed, g, beta)
        conv, state = rows.read(conv_pool), rows.read(ssm_pool)
        run_tokens(mixed, g, beta, weight, conv, state, split_heads)
        rows.write(conv_pool, conv)
        rows.write(ssm_pool, state)
        for slot in slots:
            ledger.drop(layer_idx, slot)
