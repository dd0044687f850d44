"""Bounds on a client's JSON schema, checked before it becomes a llama.cpp grammar.

`response_format` schemas reach two pieces of code that trust their input:
llama-cpp-python's converter (`json_schema_to_gbnf`, pure Python) and
llama.cpp's grammar compiler (`llama_sampler_init_grammar`, C++ and recursive).
Measured on llama-cpp-python 0.3.36 with Gemma 3's vocabulary, on a thread
with the default 8 MiB stack:

- a bound of N (maxLength, maxItems, a pattern's `{0,N}`) becomes N nested
  GBNF groups; llama.cpp compiles up to N = 1000, refuses 1007 and more, and
  overflows its stack (SIGSEGV, the whole server) from N of about 18,700;
- the converter is quadratic in the optional properties of one object (900
  take 3 s, 1000 raise RecursionError), in property names that escape to the
  same rule name (3000 take 1.4 s), and in pattern literals (1 MB takes 7 s);
  it is exponential in `$ref`s whose names it has to escape (18 levels of a
  2 KB schema take 1 s, each level doubles it);
- llama.cpp's compile time is quadratic in alternatives (30,000 enum values
  take 2.5 s), and each sampled token costs about 0.7-1.4 ms per alternative
  still open (a 1000-value enum: 1.4 s for the first token), on the engine's
  one thread, whatever the schema's size.

Each bound below sits well inside those numbers, so a refused schema costs
microseconds and an accepted one converts and compiles in milliseconds.
A refusal is an `InvalidRequestError` naming `response_format`, the limit and
the offending value.
"""

from __future__ import annotations

import re
from typing import Any, NoReturn

from llama_cpp.llama_grammar import RESERVED_NAMES

from app.engine.types import InvalidRequestError

# Nested GBNF groups per bound: half of what llama.cpp compiles, 37x below the crash.
MAX_REPETITION = 500
# JSON nesting of the schema document; object schemas take two levels each.
MAX_DEPTH = 64
# Object keys plus values, counting each `$ref` expansion the converter will do.
MAX_NODES = 4096
# Characters in all keys and strings of the schema.
MAX_SCHEMA_CHARS = 100_000
MAX_PATTERN_CHARS = 1000
MAX_PATTERN_ALTERNATIVES = 128
# enum values, anyOf/oneOf branches and type-list entries in the whole schema: half OpenAI's 1000,
# because each one still open costs about 1.4 ms of every sampled token on the engine's thread.
MAX_ALTERNATIVES = 500
# Properties that may be left out, per object (the converter is quadratic in them).
MAX_OPTIONAL_PROPERTIES = 64
# The converted grammar, in characters.
MAX_GRAMMAR_CHARS = 512 * 1024

_BOUND_KEYWORDS = ("minLength", "maxLength", "minItems", "maxItems")
# Values under these keywords are data, not schemas: their keys are not keywords.
_DATA_KEYWORDS = frozenset(("const", "enum", "default", "examples"))
# Values under these keywords map names to schemas.
_NAME_KEYWORDS = frozenset(("properties", "$defs", "definitions", "patternProperties", "dependentSchemas"))
_DEFINITION_KEYWORDS = frozenset(("$defs", "definitions"))
_SCHEMA, _NAMES, _DATA = "schema", "names", "data"
_ALTERNATIVE_KEYWORDS = ("enum", "anyOf", "oneOf", "type")
_QUANTIFIER = re.compile(r"\{\s*(\d*)\s*(?:,\s*(\d*)\s*)?\}")
_SURROGATE = re.compile("[\ud800-\udfff]")
# A $ref whose last segment is already a valid rule name is converted once and reused;
# any other is converted again at every use.
_REUSABLE_REF_NAME = re.compile(r"[a-zA-Z0-9-]+")
_POINTER_SEGMENT_CHARS = 40


def check_schema(schema: Any) -> None:
    """Refuse a schema that could crash or stall the grammar converter or compiler."""
    # The size pass comes first: it stops early, and bounds the work of the passes after it.
    _check_size(schema)
    if _check_keywords(schema):
        _check_ref_expansion(schema)


def check_grammar(gbnf: str) -> None:
    """Refuse a converted grammar too large to compile per request."""
    if len(gbnf) > MAX_GRAMMAR_CHARS:
        _refuse(f"its grammar has {len(gbnf)} characters, more than the limit of {MAX_GRAMMAR_CHARS}")


def _refuse(what: str) -> NoReturn:
    raise InvalidRequestError(f"response_format schema refused: {what}", param="response_format")


