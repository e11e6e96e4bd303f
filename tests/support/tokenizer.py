"""Tiny byte-level BPE tokenizer with a Qwen-style ChatML chat template, trained locally.

`build_tokenizer(out_dir)` trains on a small deterministic built-in corpus and saves a Hugging Face
tokenizer (tokenizer.json, tokenizer_config.json, chat_template.jinja, ...) into `out_dir`, loadable
offline with `AutoTokenizer.from_pretrained(out_dir)`.

Special tokens always get the first ids, in this order:
    0 "<|endoftext|>"  (pad token; also used as bos_token_id in the model configs, like Qwen)
    1 "<|im_start|>"
    2 "<|im_end|>"     (eos token)
The tokenizer does not add a BOS token (Qwen-style); ids 3.. are the 256 byte symbols then merges.
"""

from __future__ import annotations

import pathlib
import random

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

ENDOFTEXT = "<|endoftext|>"
IM_START = "<|im_start|>"
IM_END = "<|im_end|>"
SPECIAL_TOKENS = (ENDOFTEXT, IM_START, IM_END)
ENDOFTEXT_ID, IM_START_ID, IM_END_ID = 0, 1, 2
EOS_TOKEN = IM_END
EOS_TOKEN_ID = IM_END_ID
BOS_TOKEN_ID = ENDOFTEXT_ID  # config.bos_token_id (the tokenizer itself adds no BOS)
PAD_TOKEN = ENDOFTEXT
PAD_TOKEN_ID = ENDOFTEXT_ID

# Qwen2.5-style ChatML template (without Qwen's default system prompt and without tool support).
CHAT_TEMPLATE = (
    "{%- for message in messages %}"
    "{{- '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}"
    "{{- '<|im_start|>assistant\\n' }}"
    "{%- endif %}"
)

_SUBJECTS = ["the cat", "a dog", "my friend", "the teacher", "our team", "the robot", "a small bird",
             "the old man", "every student", "the engine", "this model", "the river"]
_VERBS = ["sees", "likes", "builds", "finds", "reads", "writes", "moves", "counts", "paints", "follows"]
_OBJECTS = ["a red ball", "the blue sky", "many numbers", "an old book", "the green tree", "a long story",
            "the fast train", "some bread", "a bright star", "the open door"]
_TAILS = ["today", "every morning", "in the park", "at night", "with care", "again", "very slowly",
          "near the house", "before lunch", "after the rain"]


def corpus(n_sentences: int = 300, n_sums: int = 200, seed: int = 1234) -> list[str]:
    """Deterministic little English + arithmetic corpus."""
    rng = random.Random(seed)
    lines = []
    for _ in range(n_sentences):
        s = f"{rng.choice(_SUBJECTS)} {rng.choice(_VERBS)} {rng.choice(_OBJECTS)} {rng.choice(_TAILS)}."
        lines.append(s[0].upper() + s[1:])
    for _ in range(n_sums):
        a, b = rng.randint(0, 99), rng.randint(0, 99)
        lines.append(f"{a}+{b}={a + b}")
    lines += ["Hello, world!", "How are you?", "I am fine, thank you.", "What is 2+2? It is 4.",
              "The quick brown fox jumps over the lazy dog."]
    return lines


def _train_backend(vocab_size: int) -> Tokenizer:
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=2,
        special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(corpus(), trainer=trainer)
    for i, t in enumerate(SPECIAL_TOKENS):
        assert tok.token_to_id(t) == i, (t, tok.token_to_id(t))
    return tok


def build_tokenizer(out_dir, vocab_size: int = 300):
    """Train the tiny BPE, wrap it as a PreTrainedTokenizerFast, save it into out_dir and return it."""
    from transformers import PreTrainedTokenizerFast

    if vocab_size < 259 + 1:
        raise ValueError("vocab_size must exceed 256 bytes + 3 special tokens")
    backend = _train_backend(vocab_size)
    tok = PreTrainedTokenizerFast(
        tokenizer_object=backend,
        eos_token=EOS_TOKEN,
        pad_token=PAD_TOKEN,
        bos_token=None,
        unk_token=None,
        additional_special_tokens=[IM_START],
        model_max_length=2048,
        clean_up_tokenization_spaces=False,
        chat_template=CHAT_TEMPLATE,
    )
    out_dir = pathlib.Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    tok.save_pretrained(out_dir)
    return tok
