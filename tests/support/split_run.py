"""One engine with an automatic layer partition next to one process on the same prompts: what a test of a
`--pp-layer-partition auto-*` kind checks (the split the engine chose, each rank's layers, equal tokens)."""

from __future__ import annotations

from dataclasses import dataclass

GREEDY = {"temperature": 0, "max_new_tokens": 4, "ignore_eos": True}


@dataclass
class SplitRun:
    partition: list[int]
    layer_ranges: list[tuple[int, int]]  # (layer_start, layer_end) of each rank's report
    output_ids: list[list[int]]  # the pp engine's greedy tokens
    single_output_ids: list[list[int]]  # one process's greedy tokens on the same prompts


def run_split_and_single(path, prompts: list[list[int]], spec: str, pp_size: int = 2) -> SplitRun:
    from tandem.engine import Engine

    with Engine(path, pp_size=pp_size, dtype="float32", pp_layer_partition=spec, progress=False) as engine:
        partition = engine.partition
        out = engine.generate(input_ids=prompts, sampling_params=GREEDY)
        reports = engine.stage_report()
    with Engine(path, dtype="float32", progress=False) as single:
        expected = single.generate(input_ids=prompts, sampling_params=GREEDY)
    return SplitRun(partition, [(r["layer_start"], r["layer_end"]) for r in reports],
                    [o["output_ids"] for o in out], [e["output_ids"] for e in expected])
