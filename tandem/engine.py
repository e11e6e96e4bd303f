"""`Engine`: the offline API. It validates the model and the partition, starts the ranks (in-process for
one rank, one process per rank otherwise), tokenizes, schedules and runs requests to completion.

Besides `generate`, its public surface is what the server uses, so that nothing outside reaches into its
parts: `model_path`, `context_length`, `tokenizer`, `prompts` (a `PromptBuilder`), `error`,
`add_request`, `check_constraint`, `grammar_future`, `abort_request`, `abort_all`, `start_background_loop`,
`loop_running`, `health()`,
`stage_report()`, `queue_stats()`, `fault_stats()`, `wait_failed()`, `model_info()`, `text_of`, `decode`,
`token_texts` and `shutdown`.

A failed world is restarted, not abandoned (`tandem.recovery.RankRecovery`): when a rank dies or raises (or
the executor fails in any other way), the step loop logs the cause, stops every rank, starts a fresh set with
the same layout (weights reloaded) and puts every unfinished request back at the front of the queue
(`Scheduler.requeue_all`), to be prefilled again from its prompt plus the tokens it already produced. Clients
only see a pause: the sampler rebuilds each request's token history from position 0 and seeded draws depend
only on (seed, token number), so outputs are the same as without the fault. After `max_rank_restarts` restarts within
`rank_restart_window` seconds, the next failure is final: `error` is set, every request is aborted with the
cause and `wait_failed()` returns it."""

from __future__ import annotations

import contextlib
import logging
import threading
from pathlib import Path
from typing import Self

