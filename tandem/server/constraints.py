"""Structured-output request fields -> the engine's constraint sampling params (`json_schema`, `regex`, `ebnf`),
for every name clients use, and a 400 naming any constraint field Tandem does not implement (never a silent
no-op):
- OpenAI `response_format`: `text`, `json_object` (any JSON object), `json_schema` (`{"json_schema": {"name",
  "schema", "strict"}}`; the grammar is always strict) on chat and completions;
- SGLang's `json_schema`, `regex`, `ebnf` as extra body fields of both OpenAI endpoints (and as
  `sampling_params` of /generate, which `SamplingParams` takes as they are);
- vLLM's `structured_outputs` (`json`, `regex`, `choice`, `grammar`, `json_object`, and
  `disable_any_whitespace: true`, which is what Tandem always does) and the older `guided_json`,
  `guided_regex`, `guided_choice`, `guided_grammar`, `guided_decoding_backend: "xgrammar"`.
A `choice` becomes an EBNF grammar of its strings. At most one constraint per request.

`constrain` (one call per endpoint) also compiles the grammar before the request is queued, awaiting the
compile without blocking the event loop or the tokenizer thread, so an invalid schema or regex is a 400."""

from __future__ import annotations

import asyncio
import json
from dataclasses import replace

from tandem.errors import ConfigError
from tandem.runtime.sampling.params import CONSTRAINT_FIELDS
from tandem.server.protocol import APIError

JSON_OBJECT_SCHEMA = json.dumps({"type": "object"})
BACKENDS = ("xgrammar", "auto")  # guided_decoding_backend / structured_outputs.backend values taken
# constraint-ish fields other servers take and Tandem does not implement: a 400 naming them
REFUSED = ("guided_whitespace_pattern", "guided_json_object", "structural_tag", "guided_grammar_backend")
REFUSED_STRUCTURED = ("structural_tag", "whitespace_pattern", "disable_fallback", "disable_additional_properties")


def _schema_text(value, param: str) -> str:
    if isinstance(value, (dict, bool)):
        return json.dumps(value)
    if isinstance(value, str) and value:
        return value
    raise APIError(f"{param} must be a JSON schema (an object or its JSON text), got {value!r}"[:300], param=param)


def _text(value, param: str) -> str:
    if not isinstance(value, str) or not value:
        raise APIError(f"{param} must be a non-empty string, got {value!r}"[:300], param=param)
    return value


def choice_grammar(choices, param: str) -> str:
    """An EBNF grammar (xgrammar's dialect) whose only sentences are the given strings."""
    if not isinstance(choices, list) or not choices or not all(isinstance(c, str) and c for c in choices):
        raise APIError(f"{param} must be a non-empty list of non-empty strings, got {choices!r}"[:300], param=param)
    return "root ::= " + " | ".join(json.dumps(c, ensure_ascii=False) for c in choices)


def _response_format(value) -> tuple[str, str] | None:
    if not isinstance(value, dict):
        raise APIError(f"response_format must be an object, got {value!r}"[:300], param="response_format")
    kind = value.get("type", "text")
    if kind == "text":
        return None
    if kind == "json_object":
        return "json_schema", JSON_OBJECT_SCHEMA
    if kind == "json_schema":
        spec = value.get("json_schema")
        if not isinstance(spec, dict) or "schema" not in spec:
            raise APIError("response_format json_schema needs {\"json_schema\": {\"name\": ..., \"schema\": {...}}}",
                           param="response_format.json_schema")
        if not isinstance(spec.get("strict", True), bool):
            raise APIError("response_format.json_schema.strict must be a boolean", param="response_format")
        return "json_schema", _schema_text(spec["schema"], "response_format.json_schema.schema")
    raise APIError(f"response_format type {kind!r} is not supported (text, json_object, json_schema are)",
                   param="response_format")


def _backend(value, param: str) -> None:
    if value is not None and value not in BACKENDS:
        raise APIError(f"{param} {value!r} is not supported: Tandem's structured output uses xgrammar", param=param)


