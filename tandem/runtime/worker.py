"""The rank process: joins torch.distributed, builds its stage's `ModelRunner`, then executes the steps the
driver publishes, in order, until told to stop. It reports "ready" (with its stage report), "result"
(last stage, TP rank 0 only) and "error" (with the cause) to the driver over ZMQ.

A rank never outlives the driver: on Linux the kernel kills it when its parent dies (PR_SET_PDEATHSIG),
and a watchdog thread exits when the parent process is gone."""

from __future__ import annotations

import logging
import os
import pickle
import signal
import sys
import threading
import time
import traceback
from dataclasses import dataclass

import torch


@dataclass
class RankSpec:
    rank: int
    world_size: int
    local_world_size: int
    init_method: str
    steps_addr: str  # driver's PUB socket
    results_addr: str  # driver's PULL socket
    partition: list[int]
    progress: bool = True  # show the loading progress bar (rank 0 only)


def _die_with_parent() -> None:
    parent = os.getppid()
    try:
        import ctypes

        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass

    def watch() -> None:
        while True:
            if os.getppid() != parent:
                os._exit(1)
            time.sleep(0.5)

    threading.Thread(target=watch, daemon=True).start()


def rank_main(spec: RankSpec, args) -> None:
    _die_with_parent()
    import zmq

    from tandem.config import ModelConfig
    from tandem.parallel.state import get_pp, get_tp, init_parallel, set_partition
    from tandem.runtime.model_runner import ModelRunner, stage_label

    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(name)s %(message)s", stream=sys.stderr)
    torch.set_num_threads(max(1, (os.cpu_count() or 1) // spec.local_world_size))
    context = zmq.Context()
    results = context.socket(zmq.PUSH)
    results.setsockopt(zmq.LINGER, 2000)
    results.connect(spec.results_addr)
    steps = context.socket(zmq.SUB)
    steps.setsockopt(zmq.SUBSCRIBE, b"")
    steps.connect(spec.steps_addr)
    send = lambda *msg: results.send(pickle.dumps(msg))
    where = f"rank {spec.rank}"
    try:
        if args.device == "cuda":
            torch.cuda.set_device(spec.rank % torch.cuda.device_count())
        backend = "nccl" if args.device == "cuda" else "gloo"
        init_parallel(args.tp_size, args.pp_size, spec.rank, backend, spec.init_method)
        where = f"rank {spec.rank} {stage_label()}"
        set_partition(spec.partition)
        runner = ModelRunner(args, ModelConfig.from_hf(args.model_path), progress=spec.progress and spec.rank == 0)
        send("ready", spec.rank, runner.report())
        is_reporter = get_pp().is_last and get_tp().rank == 0
        while True:
            message = pickle.loads(steps.recv())
            if message[0] == "stop":
                break
            if message[0] == "report":
                send("report", spec.rank, runner.report())
                continue
            _, step_id, step = message
            out = runner.execute(step)
            if is_reporter:
                send("result", step_id, out)
    except BaseException as exc:  # report every failure, then leave: the driver tears the world down
        cause = f"{type(exc).__name__}: {exc}"
        logging.getLogger("tandem").debug(traceback.format_exc())
        send("error", spec.rank, f"{where}: {cause}")
        results.close()
        context.term()
        os._exit(1)
    results.close(linger=2000)
    steps.close(linger=0)
    context.term()
    os._exit(0)


if __name__ == "__main__":
    rank_spec, engine_args = pickle.load(sys.stdin.buffer)
    rank_main(rank_spec, engine_args)
