"""One rank's model runner: builds this stage's model, loads its weights, sizes and allocates its cache pools
and runs steps. Non-first stages receive `{hidden_states, residual}` from the previous stage; non-last stages
send theirs on; the last stage computes logits and samples.

Cache pools (see `tandem.runtime.memory.sizing`): the KV pool holds `max_total_tokens` tokens for this stage's
full-attention layers, the linear-attention state pool `state_slots` slots for its Gated-DeltaNet layers.
Both sizes are agreed by every rank of the world (the minimum), since the driver hands out page and slot ids
once for all stages. Each step's page tables and state-slot operations come from the driver
(`tandem.runtime.step`); the runner keeps each request's page table between steps."""

from __future__ import annotations

import logging
import time
from collections import deque

import torch

from tandem.config import EngineConfig
from tandem.errors import ConfigError
from tandem.layers.forward_batch import ForwardBatch
from tandem.layers.gated_delta_net import commit_verified
from tandem.layers.gdn_verify import VerifyLedger
from tandem.layers.paged_metadata import PagedAttentionMetadata
from tandem.layers.weight_only import quantize_linears_
from tandem.loader import load_weights
from tandem.models.registry import build_model
from tandem.parallel import comm
from tandem.parallel.layout import ParallelLayout
from tandem.runtime.memory.activation_reserve import measure_activation_reserve
from tandem.runtime.memory.device_memory import available_memory_bytes, device_memory_bytes
from tandem.runtime.memory.sizing import (
    DEFAULT_MAX_RUNNING_REQUESTS,
    StageCacheShape,
    StageMemory,
    final_requests,
    request_token_cap,
    size_requests,
    size_tokens,
    state_slots_per_request,
)
from tandem.runtime.mtp_drafter import DraftSpan, MTPDrafter
from tandem.runtime.sampling.sampler import Sampler
from tandem.runtime.sampling.step_sampling import sample_step
from tandem.runtime.stage_report import StageReport
from tandem.runtime.step import StepInput, StepOutput, admits_request

logger = logging.getLogger("tandem")
NO_TOKEN_LIMIT = 1 << 62  # a stage without full-attention layers, in the agreement on the minimum


def gb(n: int) -> str:
    return f"{n / 1e9:.2f} GB"


