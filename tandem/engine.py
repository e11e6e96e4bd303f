"""`Engine`: the offline API. It validates the model and the partition, starts the ranks (in-process for
one rank, one process per rank otherwise), tokenizes, schedules and runs requests to completion."""

from __future__ import annotations

import logging
import threading
from collections import deque
from pathlib import Path

from tandem.config import EngineArgs
from tandem.errors import ConfigError
from tandem.loader import checkpoint_weight_map
from tandem.models.registry import load_model_config
from tandem.runtime.cache_manager import CacheManager
from tandem.runtime.geometry import is_hybrid
from tandem.runtime.planner import engine_partition
from tandem.runtime.sampler import SamplingParams
from tandem.runtime.scheduler import Request, Scheduler

logger = logging.getLogger("tandem")


def load_tokenizer(model_path: str):
    path = Path(model_path)
    if not any((path / name).exists() for name in ("tokenizer.json", "tokenizer_config.json", "tokenizer.model")):
        return None
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(path))


class Engine:
    def __init__(self, model_path, tp_size: int = 1, pp_size: int = 1, dtype: str = "auto", device: str = "cpu",
                 pp_layer_partition=None, progress: bool = True, **kwargs):
        self.args = EngineArgs(model_path=str(model_path), tp_size=tp_size, pp_size=pp_size, dtype=dtype,
                               device=device, pp_layer_partition=pp_layer_partition, **kwargs)
        self.model_config = load_model_config(model_path)
        self.partition = engine_partition(self.model_config, self.args)
        checkpoint_weight_map(model_path)  # fail before starting anything if there is no checkpoint
        self.tokenizer = load_tokenizer(self.args.model_path)
        self.executor = None
        self._stopping = True
        self._loop_thread = None
        if self.args.world_size == 1:
            from tandem.executors.local import LocalExecutor

            self.executor = LocalExecutor(self.args, self.model_config, self.partition, progress)
        else:
            from tandem.executors.process import ProcessExecutor

            self.executor = ProcessExecutor(self.args, self.model_config, self.partition, progress)
        eos = set(self.model_config.eos_token_ids)
        if self.tokenizer is not None and self.tokenizer.eos_token_id is not None:
            eos.add(self.tokenizer.eos_token_id)
        self.eos_token_ids = sorted(eos)
        self.num_micro_batches = self.args.num_micro_batches or self.args.pp_size
        self._lock = threading.RLock()
        self._wake = threading.Event()
        self._loop_thread: threading.Thread | None = None
        self._stopping = False
        self.error: BaseException | None = None
        capacity = self.executor.capacity
        cache = CacheManager(capacity.max_total_tokens, capacity.page_size, capacity.max_running_requests,
                             is_hybrid(self.model_config), radix_cache=not self.args.disable_radix_cache)
        self.scheduler = Scheduler(cache, capacity.context_length, self.args.chunked_prefill_size,
                                   self.eos_token_ids, self.decode if self.tokenizer is not None else None)
        logger.info("engine capacity: %d KV tokens (the minimum over stages) in pages of %d, up to %d running "
                    "requests, context length %d, radix cache %s", capacity.max_total_tokens, capacity.page_size,
                    capacity.max_running_requests, self.scheduler.max_len,
                    "off" if self.args.disable_radix_cache else "on")

    # ---- public API ----------------------------------------------------------------------------
    def generate(self, prompt=None, input_ids=None, sampling_params=None, return_logprob: bool = False,
                 logprob_start_len: int = -1) -> list[dict]:
        """Generate for one or many prompts (text or token ids). Returns one dict per prompt."""
        prompts = self._prompt_ids(prompt, input_ids)
        if isinstance(sampling_params, list):
            if len(sampling_params) != len(prompts):
                raise ConfigError(f"got {len(sampling_params)} sampling_params for {len(prompts)} prompts")
            params = [SamplingParams.from_dict(p) for p in sampling_params]
        else:
            params = [SamplingParams.from_dict(sampling_params)] * len(prompts)
        reqs = [Request(ids, p, input_logprobs_wanted=return_logprob and logprob_start_len >= 0)
                for ids, p in zip(prompts, params)]
        for req in reqs:
            self.scheduler.validate(req)
        if self._loop_thread is not None:
            done = [threading.Event() for _ in reqs]
            for req, event in zip(reqs, done):
                req.on_update = lambda r, e=event: r.finished and e.set()
                self.add_request(req)
            for event in done:
                event.wait()
            self._raise_if_failed()
        else:
            self.run_requests(reqs)
        return [self._result(req, return_logprob, logprob_start_len) for req in reqs]

    def run_requests(self, reqs: list[Request]) -> None:
        """Run requests to completion on the calling thread (no background loop)."""
        if self._loop_thread is not None:
            raise RuntimeError("the background loop is running: use add_request")
        for req in reqs:
            self.scheduler.add(req)
        self._run_steps(stop_when_idle=True)

    # ---- the step loop -------------------------------------------------------------------------
    def add_request(self, req: Request) -> None:
        """Queue a request (thread-safe). `req.on_update(req)` runs on the loop thread after each step
        that gives it a token, and when it finishes."""
        self._raise_if_failed()
        with self._lock:
            self.scheduler.add(req)
        if req.finished and req.on_update:
            req.on_update(req)
        self._wake.set()

    def abort_request(self, rid) -> None:
        with self._lock:
            for req in list(self.scheduler.waiting) + self.scheduler.running:
                if req.rid == rid:
                    self.scheduler.abort(rid)
                    if req.on_update:
                        req.on_update(req)

    def start_background_loop(self) -> None:
        """Run steps on a daemon thread until shutdown (used by the server)."""
        if self._loop_thread is None:
            self._loop_thread = threading.Thread(target=self._loop_forever, name="tandem-steps", daemon=True)
            self._loop_thread.start()

    @property
    def loop_running(self) -> bool:
        return self._loop_thread is not None

    def queue_stats(self) -> tuple[list[int], int]:
        """(tokens cached per running request, number of waiting requests), read consistently."""
        with self._lock:
            return [req.num_cached for req in self.scheduler.running], len(self.scheduler.waiting)

    def _loop_forever(self) -> None:
        try:
            self._run_steps(stop_when_idle=False)
        except BaseException as exc:  # a rank failed: fail every request, remember why
            self.error = exc
            logger.error("engine loop stopped: %s", exc)
            with self._lock:
                pending = list(self.scheduler.waiting) + self.scheduler.running
                for req in pending:
                    self.scheduler.abort(req.rid)
            for req in pending:
                if req.on_update:
                    req.on_update(req)

    def _run_steps(self, stop_when_idle: bool) -> None:
        """Keep up to `num_micro_batches` steps in flight: while stage k+1 works on one micro-batch,
        stage k already works on the next. A request is never in two in-flight steps."""
        in_flight: deque = deque()
        while not self._stopping:
            with self._lock:
                busy = {req.rid for _, _, reqs in in_flight for req in reqs}
                while len(in_flight) < self.num_micro_batches:
                    planned = self.scheduler.next_step(busy, self.num_micro_batches)
                    if planned is None:
                        break
                    step, reqs = planned
                    in_flight.append((self.executor.submit(step), step, reqs))
                    busy.update(req.rid for req in reqs)
            if not in_flight:
                if stop_when_idle:
                    return
                self._wake.wait(0.05)
                self._wake.clear()
                continue
            step_id, step, reqs = in_flight.popleft()
            out = self.executor.collect(step_id)
            with self._lock:
                self.scheduler.process(step, reqs, out)
            for req, token in zip(reqs, out.tokens):
                if req.on_update and (token is not None or req.finished):
                    req.on_update(req)

    def cache_stats(self) -> dict:
        """Cache use and counters (pages, running/waiting requests, preemptions, prefix-cache hits), read
        consistently."""
        with self._lock:
            return self.scheduler.stats()

    def _raise_if_failed(self) -> None:
        if self.error is not None:
            raise self.error

    def stage_report(self) -> list[dict]:
        return self.executor.reports()

    def decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=True)

    def shutdown(self) -> None:
        self._stopping = True
        if self._loop_thread is not None:
            self._wake.set()
            self._loop_thread.join(timeout=10)
            self._loop_thread = None
        if self.executor is not None:
            self.executor.shutdown()
            self.executor = None

    def __enter__(self) -> "Engine":
        return self

    def __exit__(self, *exc) -> None:
        self.shutdown()

    def __del__(self) -> None:
        try:
            self.shutdown()
        except Exception:
            pass

    # ---- helpers -------------------------------------------------------------------------------
    def _prompt_ids(self, prompt, input_ids) -> list[list[int]]:
        if (prompt is None) == (input_ids is None):
            raise ConfigError("pass exactly one of prompt= or input_ids=")
        if input_ids is not None:
            if input_ids and isinstance(input_ids[0], int):
                input_ids = [input_ids]
            vocab = self.model_config.vocab_size
            for ids in input_ids:
                bad = [t for t in ids if not isinstance(t, int) or isinstance(t, bool) or not 0 <= t < vocab]
                if bad:
                    raise ConfigError(f"input_ids contain {bad[0]!r}, which is not a token id in [0, {vocab})")
            return [list(ids) for ids in input_ids]
        if self.tokenizer is None:
            raise ConfigError(f"{self.args.model_path} has no tokenizer: pass input_ids instead of prompt")
        texts = [prompt] if isinstance(prompt, str) else list(prompt)
        return [self.tokenizer.encode(text) for text in texts]

    def _result(self, req: Request, return_logprob: bool, logprob_start_len: int) -> dict:
        meta = {"prompt_tokens": len(req.prompt_ids), "completion_tokens": len(req.output_ids),
                "finish_reason": req.finish_reason, "cached_tokens": req.cached_tokens}
        if return_logprob:
            meta["output_token_logprobs"] = list(zip(req.output_logprobs, req.output_ids))
            if logprob_start_len >= 0:
                start = max(logprob_start_len, 1)
                meta["input_token_logprobs"] = list(zip(req.input_logprobs[start - 1:], req.prompt_ids[start:]))
        out = {"output_ids": list(req.output_ids), "meta_info": meta}
        if self.tokenizer is not None:
            out["text"] = self.text_of(req)
        return out

    def text_of(self, req: Request) -> str:
        text = self.decode(req.output_ids)
        reason = req.finish_reason or {}
        if isinstance(reason.get("matched"), str):
            text = text[: text.find(reason["matched"])]
        return text


def run_worker_node(**engine_kwargs) -> int:
    """Run the ranks of a node other than node 0 (`--node-rank` > 0) until the driver stops them."""
    from tandem.executors.process import run_node

    args = EngineArgs(**engine_kwargs)
    if args.node_rank == 0:
        raise ConfigError("node 0 runs the driver: use Engine or `tandem serve` there")
    if not args.dist_init_addr:
        raise ConfigError("--dist-init-addr host:port of node 0 is required on nodes other than 0")
    return run_node(args, engine_partition(load_model_config(args.model_path), args))