def _pointer(path: tuple[Any, ...]) -> str:
    """JSON Pointer of a place in the schema, for the client to find it.

    Segments are shortened and their surrogates escaped: the message itself must stay small
    and encodable, whatever names the client chose.
    """
    parts = []
    for part in path:
        text = _SURROGATE.sub(lambda m: f"\\u{ord(m.group()):04x}", str(part))
        if len(text) > _POINTER_SEGMENT_CHARS:
            text = text[:_POINTER_SEGMENT_CHARS] + "..."
        parts.append("/" + text.replace("~", "~0").replace("/", "~1"))
    return "".join(parts) or "/"


def _check_size(schema: Any) -> None:
    """Nodes (keys and values), depth, characters and lone surrogates, without recursion."""
    nodes = 1
    chars = 0
    stack: list[tuple[Any, tuple[Any, ...]]] = [(schema, ())]
    while stack:
        node, path = stack.pop()
        if len(path) > MAX_DEPTH:
            _refuse(f"nesting depth {len(path)} at {_pointer(path)} exceeds the limit of {MAX_DEPTH}")
        # A container counts its children before they are read, so a huge one costs nothing to refuse.
        texts: list[tuple[str, tuple[Any, ...]]] = []
        if isinstance(node, dict):
            nodes += 2 * len(node)
        elif isinstance(node, list):
            nodes += len(node)
        if nodes > MAX_NODES:
            _refuse(f"more than {MAX_NODES} keys and values (at {_pointer(path)})")
        if isinstance(node, dict):
            texts = [(str(key), path + (key,)) for key in node]
            stack.extend((value, path + (key,)) for key, value in node.items())
        elif isinstance(node, list):
            stack.extend((value, path + (i,)) for i, value in enumerate(node))
        elif isinstance(node, str):
            texts = [(node, path)]
        for text, where in texts:
            # The size test comes first so the surrogate scan never reads more than the limit.
            chars += len(text)
            if chars > MAX_SCHEMA_CHARS:
                _refuse(f"more than {MAX_SCHEMA_CHARS} characters of keys and strings (at {_pointer(where)})")
            found = _SURROGATE.search(text)
            if found:
                # JSON escapes such as "\ud800" decode to lone surrogates: no grammar can be encoded with one.
                _refuse(f"lone UTF-16 surrogate U+{ord(found.group()):04X} at {_pointer(where)}")


def _check_keywords(schema: Any) -> bool:
    """Check the keywords of every subschema; True when one has a `$ref` to expand."""
    has_refs = False
    alternatives = 0
    stack: list[tuple[Any, tuple[Any, ...], str]] = [(schema, (), _SCHEMA)]
    while stack:
        node, path, kind = stack.pop()
        if isinstance(node, list):
            stack.extend((value, path + (i,), kind) for i, value in enumerate(node))
            continue
        if not isinstance(node, dict) or kind == _DATA:
            if isinstance(node, dict):
                stack.extend((value, path + (key,), _DATA) for key, value in node.items())
            continue
        if kind == _NAMES:
            # Keys of `properties` and `$defs` are names, even a property called "enum".
            stack.extend((value, path + (key,), _SCHEMA) for key, value in node.items())
            continue
        for key, value in node.items():
            child = _DATA if key in _DATA_KEYWORDS else _NAMES if key in _NAME_KEYWORDS else _SCHEMA
            stack.append((value, path + (key,), child))
        for keyword in _BOUND_KEYWORDS:
            value = node.get(keyword)
            # A property named like a keyword has a schema (a dict) as its value: not a bound.
            if isinstance(value, (int, float)):
                _check_bound(keyword, value, path + (keyword,))
        pattern = node.get("pattern")
        if isinstance(pattern, str):
            _check_pattern(pattern, path + ("pattern",))
        for keyword in _ALTERNATIVE_KEYWORDS:
            value = node.get(keyword)
            if isinstance(value, list):
                alternatives += len(value)
                if alternatives > MAX_ALTERNATIVES:
                    _refuse(f"more than {MAX_ALTERNATIVES} enum values and anyOf/oneOf/type alternatives "
                            f"in all (at {_pointer(path + (keyword,))})")
        optional = _optional_properties(schema, node)
        if optional > MAX_OPTIONAL_PROPERTIES:
            _refuse(f"{optional} optional properties at {_pointer(path)} exceed the limit of "
                    f"{MAX_OPTIONAL_PROPERTIES} per object (list the others in required)")
        has_refs = has_refs or isinstance(node.get("$ref"), str)
    return has_refs


