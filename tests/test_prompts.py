"""`tandem.prompts` without a model: every prompt form against the tokenizer's own encoding (the test
tokenizer of tests/support), the checks and the fields their errors name, and the result dict built from a
request whose state is set by hand."""

from __future__ import annotations

import pytest

from support.tokenizer import build_tokenizer
from tandem.errors import ConfigError
from tandem.prompts import (
    PromptBuilder,
    PromptError,
    build_result,
    output_text,
    render_chat,
)
from tandem.runtime.sampling.params import SamplingParams
from tandem.runtime.scheduling.request import Request, RequestLimits

VOCAB = 300
CONTEXT = 64
LIMITS = RequestLimits(context_length=CONTEXT, max_total_tokens=4 * CONTEXT)


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    return build_tokenizer(tmp_path_factory.mktemp("tokenizer"), vocab_size=VOCAB)


@pytest.fixture(scope="module")
def prompts(tokenizer):
    return PromptBuilder(tokenizer, VOCAB, LIMITS.check_prompt)


def test_text_and_ids_single_and_batched(prompts, tokenizer):
    hello, cat = tokenizer.encode("Hello"), tokenizer.encode("the cat")
    assert prompts.from_either("Hello", None, "text", "input_ids") == ([hello], False)
    assert prompts.from_either(["Hello", "the cat"], None, "text", "input_ids") == ([hello, cat], True)
    assert prompts.from_either(None, [5, 6], "text", "input_ids") == ([[5, 6]], False)
    assert prompts.from_either(None, [[5, 6], (7,)], "text", "input_ids") == ([[5, 6], [7]], True)
    # OpenAI's one `prompt` field takes all four forms
    assert prompts.from_prompt("Hello") == [hello]
    assert prompts.from_prompt(["Hello", "the cat"]) == [hello, cat]
    assert prompts.from_prompt([5, 6]) == [[5, 6]]
    assert prompts.from_prompt([[5, 6], [7]]) == [[5, 6], [7]]


def test_chat_messages_use_the_chat_template(prompts, tokenizer):
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "2+2?"}]
    expected = list(tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)["input_ids"])
    assert prompts.from_chat(messages) == expected
    # text parts are joined; None content is empty
    parts = [{"role": "system", "content": [{"type": "text", "text": "Be "}, {"type": "text", "text": "brief."}]},
             {"role": "user", "content": "2+2?"}]
    assert prompts.from_chat(parts) == expected
    assert render_chat(tokenizer, [{"role": "user", "content": None}]) == "<|im_start|>user\n<|im_end|>\n" \
                                                                          "<|im_start|>assistant\n"


@pytest.mark.parametrize("call,field,code", [
    (lambda p: p.from_either(None, None, "text", "input_ids"), "text", None),
    (lambda p: p.from_either("a", [1], "prompt", "input_ids"), "prompt", None),
    (lambda p: p.from_either(None, [1, VOCAB], "text", "input_ids"), "input_ids", None),
    (lambda p: p.from_either(None, [[1], [-1]], "text", "input_ids"), "input_ids", None),
    (lambda p: p.from_prompt([1, True]), "prompt", None),
    (lambda p: p.from_prompt([1.0]), "prompt", None),
    (lambda p: p.from_prompt([]), "prompt", None),
    (lambda p: p.from_prompt(""), "prompt", None),
    (lambda p: p.from_prompt(list(range(CONTEXT))), "prompt", "context_length_exceeded"),
    (lambda p: p.from_prompt("Hello " * CONTEXT), "prompt", "context_length_exceeded"),
    (lambda p: p.from_chat([{"role": "user", "content": [{"type": "image_url"}]}]), "messages", None),
])
def test_bad_prompts_name_their_field(prompts, call, field, code):
    with pytest.raises(PromptError) as info:
        call(prompts)
    assert isinstance(info.value, ConfigError)
    assert (info.value.field, info.value.code) == (field, code)


def test_longest_prompt_leaves_one_token(prompts):
    assert prompts.from_prompt(list(range(CONTEXT - 1))) == [list(range(CONTEXT - 1))]


