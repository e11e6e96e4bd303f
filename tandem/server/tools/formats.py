"""The tool-call formats a model writes, by SGLang's `--tool-call-parser` name.

Both wrap each call in `<tool_call>` ... `</tool_call>`; what is inside differs:
- `qwen3_coder` (Qwen3-Coder, Qwen3.5): `<function=NAME>` then per argument `<parameter=KEY>\nVALUE\n</parameter>`,
  then `</function>`. Values are raw text, converted by the tool's JSON-schema type of that parameter
  (`convert_value`): strings stay text, integers / numbers / booleans / null are parsed, objects and arrays
  are JSON. A value that does not convert is kept as text (as SGLang and vLLM do).
- `hermes` (Qwen2.5, Qwen3, NousResearch Hermes): a JSON object {"name": NAME, "arguments": {...}}.

`parse(inner, tools)` turns one block's inside into (name, arguments dict), or None when it is malformed or
names a function that is not among the tools (the caller leaves such a block as content).
`argument_fragments(arguments)` is the arguments' JSON text cut into pieces (one per argument), whose
concatenation is `json.dumps(arguments, ensure_ascii=False)`: what streaming sends and what the
non-streaming answer holds."""

from __future__ import annotations

import json
import re

TOOL_CALL_START, TOOL_CALL_END = "<tool_call>", "</tool_call>"
_FUNCTION = re.compile(r"^\s*<function=([^>\n]+)>(.*)</function>\s*$", re.DOTALL)
_PARAMETER = re.compile(r"<parameter=([^>\n]+)>(.*?)</parameter>", re.DOTALL)


def _strip_one_newline(text: str) -> str:
    """The template writes "\n" around a value: drop one on each side, keep any other whitespace."""
    if text.startswith("\n"):
        text = text[1:]
    if text.endswith("\n"):
        text = text[:-1]
    return text


def _schema_types(schema) -> list[str]:
    if not isinstance(schema, dict):
        return []
    kind = schema.get("type")
    if isinstance(kind, str):
        return [kind]
    if isinstance(kind, list):
        return [k for k in kind if isinstance(k, str)]
    if "enum" in schema and all(isinstance(v, str) for v in schema["enum"]):
        return ["string"]
    return [t for sub in schema.get("anyOf", []) + schema.get("oneOf", []) for t in _schema_types(sub)]


def convert_value(text: str, schema) -> object:
    """A qwen3_coder parameter's text as the JSON value its schema asks for (text when it does not convert)."""
    types = _schema_types(schema)
    if not types or "string" in types and len(types) == 1:
        return text
    stripped = text.strip()
    if stripped == "null" and "null" in types:
        return None
    for kind in types:
        if kind == "integer":
            try:
                return int(stripped)
            except ValueError:
                continue
        if kind == "number":
            try:
                number = float(stripped)
            except ValueError:
                continue
            return int(number) if number.is_integer() and re.fullmatch(r"-?\d+", stripped) else number
        if kind == "boolean" and stripped in ("true", "false"):
            return stripped == "true"
        if kind in ("object", "array"):
            try:
                value = json.loads(stripped)
            except ValueError:
                continue
            if isinstance(value, dict if kind == "object" else list):
                return value
    return text


def parse_qwen3_coder(inner: str, tools: dict) -> tuple[str, dict] | None:
    match = _FUNCTION.match(inner)
    if match is None:
        return None
    name, body = match.group(1).strip(), match.group(2)
    tool = tools.get(name)
    if tool is None:
        return None
    properties = tool.parameters.get("properties", {})
    arguments = {}
    for found in _PARAMETER.finditer(body):
        key = found.group(1).strip()
        arguments[key] = convert_value(_strip_one_newline(found.group(2)), properties.get(key))
    if _PARAMETER.sub("", body).strip():  # text outside any <parameter>: not this format
        return None
    return name, arguments


def parse_hermes(inner: str, tools: dict) -> tuple[str, dict] | None:
    try:
        call = json.loads(inner)
    except ValueError:
        return None
    if not isinstance(call, dict) or set(call) - {"name", "arguments"}:
        return None
    name, arguments = call.get("name"), call.get("arguments", {})
    if isinstance(arguments, str):  # some models write the arguments as JSON text
        try:
            arguments = json.loads(arguments)
        except ValueError:
            return None
    if not isinstance(name, str) or name not in tools or not isinstance(arguments, dict):
        return None
    return name, arguments


TOOL_CALL_PARSERS = {"qwen3_coder": parse_qwen3_coder, "hermes": parse_hermes}


def argument_fragments(arguments: dict) -> list[str]:
    """`json.dumps(arguments, ensure_ascii=False)` cut before each argument (see the module docstring)."""
    if not arguments:
        return ["{}"]
    pieces = [("{" if i == 0 else ", ") + json.dumps(key, ensure_ascii=False) + ": "
              + json.dumps(value, ensure_ascii=False) for i, (key, value) in enumerate(arguments.items())]
    pieces[-1] += "}"
    return pieces
