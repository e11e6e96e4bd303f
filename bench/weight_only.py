"""Weight-only int8 / int4 decode benchmark: batch-1 and batch-16 decode of ~0.5B-parameter random Llama and
Qwen3.5 (dense, hybrid) bf16 checkpoints, Tandem bf16 vs int8wo vs int4wo-128, side by side with llama.cpp
(llama-cpp-python: BF16, Q8_0 and Q4_0 GGUFs of the same weights) and vLLM's CPU build (bf16), all one thread,
measured in one run on this machine: `--rounds` rounds of every engine in turn (A B C A B C), each figure the
best over the rounds, every round's figures and load average kept in the result file.

    .venv/bin/python bench/weight_only.py --llamacpp-python /work/wt/venv-llamacpp/bin/python \
        --llamacpp-src DIR_WITH_convert_hf_to_gguf.py [--vllm-python /work/wt/venv-vllm/bin/python]

The GGUFs are made by bench/gguf_convert.py (llama.cpp's convert_hf_to_gguf.py, BF16) and quantized to Q8_0
and Q4_0 by llama.cpp's own quantizer in bench/llamacpp_decode.py.

Decode rate = batch / (median time between a request's consecutive tokens); prompts of 32 random tokens,
64 new tokens (ignore_eos). The other engines run in their own venvs through bench/llamacpp_decode.py and
bench/vllm_decode.py, which print one JSON line each. Also recorded: the int8wo / int4wo logprobs of the
bf16 run's own greedy tokens, against the bf16 run's."""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from tandem.bench import bench_engine, machine_info, random_prompts
from tandem.engine import Engine

VOCAB = 32000
INPUT_LEN, OUTPUT_LEN = 32, 64
SPECS = ("", "int8wo", "int4wo-128")
BENCH = Path(__file__).resolve().parent


def build_models(root: Path) -> dict[str, Path]:
    from transformers import LlamaConfig, LlamaForCausalLM, Qwen3_5ForCausalLM
    from transformers.models.qwen3_5 import Qwen3_5TextConfig

    layer_types = ["linear_attention", "linear_attention", "linear_attention", "full_attention"] * 6
    specs = {
        "llama-0.5b": (LlamaForCausalLM, LlamaConfig(
            vocab_size=VOCAB, hidden_size=1024, intermediate_size=4096, num_hidden_layers=28, num_attention_heads=16,
            num_key_value_heads=8, max_position_embeddings=2048, tie_word_embeddings=False)),
        "qwen3.5-0.5b": (Qwen3_5ForCausalLM, Qwen3_5TextConfig(
            vocab_size=VOCAB, hidden_size=1024, intermediate_size=3584, num_hidden_layers=24, num_attention_heads=8,
            num_key_value_heads=2, head_dim=256, linear_num_key_heads=16, linear_num_value_heads=16,
            linear_key_head_dim=128, linear_value_head_dim=128, layer_types=layer_types,
            max_position_embeddings=2048, tie_word_embeddings=False)),
    }
    paths = {}
    for name, (cls, config) in specs.items():
        path = root / name
        if not (path / "config.json").exists():
            torch.manual_seed(0)
            model = cls(config).to(torch.bfloat16)
            model.save_pretrained(path)
            write_tokenizer(path)
        paths[name] = path
    return paths


