"""The renovation's guarantees: the parallel layout is a value (two engines with different layouts live in one
process), a new dense family is one model file plus one registry line, and the control plane decodes only
authentic, typed messages (nothing is unpickled; a stranger's frames are dropped and serving goes on)."""

from __future__ import annotations

import pickle
import re
import shutil
import textwrap
from pathlib import Path

import msgspec
import pytest
import zmq

from tandem import Engine
from tandem.executors.messages import AskReport, Codec, DriverMessage, RankMessage, Result, RunStep, secret_from_token
from tandem.layers.span import Span
from tandem.models import registry
from tandem.runtime.sampling.params import SamplingParams
from tandem.runtime.step import StepInput, StepOutput

GREEDY = {"temperature": 0, "max_new_tokens": 6, "ignore_eos": True}
PROMPTS = [[5, 6, 7, 8], [9, 10, 11]]


def test_two_engines_with_different_layouts_in_one_process(ckpt):
    model_dir = ckpt("qwen3_5_moe")
    with Engine(model_dir, dtype="float32", progress=False) as single, \
            Engine(model_dir, pp_size=2, pp_layer_partition="1,3", dtype="float32", progress=False) as split:
        from tandem.runtime.planning.stage_costs import build_stage_on_meta

        # a third layout built in between (the planner's meta build for tp 2, stage 1 of 2) changes neither
        meta = build_stage_on_meta(single.model_config, single.executor.runner.dtype, 2, 2, 1, (3, 1))
        assert meta.layer_range == (3, 4)
        first = single.generate(input_ids=PROMPTS, sampling_params=GREEDY)
        second = split.generate(input_ids=PROMPTS, sampling_params=GREEDY)
        again = single.generate(input_ids=PROMPTS, sampling_params=GREEDY)
        assert [r["layer_start"] for r in split.stage_report()] == [0, 1]
        assert single.stage_report()[0]["layer_end"] == 4
    assert [o["output_ids"] for o in first] == [o["output_ids"] for o in second] == [o["output_ids"] for o in again]


MADE_UP_FAMILY = '''
    """A made-up dense family: Qwen3's blocks (q/k norms) under a new architecture name."""

    from tandem.models.causal_lm import CausalLM
    from tandem.models.common import BlockSpec


    class MadeUpForCausalLM(CausalLM):
        @classmethod
        def block_spec(cls, config):
            return BlockSpec(qk_norm=True)
'''


def test_a_new_dense_family_is_one_file_and_one_registry_line(ckpt, tmp_path, monkeypatch):
    module_dir = tmp_path / "plugins"
    module_dir.mkdir()
    (module_dir / "made_up_family.py").write_text(textwrap.dedent(MADE_UP_FAMILY))
    monkeypatch.syspath_prepend(str(module_dir))
    monkeypatch.setattr(registry, "_MODELS", dict(registry._MODELS))
    registry.register("MadeUpForCausalLM", "made_up_family", "MadeUpForCausalLM")  # the one registry line

    source = ckpt("qwen3")
    model_dir = tmp_path / "made-up"
    shutil.copytree(source, model_dir)
    config = Path(model_dir / "config.json")
    config.write_text(config.read_text().replace('"Qwen3ForCausalLM"', '"MadeUpForCausalLM"'))

    with Engine(model_dir, dtype="float32", progress=False) as engine:
        assert type(engine.executor.runner.model).__name__ == "MadeUpForCausalLM"
        made_up = engine.generate(input_ids=PROMPTS, sampling_params=GREEDY, return_logprob=True)
    with Engine(source, dtype="float32", progress=False) as engine:
        qwen3 = engine.generate(input_ids=PROMPTS, sampling_params=GREEDY, return_logprob=True)
    assert [o["output_ids"] for o in made_up] == [o["output_ids"] for o in qwen3]
    assert [o["meta_info"]["output_token_logprobs"] for o in made_up] == \
        [o["meta_info"]["output_token_logprobs"] for o in qwen3]


# ---- control plane ------------------------------------------------------------------------------------------

def _step() -> StepInput:
    return StepInput([Span(0, 0, 3)], [1, 2, 3], [True], [SamplingParams(max_new_tokens=4, stop=["x"])], [7])


def test_codec_round_trips_typed_messages():
    secret = secret_from_token("t")
    to_rank, to_driver = Codec(secret, DriverMessage), Codec(secret, RankMessage)
    message = to_rank.decode(to_rank.encode(RunStep(3, _step())))
    assert message == RunStep(3, _step())
    result = Result(3, StepOutput([9], [-0.5], [[-1.0, -2.0]]))
    assert to_driver.decode(to_driver.encode(result)) == result


def test_codec_drops_what_it_cannot_trust(caplog):
    codec = Codec(secret_from_token("ours"), DriverMessage)
    stranger = Codec(secret_from_token("theirs"), DriverMessage)
    payload = msgspec.msgpack.encode(AskReport())
    evil = pickle.dumps(("step", 0, None))
    cases = [
        stranger.encode(AskReport()),  # wrong secret
        [codec.encode(AskReport())[0], msgspec.msgpack.encode(RunStep(1, _step()))],  # mac of another payload
        [payload],  # one frame
        [b"", evil],  # a pickle without a mac
        codec.encode({"type": "step", "step_id": "not an int"}),  # authentic but malformed
        codec.encode({"type": "launch_missiles"}),  # authentic but of no known kind
        codec.encode(Result(1, StepOutput([1], [0.0]))),  # a rank's message sent to a rank
    ]
    for frames in cases:
        assert codec.decode(frames) is None
    assert len([r for r in caplog.records if "control plane: dropped" in r.getMessage()]) == len(cases)


class _Boom:
    def __reduce__(self):
        return (Path.touch, (Path(_Boom.target),))


def test_a_pickle_pushed_at_the_driver_is_never_run(ckpt, tmp_path):
    """Push a pickle that would create a file to the driver's result socket (and, as a subscriber would see
    it, publish nothing): no file appears and the engine keeps computing the same tokens."""
    _Boom.target = str(tmp_path / "pwned")
    with Engine(ckpt("llama"), pp_size=2, dtype="float32", progress=False) as engine:
        before = engine.generate(input_ids=PROMPTS, sampling_params=GREEDY)
        endpoint = engine.executor._results.getsockopt(zmq.LAST_ENDPOINT).decode()
        context = zmq.Context()
        push = context.socket(zmq.PUSH)
        push.connect(endpoint)
        for frames in ([pickle.dumps(_Boom())], [b"x" * 32, pickle.dumps(_Boom())], [b"\xff" * 10]):
            push.send_multipart(frames)
        after = engine.generate(input_ids=PROMPTS, sampling_params=GREEDY)
        push.close(linger=0)
        context.term()
    assert not Path(_Boom.target).exists()
    assert [o["output_ids"] for o in after] == [o["output_ids"] for o in before]


def test_nothing_under_tandem_uses_pickle():
    root = Path(__file__).resolve().parent.parent / "tandem"
    use = re.compile(r"^\s*(import|from)\s+(c?pickle|dill|cloudpickle|marshal)\b|\bpickle\.\w+\(|torch\.load\(", re.M)
    users = [str(p) for p in root.rglob("*.py") if use.search(p.read_text())]
    assert users == [], "pickle must not be used anywhere in the package"


def test_multi_node_needs_an_auth_token(ckpt):
    from tandem.errors import ConfigError

    with pytest.raises(ConfigError, match="dist-auth-token"):
        Engine(ckpt("llama"), pp_size=2, nnodes=2, dist_init_addr="127.0.0.1:1", progress=False)
