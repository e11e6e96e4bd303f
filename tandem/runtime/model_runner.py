"""One rank's model runner: builds this stage's model, loads its weights, allocates its caches and runs
steps. Non-first stages receive `{hidden_states, residual}` from the previous stage; non-last stages send
theirs on; the last stage computes logits and samples."""

from __future__ import annotations

import logging
import time
from collections import deque

import torch

from tandem.config import EngineArgs, ModelConfig
from tandem.layers.forward_batch import ForwardBatch
from tandem.loader import load_weights
from tandem.parallel import comm
from tandem.parallel.layout import ParallelLayout
from tandem.runtime.geometry import CacheGeometry
from tandem.runtime.logprobs import grouped_token_logprobs
from tandem.runtime.planner import build_model
from tandem.runtime.sampler import Sampler
from tandem.runtime.step import StepInput, StepOutput

logger = logging.getLogger("tandem")


def available_memory_bytes(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    try:
        for line in open("/proc/meminfo"):
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 1 << 62  # unknown: do not refuse


class ModelRunner:
    """One rank: its stage's model (built for `layout`), its weights, its caches, and `execute(step)`."""

    def __init__(self, args: EngineArgs, model_config: ModelConfig, layout: ParallelLayout, progress: bool = True):
        self.args, self.config, self.layout = args, model_config, layout
        self.dtype = args.resolve_dtype(model_config)
        self.device = torch.device(args.device if args.device == "cpu" else f"cuda:{torch.cuda.current_device()}")
        start = time.perf_counter()
        self.geometry = CacheGeometry.from_args(model_config, args)
        self.max_len, self.num_slots = self.geometry.max_len, self.geometry.num_slots
        self.model = build_model(model_config, layout, self.dtype, self.device)  # parameters not yet touched
        self.layer_start, self.layer_end = self.model.layer_range
        own_layers = {i: self.model.model.layers[i] for i in range(self.layer_start, self.layer_end)}
        self._check_memory(sum(self.geometry.layer_bytes(layer, model_config) for layer in own_layers.values()))
        self.load_report = load_weights(self.model, args.model_path, layout.label, progress=progress)
        self.kv_cache, self.state_cache = self.geometry.allocate(own_layers, model_config, self.device)
        self.load_seconds = time.perf_counter() - start
        self.sampler = Sampler()
        self._pending_sends: list = []
        # wall-clock (start, end) of each step's computation, excluding the wait for the previous stage
        self.step_times: deque[tuple[float, float]] = deque(maxlen=4096)
        self._compute_start = 0.0
        logger.info(self.report_line())

    def _check_memory(self, need_cache: int) -> None:
        """Refuse to start when weights + caches cannot fit, instead of failing mid-load."""
        need_weights = self.weight_bytes
        available = available_memory_bytes(self.device)
        if need_weights + need_cache > available:
            gb = lambda n: f"{n / 1e9:.2f} GB"
            raise MemoryError(
                f"not enough memory on {self.layout.label}: weights {gb(need_weights)} + caches {gb(need_cache)} "
                f"({self.num_slots} requests x {self.max_len} tokens) exceed the {gb(available)} available; "
                f"lower --max-running-requests or --context-length, or use more stages / TP ranks")

    @property
    def weight_bytes(self) -> int:
        return sum(p.numel() * p.element_size() for p in self.model.parameters())

    def report(self) -> dict:
        pp, tp = self.layout.pp, self.layout.tp
        return {
            "pp_rank": pp.rank, "pp_size": pp.size, "tp_rank": tp.rank, "tp_size": tp.size,
            "layer_start": self.layer_start, "layer_end": self.layer_end,
            "weight_bytes": self.weight_bytes, "kv_cache_bytes": self.kv_cache.nbytes,
            "state_cache_bytes": self.state_cache.nbytes, "load_seconds": self.load_seconds,
            "num_slots": self.num_slots, "max_len": self.max_len,
            "tensors_read": list(self.load_report.tensors_read), "bytes_read": self.load_report.bytes_read,
            "step_times": list(self.step_times),
            "peak_memory_bytes": self.peak_memory_bytes(),
        }

    def peak_memory_bytes(self) -> int:
        """Peak device memory on CUDA; the process's peak resident set size on CPU."""
        if self.device.type == "cuda":
            return torch.cuda.max_memory_allocated(self.device)
        import resource

        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024

    def report_line(self) -> str:
        mb = lambda n: f"{n / 1e6:.1f} MB"
        return (f"{self.layout.label} layers [{self.layer_start}, {self.layer_end}): weights {mb(self.weight_bytes)}, "
                f"kv cache {mb(self.kv_cache.nbytes)}, state cache {mb(self.state_cache.nbytes)}, "
                f"load {self.load_seconds:.1f} s")

    def execute(self, step: StepInput) -> StepOutput | None:
        """Run one step on this stage; the last stage returns the sampled tokens."""
        self._compute_start = time.time()
        try:
            return self._execute(step)
        finally:
            self.step_times.append((self._compute_start, time.time()))

    @torch.inference_mode()
    def _execute(self, step: StepInput) -> StepOutput | None:
        pp = self.layout.pp
        for key in step.release_keys:
            self.sampler.release(key)
        self.state_cache.reset(step.reset_slots)
        batch = ForwardBatch.build(step.spans, step.input_ids, self.device)
        batch.kv_cache, batch.state_cache = self.kv_cache, self.state_cache
        hidden = residual = None
        if not pp.is_first:
            received = comm.recv_from_prev_stage(pp, batch.num_tokens, self.config.hidden_size, self.dtype, self.device)
            hidden, residual = received["hidden_states"], received["residual"]
            self._compute_start = time.time()
        hidden, residual = self.model(batch, hidden, residual)
        if not pp.is_last:
            for work in self._pending_sends:
                work.wait()
            self._pending_sends = comm.send_to_next_stage({"hidden_states": hidden, "residual": residual}, pp)
            return None
        self._observe(step)
        return self._sample(step, batch, hidden)

    def _observe(self, step: StepInput) -> None:
        """Give the sampler each request's tokens of this step (its history for penalties and seeds)."""
        offset = 0
        prompt_lens = step.prompt_lens or [0] * len(step.spans)
        for span, key, params, prompt_len in zip(step.spans, step.keys, step.params, prompt_lens):
            if span.prefix_len == 0:
                self.sampler.begin(key, params, prompt_len)
            self.sampler.observe(key, step.input_ids[offset:offset + span.num_tokens], span.prefix_len)
            offset += span.num_tokens

    def _sample(self, step: StepInput, batch: ForwardBatch, hidden: torch.Tensor) -> StepOutput:
        """Sample the rows that end a request's tokens and score the prompt rows that want logprobs, with one
        compute_logits (one vocabulary all-gather across TP ranks) over all of those rows."""
        num_spans = len(step.spans)
        sampled = [i for i, s in enumerate(step.sample) if s]
        scored = prompt_logprob_targets(step, batch)
        top_nums = step.top_logprobs_num or [0] * num_spans
        last_rows = batch.last_token_indices()
        rows = [last_rows[sampled]] + [torch.arange(batch.offsets[i], batch.offsets[i] + len(targets))
                                       for i, targets in scored]
        row_index = torch.cat(rows).to(hidden.device)
        logits = self.model.compute_logits(hidden[row_index]) if len(row_index) else None
        tokens: list = [None] * num_spans
        logprobs: list = [None] * num_spans
        tops: list = [None] * num_spans
        errors: list = [None] * num_spans
        if sampled:
            result = self.sampler.sample(logits[:len(sampled)], [step.params[i] for i in sampled],
                                         [step.keys[i] for i in sampled], [top_nums[i] for i in sampled])
            for j, i in enumerate(sampled):
                tokens[i], logprobs[i] = result.tokens[j], result.logprobs[j]
                tops[i], errors[i] = result.top_logprobs[j], result.errors[j]
        input_lps = input_tops = None
        if step.input_logprobs and any(step.input_logprobs):
            input_lps, input_tops = [None] * num_spans, [None] * num_spans
            groups = grouped_token_logprobs(logits[len(sampled):], [t for _, targets in scored for t in targets],
                                            [len(targets) for _, targets in scored], [top_nums[i] for i, _ in scored])
            for (i, _), group in zip(scored, groups):
                input_lps[i], input_tops[i] = group.logprobs, group.top_logprobs
                if group.error and errors[i] is None:
                    tokens[i] = logprobs[i] = tops[i] = None
                    errors[i] = group.error
            if not any(t is not None for t in input_tops):
                input_tops = None
        return StepOutput(tokens, logprobs, input_lps, tops, errors, input_tops)


def prompt_logprob_targets(step: StepInput, batch: ForwardBatch) -> list[tuple[int, list[int]]]:
    """(span index, target ids) of each span that wants its prompt tokens' logprobs: row k of the span is
    scored against the token after it (the span's next token, or for its last row the prompt token after the
    span, when there is one)."""
    if not step.input_logprobs:
        return []
    scored = []
    for i, wanted in enumerate(step.input_logprobs):
        if not wanted:
            continue
        offset, n = batch.offsets[i], step.spans[i].num_tokens
        targets = step.input_ids[offset + 1:offset + n]
        if step.next_ids and step.next_ids[i] is not None:
            targets = [*targets, step.next_ids[i]]
        scored.append((i, list(targets)))
    return scored
