"""EBNF grammars (xgrammar's dialect, SGLang's `ebnf` sampling parameter) that force tool calls in a
parser's format: tool_choice `required` (one call or more among the tools; exactly one with
`parallel_tool_calls: false`) and a named function (exactly one call to it).

A call is built from xgrammar pieces: literal markup, the tool's JSON schema (`Grammar.from_json_schema`,
no free whitespace: a model cannot loop on blanks; length-bounded strings rewritten as for `json_schema`)
and, for qwen3_coder's raw parameter values, a value rule per schema type. The grammar of one call is
`Grammar.concat` / `Grammar.union` of these, printed as EBNF; "one or more calls" renames that grammar's root
and repeats it."""

from __future__ import annotations

import json
import re

from tandem.runtime.constraints.schema_fixes import fix_length_bounded_strings
from tandem.server.tools.formats import TOOL_CALL_END, TOOL_CALL_START

_CALL_RULE = "tandem_tool_call"
# qwen3_coder raw text values: anything but the start of a closing tag
_TEXT_VALUE = 'root ::= ([^<] | "<" [^/])*'


def _xgr():
    import xgrammar

    return xgrammar


def _literal(text: str):
    return _xgr().Grammar.from_ebnf(f"root ::= {json.dumps(text)}")


def _json(schema: dict):
    return _xgr().Grammar.from_json_schema(fix_length_bounded_strings(json.dumps(schema)), any_whitespace=False,
                                           strict_mode=True)


def _empty():
    return _xgr().Grammar.from_ebnf('root ::= ""')


def _concat(*parts):
    return _xgr().Grammar.concat(*parts)


def _raw_value(schema) -> object:
    """A qwen3_coder value: raw text for strings (or one of a string enum), else the JSON of the schema."""
    if not isinstance(schema, dict):
        return _xgr().Grammar.from_ebnf(_TEXT_VALUE)
    enum = schema.get("enum")
    if isinstance(enum, list) and enum and all(isinstance(v, str) for v in enum):
        return _xgr().Grammar.union(*[_literal(v) for v in enum])
    if schema.get("type") == "string" and "pattern" not in schema and "format" not in schema:
        return _xgr().Grammar.from_ebnf(_TEXT_VALUE)
    if not schema.get("type") and not any(k in schema for k in ("anyOf", "oneOf", "enum", "const", "$ref")):
        return _xgr().Grammar.from_ebnf(_TEXT_VALUE)  # any value: written as text
    return _json(schema)


def _qwen3_coder_call(tool):
    properties = tool.parameters.get("properties", {})
    required = set(tool.parameters.get("required", []))
    parts = [_literal(f"{TOOL_CALL_START}\n<function={tool.name}>\n")]
    for key, schema in properties.items():
        param = _concat(_literal(f"<parameter={key}>\n"), _raw_value(schema), _literal("\n</parameter>\n"))
        parts.append(param if key in required else _xgr().Grammar.union(param, _empty()))
    parts.append(_literal(f"</function>\n{TOOL_CALL_END}"))
    return _concat(*parts)


def _hermes_call(tool):
    call = {"type": "object", "properties": {"name": {"const": tool.name}, "arguments": tool.parameters},
            "required": ["name", "arguments"], "additionalProperties": False}
    return _concat(_literal(f"{TOOL_CALL_START}\n"), _json(call), _literal(f"\n{TOOL_CALL_END}"))


_CALLS = {"qwen3_coder": _qwen3_coder_call, "hermes": _hermes_call}


def tool_call_ebnf(parser: str, tools: list, parallel: bool) -> str:
    """EBNF text forcing one call (or, with `parallel`, one or more separated by newlines) to one of
    `tools` (`spec.Tool`s) in `parser`'s format."""
    calls = [_CALLS[parser](tool) for tool in tools]
    one = calls[0] if len(calls) == 1 else _xgr().Grammar.union(*calls)
    text = str(one)
    if not parallel:
        return text
    renamed, count = re.subn(r"^root ::= ", f"{_CALL_RULE} ::= ", text, count=1, flags=re.MULTILINE)
    if count != 1:
        raise ValueError("the tool-call grammar has no root rule")
    return f'root ::= {_CALL_RULE} ("\\n" {_CALL_RULE})*\n{renamed}'
