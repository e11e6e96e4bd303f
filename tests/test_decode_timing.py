"""`--pp-layer-partition auto-latency`: the split balances stage decode times measured on the device
(`tandem.runtime.planning.decode_timing`), checked by brute force on hand-made timings and end to end in an engine."""

import itertools

import pytest

from tandem.config import EngineArgs, EngineConfig
from tandem.errors import PartitionError
from tandem.models.registry import load_model_config
from tandem.parallel.partition import stage_bounds
from tandem.runtime.planning import resolve, search
from tandem.runtime.planning.decode_timing import DecodeTiming, calibration_shape, measure_decode_timing, time_decode_parts

try:
    from support.checkpoints import build_checkpoint
    from support.split_run import run_split_and_single
except ImportError:  # tests/ imported as a package
    from tests.support.checkpoints import build_checkpoint
    from tests.support.split_run import run_split_and_single


def compositions(n: int, parts: int):
    for cuts in itertools.combinations(range(1, n), parts - 1):
        bounds = (0, *cuts, n)
        yield [bounds[i + 1] - bounds[i] for i in range(parts)]


def slowest_stage(timing: DecodeTiming, split: list[int]) -> float:
    extras = search.stage_extras(timing.extra_seconds, len(split))
    return max(sum(timing.layer_seconds[start:end]) + extra for (start, end), extra in zip(stage_bounds(split), extras))


@pytest.mark.parametrize("layers, head", [((1.0,) * 8, 2.2), ((3.0, 1.0, 1.0, 4.0, 1.0, 2.0, 1.0, 1.0), 0.5),
                                          ((0.4, 0.4, 2.0, 0.4, 0.4, 2.0, 0.4, 0.4, 0.4, 2.0), 6.0)])
def test_auto_latency_is_optimal_by_brute_force(layers, head):
    timing = DecodeTiming(32, 64, layers, {"single": head + 0.1, "first": 0.1, "middle": 0.0, "last": head})
    costs = object()  # auto-latency needs no config-derived costs
    for pp in (2, 3, 4):
        got = resolve.partition_from_costs(costs, pp, "auto-latency", timing=timing)
        assert len(got) == pp and sum(got) == len(layers)
        assert slowest_stage(timing, got) == pytest.approx(
            min(slowest_stage(timing, split) for split in compositions(len(layers), pp)), rel=1e-12)


def test_auto_latency_needs_a_measurement():
    timing = None
    with pytest.raises(PartitionError, match="auto-latency times the model"):
        resolve.partition_from_costs(object(), 2, "auto-latency", timing=timing)


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    root = tmp_path_factory.mktemp("decode_timing")
    hybrid = ["linear_attention", "full_attention", "linear_attention", "full_attention"]
    return {"hybrid": build_checkpoint("qwen3_5_moe", root / "hybrid", layer_types=hybrid),
            # a vocabulary of 64k rows over a tiny hidden size: the LM head and sampler cost many layers
            "big_head": build_checkpoint("llama", root / "big_head", num_layers=4, vocab_size=65536)}


def test_measurement_covers_every_layer_kind(checkpoints):
    path = checkpoints["hybrid"]
    config = load_model_config(path)
    args = EngineArgs(model_path=str(path), pp_size=2, dtype="float32", max_running_requests=8,
                      num_micro_batches=2, context_length=64)
    assert calibration_shape(EngineConfig.resolve(args, config)) == (4, 32)
    timing = time_decode_parts(EngineConfig.resolve(args, config), reps=2)
    assert (timing.batch, timing.context) == (4, 32)
    # the child-interpreter probe measures the same parts at the same shape
    child = measure_decode_timing(args)
    assert (child.batch, child.context, len(child.layer_seconds)) == (4, 32, config.num_layers)
    assert len(timing.layer_seconds) == config.num_layers
    # one measurement per kind, shared by the layers of that kind: layers 0/2 (Gated DeltaNet) and 1/3 (full
    # attention); the two kinds are measured apart (two timings of different work are never the same float)
    for seconds in (timing.layer_seconds, child.layer_seconds):
        assert seconds[0] == seconds[2] and seconds[1] == seconds[3] and seconds[0] != seconds[1]
        assert all(0 < s < float("inf") for s in seconds)
    assert timing.extra_seconds["single"] == pytest.approx(timing.extra_seconds["first"] + timing.extra_seconds["last"])
    assert timing.extra_seconds["middle"] == 0.0


def test_engine_runs_the_split_of_its_measured_timing(checkpoints, monkeypatch):
    """The engine splits by the timing its probe returns: here a timing written by hand (the first layer
    five times as slow as the others), whose best split by brute force, [1, 3], is neither the uniform one
    nor what the model's bytes or FLOPs would give; each rank then holds those layers and the tokens equal
    one process's."""
    written = DecodeTiming(4, 32, (5.0, 1.0, 1.0, 1.0), {"single": 0.2, "first": 0.1, "middle": 0.0, "last": 0.1})
    best = min(compositions(4, 2), key=lambda split: slowest_stage(written, split))
    assert best == [1, 3]
    probed = []

    def probe(args):
        probed.append(args.pp_size)
        return written

    monkeypatch.setattr(resolve, "measure_decode_timing", probe)
    run = run_split_and_single(checkpoints["big_head"], [[5, 17, 42, 99, 123, 7], [3, 1, 4, 1, 5]], "auto-latency")
    assert probed == [2] and run.partition == best
    assert run.layer_ranges == [(0, 1), (1, 4)]
    assert run.output_ids == run.single_output_ids
