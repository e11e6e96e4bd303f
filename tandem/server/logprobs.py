"""OpenAI's logprobs objects, built from what the engine reports per token: its logprob under the model's raw
distribution and, when asked for, the most likely (token id, logprob) pairs at its position.

- /v1/completions (`logprobs: N`, 0-5): {"tokens", "token_logprobs", "top_logprobs", "text_offset"}, one entry
  per token. `top_logprobs[k]` maps token text -> logprob for the N most likely tokens plus the chosen one
  (so up to N + 1 entries, as OpenAI and vLLM answer); with `echo` the prompt's first token has None for
  both, having nothing before it. `text_offset[k]` is where token k's text starts in the choice's text,
  counting the echoed prompt; in a stream it continues across chunks.
- /v1/chat/completions (`logprobs: true`, `top_logprobs: N`, 0-20): {"content": [{"token", "logprob",
  "bytes", "top_logprobs": [{"token", "logprob", "bytes"}]}]}.

A token's text is its own decoding (special tokens included); `bytes` are that text's UTF-8 bytes, so a
token holding part of a multi-byte character shows the replacement character's bytes."""

from __future__ import annotations

from collections.abc import Callable, Sequence

MAX_COMPLETION_LOGPROBS = 5  # OpenAI's limit for /v1/completions `logprobs`
MAX_CHAT_TOP_LOGPROBS = 20  # OpenAI's limit for /v1/chat/completions `top_logprobs`

TokenTexts = Callable[[list[int]], list[str]]
Top = Sequence[tuple[int, float]]  # (token id, logprob), most likely first


def _texts(token_texts: TokenTexts, ids: Sequence[int], tops: Sequence[Top | None]) -> dict[int, str]:
    """The text of every token id mentioned, decoded in one call."""
    wanted = list(dict.fromkeys([*ids, *(t for top in tops if top for t, _ in top)]))
    return dict(zip(wanted, token_texts(wanted)))


def completion_logprobs(token_texts: TokenTexts, ids: Sequence[int], logprobs: Sequence[float | None],
                        tops: Sequence[Top | None], top_n: int, text_offset: int = 0) -> dict:
    """The completions `logprobs` object of tokens `ids` (logprobs[k] None: nothing is known of token k),
    their text starting at `text_offset` of the choice's text."""
    text = _texts(token_texts, ids, tops)
    tokens, offsets, top_dicts = [], [], []
    for token, logprob, top in zip(ids, logprobs, tops):
        tokens.append(text[token])
        offsets.append(text_offset)
        text_offset += len(text[token])
        if logprob is None:
            top_dicts.append(None)
            continue
        entry = {}
        for t, lp in (top or ())[:top_n]:
            entry.setdefault(text[t], lp)
        entry.setdefault(text[token], logprob)
        top_dicts.append(entry)
    return {"tokens": tokens, "token_logprobs": list(logprobs), "top_logprobs": top_dicts, "text_offset": offsets}


def chat_logprobs(token_texts: TokenTexts, ids: Sequence[int], logprobs: Sequence[float],
                  tops: Sequence[Top | None], top_n: int) -> dict:
    """The chat `logprobs` object of tokens `ids`, each with its `top_n` most likely alternatives."""
    text = _texts(token_texts, ids, tops)

    def item(token: int, logprob: float) -> dict:
        return {"token": text[token], "logprob": logprob, "bytes": list(text[token].encode("utf-8"))}

    return {"content": [{**item(token, logprob), "top_logprobs": [item(t, lp) for t, lp in (top or ())[:top_n]]}
                        for token, logprob, top in zip(ids, logprobs, tops)]}


def echoed_prompt(req) -> tuple[list[int], list[float | None], list[Top | None]]:
    """A request's prompt tokens with their logprobs and top pairs (None for the first token)."""
    scored = len(req.prompt_ids) - 1
    tops = list(req.input_top_logprobs[:scored]) if req.top_logprobs_num else [None] * scored
    return list(req.prompt_ids), [None, *req.input_logprobs[:scored]], [None, *tops]
