"""A stage's activation reserve: the memory its largest forward step needs beyond weights and caches,
measured by dry runs before the cache pools are sized (only when the pool is sized from memory).

Two dry runs on small scratch pools, without talking to other stages (the TP ranks of a stage run them
together, so their collectives match):
- the largest prefill chunk: `chunked_prefill_size` tokens of one request at the end of a context of
  `context_length` tokens (its attention reads the whole context), and on the last stage the logits and
  log-softmax of every row (what prompt logprobs compute);
- the largest decode batch: one token for each of `max_running_requests` requests, and on the last stage the
  sampler over their logits. With speculative decoding each request's step is a verify span of 1 + k tokens
  instead: the Gated-DeltaNet inputs and final states the stage's verify ledger holds until the commit are
  kept alive through the run (one ledger entry per request), the last stage judges every position (sampled
  acceptance, logprobs) and, with NEXTN, runs the MTP drafter over the spans (the head's pass and its chain).

Measured: on CUDA, the peak of torch's allocator over its level before the run; on CPU, the peak of the bytes
held by tensors created during the run (`LiveTensorBytes` follows every new tensor storage until it is
freed). A kernel's internal scratch memory is not a tensor and is not seen on CPU. Decode attention gathers
keys and values into a workspace the KV pool keeps, in chunks bounded by `DEFAULT_WORKSPACE_BYTES`, which is
added to the reserve (the dry runs' short contexts hardly use it)."""

from __future__ import annotations

import weakref

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

from tandem.layers.forward_batch import ForwardBatch
from tandem.layers.gdn_verify import VerifyLedger
from tandem.layers.paged_attention import DEFAULT_WORKSPACE_BYTES
from tandem.layers.paged_metadata import PagedAttentionMetadata
from tandem.layers.span import Span
from tandem.runtime.mtp_drafter import DraftSpan, MTPDrafter
from tandem.runtime.sampling.sampler import Sampler, SamplingParams
from tandem.runtime.sampling.verify_step import judge_spans


class LiveTensorBytes(TorchDispatchMode):
    """Bytes of tensor storages created inside the mode and still alive: `live` now, `peak` at most. A storage
    an op returns that none of its inputs has is new; it is counted until it is freed (views keep it alive)."""

    def __init__(self):
        super().__init__()
        self.live = self.peak = 0
        self._tracked: set[int] = set()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        inputs = None
        for t in tree_leaves(out):
            if not isinstance(t, torch.Tensor):
                continue
            storage = t.untyped_storage()
            key = id(storage)
            if key in self._tracked or storage.nbytes() == 0:
                continue
            if inputs is None:
                inputs = {a.untyped_storage().data_ptr() for a in tree_leaves((args, kwargs))
                          if isinstance(a, torch.Tensor)}
            if storage.data_ptr() in inputs:
                continue  # a view of, or an in-place result in, an input
            self._tracked.add(key)
            self.live += storage.nbytes()
            self.peak = max(self.peak, self.live)
            weakref.finalize(storage, self._freed, key, storage.nbytes())
        return out

    def _freed(self, key: int, nbytes: int) -> None:
        self._tracked.discard(key)
        self.live -= nbytes


def _measure(run, device: torch.device) -> int:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        base = torch.cuda.memory_allocated(device)
        run()
        torch.cuda.synchronize(device)
        return torch.cuda.max_memory_allocated(device) - base
    with LiveTensorBytes() as tracker:
        run()
    return tracker.peak


class _HeldLedger(VerifyLedger):
    """A verify ledger that keeps every record (the dry run's spans share one state slot)."""

    def __init__(self):
        super().__init__()
        self.held: list = []

    def record(self, layer_idx: int, slot: int, inputs) -> None:
        self.held.append(inputs)


