"""Incremental detokenisation with real tokenizers: the pieces join up to the text of decoding all ids at once
(multi-byte characters split across tokens, special tokens, SentencePiece-style leading spaces), only short
windows are decoded, and a streamed request's deltas join up to its final text, cut before a stop string."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

from support.tokenizer import build_tokenizer
from tandem.prompts import output_text
from tandem.runtime.scheduling.detokenizer import IncrementalDetokenizer, StopStringWatch
from tandem.server.detokenize import TextStream, held_back

DEFAULT_MODEL = Path(__file__).resolve().parents[1] / "models" / "default"
TEXTS = [
    "The cat sees a red ball today. 12+34=46",
    "héllo wörld: naïve café, 中文字符 and 🙂🚀 emoji, Ωmega ≈ 3.14…",
    "🙂",
    "  leading spaces, then\nnew lines\n\nand tabs\t!",
]


def metaspace_tokenizer():
    """A Llama-style tokenizer: SentencePiece's "▁" for spaces, whose decoder drops the leading space of a
    sequence, with byte fallback for characters outside the vocabulary."""
    from transformers import PreTrainedTokenizerFast

    from support.tokenizer import corpus

    backend = Tokenizer(models.BPE(unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Metaspace()
    trainer = trainers.BpeTrainer(vocab_size=400, special_tokens=["<unk>", "</s>"], show_progress=False)
    backend.train_from_iterator(corpus(), trainer=trainer)
    spec = json.loads(backend.to_str())  # add SentencePiece's byte tokens <0x00>..<0xFF> as ordinary tokens
    vocab = spec["model"]["vocab"]
    for b in range(256):
        vocab.setdefault(f"<0x{b:02X}>", len(vocab))
    spec["model"]["byte_fallback"] = True
    backend = Tokenizer.from_str(json.dumps(spec))
    backend.decoder = decoders.Sequence([decoders.ByteFallback(), decoders.Metaspace()])
    return PreTrainedTokenizerFast(tokenizer_object=backend, eos_token="</s>", unk_token="<unk>",
                                   clean_up_tokenization_spaces=False)


@pytest.fixture(scope="module", params=["byte-level", "default-model", "metaspace"])
def tokenizer(request, tmp_path_factory):
    if request.param == "byte-level":
        return build_tokenizer(tmp_path_factory.mktemp("tok"))
    if request.param == "default-model":
        from transformers import AutoTokenizer

        return AutoTokenizer.from_pretrained(str(DEFAULT_MODEL))
    return metaspace_tokenizer()


def decoder_of(tokenizer, windows: list[int] | None = None):
    def decode(ids):
        if windows is not None:
            windows.append(len(ids))
        return tokenizer.decode(ids, skip_special_tokens=True)
    return decode


def encode(tokenizer, text: str) -> list[int]:
    return tokenizer.encode(text, add_special_tokens=False)


@pytest.mark.parametrize("text", TEXTS)
def test_pieces_join_up_to_the_whole_decode(tokenizer, text):
    ids = encode(tokenizer, text)
    if tokenizer.eos_token_id is not None:  # a special token inside the output decodes to nothing
        ids = ids[: len(ids) // 2] + [tokenizer.eos_token_id] + ids[len(ids) // 2:]
    expected = tokenizer.decode(ids, skip_special_tokens=True)
    detokenizer = IncrementalDetokenizer(decoder_of(tokenizer))
    pieces = [detokenizer.update(ids[:n]) for n in range(1, len(ids) + 1)]
    assert "".join(pieces) == expected
    assert not any("\ufffd" in piece for piece in pieces)


def test_a_character_split_across_tokens_is_held_back_until_complete(tokenizer):
    ids = encode(tokenizer, "a🙂")
    if len(ids) < 3:
        pytest.skip("this tokenizer has the emoji as one token")  # the byte-level ones split it into bytes
    detokenizer = IncrementalDetokenizer(decoder_of(tokenizer))
    pieces = [detokenizer.update(ids[:n]) for n in range(1, len(ids) + 1)]
    assert pieces[0] == "a" and pieces[-1] == "🙂" and all(p == "" for p in pieces[1:-1])


def test_only_short_windows_are_decoded(tokenizer):
    ids = encode(tokenizer, " ".join(TEXTS) * 8)
    windows: list[int] = []
    detokenizer = IncrementalDetokenizer(decoder_of(tokenizer, windows))
    for n in range(1, len(ids) + 1):
        detokenizer.update(ids[:n])
    assert len(ids) > 300
    assert len(windows) <= 2 * len(ids)  # two short decodes per update, never the whole list
    assert max(windows) <= 10  # the longest run of tokens of one character, plus the previous window


def test_held_back():
    assert held_back("see the ST", ["STOP"]) == 2
    assert held_back("see the STO", ["STOP", "O"]) == 3
    assert held_back("see the STOP", ["STOP"]) == 0  # a whole stop string is the scheduler's to cut
    assert held_back("abc", []) == 0
    assert held_back("x中", ["中文"]) == 1


class FakeRequest:
    def __init__(self):
        self.rid, self.output_ids, self.finish_reason = 7, [], None

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None


class FakeBridge:
    def __init__(self, tokenizer):
        self.decode = decoder_of(tokenizer)

    def text_of(self, req) -> str:
        return output_text(req.finish_reason, req.output_ids, self.decode)


@pytest.mark.parametrize("text, stops", [
    ("The cat sees a red ball. STOP and more text", ["STOP"]),
    ("naïve café 中文字符 after", ["中文", "never"]),
    ("no stop string ever matches here, Ωmega 🙂", ["STOPS", "🙂🙂"]),
    ("ends with the stop\n\n", ["\n\n"]),
])
def test_streamed_deltas_join_up_to_the_final_text(tokenizer, text, stops):
    """The request runs like the scheduler runs it: one token per step; it finishes when a stop string
    appears in its text (the final text is then cut before it), else after the last token."""
    bridge, req = FakeBridge(tokenizer), FakeRequest()
    stream = TextStream(bridge, stops)
    ids = encode(tokenizer, text)
    deltas, sent = [], ""
    for token in ids:
        req.output_ids.append(token)
        decoded = bridge.decode(req.output_ids)
        matched = next((s for s in stops if s in decoded), None)
        if matched is not None:
            req.finish_reason = {"type": "stop", "matched": matched}
        elif len(req.output_ids) == len(ids):
            req.finish_reason = {"type": "length", "length": len(ids)}
        delta = stream.update(req)
        deltas.append(delta)
        sent += delta
        assert not any(s in sent for s in stops)
        if req.finished:
            break
    final = bridge.text_of(req)
    assert "".join(deltas) == final == stream.sent
    full = tokenizer.decode(ids, skip_special_tokens=True)
    matched = next((s for s in stops if s in full), None)
    assert final == (full[: full.find(matched)] if matched else full)


STOPS = ["ball", "\n\n", "ö", "🙂🚀", "46", "x"]


def test_stop_string_watch_finds_what_a_full_search_finds(tokenizer):
    """Fed one more token at a time, the watch reports a stop string on the same token as searching the
    decoded whole output would, for every prefix of the texts (stops spanning token and character boundaries,
    multi-byte characters), and only a short window is decoded per token."""
    for text in TEXTS:
        ids = tokenizer.encode(text, add_special_tokens=False)
        for stops in ([s] for s in STOPS):
            decoded_lengths: list[int] = []
            watch = StopStringWatch(decoder_of(tokenizer, decoded_lengths), stops)
            for end in range(1, len(ids) + 1):
                full = tokenizer.decode(ids[:end], skip_special_tokens=True)
                expected = next((s for s in stops if s in full), None)
                got = watch.feed(ids[:end])
                assert got == expected, (text, stops, end, full)
                if got is not None:
                    break
            assert max(decoded_lengths, default=0) <= 12
