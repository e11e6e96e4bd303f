"""Stage planner (`tandem.runtime.planning`, `tandem plan`): exact byte counts against hand-written formulas and against
real engine runs, optimality of the `auto` partitions, and the CLI."""

from __future__ import annotations

import dataclasses
import itertools
import json
import random
from pathlib import Path

import pytest
import torch

from tandem.cli import main as cli_main
from tandem.config import EngineArgs, EngineConfig, ModelConfig
from tandem.errors import PartitionError
from tandem.runtime.planning import search, sizing, stage_costs
from tandem.runtime.planning.resolve import engine_partition, resolve_partition

try:
    from support.split_run import run_split_and_single
    from support.stage_figures import rank_figures
except ImportError:  # tests/ imported as a package
    from tests.support.split_run import run_split_and_single
    from tests.support.stage_figures import rank_figures

CONFIGS = Path(__file__).parent / "data" / "configs"
REAL = ["Qwen3.5-35B-A3B", "Qwen3.5-122B-A10B", "Qwen3.5-397B-A17B", "Qwen3.5-27B", "Qwen3-30B-A3B"]


# sizes given, so that a plan needs no device memory (KV of 4096 tokens, state for 16 requests)
FIXED = sizing.PoolSettings(page_size=16, max_total_tokens=4096, max_running_requests=16, slots_per_request=2,
                             mem_fraction=0.88)


def resolve(spec, costs, pp: int, settings: sizing.PoolSettings = FIXED) -> list[int]:
    return resolve_partition(spec, pp, costs.num_layers, lambda: costs, lambda: settings)


def plan(costs, counts, settings: sizing.PoolSettings = FIXED):
    return sizing.plan_stages(costs, counts, settings)


def settings_for(config, args, memory=None, reserve=None) -> sizing.PoolSettings:
    return sizing.PoolSettings.from_config(EngineConfig.resolve(args, config), memory, reserve)


def costs_for(config, args) -> stage_costs.ModelCosts:
    return stage_costs.costs_for(EngineConfig.resolve(args, config))


def auto_partition(config, args, kind: str) -> list[int]:
    return engine_partition(EngineConfig.resolve(dataclasses.replace(args, pp_layer_partition=kind), config))


# ---- an independent parameter count, written from the checkpoint layout -----------------------------------


def text_config(raw: dict) -> dict:
    return raw.get("text_config", raw)


def hand_param_count(raw: dict) -> int:
    """Parameters of the text model (embedding, layers, final norm, LM head; no vision tower, no MTP)."""
    t = text_config(raw)
    H, V, L = t["hidden_size"], t["vocab_size"], t["num_hidden_layers"]
    heads, kv, hd = t["num_attention_heads"], t["num_key_value_heads"], t["head_dim"]
    qwen35 = "layer_types" in t and t.get("model_type", "").startswith("qwen3_5")
    layer_types = t.get("layer_types") or ["full_attention"] * L
    tied = raw.get("tie_word_embeddings", t.get("tie_word_embeddings", False))
    total = V * H + H + (0 if tied else V * H)  # embed_tokens, model.norm, lm_head
    q_out = heads * hd * (2 if qwen35 else 1)  # Qwen3.5's q_proj also emits the output gate
    full_attn = H * q_out + 2 * H * kv * hd + heads * hd * H + 2 * hd  # q, k, v, o, q_norm, k_norm
    if qwen35:
        nk, nv = t["linear_num_key_heads"], t["linear_num_value_heads"]
        dk, dv, K = t["linear_key_head_dim"], t["linear_value_head_dim"], t["linear_conv_kernel_dim"]
        conv = 2 * nk * dk + nv * dv
        linear_attn = (H * conv + H * nv * dv + 2 * H * nv  # in_proj_qkv, in_proj_z, in_proj_b, in_proj_a
                       + conv * K + 2 * nv + dv + nv * dv * H)  # conv1d, A_log, dt_bias, norm, out_proj
    if t.get("num_experts"):
        E, I = t["num_experts"], t["moe_intermediate_size"]
        S = t.get("shared_expert_intermediate_size") or 0
        mlp = E * H + E * 3 * I * H + (3 * S * H + H if S else 0)  # router, experts, shared expert + its gate
    else:
        mlp = 3 * H * t["intermediate_size"]
    for kind in layer_types:
        total += 2 * H + mlp + (linear_attn if kind == "linear_attention" else full_attn)
    return total


