"""CEL's subset in Python gives the Rust library's value whenever it gives one (random expressions, edge values)."""

from __future__ import annotations

import math
import random
from typing import Any

import cel
import pytest

from reflexarc.cloud.expr import CelEvalError, compile_expr
from reflexarc.cloud.fastcel import GIVE_UP, HELPERS, INT_MAX, INT_MIN, MISSING, compile_fast, python_code

EDGE_VALUES: list[Any] = [
    0,
    1,
    -1,
    2,
    3,
    7,
    -7,
    10,
    400,
    401,
    INT_MAX,
    INT_MIN,
    INT_MAX - 1,
    2**63,
    2**64 + 5,
    -(2**63) - 1,
    9007199254740993,
    0.0,
    -0.0,
    0.5,
    1.0,
    2.0,
    -2.5,
    400.0,
    400.5,
    1e308,
    -1e308,
    9007199254740992.0,
    math.inf,
    -math.inf,
    math.nan,
    "",
    "a",
    "b",
    "ab",
    "héllo",
    "400",
    True,
    False,
    None,
    [1, 2.0, "a"],
    [],
    {"k": 1},
    {},
]
FIELDS = ["a", "b", "c", "s", "l", "m", "z"]  # z is never present


def variables(rng: random.Random) -> dict[str, Any]:
    x = {f: rng.choice(EDGE_VALUES) for f in FIELDS[:-1] if rng.random() < 0.9}
    return {
        "x": x,
        "y": rng.choice(EDGE_VALUES),
        "w": {"n": rng.choice([0, 3, 5]), "m": rng.choice([1.5, 990.5, None])},
    }


LEAVES = [
    "x.a",
    "x.b",
    "x.c",
    "x.s",
    "x.l",
    "x.m",
    "x.z",
    "y",
    "w.n",
    "w.m",
    "x['a']",
    "x.l[0]",
    "x.l[2]",
    "0",
    "1",
    "-1",
    "3",
    "7",
    "400",
    "9223372036854775807",
    "0.0",
    "0.5",
    "2.0",
    "-2.5",
    "400.0",
    "'a'",
    "''",
    "'ab'",
    '"h\\"i"',
    "true",
    "false",
    "null",
    "[1, 2.0, 'a']",
    "[1, 2]",
    "{'k': 1}",
    "x",
    "w",
]
BINARY = ["+", "-", "*", "/", "%", "<", "<=", ">", ">=", "==", "!=", "&&", "||", "in"]
CALLS = [
    "size({})",
    "double({})",
    "int({})",
    "string({})",
    "has(x.a)",
    "has(x.z)",
    "has(w.n)",
    "{}.size()",
    "{}.startsWith('a')",
    "{}.endsWith('b')",
    "{}.contains('é')",
    "!{}",
    "-{}",
    "({})",
    "{} ? {} : {}",
]


def expression(rng: random.Random, depth: int) -> str:
    if depth <= 0 or rng.random() < 0.25:
        return rng.choice(LEAVES)
    if rng.random() < 0.6:
        return f"{expression(rng, depth - 1)} {rng.choice(BINARY)} {expression(rng, depth - 1)}"
    form = rng.choice(CALLS)
    return form.format(*(expression(rng, depth - 1) for _ in range(form.count("{}"))))


def same(a: Any, b: Any) -> bool:
    if type(a) is not type(b):
        return False
    if isinstance(a, float):
        return (math.isnan(a) and math.isnan(b)) or (a == b and math.copysign(1, a) == math.copysign(1, b))
    if isinstance(a, list):
        return len(a) == len(b) and all(same(x, y) for x, y in zip(a, b, strict=True))
    if isinstance(a, dict):
        return a.keys() == b.keys() and all(same(a[k], b[k]) for k in a)
    return bool(a == b)


def test_python_subset_agrees_with_the_rust_library_on_random_expressions() -> None:
    rng = random.Random(20240501)
    answered = fell_back = outside = 0
    for _ in range(4000):
        src = expression(rng, 3)
        try:
            program = cel.compile(src)
        except Exception:  # the library refuses the text: the engine never sees it
            continue
        fast = compile_fast(src)
        if fast is None:
            outside += 1
            continue
        for _ in range(3):
            v = variables(rng)
            try:
                got = fast(v)
            except GIVE_UP:
                fell_back += 1
                continue
            answered += 1
            try:
                want = program.execute(v)
            except Exception as exc:
                pytest.fail(f"{src!r} with {v!r}: Python gave {got!r}, the library raised {exc!r}")
            assert same(got, want), f"{src!r} with {v!r}: Python {got!r}, library {want!r}"
    # Not a vacuous test: thousands of values answered in Python (random operands often mix types,
    # which CEL refuses: those go to the library), and every generated form is in the subset.
    assert answered > 3000 and outside == 0, (answered, fell_back, outside)


# Literals of comparisons, with the limits of the integers doubles hold exactly (2**53 against 2**53 + 1).
LITERALS = [
    "0",
    "1",
    "-1",
    "7",
    "400",
    "9007199254740992",
    "-9007199254740992",
    "9223372036854775807",
    "0.0",
    "0.5",
    "400.0",
    "-2.5",
    "9007199254740992.0",
    "'a'",
    "''",
    "'400'",
    "true",
    "null",
    "[1, 2]",
]


