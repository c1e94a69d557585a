"""The generated sliding-window update (``WindowKeeper.slide_fast``) against the reference ``slide``.

The engine runs the generated form on every event of a sliding window; the
reference is the readable one. On random event sequences (out of order,
copies of times, late events, non-numbers, windows by time and by count,
every aggregate) both must leave the same state and give the same aggregates,
or raise the same error.
"""

from __future__ import annotations

import copy
import json
import random
from typing import Any

import pytest

from reflexarc.cloud.model import Window
from reflexarc.cloud.windows import WindowKeeper

OPS = ["count", "sum", "mean", "min", "max", "first", "last", "rate"]


def _window(rng: random.Random, by_count: bool) -> Window:
    names = rng.sample(OPS, rng.randint(0, len(OPS)))
    aggregates = {f"a_{op}": {"op": op, **({} if op == "count" else {"of": "event.data.v"})} for op in names}
    size: dict[str, Any] = {"events": rng.randint(1, 12)} if by_count else {"size": rng.choice([0.5, 2, 7.5])}
    return Window.model_validate({"type": "sliding", **size, "aggregates": aggregates})


def _value(rng: random.Random) -> Any:
    r = rng.random()
    if r < 0.02:
        return "x"  # not a number: aggregates that need one raise TypeError
    if r < 0.04:
        return float("nan")
    return rng.randint(-50, 50) if r < 0.5 else rng.uniform(-50.0, 50.0)


@pytest.mark.parametrize("seed", range(40))
def test_generated_sliding_update_equals_the_reference(seed: int) -> None:
    rng = random.Random(seed)
    keeper = WindowKeeper(_window(rng, by_count=seed % 2 == 1))
    fast_state: dict[str, Any] = {}
    ref_state: dict[str, Any] = {}
    t = 1_700_000_000.0
    outcomes = {"applied": 0, "late": 0, "error": 0}
    for i in range(400):
        t += rng.choice([0.0, 0.05, 0.1, 0.3, 1.0])
        at = t - rng.choice([0.0, 0.0, 0.0, 0.2, 1.5, 9.0])  # some out of order, some late
        values = [_value(rng) for _ in keeper.ops]
        results = []
        for fn, state in ((keeper.slide_fast, fast_state), (keeper.slide, ref_state)):
            try:
                results.append(("ok", fn(state, at, list(values), f"e{i}", i)))
            except TypeError as exc:
                results.append(("error", str(exc)))
        assert json.dumps(results[0], default=repr) == json.dumps(results[1], default=repr), (i, results)
        assert json.dumps(fast_state, sort_keys=True) == json.dumps(ref_state, sort_keys=True), i
        kind, agg = results[0]
        outcomes["error" if kind == "error" else "late" if agg is None else "applied"] += 1
    # The sequences reach every branch: applied, late and refused events.
    assert outcomes["applied"] > 100 and (outcomes["late"] > 0 or keeper.spec.events is not None)
    # A state in JSON (as the changelog restores it) continues identically.
    restored = json.loads(json.dumps(fast_state))
    again = copy.deepcopy(restored)
    assert keeper.slide_fast(restored, t + 1, [1] * len(keeper.ops), "last", 0) == keeper.slide(
        again, t + 1, [1] * len(keeper.ops), "last", 0
    )
    assert restored == again
