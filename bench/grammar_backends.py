"""xgrammar vs llguidance on this CPU, side by side in one run: the compile time of a tool-call JSON schema
(and of a regex and a choice), and the time to fill the next-token bitmask of 32 rows per decode step.

No real checkpoint's tokenizer is on this machine (no network), so the vocabulary is a byte-level BPE trained
here on about 40 MB of the virtual environment's Python sources, asked for Qwen's size (151,643 tokens); the
corpus yields 94,518 (real merges, code-heavy like Qwen's). It is built once into --tokenizer-dir.

    python bench/grammar_backends.py --out bench/results/grammar_backends.json
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

TOOL_SCHEMA = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "enum": ["get_weather", "search_web", "run_code"]},
        "arguments": {
            "type": "object",
            "properties": {
                "city": {"type": "string", "maxLength": 40},
                "unit": {"type": "string", "enum": ["celsius", "fahrenheit"]},
                "days": {"type": "integer", "minimum": 1, "maximum": 14},
                "include_hourly": {"type": "boolean"},
                "tags": {"type": "array", "items": {"type": "string"}, "maxItems": 4},
            },
            "required": ["city", "unit", "days"],
            "additionalProperties": False,
        },
    },
    "required": ["name", "arguments"],
    "additionalProperties": False,
}
# a valid output, fed token by token to advance the 32 matchers through a realistic sequence of states
TOOL_OUTPUT = json.dumps({"name": "get_weather", "arguments": {"city": "Paris", "unit": "celsius", "days": 3,
                                                               "include_hourly": True, "tags": ["a", "b"]}})
REGEX = r"(\+|-)?[0-9]{1,6}(\.[0-9]{1,4})?"
CHOICES = ["positive", "negative", "neutral"]
QWEN_VOCAB = 151_643


def build_tokenizer(out_dir: Path, vocab_size: int):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    if (out_dir / "tokenizer.json").exists():
        return PreTrainedTokenizerFast.from_pretrained(str(out_dir))
    site = Path(sys.prefix) / "lib" / f"python{sys.version_info.major}.{sys.version_info.minor}" / "site-packages"
    texts, total = [], 0
    for path in sorted(site.rglob("*.py")):  # about 40 MB of source text is enough for 151k merges
        text = path.read_bytes().decode("utf-8", errors="ignore")
        texts.append(text)
        total += len(text)
        if total > 40e6:
            break
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, min_frequency=2, special_tokens=["<|endoftext|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(texts, trainer)
    out_dir.mkdir(parents=True, exist_ok=True)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|endoftext|>")
    fast.save_pretrained(str(out_dir))
    return fast


def timed(fn, repeat: int) -> list[float]:
    times = []
    for _ in range(repeat):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return times


def summary(times: list[float]) -> dict:
    return {"median_ms": statistics.median(times) * 1e3, "min_ms": min(times) * 1e3, "runs": len(times)}


def bench_xgrammar(tokenizer, vocab: int, output_ids: list[int], rows: int, repeat: int) -> dict:
    import xgrammar as xgr

    info = xgr.TokenizerInfo.from_huggingface(tokenizer, vocab_size=vocab)

    def compile_with(fn):
        def run():
            compiler = xgr.GrammarCompiler(info, max_threads=1, cache_enabled=False)
            return fn(compiler)
        return run

    schema = json.dumps(TOOL_SCHEMA)
    result = {
        "compile_tool_schema": summary(timed(compile_with(lambda c: c.compile_json_schema(schema, any_whitespace=False)),
                                             repeat)),
        "compile_regex": summary(timed(compile_with(lambda c: c.compile_regex(REGEX)), repeat)),
        "compile_choice": summary(timed(compile_with(
            lambda c: c.compile_grammar("root ::= " + " | ".join(json.dumps(s) for s in CHOICES))), repeat)),
    }
    compiled = xgr.GrammarCompiler(info, max_threads=1).compile_json_schema(schema, any_whitespace=False)
    matchers = [xgr.GrammarMatcher(compiled) for _ in range(rows)]
    bitmask = xgr.allocate_token_bitmask(rows, vocab)
    steps = []
    for token in output_ids:
        start = time.perf_counter()
        for i, m in enumerate(matchers):
            m.fill_next_token_bitmask(bitmask, i)
        steps.append(time.perf_counter() - start)
        for m in matchers:
            assert m.accept_token(token), "xgrammar refused a token of the valid output"
    result["mask_32_rows_per_step"] = summary(steps)
    return result


def bench_llguidance(tokenizer, vocab: int, output_ids: list[int], rows: int, repeat: int) -> dict:
    import llguidance
    import llguidance.hf
    import llguidance.torch as llt

    lltok = llguidance.hf.from_tokenizer(tokenizer, n_vocab=vocab)
    schema = llguidance.LLMatcher.grammar_from_json_schema(json.dumps(TOOL_SCHEMA),
                                                           defaults={"whitespace_flexible": False,
                                                                     "item_separator": ", ", "key_separator": ": "})
    regex = llguidance.LLMatcher.grammar_from_regex(REGEX)
    choice = llguidance.LLMatcher.grammar_from_lark("start: " + " | ".join(json.dumps(s) for s in CHOICES))

    def compile_one(grammar):
        def run():
            matcher = llguidance.LLMatcher(lltok, grammar)
            matcher.compute_bitmask()  # llguidance builds lazily: the first mask pays for the compile
            assert not matcher.is_error(), matcher.get_error()
        return run

    result = {"compile_tool_schema": summary(timed(compile_one(schema), repeat)),
              "compile_regex": summary(timed(compile_one(regex), repeat)),
              "compile_choice": summary(timed(compile_one(choice), repeat))}
    matchers = [llguidance.LLMatcher(lltok, schema) for _ in range(rows)]
    bitmask = llt.allocate_token_bitmask(rows, vocab)
    for i, m in enumerate(matchers):  # the first mask of each matcher (lazy build) is not a decode step
        llt.fill_next_token_bitmask(m, bitmask, i)
        m.reset()
    steps = []
    for token in output_ids:
        start = time.perf_counter()
        for i, m in enumerate(matchers):
            llt.fill_next_token_bitmask(m, bitmask, i)
        steps.append(time.perf_counter() - start)
        for m in matchers:
            assert m.consume_token(token), f"llguidance refused a token of the valid output: {m.get_error()}"
    result["mask_32_rows_per_step"] = summary(steps)
    return result


def cpu_name() -> str:
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True).stdout
        return next(line.split(":", 1)[1].strip() for line in out.splitlines() if line.startswith("Model name"))
    except (OSError, StopIteration):
        return platform.processor()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokenizer-dir", type=Path, default=Path("/tmp/tandem-bench-bpe151k"))
    parser.add_argument("--rows", type=int, default=32)
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    import llguidance
    import xgrammar

    tokenizer = build_tokenizer(args.tokenizer_dir, QWEN_VOCAB)
    vocab = len(tokenizer)
    output_ids = tokenizer.encode(TOOL_OUTPUT)
    from importlib.metadata import version

    result = {
        "machine": {"cpu": cpu_name(), "cores": __import__("os").cpu_count()},
        "vocab_size": vocab, "rows": args.rows, "output_tokens": len(output_ids),
        "versions": {"xgrammar": version("xgrammar"), "llguidance": version("llguidance")},
        "xgrammar": bench_xgrammar(tokenizer, vocab, output_ids, args.rows, args.repeat),
        "llguidance": bench_llguidance(tokenizer, vocab, output_ids, args.rows, args.repeat),
    }
    del llguidance, xgrammar
    text = json.dumps(result, indent=2)
    print(text)
    if args.out:
        args.out.write_text(text + "\n")


if __name__ == "__main__":
    main()