def load_raw(name: str) -> dict:
    return json.loads((CONFIGS / name / "config.json").read_text())


def write_variant(tmp_path: Path, name: str, *, layer_types=None, num_layers=None, tied=None) -> Path:
    """A copy of a real config with fewer layers / another layer pattern / tied embeddings."""
    raw = load_raw(name)
    t = text_config(raw)
    if layer_types is not None:
        num_layers = len(layer_types)
    if num_layers is not None:
        t["num_hidden_layers"] = num_layers
        if "layer_types" in t:
            t["layer_types"] = list(layer_types or t["layer_types"][:num_layers])
    if tied is not None:
        raw["tie_word_embeddings"] = tied
        t["tie_word_embeddings"] = tied
    out = tmp_path / f"{name}-{num_layers}-{tied}-{abs(hash(str(layer_types))) % 10**6}"
    out.mkdir()
    (out / "config.json").write_text(json.dumps(raw))
    return out


@pytest.fixture(scope="module")
def real():
    return {name: ModelConfig.from_hf(CONFIGS / name) for name in REAL}


def args_for(pp: int, tp: int = 1, **kw) -> EngineArgs:
    return EngineArgs(model_path="unused", pp_size=pp, tp_size=tp, **kw)


# ---- real configs -----------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", REAL)
def test_stage_weights_sum_to_model_parameters(real, name):
    expected = hand_param_count(load_raw(name)) * 2  # bf16
    costs = costs_for(real[name], args_for(2, dtype="bfloat16"))
    assert stage_costs.model_weight_bytes(costs) == expected
    for pp in (1, 2, 3, 4, 8):
        for spec in ("uniform", "auto", "auto-compute") + (("auto-capacity",) if pp <= 4 else ()):
            counts = resolve(spec, costs, pp, settings_for(real[name], args_for(pp), 80 * 10**9))
            assert len(counts) == pp and sum(counts) == real[name].num_layers and min(counts) >= 1
            stages = plan(costs, counts)
            assert sum(s.weight_bytes for s in stages) == expected, (pp, spec)


def test_published_sizes(real):
    gb = {name: stage_costs.model_weight_bytes(costs_for(real[name], args_for(1))) / 1e9 for name in REAL}
    assert 66 <= gb["Qwen3.5-35B-A3B"] <= 70
    assert 240 <= gb["Qwen3.5-122B-A10B"] <= 250
    assert 785 <= gb["Qwen3.5-397B-A17B"] <= 800
    assert 52 <= gb["Qwen3.5-27B"] <= 56
    assert 60 <= gb["Qwen3-30B-A3B"] <= 62


def test_tied_embeddings_last_stage_holds_its_own_head(tmp_path):
    path = write_variant(tmp_path, "Qwen3.5-35B-A3B", num_layers=8, tied=True)
    raw, config = json.loads((path / "config.json").read_text()), ModelConfig.from_hf(path)
    t = text_config(raw)
    count, embed = hand_param_count(raw), t["vocab_size"] * t["hidden_size"]
    costs = costs_for(config, args_for(1, dtype="float32"))
    for pp in (1, 2, 4):
        stages = plan(costs, resolve("auto", costs, pp))
        assert sum(s.weight_bytes for s in stages) == 4 * (count + (embed if pp > 1 else 0))


@pytest.mark.parametrize("name", ["Qwen3.5-35B-A3B", "Qwen3.5-27B", "Qwen3-30B-A3B"])
@pytest.mark.parametrize("tp", [1, 2])
def test_additive_model_matches_whole_stage_builds(real, name, tp):
    costs = costs_for(real[name], args_for(3, tp))
    counts = resolve("auto", costs, 3)
    built = stage_costs.stage_weight_bytes_on_meta(real[name], torch.bfloat16, tp, counts)
    assert [s.weight_bytes for s in plan(costs, counts)] == built


