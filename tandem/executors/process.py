"""Driver side of a multi-process world: starts this node's rank processes, publishes steps to every rank
over ZMQ, collects results, and turns any rank failure into a `RankFailedError` that names the rank and the
cause. `shutdown()` leaves no rank process behind. Every message is a typed, authenticated struct
(`tandem.executors.messages`); anything else that reaches the sockets is dropped.

Addresses: torch.distributed rendezvous at `dist_init_addr` (host:port; default a free 127.0.0.1 port),
the step feed at port+1 and the result channel at port+2, so ranks on other nodes can find the driver. On
one node every socket binds to loopback; across nodes the secret comes from `--dist-auth-token`."""

from __future__ import annotations

import atexit
import itertools
import logging
import socket
import subprocess
import sys
import threading
import time

import zmq

from tandem.config import EngineArgs, ModelConfig
from tandem.errors import ConfigError, RankFailedError
from tandem.executors import messages
from tandem.executors.capacity import capacity_of
from tandem.executors.messages import (
    AskReport,
    Codec,
    Failure,
    Launch,
    RankMessage,
    Ready,
    Report,
    Result,
    RunStep,
    Stop,
)
from tandem.runtime.step import StepInput, StepOutput

logger = logging.getLogger("tandem")
STARTUP_TIMEOUT_S = 600


def _free_port_triple(host: str = "127.0.0.1") -> int:
    """A port p such that p, p+1 and p+2 are all free right now."""
    for _ in range(100):
        with socket.socket() as s:
            s.bind((host, 0))
            base = s.getsockname()[1]
        if base + 2 > 65535:
            continue
        try:
            probes = []
            for offset in (1, 2):
                probe = socket.socket()
                probes.append(probe)
                probe.bind((host, base + offset))
            return base
        except OSError:
            continue
        finally:
            for probe in probes:
                probe.close()
    raise RuntimeError("could not find three consecutive free ports")


def _addresses(args: EngineArgs) -> tuple[str, int]:
    if args.dist_init_addr:
        host, _, port = args.dist_init_addr.rpartition(":")
        return host or "127.0.0.1", int(port)
    return "127.0.0.1", _free_port_triple()


def control_secret(args: EngineArgs) -> bytes:
    """A fresh secret per launch on one node; across nodes, the one every node derives from the token."""
    if args.nnodes == 1:
        return messages.new_secret()
    if not args.dist_auth_token:
        raise ConfigError("--dist-auth-token is required when --nnodes > 1: every node must pass the same "
                          "secret so that the driver and the ranks accept only each other's messages")
    return messages.secret_from_token(args.dist_auth_token)


def start_node_ranks(args: EngineArgs, partition: list[int], host: str, port: int, secret: bytes,
                     progress: bool = True) -> list[subprocess.Popen]:
    """Start this node's share of the ranks as fresh interpreters (`python -m tandem.executors.rank`), so
    nothing depends on the caller's __main__ and no torch threads are forked."""
    per_node = args.world_size // args.nnodes
    procs = []
    for local in range(per_node):
        rank = args.node_rank * per_node + local
        launch = Launch(rank, args.world_size, per_node, f"tcp://{host}:{port}", f"tcp://{host}:{port + 1}",
                        f"tcp://{host}:{port + 2}", list(partition), secret, args, progress)
        proc = subprocess.Popen([sys.executable, "-m", "tandem.executors.rank"], stdin=subprocess.PIPE,
                                start_new_session=True)
        proc.stdin.write(messages.encode_launch(launch))
        proc.stdin.close()
        proc.name = f"rank {rank}"
        procs.append(proc)
    return procs


