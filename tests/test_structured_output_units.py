"""Structured output, piece by piece (no server): the packed bitmask and where the sampler applies it, the
driver's matchers (rebuilt from the output after a reset, `constraint_after_token_id`, a completed grammar
ends the request), the schema rewrite for xgrammar's length-bounded strings, the server's field parsing, and
`SamplingParams` checks. References are hand-computed values and independent runs (no mask, a fresh
matcher fed the same tokens)."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from tandem.errors import ConfigError
from tandem.runtime.sampling.params import SamplingParams
from tandem.runtime.sampling.sampler import Sampler
from tandem.runtime.sampling.token_mask import TokenMask, step_token_mask, unpack_bitmask
from tandem.server.constraints import constraint_fields
from tandem.server.protocol import APIError

V = 70  # not a multiple of 32: the last word is partly padding


def pack(allowed_rows: list[set[int]], vocab: int = V) -> bytes:
    """int32 little-endian words, bit j of word w = token 32 w + j (written independently of the code)."""
    words = -(-vocab // 32)
    out = np.zeros((len(allowed_rows), words), dtype=np.uint32)
    for r, allowed in enumerate(allowed_rows):
        for t in allowed:
            out[r, t // 32] |= np.uint32(1 << (t % 32))
    return out.astype("<u4").tobytes()


def test_unpack_bitmask_matches_hand_packed_bits():
    rows = [{0, 31, 32, 69}, set(), set(range(V))]
    allowed = unpack_bitmask(pack(rows), 3, V, torch.device("cpu"))
    assert allowed.shape == (3, V)
    for r, expected in enumerate(rows):
        assert set(torch.nonzero(allowed[r]).flatten().tolist()) == expected
    with pytest.raises(ValueError, match="bytes"):
        unpack_bitmask(pack(rows)[:-4], 3, V, torch.device("cpu"))


def _sampler(keys, params):
    sampler = Sampler()
    for key, p in zip(keys, params):
        sampler.begin(key, p, prompt_len=1)
        sampler.observe(key, [1], 0)
    return sampler


def test_greedy_rows_pick_the_best_allowed_token_after_logit_bias_and_others_are_bitwise_unchanged():
    gen = torch.Generator().manual_seed(0)
    logits = torch.randn(4, V, generator=gen)
    allowed_sets = [{3, 10, 50}, {7, 8}]
    # row 1's bias lifts token 8 above 7 (applied before the mask); row 3's lifts a token the mask refuses
    params = [SamplingParams(temperature=0), SamplingParams(temperature=0, logit_bias={8: 50.0}),
              SamplingParams(temperature=0), SamplingParams(temperature=0, logit_bias={9: 50.0})]
    keys = ["a", "b", "c", "d"]
    mask = step_token_mask([0, 1], pack(allowed_sets), sampled=[0, 1, 2, 3], vocab_size=V, device=logits.device)
    masked = _sampler(keys, params).sample(logits.clone(), params, keys, token_mask=mask)
    plain = _sampler(keys, params).sample(logits.clone(), params, keys)
    best = lambda row, allowed: max(allowed, key=lambda t: logits[row, t].item())
    assert masked.tokens[0] == best(0, allowed_sets[0])
    assert masked.tokens[1] == 8
    # unconstrained rows: the same tokens and bitwise the same logprobs as without any mask
    assert masked.tokens[2:] == plain.tokens[2:] and plain.tokens[3] == 9
    assert masked.logprobs[2:] == plain.logprobs[2:]
    # reported logprobs stay those of the raw distribution (as without a constraint)
    raw = torch.log_softmax(logits, dim=-1)
    assert masked.logprobs[0] == pytest.approx(raw[0, masked.tokens[0]].item(), abs=1e-6)


def test_sampled_rows_draw_only_allowed_tokens_and_a_row_without_allowed_tokens_fails_alone():
    logits = torch.zeros(3, V)
    keys = [0, 1, 2]
    allowed = [{5, 6, 40}, set(), {69}]
    seen = set()
    for trial in range(30):
        sampler = _sampler(keys, [SamplingParams(temperature=1.0)] * 3)
        mask = TokenMask([0, 1, 2], unpack_bitmask(pack(allowed), 3, V, logits.device))
        params = [SamplingParams(temperature=1.0, seed=trial)] * 3
        result = sampler.sample(logits.clone(), params, keys, token_mask=mask)
        assert result.tokens[0] in allowed[0] and result.tokens[2] == 69
        assert result.tokens[1] is None and result.errors[1] is not None
        seen.add(result.tokens[0])
    assert seen == allowed[0]  # uniform logits: every allowed token comes up


def test_step_token_mask_maps_span_indices_to_sampled_rows():
    mask = step_token_mask([3, 1], pack([{1}, {2}]), sampled=[1, 3, 4], vocab_size=V, device=torch.device("cpu"))
    assert mask.rows == [1, 0]
    with pytest.raises(ValueError, match="sample no token"):
        step_token_mask([2], pack([{1}]), sampled=[1, 3], vocab_size=V, device=torch.device("cpu"))


# ---- the driver's matchers ------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def tokenizer(ckpt):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(ckpt("llama", with_tokenizer=True)))


@pytest.fixture(scope="module")
def tracker(tokenizer):
    from tandem.runtime.constraints.tracker import ConstraintTracker

    return ConstraintTracker(tokenizer, 320, [2])


class _Req:
    def __init__(self, rid, params, output_ids=()):
        self.rid, self.params, self.output_ids = rid, params, list(output_ids)


def _allowed(tracker, req) -> set[int]:
    rows, data = tracker.masks([req], [True])
    assert rows == [0]
    return set(torch.nonzero(unpack_bitmask(data, 1, 320, torch.device("cpu"))[0]).flatten().tolist())


def test_matcher_rebuilt_after_reset_gives_the_masks_of_one_fed_throughout(tracker, tokenizer):
    params = SamplingParams(regex="(yes|no)-[0-9]{2}")
    ids = tokenizer.encode("yes-4")
    live = _Req("live", params)
    for token in ids:
        live.output_ids.append(token)
        assert tracker.accept(live, token) is None
    rebuilt = _Req("rebuilt", params, ids)
    assert tracker.ready(rebuilt)
    expected = {t for t in range(10) for t in tokenizer.encode(str(t))}
    assert _allowed(tracker, live) == _allowed(tracker, rebuilt) == expected
    tracker.reset(live)  # preempted: the matcher is rebuilt from the output tokens
    assert _allowed(tracker, live) == expected
    # the last digit completes the grammar: only EOS (2) is allowed, and EOS ends the request with "stop"
    last = tokenizer.encode("7")[0]
    live.output_ids.append(last)
    assert tracker.accept(live, last) is None
    assert _allowed(tracker, live) == {2}
    live.output_ids.append(2)
    assert tracker.accept(live, 2) == {"type": "stop", "matched": 2}


def test_constraint_applies_after_the_token_only(tracker, tokenizer):
    think_end = 1  # stands for `</think>`
    req = _Req("r", SamplingParams(regex="[0-9]+", constraint_after_token_id=think_end))
    assert tracker.masks([req], [True]) is None  # free text until the token
    for token in tokenizer.encode("abc"):
        req.output_ids.append(token)
        assert tracker.accept(req, token) is None
    assert tracker.masks([req], [True]) is None
    req.output_ids.append(think_end)
    tracker.accept(req, think_end)
    digits = _allowed(tracker, req)
    assert digits and all(tokenizer.decode([t]).isdigit() for t in digits)
    assert tracker.masks([req], [False]) is None  # a row that samples nothing gets no mask


def _fresh_masks(tracker, params, output: list[int], drafts: list[int]) -> list[set[int]]:
    """The masks at each position of a verify span, by fresh requests that took output + drafts[:k]."""
    masks = []
    for k in range(len(drafts) + 1):
        req = _Req(f"fresh{k}", params, output + drafts[:k])
        masks.append(_allowed(tracker, req))
        tracker.release(req)
    return masks


def test_verify_span_drafts_are_cut_to_the_grammar_and_masked_per_position(tracker, tokenizer):
    params = SamplingParams(regex="(yes|no)-[0-9]{2}")
    req = _Req("spec", params, tokenizer.encode("ye"))
    ok, wrong = tokenizer.encode("s-4"), tokenizer.encode("x")
    assert tracker.admissible_drafts(req, ok + wrong + ok) == ok  # cut at the first refused draft
    assert tracker.admissible_drafts(req, wrong + ok) == []
    rows, data = tracker.masks([req], [True], [ok])
    allowed = unpack_bitmask(data, 1 + len(ok), 320, torch.device("cpu"))
    got = [set(torch.nonzero(row).flatten().tolist()) for row in allowed]
    assert rows == [0] and got == _fresh_masks(tracker, params, req.output_ids, ok)
    assert _allowed(tracker, req) == got[0]  # the walk was rolled back: the matcher holds the output only
    # a draft that ends the grammar (its stop token) is left to the target: the mask before it allows it
    full = tokenizer.encode("s-42")
    assert tracker.admissible_drafts(req, full + [2, 7]) == full
    assert 2 in _fresh_masks(tracker, params, req.output_ids, full)[-1]


def test_drafts_before_the_reasoning_end_stop_at_it_and_get_no_mask(tracker, tokenizer):
    think_end = 1
    req = _Req("think", SamplingParams(regex="[0-9]+", constraint_after_token_id=think_end), tokenizer.encode("ab"))
    letters = tokenizer.encode("cd")
    assert tracker.admissible_drafts(req, letters + [think_end] + tokenizer.encode("12")) == letters
    assert tracker.masks([req], [True], [letters]) is None


def test_step_masks_split_verify_spans_from_sampled_rows():
    from tandem.runtime.sampling.token_mask import step_token_masks

    rows = [{1}, {2, 3}, {4}, {5}]  # span 2 (plain), then span 0's three positions
    masks = step_token_masks([2, 0], pack([rows[0], *rows[1:]]), sampled=[1, 2], vocab_size=V,
                             device=torch.device("cpu"), num_drafts=lambda span: 2 if span == 0 else 0)
    assert masks.sampled.rows == [1]
    assert set(torch.nonzero(masks.sampled.allowed[0]).flatten().tolist()) == {1}
    assert [set(torch.nonzero(r).flatten().tolist()) for r in masks.spans[0]] == rows[1:]


def test_verify_spans_judge_the_masked_distribution():
    """A greedy span's target at each position is the argmax of the allowed tokens: drafts equal to the
    masked argmax are accepted, and the bonus token is the masked argmax of the last position."""
    from tandem.runtime.sampling.verify_step import judge_spans

    logits = torch.randn(3, V, generator=torch.Generator().manual_seed(3))
    allowed = torch.zeros(3, V, dtype=torch.bool)
    allowed[:, 10:20] = True
    best = [10 + int(logits[r, 10:20].argmax()) for r in range(3)]
    verdict, = judge_spans(logits, [best[:2]], [SamplingParams(temperature=0)], [0], [True],
                           lambda device: torch.Generator(), masks=[allowed])
    assert verdict.tokens == best
    raw = torch.log_softmax(logits, dim=-1)
    assert verdict.logprobs == pytest.approx([float(raw[r, t]) for r, t in enumerate(best)])
    unmasked, = judge_spans(logits, [best[:2]], [SamplingParams(temperature=0)], [0], [True],
                            lambda device: torch.Generator())
    assert unmasked.tokens == [int(logits[0].argmax())] != best[:1]


def test_bad_grammars_raise_config_errors_with_the_compilers_message(tracker):
    for params, pattern in [(SamplingParams(regex="(ab"), "regex does not compile: .*parenthesis"),
                            (SamplingParams(json_schema='{"type": 5}'), "json_schema does not compile"),
                            (SamplingParams(ebnf="root ::= foo"), "ebnf does not compile: .*foo")]:
        with pytest.raises(ConfigError, match=pattern):
            tracker.compile(params)
        with pytest.raises(ConfigError):
            tracker.ready(_Req("x", params))


def test_length_bounded_strings_refuse_control_characters(tracker, tokenizer):
    """xgrammar alone accepts a raw U+0003 inside a string with maxLength (invalid JSON), and surrogates (invalid
    UTF-8); the rewrite refuses both."""
    schema = json.dumps({"type": "object", "properties": {"s": {"type": "string", "maxLength": 5}},
                         "required": ["s"], "additionalProperties": False})
    params = SamplingParams(json_schema=schema)
    req = _Req("ctl", params)
    prefix = tokenizer.encode('{"s": "')
    for token in prefix:
        req.output_ids.append(token)
        assert tracker.accept(req, token) is None
    control = tokenizer.convert_tokens_to_ids(bytes_to_unicode()[3])  # the byte-level symbol of byte 0x03
    allowed = _allowed(tracker, req)
    assert tokenizer.decode([control]) == "\x03" and control not in allowed
    assert tokenizer.encode("a")[0] in allowed
    # nor UTF-8-encoded surrogates (ED A0 80 is U+D800): after ED, A0 is refused, 9F (U+D7C0..) is not
    byte = lambda b: tokenizer.convert_tokens_to_ids(bytes_to_unicode()[b])
    req.output_ids.append(byte(0xED))
    assert tracker.accept(req, byte(0xED)) is None
    allowed = _allowed(tracker, req)
    assert byte(0xA0) not in allowed and byte(0x9F) in allowed


def _valid_second_bytes(lead: int) -> set[int]:
    """The bytes that may follow `lead` in valid UTF-8, by Python's decoder (the smallest continuation bytes
    complete the character)."""
    length = 2 if 0xC0 <= lead < 0xE0 else 3 if 0xE0 <= lead < 0xF0 else 4
    return {b for b in range(256) if _decodes(bytes([lead, b] + [0x80] * (length - 2)))}


def _decodes(data: bytes) -> bool:
    try:
        data.decode("utf-8")
        return True
    except UnicodeDecodeError:
        return False


def test_length_bounded_strings_allow_exactly_the_valid_utf8_sequences(tracker, tokenizer):
    """xgrammar compiles a character class spanning UTF-8 lengths, inside a JSON schema, to byte rules that let
    E0 80 and F0 80 (overlong forms, four U+FFFD in the text) through: after every lead byte the mask allows
    exactly what Python's decoder takes; and random walks over the mask give strings json/jsonschema accept."""
    import random

    import jsonschema

    schema = {"type": "object", "properties": {"s": {"type": "string", "maxLength": 4}}, "required": ["s"],
              "additionalProperties": False}
    params = SamplingParams(json_schema=json.dumps(schema))
    byte = {b: tokenizer.convert_tokens_to_ids(c) for b, c in bytes_to_unicode().items()}
    prefix = tokenizer.encode('{"s": "')
    for lead in range(0xC2, 0xF5):
        req = _Req(f"lead{lead}", params, prefix + [byte[lead]])
        allowed = _allowed(tracker, req)
        assert {b for b in range(256) if byte[b] in allowed} == _valid_second_bytes(lead), hex(lead)
        tracker.release(req)
    rng, vocab_bytes = random.Random(0), {t: b for b, t in byte.items()}
    for walk in range(40):
        req = _Req(f"walk{walk}", params, list(prefix))
        tracker.accept(req, prefix[-1])
        while len(req.output_ids) < 60:
            choices = sorted(t for t in _allowed(tracker, req) if t in vocab_bytes)
            if not choices:  # the object is closed: only the stop token is left
                break
            high = [t for t in choices if vocab_bytes[t] >= 0x80]  # lean on multi-byte characters
            token = rng.choice(high if high and rng.random() < 0.7 else choices)
            req.output_ids.append(token)
            if tracker.accept(req, token) is not None:
                break
        text = bytes(vocab_bytes[t] for t in req.output_ids).decode("utf-8")  # raises on invalid UTF-8
        jsonschema.validate(json.loads(text), schema)
        tracker.release(req)