class ModelRunner:
    """One rank: its stage's model (built for `layout`), its weights, its caches, and `execute(step)`.
    `local_ranks` is the number of ranks sharing this node's RAM (CPU memory sizing)."""

    def __init__(self, engine_config: EngineConfig, layout: ParallelLayout, progress: bool = True, local_ranks: int = 1):
        args, model_config = engine_config.args, engine_config.model
        self.args, self.config, self.layout = args, model_config, layout
        self.dtype = engine_config.dtype
        self.mem_fraction = engine_config.mem_fraction
        self.device = torch.device(args.device if args.device == "cpu" else f"cuda:{torch.cuda.current_device()}")
        start = time.perf_counter()
        self.device_memory = device_memory_bytes(self.device, local_ranks)
        spec = engine_config.speculative
        nextn = spec is not None and spec.algorithm == "NEXTN"
        self.model = build_model(model_config, layout, self.dtype, self.device, mtp=nextn)  # not yet touched
        self.layer_start, self.layer_end = self.model.layer_range
        own_layers = {i: self.model.model.layers[i] for i in range(self.layer_start, self.layer_end)}
        mtp = getattr(self.model, "mtp", None)
        if mtp is not None:  # the MTP head's layers keep their KV in this stage's pool, under their own ids
            own_layers.update(zip(mtp.layer_ids, mtp.layers))
        self.shape = StageCacheShape.from_layers(own_layers, model_config, self.dtype)
        self.page_size = args.page_size
        self.slots_per_request = state_slots_per_request(model_config, not args.disable_radix_cache)
        self.context_length = engine_config.context_length
        self.activation_reserve = 0
        if args.max_total_tokens is not None:  # sizes known before loading: refuse early if they cannot fit
            self._size_pools(None)
            self._check_memory()
        elif self.weight_bytes > self.device_memory * self.mem_fraction:
            raise MemoryError(f"not enough memory on {layout.label}: weights {gb(self.weight_bytes)} exceed "
                              f"{self.mem_fraction} x {gb(self.device_memory)}; use more pipeline "
                              f"stages or TP ranks")
        self.load_report = load_weights(self.model, args.model_path, layout.label, progress=progress)
        quantize_linears_(self.model, args.weight_only(), layout.label)
        if args.max_total_tokens is None:
            self.activation_reserve = measure_activation_reserve(
                self, self._dry_run_context(), args.max_running_requests or DEFAULT_MAX_RUNNING_REQUESTS,
                spec.num_steps if spec is not None else 0, nextn)
            self._size_pools(StageMemory(self.device_memory, self.mem_fraction, self.weight_bytes,
                                         self.activation_reserve))
        self.kv_pool, self.state_pool = self.shape.allocate(self.max_total_tokens, self.page_size, self.state_slots,
                                                            self.device, zero_fill=False)
        self.load_seconds = time.perf_counter() - start
        self.sampler = Sampler()
        self.page_tables: dict = {}
        self.verify_ledger = VerifyLedger()  # this stage's verify spans awaiting their commit
        self.drafter = (MTPDrafter(self.model, spec.num_steps, self.page_size, self.shape.decode_chunk_keys,
                                   self.device) if mtp is not None else None)  # NEXTN, on the last stage
        self.params: dict = {}  # request key -> SamplingParams, from the step that (re)admitted it
        self._pending_sends: list = []
        # wall-clock (start, end) of each step's computation, excluding the waits for the previous stage (its
        # hidden states) and for the next one (to take this stage's previous send)
        self.step_times: deque[tuple[float, float]] = deque(maxlen=4096)
        self._compute_start = 0.0
        self._compute_end: float | None = None
        logger.info(self.report_line())
        logger.info(self.capacity_line())

    def _dry_run_context(self) -> int:
        """The context of the prefill dry run: the context length, unless a quarter of the memory left after
        the weights holds fewer tokens (the pool could not hold such a context anyway)."""
        free = int(self.device_memory * self.mem_fraction) - self.weight_bytes
        per_token = max(1, self.shape.kv_bytes_per_token)
        return max(self.args.chunked_prefill_size, min(self.context_length, free // 4 // per_token))

    def _size_pools(self, memory: StageMemory | None) -> None:
        """max_running_requests, max_total_tokens and state slots, agreed with every other rank (the minimum)."""
        args, shape, label = self.args, self.shape, self.layout.label
        requests = size_requests(args.max_running_requests, memory, shape.state_bytes_per_slot,
                                 self.slots_per_request)
        requests = comm.world_min([requests], self.device)[0]
        if requests < 1:
            raise MemoryError(f"not enough memory on {label}: the linear-attention state of one request "
                              f"({gb(self.slots_per_request * shape.state_bytes_per_slot)}) does not fit in half "
                              f"of the {gb(memory.budget)} left after weights and activations")
        state_bytes = requests * self.slots_per_request * shape.state_bytes_per_slot
        cap = request_token_cap(requests, self.context_length, self.page_size)
        try:
            tokens = size_tokens(args.max_total_tokens, memory, state_bytes, shape.kv_bytes_per_token, self.page_size,
                                 cap)
        except ValueError as exc:
            raise MemoryError(f"not enough memory on {label}: {exc}") from None
        self.stage_max_total_tokens = tokens
        agreed = comm.world_min([NO_TOKEN_LIMIT if tokens is None else tokens], self.device)[0]
        if agreed == NO_TOKEN_LIMIT:
            raise ConfigError("the model has no full-attention layer: there is no KV cache to size")
        self.max_total_tokens = agreed
        # whether the cap is what limits the pool (said in the capacity line)
        self.capped = args.max_total_tokens is None and agreed == cap
        self.max_running_requests = final_requests(args.max_running_requests, requests, agreed, self.page_size)
        self.state_slots = self.max_running_requests * self.slots_per_request

    def _check_memory(self) -> None:
        """With --max-total-tokens given, refuse to start when weights + caches cannot fit, before loading."""
        need_cache = (self.max_total_tokens * self.shape.kv_bytes_per_token
                      + self.state_slots * self.shape.state_bytes_per_slot)
        available = available_memory_bytes(self.device) if self.device.type == "cuda" else self.device_memory
        if self.weight_bytes + need_cache > available:
            raise MemoryError(
                f"not enough memory on {self.layout.label}: weights {gb(self.weight_bytes)} + caches "
                f"{gb(need_cache)} ({self.max_total_tokens} KV tokens, {self.state_slots} state slots) exceed the "
                f"{gb(available)} available; lower --max-total-tokens or --max-running-requests, or use more "
                f"pipeline stages / TP ranks")

    @property
    def weight_bytes(self) -> int:
        return sum(p.numel() * p.element_size() for p in self.model.parameters())

    def report(self) -> StageReport:
        pp, tp = self.layout.pp, self.layout.tp
        return StageReport(
            pp_rank=pp.rank, pp_size=pp.size, tp_rank=tp.rank, tp_size=tp.size,
            layer_start=self.layer_start, layer_end=self.layer_end,
            weight_bytes=self.weight_bytes, kv_cache_bytes=self.kv_pool.nbytes,
            state_cache_bytes=self.state_pool.nbytes, load_seconds=self.load_seconds,
            max_total_tokens=self.max_total_tokens, page_size=self.page_size,
            stage_max_total_tokens=self.stage_max_total_tokens,
            kv_bytes_per_token=self.shape.kv_bytes_per_token,
            state_slots=self.state_slots, state_bytes_per_slot=self.shape.state_bytes_per_slot,
            max_running_requests=self.max_running_requests, context_length=self.context_length,
            device_memory_bytes=self.device_memory, activation_reserve_bytes=self.activation_reserve,
            tensors_read=list(self.load_report.tensors_read), bytes_read=self.load_report.bytes_read,
            step_times=list(self.step_times), peak_memory_bytes=self.peak_memory_bytes(),
        )

    def peak_memory_bytes(self) -> int:
        """Peak device memory on CUDA; the process's peak resident set size on CPU."""
        if self.device.type == "cuda":
            return torch.cuda.max_memory_allocated(self.device)
        import resource

        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024

    def report_line(self) -> str:
        mb = lambda n: f"{n / 1e6:.1f} MB"
        return (f"{self.layout.label} layers [{self.layer_start}, {self.layer_end}): weights {mb(self.weight_bytes)}, "
                f"kv cache {mb(self.kv_pool.nbytes)}, state cache {mb(self.state_pool.nbytes)}, "
                f"load {self.load_seconds:.1f} s")

    def capacity_line(self) -> str:
        own = "" if self.stage_max_total_tokens in (None, self.max_total_tokens) else \
            f" (this stage alone: {self.stage_max_total_tokens})"
        if self.capped:
            own += (f" (capped at max_running_requests {self.max_running_requests} x context_length "
                    f"{self.context_length}: all that the running requests can hold)")
        return (f"{self.layout.label} KV cache: {self.max_total_tokens} tokens{own} ({gb(self.kv_pool.nbytes)}), "
                f"linear-attention state: {self.state_slots} slots ({gb(self.state_pool.nbytes)}); "
                f"activation reserve {gb(self.activation_reserve)} of {gb(self.device_memory)}")

    def execute(self, step: StepInput) -> StepOutput | None:
        """Run one step on this stage; the last stage returns the sampled tokens."""
        self._compute_start, self._compute_end = time.time(), None
        try:
            return self._execute(step)
        finally:
            self.step_times.append((self._compute_start, self._compute_end or time.time()))

    @torch.inference_mode()
    def _execute(self, step: StepInput) -> StepOutput | None:
        pp = self.layout.pp
        self._apply_speculation(step)
        for key in step.release_keys:
            self.sampler.release(key)
            if self.drafter is not None:
                self.drafter.release(key)
            self.page_tables.pop(key, None)
            self.params.pop(key, None)
        for key, pages, fresh in zip(step.keys, step.new_pages, step.fresh_table):
            if fresh:
                self.page_tables[key] = list(pages)
            else:
                self.page_tables[key].extend(pages)
        if step.state_restores:
            self.state_pool.copy([src for src, _ in step.state_restores], [dst for _, dst in step.state_restores])
        self.state_pool.reset(step.state_resets)
        verify = [i for i in range(len(step.spans)) if step.num_drafts(i)]
        batch = ForwardBatch.build(step.spans, step.input_ids, self.device, verify=verify,
                                   verify_ledger=self.verify_ledger)
        batch.kv_pool, batch.state_pool = self.kv_pool, self.state_pool
        if self.shape.attn_layers:
            batch.attn = PagedAttentionMetadata.build([self.page_tables[key] for key in step.keys],
                                                      [s.prefix_len for s in step.spans],
                                                      [s.num_tokens for s in step.spans], self.page_size,
                                                      self.shape.decode_chunk_keys, self.device)
        hidden = residual = None
        if not pp.is_first:
            received = comm.recv_from_prev_stage(pp, batch.num_tokens, self.config.hidden_size, self.dtype, self.device)
            hidden, residual = received["hidden_states"], received["residual"]
            self._compute_start = time.time()
        hidden, residual = self.model(batch, hidden, residual)
        if step.state_snapshots:
            self.state_pool.copy([src for src, _ in step.state_snapshots], [dst for _, dst in step.state_snapshots])
        if not pp.is_last:
            self._compute_end = time.time()  # what follows waits for the next stage to take the previous step
            self.finish_sends()
            self._pending_sends = comm.send_to_next_stage({"hidden_states": hidden, "residual": residual}, pp)
            return None
        self._observe(step)
        return self._sample(step, batch, hidden)

    def _apply_speculation(self, step: StepInput) -> None:
        """Before anything reads a state slot or a page table: the linear-attention states of judged verify
        spans moved on to their accepted length (or their spans forgotten), page tables cut back to it."""
        if step.spec_commits:
            commit_verified(self.model, self.state_pool, self.verify_ledger, dict(step.spec_commits))
        self.verify_ledger.discard(step.spec_discards)
        for key, num_pages in step.page_trims:
            if key in self.page_tables:
                del self.page_tables[key][num_pages:]

    def finish_sends(self) -> None:
        """Wait until the next stage has taken what this stage sent it; raises if the next stage is gone (a gloo
        send to a dead peer fails only when waited on)."""
        for work in self._pending_sends:
            work.wait()
        self._pending_sends = []

    def _observe(self, step: StepInput) -> None:
        """Give the sampler each request's tokens of this step (its history for penalties and seeds)."""
        offset = 0
        prompt_lens = step.prompt_lens or [0] * len(step.spans)
        for i, (span, key, params, prompt_len) in enumerate(zip(step.spans, step.keys, step.params, prompt_lens)):
            if admits_request(span, bool(step.fresh_table and step.fresh_table[i])):
                if params is None:
                    raise ValueError(f"step admits request {key!r} without its sampling params")
                self.params[key] = params
                history = step.histories[i] if step.histories else None
                self.sampler.begin(key, params, prompt_len, history or (), start_position=span.prefix_len)
            self.sampler.observe(key, step.input_ids[offset:offset + span.num_tokens], span.prefix_len)
            offset += span.num_tokens

    def _sample(self, step: StepInput, batch: ForwardBatch, hidden: torch.Tensor) -> StepOutput:
        out = sample_step(self.model.compute_logits, self.sampler, self.params, step, batch, hidden)
        if self.drafter is not None:
            out.next_drafts = self.drafter.propose(batch, hidden, list(step.keys),
                                                   [self.page_tables[key] for key in step.keys],
                                                   draft_spans(step, out), self.kv_pool)
        return out


def draft_spans(step: StepInput, out: StepOutput) -> list:
    """What the NEXTN drafter needs of each span's outcome: a verify span's accepted drafts and the token after
    them, a sampled span's token, nothing for a prompt chunk that samples nothing (or a failed span)."""
    spans = []
    for i in range(len(step.spans)):
        run = out.spec_tokens[i] if out.spec_tokens else None
        if step.num_drafts(i) and run is not None:
            spans.append(DraftSpan(len(run) - 1, run[-1]))
        else:
            spans.append(DraftSpan(None, out.tokens[i]))
    return spans