def write_tokenizer(path: Path) -> None:
    """A small byte-level BPE tokenizer.json (the GGUF converter needs one; the benchmark feeds token ids)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    text = [" ".join(f"word{i} {i * 7 % 1000}" for i in range(j, j + 50)) for j in range(0, 5000, 50)]
    tok.train_from_iterator(text, trainers.BpeTrainer(vocab_size=600, special_tokens=["<|endoftext|>"]))
    tok.save(str(path / "tokenizer.json"))
    (path / "tokenizer_config.json").write_text(json.dumps({"tokenizer_class": "PreTrainedTokenizerFast",
                                                            "eos_token": "<|endoftext|>"}))


def parameter_count(path: Path) -> int:
    from safetensors import safe_open

    total = 0
    for file in path.glob("*.safetensors"):
        with safe_open(str(file), framework="pt") as f:
            total += sum(torch.Size(f.get_slice(n).get_shape()).numel() for n in f.keys())
    return total


def decode_rate(result, batch: int) -> float:
    return batch * 1000 / result.itl_p50_ms


def bench_tandem(path: Path, batches: list[int], reps: int) -> dict:
    """Decode tokens/s per (torchao_config, batch), best of `reps` taken alternately over the configs (the
    machine is shared: alternating spreads other processes' load over all of them), and weight bytes."""
    out = {spec or "bf16": {"decode_tokens_per_s": {}} for spec in SPECS}
    with contextlib.ExitStack() as stack:
        engines = {spec or "bf16": stack.enter_context(Engine(
            path, dtype="bfloat16", progress=False, torchao_config=spec, max_total_tokens=16384,
            max_running_requests=max(batches))) for spec in SPECS}
        for label, engine in engines.items():
            bench_engine(engine, random_prompts(1, INPUT_LEN, VOCAB, seed=9), 4)  # warm-up
            out[label]["weight_bytes"] = engine.stage_report()[0]["weight_bytes"]
        for batch in batches:
            prompts = random_prompts(batch, INPUT_LEN, VOCAB, seed=batch)
            for _ in range(reps):
                for label, engine in engines.items():
                    rate = decode_rate(bench_engine(engine, prompts, OUTPUT_LEN), batch)
                    rates = out[label]["decode_tokens_per_s"]
                    rates[batch] = max(rates.get(batch, 0.0), rate)
            print(f"[tandem {path.name} batch {batch}] {out}", flush=True)
    return out


def logprob_agreement(path: Path) -> dict:
    """Max / mean |logprob difference| of the bf16 run's greedy tokens (and prompts) under int8wo and int4wo."""
    prompts = random_prompts(2, INPUT_LEN, VOCAB, seed=3)
    params = {"temperature": 0, "max_new_tokens": 16}
    with Engine(path, dtype="bfloat16", progress=False, max_total_tokens=4096) as engine:
        base = engine.generate(input_ids=prompts, sampling_params=params, return_logprob=True, logprob_start_len=0)
    texts = [p + o["output_ids"] for p, o in zip(prompts, base)]
    want = [lp for o in base for lp, _ in o["meta_info"]["input_token_logprobs"] + o["meta_info"]["output_token_logprobs"]]
    out = {}
    for spec in SPECS[1:]:
        with Engine(path, dtype="bfloat16", progress=False, max_total_tokens=4096, torchao_config=spec) as engine:
            got = engine.generate(input_ids=texts, sampling_params={"temperature": 0, "max_new_tokens": 1},
                                  return_logprob=True, logprob_start_len=0)
            greedy = engine.generate(input_ids=prompts, sampling_params=params)
        have = [lp for o in got for lp, _ in o["meta_info"]["input_token_logprobs"]]
        diffs = [abs(a - b) for a, b in zip(want, have)]
        same = sum(a == b for o, g in zip(base, greedy) for a, b in zip(o["output_ids"], g["output_ids"]))
        out[spec] = {"max_abs_logprob_diff": max(diffs), "mean_abs_logprob_diff": statistics.fmean(diffs),
                     "greedy_tokens_equal": same, "greedy_tokens": sum(len(o["output_ids"]) for o in base)}
    return out


def timed_part(fn, *args) -> dict:
    """fn(*args)'s result with when it ran and the load average before and after (the machine is shared)."""
    started, load = time.strftime("%Y-%m-%d %H:%M:%S"), os.getloadavg()
    result = fn(*args)
    return {**result, "started": started, "loadavg_before": load, "loadavg_after": os.getloadavg()}


def run_json(cmd: list[str], env: dict | None = None, timeout: int = 3600) -> dict:
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=timeout)
    lines = [line for line in proc.stdout.splitlines() if line.startswith("{")]
    if proc.returncode or not lines:
        return {"error": f"exit {proc.returncode}: {proc.stderr.strip()[-2000:]}"}
    return json.loads(lines[-1])


def merge_best(a: dict, b: dict) -> dict:
    """a and b (one round's results each) merged, every decode rate the higher of the two, the rest from b."""
    out = dict(a)
    for key, value in b.items():
        if key == "decode_tokens_per_s" and isinstance(a.get(key), dict):
            out[key] = {batch: max(rate, a[key].get(batch, 0.0)) for batch, rate in value.items()}
        elif isinstance(value, dict) and isinstance(a.get(key), dict):
            out[key] = merge_best(a[key], value)
        else:
            out[key] = value
    return out


def ratios(result: dict, batches: list[int]) -> dict:
    """Tandem's decode rates over llama.cpp's (int8wo / Q8_0, int4wo-128 / Q4_0, bf16 / BF16) and vLLM's bf16."""
    tandem = result.get("tandem", {})
    rate = lambda part, b: part.get("decode_tokens_per_s", {}).get(b) or part.get("decode_tokens_per_s", {}).get(str(b))
    out = {}
    formats = result.get("llama.cpp", {}).get("formats", {})
    for mine, theirs in (("bf16", "BF16"), ("int8wo", "Q8_0"), ("int4wo-128", "Q4_0")):
        if mine in tandem and theirs in formats:
            out[f"tandem {mine} / llama.cpp {theirs}"] = {b: rate(tandem[mine], b) / rate(formats[theirs], b)
                                                          for b in batches if rate(formats[theirs], b)}
    vllm = result.get("vllm", {}).get("formats", {}).get("bf16")
    for mine in ("bf16", "int8wo", "int4wo-128"):
        if vllm and mine in tandem:
            out[f"tandem {mine} / vllm bf16"] = {b: rate(tandem[mine], b) / rate(vllm, b)
                                                 for b in batches if rate(vllm, b)}
    return out