def shared_form(srcs: list[str]) -> Any:
    """The expressions as the engine's group function evaluates them: one function, shared paths and type tests.

    Returns ``f(v) -> [value or GIVE_UP instance, ...]``; ``None`` where an expression is outside the subset.
    """
    shared: dict[str, str] = {}
    codes = [python_code(src, {"x": "X", "y": "Y", "w": "W"}, f"_e{i}_", shared) for i, src in enumerate(srcs)]
    lines = ["def _f(v):", "    X, Y, W = v['x'], v['y'], v['w']", "    out = []"]
    for path, local in shared.items():
        lines += ["    try:", f"        {local} = {path}", "    except GIVE_UP:", f"        {local} = MISSING"]
    for code in codes:
        lines += (
            ["    try:", f"        out.append({code})", "    except GIVE_UP as exc:", "        out.append(exc)"]
            if code is not None
            else ["    out.append(None)"]
        )
    lines.append("    return out")
    namespace: dict[str, Any] = {**HELPERS, "GIVE_UP": GIVE_UP, "MISSING": MISSING}
    exec(compile("\n".join(lines) + "\n", "<test-shared>", "exec"), namespace)
    return namespace["_f"]


def test_shared_paths_and_type_tests_agree_with_the_rust_library() -> None:
    """As above, for the form with shared field reads and shared type tests (many thresholds on one field)."""
    rng = random.Random(20240502)
    answered = 0
    for _ in range(300):
        srcs = []
        while len(srcs) < 8:
            # Comparisons of paths with literals (what the shared type tests serve) among random expressions.
            src = (
                (f"{rng.choice(LEAVES[:11])} {rng.choice(['<', '<=', '>', '>=', '==', '!='])} {rng.choice(LITERALS)}")
                if rng.random() < 0.6
                else expression(rng, 3)
            )
            try:
                cel.compile(src)
            except Exception:
                continue
            srcs.append(src)
        form = shared_form(srcs)
        for _ in range(3):
            v = variables(rng)
            for src, got in zip(srcs, form(v), strict=True):
                if got is None or isinstance(got, GIVE_UP):
                    continue
                answered += 1
                try:
                    want = cel.compile(src).execute(v)
                except Exception as exc:
                    pytest.fail(f"{src!r} with {v!r}: Python gave {got!r}, the library raised {exc!r}")
                assert same(got, want), f"{src!r} with {v!r}: Python {got!r}, library {want!r}"
    assert answered > 2000, answered
    # The edges the shared type tests guard, for certain: an int beyond 2**53 compares with a double as a
    # double (so not greater), a NaN does not order, an int is never equal to a string.
    form = shared_form(["x.a > 9007199254740992.0", "x.b < 1.0", "x.c == '7'", "x.a >= 9007199254740992.0"])
    got = form({"x": {"a": 9007199254740993, "b": math.nan, "c": 7}, "y": 0, "w": {}})
    assert got[0] is False and isinstance(got[1], GIVE_UP) and got[2] is False and got[3] is True, got


@pytest.mark.parametrize(
    ("src", "v", "want"),
    [
        ("event.data.value > 400", {"value": 401}, True),
        ("event.data.value > 400", {"value": 400.5}, True),
        ("9007199254740993 > event.data.value", {"value": 9007199254740992.0}, False),  # as doubles, like the library
        ("event.data.value % 10 == 3", {"value": 13}, True),
        ("event.data.value % 10 == -7", {"value": -7}, True),  # the sign of the dividend
        ("event.data.value / 2", {"value": -7}, -3),
        ("has(event.data.value) && event.data.value >= 0.5", {"value": 1}, True),
        ("has(event.data.value)", {}, False),
        ("size(event.data.s)", {"s": "héllo"}, 6),
        ("event.device in ['det1', 'det2'] ? 1 : 2", {}, 1),
        ("double(event.data.value) * 2.0", {"value": 3}, 6.0),
    ],
)
def test_known_values(src: str, v: dict[str, Any], want: Any) -> None:
    ctx = {"event": {"device": "det1", "data": v}}
    fast = compile_fast(src)
    assert fast is not None
    assert same(fast(ctx), want)
    assert same(cel.compile(src).execute(ctx), want)


@pytest.mark.parametrize(
    ("src", "v", "error"),
    [
        ("event.data.value > 400", {}, "no such field 'value'"),
        ("event.data.value * 2", {"value": 1.5}, "No such overload|Unsupported operation"),
        ("event.data.value + 1", {"value": INT_MAX}, "overflow"),
        ("event.data.value / 0", {"value": 1}, "division by zero"),
        ("event.data.value < 1.0", {"value": math.nan}, "No such overload"),
    ],
)
def test_errors_are_the_librarys(src: str, v: dict[str, Any], error: str) -> None:
    expr = compile_expr(src, {"event"})
    assert expr.fast is not None
    with pytest.raises(CelEvalError, match=error):
        expr.eval({"event": {"data": v}})


@pytest.mark.parametrize(
    "src",
    [
        "event.data.l.all(i, i > 0)",
        "event.data.s.matches('^a')",
        "event.time > timestamp('2024-01-01T00:00:00Z')",
        "1u + 2u",
        "0x10 == 16",
        "r'a\\d' == 'x'",
        "'\\u00e9' == 'é'",
        "duration('1s') > duration('0s')",
    ],
)
def test_outside_the_subset_the_library_evaluates_alone(src: str) -> None:
    assert compile_fast(src) is None
    expr = compile_expr(src, {"event"})
    assert expr.fast is None


def test_generated_code_holds_names_and_strings_only_as_literals() -> None:
    fast = compile_fast("event.data[\"__import__('os').system('x')\"] == \"'); import os; ('\"")
    assert fast is not None
    assert fast({"event": {"data": {"__import__('os').system('x')": "'); import os; ('"}}}) is True
