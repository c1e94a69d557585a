"""Stage-in at a real site agent (local engine, real Tansu) from a real SeaweedFS S3 store."""

from __future__ import annotations

import asyncio
import hashlib
import json
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from reflexarc.config import KafkaSettings
from reflexarc.edge.claimcheck import ClaimCheck
from reflexarc.events import TaskRequest
from reflexarc.hpc_bridge.agent import SiteAgent
from reflexarc.hpc_bridge.client import SiteClient
from reflexarc.hpc_bridge.site_config import SiteConfig
from reflexarc.objectstore import ObjectRef, open_store, read_bytes
from reflexarc.s3store import S3Store

pytestmark = [pytest.mark.integration, pytest.mark.timeout(120)]

FRAMES = "reflexarc.hpc_bridge.examples.frames"


@pytest.fixture
async def site(tmp_path: Path, kafka_settings: KafkaSettings, s3_env: S3Store) -> AsyncIterator[SiteClient]:
    """A site offering ``frame_stats`` (download) and ``url_of`` (pass), and a client."""
    cfg = SiteConfig.model_validate(
        {
            "site": "hpc",
            "namespace": "rx",
            "kafka": kafka_settings.model_dump(),
            "state_dir": str(tmp_path / "state"),
            "engine": {"kind": "local", "local": {"max_workers": 2}},
            "apps": {
                "frame_stats": {
                    "function": f"{FRAMES}:frame_stats",
                    "refs": {"frame": {"stage": "download"}},
                    "retries": 1,
                },
                "url_of": {"function": f"{FRAMES}:url_of", "refs": {"frame": {"stage": "pass"}}},
                "big": {"function": "reflexarc.hpc_bridge.examples.apps:big"},
            },
            "results": {"inline_max_bytes": 1024 * 1024, "store": f"{s3_env.url}/results"},
        }
    )
    agent = SiteAgent(cfg)
    stop = asyncio.Event()
    task = asyncio.create_task(agent.run(stop))
    async with SiteClient(kafka_settings) as client:
        yield client
        stop.set()
        await asyncio.wait_for(task, 30)


async def test_references_are_staged_verified_or_failed_with_the_reason(
    site: SiteClient, s3_env: S3Store, tmp_path: Path
) -> None:
    cc = ClaimCheck(f"{s3_env.url}/staging", 0)
    array = np.arange(256 * 256, dtype=np.uint16).reshape(256, 256)
    good = await cc.put_array("good.npy", array)
    bad = await cc.put_array("bad.npy", array)
    fs, path = open_store(bad["url"])
    blob = bytearray(fs.cat_file(path))
    blob[-1] ^= 0xFF  # one flipped bit of pixel data: same size, wrong checksum
    fs.pipe_file(path, bytes(blob))
    missing = {**good, "url": f"{s3_env.url}/staging/missing.npy"}

    def req(task_id: str, app: str, frame: Any) -> TaskRequest:
        return TaskRequest(task_id=task_id, app=app, args={"frame": frame}, site="hpc")

    await site.submit(
        [
            req("t-good", "frame_stats", good),
            req("t-pass", "url_of", good),
            req("t-missing", "frame_stats", missing),
            req("t-bad", "frame_stats", bad),
        ]
    )
    res = await site.wait_results({"t-good", "t-pass", "t-missing", "t-bad"}, 60)
    ok = res["t-good"]
    assert ok.status == "done" and ok.result is not None
    assert ok.result["sha256"] == hashlib.sha256(array.tobytes()).hexdigest() and ok.result["shape"] == [256, 256]
    assert "/stage-in/frame/good.npy" in ok.result["path"]  # inside the task's work directory
    assert res["t-pass"].result == {"frame": good["url"]}
    assert res["t-missing"].status == "failed"
    assert res["t-missing"].error == f"stage-in: not found: {s3_env.url}/staging/missing.npy"
    assert res["t-bad"].status == "failed" and res["t-bad"].error is not None
    assert res["t-bad"].error.startswith(f"stage-in: checksum mismatch: {bad['url']}")
    assert res["t-bad"].attempts == 2  # retried per the app's policy (retries: 1), then failed


async def test_a_large_result_goes_to_the_store_by_reference(site: SiteClient, s3_env: S3Store) -> None:
    await site.submit([TaskRequest(task_id="t-big", app="big", args={"n": 2 * 1024 * 1024}, site="hpc")])
    res = (await site.wait_results({"t-big"}, 60))["t-big"]
    assert res.status == "done" and res.result is not None and res.result_ref is not None
    assert res.result_ref == f"{s3_env.url}/results/t-big.json" == res.result["ref"]["url"]
    assert set(res.result) == {"ref"}  # the 2 MiB field is not inline; its metadata is
    ref = ObjectRef.from_data(res.result["ref"])
    assert ref.content_type == "application/json" and ref.size > 2 * 1024 * 1024
    assert json.loads(read_bytes(ref)) == {"data": "x" * (2 * 1024 * 1024)}  # verified against its sha256
