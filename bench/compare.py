"""Side-by-side benchmark: transformers `generate` vs Tandem pp=1, pp=2 and tp=2 on the same model, dtype,
machine and thread budget, measured alternately in one run; plus pp=1 vs pp=2 over batch sizes.

    .venv/bin/python bench/compare.py [--reps 3] [--out bench/results]

Models are built here (random weights, bf16, ~50-100M parameters): a Llama-style dense model and a
Qwen3.5-MoE-style hybrid model. In-process runs (transformers, Tandem pp=1) use one torch thread; the
pp=2 and tp=2 runs use two rank processes of one thread each."""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from tandem.bench import bench_engine, mean, random_prompts
from tandem.engine import Engine

VOCAB = 32000


def build_models(root: Path) -> dict[str, Path]:
    from transformers import LlamaConfig, LlamaForCausalLM, Qwen3_5MoeForCausalLM
    from transformers.models.qwen3_5_moe import Qwen3_5MoeTextConfig

    specs = {
        "llama-dense": (LlamaForCausalLM, LlamaConfig(
            vocab_size=VOCAB, hidden_size=512, intermediate_size=1536, num_hidden_layers=8, num_attention_heads=8,
            num_key_value_heads=4, max_position_embeddings=512, tie_word_embeddings=False)),
        "qwen3.5-moe": (Qwen3_5MoeForCausalLM, Qwen3_5MoeTextConfig(
            vocab_size=VOCAB, hidden_size=512, num_hidden_layers=8, num_attention_heads=8, num_key_value_heads=2,
            head_dim=64, linear_num_key_heads=4, linear_num_value_heads=8, linear_key_head_dim=64,
            linear_value_head_dim=64, num_experts=16, num_experts_per_tok=4, moe_intermediate_size=256,
            shared_expert_intermediate_size=512, max_position_embeddings=512, tie_word_embeddings=False)),
    }
    paths = {}
    for name, (cls, config) in specs.items():
        path = root / name
        if not (path / "config.json").exists():
            torch.manual_seed(0)
            model = cls(config).to(torch.bfloat16)
            model.save_pretrained(path)
        paths[name] = path
    return paths


def parameter_count(path: Path) -> int:
    from safetensors import safe_open

    total = 0
    for file in path.glob("*.safetensors"):
        with safe_open(str(file), framework="pt") as f:
            total += sum(math.prod(f.get_slice(name).get_shape()) for name in f.keys())
    return total


def bench_transformers(model, prompts: list[list[int]], output_len: int) -> dict:
    ids = torch.tensor(prompts)
    start = time.perf_counter()
    with torch.inference_mode():
        out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=output_len,
                             min_new_tokens=output_len, do_sample=False, pad_token_id=0)
    seconds = time.perf_counter() - start
    produced = (out.shape[1] - ids.shape[1]) * ids.shape[0]
    return {"label": "transformers", "seconds": seconds, "tokens_per_s": produced / seconds}


def compare_model(name: str, path: Path, reps: int, num_prompts: int, input_len: int, output_len: int) -> dict:
    from transformers import AutoModelForCausalLM

    torch.set_num_threads(1)
    hf = AutoModelForCausalLM.from_pretrained(path, dtype=torch.bfloat16).eval()
    prompts = random_prompts(num_prompts, input_len, VOCAB, seed=1)
    engines = {
        "tandem pp1": Engine(path, dtype="bfloat16", progress=False),
        "tandem pp2": Engine(path, dtype="bfloat16", pp_size=2, pp_layer_partition="auto-latency", progress=False),
        "tandem tp2": Engine(path, dtype="bfloat16", tp_size=2, progress=False),
    }
    runs: dict[str, list[dict]] = {"transformers": [], **{k: [] for k in engines}}
    try:
        bench_transformers(hf, prompts[:2], 4)  # warm-up
        for engine in engines.values():
            bench_engine(engine, prompts[:2], 4)
        for rep in range(reps):
            runs["transformers"].append(bench_transformers(hf, prompts, output_len))
            for label, engine in engines.items():
                runs[label].append(bench_engine(engine, prompts, output_len, label).to_dict())
            print(f"[{name}] rep {rep + 1}/{reps}: " + ", ".join(
                f"{k} {v[-1]['tokens_per_s']:.1f} tok/s" for k, v in runs.items()), flush=True)
    finally:
        for engine in engines.values():
            engine.shutdown()
    summary = {label: mean([r["tokens_per_s"] for r in results]) for label, results in runs.items()}
    return {"model": name, "parameters": parameter_count(path), "dtype": "bfloat16", "num_prompts": num_prompts,
            "input_len": input_len, "output_len": output_len, "reps": reps, "threads_per_process": 1,
            "tokens_per_s": summary, "speedup_vs_transformers": {k: v / summary["transformers"] for k, v in
                                                                  summary.items()},
            "runs": runs}


