"""The request's `tools`, `tool_choice` and `parallel_tool_calls`, checked (400s naming the field) and
resolved into a `ToolPlan`: which tools the template sees, whether the output is parsed for calls, the
tools a call may name, and whether structured output must force a call (`required`, or a named function).

OpenAI's rules: each tool is {"type": "function", "function": {"name", "description"?, "parameters"?,
"strict"?}}; `tool_choice` is "none", "auto" (the default with tools), "required", or {"type": "function",
"function": {"name": NAME}} naming one of the tools; tool_choice without tools is a 400 (except "none")."""

from __future__ import annotations

import re
from dataclasses import dataclass, field

from tandem.server.protocol import APIError

MAX_TOOLS = 128  # OpenAI's limit on tools per request
_NAME = re.compile(r"^[A-Za-z0-9_.\-]{1,64}$")  # OpenAI's function names: a-z, A-Z, 0-9, _ . - (64 at most)
_FUNCTION_KEYS = {"name", "description", "parameters", "strict"}


@dataclass(frozen=True)
class Tool:
    name: str
    parameters: dict  # a JSON schema of an object ({"type": "object", "properties": {}} when not given)
    raw: dict  # the request's {"type": "function", "function": {...}} entry, for the chat template


@dataclass
class ToolPlan:
    """What a chat request does with tools (see the module docstring)."""

    tools: list[Tool] = field(default_factory=list)
    parse: bool = False  # parse the output for calls
    forced: list[Tool] | None = None  # tools a call is forced among (required: all, named: one)
    parallel: bool = True  # more than one call per answer

    @property
    def template_tools(self) -> list[dict] | None:
        return [t.raw for t in self.tools] if self.parse else None

    def by_name(self) -> dict[str, Tool]:
        return {t.name: t for t in self.tools}


def _check_tool(i: int, entry) -> Tool:
    param = f"tools.{i}"
    if not isinstance(entry, dict) or entry.get("type", "function") != "function":
        raise APIError(f"{param}: only tools of type 'function' are supported, got {entry!r}"[:300], param=param)
    function = entry.get("function")
    if not isinstance(function, dict):
        raise APIError(f"{param}.function is required: an object with a `name`", param=f"{param}.function")
    unknown = sorted(set(function) - _FUNCTION_KEYS)
    if unknown:
        raise APIError(f"{param}.function has unknown field(s) {unknown}", param=f"{param}.function")
    name = function.get("name")
    if not isinstance(name, str) or not _NAME.match(name):
        raise APIError(f"{param}.function.name must be 1-64 characters of a-z, A-Z, 0-9, '_', '.' or '-', "
                       f"got {name!r}"[:300], param=f"{param}.function.name")
    parameters = function.get("parameters", {"type": "object", "properties": {}})
    if not isinstance(parameters, dict) or parameters.get("type", "object") != "object":
        raise APIError(f"{param}.function.parameters must be a JSON schema of type 'object'",
                       param=f"{param}.function.parameters")
    if not isinstance(parameters.get("properties", {}), dict):
        raise APIError(f"{param}.function.parameters.properties must be an object",
                       param=f"{param}.function.parameters")
    return Tool(name, parameters, {"type": "function", "function": dict(function)})


def check_tools(tools) -> list[Tool]:
    if not isinstance(tools, list) or not tools:
        raise APIError("tools must be a non-empty list", param="tools")
    if len(tools) > MAX_TOOLS:
        raise APIError(f"tools has {len(tools)} entries; at most {MAX_TOOLS} are accepted", param="tools")
    checked = [_check_tool(i, entry) for i, entry in enumerate(tools)]
    names = [t.name for t in checked]
    duplicates = sorted({n for n in names if names.count(n) > 1})
    if duplicates:
        raise APIError(f"tools define {duplicates} more than once", param="tools")
    return checked


def _named_choice(choice: dict, tools: list[Tool]) -> Tool:
    function = choice.get("function")
    name = function.get("name") if isinstance(function, dict) else None
    if choice.get("type") != "function" or not isinstance(name, str):
        raise APIError("tool_choice must be 'none', 'auto', 'required' or {\"type\": \"function\", \"function\": "
                       "{\"name\": NAME}}", param="tool_choice")
    for tool in tools:
        if tool.name == name:
            return tool
    raise APIError(f"tool_choice names the function {name!r}, which is not among the tools "
                   f"{[t.name for t in tools]}", param="tool_choice")


def plan_tools(tools, tool_choice, parallel_tool_calls: bool | None, parser: str | None) -> ToolPlan:
    """The request's `ToolPlan`; `parser` is the server's --tool-call-parser (None: calls cannot be parsed)."""
    if not tools:
        if tool_choice not in (None, "none"):
            raise APIError("tool_choice needs tools", param="tool_choice")
        return ToolPlan(parallel=parallel_tool_calls is not False)
    checked = check_tools(tools)
    choice = "auto" if tool_choice is None else tool_choice
    if choice == "none":
        return ToolPlan(tools=checked, parallel=parallel_tool_calls is not False)
    if parser is None:
        raise APIError("this server parses no tool calls: start it with --tool-call-parser (qwen3_coder or "
                       "hermes) to use tools", param="tools")
    if isinstance(choice, dict):
        forced = [_named_choice(choice, checked)]
    elif choice == "required":
        forced = checked
    elif choice == "auto":
        forced = None
    else:
        raise APIError(f"tool_choice must be 'none', 'auto', 'required' or a named function, got {choice!r}"[:300],
                       param="tool_choice")
    # a named function is one call (OpenAI); parallel_tool_calls false is one call too
    parallel = parallel_tool_calls is not False and not isinstance(choice, dict)
    return ToolPlan(tools=checked, parse=True, forced=forced, parallel=parallel)
