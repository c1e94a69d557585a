"""The epics source against a real Channel Access IOC (caproto's server in a child process, loopback only).

No broker: readings go to a list, as the agent's ``emit`` would hand them to the spool.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from prometheus_client import CollectorRegistry
from pydantic import ValidationError

from reflexarc.config import ConfigError
from reflexarc.edge.claimcheck import ClaimCheck, read_claim
from reflexarc.edge.config import parse_agent_config
from reflexarc.edge.sources import Reading, SourceContext, source_class
from reflexarc.edge.sources.epics import EpicsConfig, EpicsSource, plain_value, unix_ns
from reflexarc.scenarios.epics.ioc import IocProcess, caget, caput


@pytest.fixture(scope="module")
def ioc(tmp_path_factory: pytest.TempPathFactory) -> Iterator[IocProcess]:
    """One IOC for the module, on its own CA port; the CA settings in os.environ meanwhile."""
    with pytest.MonkeyPatch.context() as mp:
        proc = IocProcess(tmp_path_factory.mktemp("ioc"), prefix="US:", wave_size=1000)
        for k, v in proc.env.items():
            mp.setenv(k, v)
        # Lost PVs are searched for again every second at most (caproto's default backoff reaches 5 s).
        mp.setenv("CAPROTO_CLIENT_MAX_RETRY_SEARCHES_INTERVAL_SEC", "1")
        with proc:
            yield proc


class Run:
    """An epics source running in the background, its readings and rejections collected."""

    def __init__(
        self,
        cfg: dict[str, Any],
        tmp: Path,
        checkpoint: str | None = None,
        registry: CollectorRegistry | None = None,
        threshold: int = 1 << 20,
    ) -> None:
        self.readings: list[Reading] = []
        self.rejected: list[str] = []
        self.config = EpicsConfig.model_validate({"type": "epics", **cfg})

        async def reject(error: str, origin: str, payload: bytes) -> None:
            self.rejected.append(error)

        ctx = SourceContext(
            "bl1",
            "det1",
            checkpoint,
            ClaimCheck((tmp / "claims").as_uri(), threshold),
            reject=reject,
            registry=registry,
        )
        self.source = EpicsSource(self.config, ctx)
        self.task: asyncio.Task[None] | None = None

    async def emit(self, r: Reading) -> None:
        self.readings.append(r)

    async def __aenter__(self) -> Run:
        self.task = asyncio.create_task(self.source.run(self.emit))
        return self

    async def __aexit__(self, *exc: object) -> None:
        assert self.task is not None
        self.task.cancel()
        await asyncio.gather(self.task, return_exceptions=True)

    def data(self, stream: str) -> list[dict[str, Any]]:
        return [r.data for r in self.readings if r.stream == stream]  # type: ignore[misc]

    async def until(self, cond: Callable[[], bool], what: str, timeout: float = 10.0) -> None:
        deadline = time.monotonic() + timeout
        while not cond():
            if self.task is not None and self.task.done():
                self.task.result()
            if time.monotonic() > deadline:
                raise AssertionError(f"timed out waiting for {what}; got {[r.data for r in self.readings]}")
            await asyncio.sleep(0.02)


def connected(run: Run, pv: str) -> bool:
    return any(d["pv"] == pv and d["state"] == "connected" for d in run.data("epics-status"))


# ---- configuration -----------------------------------------------------------------------
def test_config_takes_names_or_settings_and_refuses_duplicates_and_bad_streams() -> None:
    cfg = EpicsConfig.model_validate(
        {"type": "epics", "stream": "pvs", "pvs": ["A:x", {"pv": "A:y", "stream": "y", "deadband": 0.5}]}
    )
    assert [(p.pv, p.stream, p.deadband) for p in cfg.pv_settings()] == [("A:x", None, None), ("A:y", "y", 0.5)]
    with pytest.raises(ValidationError, match="listed twice"):
        EpicsConfig.model_validate({"type": "epics", "stream": "s", "pvs": ["A:x", {"pv": "A:x"}]})
    with pytest.raises(ValidationError, match="stream"):
        EpicsConfig.model_validate({"type": "epics", "stream": "s", "pvs": [{"pv": "A:x", "stream": "a/b"}]})
    with pytest.raises(ValidationError):
        EpicsConfig.model_validate({"type": "epics", "stream": "s", "pvs": [{"pv": "A:x", "max_rate_hz": 0}]})
    with pytest.raises(ValidationError):
        EpicsConfig.model_validate({"type": "epics", "stream": "s", "pvs": []})


def test_agent_yaml_finds_the_epics_plugin_and_names_bad_fields() -> None:
    assert source_class("epics") is EpicsSource
    cfg = parse_agent_config("site: bl1\ndevice: d1\nsources:\n  - {type: epics, stream: s, pvs: [A:x]}\n")
    assert isinstance(cfg.sources[0], EpicsConfig)
    with pytest.raises(ConfigError, match="deadband"):
        parse_agent_config(
            "site: bl1\ndevice: d1\nsources:\n  - {type: epics, stream: s, pvs: [{pv: A:x, deadband: -1}]}\n"
        )


def test_values_become_json_without_nan() -> None:
    import numpy as np

    assert plain_value(np.array([2.5])) == (2.5, 1)
    assert plain_value(np.array([1.0, float("nan"), float("inf")])) == ([1.0, None, None], 3)
    assert plain_value([b"text"]) == ("text", 1)


# ---- against the IOC ---------------------------------------------------------------------
async def test_updates_carry_value_ioc_timestamp_alarm_units_and_precision(ioc: IocProcess, tmp_path: Path) -> None:
    ramp = ioc.pv("ramp")
    async with Run({"stream": "ramp", "pvs": [ramp]}, tmp_path) as run:
        await run.until(lambda: connected(run, ramp) and len(run.data("ramp")) >= 1, "connect + first value")
        first = run.data("ramp")[0]["value"]
        # 450 updates at 500 Hz; from 400 on the ramp is in minor alarm. (A CA server drops the oldest
        # queued updates of a client that falls behind a faster producer: this rate is kept up with.)
        await caput(ioc.pv("ramp:rate"), 500)
        await caput(ioc.pv("ramp:go"), 450)
        await run.until(lambda: len(run.data("ramp")) >= 451, "450 updates")
        events = run.data("ramp")[1:]
        assert [d["value"] for d in events] == [first + i for i in range(1, 451)], "each update once, in order"
        for d in events:
            alarm = ("HIGH", "MINOR_ALARM") if d["value"] >= 400 else ("NO_ALARM", "NO_ALARM")
            assert (d["status"], d["severity"]) == alarm, d
        last = events[-1]
        assert last["units"] == "n" and last["precision"] == 0 and last["pv"] == ramp
        reading = run.readings[-1]
        assert reading.time is not None and reading.time.timestamp() == pytest.approx(last["timestamp"], abs=1e-6)
        assert abs(last["ts_ns"] / 1e9 - last["timestamp"]) < 1e-6
        # The checkpoint names the last published update of the PV: a restart does not repeat it.
        cp = json.loads(reading.checkpoint or "{}")
        assert cp[ramp][0] == last["ts_ns"]


async def test_deadband_publishes_only_changes_beyond_it(ioc: IocProcess, tmp_path: Path) -> None:
    off = ioc.pv("mtr.OFF")
    await caput(off, 0.0)
    async with Run({"stream": "off", "pvs": [{"pv": off, "deadband": 0.5}]}, tmp_path) as run:
        await run.until(lambda: len(run.data("off")) == 1, "the value on connect")
        for v in (0.1, 0.2, 0.7, 0.75, 1.3, 1.0):
            await caput(off, v)
        await run.until(lambda: run.data("off")[-1]["value"] == 1.3, "1.3")
        await caput(off, 0.0)  # beyond the deadband of 1.3: published
        await run.until(lambda: run.data("off")[-1]["value"] == 0.0, "0.0")
        assert [d["value"] for d in run.data("off")] == [0.0, 0.7, 1.3, 0.0]


async def test_rate_limit_coalesces_and_always_publishes_the_newest(ioc: IocProcess, tmp_path: Path) -> None:
    ramp = ioc.pv("ramp")
    async with Run(
        {"stream": "r", "pvs": [{"pv": ramp, "max_rate_hz": 4, "publish_on_connect": False}]}, tmp_path
    ) as run:
        await run.until(lambda: connected(run, ramp), "connect")
        await asyncio.sleep(0.3)  # the value on connect has arrived (and was not published)
        assert run.data("r") == []
        await caput(ioc.pv("ramp:rate"), 200)
        start = float(await caget(ramp)) + 1
        await caput(ioc.pv("ramp:go"), 100)  # 0.5 s of updates
        await run.until(lambda: bool(run.data("r")) and run.data("r")[-1]["value"] == start + 99, "the newest")
        values = [d["value"] for d in run.data("r")]
        assert 2 <= len(values) <= 5, values  # 4 Hz over ~0.5 s (+ the first)
        assert values == sorted(values) and values[0] == start


async def test_waveforms_by_reference_and_capped_with_an_error_naming_the_limit(
    ioc: IocProcess, tmp_path: Path
) -> None:
    wave = ioc.pv("wave")
    async with Run({"stream": "w", "pvs": [wave]}, tmp_path, threshold=4000) as run:
        await run.until(lambda: len(run.data("w")) == 1, "the waveform on connect")
        await caput(ioc.pv("wave:go"), 7)
        await run.until(lambda: len(run.data("w")) == 2, "a new waveform")
        ev = run.data("w")[-1]
        assert ev["shape"] == [1000] and ev["size"] == 8000 and "value" not in ev
        blob = read_claim(ev["ref"])
        assert hashlib.sha256(blob).hexdigest() == ev["sha256"]
        import numpy as np

        assert np.frombuffer(blob, dtype=ev["dtype"]).tolist() == [7.0 + i for i in range(1000)]
    async with Run({"stream": "w", "pvs": [wave], "max_array_bytes": 4096}, tmp_path) as run:
        await run.until(lambda: bool(run.rejected), "a refusal")
        assert run.data("w") == []
        assert "1000 elements (8000 bytes)" in run.rejected[0] and "max_array_bytes=4096" in run.rejected[0]


async def test_enum_and_string_pvs(ioc: IocProcess, tmp_path: Path) -> None:
    shutter, label = ioc.pv("shutter"), ioc.pv("label")
    async with Run({"stream": "s", "pvs": [shutter, {"pv": label, "stream": "l"}]}, tmp_path) as run:
        await run.until(lambda: run.data("s") and run.data("l"), "both values")
        await caput(shutter, "Open")
        await caput(label, "sample A")
        await run.until(lambda: len(run.data("s")) == 2 and len(run.data("l")) == 2, "the changes")
        assert [(d["value"], d["enum"]) for d in run.data("s")] == [(0, "Closed"), (1, "Open")]
        assert run.data("l")[-1]["value"] == "sample A"
        await caput(shutter, "Closed")


async def test_a_restart_from_the_checkpoint_does_not_repeat_the_last_update(ioc: IocProcess, tmp_path: Path) -> None:
    cen = ioc.pv("det.CEN")
    async with Run({"stream": "c", "pvs": [cen]}, tmp_path) as run:
        await run.until(lambda: len(run.data("c")) == 1, "the value on connect")
        checkpoint = run.readings[-1].checkpoint
    async with Run({"stream": "c", "pvs": [cen]}, tmp_path, checkpoint=checkpoint) as run:
        await run.until(lambda: connected(run, cen), "connect")
        await asyncio.sleep(0.3)
        assert run.data("c") == [], "the same update (IOC timestamp and value) was published already"
        await caput(cen, 2.0)
        await run.until(lambda: len(run.data("c")) == 1, "the new value")
        await caput(cen, 1.234)


async def test_lost_and_unknown_pvs_are_status_events_and_metrics(ioc: IocProcess, tmp_path: Path) -> None:
    ramp, ghost = ioc.pv("ramp"), ioc.pv("no-such-pv")
    registry = CollectorRegistry()
    cfg = {"stream": "r", "pvs": [ramp, ghost], "connect_timeout_s": 0.5, "status_stream": "pv-status"}
    async with Run(cfg, tmp_path, registry=registry) as run:

        def states(pv: str) -> list[str]:
            return [d["state"] for d in run.data("pv-status") if d["pv"] == pv]

        def gauge(pv: str) -> float | None:
            return registry.get_sample_value("rx_edge_epics_connected", {"pv": pv})

        await run.until(lambda: states(ghost) == ["disconnected"], "the unknown PV reported")
        assert "within 0.5s" in run.data("pv-status")[-1]["reason"]
        await run.until(lambda: states(ramp) == ["connected"], "connect")
        assert gauge(ramp) == 1
        await asyncio.to_thread(ioc.stop)
        try:
            await run.until(lambda: states(ramp) == ["connected", "disconnected"], "the disconnect")
            assert gauge(ramp) == 0
            assert registry.get_sample_value("rx_edge_epics_disconnects_total", {"pv": ramp}) == 1
        finally:
            await asyncio.to_thread(ioc.start)
        await run.until(lambda: states(ramp) == ["connected", "disconnected", "connected"], "the reconnect", 20)
        assert gauge(ramp) == 1 and "down_s" in run.data("pv-status")[-1]
        assert registry.get_sample_value("rx_edge_epics_published_total", {"pv": ramp}) == len(run.data("r"))


def test_epics_timestamps_convert_exactly() -> None:
    class Stamp:
        secondsSinceEpoch = 1_000_000_000  # caproto's field names
        nanoSeconds = 123_456_789

    assert unix_ns(Stamp()) == (1_000_000_000 + 631_152_000) * 1_000_000_000 + 123_456_789