@pytest.mark.parametrize("name", REAL)
def test_auto_never_worse_than_uniform(real, name):
    for tp in (1, 2):
        args = args_for(2, tp, max_running_requests=64, max_total_tokens=64 * 32768)
        costs, settings = costs_for(real[name], args), settings_for(real[name], args)
        for pp in range(2, 9):
            uniform = plan(costs, resolve("uniform", costs, pp, settings), settings)
            auto = plan(costs, resolve("auto", costs, pp, settings), settings)
            compute = plan(costs, resolve("auto-compute", costs, pp, settings), settings)
            assert max(s.static_bytes for s in auto) <= max(s.static_bytes for s in uniform)
            assert max(s.flops_per_token for s in compute) <= max(s.flops_per_token for s in uniform) * (1 + 1e-12)


def test_moe_compute_counts_only_active_experts(real):
    c = real["Qwen3.5-35B-A3B"]
    costs = costs_for(c, args_for(1))
    active = (sum(costs.flops) + costs.extra_flops["single"]) / 2 / 1e9
    assert 2.5 < active < 4  # "A3B": about 3B active parameters per token (plus the attention term)


# ---- optimality --------------------------------------------------------------------------------------------


def compositions(n: int, parts: int):
    for cuts in itertools.combinations(range(1, n), parts - 1):
        bounds = (0, *cuts, n)
        yield [bounds[i + 1] - bounds[i] for i in range(parts)]


PATTERNS = [
    None,  # the real pattern, truncated
    ["full_attention", "linear_attention", "linear_attention", "full_attention", "full_attention",
     "linear_attention", "linear_attention"],
    ["linear_attention"] * 5 + ["full_attention"] * 3,
    ["full_attention", "full_attention", "linear_attention", "linear_attention", "linear_attention",
     "full_attention"],
]


@pytest.mark.parametrize("pattern", range(len(PATTERNS)))
@pytest.mark.parametrize("name", ["Qwen3.5-35B-A3B", "Qwen3.5-27B"])
def test_auto_is_optimal_by_brute_force(tmp_path, name, pattern):
    layer_types = PATTERNS[pattern]
    path = write_variant(tmp_path, name, layer_types=layer_types, num_layers=None if layer_types else 8)
    config = ModelConfig.from_hf(path)
    # long contexts make full-attention layers much heavier than linear ones
    for requests, tokens in ((16, 4096), (64, 65536)):
        args = args_for(2, max_running_requests=requests, max_total_tokens=requests * tokens)
        costs, settings = costs_for(config, args), settings_for(config, args)
        for pp in (2, 3, 4):
            for kind, metric in (("auto", "static_bytes"), ("auto-compute", "flops_per_token")):
                best = min(max(getattr(s, metric) for s in plan(costs, split, settings))
                           for split in compositions(config.num_layers, pp))
                got = resolve(kind, costs, pp, settings)
                assert max(getattr(s, metric) for s in plan(costs, got, settings)) == pytest.approx(best, rel=1e-12)


CAPACITY_CASES = [(name, pattern) for name in ("Qwen3.5-35B-A3B", "Qwen3.5-27B") for pattern in range(len(PATTERNS))]
CAPACITY_CASES.append(("Qwen3-30B-A3B", 0))  # every layer full attention: only weights and LM head differ


@pytest.mark.parametrize("name, pattern", CAPACITY_CASES)
def test_auto_capacity_is_optimal_by_brute_force(tmp_path, name, pattern):
    """auto-capacity maximises the engine's KV capacity (the smallest stage's, every stage sized with the
    request count all stages agree on) over every split, for device memories where the state pool or the
    weights bind."""
    layer_types = PATTERNS[pattern] if name.startswith("Qwen3.5") else None
    path = write_variant(tmp_path, name, layer_types=layer_types, num_layers=None if layer_types else 8)
    config = ModelConfig.from_hf(path)
    costs = costs_for(config, args_for(2))
    weights = stage_costs.model_weight_bytes(costs)
    for memory_share in (0.45, 0.7, 1.2):
        for requests in (None, 8):
            settings = settings_for(config, args_for(2, max_running_requests=requests), int(weights * memory_share))
            for pp in (2, 3, 4):
                capacity = lambda split, settings=settings: plan(costs, split, settings)[0].max_total_tokens
                best = max(capacity(split) for split in compositions(config.num_layers, pp))
                got = resolve("auto-capacity", costs, pp, settings)
                assert capacity(got) == best, (memory_share, requests, pp, got)