def measure_activation_reserve(runner, context_length: int, max_running_requests: int, num_drafts: int = 0,
                               mtp_drafts: bool = False) -> int:
    """Bytes to keep free for activations on `runner`'s stage (a `ModelRunner` with weights loaded and no
    cache pools yet). `num_drafts`: speculative decoding's drafts per verify span (0: none); `mtp_drafts`:
    the last stage drafts them with the MTP head (NEXTN)."""
    config, pp, device, dtype = runner.config, runner.layout.pp, runner.device, runner.dtype
    shape, page_size = runner.shape, runner.page_size
    chunk = runner.args.chunked_prefill_size
    context = max(chunk, context_length)
    generator = torch.Generator(device="cpu").manual_seed(0)

    def inputs(num_tokens: int):
        if pp.is_first:
            ids = torch.randint(0, config.vocab_size, (num_tokens,), generator=generator)
            return ids, None, None
        hidden = torch.randn(num_tokens, config.hidden_size, generator=generator).to(device, dtype)
        return torch.zeros(num_tokens, dtype=torch.long), hidden, hidden.clone()

    def forward(spans: list[Span], page_tables: list[list[int]], kv, state, last_rows: str) -> None:
        ids, hidden, residual = inputs(sum(s.num_tokens for s in spans))
        verify = range(len(spans)) if last_rows == "verify" else ()
        ledger = _HeldLedger() if verify else None
        batch = ForwardBatch.build(spans, ids, device, verify=verify, verify_ledger=ledger)
        batch.kv_pool, batch.state_pool = kv, state
        if shape.attn_layers:
            batch.attn = PagedAttentionMetadata.build(page_tables, [s.prefix_len for s in spans],
                                                      [s.num_tokens for s in spans], page_size,
                                                      shape.decode_chunk_keys, device)
        out, _ = runner.model(batch, hidden, residual)
        if pp.is_last:
            if last_rows == "verify":
                judge_verify_rows(out, batch, page_tables, kv)
            elif last_rows == "all":
                torch.log_softmax(runner.model.compute_logits(out), dim=-1)
            else:
                logits = runner.model.compute_logits(out)
                sampler, greedy = Sampler(), SamplingParams(temperature=0.0)
                for key in range(len(spans)):
                    sampler.begin(key, greedy, prompt_len=1)
                sampler.sample(logits, [greedy] * len(spans), list(range(len(spans))))

    def judge_verify_rows(out: torch.Tensor, batch: ForwardBatch, page_tables: list[list[int]], kv) -> None:
        n = len(batch.spans)
        sampled = SamplingParams(temperature=1.0)
        judge_spans(runner.model.compute_logits(out), [[0] * num_drafts] * n, [sampled] * n, [0] * n, [True] * n,
                    lambda device: torch.Generator(device=device))
        if mtp_drafts:
            drafter = MTPDrafter(runner.model, num_drafts, page_size, shape.decode_chunk_keys, device)
            drafter.propose(batch, out, list(range(n)), page_tables, [DraftSpan(num_drafts, 0)] * n, kv)

    def dry_runs() -> tuple[int, int]:
        pages = -(-context // page_size)
        kv, state = shape.allocate(pages * page_size, page_size, 1, device)  # scratch pools, freed on return
        prefill = [Span(0, context - chunk, chunk)]
        prefill_peak = _measure(lambda: forward(prefill, [list(range(pages))], kv, state, "all"), device)
        # a verify span at position 1 and the MTP chain's k - 1 positions after it, in pages of their own
        span_pages = list(range(min(pages, -(-(2 + 2 * num_drafts) // page_size))))
        decode = [Span(0, 1, 1 + num_drafts) for _ in range(max_running_requests)]
        rows = "verify" if num_drafts else "sampled"
        decode_peak = _measure(lambda: forward(decode, [span_pages] * len(decode), kv, state, rows), device)
        return prefill_peak, decode_peak

    with torch.inference_mode():
        prefill_peak, decode_peak = dry_runs()
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return max(prefill_peak, decode_peak + DEFAULT_WORKSPACE_BYTES)
