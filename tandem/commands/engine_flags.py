"""CLI flags generated from `EngineArgs` fields (SGLang's flag names: --model-path, --tp-size, ...), for every
subcommand that starts an engine."""

from __future__ import annotations

import argparse
import dataclasses

from tandem.config import EngineArgs

HELP = {
    "model_path": "Hugging Face checkpoint directory (config.json + safetensors).",
    "tp_size": "Tensor-parallel size: ranks that shard each layer's weights inside one pipeline stage.",
    "pp_size": "Pipeline-parallel size: number of stages, each owning a contiguous slice of the layers.",
    "dtype": "Weight/activation dtype: auto (the checkpoint's), float32, bfloat16 or float16.",
    "device": "cpu (gloo) or cuda (NCCL).",
    "pp_layer_partition": "Layers per stage: uniform (default), auto (memory), auto-compute (FLOPs), auto-latency (decode time "
                          "measured on the device at start-up), auto-capacity, or a list like 15,15,14,16.",
    "context_length": "Maximum tokens per request (prompt + output); default: the model's own limit "
                      "(max_position_embeddings), and never more than the KV cache holds.",
    "max_running_requests": "Upper bound on requests running at once (each holds a linear-attention state slot); "
                            "default: derived from the cache capacity (at most 256, one page per request, and for "
                            "hybrid models what half the memory budget holds in state slots).",
    "max_total_tokens": "KV cache tokens per pipeline stage (the page pool size); default: sized from "
                        "--mem-fraction-static of the device's memory.",
    "mem_fraction_static": "Fraction of the device's memory (CUDA: total memory; CPU: available RAM shared by "
                           "this node's ranks) for weights, caches and the measured activation reserve; "
                           "default 0.88 on CUDA, 0.8 on CPU.",
    "page_size": "Tokens per KV page; prefix-cache hits are whole pages.",
    "disable_radix_cache": "Turn the radix prefix cache off (on by default).",
    "chunked_prefill_size": "Maximum prompt tokens prefilled per step; longer prompts are chunked.",
    "num_micro_batches": "Micro-batches kept in flight across the pipeline (default: pp_size).",
    "nnodes": "Number of machines taking part.",
    "node_rank": "This machine's index among --nnodes.",
    "dist_init_addr": "host:port of node 0's rendezvous for multi-node runs (default: a free local port).",
    "dist_auth_token": "Shared secret authenticating control messages between nodes (required when --nnodes > 1).",
    "max_rank_restarts": "Restarts of the ranks allowed within --rank-restart-window after a rank dies or raises; "
                         "one more failure stops the engine (the server exits non-zero).",
    "rank_restart_window": "Seconds over which --max-rank-restarts counts restarts.",
    "log_level": "Logging level (debug, info, warning).",
    "torchao_config": "Weight-only quantization of the linear layers at load, per stage (CPU): int8wo (int8 per "
                      "output channel) or int4wo-<group> (int4 per group of 32, 64, 128 or 256 inputs); "
                      "default: none.",
    "speculative_algorithm": "Speculative decoding: NGRAM (drafts looked up in the request's own tokens, any model) "
                             "or NEXTN / MTP (the checkpoint's multi-token-prediction head); default: off.",
    "speculative_num_steps": "Draft tokens per verify pass (a chain); default 3.",
    "speculative_eagle_topk": "Drafts per step; only 1 (a chain) is supported.",
    "speculative_num_draft_tokens": "Tokens per verify pass: speculative_num_steps + 1 for a chain.",
    "speculative_ngram_min_match_window_size": "NGRAM: the shortest suffix n-gram looked up.",
    "speculative_ngram_max_match_window_size": "NGRAM: the longest suffix n-gram looked up.",
}


def add_engine_flags(parser: argparse.ArgumentParser, exclude: tuple[str, ...] = ()) -> None:
    """One flag per `EngineArgs` field not in `exclude` (field names); --model-path is required."""
    for f in dataclasses.fields(EngineArgs):
        if f.name in exclude:
            continue
        flag = "--" + f.name.replace("_", "-")
        kwargs = {"help": HELP.get(f.name, "")}
        if f.name == "model_path":
            kwargs["required"] = True
        else:
            kwargs["default"] = f.default
            kwargs["help"] += f" (default: {f.default})"
        if str(f.type) == "bool":
            kwargs["action"] = "store_true"
        elif str(f.type).startswith("int"):
            kwargs["type"] = int
        elif str(f.type).startswith("float"):
            kwargs["type"] = float
        parser.add_argument(flag, **kwargs)


def engine_kwargs(args: argparse.Namespace, exclude: tuple[str, ...] = ()) -> dict:
    """The `EngineArgs` fields not in `exclude`, as parsed from the flags."""
    return {f.name: getattr(args, f.name) for f in dataclasses.fields(EngineArgs) if f.name not in exclude}
