"""Running a test's own rank function in spawned processes (a small gloo world on 127.0.0.1) and collecting
what each rank puts on the results queue."""

from __future__ import annotations

import multiprocessing as mp
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
    procs = [context.Process(target=target, args=(rank, port, *args, results)) for rank in range(world)]
    for proc in procs:
        proc.start()
    try:
        return dict(results.get(timeout=timeout) for _ in procs)
    finally:
        for proc in procs:
            proc.join(timeout=60)
            if proc.is_alive():
                proc.kill()