def pp_scaling(path: Path, batch_sizes: list[int], input_len: int, output_len: int) -> dict:
    torch.set_num_threads(1)
    out = {"batch_sizes": batch_sizes, "tandem pp1": [], "tandem pp2": []}
    engines = {"tandem pp1": Engine(path, dtype="bfloat16", progress=False, max_running_requests=max(batch_sizes)),
               "tandem pp2": Engine(path, dtype="bfloat16", pp_size=2, pp_layer_partition="auto-latency", progress=False,
                                    max_running_requests=max(batch_sizes))}
    try:
        for batch in batch_sizes:
            prompts = random_prompts(batch, input_len, VOCAB, seed=2)
            for label, engine in engines.items():
                bench_engine(engine, prompts[:1], 2)
                out[label].append(bench_engine(engine, prompts, output_len, label).tokens_per_s)
            print(f"[pp scaling] batch {batch}: pp1 {out['tandem pp1'][-1]:.1f}, pp2 {out['tandem pp2'][-1]:.1f} tok/s",
                  flush=True)
    finally:
        for engine in engines.values():
            engine.shutdown()
    out["pp2_over_pp1"] = [b / a for a, b in zip(out["tandem pp1"], out["tandem pp2"])]
    return out


def plot(results: list[dict], scaling: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(12, 4.5))
    labels = list(results[0]["tokens_per_s"])
    width = 0.8 / len(results)
    for i, result in enumerate(results):
        values = [result["tokens_per_s"][label] for label in labels]
        axes[0].bar([x + i * width for x in range(len(labels))], values, width, label=result["model"])
    axes[0].set_xticks([x + width * (len(results) - 1) / 2 for x in range(len(labels))], labels)
    axes[0].set_ylabel("output tokens/s")
    axes[0].set_title("16 prompts x 32 tokens, 64 new tokens, bf16, 1 thread/process")
    axes[0].legend()
    for label in ("tandem pp1", "tandem pp2"):
        axes[1].plot(scaling["batch_sizes"], scaling[label], marker="o", label=label)
    axes[1].set_xscale("log", base=2)
    axes[1].set_xlabel("batch size")
    axes[1].set_ylabel("output tokens/s")
    axes[1].set_title(f"pipeline scaling ({scaling['model']})")
    axes[1].legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--out", default="bench/results")
    parser.add_argument("--models-dir", default="/tmp/tandem-bench-models")
    parser.add_argument("--batch-sizes", default="1,2,4,8,16,32")
    args = parser.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    paths = build_models(Path(args.models_dir))
    results = []
    for name, path in paths.items():
        result = compare_model(name, path, args.reps, num_prompts=16, input_len=32, output_len=64)
        (out / f"compare_{name}.json").write_text(json.dumps(result, indent=2))
        results.append(result)
    scaling = pp_scaling(paths["llama-dense"], [int(b) for b in args.batch_sizes.split(",")], 32, 32)
    scaling["model"] = "llama-dense"
    (out / "pp_scaling.json").write_text(json.dumps(scaling, indent=2))
    plot(results, scaling, out / "compare.png")
    for result in results:
        print(f"\n{result['model']} ({result['parameters'] / 1e6:.0f}M parameters):")
        for label, value in result["tokens_per_s"].items():
            print(f"  {label:<14}{value:>8.1f} tok/s  x{result['speedup_vs_transformers'][label]:.2f}")
    print("\npp2/pp1 by batch size:", [f"{x:.2f}" for x in scaling["pp2_over_pp1"]])
    return 0


if __name__ == "__main__":
    sys.exit(main())
