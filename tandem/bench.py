"""Throughput and latency measurement: offline on an `Engine` and online against a running server.

Offline: N random-token prompts of I tokens, O new tokens each (ignore_eos), all submitted at once.
Reported: output tokens/s, time to first token and inter-token latency (p50/p99), peak memory per rank, and
with speculative decoding the accept length (tokens a verify pass emits on average). `repetitive_prompts`
makes a workload n-gram drafts can find: each prompt repeats one short random block.

Shared prefix (`bench_shared_prefix`): N prompts made of one random P-token prefix (a system prompt) and I
distinct random tokens each, all submitted at once, one new token each. Reported: prompt tokens prefilled per
second (all prompt tokens over the time until the last first token) and time to first token (mean, p50,
p99), with the prompt tokens the radix cache served."""

from __future__ import annotations

import json
import os
import random
import statistics
import time
from dataclasses import asdict, dataclass, field


@dataclass
class BenchResult:
    label: str
    num_prompts: int
    input_len: int
    output_len: int
    seconds: float
    output_tokens: int
    tokens_per_s: float
    ttft_p50_ms: float
    ttft_p99_ms: float
    itl_p50_ms: float
    itl_p99_ms: float
    peak_memory_bytes: list[int] = field(default_factory=list)
    accept_length: float | None = None  # speculative decoding: mean tokens per verify pass

    def to_dict(self) -> dict:
        return asdict(self)


