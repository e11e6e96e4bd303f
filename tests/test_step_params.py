"""Sampling params travel with the step that (re)admits a request and the last stage keeps them
(`tandem.runtime.step.admits_request`): a step that admits a request without them is refused with a named
error, and the engine keeps serving; a continuing step without them samples with the kept ones."""

import pytest

from tandem.engine import Engine
from tandem.layers.span import Span
from tandem.runtime.sampling.params import SamplingParams
from tandem.runtime.step import StepInput

GREEDY = {"temperature": 0, "max_new_tokens": 3, "ignore_eos": True}


def test_admitting_step_without_params_is_refused_and_the_engine_keeps_serving(ckpt):
    with Engine(ckpt("llama"), dtype="float32", progress=False) as engine:
        runner = engine.executor.runner
        bad = StepInput([Span(0, 0, 3)], [5, 6, 7], [True], [None], ["stray"], new_pages=[[0]], fresh_table=[True])
        with pytest.raises(ValueError, match="admits request 'stray' without its sampling params"):
            runner.execute(bad)
        out = engine.generate(input_ids=[[5, 6, 7]], sampling_params=GREEDY)
    with Engine(ckpt("llama"), dtype="float32", progress=False) as fresh:
        expected = fresh.generate(input_ids=[[5, 6, 7]], sampling_params=GREEDY)
    assert out[0]["output_ids"] == expected[0]["output_ids"]


def test_continuing_step_samples_with_the_kept_params(ckpt):
    with Engine(ckpt("llama"), dtype="float32", progress=False) as engine:
        runner = engine.executor.runner
        greedy = SamplingParams(temperature=0.0, max_new_tokens=4)
        first = runner.execute(StepInput([Span(0, 0, 3)], [5, 6, 7], [True], [greedy], ["k"], new_pages=[[0]],
                                         fresh_table=[True]))
        second = runner.execute(StepInput([Span(0, 3, 1)], [first.tokens[0]], [True], [None], ["k"],
                                          new_pages=[[]], fresh_table=[False]))
        expected = engine.generate(input_ids=[[5, 6, 7]], sampling_params={**GREEDY, "max_new_tokens": 2})
    assert [first.tokens[0], second.tokens[0]] == expected[0]["output_ids"]
