"""Layer partitions (tandem.parallel.partition): the uniform rule, explicit partitions and their errors, the
one resolver (tandem.runtime.planning.resolve.resolve_partition), and make_layers / PPMissingLayer for a stage's
`ParallelLayout` (no processes are started)."""

import pytest
import torch
import torch.nn as nn

from tandem.errors import PartitionError
from tandem.parallel.layout import ParallelLayout
from tandem.parallel.partition import PPMissingLayer, make_layers, parse_partition, stage_bounds, uniform_partition
from tandem.runtime.planning.resolve import resolve_partition as resolve


def no_costs():
    raise AssertionError("the cost model must only be asked for automatic partitions")


def resolve_partition(spec, num_layers, pp_size, costs=no_costs):
    return resolve(spec, pp_size, num_layers, costs)


# ---- uniform ---------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("layers, stages, expected", [
    (43, 2, [22, 21]),
    (43, 4, [11, 11, 11, 10]),
    (7, 3, [2, 3, 2]),  # one extra layer: a middle stage takes it
    (8, 4, [2, 2, 2, 2]),
    (10, 4, [2, 3, 3, 2]),  # the remainder fills the middle stages first
    (5, 1, [5]),
    (4, 4, [1, 1, 1, 1]),
])
def test_uniform_partition_values(layers, stages, expected):
    assert uniform_partition(layers, stages) == expected


@pytest.mark.parametrize("layers", range(1, 50))
@pytest.mark.parametrize("stages", [1, 2, 3, 4, 5, 8])
def test_uniform_partition_properties(layers, stages):
    if stages > layers:
        with pytest.raises(PartitionError):
            uniform_partition(layers, stages)
        return
    counts = uniform_partition(layers, stages)
    assert len(counts) == stages and sum(counts) == layers
    base = layers // stages
    assert all(c in (base, base + 1) for c in counts)
    assert counts[-1] == base, "the last stage (LM head) never gets a remainder layer"
    if 0 < layers % stages < stages - 1:
        # fewer extras than non-last stages: the stage right before the last is served before the first one
        assert counts[-2] == base + 1 and counts[0] == base


def test_uniform_is_the_default_of_resolve_partition():
    assert resolve_partition(None, 43, 4) == uniform_partition(43, 4)
    assert resolve_partition("uniform", 7, 3) == [2, 3, 2]
    assert resolve_partition("4,3", 7, 2) == [4, 3]


def test_auto_asks_the_cost_model():
    with pytest.raises(AssertionError, match="cost model"):
        resolve_partition("auto", 8, 2)
    with pytest.raises(PartitionError, match="unknown automatic partition"):
        resolve_partition("automatic", 8, 2)


@pytest.mark.parametrize("layers, stages", [(3, 4), (1, 2), (4, 0), (4, -1)])
def test_uniform_rejects_impossible_sizes(layers, stages):
    with pytest.raises(PartitionError, match="pp_size"):
        uniform_partition(layers, stages)


def test_stage_bounds():
    assert stage_bounds([22, 21]) == [(0, 22), (22, 43)]
    assert stage_bounds([2, 3, 2]) == [(0, 2), (2, 5), (5, 7)]


# ---- explicit ----------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("spec", ["15,15,14,16", " 15, 15 ,14,16 ", [15, 15, 14, 16], (15, 15, 14, 16)])
def test_parse_partition_valid(spec):
    assert parse_partition(spec, 60, 4) == [15, 15, 14, 16]


@pytest.mark.parametrize("spec, pattern", [
    ("2,2", r"3 entries|2 entries.*pp_size is 3"),          # wrong count
    ([2, 2, 2, 2], r"4 entries.*pp_size is 3"),
    ("3,3,3", r"sums to 9.*8 layers"),                       # wrong sum
    ([2, 2, 2], r"sums to 6.*8 layers"),
    ("0,4,4", r"at least one layer"),                         # zero
    ([4, 0, 4], r"at least one layer"),
    ("-1,5,4", r"at least one layer"),                        # negative
    ([5, -1, 4], r"at least one layer"),
    ("2.5,2.5,3", r"'2\.5' is not an integer"),               # non-integers
    ("a,4,4", r"'a' is not an integer"),
    ("4,,4", r"not an integer"),
    ("2,3,3_0", r"'3_0' is not an integer"),
    ("", r"not an integer"),
    ([1.5, 2, 4.5], r"1\.5 is not an integer"),
    ([2.0, 3, 3], r"2\.0 is not an integer"),
    ([True, 3, 4], r"True is not an integer"),
    (["2", "3", "3"], r"'2' is not an integer"),
    (True, r"not .*partition|expected"),
    (8, r"not .*partition|expected"),
    (None, r"not .*partition|expected"),
])
def test_parse_partition_invalid(spec, pattern):
    with pytest.raises(PartitionError, match=pattern) as info:
        parse_partition(spec, 8, 3)
    assert "partition" in str(info.value)


