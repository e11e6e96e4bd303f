"""The rank process: joins torch.distributed, builds its stage's `ModelRunner` for its `ParallelLayout`, then
executes the steps the driver publishes, in order, until told to stop. It sends `Ready` (with its stage
report), `Result` (last stage, TP rank 0 only) and `Failure` (with the cause) to the driver. Messages are
the typed, authenticated structs of `tandem.executors.messages`; a frame that fails to authenticate or
decode is dropped with a warning.

A rank never outlives the driver: on Linux the kernel kills it when its parent dies (PR_SET_PDEATHSIG),
and a watchdog thread exits when the parent process is gone."""

from __future__ import annotations

import logging
import os
import signal
import sys
import threading
import time
import traceback
from collections import deque

import msgspec
import torch

from tandem.executors.messages import (
    AskReport,
    Codec,
    DriverMessage,
    Failure,
    Launch,
    Ready,
    Report,
    Result,
    RunStep,
    Stop,
    decode_launch,
)

IDLE_CHECK_MS = 10  # no step for this long: the rank is idle (steps of a busy pipeline arrive within ~1 ms)
STEPS_KEPT = 4096  # the newest steps a rank's report lists in "steps_run" (as many as its step_times)


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


def rank_main(launch: Launch) -> None:
    _die_with_parent()
    import zmq

    from tandem.runtime.planning.decode_timing import rank_threads

    args = launch.args
    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(name)s %(message)s", stream=sys.stderr)
    torch.set_num_threads(rank_threads(launch.local_world_size))
    codec = Codec(launch.secret, DriverMessage)
    context = zmq.Context()
    results = context.socket(zmq.PUSH)
    results.setsockopt(zmq.LINGER, 2000)
    results.connect(launch.results_addr)
    steps = context.socket(zmq.SUB)
    steps.setsockopt(zmq.SUBSCRIBE, b"")
    steps.connect(launch.steps_addr)
    send = lambda message: results.send_multipart(codec.encode(message))
    where = f"rank {launch.rank}"
    try:
        layout = _join_groups(launch)
        where = f"rank {launch.rank} {layout.label}"
        runner = _build_runner(launch, layout)
        send(Ready(launch.rank, runner.report()))
        _serve(runner, steps, codec, send, launch.rank)
    except BaseException as exc:  # report every failure, then leave: the driver tears the world down
        cause = f"{type(exc).__name__}: {exc}"
        logging.getLogger("tandem").debug(traceback.format_exc())
        send(Failure(launch.rank, f"{where}: {cause}"))
        results.close()
        context.term()
        os._exit(1)
    results.close(linger=2000)
    steps.close(linger=0)
    context.term()
    os._exit(0)


def _join_groups(launch: Launch):
    """This rank's `ParallelLayout`, its torch.distributed process groups joined."""
    from tandem.parallel.layout import init_process_groups

    args = launch.args
    if args.device == "cuda":
        torch.cuda.set_device(launch.rank % torch.cuda.device_count())
    backend = "nccl" if args.device == "cuda" else "gloo"
    return init_process_groups(args.tp_size, launch.partition, launch.rank, backend, launch.init_method)


def _build_runner(launch: Launch, layout):
    """This rank's `ModelRunner`: its stage built, its weights loaded, its pools sized and allocated."""
    from tandem.config import EngineConfig
    from tandem.models.registry import load_model_config
    from tandem.runtime.model_runner import ModelRunner

    args = launch.args
    config = EngineConfig.resolve(args, load_model_config(args.model_path))
    return ModelRunner(config, layout, progress=launch.progress and launch.rank == 0,
                       local_ranks=launch.local_world_size)


def _serve(runner, steps, codec: Codec, send, rank: int) -> None:
    """Run the published steps in order until `Stop`; the last stage's TP rank 0 returns each step's result."""
    is_reporter = runner.layout.pp.is_last and runner.layout.tp.rank == 0
    # (step_id, next_queued) of each step run: whether the driver's next message had already arrived when this
    # rank finished the step, before it sent the step's Result: an order, not a time (tests read it)
    steps_run: deque[tuple[int, bool]] = deque(maxlen=STEPS_KEPT)
    while True:
        if not steps.poll(IDLE_CHECK_MS):
            # idle: settle this stage's last send, so that a next stage that died (a gloo send to it fails
            # only when waited on) is reported instead of the world waiting on each other for ever
            runner.finish_sends()
        message = codec.decode(steps.recv_multipart())
        if message is None:
            continue
        if isinstance(message, Stop):
            return
        if isinstance(message, AskReport):
            send(Report(rank, msgspec.structs.replace(runner.report(), steps_run=list(steps_run))))
            continue
        assert isinstance(message, RunStep)
        out = runner.execute(message.step)
        steps_run.append((message.step_id, bool(steps.poll(0))))
        if is_reporter:
            send(Result(message.step_id, out))


if __name__ == "__main__":
    rank_main(decode_launch(sys.stdin.buffer.read()))