def test_a_pool_smaller_than_the_context_limits_prompts_through_the_same_check():
    small_pool = PromptBuilder(None, VOCAB, RequestLimits(context_length=CONTEXT, max_total_tokens=16).check_prompt)
    assert small_pool.from_prompt(list(range(15))) == [list(range(15))]
    with pytest.raises(PromptError, match="the prompt has 16 tokens, but the KV cache holds 16 tokens") as info:
        small_pool.from_prompt(list(range(16)))
    assert (info.value.field, info.value.code) == ("prompt", "context_length_exceeded")


def test_no_tokenizer_takes_only_token_ids():
    ids_only = PromptBuilder(None, VOCAB, LIMITS.check_prompt)
    assert ids_only.from_prompt([3, 4]) == [[3, 4]]
    for call in (lambda: ids_only.from_prompt("Hello"), lambda: ids_only.from_chat([{"role": "user", "content": "x"}])):
        with pytest.raises(PromptError):
            call()


def test_chat_template_errors_are_prompt_errors(tmp_path):
    tok = build_tokenizer(tmp_path, vocab_size=VOCAB)
    tok.chat_template = "{{ raise_exception('roles must alternate') }}"
    with pytest.raises(PromptError, match="roles must alternate") as info:
        render_chat(tok, [{"role": "user", "content": "x"}])
    assert info.value.field == "messages"
    tok.chat_template = None
    with pytest.raises(PromptError, match="no chat template"):
        render_chat(tok, [{"role": "user", "content": "x"}])


def _request(prompt, output, logprobs, input_logprobs=(), reason=None) -> Request:
    req = Request(list(prompt), SamplingParams())
    req.output_ids, req.output_logprobs, req.input_logprobs = list(output), list(logprobs), list(input_logprobs)
    req.finish_reason = reason
    return req


def test_result_of_a_finished_request(tokenizer):
    decode = lambda ids: tokenizer.decode(ids, skip_special_tokens=True)
    out_ids = tokenizer.encode(" sees a red ball")
    req = _request([10, 11, 12], out_ids, [-0.5] * len(out_ids), [-1.0, -2.0], {"type": "length", "length": 4})
    result = build_result(req, decode, return_logprob=True, logprob_start_len=0)
    assert result == {"text": decode(out_ids), "output_ids": out_ids, "meta_info": {
        "prompt_tokens": 3, "completion_tokens": len(out_ids), "finish_reason": {"type": "length", "length": 4},
        "cached_tokens": 0, "output_token_logprobs": [(-0.5, t) for t in out_ids],
        # position 0 has no logprob; position p's is the (p-1)-th reported one
        "input_token_logprobs": [(-1.0, 11), (-2.0, 12)]}}
    assert build_result(req, decode, True, logprob_start_len=2)["meta_info"]["input_token_logprobs"] == [(-2.0, 12)]
    assert build_result(req)["meta_info"].keys() == {"prompt_tokens", "completion_tokens", "finish_reason",
                                                     "cached_tokens"}
    assert "text" not in build_result(req)
    assert build_result(req, decode, id="r1")["meta_info"]["id"] == "r1"


def test_text_is_cut_before_a_matched_stop_string(tokenizer):
    decode = lambda ids: tokenizer.decode(ids, skip_special_tokens=True)
    ids = tokenizer.encode(" sees a red ball")
    assert output_text({"type": "stop", "matched": "red"}, ids, decode) == " sees a "
    assert output_text({"type": "stop", "matched": 2}, ids, decode) == decode(ids)  # a stop token: no cut
    assert output_text(None, ids, decode) == decode(ids)


def test_result_of_a_running_request_pairs_only_complete_tokens():
    # the engine's thread appends an output id before its logprob: a reader may see one more id
    req = _request([1, 2], [7, 8, 9], [-0.1, -0.2])
    meta = build_result(req, return_logprob=True)["meta_info"]
    assert meta["output_token_logprobs"] == [(-0.1, 7), (-0.2, 8)] and meta["finish_reason"] is None