def test_resolve_partition_rejects_invalid_explicit():
    with pytest.raises(PartitionError, match="sums to 7"):
        resolve_partition("3,4", 8, 2)
    with pytest.raises(PartitionError, match="exceeds"):
        resolve_partition("1,1,1,1,1", 4, 5)


# ---- make_layers under a simulated stage ------------------------------------------------------------------------

def stage(pp_rank: int, pp_size: int, partition, num_layers: int = 7) -> ParallelLayout:
    """The layout a stage of pp_size stages sees (partition None: the uniform rule), without process groups."""
    counts = partition if partition is not None else uniform_partition(num_layers, pp_size)
    return ParallelLayout.describe(counts, pp_rank=pp_rank)


def _layer(i: int) -> nn.Module:
    layer = nn.Linear(2, 2)
    layer.built_index = i
    return layer


@pytest.mark.parametrize("pp_rank, partition, expected", [
    (0, [3, 4], (0, 3)),
    (1, [3, 4], (3, 7)),
    (0, None, (0, 4)),  # uniform 7 over 2 -> [4, 3]
    (1, None, (4, 7)),
])
def test_make_layers_builds_only_the_stage_range(pp_rank, partition, expected):
    start, end, layers = make_layers(stage(pp_rank, 2, partition), 7, _layer)
    assert (start, end) == expected
    assert len(layers) == 7
    for i, layer in enumerate(layers):
        if start <= i < end:
            assert isinstance(layer, nn.Linear) and layer.built_index == i
        else:
            assert isinstance(layer, PPMissingLayer)
            assert list(layer.parameters()) == []
            with pytest.raises(RuntimeError, match=f"layer {i} belongs to another pipeline stage"):
                layer(torch.zeros(1, 2))
    names = {n.split(".")[0] for n, _ in layers.named_parameters()}
    assert names == {str(i) for i in range(start, end)}, "parameter names keep their global layer index"


def test_make_layers_single_process_builds_everything():
    start, end, layers = make_layers(ParallelLayout.single(5), 5, _layer)
    assert (start, end) == (0, 5)
    assert not any(isinstance(layer, PPMissingLayer) for layer in layers)


def test_make_layers_rejects_a_partition_that_does_not_fit():
    with pytest.raises(PartitionError):
        make_layers(stage(0, 2, [3, 3]), 7, _layer)


def test_layout_partition_must_match_the_stages():
    with pytest.raises(PartitionError, match="pp_size"):
        ParallelLayout(ParallelLayout.single(4).tp, ParallelLayout.describe([2, 2]).pp, (4,))


@pytest.mark.parametrize("pp_rank", [0, 1])
def test_stage_model_holds_only_its_parts(ckpt, pp_rank):
    """A real model built for one of two stages: embedding only on the first, norm/LM head only on the last,
    decoder layers only in the stage's range, and the loader reads only the stage's tensors."""
    from tandem.config import ModelConfig
    from tandem.loader import load_weights
    from tandem.models.registry import build_model

    model_dir = ckpt("qwen3_5_moe", multimodal=True, add_mtp=True)
    config = ModelConfig.from_hf(model_dir)
    model = build_model(config, stage(pp_rank, 2, [1, 3], 4), torch.float32, "cpu")
    start, end = (0, 1) if pp_rank == 0 else (1, 4)
    assert model.layer_range == (start, end)
    params = [name for name, _ in model.named_parameters()]
    layer_ids = {int(n.split(".")[2]) for n in params if n.startswith("model.layers.")}
    assert layer_ids == set(range(start, end))
    assert any(n.startswith("model.embed_tokens.") for n in params) == (pp_rank == 0)
    assert any(n.startswith("model.norm.") for n in params) == (pp_rank == 1)
    assert any(n.startswith("lm_head.") for n in params) == (pp_rank == 1)

    report = load_weights(model, model_dir, progress=False)
    read_layers = {int(n.split(".")[3]) for n in report.tensors_read if n.startswith("model.language_model.layers.")}
    assert read_layers == set(range(start, end))
    assert not any(n.startswith(("mtp.", "model.visual.")) for n in report.tensors_read)
    assert ("model.language_model.embed_tokens.weight" in report.tensors_read) == (pp_rank == 0)
    assert ("lm_head.weight" in report.tensors_read) == (pp_rank == 1)
