"""A `tandem serve` subprocess for end-to-end tests: started on a free port, waited for until /health answers,
killed (with its rank processes, which die with their parent) at the end."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx

REPO = Path(__file__).resolve().parents[2]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class ServeProcess:
    """`python -m tandem.cli serve --model-path MODEL --port P *flags`, logging to `log`."""

    def __init__(self, model_dir, log: Path, *flags: str):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log = log
        env = dict(os.environ, PYTHONPATH=str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""))
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "tandem.cli", "serve", "--model-path", str(model_dir), "--port", str(self.port),
             *flags], stdout=log.open("wb"), stderr=subprocess.STDOUT, cwd=REPO, env=env)

    def wait_healthy(self, timeout_s: float = 240) -> None:
        """Return once /health answers 200; raise RuntimeError (with the log's tail) if the server exits or
        does not become healthy within timeout_s (a guard against hanging, not a speed requirement)."""
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"server exited with {self.proc.returncode}:\n{self.log.read_text()[-4000:]}")
            try:
                if httpx.get(self.url + "/health", timeout=2).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.3)
        raise RuntimeError(f"server not healthy after {timeout_s} s:\n{self.log.read_text()[-4000:]}")

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)
