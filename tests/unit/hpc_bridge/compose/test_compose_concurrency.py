"""Concurrent compose/free from threads and processes never double-books a device."""

from __future__ import annotations

import itertools
import json
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import compose_testkit
import pytest
from compose_testkit import churn, churn_pools_doc, write_pools
from sqlalchemy import Connection, select

from reflexarc.hpc_bridge.compose import Composer, Device, Identity, MachineState
from reflexarc.hpc_bridge.compose.store import allocations_t

THREADS, THREAD_OPS = 6, 25
PROCESSES, PROCESS_OPS = 3, 25


def test_threads_and_processes_never_double_book(tmp_path: Path) -> None:
    db = tmp_path / "compose.db"
    pools = write_pools(tmp_path / "pools.yaml", churn_pools_doc())
    started = time.monotonic()
    with Composer(db, pools) as composer:
        total_devices = composer.pools().total()
        script = Path(compose_testkit.__file__)
        procs = [
            subprocess.Popen(
                [sys.executable, str(script), str(db), str(pools), f"proc{i}", str(PROCESS_OPS), str(1000 + i)],
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                text=True,
            )
            for i in range(PROCESSES)
        ]
        # Start everything at once, so processes and threads really overlap.
        for p in procs:
            assert p.stdout is not None and p.stdout.readline().strip() == "ready"
        for p in procs:
            assert p.stdin is not None
            p.stdin.write("go\n")
            p.stdin.flush()
        with ThreadPoolExecutor(THREADS) as pool:
            futures = [pool.submit(churn, composer, Identity(user=f"thread{i}"), THREAD_OPS, i) for i in range(THREADS)]
            thread_stats = [f.result(timeout=120) for f in futures]
        proc_stats = []
        for p in procs:
            out, _ = p.communicate(timeout=120)  # closes stdin, reads the JSON line
            assert p.returncode == 0
            proc_stats.append(json.loads(out))

        requests = sum(s.composed + s.no_room + s.freed for s in thread_stats) + sum(
            s["composed"] + s["no_room"] + s["freed"] for s in proc_stats
        )
        composed = sum(s.composed for s in thread_stats) + sum(s["composed"] for s in proc_stats)
        assert requests >= 200
        assert composed >= 50  # the pools are big enough for real churn, not only refusals

        # The processes left their machines composed: count what is held now.
        live = composer.list()
        assert {m.state for m in live} <= {MachineState.COMPOSED}
        assert len(live) == sum(s["held"] for s in proc_stats)
        held = [d for m in live for d in m.device_ids]
        assert len(held) == len(set(held)), "a device is in two live machines"
        with composer.store.read() as conn:
            allocated = [r.device_id for r in conn.execute(select(allocations_t.c.device_id))]
        assert sorted(allocated) == sorted(held)
        assert composer.pools().used() == len(held)

        # History: no device was ever held by two machines at overlapping times.
        everything = composer.list(all=True)
        assert len(everything) == composed
        spans: dict[str, list[tuple[float, float]]] = {}
        for m in everything:
            end = m.freed_at.timestamp() if m.freed_at else float("inf")
            for d in m.device_ids:
                spans.setdefault(d, []).append((m.created_at.timestamp(), end))
        for device, intervals in spans.items():
            intervals.sort()
            for (_, end), (start, _) in itertools.pairwise(intervals):
                assert end <= start, f"{device} double-booked"

        # Every compose and free is in the audit log.
        ok = [e for e in composer.audit() if e.outcome == "ok"]
        assert sum(e.action == "compose" for e in ok) == composed
        freed = sum(e.action == "free" for e in ok)
        assert freed == composed - len(live)

        # Free the rest (as an admin): every device is back in its pool.
        admin = Identity(user="ops", is_admin=True)
        for m in live:
            composer.free(m.id, admin)
        view = composer.pools()
        assert view.used() == 0
        assert sum(r.free for r in view.rows) == total_devices
        assert all(r.capacity_free == r.capacity_total for r in view.rows)
    print(f"{requests} requests, {composed} composed in {time.monotonic() - started:.1f}s")


def test_lost_race_is_retried(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A stale free list (as on a server database) hits the unique key and re-places."""
    pools = write_pools(tmp_path / "pools.yaml", churn_pools_doc(racks=1))
    with Composer(tmp_path / "c.db", pools) as c:
        real_free = c.store.free_devices
        first = c.compose({"cpus": 16}, Identity(user="a"))
        calls = {"n": 0}

        def stale_once(conn: Connection) -> list[Device]:
            calls["n"] += 1
            devices = real_free(conn)
            if calls["n"] == 1:
                # Pretend we read before ``first`` took its node.
                devices = [*first.devices, *devices]
            return devices

        monkeypatch.setattr(c.store, "free_devices", stale_once)
        second = c.compose({"cpus": 16}, Identity(user="b"))
        assert calls["n"] == 2
        assert not set(first.device_ids) & set(second.device_ids)