def test_auto_capacity_places_full_attention_layers(tmp_path):
    """Hybrid: with the full-attention layers at one end, the uniform split starves one stage of KV memory;
    auto-capacity moves the split so both stages hold about as many tokens."""
    layer_types = ["linear_attention"] * 6 + ["full_attention"] * 2
    config = ModelConfig.from_hf(write_variant(tmp_path, "Qwen3.5-27B", layer_types=layer_types))
    args = args_for(2)
    costs = costs_for(config, args)
    settings = settings_for(config, args, int(stage_costs.model_weight_bytes(costs) * 0.9))
    uniform = plan(costs, resolve("uniform", costs, 2, settings), settings)
    best = resolve("auto-capacity", costs, 2, settings)
    chosen = plan(costs, best, settings)
    assert best != [4, 4] and chosen[0].max_total_tokens > uniform[0].max_total_tokens


def test_min_max_partition_random_brute_force():
    rng = random.Random(0)
    for _ in range(300):
        n, p = rng.randint(1, 9), rng.randint(1, 5)
        if p > n:
            continue
        costs = [rng.randint(0, 20) for _ in range(n)]
        extra = [rng.randint(0, 30) for _ in range(p)]
        got = search.min_max_partition(costs, p, extra)
        assert len(got) == p and sum(got) == n and min(got) >= 1

        def worst(split, costs=costs, extra=extra, p=p):
            bounds = [0, *itertools.accumulate(split)]
            return max(sum(costs[bounds[k]:bounds[k + 1]]) + extra[k] for k in range(p))

        assert worst(got) == min(worst(s) for s in compositions(n, p))


def test_min_max_partition_prefers_even_splits():
    assert search.min_max_partition([1] * 8, 2) == [4, 4]
    assert search.min_max_partition([1] * 8, 4) == [2, 2, 2, 2]
    assert search.min_max_partition([1] * 8, 2, [0, 4]) == [6, 2]


def test_auto_partition_api(real):
    config = real["Qwen3.5-35B-A3B"]
    assert auto_partition(config, args_for(1), "auto") == [40]
    counts = auto_partition(config, args_for(4), "auto")
    assert len(counts) == 4 and sum(counts) == 40
    assert auto_partition(config, args_for(2), "auto-compute") != auto_partition(
        config, args_for(2), "auto")  # the LM head's FLOPs shift layers to the first stage
    with pytest.raises(PartitionError, match="unknown automatic partition"):
        auto_partition(config, args_for(2), "automatic")
    with pytest.raises(PartitionError, match="exceeds"):
        auto_partition(config, args_for(41), "auto")


def test_meta_builds_depend_only_on_their_layout(real):
    """Layouts are values: building rank 1 of a (tp 4, pp 2) layout leaves a later single-rank build alone."""
    config = real["Qwen3.5-35B-A3B"]
    stage = stage_costs.build_stage_on_meta(config, torch.bfloat16, 4, 2, 1, (30, 10), tp_rank=1)
    whole = stage_costs.build_stage_on_meta(config, torch.bfloat16, 1)
    assert stage.layer_range == (30, 40) and whole.layer_range == (0, 40)
    attn = next(i for i in range(30, 40) if config.layer_types[i] == "full_attention")
    assert stage.model.layers[attn].self_attn.num_heads * 4 == whole.model.layers[attn].self_attn.num_heads


# ---- exactness against real engine runs on small checkpoints ------------------------------------------------


