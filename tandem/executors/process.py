"""Driver side of a multi-process world: starts this node's rank processes, publishes steps to every rank
over ZMQ, collects results, and turns any rank failure into a `RankFailedError` that names the rank and the
cause. `shutdown()` leaves no rank process behind. Every message is a typed, authenticated struct
(`tandem.executors.messages`); anything else that reaches the sockets is dropped.

Addresses: the step feed at port+1 and the result channel at port+2 of `dist_init_addr` (host:port;
default a free 127.0.0.1 port), so ranks on other nodes can find the driver; the torch.distributed
rendezvous is a TCP store at `dist_init_addr` across nodes, a file in a private temporary directory on one
node. On one node every socket binds to loopback (gloo's too: GLOO_SOCKET_IFNAME=lo unless set); across
nodes the secret comes from `--dist-auth-token`.

`check_alive()` raises at once for a rank that has exited, so the engine can replace a world that died
while idle; `abandon` (an Event) stops waiting for ranks that are still starting."""

from __future__ import annotations

import atexit
import itertools
import logging
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import zmq

from tandem.config import EngineArgs
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
from tandem.runtime.stage_report import StageReport
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


def _rank_environment(args: EngineArgs) -> dict | None:
    """On one node, gloo listens on loopback only (unless the operator chose an interface)."""
    if args.nnodes > 1 or "GLOO_SOCKET_IFNAME" in os.environ or not Path("/sys/class/net/lo").exists():
        return None
    return dict(os.environ, GLOO_SOCKET_IFNAME="lo")


def start_node_ranks(args: EngineArgs, partition: list[int], host: str, port: int, secret: bytes,
                     progress: bool = True, init_method: str | None = None) -> list[subprocess.Popen]:
    """Start this node's share of the ranks as fresh interpreters (`python -m tandem.executors.rank`), so
    nothing depends on the caller's __main__ and no torch threads are forked. The rendezvous is
    `init_method` (default: a TCP store at host:port)."""
    per_node = args.world_size // args.nnodes
    procs = []
    env = _rank_environment(args)
    for local in range(per_node):
        rank = args.node_rank * per_node + local
        launch = Launch(rank, args.world_size, per_node, init_method or f"tcp://{host}:{port}",
                        f"tcp://{host}:{port + 1}", f"tcp://{host}:{port + 2}", list(partition), secret, args,
                        progress)
        proc = subprocess.Popen([sys.executable, "-m", "tandem.executors.rank"], stdin=subprocess.PIPE,
                                start_new_session=True, env=env)
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
    def __init__(self, args: EngineArgs, partition: list[int], progress: bool = True,
                 abandon: threading.Event | None = None):
        if args.node_rank != 0:
            raise ValueError("the driver runs on node 0; other nodes run `run_node`")
        self.args = args
        self.procs: list = []
        self._abandon = abandon
        self._context = zmq.Context()
        self._io = threading.RLock()
        self._closed = False
        # one node: rendezvous through a file only this user can reach, so no TCP store listens anywhere
        self._store_dir = tempfile.mkdtemp(prefix="tandem-rendezvous-") if args.nnodes == 1 else None
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
        init_method = f"file://{self._store_dir}/store" if self._store_dir else None
        self.procs = start_node_ranks(args, partition, host, port, secret, progress, init_method)
        self._reports: dict[int, StageReport] = {}
        self._fresh: set[int] = set()
        try:
            self._await_ready()
        except BaseException:
            self.shutdown()
            raise
        self.capacity = capacity_of(list(self._reports.values()))

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
        # a rank killed by a signal sends nothing; its peers then fail on the broken connection, possibly
        # before the kernel has finished its exit: look for it a moment, and name it first
        deadline = time.monotonic() + 0.5
        while True:
            killed = [p for p in self.procs if p.poll() is not None and p.returncode < 0 and p.name not in cause]
            if killed or time.monotonic() > deadline or all(p.poll() is not None for p in self.procs):
                break
            time.sleep(0.02)
        if killed:
            cause = f"{killed[0].name} was killed by signal {-killed[0].returncode}; then {cause}"
        self.shutdown(graceful=False)
        raise RankFailedError(cause)

    def _await_ready(self) -> None:
        deadline = time.monotonic() + STARTUP_TIMEOUT_S
        while len(self._reports) < self.args.world_size:
            if self._abandon is not None and self._abandon.is_set():
                self._fail("abandoned while the ranks were starting (the engine is shutting down)")
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

    def check_alive(self) -> None:
        """Raise RankFailedError (with the rank's own cause, when it sent one) if a rank has exited."""
        while self.dead_ranks():
            message = self._receive(0.05)  # raises once no message of the dead rank is left
            if message is not None:
                self._handle(message)

    def dead_ranks(self) -> list[str]:
        """'rank N exited with code C' for each of this node's rank processes that has exited."""
        return [f"{p.name} exited with code {p.returncode}" for p in self.procs if p.poll() is not None]

    def reports(self) -> list[StageReport]:
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
        if self._store_dir:
            shutil.rmtree(self._store_dir, ignore_errors=True)
        atexit.unregister(self.shutdown)


def _wait_for_exit_or_failure(procs: list[subprocess.Popen]) -> bool:
    """Wait until every process exited with 0 (True) or one exited otherwise (False)."""
    while True:
        codes = [p.poll() for p in procs]
        if any(c not in (None, 0) for c in codes):
            return False
        if all(c == 0 for c in codes):
            return True
        time.sleep(0.2)


def run_node(args: EngineArgs, partition: list[int]) -> int:
    """Run a non-driver node's ranks until the driver on node 0 stops them (exit code 0). When one of them
    fails, the driver restarts the world: this node restarts its ranks too, within the same restart limit
    (--max-rank-restarts within --rank-restart-window), then exits with the failed rank's code."""
    host, port = _addresses(args)
    secret = control_secret(args)
    restarts: list[float] = []
    while True:
        procs = start_node_ranks(args, partition, host, port, secret)
        try:
            if _wait_for_exit_or_failure(procs):
                return 0
        finally:
            stop_processes(procs, grace_s=0.0)
        failed = next(p for p in procs if p.returncode not in (None, 0))
        now = time.monotonic()
        restarts = [t for t in restarts if now - t < args.rank_restart_window]
        if len(restarts) >= args.max_rank_restarts:
            logger.error("%s exited with code %s; giving up after %d restart(s)", failed.name, failed.returncode,
                         len(restarts))
            return failed.returncode if failed.returncode > 0 else 1
        restarts.append(now)
        logger.warning("%s exited with code %s; restarting this node's ranks", failed.name, failed.returncode)
