"""Bounds on response_format schemas, and a grammar-bomb campaign against llama.cpp's real compiler.

The unit tests feed hand-written extremes to the checker. The campaign generates schemas from a
fixed seed, sends those the app accepts to llama.cpp's grammar compiler on the demo model's
vocabulary, in a child process: a segfault there is a nonzero exit, not a dead pytest.

Run as `python -m tests.test_grammar_limits MODEL` this file is that child: it reads one grammar
per line (JSON strings) and answers one JSON line per grammar.
"""

from __future__ import annotations

import ctypes
import json
import random
import resource
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from app.engine import schema_limits as limits
from app.engine.sampling import grammar_for_response_format
from app.engine.types import InvalidRequestError

# The child imports this module without conftest (and its server fixtures).
REPO = Path(__file__).resolve().parent.parent
SEED = 20240611
CAMPAIGN_SIZE = 2500
# Generous next to the milliseconds measured: only a regression to seconds should fail.
SLOW_S = 1.0


def response_format(schema: Any) -> dict[str, Any]:
    return {"type": "json_schema", "json_schema": {"name": "t", "schema": schema}}


def refusal(schema: Any) -> InvalidRequestError:
    with pytest.raises(InvalidRequestError) as info:
        grammar_for_response_format(response_format(schema))
    err = info.value
    # InvalidRequestError is what the API layer answers with a 400 (app/api/errors.py).
    assert type(err) is InvalidRequestError and err.param == "response_format"
    str(err).encode("utf-8")  # the message reaches the client as JSON: it must be encodable
    return err


def obj(properties: dict[str, Any], required: list[str] | None = None) -> dict[str, Any]:
    return {"type": "object", "properties": properties, "required": list(properties) if required is None else required}


def nested_objects(levels: int) -> dict[str, Any]:
    schema: dict[str, Any] = {"type": "integer"}
    for _ in range(levels):
        schema = obj({"a": schema})
    return schema


def ref_chain(levels: int, sep: str) -> dict[str, Any]:
    """Each definition uses the next one twice: the converter's cost doubles per level when it must escape names."""
    defs = {}
    for i in range(levels):
        defs[f"d{sep}{i}"] = {"type": "array", "prefixItems": [
            {"$ref": f"#/$defs/d{sep}{i + 1}"} if i + 1 < levels else {"type": "integer"} for _ in range(2)]}
    return {"$defs": defs, **obj({"x": {"$ref": f"#/$defs/d{sep}0"}})}


MAX = limits.MAX_REPETITION

