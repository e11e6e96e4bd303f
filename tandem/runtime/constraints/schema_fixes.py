"""A JSON schema rewrite that works around two xgrammar bugs (0.2.9) in length-bounded strings: a string
with minLength / maxLength (and no pattern) is compiled to a rule that accepts raw control characters
(U+0000..U+001F), which JSON forbids in strings, so a model could produce output no JSON parser reads
(mlc-ai/xgrammar #286 and #636 report the same class of bug); and every string rule accepts the UTF-8
encoding of surrogates (U+D800..U+DFFF), which is not valid UTF-8: each decodes to three U+FFFD, so the text
breaks maxLength. Such strings get the equivalent `pattern` of 'min..max characters that need no escape and
are not surrogates' (escape sequences are then not generated in them). A third bug shapes that pattern: inside
a JSON schema, xgrammar turns one character class whose ranges cross UTF-8 length boundaries into byte rules
that allow overlong forms (E0 80..9F, F0 80..8F: four U+FFFD where the grammar counted one character), so
the class is written as one alternative per encoded length, which it compiles exactly.
Strings without a length bound keep xgrammar's rule (their text is valid JSON either way)."""

from __future__ import annotations

import json

# any character but a control character, '"' or '\\', and no surrogate (U+D800..U+DFFF, not UTF-8), one
# alternative per UTF-8 length (1, 2, 3 below and above the surrogates, 4 bytes)
_SAFE_CHAR = r'(?:[ !#-\[\]-\x7f]|[\x80-\u07ff]|[\u0800-\ud7ff]|[\ue000-\uffff]|[\u{10000}-\u{10ffff}])'
_SUBSCHEMA_LISTS = ("anyOf", "oneOf", "allOf", "prefixItems")
_SUBSCHEMA_MAPS = ("properties", "$defs", "definitions", "patternProperties")
_SUBSCHEMA_ONE = ("items", "additionalProperties", "not", "contains")


def _fix(node) -> None:
    if not isinstance(node, dict):
        return
    bounded = "minLength" in node or "maxLength" in node
    if node.get("type") == "string" and bounded and not {"pattern", "format", "enum", "const"} & node.keys():
        low, high = node.get("minLength", 0), node.get("maxLength", "")
        if isinstance(low, int) and (high == "" or isinstance(high, int)):
            node["pattern"] = f"^{_SAFE_CHAR}{{{low},{high}}}$"
            node.pop("minLength", None)  # (xgrammar ignores them beside a pattern, with a warning)
            node.pop("maxLength", None)
    for key in _SUBSCHEMA_LISTS:
        for child in node.get(key, []) if isinstance(node.get(key), list) else []:
            _fix(child)
    for key in _SUBSCHEMA_MAPS:
        if isinstance(node.get(key), dict):
            for child in node[key].values():
                _fix(child)
    for key in _SUBSCHEMA_ONE:
        _fix(node.get(key))


def fix_length_bounded_strings(schema_text: str) -> str:
    """`schema_text` with length-bounded strings given a safe pattern; unchanged if it is not a JSON object
    (the compiler then reports what is wrong with it)."""
    try:
        schema = json.loads(schema_text)
    except ValueError:
        return schema_text
    if not isinstance(schema, dict):
        return schema_text
    _fix(schema)
    return json.dumps(schema)
