"""The engine survives failures: a request whose logits turn NaN ends alone; a rank that raises or is killed
is replaced and every unfinished request finishes with exactly the tokens of a fault-free run (greedy,
seeded sampling, penalties, prompt logprobs); restarts that keep failing stop the engine with the cause.

References are the same engine's fault-free results for the same requests."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import threading

import pytest
import torch

from support.processes import rank_processes
from tandem.engine import Engine
from tandem.runtime.sampling.sampler import RAW_LOGITS_ERROR, SamplingParams
from tandem.runtime.scheduling.scheduler import Request, Scheduler

GREEDY = {"temperature": 0, "max_new_tokens": 12, "ignore_eos": True}
PROMPTS = [[5, 6, 7, 8], [9, 10, 11], [12, 13, 14, 15, 16, 17], [18, 19], [20, 21, 22, 23, 24]]
# seeded sampling and penalties first: with 3 cache slots they are running when the rank dies
PARAMS = [{"temperature": 0.9, "top_p": 0.9, "seed": 1234, "max_new_tokens": 12, "ignore_eos": True},
          {"temperature": 1.0, "seed": 7, "frequency_penalty": 0.5, "presence_penalty": 0.3, "max_new_tokens": 12,
           "ignore_eos": True},
          GREEDY, GREEDY, GREEDY]


def test_requeue_all_puts_running_requests_first_and_forgets_caches():
    from tandem.runtime.scheduling.cache_manager import CacheManager

    sched = Scheduler(CacheManager(256, 16, 2, hybrid=False, radix_cache=True), 64, 64)
    reqs = [Request([1, 2, 3], SamplingParams(max_new_tokens=5)) for _ in range(3)]
    for req in reqs:
        sched.add(req)
    step, planned = sched.next_step()
    assert planned == reqs[:2]
    tokens = [40, 41]
    from tandem.runtime.step import StepOutput

    sched.process(step, planned, StepOutput(tokens=tokens, logprobs=[-0.5, -0.7]))
    assert [r.num_cached for r in reqs[:2]] == [3, 3]
    assert sched.requeue_all() == reqs[:2]
    assert list(sched.waiting) == reqs  # the running ones first, in admission order, then the waiting one
    cache = sched.cache
    assert sched.running == [] and cache.request_slots.num_free == 2 and cache.pages.num_free == cache.num_pages
    assert cache.prefix_cache.total_cached_pages == 0  # the prefix cache forgot the lost pages
    assert all(r.num_cached == 0 and r.cache is None for r in reqs)
    # the next step prefills prompt + the token already generated, from position 0, in fresh slots
    step, planned = sched.next_step()
    assert planned == reqs[:2]
    assert [(s.prefix_len, s.num_tokens) for s in step.spans] == [(0, 4), (0, 4)]
    assert step.input_ids == [1, 2, 3, 40, 1, 2, 3, 41]
    assert step.state_resets == [s.state_slot for s in step.spans] and step.release_keys == []
    assert step.fresh_table == [True, True]


def _start(engine: Engine, prompts, params, on_token=None, input_logprobs=True) -> tuple[list, list]:
    """Add requests to the engine's background loop; returns (requests, finished events)."""
    reqs, done = [], []
    for ids, p in zip(prompts, params):
        event = threading.Event()
        req = Request(list(ids), SamplingParams.from_dict(p), input_logprobs_wanted=input_logprobs)

        def on_update(r, e=event):
            if on_token is not None:
                on_token(r)
            if r.finished:
                e.set()

        req.on_update = on_update
        reqs.append(req)
        done.append(event)
    for req in reqs:
        engine.add_request(req)
    return reqs, done


def _wait(done: list[threading.Event]) -> None:
    for event in done:  # the bound only keeps a broken engine from hanging the test run
        assert event.wait(240), "a request did not finish"


