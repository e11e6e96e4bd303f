"""Prompts in, results out: the one place where a prompt becomes the token ids of a request, and a request
becomes SGLang's result {"text", "output_ids", "meta_info"}.

A prompt is text, token ids, a batch of either, or chat messages (rendered with the tokenizer's chat
template). `PromptBuilder` turns each into token-id lists and checks them: every id is in the vocabulary,
the prompt is not empty and leaves room for one new token in the context. A bad prompt raises
`PromptError`, a `ConfigError` naming the request field it is about (`field`) and, for a prompt too long
for the context, the code "context_length_exceeded": `Engine.generate` raises it as it is, the server
answers it with a 400 naming that field. `Engine`, /generate and the OpenAI endpoints all build their
requests here, and `Engine.generate` and /generate their results."""

from __future__ import annotations

from collections.abc import Callable

from tandem.errors import ConfigError
from tandem.runtime.scheduling.request import Request


class PromptError(ConfigError):
    """A prompt that cannot become a request; `field` names the request field, `code` the OpenAI code."""

    def __init__(self, message: str, field: str | None = None, code: str | None = None):
        super().__init__(message)
        self.field, self.code = field, code


def render_chat(tokenizer, messages: list[dict], field: str = "messages") -> str:
    """Chat messages ({"role", "content"}; content a string, None, or a list of text parts) as the text the
    tokenizer's chat template makes of them, ending with the assistant's turn."""
    if tokenizer is None or not getattr(tokenizer, "chat_template", None):
        raise PromptError("this model has no chat template: pass the prompt as text or token ids", field)
    rendered = []
    for message in messages:
        content = message.get("content")
        if isinstance(content, list):
            if not all(part.get("type") == "text" and isinstance(part.get("text"), str) for part in content):
                raise PromptError("only text content parts are supported", field)
            content = "".join(part["text"] for part in content)
        rendered.append({"role": message.get("role"), "content": content or ""})
    try:
        return tokenizer.apply_chat_template(rendered, tokenize=False, add_generation_prompt=True)
    except Exception as exc:
        raise PromptError(f"the chat template rejected the messages: {exc}", field) from None


class PromptBuilder:
    """Prompts of one model -> checked token-id lists (see the module docstring). `tokenizer` may be None:
    then only token-id prompts are accepted. `check_length(num_tokens)` raises a ConfigError for a prompt
    that cannot run: the engine passes its scheduler's `check_prompt`, the one length check, whose limits
    follow a restart of the ranks."""

    def __init__(self, tokenizer, vocab_size: int, check_length: Callable[[int], None]):
        self.tokenizer, self.vocab_size, self.check_length = tokenizer, vocab_size, check_length

    def check(self, ids: list[int], field: str) -> list[int]:
        """`ids`, if every one is a token id and the prompt fits the context; else a PromptError."""
        for t in ids:
            if not isinstance(t, int) or isinstance(t, bool) or not 0 <= t < self.vocab_size:
                raise PromptError(f"{field} contains {t!r}, which is not a token id in [0, {self.vocab_size})",
                                  field)
        try:
            self.check_length(len(ids))
        except ConfigError as exc:
            raise PromptError(str(exc), field, "context_length_exceeded" if ids else None) from None
        return ids

    def from_text(self, text, field: str) -> tuple[list[list[int]], bool]:
        """A string or a list of strings -> (token-id lists, whether a list was given)."""
        if self.tokenizer is None:
            raise PromptError("this model has no tokenizer: pass token ids instead of text", field)
        batch = not isinstance(text, str)
        texts = list(text) if batch else [text]
        return [self.check(self.tokenizer.encode(t), field) for t in texts], batch

    def from_ids(self, ids, field: str) -> tuple[list[list[int]], bool]:
        """Token ids or a list of token-id lists -> (token-id lists, whether a list of lists was given)."""
        batch = bool(ids) and all(isinstance(p, (list, tuple)) for p in ids)
        prompts = [list(p) for p in ids] if batch else [list(ids)]
        return [self.check(p, field) for p in prompts], batch

    def from_either(self, text, ids, text_field: str, ids_field: str) -> tuple[list[list[int]], bool]:
        """Exactly one of `text` (see from_text) and `ids` (see from_ids), as /generate and
        Engine.generate take them."""
        if (text is None) == (ids is None):
            raise PromptError(f"pass exactly one of {text_field} or {ids_field}", text_field)
        return self.from_ids(ids, ids_field) if ids is not None else self.from_text(text, text_field)

    def from_prompt(self, prompt, field: str = "prompt") -> list[list[int]]:
        """OpenAI's `prompt`: a string, a list of strings, token ids or a list of token-id lists."""
        is_text = isinstance(prompt, str) or (bool(prompt) and isinstance(prompt[0], str))
        return (self.from_text(prompt, field) if is_text else self.from_ids(prompt, field))[0]

    def from_chat(self, messages: list[dict], field: str = "messages") -> list[int]:
        """Chat messages (see render_chat) -> the token ids of the rendered conversation."""
        text = render_chat(self.tokenizer, messages, field)
        # the template already wrote any special tokens (BOS included) it wants
        return self.check(self.tokenizer.encode(text, add_special_tokens=False), field)