def bytes_to_unicode() -> dict[int, str]:
    """GPT-2's byte-level alphabet: byte -> the character that stands for it in the vocabulary."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    mapping, extra = {b: chr(b) for b in printable}, 0
    for b in range(256):
        if b not in mapping:
            mapping[b], extra = chr(256 + extra), extra + 1
    return mapping


# ---- request fields ------------------------------------------------------------------------------------

SCHEMA = {"type": "object", "properties": {"a": {"type": "integer"}}}


@pytest.mark.parametrize("body, expected", [
    ({"response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": SCHEMA, "strict": True}}},
     {"json_schema": json.dumps(SCHEMA)}),
    ({"response_format": {"type": "json_object"}}, {"json_schema": '{"type": "object"}'}),
    ({"response_format": {"type": "text"}}, {}),
    ({"json_schema": json.dumps(SCHEMA)}, {"json_schema": json.dumps(SCHEMA)}),
    ({"regex": "a+"}, {"regex": "a+"}),
    ({"ebnf": 'root ::= "a"'}, {"ebnf": 'root ::= "a"'}),
    ({"structured_outputs": {"json": SCHEMA, "disable_any_whitespace": True}}, {"json_schema": json.dumps(SCHEMA)}),
    ({"structured_outputs": {"regex": "b+"}}, {"regex": "b+"}),
    ({"structured_outputs": {"choice": ["x", 'y"z']}}, {"ebnf": 'root ::= "x" | "y\\"z"'}),
    ({"structured_outputs": {"grammar": 'root ::= "q"'}}, {"ebnf": 'root ::= "q"'}),
    ({"guided_json": SCHEMA, "guided_decoding_backend": "xgrammar"}, {"json_schema": json.dumps(SCHEMA)}),
    ({"guided_regex": "c+"}, {"regex": "c+"}),
    ({"guided_choice": ["u", "v"]}, {"ebnf": 'root ::= "u" | "v"'}),
    ({"guided_grammar": 'root ::= "g"'}, {"ebnf": 'root ::= "g"'}),
])
def test_constraint_fields(body, expected):
    assert constraint_fields(body, "chat") == expected


@pytest.mark.parametrize("body, param", [
    ({"guided_whitespace_pattern": " "}, "guided_whitespace_pattern"),
    ({"guided_decoding_backend": "outlines", "guided_regex": "a"}, "guided_decoding_backend"),
    ({"structured_outputs": {"structural_tag": "{}"}}, "structured_outputs.structural_tag"),
    ({"structured_outputs": {"json": SCHEMA, "disable_any_whitespace": False}},
     "structured_outputs.disable_any_whitespace"),
    ({"response_format": {"type": "structural_tag"}}, "response_format"),
    ({"response_format": {"type": "json_schema"}}, "response_format.json_schema"),
    ({"regex": "a", "guided_json": SCHEMA}, "regex"),
    ({"guided_choice": []}, "guided_choice"),
])
def test_unimplemented_or_conflicting_fields_are_400s_naming_them(body, param):
    with pytest.raises(APIError) as info:
        constraint_fields(body, "chat")
    assert info.value.status == 400 and info.value.param == param


def test_sampling_params_take_at_most_one_constraint():
    with pytest.raises(ConfigError, match="at most one"):
        SamplingParams(regex="a", ebnf='root ::= "a"')
    with pytest.raises(ConfigError, match="regex must be a non-empty string"):
        SamplingParams(regex=5)
    with pytest.raises(ConfigError, match="constraint_after_token_id needs"):
        SamplingParams(constraint_after_token_id=3)
    params = SamplingParams.from_dict({"json_schema": "{}", "constraint_after_token_id": 7, "n": 2})
    assert params.constraint == ("json_schema", "{}") and params.for_choice(1).constraint == ("json_schema", "{}")