def test_killed_rank_is_replaced_and_requests_finish_identically(ckpt):
    with Engine(ckpt("qwen3_5_moe"), pp_size=2, dtype="float32", max_running_requests=3, progress=False) as engine:
        reference = engine.generate(input_ids=PROMPTS, sampling_params=PARAMS, return_logprob=True,
                                    logprob_start_len=0)
        engine.start_background_loop()
        first_world = rank_processes()
        assert len(first_world) == 2
        killed = []

        def kill_once(req):  # runs on the engine's loop thread, between two steps
            if not killed and len(req.output_ids) == 4:
                os.kill(first_world[1], signal.SIGKILL)
                killed.append(engine.queue_stats())

        reqs, done = _start(engine, PROMPTS, PARAMS, kill_once)
        _wait(done)
        running, waiting = killed[0]
        assert len(running) == 3 and waiting == 2  # mid-run: 3 requests running, 2 waiting
        for req, ref in zip(reqs, reference):
            assert req.finish_reason == ref["meta_info"]["finish_reason"]
            assert req.output_ids == ref["output_ids"]
            ref_lps = [lp for lp, _ in ref["meta_info"]["output_token_logprobs"]]
            assert torch.allclose(torch.tensor(req.output_logprobs), torch.tensor(ref_lps), atol=1e-4)
            ref_input = [lp for lp, _ in ref["meta_info"]["input_token_logprobs"]]
            assert len(req.input_logprobs) == len(req.prompt_ids) - 1
            assert torch.allclose(torch.tensor(req.input_logprobs), torch.tensor(ref_input), atol=1e-4)
        assert engine.fault_stats() == {"rank_failures": 1, "restarts": 1, "recovering": False}
        assert engine.health() == (True, "")
        second_world = rank_processes()
        assert len(second_world) == 2 and not set(second_world) & set(first_world)
        # the new world serves new requests as the old one did
        again = engine.generate(input_ids=PROMPTS[:2], sampling_params=PARAMS[:2])
        assert [r["output_ids"] for r in again] == [r["output_ids"] for r in reference[:2]]
    assert rank_processes() == []


def test_restarts_that_keep_failing_stop_the_engine(ckpt):
    engine = Engine(ckpt("llama"), pp_size=2, dtype="float32", max_rank_restarts=1, progress=False)
    try:
        engine.start_background_loop()
        kills = []

        def kill_each_world(req):  # one kill per world, once it has produced a token for this request
            world = rank_processes()
            if len(world) == 2 and not set(world) & {pid for pid, _ in kills} and len(req.output_ids) >= 1:
                os.kill(world[0], signal.SIGKILL)
                kills.append((world[0], len(req.output_ids)))

        reqs, done = _start(engine, [[5, 6, 7]], [{"temperature": 0, "max_new_tokens": 400, "ignore_eos": True}],
                            kill_each_world)
        error = engine.wait_failed(240)
        assert error is not None and re.match(r"giving up: .*rank [01] was killed by signal 9", str(error)), error
        _wait(done)
        assert len(kills) == 2  # the first failure was recovered from, the second was final
        assert kills[1][1] > kills[0][1]  # the restarted world went on generating before it was killed
        reason = reqs[0].finish_reason
        assert reason["type"] == "abort" and "giving up" in reason["message"]
        assert engine.fault_stats()["rank_failures"] == 2 and engine.fault_stats()["restarts"] == 1
        ok, why = engine.health()
        assert not ok and "giving up" in why
        assert rank_processes() == []  # the failed world is stopped and no new one is started
        with pytest.raises(Exception, match="giving up"):
            engine.add_request(Request([1, 2], SamplingParams()))
    finally:
        engine.shutdown()


