"""Triggers without a window, evaluated by the engine's generated group function, decide as CEL does.

The group function shares field reads, filters and conditions between
triggers, and triggers that follow each other with the same filter share one
test of it. On random sets of triggers (shared and distinct filters, filters
that read ``trigger``, expressions outside the Python subset, ones that fail
on some events) over random events, the engine's firings (in config order)
and failures must be those of evaluating each trigger on its own with the
Rust CEL library.
"""

from __future__ import annotations

import random
import textwrap
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest

from reflexarc.cloud.engine import TriggerEngine
from reflexarc.cloud.validate import compile_text
from reflexarc.envelope import Envelope, EventType

T0 = datetime(2024, 5, 1, 12, 0, 0, tzinfo=UTC)
SITE = "site: local\napps:\n  fit: {function: 'pkg.mod:fit'}\n"
FILTERS = [
    None,
    "has(event.data.value)",
    "has(event.data.value)",
    "event.data.value > 3",  # fails (no such field) on events without a value
    "trigger.startsWith('t1')",  # reads `trigger`: not shared between triggers
    "event.stream.matches('^c')",  # outside the Python subset: the library decides
    "size(event.data) > 1",
]
WHENS = [
    "event.data.value > 5",
    "event.data.value % 3 == 1",
    "double(event.data.value) >= 4.5",
    "event.data.value > 2 && event.device == 'det1'",
    "event.data.label == 'x'",  # fails on events without a label
    "event.data.value",  # not a boolean: an error
    "event.id.endsWith('7') || event.data.value > 8",
]


def _library_truth(expr: Any, variables: dict[str, Any]) -> bool | str:
    """What the Rust library alone says: True/False, or an error."""
    try:
        value = expr.program.execute({k: variables[k] for k in expr.variables if k in variables})
    except Exception as exc:  # the binding raises several types
        return f"error: {type(exc).__name__}"
    return value if type(value) is bool else f"error: not a boolean ({value!r})"


@pytest.mark.parametrize("seed", range(25))
def test_group_decides_as_the_library_trigger_by_trigger(seed: int, tmp_path: Path) -> None:
    rng = random.Random(seed)
    items = []
    for i in range(rng.randint(1, 12)):
        flt = rng.choice(FILTERS)
        items.append(
            f"- name: t{i}\n  on: bl1/+/#\n"
            + (f"  filter: {flt!r}\n" if flt else "")
            + f"  when: {rng.choice(WHENS)!r}\n  then: [{{task: {{app: fit}}}}]\n"
        )
    (tmp_path / "site.yaml").write_text(SITE)
    text = "sites: [site.yaml]\ntriggers:\n" + textwrap.indent("".join(items), "  ")
    cfg = compile_text(text, str(tmp_path / "triggers.yaml"), tmp_path)
    eng = TriggerEngine(cfg, now=lambda: T0)
    for n in range(60):
        data: dict[str, Any] = {}
        if rng.random() < 0.85:
            data["value"] = rng.choice([rng.randint(0, 10), rng.uniform(0, 10), "7", None])
        if rng.random() < 0.5:
            data["label"] = rng.choice(["x", "y"])
        env = Envelope.for_device(
            EventType.DATA,
            "bl1",
            rng.choice(["det1", "det2"]),
            data,
            subject=rng.choice(["counts", "temp"]),
            id=f"e{n}",
            time=T0 + timedelta(seconds=n),
        )
        out = eng.process(env, {}, position=n)
        ctx = eng.event_of((env.id, env.type, env.source, env.subject, env.time, env.extensions, env.data))
        fired, failed = [], []
        for trig in cfg.triggers:
            variables = {"event": ctx, "trigger": trig.name, "agg": {}, "window": {}, "key": f"bl1/{ctx['device']}"}
            if trig.filter is not None:
                verdict = _library_truth(trig.filter, variables)
                if verdict is not True:
                    if verdict is not False:
                        failed.append(trig.name)
                    continue
            verdict = _library_truth(trig.when, variables)
            if verdict is True:
                fired.append(trig.name)
            elif verdict is not False:
                failed.append(trig.name)
        assert [f.trigger for f in out.firings] == fired, (n, data)
        assert sorted(f.trigger for f in out.failures) == sorted(failed), (n, data, out.failures)
