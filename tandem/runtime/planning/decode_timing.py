"""Measured decode cost of every decoder layer and of each stage position's extras, for the `auto-latency`
layer partition: a short timed dry run on the engine's device at start-up, before any weight is read.

FLOPs (`auto-compute`) misjudge decode badly: at a decode batch the LM head's one large GEMM runs near peak
while a layer's many small ones, its norms, rotary and attention over the cache do not, so on a CPU the head
costs about two layers where its FLOPs say five (bench/results/profile.md). Here the real Tandem modules are
built with random weights, one decoder layer of each kind (layer type x dense/MoE MLP), the embedding, the
final norm + LM head, and one decode step of `batch` requests at `context` tokens is timed for each part, the
sampler included (the last stage's own sampling path, greedy, no logprobs asked, and the encoding of its
result message), the fastest of several interleaved runs (CPU time on CPU, so that other
processes' load at start-up does not tilt the split). A stage's time is its layers' times plus its
position's extras (the embedding on the first stage; final norm, LM head and sampler on the last), which
`planner.min_max_partition` balances.

The probe is built for one TP rank of a single-rank layout (no collectives): relative costs, which are all
the partition needs, shard evenly under TP. `measure_decode_timing` runs it in a child interpreter
(`python -m tandem.runtime.planning.decode_timing`, settings on stdin, the timing as JSON on stdout), so the driver
neither keeps the probe's memory nor opens a CUDA context; on CPU the child has the intra-op threads a rank
process will have, and glibc's malloc keeps freed memory (`MALLOC_*` below): with its default, adaptive
thresholds the probe's few calls sometimes paid page faults for the logits and timed the LM head 60 %
slower, tipping the split.

Only settings cross the process boundary (msgspec JSON of `EngineArgs` and `DecodeTiming`), nothing
executable."""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass

import msgspec
import torch

from tandem.config import EngineArgs, ModelConfig
from tandem.layers.embedding import ParallelLMHead, VocabParallelEmbedding
from tandem.layers.forward_batch import ForwardBatch
from tandem.layers.norm import RMSNorm
from tandem.layers.paged_metadata import PagedAttentionMetadata
from tandem.layers.rotary import RotaryEmbedding
from tandem.layers.span import Span
from tandem.models.common import DecoderLayer
from tandem.models.fp8_weights import quantize_layer
from tandem.models.registry import get_model_class, load_model_config
from tandem.parallel.layout import GroupInfo
from tandem.runtime.memory.sizing import StageCacheShape
from tandem.runtime.planning.stage_costs import building_on
from tandem.runtime.sampling.sampler import Sampler, SamplingParams
from tandem.runtime.sampling.step_sampling import sample_step
from tandem.runtime.step import StepInput

PROBE_ENVIRONMENT = {"MALLOC_MMAP_THRESHOLD_": str(32 << 20), "MALLOC_TRIM_THRESHOLD_": str(1 << 34)}
PROBE_TIMEOUT_S = 900
DEFAULT_BATCH = 32
MAX_BATCH = 256
MAX_CONTEXT = 1024


@dataclass(frozen=True)
class DecodeTiming:
    """Seconds of one decode step of `batch` rows at `context` tokens: per layer, and per stage position
    ("single", "first", "middle", "last") for what is not a layer."""

    batch: int
    context: int
    layer_seconds: tuple[float, ...]
    extra_seconds: dict[str, float]

    def describe(self, model_config: ModelConfig) -> str:
        kinds = {}
        for i, seconds in enumerate(self.layer_seconds):
            kind = model_config.layer_types[i] + (" moe" if model_config.is_moe_layer(i) else "")
            kinds.setdefault(kind, seconds)
        parts = ", ".join(f"{k} {v * 1e3:.2f} ms" for k, v in kinds.items())
        return (f"decode step of {self.batch} requests at {self.context} tokens: {parts}; embedding "
                f"{self.extra_seconds['first'] * 1e3:.2f} ms; final norm + LM head + sampler "
                f"{self.extra_seconds['last'] * 1e3:.2f} ms")


