"""Qwen3.5's Gated DeltaNet layer (linear attention), tensor-parallel by heads.

q/k/v channels of `in_proj_qkv` and of the depthwise `conv1d` are split per part (q, k, v) so that every
rank keeps whole key heads and the value heads they serve; `A_log`, `dt_bias`, `in_proj_a/b` and `in_proj_z`
split by value heads; `out_proj` is row-parallel. Per-request conv and recurrent states live in the stage's
linear-attention state pool (float32 recurrent state), in the slot each span names; one-token continuations
run batched through the recurrent step, longer spans one by one through the chunked rule; verify spans
(speculative decoding) token by token on copies of their states, committed later at the accepted length
(`gdn_verify.py`)."""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from tandem.layers import gdn_verify
from tandem.layers.forward_batch import ForwardBatch
from tandem.layers.gated_delta_rule import (
    causal_conv1d_decode,
    causal_conv1d_prefill,
    chunk_gated_delta_rule,
    recurrent_gated_delta_rule_step,
)
from tandem.layers.linear import ColumnParallelLinear, MergedColumnParallelLinear, RowParallelLinear, divide
from tandem.layers.norm import GatedRMSNorm
from tandem.layers.state_rows import StateRows
from tandem.layers.weights import load_parts, new_param, sharded_loader
from tandem.parallel.layout import GroupInfo


class ParallelDepthwiseConv1d(nn.Module):
    """conv1d.weight [channels, 1, K] whose channels are the q, k, v parts, each split across TP ranks
    (loaded like a merged column-parallel weight; applied by the causal conv kernels, not as a matmul)."""

    def __init__(self, tp: GroupInfo, part_sizes: list[int], kernel_size: int):
        super().__init__()
        self.tp = tp
        self.full_sizes = list(part_sizes)
        local_sizes = [divide(size, tp.size, "conv channels") for size in part_sizes]
        self.weight = new_param(sum(local_sizes), 1, kernel_size, weight_loader=self._load,
                                shard_ids=tuple(range(len(part_sizes))))

    def _load(self, param: torch.Tensor, loaded: torch.Tensor, shard_id=None) -> None:
        load_parts(param, loaded, shard_id, self.full_sizes, self.tp)