def run_round(name: str, path: Path, args, batches: list[int], parts: list[str]) -> dict:
    """One round of every engine asked for, one after the other (a round alternates the engines)."""
    out = {}
    if "tandem" in parts:
        out["tandem"] = timed_part(bench_tandem, path, batches, 1)
    if "llama.cpp" in parts and args.llamacpp_python:
        gguf = path.parent / f"{path.name}.gguf"
        if not gguf.exists():
            subprocess.run([sys.executable, str(BENCH / "gguf_convert.py"), str(path), str(gguf), "--src",
                            args.llamacpp_src], check=True, capture_output=True)
        out["llama.cpp"] = timed_part(run_json, [
            args.llamacpp_python, str(BENCH / "llamacpp_decode.py"), str(path), "--gguf-bf16", str(gguf),
            "--batches", args.batches, "--input-len", str(INPUT_LEN), "--output-len", str(OUTPUT_LEN), "--reps", "1"])
        print(f"[llama.cpp {name}] {out['llama.cpp']}", flush=True)
    if "vllm" in parts and args.vllm_python:
        out["vllm"] = timed_part(run_json, [
            args.vllm_python, str(BENCH / "vllm_decode.py"), str(path), "--batches", args.batches,
            "--input-len", str(INPUT_LEN), "--output-len", str(OUTPUT_LEN), "--reps", "1"])
        print(f"[vllm {name}] {out['vllm']}", flush=True)
    return out


def main() -> int:
    global OUTPUT_LEN
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--root", default="/tmp/tandem-weight-only-bench")
    parser.add_argument("--out", default=str(BENCH / "results"))
    parser.add_argument("--rounds", type=int, default=2,
                        help="rounds of all engines in turn (A B C A B C); each figure is the best over rounds")
    parser.add_argument("--output-len", type=int, default=OUTPUT_LEN)
    parser.add_argument("--batches", default="1,16")
    parser.add_argument("--models", default="llama-0.5b,qwen3.5-0.5b")
    parser.add_argument("--parts", default="tandem,llama.cpp,vllm",
                        help="which engines to run; the others' figures already in the result file are kept")
    parser.add_argument("--llamacpp-python", default=None)
    parser.add_argument("--llamacpp-src", default=None)
    parser.add_argument("--vllm-python", default=None)
    parser.add_argument("--vllm-error", default=None, help="why vLLM could not be run here, recorded as is")
    parser.add_argument("--vllm-int8", default=None, help="why vLLM's int8 was not measured, recorded as is")
    args = parser.parse_args()
    OUTPUT_LEN = args.output_len
    torch.set_num_threads(1)
    batches = [int(b) for b in args.batches.split(",")]
    paths = build_models(Path(args.root))
    parts = args.parts.split(",")
    for name in args.models.split(","):
        path = paths[name]
        out = Path(args.out) / f"weight_only_{name}.json"
        result = json.loads(out.read_text()) if out.exists() else {}
        result.update({"model": name, "parameters": parameter_count(path), "dtype": "bfloat16",
                       "input_len": INPUT_LEN, "output_len": OUTPUT_LEN, "threads": 1, "machine": machine_info(),
                       "rounds": args.rounds})
        rounds = [run_round(name, path, args, batches, parts) for _ in range(args.rounds)]
        for engine in rounds[0]:
            best = dict(rounds[0][engine])  # a copy: per_round below holds the round's own dict
            for later in rounds[1:]:
                best = merge_best(best, later[engine])
            best["per_round"] = [r[engine] for r in rounds]
            result[engine] = best
        if "tandem" in parts:
            result["logprobs_vs_bf16"] = logprob_agreement(path)
            tandem = result["tandem"]
            result["speedup_vs_tandem_bf16"] = {spec: {b: tandem[spec]["decode_tokens_per_s"][b] /
                                                       tandem["bf16"]["decode_tokens_per_s"][b] for b in batches}
                                                for spec in tandem if spec in SPECS or spec == "bf16"}
        if "vllm" in parts and not args.vllm_python and args.vllm_error:
            result["vllm"] = {"error": args.vllm_error}
        if args.vllm_int8:
            result.setdefault("vllm", {})["int8"] = args.vllm_int8
        result["ratios"] = ratios(result, batches)
        out.write_text(json.dumps(result, indent=1))
        print(f"wrote {out}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
