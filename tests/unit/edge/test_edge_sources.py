"""Built-in sources without a broker: what they emit, checkpoints, bad input, claim checks."""

from __future__ import annotations

import asyncio
import base64
import hashlib
import json
import sys
from pathlib import Path
from typing import Any

import pytest

from reflexarc.edge.claimcheck import ClaimCheck, read_array, read_claim
from reflexarc.edge.sources import Reading, SourceContext, source_class


def _ctx(tmp: Path, checkpoint: str | None = None, threshold: int = 1024) -> tuple[SourceContext, list[Any]]:
    rejected: list[Any] = []

    async def reject(error: str, origin: str, payload: bytes) -> None:
        rejected.append((error, origin, payload))

    cc = ClaimCheck((tmp / "claims").as_uri(), threshold)
    return SourceContext("bl1", "det1", checkpoint, cc, base_dir=tmp, reject=reject), rejected


async def _collect(kind: str, spec: dict[str, Any], ctx: SourceContext, limit: int | None = None) -> list[Reading]:
    cls = source_class(kind)
    src = cls(cls.config_model.model_validate({"type": kind, **spec}), ctx)
    out: list[Reading] = []
    done = asyncio.Event()

    async def emit(r: Reading) -> None:
        out.append(r)
        if limit is not None and len(out) >= limit:
            done.set()

    task = asyncio.create_task(src.run(emit))
    if limit is None:
        await asyncio.wait_for(task, 10)
    else:
        await asyncio.wait_for(done.wait(), 10)
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
    return out


async def test_simulated_resumes_from_checkpoint(tmp_path: Path) -> None:
    ctx, _ = _ctx(tmp_path, checkpoint="5")
    out = await _collect("simulated", {"stream": "t", "rate_hz": 10000, "count": 8, "seed": 1}, ctx)
    assert [r.data["seq"] for r in out] == [5, 6, 7]  # type: ignore[index]
    assert out[-1].checkpoint == "8" and len({r.id for r in out}) == 3


async def test_simulated_spikes_and_drift(tmp_path: Path) -> None:
    ctx, _ = _ctx(tmp_path)
    spec = {
        "stream": "t",
        "rate_hz": 10000,
        "count": 200,
        "noise": 0,
        "spike_probability": 0.5,
        "spike_size": 100,
        "base": 1,
        "seed": 3,
    }
    values = [r.data["value"] for r in await _collect("simulated", spec, ctx)]  # type: ignore[index]
    spikes = [v for v in values if v > 50]
    assert 50 < len(spikes) < 150 and min(values) >= 1


async def test_frames_inline_and_by_reference(tmp_path: Path) -> None:
    ctx, _ = _ctx(tmp_path, threshold=100)
    small = await _collect(
        "frames", {"stream": "f", "shape": [4, 4], "dtype": "uint16", "rate_hz": 1000, "count": 1}, ctx
    )
    frame = base64.b64decode(small[0].data["frame"])  # type: ignore[index]
    assert len(frame) == 32 and hashlib.sha256(frame).hexdigest() == small[0].data["sha256"]  # type: ignore[index]
    big = await _collect("frames", {"stream": "g", "shape": [32, 32], "rate_hz": 1000, "count": 1}, ctx)
    data = big[0].data
    ref = data["ref"]  # type: ignore[index]
    assert "frame" not in data and ref["shape"] == [32, 32] and ref["dtype"] == "uint16"
    array = read_array(ref)  # a real .npy, verified against the reference's sha256
    assert array.shape == (32, 32) and hashlib.sha256(array.tobytes()).hexdigest() == data["sha256"]  # type: ignore[index]
    assert len(read_claim(ref)) == ref["size"] > 2048


async def test_replay_emits_lines_and_keeps_bad_ones_as_dead_letters(tmp_path: Path) -> None:
    lines = [
        json.dumps({"stream": "a", "data": {"i": 1}, "id": "one"}),
        "not json",
        json.dumps({"stream": "b/#", "data": {}}),
        json.dumps({"stream": "b", "data": {"i": 2}}),
    ]
    (tmp_path / "r.jsonl").write_text("\n".join(lines) + "\n")
    ctx, rejected = _ctx(tmp_path, checkpoint=None)
    out = await _collect("replay", {"path": "r.jsonl", "rate_hz": 0}, ctx)
    assert (out[0].stream, out[0].id, out[0].checkpoint) == ("a", "one", "1")
    assert out[1].stream == "b" and out[1].checkpoint == "4"
    assert rejected[0][0].endswith("r.jsonl:2: not JSON: Expecting value: line 1 column 1 (char 0)")
    assert "invalid stream" in rejected[1][0]
    ctx2, _ = _ctx(tmp_path, checkpoint="1")
    assert [r.data for r in await _collect("replay", {"path": "r.jsonl", "rate_hz": 0}, ctx2)] == [{"i": 2}]


async def test_directory_watcher_takes_settled_files_once(tmp_path: Path) -> None:
    watch = tmp_path / "in"
    watch.mkdir()
    (watch / "small.txt").write_bytes(b"hello")
    (watch / "big.bin").write_bytes(b"\x01" * 5000)
    (watch / "skip.tmp.part").write_bytes(b"half")
    ctx, _ = _ctx(tmp_path, threshold=1024)
    spec = {"stream": "files", "path": "in", "poll_s": 0.05, "settle_s": 0.1}
    out = await _collect("directory", spec, ctx, limit=2)
    by_name = {r.data["name"]: r for r in out}  # type: ignore[index]
    assert set(by_name) == {"small.txt", "big.bin"}
    assert base64.b64decode(by_name["small.txt"].data["content"]) == b"hello"  # type: ignore[index]
    assert read_claim(by_name["big.bin"].data["ref"]) == b"\x01" * 5000  # type: ignore[index]
    # Restarted with the last checkpoint: nothing is taken again; a new file is.
    ctx2, _ = _ctx(tmp_path, checkpoint=out[-1].checkpoint)
    (watch / "new.txt").write_bytes(b"new")
    again = await _collect("directory", spec, ctx2, limit=1)
    assert [r.data["name"] for r in again] == ["new.txt"]  # type: ignore[index]


async def test_lines_from_a_command_and_json_lines(tmp_path: Path) -> None:
    ctx, rejected = _ctx(tmp_path)
    code = "print('a'); print('b'); print('')"
    out = await _collect("lines", {"stream": "l", "command": [sys.executable, "-c", code]}, ctx)
    assert [r.data for r in out] == [{"line": "a", "n": 1}, {"line": "b", "n": 2}]
    (tmp_path / "serial").write_text('{"v": 1}\nnope\n[1]\n{"v": 2}\n')
    out = await _collect("lines", {"stream": "l", "path": "serial", "format": "json"}, ctx)
    assert [r.data for r in out] == [{"v": 1}, {"v": 2}] and len(rejected) == 2


def test_lines_needs_exactly_one_input() -> None:
    cls = source_class("lines")
    with pytest.raises(ValueError, match="exactly one"):
        cls.config_model.model_validate({"type": "lines", "stream": "l"})
