"""How much memory a rank sizes its pools from: a CUDA device's total memory; on CPU the RAM available now
(MemAvailable), shared equally by the ranks of the node."""

from __future__ import annotations

import torch


def available_memory_bytes(device: torch.device) -> int:
    """Free memory now: CUDA's free device memory, or the machine's MemAvailable."""
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    try:
        for line in open("/proc/meminfo"):
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 1 << 62  # unknown: do not refuse


def device_memory_bytes(device: torch.device, local_ranks: int) -> int:
    """The memory one rank on `device` sizes its pools from."""
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).total_memory
    return available_memory_bytes(device) // max(1, local_ranks)


def driver_device_memory_bytes(device_kind: str, local_ranks: int) -> int:
    """The same, seen from the driver before any rank starts (CUDA: the first device's total memory)."""
    device = torch.device("cuda", 0) if device_kind == "cuda" else torch.device("cpu")
    return device_memory_bytes(device, local_ranks)
