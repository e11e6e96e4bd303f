"""Grammar compilation for structured output (xgrammar, SGLang's default backend; bench/results/
grammar_backends.json has the comparison with llguidance behind that choice).

`GrammarCache` compiles a request's constraint (`SamplingParams.constraint`: json_schema, regex or ebnf) on a
worker thread, off the step loop, and keeps the result by its key (kind, text): requests with the same
grammar share one compile. JSON schemas are compiled without free whitespace (xgrammar's
`any_whitespace=False`, as vLLM's `disable_any_whitespace`: separators are exactly ", " and ": "), so a
model cannot loop on blanks (and after `schema_fixes`, which works around an xgrammar bug with
length-bounded strings). A grammar that fails to compile is a `ConfigError` carrying the compiler's
message."""

from __future__ import annotations

import re
import threading
from collections import OrderedDict
from concurrent.futures import Future, ThreadPoolExecutor

from tandem.errors import ConfigError
from tandem.runtime.constraints.schema_fixes import fix_length_bounded_strings

MAX_CACHED_GRAMMARS = 1024
COMPILE_THREADS = 1  # the step loop and the ranks need the other cores

# xgrammar prefixes its messages with "[time] /project/cpp/file.cc:line: " and sometimes "Check failed: ..."
_LOCATION = re.compile(r"^\[[0-9:]+\] \S+:\d+: (Check failed: .*? is false: )?")


def compiler_message(exc: BaseException) -> str:
    return _LOCATION.sub("", str(exc).strip()).strip()


class GrammarCache:
    """Compiled grammars by key, compiled on a worker thread. Thread-safe."""

    def __init__(self, tokenizer, vocab_size: int, stop_token_ids: list[int]):
        import xgrammar as xgr

        self.vocab_size = vocab_size
        self.tokenizer_info = xgr.TokenizerInfo.from_huggingface(tokenizer, vocab_size=vocab_size,
                                                                 stop_token_ids=list(stop_token_ids))
        self._compiler = xgr.GrammarCompiler(self.tokenizer_info, max_threads=COMPILE_THREADS, cache_enabled=False)
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="tandem-grammar")
        self._futures: OrderedDict[tuple[str, str], Future] = OrderedDict()
        self._lock = threading.Lock()

    def future(self, key: tuple[str, str]) -> Future:
        """The compile of `key` (started now if it is not cached); its result is an xgrammar CompiledGrammar,
        its exception a ConfigError."""
        with self._lock:
            future = self._futures.get(key)
            if future is None:
                future = self._futures[key] = self._pool.submit(self._compile, key)
                while len(self._futures) > MAX_CACHED_GRAMMARS:
                    self._futures.popitem(last=False)
            else:
                self._futures.move_to_end(key)
            return future

    def get(self, key: tuple[str, str]):
        """The compiled grammar of `key`, waiting for its compile; ConfigError if it does not compile."""
        return self.future(key).result()

    def _compile(self, key: tuple[str, str]):
        kind, text = key
        try:
            if kind == "json_schema":
                return self._compiler.compile_json_schema(fix_length_bounded_strings(text), any_whitespace=False,
                                                          strict_mode=True)
            if kind == "regex":
                return self._compiler.compile_regex(text)
            if kind == "ebnf":
                return self._compiler.compile_grammar(text)
        except Exception as exc:  # xgrammar raises RuntimeError (and a few others) with the parser's message
            raise ConfigError(f"{kind} does not compile: {compiler_message(exc)}"[:2000]) from None
        raise ConfigError(f"unknown constraint kind {kind!r}")

    def shutdown(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)
