"""`RankRecovery`: how the engine replaces a failed world of ranks, and its fault counters.

When a rank dies or raises (or the executor fails in any other way) the engine's step loop hands the failure
here. Every unfinished request goes back to the front of the queue, whatever is left of the old world is
stopped, and a fresh one with the same layout is started (weights reloaded); a start that fails is retried
as a new failure. After `max_restarts` restarts within `window_s` seconds the next failure is final: a
`RankFailedError` naming the last cause, which the engine keeps as its `error`.

The engine supplies the world operations (`World`), so that this module holds only the policy and the
counters, not the engine's locks or scheduler."""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass

from tandem.errors import RankFailedError

logger = logging.getLogger("tandem")


@dataclass(frozen=True)
class World:
    """What recovery does to the engine: requeue its unfinished requests (returns them), stop the failed
    executor, start a fresh one (may raise), install it, and whether the engine is shutting down."""

    requeue: Callable[[], list]
    stop_failed: Callable[[], None]
    start: Callable[[], object]
    install: Callable[[object], None]
    stopping: Callable[[], bool]


class RankRecovery:
    def __init__(self, max_restarts: int, window_s: float):
        self.max_restarts, self.window_s = max_restarts, window_s
        self.rank_failures = 0
        self.restarts = 0
        self.recovering: str | None = None  # the cause, while the ranks are being restarted
        self._restart_times: list[float] = []  # monotonic times of recent restarts

    def stats(self) -> dict:
        """{"rank_failures", "restarts", "recovering"}: failures seen, restarts that succeeded, and whether a
        restart is under way."""
        return {"rank_failures": self.rank_failures, "restarts": self.restarts,
                "recovering": self.recovering is not None}

    def recover(self, failure: Exception, world: World) -> None:
        """Replace the failed world by a fresh one and requeue every running request; RankFailedError when
        the last `max_restarts` restarts all fall within `window_s` seconds. Returns without a new world
        when the engine shuts down meanwhile."""
        cause = str(failure) if isinstance(failure, RankFailedError) else f"{type(failure).__name__}: {failure}"
        requeued: list = []
        while True:
            self.rank_failures += 1
            logger.error("rank failure #%d: %s", self.rank_failures, cause)
            self.recovering = cause
            requeued += world.requeue()
            with contextlib.suppress(Exception):  # stop whatever is left of the failed world
                world.stop_failed()
            self._allow_restart(cause)
            logger.warning("restarting the ranks (restart %d); %d request(s) will be prefilled again",
                           self.restarts + 1, len(requeued))
            try:
                executor = world.start()
            except Exception as exc:
                if world.stopping():  # shutdown abandoned the restart
                    self.recovering = None
                    return
                cause = f"the restart failed: {exc}"
                continue
            break
        if world.stopping():
            executor.shutdown()
            self.recovering = None
            return
        world.install(executor)
        self.recovering = None
        self.restarts += 1
        logger.warning("the ranks are back (restart %d); resuming %d request(s)", self.restarts, len(requeued))

    def _allow_restart(self, cause: str) -> None:
        """Count a restart now, or raise RankFailedError when the window already holds `max_restarts`."""
        now = time.monotonic()
        self._restart_times = [t for t in self._restart_times if now - t < self.window_s]
        if len(self._restart_times) >= self.max_restarts:
            self.recovering = None
            raise RankFailedError(f"giving up: {len(self._restart_times)} restart(s) of the ranks in the last "
                                  f"{self.window_s:g} s (--max-rank-restarts {self.max_restarts}); last failure: "
                                  f"{cause}")
        self._restart_times.append(now)
