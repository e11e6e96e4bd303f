"""One rank's model runner: builds this stage's model, loads its weights, allocates its caches and runs
steps. Non-first stages receive `{hidden_states, residual}` from the previous stage; non-last stages send
theirs on; the last stage computes logits and samples."""

from __future__ import annotations

import logging
import time
from collections import deque
from dataclasses import dataclass, field

import torch

from tandem.config import EngineArgs, ModelConfig
from tandem.loader import load_weights
from tandem.models.registry import get_model_class
from tandem.parallel import comm
from tandem.parallel.state import get_pp, get_tp
from tandem.runtime.batch import ForwardBatch, Span
from tandem.runtime.cache import GDNStatePool, KVCachePool
from tandem.runtime.sampler import Sampler, SamplingParams

logger = logging.getLogger("tandem")


@dataclass
class StepInput:
    spans: list[Span]
    input_ids: list[int]  # packed tokens of all spans
    sample: list[bool]  # per span: sample a token after its last token
    params: list[SamplingParams]  # per span
    keys: list  # per span: request id (for per-request generators)
    reset_slots: list[int] = field(default_factory=list)  # slots newly given to requests
    release_keys: list = field(default_factory=list)  # finished requests
    input_logprobs: list[bool] | None = None  # per span: also return logprobs of its prompt tokens
    next_ids: list[int | None] | None = None  # per span: the prompt token after the span, if any


@dataclass
class StepOutput:
    tokens: list[int | None]  # per span (None where not sampled)
    logprobs: list[float | None]
    input_logprobs: list[list[float] | None] | None = None


def stage_label() -> str:
    pp, tp = get_pp(), get_tp()
    return f"[pp {pp.rank}/{pp.size} tp {tp.rank}/{tp.size}]"


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


def build_model(model_config: ModelConfig, dtype: torch.dtype, device: str):
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device):
            return get_model_class(model_config.architecture)(model_config)
    finally:
        torch.set_default_dtype(previous)


