"""A `tandem serve` subprocess for tests (loopback only), a pool that keeps one live per server configuration
of a test module, the checkpoint the server tests serve, and /proc helpers to find what a server listens on."""

from __future__ import annotations

import contextlib
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

REPO = Path(__file__).resolve().parents[2]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class ServeProcess:
    """`python -m tandem.cli serve --model-path <model_dir> --port <free> <flags>`, output in `log`."""

    def __init__(self, model_dir: Path, log: Path, flags: list[str], api_key: str | None = None):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log = log
        self.headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        env = dict(os.environ, PYTHONPATH=str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""))
        env.pop("TANDEM_API_KEY", None)
        key_flags = ["--api-key", api_key] if api_key else []
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "tandem.cli", "serve", "--model-path", str(model_dir), "--port", str(self.port),
             *key_flags, *flags], stdout=log.open("wb"), stderr=subprocess.STDOUT, cwd=REPO, env=env)

    @classmethod
    @contextlib.contextmanager
    def running(cls, model_dir: Path, log: Path, flags: list[str]):
        """A healthy server for the duration of a `with` block (a module fixture's body); stopped after."""
        server = cls(model_dir, log, flags)
        try:
            server.wait_healthy()
            yield server
        finally:
            server.stop()

    def log_text(self) -> str:
        return self.log.read_text(errors="replace")

    def wait_healthy(self, timeout_s: float = 240) -> None:
        """Until /health answers 200 (the bound only keeps a broken server from hanging the run)."""
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise AssertionError(f"server exited with {self.proc.returncode}:\n{self.log_text()[-4000:]}")
            try:
                if httpx.get(self.url + "/health", timeout=5).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.2)
        raise AssertionError(f"server not healthy after {timeout_s} s:\n{self.log_text()[-4000:]}")

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)


class ServerPool:
    """One server configuration of a test module: started by `start()` (without waiting, so that a module can
    compute its references while it loads) or on first use, again after a test has stopped it, and anew by
    `fresh()` for a test that must not see what earlier tests did to a shared server (a restart used up)."""

    def __init__(self, model_dir: Path, log_dir: Path, name: str, flags: list[str], api_key: str | None = None):
        self.model_dir, self.log_dir, self.name = model_dir, log_dir, name
        self.flags, self.api_key = flags, api_key
        self.started = 0
        self.current: ServeProcess | None = None

    def start(self) -> ServeProcess:
        self.started += 1
        log = self.log_dir / f"{self.name}{self.started}.log"
        self.current = ServeProcess(self.model_dir, log, self.flags, self.api_key)
        return self.current

    def live(self) -> ServeProcess:
        """The running server, healthy; a new one when there is none or a test stopped it."""
        if self.current is None or self.current.proc.poll() is not None:
            self.start()
        self.current.wait_healthy()
        return self.current

    def fresh(self) -> ServeProcess:
        """A newly started server, healthy."""
        self.stop()
        self.start()
        return self.live()

    def stop(self) -> None:
        if self.current is not None:
            self.current.stop()


def served_checkpoint(request, tmp_path_factory) -> Path:
    """The hybrid MoE test checkpoint with a tokenizer: from the session's `ckpt` cache when the suite's
    conftest provides it, else built for the calling module."""
    try:
        ckpt = request.getfixturevalue("ckpt")
    except pytest.FixtureLookupError:  # no shared checkpoint cache
        from support.checkpoints import build_checkpoint

        return build_checkpoint("qwen3_5_moe", tmp_path_factory.mktemp("served_ckpt"), with_tokenizer=True)
    return ckpt("qwen3_5_moe", with_tokenizer=True)


def children(pid: int) -> list[int]:
    """PIDs of the processes whose parent is `pid`."""
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                if int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1]) == pid:
                    found.append(int(entry.name))
            except (OSError, ValueError, IndexError):
                continue
    return found


def _socket_inodes(pid: int) -> set[int]:
    inodes = set()
    try:
        for fd in Path(f"/proc/{pid}/fd").iterdir():
            try:
                target = os.readlink(fd)
            except OSError:
                continue
            if target.startswith("socket:["):
                inodes.add(int(target[len("socket:["):-1]))
    except OSError:
        pass
    return inodes


def _decode_address(hex_address: str) -> tuple[str, int]:
    host, port = hex_address.split(":")
    raw = bytes.fromhex(host)
    if len(raw) == 4:
        address = socket.inet_ntop(socket.AF_INET, raw[::-1])
    else:  # /proc/net/tcp6 stores four little-endian 32-bit words
        address = socket.inet_ntop(socket.AF_INET6, b"".join(raw[i:i + 4][::-1] for i in range(0, 16, 4)))
    return address, int(port, 16)


def listening_sockets(pids: list[int]) -> list[tuple[int, str, int]]:
    """(pid, address, port) of every TCP socket in LISTEN state held by one of `pids` (/proc/net/tcp{,6}
    matched with /proc/<pid>/fd)."""
    owner = {inode: pid for pid in pids for inode in _socket_inodes(pid)}
    found = []
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            lines = Path(table).read_text().splitlines()[1:]
        except OSError:
            continue
        for line in lines:
            fields = line.split()
            local, state, inode = fields[1], fields[3], int(fields[9])
            if state == "0A" and inode in owner:  # 0A: TCP_LISTEN
                found.append((owner[inode], *_decode_address(local)))
    return found