def _structured_outputs(value) -> dict[str, tuple[str, str]]:
    if not isinstance(value, dict):
        raise APIError(f"structured_outputs must be an object, got {value!r}"[:300], param="structured_outputs")
    found = {}
    for key in value:
        param = f"structured_outputs.{key}"
        item = value[key]
        if item is None or item is False and key == "json_object":
            continue
        if key == "json":
            found[param] = ("json_schema", _schema_text(item, param))
        elif key == "json_object":
            found[param] = ("json_schema", JSON_OBJECT_SCHEMA)
        elif key == "regex":
            found[param] = ("regex", _text(item, param))
        elif key == "grammar":
            found[param] = ("ebnf", _text(item, param))
        elif key == "choice":
            found[param] = ("ebnf", choice_grammar(item, param))
        elif key == "backend":
            _backend(item, param)
        elif key == "disable_any_whitespace":
            if item is not True:
                raise APIError(f"{param} must be true: Tandem's JSON grammars never allow free whitespace",
                               param=param)
        else:
            raise APIError(f"{param} is not supported", param=param)
    return found


# vLLM's older guided_* fields -> (SamplingParams field, its value)
GUIDED = {"guided_json": lambda v, p: ("json_schema", _schema_text(v, p)),
          "guided_regex": lambda v, p: ("regex", _text(v, p)),
          "guided_grammar": lambda v, p: ("ebnf", _text(v, p)),
          "guided_choice": lambda v, p: ("ebnf", choice_grammar(v, p))}
# every request body field `constraint_fields` reads (the server's unknown-field check leaves them to it)
REQUEST_FIELDS = ("response_format", *CONSTRAINT_FIELDS, "structured_outputs", *GUIDED, "guided_decoding_backend",
                  *REFUSED)


def constraint_fields(body: dict, endpoint: str) -> dict:
    """The constraint sampling params asked for by a chat / completions request body ({} for none)."""
    found: dict[str, tuple[str, str]] = {}
    for name in REFUSED:
        if body.get(name) is not None:
            raise APIError(f"{name} is not supported", param=name)
    if body.get("response_format") is not None:
        constraint = _response_format(body["response_format"])
        if constraint:
            found["response_format"] = constraint
    for name in CONSTRAINT_FIELDS:  # SGLang's own fields, named as SamplingParams names them
        if body.get(name) is not None:
            found[name] = (name, _schema_text(body[name], name) if name == "json_schema" else _text(body[name], name))
    if body.get("structured_outputs") is not None:
        found.update(_structured_outputs(body["structured_outputs"]))
    for name, make in GUIDED.items():
        if body.get(name) is not None:
            found[name] = make(body[name], name)
    _backend(body.get("guided_decoding_backend"), "guided_decoding_backend")
    if len(found) > 1:
        raise APIError(f"at most one structured-output constraint per request, got {sorted(found)}",
                       param=sorted(found)[1])
    if not found:
        return {}
    kind, text = next(iter(found.values()))
    return {kind: text}


async def constrain(request, bridge, params, endpoint: str):
    """`params` (one SamplingParams or a list) with the request's constraint fields; the grammar compiled
    (awaited off the event loop), or a 400 with the compiler's message. /generate's constraints are already
    in its sampling_params."""
    many = isinstance(params, list)
    items = params if many else [params]
    if endpoint != "generate":
        body = await request.json()
        fields = constraint_fields(body if isinstance(body, dict) else {}, endpoint)
        if fields:
            try:
                items = [replace(p, **fields) for p in items]
            except ConfigError as exc:
                raise APIError(str(exc), param=next(iter(fields))) from None
    for key in {p.constraint for p in items if p.constraint is not None}:
        try:
            await asyncio.wrap_future(bridge.engine.grammar_future(key))
        except ConfigError as exc:
            raise APIError(str(exc), param=key[0], code="invalid_grammar") from None
    return items if many else items[0]