# (name, schema, text the message must contain: the limit and the offending value)
REFUSED: list[tuple[str, Any, tuple[str, ...]]] = [
    ("maxLength", {"type": "string", "maxLength": 32000}, ("maxLength 32000", str(MAX))),
    ("maxLength just over", {"type": "string", "maxLength": MAX + 1}, (f"maxLength {MAX + 1}", str(MAX))),
    ("minLength", {"type": "string", "minLength": 10**9}, (f"minLength {10**9}", str(MAX))),
    ("negative", {"type": "string", "minLength": -1}, ("minLength -1",)),
    ("float", {"type": "string", "maxLength": 1e300}, ("maxLength 1e+300",)),
    ("maxItems", {"type": "array", "items": {"type": "integer"}, "maxItems": 32000}, ("maxItems 32000",)),
    ("minItems", {"type": "array", "items": {}, "minItems": 200000}, ("minItems 200000",)),
    ("pattern {1,n}", {"type": "string", "pattern": "^a{1,32000}$"}, ("{1,32000}", str(MAX))),
    ("pattern {n}", {"type": "string", "pattern": "^(ab){501}$"}, ("{501}",)),
    ("pattern {n,}", {"type": "string", "pattern": "^[a-z]{600,}$"}, ("{600,}",)),
    ("pattern huge digits", {"type": "string", "pattern": "^a{" + "9" * 900 + "}$"}, ("quantifier",)),
    ("pattern length", {"type": "string", "pattern": "^" + "a" * 5000 + "$"},
     ("5002 characters", str(limits.MAX_PATTERN_CHARS))),
    ("pattern alternatives", {"type": "string", "pattern": "^(" + "|".join("ab" for _ in range(200)) + ")$"},
     ("200 alternatives", str(limits.MAX_PATTERN_ALTERNATIVES))),
    ("deep objects", nested_objects(100), (str(limits.MAX_DEPTH), "nesting depth")),
    ("deep arrays", json.loads('{"items":' * 70 + "{}" + "}" * 70), ("nesting depth 65",)),
    ("100,000 properties", obj({f"p{i}": {"type": "integer"} for i in range(100_000)}),
     (str(limits.MAX_NODES), "keys and values")),
    ("huge enum", {"enum": list(range(100_000))}, (str(limits.MAX_NODES),)),
    ("enum over", {"enum": list(range(limits.MAX_ALTERNATIVES + 1))}, (str(limits.MAX_ALTERNATIVES), "enum")),
    ("enums in all", obj({f"e{i}": {"enum": list(range(200))} for i in range(3)}), (str(limits.MAX_ALTERNATIVES),)),
    ("anyOf", {"anyOf": [{"const": i} for i in range(600)]}, (str(limits.MAX_ALTERNATIVES),)),
    ("optional properties", obj({f"p{i}": {} for i in range(65)}, required=[]),
     ("65 optional properties", str(limits.MAX_OPTIONAL_PROPERTIES))),
    ("allOf optional", {"allOf": [{"anyOf": [obj({f"p{i}": {}}) for i in range(70)]}]}, ("70 optional",)),
    ("long string", {"type": "string", "description": "x" * 200_000}, (str(limits.MAX_SCHEMA_CHARS),)),
    ("ref bomb", ref_chain(30, "_"), ("$refs expand", str(limits.MAX_NODES))),
    ("property named enum", obj({"enum": {"type": "string", "maxLength": 32000}}), ("/properties/enum/maxLength",)),
    ("property named const", obj({"const": {"type": "string", "pattern": "^a{0,9999}$"}}), ("{0,9999}",)),
    ("grammar size", obj({f"s{i}": {"type": "string", "maxLength": MAX} for i in range(200)}),
     ("grammar has", str(limits.MAX_GRAMMAR_CHARS))),
    ("surrogate in pattern", {"type": "string", "pattern": "^\ud800$"}, ("U+D800", "/pattern")),
    ("surrogate in key", obj({"a\udc00": {"type": "string"}}), ("U+DC00",)),
    ("surrogate in enum", {"enum": ["ok", "\udbff"]}, ("U+DBFF", "/enum/1")),
    ("surrogate in description", {"type": "string", "description": "\ud83d"}, ("U+D83D",)),
]


@pytest.mark.parametrize("name,schema,expected", REFUSED, ids=[r[0] for r in REFUSED])
def test_extremes_are_refused_naming_the_limit(name: str, schema: Any, expected: tuple[str, ...]) -> None:
    started = time.perf_counter()
    message = str(refusal(schema))
    assert time.perf_counter() - started < SLOW_S
    for text in expected:
        assert text in message, message


def test_the_first_bad_value_is_named_as_a_json_pointer() -> None:
    message = str(refusal(obj({"a/b": obj({"c~d": {"type": "string", "maxLength": 40000}})})))
    assert "/properties/a~1b/properties/c~0d/maxLength" in message


def test_json_object_with_a_schema_is_checked_too() -> None:
    with pytest.raises(InvalidRequestError):
        grammar_for_response_format({"type": "json_object", "schema": {"type": "string", "maxLength": 40000}})