def calibration_shape(args: EngineArgs, model_config: ModelConfig) -> tuple[int, int]:
    """(decode rows per step, context tokens) to time: a micro-batch of the configured running requests
    (DEFAULT_BATCH when not given) at half the context length, at most MAX_CONTEXT // 2."""
    batch = args.max_running_requests // args.resolve_micro_batches() if args.max_running_requests else DEFAULT_BATCH
    context = min(args.resolve_context_length(model_config), MAX_CONTEXT) // 2
    return max(1, min(batch, MAX_BATCH)), max(2, context)


def rank_threads(local_ranks: int) -> int:
    """Intra-op threads of one rank process on CPU: the node's cores shared among its `local_ranks` ranks
    (`tandem.executors.rank` sets them; the probe runs with the same)."""
    return max(1, (os.cpu_count() or 1) // max(1, local_ranks))


@contextlib.contextmanager
def _threads(count: int):
    previous = torch.get_num_threads()
    torch.set_num_threads(count)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


def _time(fn: Callable[[], object], device: torch.device) -> float:
    """Seconds of fn(): on CUDA wall time between synchronisations; on CPU this process's CPU time, which other
    processes' load (a busy machine at start-up) hardly changes, unlike wall time."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        start = time.perf_counter()
        fn()
        torch.cuda.synchronize(device)
        return time.perf_counter() - start
    start = time.process_time()
    fn()
    return time.process_time() - start


def _randomize(module: torch.nn.Module, generator: torch.Generator) -> None:
    for p in module.parameters():
        if p.dtype == torch.float8_e4m3fn:  # drawn in float32 and rounded: torch has no FP8 normal_
            p.copy_(torch.empty(p.shape, device=p.device).normal_(0.0, 0.02, generator=generator))
        elif p.is_floating_point():
            p.normal_(0.0, 0.02, generator=generator)


def measure_decode_timing(args: EngineArgs) -> DecodeTiming:
    """The probe's timing, measured in a child interpreter (see the module docstring)."""
    env = dict(os.environ, **PROBE_ENVIRONMENT)
    try:
        done = subprocess.run([sys.executable, "-m", "tandem.runtime.planning.decode_timing"], input=msgspec.json.encode(args),
                              capture_output=True, env=env, timeout=PROBE_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        raise RuntimeError(f"auto-latency: the timing probe took more than {PROBE_TIMEOUT_S} s") from None
    if done.returncode != 0:
        raise RuntimeError(f"auto-latency: the timing probe failed (exit {done.returncode}):\n"
                           f"{done.stderr.decode(errors='replace')[-3000:]}")
    return msgspec.json.decode(done.stdout, type=DecodeTiming)


def time_decode_parts(model_config: ModelConfig, args: EngineArgs, reps: int = 7) -> DecodeTiming:
    """Time one decode step of each part on `args.device`, in this process (the fastest of `reps` after one
    warm-up)."""
    batch, context = calibration_shape(args, model_config)
    dtype = args.resolve_dtype(model_config)
    device = torch.device(args.device if args.device == "cpu" else f"cuda:{torch.cuda.current_device()}")
    threads = rank_threads(args.world_size // args.nnodes) if device.type == "cpu" else torch.get_num_threads()
    with _threads(threads), torch.inference_mode():
        return _measure(model_config, args, batch, context, dtype, device, reps)


def _measure(model_config: ModelConfig, args: EngineArgs, batch: int, context: int, dtype: torch.dtype,
             device: torch.device, reps: int) -> DecodeTiming:
    alone, page_size = GroupInfo.alone(), args.page_size
    spec = get_model_class(model_config.architecture).block_spec(model_config)
    kinds: dict[tuple[str, bool], int] = {}  # (layer type, moe) -> the first layer of that kind
    for i in range(model_config.num_layers):
        kinds.setdefault((model_config.layer_types[i], model_config.is_moe_layer(i)), i)
    generator = torch.Generator().manual_seed(0)
    with building_on(dtype, device):
        layers = {i: quantize_layer(DecoderLayer(alone, model_config, spec, i), model_config, i)
                  for i in kinds.values()}  # FP8 layers for an FP8 checkpoint, as its stages hold them
        embed = VocabParallelEmbedding(alone, model_config.vocab_size, model_config.hidden_size)
        norm = RMSNorm(model_config.hidden_size, model_config.rms_norm_eps, zero_centred=spec.zero_centred_norm)
        head = ParallelLMHead(alone, model_config.vocab_size, model_config.hidden_size)
        rotary = RotaryEmbedding(model_config.head_dim, model_config.rope_parameters,
                                 model_config.partial_rotary_factor, model_config.hf_config)
    weights = torch.Generator(device=device).manual_seed(0)
    for module in (*layers.values(), embed, norm, head):
        _randomize(module, weights)

    pages_per_request = -(-context // page_size)
    shape = StageCacheShape.from_layers(layers, model_config, dtype)
    kv, state = shape.allocate(batch * pages_per_request * page_size, page_size, batch, device)
    spans = [Span(r, context - 1, 1) for r in range(batch)]
    ids = torch.randint(0, model_config.vocab_size, (batch,), generator=generator)
    step = ForwardBatch.build(spans, ids, device)
    step.kv_pool, step.state_pool = kv, state
    if shape.attn_layers:
        tables = [list(range(r * pages_per_request, (r + 1) * pages_per_request)) for r in range(batch)]
        step.attn = PagedAttentionMetadata.build(tables, [context - 1] * batch, [1] * batch, page_size,
                                                 shape.decode_chunk_keys, device)
    hidden = torch.randn(batch, model_config.hidden_size, generator=generator).to(device, dtype)
    cos_sin = rotary.cos_sin(step.positions, dtype)
    sampler, greedy = Sampler(), SamplingParams(temperature=0.0)
    for r in range(batch):
        sampler.begin(r, greedy, prompt_len=1)

    keys = list(range(batch))
    decode_step = StepInput(spans, ids.tolist(), [True] * batch, [greedy] * batch, keys,
                            want_logprobs=[False] * batch)
    params, encoder = dict.fromkeys(keys, greedy), msgspec.msgpack.Encoder()

    def run_head():  # what the last stage does after its layers: ModelRunner's own sampling path, then the
        out, _ = norm(hidden, hidden)  # result message to the driver
        encoder.encode(sample_step(lambda rows: head(rows).float(), sampler, params, decode_step, step, out))

    parts: dict[object, Callable[[], object]] = {
        i: (lambda layer=layer: layer(hidden, hidden.clone(), step, rotary, cos_sin)) for i, layer in layers.items()}
    parts["embedding"] = lambda: embed(step.input_ids)
    parts["head"] = run_head
    samples: dict[object, list[float]] = {name: [] for name in parts}
    for rep in range(reps + 1):
        for name, fn in parts.items():  # interleaved, so a burst of load spreads over every part
            seconds = _time(fn, device)
            if rep:
                samples[name].append(seconds)
    best = {name: min(s) for name, s in samples.items()}  # the least distorted by other processes' load
    layer_seconds = tuple(best[kinds[(model_config.layer_types[i], model_config.is_moe_layer(i))]]
                          for i in range(model_config.num_layers))
    embedding, last = best["embedding"], best["head"]
    return DecodeTiming(batch, context, layer_seconds,
                        {"single": embedding + last, "first": embedding, "middle": 0.0, "last": last})


def main() -> None:
    args = msgspec.json.decode(sys.stdin.buffer.read(), type=EngineArgs)
    timing = time_decode_parts(load_model_config(args.model_path), args)
    sys.stdout.buffer.write(msgspec.json.encode(timing))


if __name__ == "__main__":
    main()