def stop_processes(procs: list[subprocess.Popen], grace_s: float = 5.0) -> None:
    deadline = time.monotonic() + grace_s
    for proc in procs:
        try:
            proc.wait(max(0.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            pass
    for proc in procs:
        if proc.poll() is None:
            proc.terminate()
    for proc in procs:
        try:
            proc.wait(2.0)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(2.0)


class ProcessExecutor:
    def __init__(self, args: EngineArgs, model_config: ModelConfig, partition: list[int], progress: bool = True):
        if args.node_rank != 0:
            raise ValueError("the driver runs on node 0; other nodes run `run_node`")
        self.args = args
        self.procs: list = []
        self._context = zmq.Context()
        self._io = threading.RLock()
        self._closed = False
        secret = control_secret(args)
        self._codec = Codec(secret, RankMessage)
        host, port = _addresses(args)
        bind_host = "*" if args.nnodes > 1 else host
        self._steps = self._context.socket(zmq.PUB)
        self._steps.setsockopt(zmq.SNDHWM, 0)
        self._steps.bind(f"tcp://{bind_host}:{port + 1}")
        self._results = self._context.socket(zmq.PULL)
        self._results.bind(f"tcp://{bind_host}:{port + 2}")
        self._step_ids = itertools.count()
        self._done: dict[int, StepOutput] = {}
        atexit.register(self.shutdown)
        self.procs = start_node_ranks(args, partition, host, port, secret, progress)
        self._reports: dict[int, dict] = {}
        self._fresh: set[int] = set()
        try:
            self._await_ready()
        except BaseException:
            self.shutdown()
            raise
        self.capacity = capacity_of(list(self._reports.values()))
        self.max_len = self.capacity.max_len

    # ---- messages ----------------------------------------------------------------------------------
    def _receive(self, timeout_s: float):
        """Next authentic message from any rank, or None after timeout; raises if a local rank died."""
        with self._io:  # ZMQ sockets are not thread-safe; stage_report() may run beside the step loop
            if self._results.poll(int(min(timeout_s, 0.05) * 1000)):
                return self._codec.decode(self._results.recv_multipart())
        dead = [p for p in self.procs if p.poll() is not None]
        if dead:
            # a rank that reports an error exits right after; give its message a moment to arrive
            with self._io:
                if self._results.poll(1000):
                    return self._codec.decode(self._results.recv_multipart())
            proc = dead[0]
            self._fail(f"{proc.name} exited unexpectedly with code {proc.returncode}"
                       + (" (killed: out of memory?)" if proc.returncode == -9 else ""))
        return None

    def _handle(self, message) -> None:
        if isinstance(message, Failure):
            self._fail(message.cause)
        elif isinstance(message, (Ready, Report)):
            self._reports[message.rank] = message.report
            self._fresh.add(message.rank)
        elif isinstance(message, Result):
            self._done[message.step_id] = message.output

    def _fail(self, cause: str) -> None:
        self.shutdown(graceful=False)
        raise RankFailedError(cause)

    def _await_ready(self) -> None:
        deadline = time.monotonic() + STARTUP_TIMEOUT_S
        while len(self._reports) < self.args.world_size:
            if time.monotonic() > deadline:
                self._fail(f"only {len(self._reports)} of {self.args.world_size} ranks became ready in "
                           f"{STARTUP_TIMEOUT_S} s")
            message = self._receive(0.2)
            if message is not None:
                self._handle(message)

    # ---- steps -------------------------------------------------------------------------------------
    def submit(self, step: StepInput) -> int:
        step_id = next(self._step_ids)
        with self._io:
            self._steps.send_multipart(self._codec.encode(RunStep(step_id, step)))
        return step_id

    def collect(self, step_id: int) -> StepOutput:
        while step_id not in self._done:
            message = self._receive(0.5)
            if message is not None:
                self._handle(message)
        return self._done.pop(step_id)

    def dead_ranks(self) -> list[str]:
        """'rank N exited with code C' for each of this node's rank processes that has exited."""
        return [f"{p.name} exited with code {p.returncode}" for p in self.procs if p.poll() is not None]

    def reports(self) -> list[dict]:
        """Every rank's current report (asked after all submitted steps, which ranks run in order)."""
        self._fresh.clear()
        with self._io:
            self._steps.send_multipart(self._codec.encode(AskReport()))
        while len(self._fresh) < self.args.world_size:
            message = self._receive(0.5)
            if message is not None:
                self._handle(message)
        return [self._reports[r] for r in sorted(self._reports)]

    def shutdown(self, graceful: bool = True) -> None:
        if self._closed:
            return
        self._closed = True
        if graceful:
            try:
                self._steps.send_multipart(self._codec.encode(Stop()))
            except zmq.ZMQError:
                pass
        stop_processes(self.procs, grace_s=5.0 if graceful else 0.0)
        self._steps.close(linger=0)
        self._results.close(linger=0)
        self._context.term()
        atexit.unregister(self.shutdown)


def run_node(args: EngineArgs, partition: list[int]) -> int:
    """Run a non-driver node's ranks until they exit (the driver on node 0 stops them)."""
    host, port = _addresses(args)
    procs = start_node_ranks(args, partition, host, port, control_secret(args))
    try:
        for proc in procs:
            proc.wait()
    finally:
        stop_processes(procs, grace_s=0.0)
    return max((p.returncode or 0) for p in procs)