def _check_bound(keyword: str, value: float, path: tuple[Any, ...]) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= MAX_REPETITION:
        _refuse(f"{keyword} {value!r} at {_pointer(path)} must be an integer from 0 to {MAX_REPETITION}")


def _check_pattern(pattern: str, path: tuple[Any, ...]) -> None:
    if len(pattern) > MAX_PATTERN_CHARS:
        _refuse(f"pattern of {len(pattern)} characters at {_pointer(path)} exceeds the limit of "
                f"{MAX_PATTERN_CHARS}")
    alternatives = pattern.count("|") + 1
    if alternatives > MAX_PATTERN_ALTERNATIVES:
        _refuse(f"pattern with {alternatives} alternatives at {_pointer(path)} exceeds the limit of "
                f"{MAX_PATTERN_ALTERNATIVES}")
    for match in _QUANTIFIER.finditer(pattern):
        for digits in match.groups():
            # Compare the length first: int() of thousands of digits is itself slow.
            if digits and (len(digits) > 6 or int(digits) > MAX_REPETITION):
                _refuse(f"pattern quantifier {match.group()} at {_pointer(path)} exceeds the limit of "
                        f"{MAX_REPETITION} repetitions")


def _optional_properties(schema: Any, node: dict[Any, Any]) -> int:
    """Properties the converter may leave out of this object, as it counts them."""
    count = 0
    properties = node.get("properties")
    if isinstance(properties, dict):
        required = node.get("required")
        names = set(required) if isinstance(required, list) and all(isinstance(r, str) for r in required) else set()
        count += sum(1 for name in properties if name not in names)
    additional = node.get("additionalProperties")
    if additional is True or isinstance(additional, dict):
        count += 1
    # allOf merges its components into one object; those inside an anyOf become optional.
    components = node.get("allOf")
    if isinstance(components, list):
        for component in components:
            branches = component.get("anyOf") if isinstance(component, dict) else None
            for branch in branches if isinstance(branches, list) else []:
                target = _resolve(schema, branch.get("$ref")) if isinstance(branch, dict) else None
                merged = target if isinstance(target, dict) else branch
                if isinstance(merged, dict) and isinstance(merged.get("properties"), dict):
                    count += len(merged["properties"])
    return count


def _resolve(schema: Any, ref: Any) -> Any | None:
    """The node a local `$ref` points to, found the way the converter finds it; None if it cannot."""
    if not isinstance(ref, str) or "#" not in ref or ref.startswith("https://"):
        return None
    target = schema
    for part in ref.split("#")[-1].split("/")[1:]:
        if not isinstance(target, dict) or part not in target:
            return None
        target = target[part]
    return target


def _check_ref_expansion(schema: Any) -> None:
    """Count the nodes the converter visits, expanding `$ref`s as it does, within MAX_NODES.

    The converter expands a ref once when its last segment is a valid rule name and at every use
    otherwise, skipping refs already being expanded; a chain of such refs used twice each doubles
    per level, so a few KB of schema would otherwise take hours.
    """
    visited = 0
    expanded: set[str] = set()
    active: set[str] = set()
    # (node, None) visits a node; (None, ref) leaves the expansion of ref.
    stack: list[tuple[Any, str | None]] = [(schema, None)]
    while stack:
        node, leaving = stack.pop()
        if leaving is not None:
            active.discard(leaving)
            continue
        visited += 1
        if visited > MAX_NODES:
            _refuse(f"its $refs expand to more than {MAX_NODES} keys and values (a $ref whose last segment "
                    "has characters other than letters, digits and '-' is expanded again at every use)")
        if isinstance(node, dict):
            # Definitions are visited where they are used, as the converter does, not where they stand.
            stack.extend((value, None) for key, value in node.items() if key not in _DEFINITION_KEYWORDS)
            stack.extend((key, None) for key in node)
            ref = node.get("$ref")
            if isinstance(ref, str) and ref not in active and not (ref in expanded and _is_reusable(ref)):
                target = _resolve(schema, ref)
                if target is not None:
                    expanded.add(ref)
                    active.add(ref)
                    # The target's subtree is popped before the marker that ends its expansion.
                    stack.append((None, ref))
                    stack.append((target, None))
        elif isinstance(node, list):
            stack.extend((value, None) for value in node)


def _is_reusable(ref: str) -> bool:
    name = ref.split("/")[-1]
    return bool(_REUSABLE_REF_NAME.fullmatch(name)) and name not in RESERVED_NAMES