@pytest.fixture(scope="module")
def small(tmp_path_factory):
    try:
        from support.checkpoints import build_checkpoint
    except ImportError:  # tests/ imported as a package
        from tests.support.checkpoints import build_checkpoint

    root = tmp_path_factory.mktemp("planner_ckpts")
    # two heavy full-attention layers first: with 1024-token slots `auto` gives [1, 5], not the uniform [3, 3]
    hybrid = ["full_attention", "full_attention"] + ["linear_attention"] * 4
    return {
        "qwen3_5_moe": build_checkpoint("qwen3_5_moe", root / "qwen3_5_moe", layer_types=hybrid, multimodal=True),
        "qwen3_5": build_checkpoint("qwen3_5", root / "qwen3_5", num_layers=4),
        "qwen3_moe": build_checkpoint("qwen3_moe", root / "qwen3_moe", num_layers=4),
        "llama_tied": build_checkpoint("llama", root / "llama_tied", num_layers=4, tied=True),
    }


ENGINE_KW = dict(max_total_tokens=3 * 1024, max_running_requests=3, progress=False)


def run_engine(path, **kw):
    from tandem.engine import Engine

    with Engine(path, **kw, **ENGINE_KW) as engine:
        return engine.partition, engine.stage_report()


def hand_stages(path, counts: list[int], tp: int, dtype: str) -> list[dict]:
    """Each stage's figures for the split `counts`, by hand (support.stage_figures)."""
    bounds = list(itertools.accumulate(counts, initial=0))
    return [rank_figures(path, bounds[k], bounds[k + 1], k, len(counts), tp, dtype, ENGINE_KW["max_total_tokens"],
                         ENGINE_KW["max_running_requests"]) for k in range(len(counts))]


