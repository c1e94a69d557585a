"""The generated step of a sliding-window trigger decides exactly as the engine's plain one.

``TriggerEngine._sliding_code`` compiles a sliding trigger's path (aggregate
inputs and ``when`` inline) into one function; ``_sliding_step`` is the plain
form it replaces. Two engines, one forced to the plain form, see the same
random events - copies of ids, other data under a known id, late and
out-of-order events, values that are no numbers, conditions the Python
subset gives up on, replays of positions already applied - and must give the
same firings (task ids and arguments), failures, counters and states.
"""

from __future__ import annotations

import json
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
TRIGGERS = """
- name: mean
  on: bl1/+/#
  window: {type: sliding, size: 3s, aggregates: {m: {op: mean, of: double(event.data.v)}, n: {op: count}}}
  when: agg.n >= 3 && agg.m > 5.0
  cooldown: 2s
  then: [{task: {app: fit, args: {m: agg.m, n: agg.n}}}]
- name: same-input
  on: bl1/+/#
  window: {type: sliding, size: 2s, key: stream, aggregates: {s: {op: sum, of: double(event.data.v)},
           lo: {op: min, of: event.data.v}, r: {op: rate, of: event.data.v}}}
  when: agg.s > 20.0 || agg.lo == 7
  then: [{task: {app: fit, args: {s: agg.s}}}]
- name: counted
  on: bl1/+/counts
  filter: has(event.data.v)
  window: {type: sliding, events: 4, aggregates: {f: {op: first, of: event.data.v}, l: {op: last, of: event.data.v}}}
  when: agg.l > agg.f
  then: [{task: {app: fit, args: {f: agg.f, l: agg.l}}}]
- name: mixed
  on: bl1/+/#
  window: {type: sliding, size: 1s, aggregates: {mx: {op: max, of: event.data.v}}}
  when: agg.mx > 8 && key.startsWith('bl1/d') && trigger == 'mixed'
  then: [{task: {app: fit, args: {k: key}}}]
- name: regex
  on: bl1/+/#
  window: {type: sliding, size: 2s, aggregates: {n: {op: count}}}
  when: agg.n > 2 && event.stream.matches('^c')
  then: [{task: {app: fit}}]
"""


def _engine(tmp_path: Path, plain: bool) -> TriggerEngine:
    (tmp_path / "site.yaml").write_text(SITE)
    text = "sites: [site.yaml]\ntriggers:\n" + textwrap.indent(textwrap.dedent(TRIGGERS), "  ")
    eng = TriggerEngine(compile_text(text, str(tmp_path / "triggers.yaml"), tmp_path), now=lambda: T0)
    for plan in eng._plans:
        assert plan.sliding
        generated = eng._sliding_code(plan)
        # Every trigger above but the regex one is in the Python subset: the generated form runs.
        assert (generated is None) == (plan.name == "regex")
        if plain:
            plan.step = eng._sliding_step(plan)
    return eng


def _summary(out: Any) -> dict[str, Any]:
    return {
        "firings": [(f.trigger, f.key, [(t.task_id, t.args) for t in f.tasks], f.cause.event_ids) for f in out.firings],
        "failures": sorted((f.trigger, f.message) for f in out.failures),
        "counts": (out.late, out.skipped, out.duplicate, out.conflict),
        "states": json.dumps(out.states, sort_keys=True),
    }


@pytest.mark.parametrize("seed", range(6))
def test_generated_step_equals_the_plain_step(seed: int, tmp_path: Path) -> None:
    rng = random.Random(seed)
    fast, plain = _engine(tmp_path, plain=False), _engine(tmp_path, plain=True)
    stores: tuple[dict[str, Any], dict[str, Any]] = ({}, {})
    sent: list[tuple[str, Envelope]] = []
    t = 0.0
    fired = failed = 0
    counts = [0, 0, 0, 0]
    for n in range(300):
        t += rng.choice([0.05, 0.2, 0.5, 1.0])
        if sent and rng.random() < 0.1:
            eid, env = rng.choice(sent)  # a copy (same data) or a conflict (other data under its id)
            if rng.random() < 0.3:
                env = Envelope.for_device(
                    EventType.DATA, "bl1", env.device or "", {"v": -1}, subject=env.subject, id=eid, time=env.time
                )
        else:
            v: Any = rng.choice([rng.randint(0, 10), rng.uniform(0.0, 10.0), "x", None])
            data = {"v": v} if rng.random() < 0.9 else {}
            at = T0 + timedelta(seconds=t - rng.choice([0.0, 0.0, 0.3, 4.0]))
            env = Envelope.for_device(
                EventType.DATA,
                "bl1",
                rng.choice(["d1", "d2"]),
                data,
                subject=rng.choice(["counts", "temp"]),
                id=f"e{n}",
                time=at,
            )
            sent.append((f"e{n}", env))
        position = n - rng.choice([0] * 9 + [3])  # now and then a replay of an applied position
        outs = []
        for eng, store in zip((fast, plain), stores, strict=True):
            out = eng.process(env, {k: store.get(k) for k in eng.state_keys(env)}, position=position)
            for k, state in out.states.items():
                store[k] = json.loads(json.dumps(state))
            outs.append(_summary(out))
        assert outs[0] == outs[1], n
        fired += len(outs[0]["firings"])
        failed += len(outs[0]["failures"])
        counts = [a + b for a, b in zip(counts, outs[0]["counts"], strict=True)]
    assert stores[0] == stores[1]
    # The sequences fire and fail (non-numbers), and meet late events, replays, copies and conflicts.
    assert fired > 0 and failed > 0 and all(counts), counts
