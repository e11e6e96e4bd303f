"""`tandem plan`: what each pipeline stage would hold (layers, weights, KV and state pools with their token
capacity, activation reserve, compute per token) for the uniform, auto, auto-capacity and any given
partition, from config.json alone: no weights are read, nothing is allocated. When no planned partition
fits the devices it exits with code 1 and names the smallest pp x tp layouts that do fit."""

from __future__ import annotations

import dataclasses
import json
import re
from pathlib import Path

from tandem.errors import ConfigError
from tandem.quantization import Fp8Config

_UNITS = {"": 10**9, "b": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12,
          "k": 10**3, "m": 10**6, "g": 10**9, "t": 10**12,
          "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40}


def parse_size(text: str) -> int:
    """"80GB" -> 80e9 bytes, "80GiB" -> 80 * 2**30; a bare number means GB."""
    match = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([a-zA-Z]*)\s*", str(text))
    if not match or match.group(2).lower() not in _UNITS:
        raise ConfigError(f"invalid memory size {text!r}: expected a number with a unit such as 80GB or 80GiB")
    return int(float(match.group(1)) * _UNITS[match.group(2).lower()])


def fmt_bytes(n: int) -> str:
    return f"{n / 1e9:.2f} GB"


def fmt_flops(n: float) -> str:
    return f"{n / 1e9:.2f} GFLOP"


def add_parser(sub) -> None:
    parser = sub.add_parser(
        "plan", help="Show what each pipeline stage holds, from config.json alone.",
        description="Per pipeline stage: layer range, layer kinds, weight bytes, KV pool (tokens and bytes), "
                    "linear-attention state pool, estimated activation reserve, and whether it fits the device "
                    "memory, for the uniform, auto and auto-capacity partitions and any given one. The engine's "
                    "capacity is the smallest stage's. Figures are per device (TP rank 0). No weights are read.")
    parser.add_argument("model", metavar="MODEL_DIR_OR_CONFIG",
                        help="Checkpoint directory with config.json, or a path to a config .json file.")
    parser.add_argument("--pp-size", type=int, default=1, help="Pipeline stages (default: 1).")
    parser.add_argument("--tp-size", type=int, default=1, help="Tensor-parallel ranks per stage (default: 1).")
    parser.add_argument("--dtype", default="auto",
                        help="Weight dtype: auto (the config's), bf16, fp16, fp32, or fp8: block-wise FP8 linear "
                             "weights (128x128 blocks unless config.json's quantization_config says otherwise) "
                             "with the config's dtype for the rest (default: auto; an FP8 checkpoint's "
                             "quantization_config is always read).")
    parser.add_argument("--torchao-config", default="",
                        help="As the engine's flag: int8wo | int4wo-<group>; the quantized linears' weights count "
                             "1 byte (int8) or half a byte (int4) per element plus their scales (and zeros).")
    parser.add_argument("--gpu-memory", default="80GB",
                        help="Memory of each device, e.g. 80GB or 80GiB (default: 80GB).")
    parser.add_argument("--mem-fraction-static", type=float, default=None,
                        help="As the engine's flag (default: 0.88, the engine's CUDA default).")
    parser.add_argument("--max-total-tokens", type=int, default=None,
                        help="As the engine's flag: KV tokens per stage instead of sizing from memory.")
    parser.add_argument("--max-running-requests", type=int, default=None,
                        help="As the engine's flag (default: derived from the capacity).")
    parser.add_argument("--page-size", type=int, default=16, help="As the engine's flag (default: 16).")
    parser.add_argument("--chunked-prefill-size", type=int, default=512,
                        help="As the engine's flag; sizes the estimated activation reserve (default: 512).")
    parser.add_argument("--context-length", type=int, default=None,
                        help="As the engine's flag; sizes the estimated activation reserve (default: the "
                             "model's limit).")
    parser.add_argument("--disable-radix-cache", action="store_true",
                        help="As the engine's flag (hybrid models then keep no state snapshot slots).")
    parser.add_argument("--speculative-algorithm", default=None,
                        help="As the engine's flag: NEXTN / MTP puts the checkpoint's MTP head (its weights and "
                             "its layers' KV) on the last stage; NGRAM adds nothing.")
    parser.add_argument("--speculative-num-steps", type=int, default=None, help="As the engine's flag.")
    parser.add_argument("--activation-reserve", default=None,
                        help="Activation reserve per device, e.g. 2GB, instead of the estimate (the engine "
                             "measures its own: stage_report()[rank]['activation_reserve_bytes']).")
    parser.add_argument("--pp-layer-partition", action="append", default=[],
                        help="Also plan this partition (a list like 15,15,14,16, or auto-compute); repeatable.")
    parser.add_argument("--json", action="store_true", help="Print the plan as JSON.")
    parser.set_defaults(run=run)


def build_plan(args) -> dict:
    from tandem.runtime.planning.layouts import MAX_DEVICES, smallest_fitting_layouts
    from tandem.runtime.planning.sizing import PoolSettings
    from tandem.runtime.planning.stage_costs import costs_for, model_weight_bytes

    config = _engine_config(args)
    memory = parse_size(args.gpu_memory)
    reserve = parse_size(args.activation_reserve) if args.activation_reserve is not None else None
    costs = costs_for(config)
    settings = PoolSettings.from_config(config, memory, reserve)
    specs = list(dict.fromkeys(["uniform", "auto", "auto-capacity", *(args.pp_layer_partition or [])]))
    plans = [_plan_partition(spec, args.pp_size, costs, settings, memory) for spec in specs]
    fits = any(p["fits"] for p in plans)
    fitting = [] if fits else smallest_fitting_layouts(config, settings, memory)
    model_config = config.model
    path = Path(args.model)
    kinds: dict[str, int] = {}
    for kind in model_config.layer_types:
        kinds[kind] = kinds.get(kind, 0) + 1
    return {
        "model": path.name if path.is_dir() else path.resolve().parent.name, "config": str(args.model),
        "architecture": model_config.architecture, "num_layers": model_config.num_layers, "layer_kinds": kinds,
        "num_experts": model_config.num_experts, "num_experts_per_tok": model_config.num_experts_per_tok,
        "pp_size": args.pp_size, "tp_size": args.tp_size, "dtype": str(config.dtype).removeprefix("torch."),
        "gpu_memory_bytes": memory, "mem_fraction_static": config.mem_fraction,
        "page_size": args.page_size, "given_max_total_tokens": args.max_total_tokens,
        "given_max_running_requests": args.max_running_requests,
        "radix_cache": not args.disable_radix_cache,
        "speculative_algorithm": config.speculative.algorithm if config.speculative else None,
        "context_length": config.context_length,
        "quantization": model_config.quantization.describe() if model_config.quantization else None,
        "torchao_config": args.torchao_config or None,
        "model_weight_bytes": model_weight_bytes(costs), "plans": plans,
        "fits": fits, "layouts_searched_up_to": MAX_DEVICES,
        "fitting_layouts": [dict(dataclasses.asdict(layout), partition=list(layout.partition), text=layout.describe())
                            for layout in fitting],
    }


def _engine_config(args):
    """The engine settings the plan is for (the CUDA memory fraction unless given), resolved against the model."""
    from tandem.config import DEFAULT_MEM_FRACTION, EngineArgs, EngineConfig
    from tandem.models.registry import has_mtp_head, load_model_config

    model_config = load_model_config(args.model)
    dtype_name = args.dtype
    if dtype_name == "fp8":  # the weights' format; activations and everything unquantized keep the config's dtype
        dtype_name = "auto"
        if model_config.quantization is None:
            model_config = dataclasses.replace(model_config, quantization=Fp8Config())
    engine_args = EngineArgs(model_path=str(args.model), tp_size=args.tp_size, pp_size=args.pp_size,
                             dtype=dtype_name, context_length=args.context_length,
                             max_running_requests=args.max_running_requests, max_total_tokens=args.max_total_tokens,
                             mem_fraction_static=args.mem_fraction_static or DEFAULT_MEM_FRACTION["cuda"],
                             page_size=args.page_size, chunked_prefill_size=args.chunked_prefill_size,
                             disable_radix_cache=args.disable_radix_cache, torchao_config=args.torchao_config,
                             speculative_algorithm=args.speculative_algorithm,
                             speculative_num_steps=args.speculative_num_steps)
    config = EngineConfig.resolve(engine_args, model_config)
    if config.speculative is not None and config.speculative.algorithm == "NEXTN" and not has_mtp_head(model_config):
        raise ConfigError(f"--speculative-algorithm {args.speculative_algorithm} needs a model with a "
                          f"multi-token-prediction head (mtp_num_hidden_layers > 0 in a Qwen3.5 family)")
    return config


def _plan_partition(spec, pp_size: int, costs, settings, memory: int) -> dict:
    from tandem.runtime.planning.resolve import resolve_partition
    from tandem.runtime.planning.sizing import plan_stages

    counts = resolve_partition(spec, pp_size, costs.num_layers, lambda: costs, lambda: settings)
    stages = plan_stages(costs, counts, settings)
    return {
        "name": spec, "partition": counts,
        "max_total_tokens": stages[0].max_total_tokens,
        "max_running_requests": stages[0].max_running_requests,
        "max_stage_bytes": max(s.total_bytes for s in stages),
        "max_stage_flops_per_token": max(s.flops_per_token for s in stages),
        "fits": all(s.fits(memory) for s in stages),
        "stages": [s.to_dict(memory) for s in stages],
    }


def _tokens(n) -> str:
    return "no limit" if n is None else f"{n:,}"


def render(plan: dict) -> str:
    kinds = " + ".join(f"{n} {k}" for k, n in plan["layer_kinds"].items())
    moe = f", MoE {plan['num_experts']} experts top-{plan['num_experts_per_tok']}" if plan["num_experts"] else ""
    memory = fmt_bytes(plan["gpu_memory_bytes"])
    sizing = (f"KV pool of {plan['given_max_total_tokens']:,} tokens per stage" if plan["given_max_total_tokens"]
              else f"pools sized from {plan['mem_fraction_static']} x {memory}")
    lines = [
        f"{plan['model']} ({plan['architecture']}): {plan['num_layers']} layers ({kinds}){moe}",
        f"pp={plan['pp_size']} tp={plan['tp_size']} dtype={plan['dtype']}"
        f"{'; weights ' + plan['quantization'] if plan['quantization'] else ''}"
        f"{'; torchao_config ' + plan['torchao_config'] if plan['torchao_config'] else ''}; {sizing}; "
        f"pages of {plan['page_size']} tokens; radix cache {'on' if plan['radix_cache'] else 'off'}; "
        f"context length {plan['context_length']:,}",
        f"whole model weights (one TP rank): {fmt_bytes(plan['model_weight_bytes'])}",
        "figures are per device (TP rank 0); the activation reserve is an estimate (the engine measures its own)",
    ]
    header = ("stage", "layers", "kinds", "weights", "KV tokens", "kv cache", "state slots", "state cache",
              "activations", "total", "GFLOP/token", f"fits {memory}")
    for p in plan["plans"]:
        rows = [header]
        for s in p["stages"]:
            extras = [x for x, present in (("embed", s["has_embedding"]), ("norm+lm_head", s["has_lm_head"]))
                      if present]
            rows.append((
                str(s["pp_rank"]), f"[{s['layer_start']}, {s['layer_end']})",
                s["kinds"] + (f" (+{', '.join(extras)})" if extras else ""),
                fmt_bytes(s["weight_bytes"]), _tokens(s["stage_max_total_tokens"]), fmt_bytes(s["kv_cache_bytes"]),
                str(s["state_slots"]), fmt_bytes(s["state_cache_bytes"]), fmt_bytes(s["activation_reserve_bytes"]),
                fmt_bytes(s["total_bytes"]), f"{s['flops_per_token'] / 1e9:.2f}", "yes" if s["fits"] else "NO"))
        widths = [max(len(r[c]) for r in rows) for c in range(len(header))]
        lines.append("")
        lines.append(f"partition {p['name']} {p['partition']}: capacity {p['max_total_tokens']:,} KV tokens (the "
                     f"smallest stage's), up to {p['max_running_requests']} running requests; largest stage "
                     f"{fmt_bytes(p['max_stage_bytes'])}, {fmt_flops(p['max_stage_flops_per_token'])}/token; "
                     f"{'fits' if p['fits'] else 'does NOT fit'} in {memory}")
        for r in rows:
            lines.append("  " + "  ".join(cell.ljust(w) if c <= 2 else cell.rjust(w)
                                          for c, (cell, w) in enumerate(zip(r, widths))).rstrip())
    if not plan["fits"]:
        lines.append("")
        lines.append(f"pp={plan['pp_size']} tp={plan['tp_size']} does NOT fit in {memory} per device with any "
                     f"planned partition.")
        layouts = [layout["text"] for layout in plan["fitting_layouts"]]
        lines.append("The smallest layouts that fit: " + "; ".join(layouts) if layouts else
                     f"No layout of up to {plan['layouts_searched_up_to']} devices fits.")
    return "\n".join(lines)


def run(args) -> int:
    """Exit code 0 when a planned partition fits every stage, else 1."""
    plan = build_plan(args)
    print(json.dumps(plan, indent=2) if args.json else render(plan))
    return 0 if plan["fits"] else 1