def output_text(finish_reason: dict | None, output_ids: list[int], decode: Callable[[list[int]], str]) -> str:
    """The text of `output_ids`; after a stop string matched, the text before it (as OpenAI answers)."""
    text = decode(output_ids)
    matched = (finish_reason or {}).get("matched")
    if isinstance(matched, str):
        text = text[: text.find(matched)]
    return text


def build_result(req: Request, decode: Callable[[list[int]], str] | None = None, return_logprob: bool = False,
                 logprob_start_len: int = -1, **meta) -> dict:
    """SGLang's result for `req`, finished or still running: {"text", "output_ids", "meta_info"}.

    "text" only with `decode` (the model has a tokenizer). meta_info holds prompt_tokens, completion_tokens,
    finish_reason, the `meta` given (the server adds its id and latency) and, with `return_logprob`,
    output_token_logprobs as (logprob, token id) pairs; with `logprob_start_len` >= 0 also
    input_token_logprobs of the prompt tokens from that position on (position 0 has none). When the request
    asked for top_logprobs_num N > 0, output_top_logprobs (and with input logprobs input_top_logprobs) hold,
    per token of those lists, the N most likely (logprob, token id) pairs at its position (SGLang's names;
    SGLang's entries add a third element, the token's text, None unless asked for)."""
    reason = req.finish_reason  # read before the ids: once finished, the ids are complete
    ids = req.output_ids[:]  # a running request's lists grow on the engine's thread
    info = {"prompt_tokens": len(req.prompt_ids), "completion_tokens": len(ids), "finish_reason": reason,
            "cached_tokens": req.cached_tokens, **meta}
    if return_logprob:
        info["output_token_logprobs"] = list(zip(req.output_logprobs[:len(ids)], ids))
        if req.top_logprobs_num:
            info["output_top_logprobs"] = [swap_pairs(top) for top in req.output_top_logprobs[:len(ids)]]
        if logprob_start_len >= 0:
            start = max(logprob_start_len, 1)
            info["input_token_logprobs"] = list(zip(req.input_logprobs[start - 1:], req.prompt_ids[start:]))
            if req.top_logprobs_num:
                info["input_top_logprobs"] = [swap_pairs(top) for top in req.input_top_logprobs[start - 1:]]
    if req.speculative:
        info.update(spec_meta(req))
    result = {"text": output_text(reason, ids, decode)} if decode is not None else {}
    result.update(output_ids=ids, meta_info=info)
    return result


def spec_meta(req: Request) -> dict:
    """SGLang's speculative-decoding fields: verify passes, drafts proposed and accepted, the accept rate
    (accepted over proposed drafts) and the accept length: the tokens a verify pass emits on average (its
    accepted drafts plus the target's own token; 0 without a verify pass). SGLang divides all completion
    tokens by the verify passes instead, which counts the prefill's token and, with NGRAM, the plain decode
    steps of positions without a match as if a verify pass had emitted them."""
    verify = req.spec_verify_ct
    return {"spec_verify_ct": verify, "spec_proposed_drafts": req.spec_proposed_drafts,
            "spec_accepted_drafts": req.spec_accepted_drafts,
            "spec_accept_rate": req.spec_accepted_drafts / req.spec_proposed_drafts if req.spec_proposed_drafts
            else 0.0,
            "spec_accept_length": (req.spec_accepted_drafts + verify) / verify if verify else 0.0}


def swap_pairs(top) -> list[tuple[float, int]]:
    """The engine's (token id, logprob) pairs as SGLang's (logprob, token id)."""
    return [(logprob, token) for token, logprob in top]
