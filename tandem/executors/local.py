"""`LocalExecutor`: the single-process world (tp = pp = 1) in the caller's process."""

from __future__ import annotations

from tandem.config import EngineConfig
from tandem.executors.capacity import capacity_of
from tandem.parallel.layout import ParallelLayout
from tandem.runtime.model_runner import ModelRunner
from tandem.runtime.stage_report import StageReport
from tandem.runtime.step import StepInput, StepOutput


class LocalExecutor:
    def __init__(self, config: EngineConfig, partition: list[int], progress: bool = True):
        layout = ParallelLayout.single(config.model.num_layers)
        if list(layout.partition) != list(partition):
            raise ValueError(f"one process holds every layer; got partition {partition}")
        self.runner = ModelRunner(config, layout, progress=progress)
        self.capacity = capacity_of([self.runner.report()])
        self._results: dict[int, StepOutput] = {}
        self._next_id = 0

    def submit(self, step: StepInput) -> int:
        """Runs the step now (one process has nothing to overlap); `collect` hands the result over."""
        self._next_id += 1
        self._results[self._next_id] = self.runner.execute(step)
        return self._next_id

    def collect(self, step_id: int) -> StepOutput:
        return self._results.pop(step_id)

    def reports(self) -> list[StageReport]:
        return [self.runner.report()]

    def dead_ranks(self) -> list[str]:
        """The one rank is this process: never dead while anyone can ask."""
        return []

    def check_alive(self) -> None:
        """Nothing to check: a failure in this process raises from `submit`."""

    def shutdown(self, graceful: bool = True) -> None:
        self.runner = None