ACCEPTED: list[tuple[str, Any]] = [
    ("maxLength", {"type": "string", "maxLength": MAX}),
    ("minLength", {"type": "string", "minLength": MAX, "maxLength": MAX}),
    ("items", {"type": "array", "items": {"type": "integer"}, "minItems": MAX, "maxItems": MAX}),
    ("maxItems", {"type": "array", "items": {"type": "integer"}, "maxItems": MAX}),
    ("pattern bound", {"type": "string", "pattern": f"^[a-z]{{0,{MAX}}}$"}),
    ("pattern nested bounds", {"type": "string", "pattern": f"^((a{{0,{MAX}}}){{0,{MAX}}})$"}),
    ("pattern length", {"type": "string", "pattern": "^" + "a" * (limits.MAX_PATTERN_CHARS - 2) + "$"}),
    ("pattern alternatives", {"type": "string",
                              "pattern": "^(" + "|".join("a" for _ in range(limits.MAX_PATTERN_ALTERNATIVES)) + ")$"}),
    # The innermost value, "integer", sits at the deepest level allowed.
    ("depth", json.loads('{"items":' * (limits.MAX_DEPTH - 1) + '{"type":"integer"}' + "}" * (limits.MAX_DEPTH - 1))),
    ("nested objects", nested_objects(limits.MAX_DEPTH // 2 - 1)),
    ("enum", {"enum": list(range(limits.MAX_ALTERNATIVES))}),
    ("optional properties", obj({f"p{i}": {"type": "integer"} for i in range(limits.MAX_OPTIONAL_PROPERTIES)},
                                required=[])),
    ("many required properties", obj({f"p{i}": {} for i in range(1300)})),
    ("reusable ref chain", ref_chain(30, "-")),
    ("surrogate pair", {"type": "string", "pattern": "^\U0001F600+$", "description": "\U0001F600"}),
    ("keyword-named properties", obj({"maxLength": {"type": "integer"}, "enum": {"enum": ["a", "b"]},
                                      "pattern": {"type": "string", "pattern": "^[0-9]{3}$"}})),
]


@pytest.mark.parametrize("name,schema", ACCEPTED, ids=[a[0] for a in ACCEPTED])
def test_boundary_values_are_accepted(name: str, schema: Any) -> None:
    started = time.perf_counter()
    gbnf = grammar_for_response_format(response_format(schema))
    assert gbnf and len(gbnf) <= limits.MAX_GRAMMAR_CHARS
    assert time.perf_counter() - started < SLOW_S


def test_node_count_boundary() -> None:
    # The root dict holds one key whose value is a list: 1 + 2 + n nodes (examples are data, not alternatives).
    limits.check_schema({"examples": [0] * (limits.MAX_NODES - 3)})
    with pytest.raises(InvalidRequestError, match=str(limits.MAX_NODES)):
        limits.check_schema({"examples": [0] * (limits.MAX_NODES - 2)})


def test_grammar_size_boundary() -> None:
    limits.check_grammar("x" * limits.MAX_GRAMMAR_CHARS)
    with pytest.raises(InvalidRequestError, match=str(limits.MAX_GRAMMAR_CHARS + 1)):
        limits.check_grammar("x" * (limits.MAX_GRAMMAR_CHARS + 1))


@pytest.mark.parametrize("schema,named", [
    ({"type": "string", "maxLength": 32000}, "maxLength 32000"),
    ({"type": "string", "pattern": "^a{1,32000}$"}, "{1,32000}"),
    # The API's request models may refuse it first; either way the message says why.
    ({"type": "string", "pattern": "^\ud800$"}, "surrogate"),
])
def test_the_reported_requests_get_a_400_and_the_server_goes_on(fake_server: Any, schema: Any, named: str) -> None:
    import httpx

    from tests.conftest import API_KEY

    headers = {"X-Api-Key": API_KEY}
    body = {"messages": [{"role": "user", "content": "x"}], "response_format": response_format(schema)}
    # json.dumps escapes the lone surrogate as the attacker's client did; httpx's json= cannot encode it.
    r = httpx.post(fake_server.url + "/v1/chat/completions", content=json.dumps(body),
                   headers={**headers, "Content-Type": "application/json"})
    assert r.status_code == 400, r.text[:300]
    assert r.json()["error"]["param"] == "response_format" and named in r.json()["error"]["message"]
    ok = httpx.post(fake_server.url + "/v1/chat/completions", headers=headers,
                    json={"messages": [{"role": "user", "content": "x"}]})
    assert ok.status_code == 200


# --- the campaign ---------------------------------------------------------------------------

class SchemaGenerator:
    """Random schemas aimed at the bounds: sizes cluster at each limit, its neighbours and known bombs."""

    SIZES = (0, 1, 2, 3, 7, 50, 128, 255, 499, 500, 501, 999, 1000, 1007, 2000, 18750, 32000, 10**6)

    def __init__(self, seed: int) -> None:
        self.rng = random.Random(seed)

    def size(self, small: int = 8) -> int:
        return self.rng.choice(self.SIZES) if self.rng.random() < 0.3 else self.rng.randint(0, small)

    def schema(self, depth: int = 0) -> Any:
        rng = self.rng
        makers: list[Callable[[int], Any]] = [
            self.string, self.pattern_string, self.scalar, self.array, self.object, self.enum,
            self.union, self.deep, self.refs, self.all_of, self.wide_object]
        # Deeper down, leaves become likelier so most schemas stay small.
        if depth > 2 and rng.random() < 0.6:
            return self.scalar(depth)
        return rng.choice(makers)(depth)

    def scalar(self, depth: int) -> Any:
        rng = self.rng
        kind = rng.choice(["integer", "number", "boolean", "null", "string", ["string", "null"]])
        schema: dict[str, Any] = {"type": kind}
        if rng.random() < 0.1:
            schema = {"const": rng.choice(["a", 1, None, {"maxLength": 40000}, "\ud800"])}
        return schema

    def string(self, depth: int) -> Any:
        schema: dict[str, Any] = {"type": "string"}
        for keyword in ("minLength", "maxLength"):
            if self.rng.random() < 0.6:
                schema[keyword] = self.size()
        return schema

    def pattern_string(self, depth: int) -> Any:
        return {"type": "string", "pattern": "^" + self.regex(0) + "$"}

    def regex(self, depth: int) -> str:
        rng = self.rng
        parts = []
        for _ in range(rng.randint(1, 4)):
            # Literals just past the pattern limit are enough: longer ones only cost generation time.
            # No \d: the converter passes it through and llama.cpp refuses it, so nothing would be compiled.
            atom = rng.choice(["a", "[a-z]", "[0-9]", ".", "(ab|cd)", "x" * rng.choice([1, 20, 990, 1200])])
            if depth < 3 and rng.random() < 0.3:
                atom = "(" + self.regex(depth + 1) + ")"
            if rng.random() < 0.2:
                atom = "(" + "|".join(atom[:20] for _ in range(rng.choice([2, 3, 127, 128, 129, 600]))) + ")"
            roll = rng.random()
            if roll < 0.4:
                low = self.size()
                atom += rng.choice([f"{{{low}}}", f"{{{low},}}", f"{{{low},{low + self.size()}}}",
                                    f"{{0,{self.size()}}}"])
            elif roll < 0.6:
                atom += rng.choice("*+?")
            parts.append(atom)
        return "".join(parts)

    def array(self, depth: int) -> Any:
        schema: dict[str, Any] = {"type": "array", "items": self.schema(depth + 1)}
        if self.rng.random() < 0.2:
            schema = {"type": "array", "prefixItems": [self.schema(depth + 1) for _ in range(self.rng.randint(1, 4))]}
        for keyword in ("minItems", "maxItems"):
            if self.rng.random() < 0.5:
                schema[keyword] = self.size()
        return schema

    def object(self, depth: int) -> Any:
        rng = self.rng
        n = rng.randint(0, 5)
        properties = {self.name(): self.schema(depth + 1) for _ in range(n)}
        schema: dict[str, Any] = {"type": "object", "properties": properties,
                                  "required": [k for k in properties if rng.random() < 0.5]}
        if rng.random() < 0.2:
            schema["additionalProperties"] = rng.choice([True, False, {"type": "integer"}])
        return schema

    def wide_object(self, depth: int) -> Any:
        """Many properties: optional ones, names that escape to the same rule name, or neither."""
        rng = self.rng
        n = rng.choice([10, 60, 64, 65, 100, 300, 900, 1300, 1400, 3000])
        colliding = rng.random() < 0.5
        names = ["p" + chr(0x100 + i) if colliding else f"p{i}" for i in range(n)]
        required = names if rng.random() < 0.7 else names[: rng.randint(0, n)]
        return obj({name: {} for name in names}, required=required)

    def name(self) -> str:
        return self.rng.choice(["a", "b_c", "d-e", "f g", "h.i", "maxLength", "enum", "const", "\u00e9", "k"]) + str(
            self.rng.randint(0, 9))

    def enum(self, depth: int) -> Any:
        n = self.rng.choice([1, 5, 255, 499, 500, 501, 1000, 5000])
        values: list[Any] = [f"v{i}" for i in range(n)] if self.rng.random() < 0.5 else list(range(n))
        return {"enum": values}

    def union(self, depth: int) -> Any:
        keyword = self.rng.choice(["anyOf", "oneOf"])
        n = self.rng.choice([1, 2, 3, 4, 300, 501])
        if n > 4:
            return {keyword: [{"const": i} for i in range(n)]}
        return {keyword: [self.schema(depth + 1) for _ in range(n)]}

    def deep(self, depth: int) -> Any:
        levels = self.rng.choice([5, 20, 31, 32, 33, 63, 64, 65, 200])
        schema: Any = self.scalar(depth)
        for _ in range(levels):
            wrap = self.rng.choice(["object", "array", "anyOf"])
            schema = (obj({"a": schema}) if wrap == "object" else
                      {"type": "array", "items": schema} if wrap == "array" else {"anyOf": [schema, {"type": "null"}]})
        return schema

    def refs(self, depth: int) -> Any:
        return ref_chain(self.rng.choice([2, 5, 10, 11, 12, 30]), self.rng.choice(["_", "-", "."]))

    def all_of(self, depth: int) -> Any:
        n = self.rng.choice([1, 3, 64, 70])
        return {"allOf": [obj({"base": {"type": "integer"}}),
                          {"anyOf": [obj({f"p{i}": {"type": "string"}}) for i in range(n)]}]}


def campaign() -> tuple[list[tuple[Any, str]], int, float]:
    """Generate the schemas; return those the app accepts with their grammars, how many it refused, the slowest call."""
    generator = SchemaGenerator(SEED)
    accepted: list[tuple[Any, str]] = []
    refused = 0
    slowest = 0.0
    for _ in range(CAMPAIGN_SIZE):
        schema = generator.schema()
        started = time.perf_counter()
        try:
            gbnf = grammar_for_response_format(response_format(schema))
        except InvalidRequestError as err:
            assert err.param == "response_format", err
            refused += 1
        else:
            assert gbnf is not None
            accepted.append((schema, gbnf))
        slowest = max(slowest, time.perf_counter() - started)
    return accepted, refused, slowest


def compile_in_child(model: str, grammars: list[str], timeout: float = 120) -> subprocess.CompletedProcess[str]:
    """Compile every grammar in one child process (see `child_main`)."""
    return subprocess.run([sys.executable, "-m", "tests.test_grammar_limits", model], cwd=REPO,
                          input="".join(json.dumps(g) + "\n" for g in grammars), capture_output=True, text=True,
                          timeout=timeout)


def results(proc: subprocess.CompletedProcess[str]) -> list[dict[str, Any]]:
    return [json.loads(line) for line in proc.stdout.splitlines() if line.startswith("{")]


def test_grammar_bomb_campaign_never_kills_the_compiler(demo_model: str) -> None:
    started = time.perf_counter()
    accepted, refused, slowest = campaign()
    proc = compile_in_child(demo_model, [gbnf for _, gbnf in accepted])
    done = results(proc)
    crashed = "none"
    if len(done) < len(accepted):
        crashed = f"schema #{len(done)} of {len(accepted)}: {json.dumps(accepted[len(done)][0])[:500]}"
    assert proc.returncode == 0, f"the compiler died (exit {proc.returncode}) on {crashed}\n{proc.stderr[-2000:]}"
    assert len(done) == len(accepted)
    compiled = sum(1 for r in done if r["ok"])
    slowest_compile = max((r["s"] for r in done), default=0.0)
    print(f"\ngrammar campaign: {CAMPAIGN_SIZE} schemas, {refused} refused, {len(accepted)} accepted, "
          f"{compiled} compiled; slowest check+convert {slowest:.3f}s, slowest compile {slowest_compile:.3f}s, "
          f"{time.perf_counter() - started:.1f}s in all")
    assert slowest < SLOW_S and slowest_compile < SLOW_S
    # The campaign must reach both sides of every bound to mean anything.
    assert refused >= CAMPAIGN_SIZE // 10 and len(accepted) >= CAMPAIGN_SIZE // 2


def test_boundary_grammars_compile(demo_model: str) -> None:
    grammars = [grammar_for_response_format(response_format(schema)) or "" for _, schema in ACCEPTED]
    proc = compile_in_child(demo_model, grammars)
    assert proc.returncode == 0, proc.stderr[-2000:]
    done = results(proc)
    assert len(done) == len(ACCEPTED)
    refused = [name for (name, _), r in zip(ACCEPTED, done, strict=True) if not r["ok"]]
    assert not refused, f"llama.cpp refused grammars the checker accepts: {refused}"


def test_the_child_reports_a_crash_as_an_exit_status(demo_model: str) -> None:
    """The control: the grammar that killed the server, unchecked, does kill the child."""
    from llama_cpp.llama_grammar import json_schema_to_gbnf

    bomb = json_schema_to_gbnf(json.dumps({"type": "string", "maxLength": 100_000}))
    proc = compile_in_child(demo_model, ["root ::= \"a\"", bomb])
    if proc.returncode == 0:
        pytest.skip("this llama.cpp build survives deep nesting: the control has nothing to show")
    assert len(results(proc)) == 1


# --- the child ------------------------------------------------------------------------------

def child_main(model_path: str) -> int:
    """Compile each grammar read from stdin on one thread, as the engine's scheduler thread does."""
    import llama_cpp

    # A crash is the expected outcome of the control test: leave no core file behind.
    resource.setrlimit(resource.RLIMIT_CORE, (0, 0))

    quiet = llama_cpp.llama_log_callback(lambda level, text, data: None)
    llama_cpp.llama_log_set(quiet, ctypes.c_void_p(0))
    params = llama_cpp.llama_model_default_params()
    params.vocab_only = True
    model = llama_cpp.llama_model_load_from_file(model_path.encode(), params)
    if not model:
        print(f"cannot load {model_path}", file=sys.stderr)
        return 2
    vocab = llama_cpp.llama_model_get_vocab(model)

    def work() -> None:
        for line in sys.stdin:
            gbnf = json.loads(line)
            started = time.perf_counter()
            sampler = llama_cpp.llama_sampler_init_grammar(vocab, gbnf.encode("utf-8"), b"root")
            elapsed = time.perf_counter() - started
            if sampler:
                llama_cpp.llama_sampler_free(sampler)
            print(json.dumps({"ok": bool(sampler), "s": round(elapsed, 4)}), flush=True)

    worker = threading.Thread(target=work, name="grammar-compiler")
    worker.start()
    worker.join()
    llama_cpp.llama_model_free(model)
    return 0


if __name__ == "__main__":
    sys.exit(child_main(sys.argv[1]))
