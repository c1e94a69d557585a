"""Bluesky documents: the Publisher's file, and the bluesky source that follows it (no broker).

Documents come from a real RunEngine scanning ophyd's simulated devices.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from reflexarc.edge.bluesky import BlueskyConfig, BlueskySource, Publisher, jsonable
from reflexarc.edge.claimcheck import ClaimCheck
from reflexarc.edge.config import parse_agent_config
from reflexarc.edge.sources import Reading, SourceContext, source_class


def run_scans(path: Path, n: int = 2, points: int = 5) -> list[tuple[str, dict[str, Any]]]:
    """``n`` scans of ophyd's simulated detector over its simulated motor; every document, in order."""
    from bluesky import RunEngine
    from bluesky.plans import scan
    from ophyd.sim import det, motor

    docs: list[tuple[str, dict[str, Any]]] = []
    engine = RunEngine({}, context_managers=[])
    with Publisher(path) as pub:
        engine.subscribe(pub)
        engine.subscribe(lambda name, doc: docs.append((name, doc)))
        for i in range(n):
            engine(scan([det], motor, -1, 1, points), sample=f"S{i}")
    return docs


class Follow:
    """A bluesky source following a file in the background; its readings and rejections."""

    def __init__(self, path: Path, checkpoint: str | None = None, **cfg: Any) -> None:
        self.readings: list[Reading] = []
        self.rejected: list[str] = []

        async def reject(error: str, origin: str, payload: bytes) -> None:
            self.rejected.append(error)

        config = BlueskyConfig.model_validate({"type": "bluesky", "path": str(path), "poll_s": 0.01, **cfg})
        ctx = SourceContext("bl1", "scan1", checkpoint, ClaimCheck("memory://claims", 1 << 20), reject=reject)
        self.source = BlueskySource(config, ctx)
        self.task: asyncio.Task[None] | None = None

    async def emit(self, r: Reading) -> None:
        self.readings.append(r)

    async def __aenter__(self) -> Follow:
        self.task = asyncio.create_task(self.source.run(self.emit))
        return self

    async def __aexit__(self, *exc: object) -> None:
        assert self.task is not None
        self.task.cancel()
        await asyncio.gather(self.task, return_exceptions=True)

    async def until(self, cond: Callable[[], bool], what: str, timeout: float = 10.0) -> None:
        deadline = time.monotonic() + timeout
        while not cond():
            if self.task is not None and self.task.done():
                self.task.result()
            if time.monotonic() > deadline:
                raise AssertionError(f"timed out waiting for {what}: {len(self.readings)} readings")
            await asyncio.sleep(0.01)

    def names(self) -> list[str]:
        return [r.data["name"] for r in self.readings]  # type: ignore[index]


def test_documents_become_plain_json() -> None:
    import numpy as np

    doc = {"data": {"img": np.arange(3), "x": np.float64(1.5), "bad": float("nan")}, "t": (1, 2)}
    assert jsonable(doc) == {"data": {"img": [0, 1, 2], "x": 1.5, "bad": None}, "t": [1, 2]}
    json.dumps(jsonable(doc), allow_nan=False)


def test_the_publisher_writes_one_line_per_document_and_ends_a_torn_line(tmp_path: Path) -> None:
    path = tmp_path / "docs.jsonl"
    docs = run_scans(path, n=1)
    lines = path.read_bytes().splitlines()
    assert [json.loads(x)["name"] for x in lines] == [n for n, _ in docs]
    assert json.loads(lines[0])["doc"]["uid"] == docs[0][1]["uid"]
    with open(path, "ab") as fh:
        fh.write(b'{"name": "event", "doc": {"uid": "torn')  # a writer died mid-line
    with Publisher(path) as pub:
        pub("stop", {"uid": "s1", "run_start": "r1", "time": 1.0, "exit_status": "success"})
    tail = path.read_bytes().splitlines()[-2:]
    assert tail[0].endswith(b"torn") and json.loads(tail[1])["doc"]["uid"] == "s1"


def test_agent_yaml_finds_the_bluesky_plugin() -> None:
    assert source_class("bluesky") is BlueskySource
    cfg = parse_agent_config("site: bl1\ndevice: d1\nsources:\n  - {type: bluesky, path: scan.jsonl}\n")
    assert isinstance(cfg.sources[0], BlueskyConfig) and cfg.sources[0].stream == "bluesky"