class GatedDeltaNet(nn.Module):
    def __init__(self, tp: GroupInfo, config, layer_idx: int):
        super().__init__()
        self.layer_idx = layer_idx
        hidden = config.hidden_size
        self.head_k_dim = config.linear_key_head_dim
        self.head_v_dim = config.linear_value_head_dim
        self.num_k_heads = divide(config.linear_num_key_heads, tp.size, "linear-attention key heads")
        self.num_v_heads = divide(config.linear_num_value_heads, tp.size, "linear-attention value heads")
        key_dim = config.linear_num_key_heads * self.head_k_dim
        value_dim = config.linear_num_value_heads * self.head_v_dim
        self.local_key_dim = self.num_k_heads * self.head_k_dim
        self.local_value_dim = self.num_v_heads * self.head_v_dim
        self.in_proj_qkv = MergedColumnParallelLinear(tp, hidden, [key_dim, key_dim, value_dim])
        self.in_proj_z = ColumnParallelLinear(tp, hidden, value_dim)
        self.in_proj_b = ColumnParallelLinear(tp, hidden, config.linear_num_value_heads)
        self.in_proj_a = ColumnParallelLinear(tp, hidden, config.linear_num_value_heads)
        self.conv1d = ParallelDepthwiseConv1d(tp, [key_dim, key_dim, value_dim], config.linear_conv_kernel_dim)
        self.A_log = new_param(self.num_v_heads, weight_loader=sharded_loader(0, tp))
        self.dt_bias = new_param(self.num_v_heads, weight_loader=sharded_loader(0, tp))
        self.norm = GatedRMSNorm(self.head_v_dim, eps=config.rms_norm_eps)
        self.out_proj = RowParallelLinear(tp, value_dim, hidden)

    @property
    def conv_channels(self) -> int:
        return 2 * self.local_key_dim + self.local_value_dim

    def forward(self, x: torch.Tensor, batch: ForwardBatch) -> torch.Tensor:
        num_tokens = x.shape[0]
        mixed = self.in_proj_qkv(x)  # [T, conv_channels]
        z = self.in_proj_z(x).view(num_tokens, self.num_v_heads, self.head_v_dim)
        beta = self.in_proj_b(x).sigmoid()  # [T, Hv]
        g = -self.A_log.float().exp() * F.softplus(self.in_proj_a(x).float() + self.dt_bias)  # [T, Hv]
        conv_state, ssm_state = batch.state_pool.layer(self.layer_idx)
        weight = self.conv1d.weight.squeeze(1)  # [C, K]
        if batch.is_decode:
            core = self._decode(mixed, g, beta, weight, conv_state, ssm_state, batch.decode_state_rows)
        else:
            core = torch.empty(num_tokens, self.num_v_heads, self.head_v_dim, dtype=x.dtype, device=x.device)
            decodes = set(batch.decode_spans)
            for length, group in batch.verify_groups.items():  # verify spans of one length, all at once
                rows = batch.verify_rows[length]
                core[rows] = self._verify(mixed[rows], g[rows], beta[rows], weight, conv_state, ssm_state,
                                          [batch.spans[i].state_slot for i in group], length, batch.verify_ledger)
            if decodes:  # one-token continuations of a mixed batch, all at once
                rows = torch.tensor([batch.offsets[i] for i in batch.decode_spans], dtype=torch.long, device=x.device)
                core[rows] = self._decode(mixed[rows], g[rows], beta[rows], weight, conv_state, ssm_state,
                                          batch.decode_state_rows)
            for i, (offset, span) in enumerate(zip(batch.offsets, batch.spans)):
                if i in decodes or i in batch.verify:
                    continue
                rows = slice(offset, offset + span.num_tokens)
                core[rows] = self._prefill(mixed[rows], g[rows], beta[rows], weight, conv_state, ssm_state,
                                           span.state_slot)
        out = self.norm(core, z).reshape(num_tokens, self.local_value_dim)
        return self.out_proj(out)

    def _split_heads(self, mixed: torch.Tensor):
        q, k, v = torch.split(mixed, [self.local_key_dim, self.local_key_dim, self.local_value_dim], dim=-1)
        lead = mixed.shape[:-1]
        q = q.reshape(*lead, self.num_k_heads, self.head_k_dim)
        k = k.reshape(*lead, self.num_k_heads, self.head_k_dim)
        v = v.reshape(*lead, self.num_v_heads, self.head_v_dim)
        repeat = self.num_v_heads // self.num_k_heads
        if repeat > 1:  # each key head serves `repeat` consecutive value heads
            q = q.repeat_interleave(repeat, dim=-2)
            k = k.repeat_interleave(repeat, dim=-2)
        return q, k, v

    def _prefill(self, mixed, g, beta, weight, conv_state, ssm_state, slot: int) -> torch.Tensor:
        mixed, conv_state[slot] = causal_conv1d_prefill(mixed, weight, None, conv_state[slot])
        q, k, v = self._split_heads(mixed)  # [n, Hv, D]
        out, ssm_state[slot] = chunk_gated_delta_rule(q, k, v, g, beta, ssm_state[slot])
        return out

    def _decode(self, mixed, g, beta, weight, conv_state, ssm_state, rows: StateRows) -> torch.Tensor:
        mixed, g, beta = rows.to_slot_order(mixed, g, beta)
        conv = rows.read(conv_state)  # [B, K-1, C]: in place in the pool when the slots are one run
        mixed = causal_conv1d_decode(mixed, weight, None, conv)
        rows.write(conv_state, conv)
        q, k, v = self._split_heads(mixed)  # [B, Hv, D]
        state = rows.read(ssm_state)
        out = recurrent_gated_delta_rule_step(q, k, v, g, beta, state)
        rows.write(ssm_state, state)
        return rows.from_slot_order(out)

    def _verify(self, mixed, g, beta, weight, conv_state, ssm_state, slots, length, ledger) -> torch.Tensor:
        per_span = lambda t: t.reshape(len(slots), length, *t.shape[1:])  # [B*n, ...] -> [B, n, ...]
        out = gdn_verify.verify_forward(self.layer_idx, slots, per_span(mixed), per_span(g), per_span(beta), weight,
                                        conv_state, ssm_state, self._split_heads, ledger)
        return out.reshape(len(slots) * length, *out.shape[2:])

    def commit_verified(self, state_pool, ledger: gdn_verify.VerifyLedger, accepted: dict[int, int]) -> None:
        """Move each slot's state on by its verify span's first accepted[slot] + 1 tokens."""
        conv_state, ssm_state = state_pool.layer(self.layer_idx)
        gdn_verify.commit(self.layer_idx, accepted, self.conv1d.weight.squeeze(1), conv_state, ssm_state,
                          self._split_heads, ledger)


def commit_verified(model: nn.Module, state_pool, ledger: gdn_verify.VerifyLedger, accepted: dict[int, int]) -> None:
    """After the drafts are judged: "commit request r's state at j of its k+1 positions" for every Gated-DeltaNet
    layer of a stage's model; accepted maps state slot -> j (accepted drafts). Every slot must have a pending
    verify span in every layer."""
    for module in model.modules():
        if isinstance(module, GatedDeltaNet):
            module.commit_verified(state_pool, ledger, accepted)
    left = [slot for slot in accepted if slot in ledger]
    if left:
        raise RuntimeError(f"state slots {left} still have verify spans of layers this model does not hold")
