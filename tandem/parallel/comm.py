"""Collectives inside a stage (TP all-reduce / all-gather) and tensor send/recv between stages (PP).

Between stages only raw tensors travel (`dist.send`/`dist.recv`, or their async forms); the receiver
knows the shapes from the step's batch description, so nothing is pickled on the hot path.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from tandem.parallel.state import get_pp, get_tp

STAGE_TENSORS = ("hidden_states", "residual")


def tp_all_reduce(x: torch.Tensor) -> torch.Tensor:
    tp = get_tp()
    if tp.size == 1:
        return x
    dist.all_reduce(x, group=tp.group)
    return x


def tp_all_gather(x: torch.Tensor, dim: int = -1) -> torch.Tensor:
    """Concatenate each TP rank's shard of x along dim, in TP-rank order."""
    tp = get_tp()
    if tp.size == 1:
        return x
    x = x.contiguous()
    parts = [torch.empty_like(x) for _ in range(tp.size)]
    dist.all_gather(parts, x, group=tp.group)
    return torch.cat(parts, dim=dim)


def send_to_next_stage(tensors: dict[str, torch.Tensor]) -> list:
    """Start sending the stage outputs to the same TP rank of the next stage; returns the pending works."""
    pp = get_pp()
    dst = pp.ranks[pp.rank + 1]
    return [dist.isend(tensors[name].contiguous(), dst) for name in STAGE_TENSORS]


def recv_from_prev_stage(num_tokens: int, hidden_size: int, dtype: torch.dtype, device) -> dict[str, torch.Tensor]:
    pp = get_pp()
    src = pp.ranks[pp.rank - 1]
    out = {}
    for name in STAGE_TENSORS:
        buf = torch.empty(num_tokens, hidden_size, dtype=dtype, device=device)
        dist.recv(buf, src)
        out[name] = buf
    return out