def percentile(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    index = min(len(ordered) - 1, max(0, round(q / 100 * (len(ordered) - 1))))
    return ordered[index]


def random_prompts(num: int, length: int, vocab_size: int, seed: int = 0) -> list[list[int]]:
    rng = random.Random(seed)
    return [[rng.randrange(10, vocab_size) for _ in range(length)] for _ in range(num)]


def repetitive_prompts(num: int, length: int, vocab_size: int, period: int = 8, seed: int = 0) -> list[list[int]]:
    """Prompts of `length` tokens, each one random block of `period` tokens repeated."""
    rng = random.Random(seed)
    prompts = []
    for _ in range(num):
        block = [rng.randrange(10, vocab_size) for _ in range(period)]
        prompts.append((block * (length // period + 1))[:length])
    return prompts


def timed_decode(engine, prompts: list[list[int]], params) -> tuple[int, float, list]:
    """Run `prompts` with `params` to completion: (tokens produced after every request has its first token,
    that window in seconds, the requests). The prefill phase is left out of both."""
    from tandem.runtime.scheduling.request import Request

    times: list[list[float]] = [[] for _ in prompts]

    def recorder(i):
        def on_update(req):
            while len(times[i]) < len(req.output_ids):
                times[i].append(time.perf_counter())
        return on_update

    reqs = [Request(list(p), params, on_update=recorder(i), output_logprobs_wanted=False)
            for i, p in enumerate(prompts)]
    engine.run_requests(reqs)
    start, end = max(t[0] for t in times), max(t[-1] for t in times)
    return sum(1 for t in times for x in t if x > start), end - start, reqs


def accept_length(reqs) -> float | None:
    """Mean tokens emitted per verify pass over `reqs` (None without speculative decoding)."""
    passes = sum(r.spec_verify_ct for r in reqs)
    if not any(r.speculative for r in reqs):
        return None
    return (sum(r.spec_accepted_drafts for r in reqs) + passes) / passes if passes else 0.0


def summarize(label: str, prompts, output_len: int, start: float, end: float, token_times: list[list[float]],
              peaks: list[int]) -> BenchResult:
    ttft = [(times[0] - start) * 1000 for times in token_times if times]
    itl = [(b - a) * 1000 for times in token_times for a, b in zip(times, times[1:])]
    produced = sum(len(times) for times in token_times)
    return BenchResult(label, len(prompts), len(prompts[0]) if prompts else 0, output_len, end - start, produced,
                       produced / (end - start), percentile(ttft, 50), percentile(ttft, 99), percentile(itl, 50),
                       percentile(itl, 99), peaks)


def bench_engine(engine, prompts: list[list[int]], output_len: int, label: str = "tandem") -> BenchResult:
    from tandem.runtime.sampling.params import SamplingParams
    from tandem.runtime.scheduling.scheduler import Request

    params = SamplingParams(max_new_tokens=output_len, temperature=0.0, ignore_eos=True)
    token_times: list[list[float]] = [[] for _ in prompts]

    def recorder(i):
        def on_update(req):
            while len(token_times[i]) < len(req.output_ids):
                token_times[i].append(time.perf_counter())
        return on_update

    reqs = [Request(list(p), params, on_update=recorder(i), output_logprobs_wanted=False)
            for i, p in enumerate(prompts)]
    start = time.perf_counter()
    engine.run_requests(reqs)
    end = time.perf_counter()
    peaks = [r.get("peak_memory_bytes", 0) for r in engine.stage_report()]
    result = summarize(label, prompts, output_len, start, end, token_times, peaks)
    result.accept_length = accept_length(reqs)
    return result


@dataclass
class PrefillResult:
    label: str
    num_prompts: int
    prefix_len: int
    suffix_len: int
    seconds: float  # until the last request's first token
    prompt_tokens: int
    cached_tokens: int  # prompt tokens served by the radix cache
    prefill_tokens_per_s: float
    ttft_mean_ms: float
    ttft_p50_ms: float
    ttft_p99_ms: float

    def to_dict(self) -> dict:
        return asdict(self)


def shared_prefix_prompts(num: int, prefix_len: int, suffix_len: int, vocab_size: int, seed: int = 0) -> list[list[int]]:
    """One random prefix, then a distinct random suffix per prompt (its first token differs from the others')."""
    rng = random.Random(seed)
    prefix = [rng.randrange(10, vocab_size) for _ in range(prefix_len)]
    firsts = rng.sample(range(10, vocab_size), num)
    return [prefix + [first] + [rng.randrange(10, vocab_size) for _ in range(suffix_len - 1)] for first in firsts]


def bench_shared_prefix(engine, prompts: list[list[int]], prefix_len: int, label: str) -> PrefillResult:
    from tandem.runtime.sampling.params import SamplingParams
    from tandem.runtime.scheduling.scheduler import Request

    params = SamplingParams(max_new_tokens=1, temperature=0.0, ignore_eos=True)
    first_token: list[float | None] = [None] * len(prompts)

    def recorder(i):
        def on_update(req):
            if req.output_ids and first_token[i] is None:
                first_token[i] = time.perf_counter()
        return on_update

    reqs = [Request(list(p), params, on_update=recorder(i), output_logprobs_wanted=False)
            for i, p in enumerate(prompts)]
    start = time.perf_counter()
    engine.run_requests(reqs)
    ttft = [(t - start) * 1000 for t in first_token]
    seconds = max(ttft) / 1000
    prompt_tokens = sum(len(p) for p in prompts)
    return PrefillResult(label, len(prompts), prefix_len, len(prompts[0]) - prefix_len, seconds, prompt_tokens,
                         sum(r.cached_tokens for r in reqs), prompt_tokens / seconds, mean(ttft), percentile(ttft, 50),
                         percentile(ttft, 99))


def machine_info() -> dict:
    """The CPU this ran on (model name and the SIMD flags that decide GEMM speed) and torch's thread count."""
    import torch

    name, flags = "unknown", set()
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name") and name == "unknown":
                name = line.split(":", 1)[1].strip()
            elif line.startswith("flags"):
                flags = set(line.split(":", 1)[1].split())
    except OSError:
        pass
    wanted = ("avx2", "avx512f", "avx512_bf16", "avx512_vnni", "amx_bf16", "amx_tile")
    return {"cpu": name, "cpus": len(os.sched_getaffinity(0)), "flags": [f for f in wanted if f in flags],
            "torch_threads": torch.get_num_threads(), "torch": torch.__version__}


def format_prefill_table(results: list[PrefillResult]) -> str:
    header = (f"{'config':<24}{'prompt tok/s':>14}{'TTFT mean ms':>14}{'TTFT p50 ms':>13}{'TTFT p99 ms':>13}"
              f"{'cached tok':>12}")
    rows = [header]
    for r in results:
        rows.append(f"{r.label:<24}{r.prefill_tokens_per_s:>14.1f}{r.ttft_mean_ms:>14.1f}{r.ttft_p50_ms:>13.1f}"
                    f"{r.ttft_p99_ms:>13.1f}{r.cached_tokens:>12}")
    return "\n".join(rows)


def bench_server(base_url: str, prompts: list[str], output_len: int, concurrency: int, model: str = "default") -> BenchResult:
    """Stream /v1/completions from a running server with `concurrency` requests in flight."""
    import asyncio

    import httpx

    token_times: list[list[float]] = [[] for _ in prompts]

    async def one(client, i, sem):
        async with sem:
            body = {"model": model, "prompt": prompts[i], "max_tokens": output_len, "temperature": 0,
                    "stream": True, "ignore_eos": True}
            async with client.stream("POST", f"{base_url}/v1/completions", json=body) as resp:
                resp.raise_for_status()
                async for line in resp.aiter_lines():
                    if line.startswith("data: ") and line != "data: [DONE]":
                        chunk = json.loads(line[6:])
                        if chunk.get("choices") and chunk["choices"][0].get("text"):
                            token_times[i].append(time.perf_counter())

    async def run():
        sem = asyncio.Semaphore(concurrency)
        async with httpx.AsyncClient(timeout=600) as client:
            await asyncio.gather(*(one(client, i, sem) for i in range(len(prompts))))

    start = time.perf_counter()
    asyncio.run(run())
    end = time.perf_counter()
    return summarize(f"server c={concurrency}", [[0]] * len(prompts), output_len, start, end, token_times, [])


def format_table(results: list[BenchResult]) -> str:
    header = f"{'config':<22}{'tok/s':>10}{'TTFT p50 ms':>13}{'ITL p50 ms':>12}{'ITL p99 ms':>12}{'peak MB/rank':>16}"
    speculative = any(r.accept_length is not None for r in results)
    rows = [header + (f"{'accept len':>12}" if speculative else "")]
    for r in results:
        peak = "/".join(f"{p / 1e6:.0f}" for p in r.peak_memory_bytes) or "-"
        accept = "" if not speculative else f"{r.accept_length:>12.2f}" if r.accept_length is not None else \
            f"{'-':>12}"
        rows.append(f"{r.label:<22}{r.tokens_per_s:>10.1f}{r.ttft_p50_ms:>13.1f}{r.itl_p50_ms:>12.1f}"
                    f"{r.itl_p99_ms:>12.1f}{peak:>16}{accept}")
    return "\n".join(rows)


def mean(values: list[float]) -> float:
    return statistics.fmean(values) if values else float("nan")
