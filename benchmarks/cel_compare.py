"""Compare the two CEL libraries for the trigger engine: speed and correctness.

    /work/venv/bin/python benchmarks/cel_compare.py [--n 20000]

Prints evaluations per second for each library on the same expressions and
per-event contexts (a new context per evaluation, as in the engine), the
ratio against ``cel-python`` measured in the same run, and which of a set of
correctness cases each library gets right.

Also measured: the engine's own evaluation (:class:`reflexarc.cloud.expr.Expr`),
which answers a common subset of CEL in Python (:mod:`reflexarc.cloud.fastcel`)
and asks the Rust library for everything else; it must get the same cases right.
"""

from __future__ import annotations

import argparse
import time
from datetime import UTC, datetime, timedelta
from typing import Any

import cel

try:
    import celpy
except ImportError:  # cel-python is only needed for this comparison: pip install cel-python
    celpy = None

from reflexarc.cloud.expr import compile_expr

EXPRESSIONS = {
    "threshold": "event.data.value > 400",
    "aggregates": "agg.n >= 5 && agg.mean > 300.0 && window.span >= 5.0",
    "string+has": "has(event.data.value) && event.stream.startsWith('cou') && event.device in ['d1', 'd2']",
}

# (expression, context, expected) - expected None means "must raise an error".
CASES: list[tuple[str, dict[str, Any], Any]] = [
    ("a > 400", {"a": 401}, True),
    ("a > 400", {"a": 400.5}, True),
    ("a + 1", {"a": 1}, 2),
    ("a / 0", {"a": 1}, None),
    ("has(m.x)", {"m": {"y": 1}}, False),
    ("m.x", {"m": {"y": 1}}, None),
    ("s.matches('^a+$')", {"s": "aaa"}, True),
    ("size([1, 2, 3]) == 3", {}, True),
    ("t > timestamp('2024-01-01T00:00:00Z')", {"t": datetime(2024, 5, 1, tzinfo=UTC)}, True),
    ("t - timestamp('2024-01-01T00:00:00Z') > duration('1h')", {"t": datetime(2024, 1, 1, 2, tzinfo=UTC)}, True),
    ("[1, 2, 3].exists(x, x > 2)", {}, True),
    ("undefined_fn(1)", {}, None),
    ("1 + 'a'", {}, None),
]


def _ctx(i: int) -> dict[str, Any]:
    return {
        "event": {"data": {"value": 300 + (i % 200)}, "stream": "counts", "device": "d1"},
        "agg": {"n": i % 10, "mean": 250.0 + i % 100, "max": 1.0},
        "window": {"span": float(i % 8)},
    }


def bench_rust(expr: str, n: int) -> float:
    """Evaluations per second with common-expression-language."""
    prog = cel.compile(expr)
    ctxs = [_ctx(i) for i in range(n)]
    t0 = time.perf_counter()
    for c in ctxs:
        prog.execute(c)
    return n / (time.perf_counter() - t0)


def bench_engine(expr: str, n: int) -> float:
    """Evaluations per second through the engine's Expr (Python subset, the library for the rest)."""
    compiled = compile_expr(expr, {"event", "agg", "window"})
    ctxs = [_ctx(i) for i in range(n)]
    t0 = time.perf_counter()
    for c in ctxs:
        compiled.eval(c)
    return n / (time.perf_counter() - t0)


def correct_engine(expr: str, ctx: dict[str, Any], expected: Any) -> bool:
    """Whether the engine's Expr gives the expected answer (or error)."""
    try:
        got = compile_expr(expr, set(ctx) | {"m", "s", "t", "a"}).eval(ctx)
    except Exception:
        return expected is None
    return expected is not None and got == expected


def bench_celpy(expr: str, n: int) -> float:
    """Evaluations per second with cel-python (context converted per event, as it requires)."""
    env = celpy.Environment()
    prog = env.program(env.compile(expr))
    ctxs = [_ctx(i) for i in range(n)]
    t0 = time.perf_counter()
    for c in ctxs:
        prog.evaluate({k: celpy.json_to_cel(v) for k, v in c.items()})
    return n / (time.perf_counter() - t0)


def correct_rust(expr: str, ctx: dict[str, Any], expected: Any) -> bool:
    """Whether the Rust library gives the expected answer (or error)."""
    try:
        got = cel.compile(expr).execute(ctx)
    except Exception:
        return expected is None
    return expected is not None and got == expected


def correct_celpy(expr: str, ctx: dict[str, Any], expected: Any) -> bool:
    """Whether cel-python gives the expected answer (or error)."""
    env = celpy.Environment()
    try:
        prog = env.program(env.compile(expr))
        act = {}
        for k, v in ctx.items():
            if isinstance(v, datetime):
                act[k] = celpy.celtypes.TimestampType(v)
            elif isinstance(v, timedelta):
                act[k] = celpy.celtypes.DurationType(v)
            else:
                act[k] = celpy.json_to_cel(v)
        got = prog.evaluate(act)
    except Exception:
        return expected is None
    if isinstance(got, celpy.CELEvalError):
        return expected is None
    return expected is not None and got == expected


def main() -> None:
    """Run the comparison and print the figures."""
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--n", type=int, default=20000)
    args = ap.parse_args()
    print(f"{'expression':<12} {'cel (Rust) ev/s':>16} {'cel-python ev/s':>16} {'ratio':>7} {'engine Expr ev/s':>17}")
    if celpy is None:
        print("(cel-python is not installed: its column is empty; pip install cel-python)")
    for name, expr in EXPRESSIONS.items():
        r = bench_rust(expr, args.n)
        p = bench_celpy(expr, max(1000, args.n // 10)) if celpy is not None else float("nan")
        e = bench_engine(expr, args.n)
        print(f"{name:<12} {r:16,.0f} {p:16,.0f} {r / p:6.1f}x {e:17,.0f}")
    ok_r = sum(correct_rust(*c) for c in CASES)
    ok_p = sum(correct_celpy(*c) for c in CASES) if celpy is not None else 0
    ok_e = sum(correct_engine(*c) for c in CASES)
    print(
        f"correctness cases: cel (Rust) {ok_r}/{len(CASES)}, cel-python {ok_p}/{len(CASES)}, "
        f"engine Expr {ok_e}/{len(CASES)}"
    )
    for c in CASES:
        if not correct_engine(*c):
            print(f"  differs: {c[0]!r}: engine Expr WRONG")
        if celpy is None:
            continue
        r, p = correct_rust(*c), correct_celpy(*c)
        if not (r and p):
            print(f"  differs: {c[0]!r}: cel={'ok' if r else 'WRONG'} cel-python={'ok' if p else 'WRONG'}")


if __name__ == "__main__":
    main()