from tandem.config import EngineArgs, EngineConfig
from tandem.errors import ConfigError, RankFailedError
from tandem.loader import checkpoint_weight_map
from tandem.models.registry import has_mtp_head, load_model_config
from tandem.prompts import PromptBuilder, build_result, output_text
from tandem.recovery import RankRecovery, World
from tandem.runtime.constraints.tracker import ConstraintTracker
from tandem.runtime.memory.sizing import is_hybrid
from tandem.runtime.planning.resolve import engine_partition
from tandem.runtime.sampling.params import SamplingParams
from tandem.runtime.scheduling.cache_manager import CacheManager
from tandem.runtime.scheduling.micro_batches import MicroBatchWindow
from tandem.runtime.scheduling.request import Request
from tandem.runtime.scheduling.scheduler import Scheduler
from tandem.runtime.scheduling.speculation import Speculation

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
        self.config = EngineConfig.resolve(self.args, self.model_config)
        speculative = self.config.speculative
        if speculative is not None and speculative.algorithm == "NEXTN" and not has_mtp_head(self.model_config):
            raise ConfigError(f"speculative_algorithm NEXTN / MTP needs a checkpoint with a multi-token-prediction "
                              f"head (Qwen3.5 families, mtp_num_hidden_layers > 0); {model_path} "
                              f"({self.model_config.architecture}) has none: use NGRAM")
        self.partition = engine_partition(self.config)
        checkpoint_weight_map(model_path)  # fail before starting anything if there is no checkpoint
        self.tokenizer = load_tokenizer(self.args.model_path)
        # set before the ranks start: shutdown (also from __del__ when the start fails) reads them
        self.executor = None
        self._stopping = False
        self._stop_requested = threading.Event()  # lets a restart in progress give up at shutdown
        self._loop_thread: threading.Thread | None = None
        self.executor = self._start_executor(progress)
        eos = set(self.model_config.eos_token_ids)
        if self.tokenizer is not None and self.tokenizer.eos_token_id is not None:
            eos.add(self.tokenizer.eos_token_id)
        self.eos_token_ids = sorted(eos)
        self.num_micro_batches = self.config.num_micro_batches
        self._lock = threading.RLock()
        self._wake = threading.Event()
        self.error: BaseException | None = None
        self._failed = threading.Event()
        self.recovery = RankRecovery(self.args.max_rank_restarts, self.args.rank_restart_window)
        capacity = self.executor.capacity
        self.constraints = ConstraintTracker(self.tokenizer, self.model_config.vocab_size, self.eos_token_ids)
        self.scheduler = Scheduler(self._cache_manager(capacity), capacity.context_length, self.args.chunked_prefill_size,
                                   self.eos_token_ids, self.decode if self.tokenizer is not None else None,
                                   constraints=self.constraints, speculation=self._speculation())
        # the scheduler's limits follow a restart of the ranks, and so do the prompts' checks
        self.prompts = PromptBuilder(self.tokenizer, self.model_config.vocab_size, self.scheduler.check_prompt)
        logger.info("engine capacity: %d KV tokens (the minimum over stages) in pages of %d, up to %d running "
                    "requests, context length %d, radix cache %s", capacity.max_total_tokens, capacity.page_size,
                    capacity.max_running_requests, self.scheduler.max_len,
                    "off" if self.args.disable_radix_cache else "on")

    def _speculation(self) -> Speculation | None:
        spec = self.config.speculative
        return None if spec is None else Speculation(spec.algorithm, spec.num_steps, spec.ngram_min, spec.ngram_max)

    def _cache_manager(self, capacity) -> CacheManager:
        return CacheManager(capacity.max_total_tokens, capacity.page_size, capacity.max_running_requests,
                            is_hybrid(self.model_config), radix_cache=not self.args.disable_radix_cache)

    def _start_executor(self, progress: bool):
        if self.args.world_size == 1:
            from tandem.executors.local import LocalExecutor

            return LocalExecutor(self.config, self.partition, progress)
        from tandem.executors.process import ProcessExecutor

        return ProcessExecutor(self.args, self.partition, progress, abandon=self._stop_requested)

    # ---- public API ----------------------------------------------------------------------------
    def generate(self, prompt=None, input_ids=None, sampling_params=None, return_logprob: bool = False,
                 logprob_start_len: int = -1, top_logprobs_num: int = 0) -> list[dict]:
        """Generate for one or many prompts (text or token ids). Returns one dict per prompt, or with
        sampling_params n > 1 one per completion, prompt by prompt (see `tandem.prompts.build_result`);
        `sampling_params` is one dict for all prompts or one per prompt. With `return_logprob`, logprobs of
        the output tokens, of the prompt tokens from `logprob_start_len` on (when >= 0; a request with
        max_new_tokens 0 then only scores its prompt), and the `top_logprobs_num` most likely tokens at each."""
        prompts, _ = self.prompts.from_either(prompt, input_ids, "prompt", "input_ids")
        if isinstance(sampling_params, list):
            if len(sampling_params) != len(prompts):
                raise ConfigError(f"got {len(sampling_params)} sampling_params for {len(prompts)} prompts")
            params = [SamplingParams.from_dict(p) for p in sampling_params]
        else:
            params = [SamplingParams.from_dict(sampling_params)] * len(prompts)
        if not isinstance(top_logprobs_num, int) or isinstance(top_logprobs_num, bool) or top_logprobs_num < 0:
            raise ConfigError(f"top_logprobs_num must be a non-negative integer, got {top_logprobs_num!r}")
        for p in params:
            self.check_constraint(p)
        reqs = [Request(ids, p.for_choice(j), input_logprobs_wanted=return_logprob and logprob_start_len >= 0,
                        top_logprobs_num=top_logprobs_num if return_logprob else 0,
                        output_logprobs_wanted=return_logprob)
                for ids, p in zip(prompts, params) for j in range(p.n)]
        self._check(reqs)  # all of them before any is queued
        if self._loop_thread is not None:
            done = [threading.Event() for _ in reqs]
            for req, event in zip(reqs, done):
                req.on_update = lambda r, e=event: r.finished and e.set()
                self._queue(req)
            for event in done:
                event.wait()
            self._raise_if_failed()
        else:
            self._run_to_completion(reqs)
        decode = self.decode if self.tokenizer is not None else None
        return [build_result(req, decode, return_logprob, logprob_start_len) for req in reqs]

    def run_requests(self, reqs: list[Request]) -> None:
        """Run requests to completion on the calling thread (no background loop)."""
        self._check(reqs)
        self._run_to_completion(reqs)

    def _check(self, reqs: list[Request]) -> None:
        """The one check of each request's sampling params against the vocabulary (its prompt is checked
        when it is built, by `PromptBuilder`, and when it is queued, by the scheduler)."""
        for req in reqs:
            req.params.validate_vocab(self.model_config.vocab_size)

    def _run_to_completion(self, reqs: list[Request]) -> None:
        if self._loop_thread is not None:
            raise RuntimeError("the background loop is running: use add_request")
        self._raise_if_failed()
        for req in reqs:
            self.scheduler.add(req)
        self._run_steps(stop_when_idle=True)

    def check_constraint(self, params: SamplingParams) -> None:
        """Compile the grammar of `params` (json_schema, regex or ebnf), if any, waiting for it (compiles are
        cached by grammar): ConfigError with the compiler's message if it does not compile. A request queued
        without this check waits for its grammar in the queue, and ends with that error instead."""
        self.constraints.compile(params)

    def grammar_future(self, key: tuple[str, str]):
        """A concurrent.futures.Future of the compile of constraint `key` (`SamplingParams.constraint`), for
        callers that must not block (the server awaits it); its exception is a ConfigError."""
        return self.constraints.grammars.future(key)

    # ---- the step loop -------------------------------------------------------------------------
    def add_request(self, req: Request) -> None:
        """Queue a request (thread-safe). `req.on_update(req)` runs on the loop thread after each step
        that gives it a token, and when it finishes."""
        self._check([req])
        self._queue(req)

    def _queue(self, req: Request) -> None:
        self._raise_if_failed()
        with self._lock:
            self.scheduler.add(req)
        if req.finished and req.on_update:
            req.on_update(req)
        self._wake.set()

    def abort_request(self, rid) -> None:
        """Finish the request `rid` with reason abort (thread-safe; nothing happens if it already finished)."""
        with self._lock:
            for req in self.scheduler.queues.unfinished():
                if req.rid == rid:
                    self.scheduler.abort(rid)
                    self._notify([req])

    def abort_all(self, message: str) -> int:
        """Finish every unfinished request with {"type": "abort", "message": message} (thread-safe); returns
        how many there were. The server uses it to end open requests at shutdown."""
        with self._lock:
            pending = self.scheduler.queues.unfinished()
            for req in pending:
                self.scheduler.abort(req.rid, message)
        self._notify(pending)
        return len(pending)

    def start_background_loop(self) -> None:
        """Run steps on a daemon thread until shutdown (used by the server)."""
        if self._loop_thread is None:
            self._loop_thread = threading.Thread(target=self._loop_forever, name="tandem-steps", daemon=True)
            self._loop_thread.start()

    @property
    def loop_running(self) -> bool:
        return self._loop_thread is not None

    @property
    def model_path(self) -> str:
        return self.args.model_path

    @property
    def context_length(self) -> int:
        """Tokens per request (prompt + output), as agreed by every stage's cache."""
        return self.scheduler.max_len

    def model_info(self) -> dict:
        return {"model_path": self.model_path, "architecture": self.model_config.architecture,
                "tp_size": self.args.tp_size, "pp_size": self.args.pp_size, "context_length": self.context_length}

    def health(self) -> tuple[bool, str]:
        """(True, "") while the engine can run requests; else (False, why): its loop gave up after repeated
        failures, it is shut down, its ranks are being restarted, or a rank process has exited (seen at
        once, not at the next step). Requests added while the ranks restart wait for them."""
        if self.error is not None:
            return False, str(self.error)
        if self.executor is None:
            return False, "the engine is shut down"
        recovering = self.recovery.recovering
        if recovering is not None:
            return False, f"restarting the ranks after a failure: {recovering}"
        dead = self.executor.dead_ranks()
        return (False, "; ".join(dead)) if dead else (True, "")

    def fault_stats(self) -> dict:
        """{"rank_failures", "restarts", "recovering"} (`RankRecovery.stats`)."""
        return self.recovery.stats()

    def wait_failed(self, timeout: float | None = None) -> BaseException | None:
        """Block until the engine has given up (returns the error) or `timeout` passed (returns None)."""
        self._failed.wait(timeout)
        return self.error

    def queue_stats(self) -> tuple[list[int], int]:
        """(tokens cached per running request, number of waiting requests), read consistently."""
        with self._lock:
            return [req.num_cached for req in self.scheduler.running], len(self.scheduler.waiting)

    def _loop_forever(self) -> None:
        try:
            self._run_steps(stop_when_idle=False)
        except BaseException as exc:
            self.error = exc
            logger.error("engine loop stopped: %s", exc)
            self.abort_all(f"the engine failed: {exc}")
            self._failed.set()

    def _run_steps(self, stop_when_idle: bool) -> None:
        """Keep up to `num_micro_batches` steps in flight (`MicroBatchWindow`): while stage k+1 works on one
        micro-batch, stage k already works on the next. A failure of the executor (a rank died or raised)
        restarts the ranks and requeues every request (`_recover`). After a step's results are processed the
        next step is submitted before the requests' callbacks run, so the first stage does not wait for them."""
        window = MicroBatchWindow(self.scheduler, self.num_micro_batches)
        while not self._stopping:
            try:
                self._fill(window)
                if not len(window):
                    if stop_when_idle:
                        return
                    self.executor.check_alive()  # a rank that dies while idle is replaced at once
                    self._wake.wait(0.05)
                    self._wake.clear()
                    continue
                landed = window.collect(self.executor)
            except Exception as exc:
                if self._failed_world(exc, window):
                    return
                continue
            with self._lock:
                updated = self.scheduler.process(*landed)
            try:
                self._fill(window)
            except Exception as exc:
                if self._failed_world(exc, window):
                    return
            self._notify(updated)

    def _fill(self, window: MicroBatchWindow) -> None:
        with self._lock:
            window.fill(self.executor)

    def _failed_world(self, exc: Exception, window: MicroBatchWindow) -> bool:
        """Recover from an executor failure (True when the engine is stopping instead)."""
        if self._stopping:
            return True
        window.drop()  # those steps died with the ranks; their requests are requeued
        self._recover(exc)
        return False

    def _notify(self, reqs: list[Request]) -> None:
        """Run the requests' `on_update` callbacks; a failing callback is logged and does not stop the loop."""
        for req in reqs:
            if req.on_update:
                try:
                    req.on_update(req)
                except Exception:
                    logger.exception("on_update of request %s failed", req.rid)

    def _recover(self, failure: Exception) -> None:
        """Replace the failed world (`RankRecovery`); a final failure becomes the engine's `error`."""
        try:
            self.recovery.recover(failure, World(
                requeue=self._requeue_all, stop_failed=lambda: self.executor.shutdown(graceful=False),
                start=lambda: self._start_executor(progress=False), install=self._install_executor,
                stopping=lambda: self._stopping))
        except RankFailedError as exc:
            self.error = exc
            raise

    def _requeue_all(self) -> list[Request]:
        with self._lock:
            return self.scheduler.requeue_all()

    def _install_executor(self, executor) -> None:
        with self._lock:
            self.executor = executor
            # the fresh pools may be sized differently (memory-derived sizing): nothing is cached or running
            # now, so the scheduler simply takes the new capacity
            self.scheduler.use_cache(self._cache_manager(executor.capacity), executor.capacity.context_length)

    def flush_cache(self) -> bool:
        """Empty the radix prefix cache (thread-safe): True; False, with nothing done, while any request runs
        or waits (their pages are in use). Nothing holds a page when no request does, so every page is free."""
        with self._lock:
            if self.scheduler.has_work:
                return False
            self.scheduler.cache.reset([])
        return True

    def cache_stats(self) -> dict:
        """Cache use and counters (pages, running/waiting requests, preemptions, prefix-cache hits), read
        consistently."""
        with self._lock:
            return self.scheduler.stats()

    def _raise_if_failed(self) -> None:
        if self.error is not None:
            raise self.error

    def stage_report(self) -> list[dict]:
        """Every rank's report: layers, cache sizes, memory, `step_times`."""
        return [report.to_dict() for report in self.executor.reports()]

    def decode(self, ids: list[int]) -> str:
        """The text of token ids ("" for a model without a tokenizer)."""
        return self.tokenizer.decode(ids, skip_special_tokens=True) if self.tokenizer is not None else ""

    def token_texts(self, ids: list[int]) -> list[str]:
        """Each token's own text, special tokens included (logprob listings); "token_id:N" without a tokenizer."""
        if self.tokenizer is None:
            return [f"token_id:{t}" for t in ids]
        return self.tokenizer.batch_decode([[t] for t in ids], skip_special_tokens=False)

    def text_of(self, req: Request) -> str:
        """A request's output text, cut before a matched stop string."""
        return output_text(req.finish_reason, req.output_ids[:], self.decode)

    def shutdown(self) -> None:
        self._stopping = True
        if getattr(self, "constraints", None) is not None:
            self.constraints.shutdown()
        self._stop_requested.set()
        if self._loop_thread is not None:
            self._wake.set()
            self._loop_thread.join(timeout=10)
            self._loop_thread = None
        if self.executor is not None:
            self.executor.shutdown()
            self.executor = None

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc) -> None:
        self.shutdown()

    def __del__(self) -> None:
        with contextlib.suppress(Exception):  # interpreter shutdown may have torn down what shutdown uses
            self.shutdown()


def run_worker_node(**engine_kwargs) -> int:
    """Run the ranks of a node other than node 0 (`--node-rank` > 0) until the driver stops them."""
    from tandem.executors.process import run_node

    args = EngineArgs(**engine_kwargs)
    if args.node_rank == 0:
        raise ConfigError("node 0 runs the driver: use Engine or `tandem serve` there")
    if not args.dist_init_addr:
        raise ConfigError("--dist-init-addr host:port of node 0 is required on nodes other than 0")
    return run_node(args, engine_partition(EngineConfig.resolve(args, load_model_config(args.model_path))))