async def test_every_document_once_in_order_with_its_run(tmp_path: Path) -> None:
    path = tmp_path / "docs.jsonl"
    async with Follow(path) as f:
        docs = await asyncio.to_thread(run_scans, path)
        await f.until(lambda: len(f.readings) == len(docs), "every document")
        assert f.names() == [n for n, _ in docs]
        assert [r.data["doc"]["uid"] for r in f.readings] == [d["uid"] for _, d in docs]  # type: ignore[index]
        starts = [d for n, d in docs if n == "start"]
        for r, (name, doc) in zip(f.readings, docs, strict=True):
            run = r.data["run"]  # type: ignore[index]
            start = next(s for s in starts if s["uid"] == run["uid"])
            assert run == {
                "uid": start["uid"],
                "plan_name": "scan",
                "scan_id": start["scan_id"],
                "sample": start["sample"],
            }, name
            assert r.time is not None and r.time.timestamp() == pytest.approx(doc["time"])
            assert r.stream == "bluesky"
        assert len({r.id for r in f.readings}) == len(docs)
        # Open runs leave the checkpoint when they stop: it stays small.
        final = json.loads(f.readings[-1].checkpoint or "{}")
        assert final["runs"] == {} and final["descriptors"] == {} and final["offset"] == path.stat().st_size


async def test_a_restart_resumes_after_the_checkpoint_with_the_runs_metadata(tmp_path: Path) -> None:
    path = tmp_path / "docs.jsonl"
    docs = run_scans(path, n=1, points=6)
    async with Follow(path) as f:
        await f.until(lambda: len(f.readings) == len(docs), "every document")
        ids = [r.id for r in f.readings]
        checkpoint = f.readings[4].checkpoint  # in the middle of the run
    async with Follow(path, checkpoint=checkpoint) as f:
        await f.until(lambda: len(f.readings) == len(docs) - 5, "the rest")
        assert [r.id for r in f.readings] == ids[5:], "stable ids: a consumer deduplicates a repeat"
        assert all(r.data["run"]["sample"] == "S0" for r in f.readings)  # type: ignore[index]


async def test_bad_lines_are_dead_letters_and_name_value_pairs_are_read(tmp_path: Path) -> None:
    path = tmp_path / "docs.jsonl"
    start = {"uid": "r1", "time": 10.0, "plan_name": "count", "scan_id": 7}
    lines = [
        json.dumps(["start", start]),  # a [name, doc] line (other JSONL writers)
        "not json",
        json.dumps({"name": "banana", "doc": {}}),
        json.dumps({"name": "stop", "doc": {"uid": "s1", "run_start": "r1", "time": 11.0, "exit_status": "abort"}}),
        '{"name": "descriptor", "doc": {"uid": "d1"',  # still being written: not read yet
    ]
    path.write_text("\n".join(lines))
    async with Follow(path, documents=["start", "stop"]) as f:
        await f.until(lambda: len(f.readings) == 2 and len(f.rejected) == 2, "two documents, two refusals")
        assert f.names() == ["start", "stop"]
        assert f.readings[1].data["run"] == {"uid": "r1", "plan_name": "count", "scan_id": 7}  # type: ignore[index]
        assert "not JSON" in f.rejected[0] or "Expecting value" in f.rejected[0]
        assert "not a bluesky document: name 'banana'" in f.rejected[1]


async def test_checkpoint_offsets_count_bytes_not_characters(tmp_path: Path) -> None:
    path = tmp_path / "docs.jsonl"
    with Publisher(path) as pub:
        pub("start", {"uid": "r1", "time": 1.0, "sample": "Ångström ✓"})
    async with Follow(path) as f:
        await f.until(lambda: len(f.readings) == 1, "the start")
        checkpoint = f.readings[0].checkpoint
    assert json.loads(checkpoint or "{}")["offset"] == path.stat().st_size
    with Publisher(path) as pub:
        pub("stop", {"uid": "s1", "run_start": "r1", "time": 2.0, "exit_status": "success"})
    async with Follow(path, checkpoint=checkpoint) as f:
        await f.until(lambda: len(f.readings) == 1, "the stop")
        assert f.names() == ["stop"] and not f.rejected
        assert f.readings[0].data["run"]["sample"] == "Ångström ✓"  # type: ignore[index]
