"""Collectives inside a stage (TP all-reduce / all-gather), tensor send/recv between stages (PP), and the
world-wide minimum the stages agree on their pool sizes with.

Between stages only raw tensors travel (`dist.send`/`dist.recv`, or their async forms); the receiver
knows the shapes from the step's batch description, so nothing is serialized on the hot path.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from tandem.parallel.layout import GroupInfo

STAGE_TENSORS = ("hidden_states", "residual")


def tp_all_reduce(x: torch.Tensor, tp: GroupInfo) -> torch.Tensor:
    if tp.size == 1:
        return x
    dist.all_reduce(x, group=tp.group)
    return x


def tp_all_gather(x: torch.Tensor, tp: GroupInfo, dim: int = -1) -> torch.Tensor:
    """Concatenate each TP rank's shard of x along dim, in TP-rank order."""
    if tp.size == 1:
        return x
    x = x.contiguous()
    parts = [torch.empty_like(x) for _ in range(tp.size)]
    dist.all_gather(parts, x, group=tp.group)
    return torch.cat(parts, dim=dim)


def send_to_next_stage(tensors: dict[str, torch.Tensor], pp: GroupInfo) -> list:
    """Start sending the stage outputs to the same TP rank of the next stage; returns the pending works."""
    dst = pp.ranks[pp.rank + 1]
    return [dist.isend(tensors[name].contiguous(), dst) for name in STAGE_TENSORS]


def recv_from_prev_stage(pp: GroupInfo, num_tokens: int, hidden_size: int, dtype: torch.dtype,
                         device) -> dict[str, torch.Tensor]:
    src = pp.ranks[pp.rank - 1]
    out = {}
    for name in STAGE_TENSORS:
        buf = torch.empty(num_tokens, hidden_size, dtype=dtype, device=device)
        dist.recv(buf, src)
        out[name] = buf
    return out


def world_min(values: list[int], device) -> list[int]:
    """The element-wise minimum of `values` over every rank of the world (start-up agreement on pool sizes,
    which every stage must share); the values themselves in a single-process world."""
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return list(values)
    on = device if torch.device(device).type == "cuda" else "cpu"
    tensor = torch.tensor(values, dtype=torch.int64, device=on)
    dist.all_reduce(tensor, op=dist.ReduceOp.MIN)
    return tensor.tolist()
