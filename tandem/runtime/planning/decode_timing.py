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
`search.min_max_partition` balances.

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

from tandem.config import EngineArgs, EngineConfig, ModelConfig
from tandem.layers.embedding import ParallelLMHead, VocabParallelEmbedding
from tandem.layers.forward_batch import ForwardBatch
from tandem.layers.norm import RMSNorm
from tandem.layers.paged_metadata import PagedAttentionMetadata
from tandem.layers.rotary import RotaryEmbedding
from tandem.layers.span import Span
from tandem.models.common import DecoderLayer
from tandem.models.fp8_weights import quantize_layer
from tandem.models.registry import building_on, get_model_class, load_model_config
from tandem.parallel.layout import GroupInfo
from tandem.runtime.memory.sizing import StageCacheShape
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


def calibration_shape(config: EngineConfig) -> tuple[int, int]:
    """(decode rows per step, context tokens) to time: a micro-batch of the configured running requests
    (DEFAULT_BATCH when not given) at half the context length, at most MAX_CONTEXT // 2."""
    running = config.args.max_running_requests
    batch = running // config.num_micro_batches if running else DEFAULT_BATCH
    context = min(config.context_length, MAX_CONTEXT) // 2
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


def time_decode_parts(config: EngineConfig, reps: int = 7) -> DecodeTiming:
    """Time one decode step of each part on the configured device, in this process (the fastest of `reps`
    after one warm-up)."""
    args = config.args
    batch, context = calibration_shape(config)
    device = torch.device(args.device if args.device == "cpu" else f"cuda:{torch.cuda.current_device()}")
    threads = rank_threads(args.world_size // args.nnodes) if device.type == "cpu" else torch.get_num_threads()
    with _threads(threads), torch.inference_mode():
        probe = _Probe(config.model, config.dtype, device)
        parts = probe.parts(_DecodeStep(config.model, probe, batch, context, args.page_size, device))
        best = _fastest(parts, reps, device)
    model = config.model
    layer_seconds = tuple(best[probe.kinds[(model.layer_types[i], model.is_moe_layer(i))]]
                          for i in range(model.num_layers))
    embedding, last = best["embedding"], best["head"]
    return DecodeTiming(batch, context, layer_seconds,
                        {"single": embedding + last, "first": embedding, "middle": 0.0, "last": last})


class _Probe:
    """The timed modules, with random weights: one decoder layer of each kind (its first index stands for
    every layer of that kind), the embedding, the final norm and LM head, and the rotary embedding."""

    def __init__(self, model: ModelConfig, dtype: torch.dtype, device: torch.device):
        alone = GroupInfo.alone()
        spec = get_model_class(model.architecture).block_spec(model)
        self.kinds: dict[tuple[str, bool], int] = {}  # (layer type, moe) -> the first layer of that kind
        for i in range(model.num_layers):
            self.kinds.setdefault((model.layer_types[i], model.is_moe_layer(i)), i)
        with building_on(dtype, device):
            # FP8 layers for an FP8 checkpoint, as its stages hold them
            self.layers = {i: quantize_layer(DecoderLayer(alone, model, spec, i), model, i) for i in self.kinds.values()}
            self.embed = VocabParallelEmbedding(alone, model.vocab_size, model.hidden_size)
            self.norm = RMSNorm(model.hidden_size, model.rms_norm_eps, zero_centred=spec.zero_centred_norm)
            self.head = ParallelLMHead(alone, model.vocab_size, model.hidden_size)
            self.rotary = RotaryEmbedding(model.head_dim, model.rope_parameters, model.partial_rotary_factor,
                                          model.hf_config)
        weights = torch.Generator(device=device).manual_seed(0)
        for module in (*self.layers.values(), self.embed, self.norm, self.head):
            _randomize(module, weights)
        self.dtype = dtype

    def parts(self, step: _DecodeStep) -> dict[object, Callable[[], object]]:
        """What to time: each layer (by its index), "embedding", and "head" (what the last stage does after its
        layers: ModelRunner's own sampling path, then the encoding of the result message to the driver)."""
        hidden, batch = step.hidden, step.batch
        cos_sin = self.rotary.cos_sin(batch.positions, self.dtype)
        encoder = msgspec.msgpack.Encoder()

        def run_head():
            out, _ = self.norm(hidden, hidden)
            encoder.encode(sample_step(lambda rows: self.head(rows).float(), step.sampler, step.params,
                                       step.step_input, batch, out))

        parts: dict[object, Callable[[], object]] = {
            i: (lambda layer=layer: layer(hidden, hidden.clone(), batch, self.rotary, cos_sin))
            for i, layer in self.layers.items()}
        parts["embedding"] = lambda: self.embed(batch.input_ids)
        parts["head"] = run_head
        return parts


class _DecodeStep:
    """One decode step of `batch` greedy requests at `context` tokens over the probe's own cache pools: the
    `ForwardBatch` the layers run, the `StepInput` and sampler state the head's sampling path reads."""

    def __init__(self, model: ModelConfig, probe: _Probe, batch: int, context: int, page_size: int,
                 device: torch.device):
        generator = torch.Generator().manual_seed(0)
        pages_per_request = -(-context // page_size)
        shape = StageCacheShape.from_layers(probe.layers, model, probe.dtype)
        kv, state = shape.allocate(batch * pages_per_request * page_size, page_size, batch, device)
        spans = [Span(r, context - 1, 1) for r in range(batch)]
        ids = torch.randint(0, model.vocab_size, (batch,), generator=generator)
        self.batch = ForwardBatch.build(spans, ids, device)
        self.batch.kv_pool, self.batch.state_pool = kv, state
        if shape.attn_layers:
            tables = [list(range(r * pages_per_request, (r + 1) * pages_per_request)) for r in range(batch)]
            self.batch.attn = PagedAttentionMetadata.build(tables, [context - 1] * batch, [1] * batch, page_size,
                                                           shape.decode_chunk_keys, device)
        self.hidden = torch.randn(batch, model.hidden_size, generator=generator).to(device, probe.dtype)
        greedy, keys = SamplingParams(temperature=0.0), list(range(batch))
        self.sampler = Sampler()
        for r in keys:
            self.sampler.begin(r, greedy, prompt_len=1)
        self.step_input = StepInput(spans, ids.tolist(), [True] * batch, [greedy] * batch, keys,
                                    want_logprobs=[False] * batch)
        self.params = dict.fromkeys(keys, greedy)


def _fastest(parts: dict[object, Callable[[], object]], reps: int, device: torch.device) -> dict[object, float]:
    """Each part's fastest time over `reps` runs after a warm-up, the parts interleaved so that a burst of load
    spreads over all of them (the fastest is the least distorted by other processes' load)."""
    samples: dict[object, list[float]] = {name: [] for name in parts}
    for rep in range(reps + 1):
        for name, fn in parts.items():
            seconds = _time(fn, device)
            if rep:
                samples[name].append(seconds)
    return {name: min(s) for name, s in samples.items()}


def main() -> None:
    args = msgspec.json.decode(sys.stdin.buffer.read(), type=EngineArgs)
    timing = time_decode_parts(EngineConfig.resolve(args, load_model_config(args.model_path)))
    sys.stdout.buffer.write(msgspec.json.encode(timing))


if __name__ == "__main__":
    main()