def hand_partition(path, pp: int, tp: int, spec, dtype: str) -> list[int]:
    """The split each spec means, from config.json: explicit as given; uniform L // pp each, the remainder to
    the stages before the last; auto the split whose largest stage (weights + KV + state) is smallest, by
    brute force over every split."""
    layers = json.loads((Path(path) / "config.json").read_text())
    layers = layers.get("text_config", layers)["num_hidden_layers"]
    if spec not in (None, "auto"):
        return [int(n) for n in spec.split(",")]
    if spec is None:
        counts = [layers // pp] * pp
        for i in range(layers % pp):
            counts[pp - 2 - i] += 1
        return counts
    size = lambda s: s["weight_bytes"] + s["kv_cache_bytes"] + s["state_cache_bytes"]
    splits = [list(c) for c in itertools.product(range(1, layers + 1), repeat=pp) if sum(c) == layers]
    return min(splits, key=lambda c: max(size(s) for s in hand_stages(path, c, tp, dtype)))


def check_against_plan(path, pp: int, tp: int, spec, dtype: str):
    """The engine's split and every rank's report, and the planner's plan of that split, equal the figures
    computed by hand from config.json and the checkpoint headers."""
    partition, reports = run_engine(path, pp_size=pp, tp_size=tp, dtype=dtype, pp_layer_partition=spec)
    expected = hand_partition(path, pp, tp, spec, dtype)
    assert partition == expected
    if spec == "auto" and pp == 2:
        assert expected == [1, 5]  # not the uniform split: the check below is not vacuous
    hand = hand_stages(path, expected, tp, dtype)
    config = ModelConfig.from_hf(path)
    args = EngineArgs(model_path=str(path), pp_size=pp, tp_size=tp, dtype=dtype, pp_layer_partition=spec,
                      max_total_tokens=ENGINE_KW["max_total_tokens"],
                      max_running_requests=ENGINE_KW["max_running_requests"])
    stages = plan(costs_for(config, args), expected, settings_for(config, args))
    assert len(reports) == pp * tp
    for report in reports:
        for key, value in hand[report["pp_rank"]].items():
            assert report[key] == value, (key, report["pp_rank"], report["tp_rank"])
            assert getattr(stages[report["pp_rank"]], key) == value, ("plan", key, report["pp_rank"])
        assert report["page_size"] == 16
    return reports


@pytest.mark.parametrize("kind", ["qwen3_5_moe", "qwen3_5", "qwen3_moe", "llama_tied"])
def test_plan_equals_stage_report_single_process(small, kind):
    check_against_plan(small[kind], 1, 1, None, "float32")
    check_against_plan(small[kind], 1, 1, "auto", "bfloat16")


@pytest.mark.parametrize("spec", ["2,4", "auto"])
def test_plan_equals_stage_report_pp2(small, spec, capsys):
    reports = check_against_plan(small["qwen3_5_moe"], 2, 1, spec, "float32")
    # `tandem plan` prints the same capacity and pools
    assert cli_main(["plan", str(small["qwen3_5_moe"]), "--pp-size", "2", "--dtype", "float32",
                     "--max-total-tokens", str(ENGINE_KW["max_total_tokens"]), "--max-running-requests",
                     str(ENGINE_KW["max_running_requests"]), "--pp-layer-partition", spec, "--json"]) == 0
    planned = next(p for p in json.loads(capsys.readouterr().out)["plans"] if p["name"] == spec)
    for report, stage in zip(reports, planned["stages"]):
        for key in ("layer_start", "layer_end", "weight_bytes", "max_total_tokens", "stage_max_total_tokens",
                    "kv_cache_bytes", "state_slots", "state_cache_bytes", "max_running_requests"):
            assert report[key] == stage[key], key


def test_plan_equals_stage_report_tied_pp2(small):
    # uniform; the last stage loads its own LM head from embed_tokens.weight
    check_against_plan(small["llama_tied"], 2, 1, None, "bfloat16")


def test_plan_equals_stage_report_tp2(small):
    check_against_plan(small["qwen3_5_moe"], 1, 2, "auto", "float32")


@pytest.mark.parametrize("pp", [1, 2])
def test_plan_equals_stage_report_with_the_mtp_head(tmp_path_factory, pp):
    """NEXTN: the last stage holds the MTP head's weights (and, past the first stage, its own embedding) and
    keeps its layers' KV in its pool; the engine's reports, the planner and the hand figures agree, and differ
    from the plan without speculation on the last stage only."""
    from support.checkpoints import build_checkpoint

    path = build_checkpoint("qwen3_5", tmp_path_factory.mktemp("mtp_plan"), num_layers=4, add_mtp=True)
    spec = {"speculative_algorithm": "NEXTN", "speculative_num_steps": 2}
    partition, reports = run_engine(path, pp_size=pp, dtype="float32", **spec)
    assert partition == hand_partition(path, pp, 1, None, "float32")
    config = ModelConfig.from_hf(path)
    sizes = dict(max_total_tokens=ENGINE_KW["max_total_tokens"], max_running_requests=ENGINE_KW["max_running_requests"])
    args = EngineArgs(model_path=str(path), pp_size=pp, dtype="float32", **sizes, **spec)
    stages = plan(costs_for(config, args), partition, settings_for(config, args))
    plain_args = EngineArgs(model_path=str(path), pp_size=pp, dtype="float32", **sizes)
    plain = plan(costs_for(config, plain_args), partition, settings_for(config, plain_args))
    bounds = list(itertools.accumulate(partition, initial=0))
    for report in reports:
        k = report["pp_rank"]
        hand = rank_figures(path, bounds[k], bounds[k + 1], k, pp, 1, "float32", ENGINE_KW["max_total_tokens"],
                            ENGINE_KW["max_running_requests"], mtp=True)
        for key, value in hand.items():
            assert report[key] == value, (key, k)
            assert getattr(stages[k], key) == value, ("plan", key, k)
    for k in range(pp):
        grew = stages[k].weight_bytes > plain[k].weight_bytes and stages[k].kv_bytes_per_token > plain[k].kv_bytes_per_token
        assert grew == (k == pp - 1)


def test_cli_plans_the_mtp_head_of_a_published_config(capsys):
    path = str(CONFIGS / "Qwen3.5-27B")
    figures = []
    for extra in ([], ["--speculative-algorithm", "MTP"]):
        assert cli_main(["plan", path, "--pp-size", "2", "--json", *extra]) == 0
        out = json.loads(capsys.readouterr().out)
        figures.append([(s["weight_bytes"], s["kv_bytes_per_token"]) for s in out["plans"][0]["stages"]])
    assert out["speculative_algorithm"] == "NEXTN"
    (first, last), (mtp_first, mtp_last) = figures
    assert mtp_first == first and mtp_last[0] > last[0] and mtp_last[1] > last[1]
    assert cli_main(["plan", str(CONFIGS / "Qwen3-30B-A3B"), "--speculative-algorithm", "NEXTN"]) == 2
    assert "multi-token-prediction head" in capsys.readouterr().err


def test_engine_runs_the_auto_capacity_split(small):
    """`--pp-layer-partition auto-capacity` in a real engine: the driver sizes the stages in this machine's
    memory and picks the split. Both full-attention layers of this checkpoint are at the front and its weights
    are tiny next to the memory, so the capacity is the largest with one full-attention layer per stage,
    [1, 5] (uniform [3, 3] puts both on stage 0: half the tokens); the tokens equal one process's."""
    run = run_split_and_single(small["qwen3_5_moe"], [[5, 17, 42, 99, 123, 7]], "auto-capacity")
    assert run.output_ids == run.single_output_ids
    assert run.partition == [1, 5]
    assert run.layer_ranges == [(0, 1), (1, 6)]


def test_memory_sized_pools_follow_the_planner_formulas(small):
    """Without --max-total-tokens every rank sizes its pools from its memory, weights and measured activation
    reserve; the planner's functions, given the memory and reserve each rank reports, find the same request
    count, the same capacity per stage and the same agreed capacity."""
    from tandem.engine import Engine

    path = small["qwen3_5"]
    with Engine(path, pp_size=2, dtype="float32", progress=False) as engine:
        reports = engine.stage_report()
    config = ModelConfig.from_hf(path)
    args = EngineArgs(model_path=str(path), pp_size=2, dtype="float32")
    costs = costs_for(config, args)
    sums, settings = [], []
    for report in reports:
        assert report["activation_reserve_bytes"] > 0
        setting = settings_for(config, args, report["device_memory_bytes"], report["activation_reserve_bytes"])
        position = stage_costs.ModelCosts.position(report["pp_rank"], 2)
        sums.append(sizing.stage_sums(costs, report["layer_start"], report["layer_end"], position, setting))
        settings.append(setting)
    requests = min(sizing.stage_requests(s, setting) for s, setting in zip(sums, settings))
    for report, s, setting in zip(reports, sums, settings):
        assert report["stage_max_total_tokens"] == sizing.stage_capacity(s, setting, requests)
        assert report["state_slots"] == report["max_running_requests"] * 2  # hybrid: a snapshot slot each
    capacities = [c for c in (r["stage_max_total_tokens"] for r in reports) if c is not None]
    assert capacities and all(r["max_total_tokens"] == min(capacities) for r in reports)
    assert all(r["kv_cache_bytes"] == r["max_total_tokens"] * r["kv_bytes_per_token"] for r in reports)


# ---- the CLI ----------------------------------------------------------------------------------------------


def test_cli_json(capsys):
    path = CONFIGS / "Qwen3.5-35B-A3B"
    assert cli_main(["plan", str(path), "--pp-size", "2", "--tp-size", "1", "--dtype", "bf16",
                     "--max-total-tokens", "8192", "--max-running-requests", "8", "--gpu-memory", "80GB",
                     "--pp-layer-partition", "15,25", "--json"]) == 0
    plan_json = json.loads(capsys.readouterr().out)
    assert plan_json["model"] == "Qwen3.5-35B-A3B" and plan_json["pp_size"] == 2 and plan_json["dtype"] == "bfloat16"
    assert plan_json["given_max_total_tokens"] == 8192 and plan_json["given_max_running_requests"] == 8
    assert plan_json["gpu_memory_bytes"] == 80 * 10**9
    assert [p["name"] for p in plan_json["plans"]] == ["uniform", "auto", "auto-capacity", "15,25"]
    assert plan_json["plans"][3]["partition"] == [15, 25]
    expected = hand_param_count(load_raw("Qwen3.5-35B-A3B")) * 2
    assert plan_json["model_weight_bytes"] == expected
    raw = text_config(load_raw("Qwen3.5-35B-A3B"))
    kv_per_layer = 2 * raw["num_key_value_heads"] * raw["head_dim"] * 2  # bf16 keys and values per token
    for p in plan_json["plans"]:
        assert sum(s["weight_bytes"] for s in p["stages"]) == expected
        assert p["max_total_tokens"] == 8192 and p["max_running_requests"] == 8
        for s in p["stages"]:
            for key in ("layer_start", "layer_end", "kinds", "layer_kinds", "weight_bytes", "kv_cache_bytes",
                        "state_cache_bytes", "cache_bytes", "total_bytes", "fits", "flops_per_token",
                        "stage_max_total_tokens", "state_slots", "activation_reserve_bytes"):
                assert key in s
            assert s["total_bytes"] == (s["weight_bytes"] + s["kv_cache_bytes"] + s["state_cache_bytes"]
                                        + s["activation_reserve_bytes"])
            full = s["layer_kinds"].get("full_attention", 0)
            assert s["kv_cache_bytes"] == 8192 * full * kv_per_layer
            assert s["state_slots"] == 16  # 8 requests, each with a snapshot slot (hybrid, radix cache on)
            assert s["fits"]
    for p in plan_json["plans"][:2]:  # uniform and auto: about half the model each
        assert all(30e9 < s["weight_bytes"] < 40e9 for s in p["stages"])
    assert plan_json["plans"][0]["stages"][0]["kinds"] == "15 linear_attention + 5 full_attention, MoE"


def test_cli_capacity_from_memory(capsys):
    """Without --max-total-tokens each stage's capacity is what its memory holds after weights, the state pool
    and the activation reserve: checked here against the formula with a given reserve."""
    path = CONFIGS / "Qwen3.5-27B"
    assert cli_main(["plan", str(path), "--pp-size", "2", "--gpu-memory", "40GB", "--mem-fraction-static", "0.9",
                     "--activation-reserve", "2GB", "--max-running-requests", "4", "--json"]) == 0
    plan_json = json.loads(capsys.readouterr().out)
    raw = text_config(load_raw("Qwen3.5-27B"))
    kv_per_layer = 2 * raw["num_key_value_heads"] * raw["head_dim"] * 2
    nk, nv = raw["linear_num_key_heads"], raw["linear_num_value_heads"]
    dk, dv, K = raw["linear_key_head_dim"], raw["linear_value_head_dim"], raw["linear_conv_kernel_dim"]
    state_per_layer = (2 * nk * dk + nv * dv) * (K - 1) * 2 + nv * dk * dv * 4
    for p in plan_json["plans"]:
        own = []
        for s in p["stages"]:
            budget = int(40e9 * 0.9) - s["weight_bytes"] - 2 * 10**9
            budget -= 8 * s["layer_kinds"].get("linear_attention", 0) * state_per_layer  # 4 requests x 2 slots
            per_token = s["layer_kinds"].get("full_attention", 0) * kv_per_layer
            own.append(budget // (per_token * 16) * 16)
            assert s["stage_max_total_tokens"] == own[-1] and s["state_slots"] == 8
        assert p["max_total_tokens"] == min(own) > 0
    capacities = {p["name"]: p["max_total_tokens"] for p in plan_json["plans"]}
    assert capacities["auto-capacity"] >= max(capacities.values())


def test_cli_text_and_config_file(capsys):
    assert cli_main(["plan", str(CONFIGS / "Qwen3.5-397B-A17B" / "config.json"), "--pp-size", "2",
                     "--gpu-memory", "80GiB"]) == 1  # ~400 GB per stage on 80 GiB devices
    out = capsys.readouterr().out
    assert "Qwen3.5-397B-A17B" in out and "partition uniform [30, 30]" in out and "partition auto" in out
    assert "NO" in out and "does NOT fit" in out and "The smallest layouts that fit: pp=" in out


def test_cli_errors(capsys):
    path = str(CONFIGS / "Qwen3.5-27B")
    assert cli_main(["plan", path, "--pp-size", "2", "--pp-layer-partition", "3,3"]) == 2
    assert "sums to 6" in capsys.readouterr().err
    assert cli_main(["plan", path, "--pp-size", "2", "--gpu-memory", "lots"]) == 2
    assert "invalid memory size" in capsys.readouterr().err
    assert cli_main(["plan", path, "--tp-size", "3"]) == 2
    assert "divisible" in capsys.readouterr().err