class ModelRunner:
    def __init__(self, args: EngineArgs, model_config: ModelConfig, progress: bool = True):
        self.args, self.config = args, model_config
        self.dtype = args.resolve_dtype(model_config)
        self.device = torch.device(args.device if args.device == "cpu" else f"cuda:{torch.cuda.current_device()}")
        start = time.perf_counter()
        self.max_len = args.context_length or min(model_config.max_position_embeddings, 4096)
        self.num_slots = args.max_running_requests
        self.model = build_model(model_config, self.dtype, self.device)  # parameters not yet touched
        self.layer_start, self.layer_end = self.model.layer_range
        layout = self._cache_layout()
        self._check_memory(layout)
        self.load_report = load_weights(self.model, args.model_path, stage_label(), progress=progress)
        self._allocate_caches(layout)
        self.load_seconds = time.perf_counter() - start
        self.sampler = Sampler()
        self._pending_sends: list = []
        # wall-clock (start, end) of each step's computation, excluding the wait for the previous stage
        self.step_times: deque[tuple[float, float]] = deque(maxlen=4096)
        self._compute_start = 0.0
        logger.info(self.report_line())

    def _cache_layout(self) -> dict:
        """What the stage's caches hold: its own full-attention and Gated-DeltaNet layers only."""
        cfg = self.config
        local = range(self.layer_start, self.layer_end)
        attn = [i for i in local if cfg.layer_types[i] != "linear_attention"]
        gdn = [i for i in local if cfg.layer_types[i] == "linear_attention"]
        first_gdn = self.model.model.layers[gdn[0]].linear_attn if gdn else None
        return {
            "attn_layers": attn, "gdn_layers": gdn,
            "kv_heads": self.model.model.layers[attn[0]].self_attn.num_kv_heads if attn else 0,
            "conv_channels": first_gdn.conv_channels if first_gdn else 0,
            "v_heads": first_gdn.num_v_heads if first_gdn else 0,
        }

    def _check_memory(self, layout: dict) -> None:
        """Refuse to start when weights + caches cannot fit, instead of failing mid-load."""
        cfg = self.config
        need_cache = len(layout["attn_layers"]) * KVCachePool.layer_bytes(
            self.num_slots, self.max_len, layout["kv_heads"], cfg.head_dim, self.dtype)
        need_cache += len(layout["gdn_layers"]) * GDNStatePool.layer_bytes(
            self.num_slots, layout["conv_channels"], cfg.linear_conv_kernel_dim, layout["v_heads"],
            cfg.linear_key_head_dim, cfg.linear_value_head_dim, self.dtype)
        need_weights = self.weight_bytes
        available = available_memory_bytes(self.device)
        if need_weights + need_cache > available:
            gb = lambda n: f"{n / 1e9:.2f} GB"
            raise MemoryError(
                f"not enough memory on {stage_label()}: weights {gb(need_weights)} + caches {gb(need_cache)} "
                f"({self.num_slots} requests x {self.max_len} tokens) exceed the {gb(available)} available; "
                f"lower --max-running-requests or --context-length, or use more stages / TP ranks")

    def _allocate_caches(self, layout: dict) -> None:
        cfg = self.config
        self.kv_cache = KVCachePool(layout["attn_layers"], self.num_slots, self.max_len, layout["kv_heads"],
                                    cfg.head_dim, self.dtype, self.device)
        self.state_cache = GDNStatePool(
            layout["gdn_layers"], self.num_slots, layout["conv_channels"], cfg.linear_conv_kernel_dim,
            layout["v_heads"], cfg.linear_key_head_dim, cfg.linear_value_head_dim, self.dtype, self.device)

    @property
    def weight_bytes(self) -> int:
        return sum(p.numel() * p.element_size() for p in self.model.parameters())

    def report(self) -> dict:
        pp, tp = get_pp(), get_tp()
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
        return (f"{stage_label()} layers [{self.layer_start}, {self.layer_end}): weights {mb(self.weight_bytes)}, "
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
        pp = get_pp()
        for key in step.release_keys:
            self.sampler.release(key)
        self.state_cache.reset(step.reset_slots)
        batch = ForwardBatch.build(step.spans, step.input_ids, self.device)
        batch.kv_cache, batch.state_cache = self.kv_cache, self.state_cache
        hidden = residual = None
        if not pp.is_first:
            received = comm.recv_from_prev_stage(batch.num_tokens, self.config.hidden_size, self.dtype, self.device)
            hidden, residual = received["hidden_states"], received["residual"]
            self._compute_start = time.time()
        hidden, residual = self.model(batch, hidden, residual)
        if not pp.is_last:
            for work in self._pending_sends:
                work.wait()
            self._pending_sends = comm.send_to_next_stage({"hidden_states": hidden, "residual": residual})
            return None
        return self._sample(step, batch, hidden)

    def _sample(self, step: StepInput, batch: ForwardBatch, hidden: torch.Tensor) -> StepOutput:
        last_rows = batch.last_token_indices()
        sampled = [i for i, s in enumerate(step.sample) if s]
        tokens: list = [None] * len(step.spans)
        logprobs: list = [None] * len(step.spans)
        if sampled:
            logits = self.model.compute_logits(hidden[last_rows[sampled]])
            ids, lps = self.sampler.sample(logits, [step.params[i] for i in sampled], [step.keys[i] for i in sampled])
            for i, token, lp in zip(sampled, ids, lps):
                tokens[i], logprobs[i] = token, lp
        input_lps = None
        if step.input_logprobs and any(step.input_logprobs):
            input_lps = [None] * len(step.spans)
            ids = batch.input_ids
            for i, wanted in enumerate(step.input_logprobs):
                if not wanted:
                    continue
                offset, n = batch.offsets[i], step.spans[i].num_tokens
                targets = ids[offset + 1:offset + n].tolist()
                if step.next_ids and step.next_ids[i] is not None:
                    targets.append(step.next_ids[i])
                if not targets:
                    input_lps[i] = []
                    continue
                logp = torch.log_softmax(self.model.compute_logits(hidden[offset:offset + len(targets)]), dim=-1)
                input_lps[i] = logp.gather(1, torch.tensor(targets, device=logp.device)[:, None]).squeeze(1).tolist()
        return StepOutput(tokens, logprobs, input_lps)