def test_a_rank_that_raises_is_replaced(ckpt, monkeypatch):
    """One process (LocalExecutor): an exception in the model runner restarts it in place."""
    with Engine(ckpt("llama"), dtype="float32", progress=False) as engine:
        reference = engine.generate(input_ids=PROMPTS, sampling_params=PARAMS)
        runner = engine.executor.runner
        calls = []
        original = runner.execute

        def fail_on_third_step(step):
            calls.append(step)
            if len(calls) == 3:
                raise RuntimeError("injected failure in the model runner")
            return original(step)

        monkeypatch.setattr(runner, "execute", fail_on_third_step)
        out = engine.generate(input_ids=PROMPTS, sampling_params=PARAMS)
        assert len(calls) == 3 and engine.executor.runner is not runner
        assert [r["output_ids"] for r in out] == [r["output_ids"] for r in reference]
        assert engine.fault_stats() == {"rank_failures": 1, "restarts": 1, "recovering": False}


@pytest.mark.parametrize("kind", ["qwen3_5_moe", "llama"])
def test_nan_logits_end_only_their_request(ckpt, kind):
    """A token whose embedding is NaN poisons every request that contains it (the hidden states, then the
    logits, are NaN); batched with it, other requests (MoE routing, linear attention, paged KV included)
    get exactly their own tokens, and so do later requests reusing its cache slot."""
    poison = 310  # in the model's vocabulary, outside the test tokenizer's
    with Engine(ckpt(kind), dtype="float32", max_running_requests=4, progress=False) as engine:
        clean = [PROMPTS[0], PROMPTS[2], PROMPTS[4]]
        reference = engine.generate(input_ids=clean, sampling_params=GREEDY)
        with torch.no_grad():
            engine.executor.runner.model.model.embed_tokens.weight[poison] = float("nan")
        batch = [clean[0], [5, 6, poison], clean[1], [poison, 7, 8, 9], clean[2]]
        out = engine.generate(input_ids=batch, sampling_params=GREEDY)
        for i in (1, 3):
            assert out[i]["meta_info"]["finish_reason"] == {"type": "abort", "message": RAW_LOGITS_ERROR}
            assert out[i]["output_ids"] == []
        assert [out[i]["output_ids"] for i in (0, 2, 4)] == [r["output_ids"] for r in reference]
        # the poisoned requests' slots (NaN in their caches) are reused
        again = engine.generate(input_ids=clean + clean[:1], sampling_params=GREEDY)
        assert [r["output_ids"] for r in again] == [r["output_ids"] for r in reference + reference[:1]]


def test_two_nodes_restart_together(ckpt):
    """A rank killed on node 1: the driver restarts its world, node 1 (`tandem serve --node-rank 1`, here
    `generate`) restarts its rank, and the requests finish with the fault-free tokens."""
    from tandem.executors.process import _free_port_triple

    model_dir = ckpt("llama")
    port = _free_port_triple()
    common = ["--model-path", str(model_dir), "--pp-size", "2", "--dtype", "float32", "--nnodes", "2",
              "--dist-init-addr", f"127.0.0.1:{port}", "--dist-auth-token", "s3cret-of-this-test"]
    node1 = subprocess.Popen([sys.executable, "-m", "tandem.cli", "generate", *common, "--node-rank", "1"])
    try:
        with Engine(model_dir, dtype="float32", progress=False) as single:
            reference = single.generate(input_ids=PROMPTS, sampling_params=PARAMS)
        with Engine(model_dir, pp_size=2, dtype="float32", nnodes=2, dist_init_addr=f"127.0.0.1:{port}",
                    dist_auth_token="s3cret-of-this-test", progress=False) as engine:
            engine.start_background_loop()
            remote = rank_processes(node1.pid)
            assert len(remote) == 1
            killed = []

            def kill_once(req):
                if not killed and len(req.output_ids) == 3:
                    os.kill(remote[0], signal.SIGKILL)
                    killed.append(req.rid)

            reqs, done = _start(engine, PROMPTS, PARAMS, kill_once, input_logprobs=False)
            _wait(done)
            assert killed and engine.fault_stats()["restarts"] == 1
            assert [r.output_ids for r in reqs] == [r["output_ids"] for r in reference]
            restarted = rank_processes(node1.pid)
            assert len(restarted) == 1 and restarted != remote
        assert node1.wait(timeout=60) == 0  # stopped by the driver, not failed
    finally:
        if node1.poll() is None:
            node1.kill()
