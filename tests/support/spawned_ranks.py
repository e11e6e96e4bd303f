"""Running a test's own rank function in spawned processes on 127.0.0.1 (gloo's sockets on loopback) and
collecting what each rank returns: `run_ranks` for a function that joins the world itself, `run_in_gloo_world`
for one that runs inside a world already joined."""

from __future__ import annotations

import multiprocessing as mp
import os
import socket


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_ranks(target, world: int, *args, timeout: float = 300) -> dict:
    """Start `target(rank, port, *args, results)` for each rank in spawned processes; each puts one
    (rank, value) on `results`. Returns {rank: value}; every process is joined, or killed if it hangs."""
    context = mp.get_context("spawn")
    results, port = context.Queue(), free_port()
    procs = [context.Process(target=_on_loopback, args=(target, rank, port, args, results)) for rank in range(world)]
    for proc in procs:
        proc.start()
    try:
        return dict(results.get(timeout=timeout) for _ in procs)
    finally:
        for proc in procs:
            proc.join(timeout=60)
            if proc.is_alive():
                proc.kill()


def run_in_gloo_world(target, world: int, *args, timeout: float = 300) -> dict:
    """`target(rank, *args)` in each rank of a gloo world of `world` spawned processes (one torch thread
    each), the world joined before and left after. Returns {rank: what target returned} (plain values: a
    tensor in the queue is shared through a socket that dies with its process)."""
    return run_ranks(_in_world, world, world, target, args, timeout=timeout)


def _on_loopback(target, rank: int, port: int, args: tuple, results) -> None:
    os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")
    target(rank, port, *args, results)


def _in_world(rank: int, port: int, world: int, target, args: tuple, results) -> None:
    import torch
    import torch.distributed as dist

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", world_size=world, rank=rank)
    try:
        results.put((rank, target(rank, *args)))
    finally:
        dist.destroy_process_group()
