"""A small beamline IOC on real Channel Access (caproto's server), and a way to run it on loopback.

PVs (``P`` is the prefix, default ``RX:``):

| PV | type | what |
|---|---|---|
| ``P:mtr`` | double, mm, limits -10..10 | motor setpoint; a put completes when the move is done |
| ``P:mtr.RBV`` | double, mm | motor readback (position + ``P:mtr.OFF``) |
| ``P:mtr.VELO`` | double, mm/s | motor speed |
| ``P:mtr.OFF`` | double, mm | readback error (an encoder that disagrees: readback checks fail) |
| ``P:det`` | double, counts | detector: a Gaussian peak over the motor position, on a background |
| ``P:det.CEN`` | double, mm | where the detector's peak is |
| ``P:ramp`` | double, HIGH/MINOR from 400 | a counter; ``P:ramp:go`` = N posts N updates at ``P:ramp:rate`` Hz |
| ``P:ramp:go`` | long | start a burst of N ramp updates (0 stops one) |
| ``P:ramp:rate`` | double, Hz | burst rate (0 = as fast as the server can) |
| ``P:wave`` | double[N] | a waveform (``--wave-size`` elements); ``P:wave:go`` posts a new one |
| ``P:shutter`` | enum Closed/Open | a two-state device |
| ``P:label`` | string | free text |

With ``--log FILE`` every ramp update is appended as a JSON line
``{"value": v, "ts_ns": unix_ns}``, so tests compare what arrived
downstream with what the IOC really posted, timestamps included.

Run it (the CA settings keep every packet on loopback, see :func:`ca_env`)::

    python -m reflexarc.scenarios.epics.ioc --prefix RX: [--center 1.234] [--log ramp.jsonl]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import math
import os
import socket
import sys
import time
from pathlib import Path
from typing import Any

from reflexarc.process import ManagedProcess, free_port, port_open

# Seconds between the UNIX epoch and the EPICS epoch (1990-01-01).
EPICS_EPOCH_OFFSET = 631_152_000
MOTOR_LIMITS = (-10.0, 10.0)
BACKGROUND = 100.0


def epics_stamp(unix_ns: int) -> tuple[int, int]:
    """A UNIX time in ns as an EPICS ``(seconds since 1990, nanoseconds)`` pair (exact)."""
    secs, nanos = divmod(unix_ns, 1_000_000_000)
    return secs - EPICS_EPOCH_OFFSET, nanos


def detector_counts(position: float, center: float, height: float, width: float) -> float:
    """What the detector reads with the motor at ``position``: a Gaussian on a flat background."""
    return BACKGROUND + height * math.exp(-((position - center) ** 2) / (2 * width**2))


def _udp_free(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def free_ca_port() -> int:
    """A port ``P`` free for a CA server on loopback: TCP and UDP ``P`` and UDP ``P+1`` (the repeater)."""
    for _ in range(50):
        port = free_port()
        if port < 65_000 and _udp_free(port) and _udp_free(port + 1):
            return port
    raise RuntimeError("no free port pair for Channel Access on 127.0.0.1")


def ca_env(port: int) -> dict[str, str]:
    """Channel Access settings that keep servers and clients on loopback, off the default ports.

    Every process of a test or demo (IOC, edge agent, RunEngine) gets the same
    ones: searches go to 127.0.0.1 only (no broadcast), the IOC listens on
    127.0.0.1 only, and the repeater port is ``port + 1``.
    """
    return {
        "EPICS_CA_AUTO_ADDR_LIST": "NO",
        "EPICS_CA_ADDR_LIST": "127.0.0.1",
        "EPICS_CAS_INTF_ADDR_LIST": "127.0.0.1",
        "EPICS_CAS_AUTO_BEACON_ADDR_LIST": "NO",
        "EPICS_CAS_BEACON_ADDR_LIST": "127.0.0.1",
        "EPICS_CA_SERVER_PORT": str(port),
        "EPICS_CAS_SERVER_PORT": str(port),
        "EPICS_CA_REPEATER_PORT": str(port + 1),
        # Beacons go to the repeater; its default port (5065) is not ours.
        "EPICS_CAS_BEACON_PORT": str(port + 1),
    }


def build_ioc(
    prefix: str,
    *,
    center: float = 1.234,
    width: float = 0.6,
    height: float = 900.0,
    velocity: float = 40.0,
    wave_size: int = 1000,
    log_path: str | None = None,
) -> Any:
    """The IOC's PV group (a :class:`caproto.server.PVGroup`); ``.pvdb`` is what the server serves."""
    from caproto import ChannelType
    from caproto.server import PVGroup, pvproperty

    lo, hi = MOTOR_LIMITS

    class BeamlineIOC(PVGroup):
        """Motor, detector, ramp and waveform of the test beamline."""

        mtr = pvproperty(
            value=0.0,
            name="mtr",
            units="mm",
            precision=3,
            lower_ctrl_limit=lo,
            upper_ctrl_limit=hi,
            doc="motor setpoint",
        )
        rbv = pvproperty(value=0.0, name="mtr.RBV", units="mm", precision=3, read_only=True, doc="readback")
        velo = pvproperty(value=velocity, name="mtr.VELO", units="mm/s", precision=2)
        off = pvproperty(value=0.0, name="mtr.OFF", units="mm", precision=3, doc="readback error")
        det = pvproperty(value=0.0, name="det", units="counts", precision=1, read_only=True)
        cen = pvproperty(value=center, name="det.CEN", units="mm", precision=3)
        ramp = pvproperty(
            value=0.0,
            name="ramp",
            units="n",
            precision=0,
            read_only=True,
            # From 400 on the counter is in (minor) alarm: events carry status and severity.
            upper_warning_limit=400.0,
            upper_alarm_limit=1_000_000.0,
            lower_warning_limit=-1.0,
            lower_alarm_limit=-2.0,
        )
        ramp_go = pvproperty(value=0, name="ramp:go", dtype=ChannelType.LONG)
        ramp_rate = pvproperty(value=100.0, name="ramp:rate", units="Hz")
        wave = pvproperty(value=[0.0] * wave_size, name="wave", max_length=wave_size, read_only=True)
        wave_go = pvproperty(value=0, name="wave:go", dtype=ChannelType.LONG)
        shutter = pvproperty(value="Closed", name="shutter", dtype=ChannelType.ENUM, enum_strings=["Closed", "Open"])
        label = pvproperty(value="", name="label", dtype=ChannelType.STRING, doc="a free-text string PV")

        def __init__(self, *args: Any, **kwargs: Any) -> None:
            super().__init__(*args, **kwargs)
            self._position = 0.0
            self._ramp_task: asyncio.Task[None] | None = None
            self._count = 0.0
            self._log = open(log_path, "a") if log_path else None  # noqa: SIM115 - lives as long as the IOC

        async def _update_readback(self) -> None:
            await self.rbv.write(self._position + self.off.value)
            await self.det.write(detector_counts(self._position, self.cen.value, height, width))

        @mtr.startup
        async def mtr(self, instance: Any, async_lib: Any) -> None:
            await self._update_readback()

        @mtr.putter
        async def mtr(self, instance: Any, value: float) -> float:
            # Move at the motor's speed, updating readback and detector on the way;
            # the put completes (put-callback) only when the motor is there.
            target = float(value)
            tick = 0.02
            while abs(target - self._position) > 1e-12:
                step = max(self.velo.value, 1e-6) * tick
                delta = target - self._position
                self._position = target if abs(delta) <= step else self._position + math.copysign(step, delta)
                await self._update_readback()
                if self._position != target:
                    await asyncio.sleep(tick)
            await self._update_readback()
            return target

        @off.putter
        async def off(self, instance: Any, value: float) -> float:
            self.off._data["value"] = float(value)  # readback follows at once
            await self.rbv.write(self._position + float(value))
            return float(value)

        @cen.putter
        async def cen(self, instance: Any, value: float) -> float:
            await self.det.write(detector_counts(self._position, float(value), height, width))
            return float(value)

        @ramp_go.putter
        async def ramp_go(self, instance: Any, value: int) -> int:
            if self._ramp_task is not None:
                self._ramp_task.cancel()
                self._ramp_task = None
            if int(value) > 0:
                self._ramp_task = asyncio.create_task(self._burst(int(value), float(self.ramp_rate.value)))
            return int(value)

        async def _burst(self, n: int, rate: float) -> None:
            period = 1.0 / rate if rate > 0 else 0.0
            start = time.monotonic()
            for i in range(n):
                self._count += 1
                ns = time.time_ns()
                await self.ramp.write(self._count, timestamp=epics_stamp(ns))
                if self._log is not None:
                    self._log.write(json.dumps({"value": self._count, "ts_ns": ns}) + "\n")
                    self._log.flush()
                if period:
                    delay = start + (i + 1) * period - time.monotonic()
                    if delay > 0:
                        await asyncio.sleep(delay)
                else:
                    await asyncio.sleep(0)  # let the server's send loop interleave: updates flow, not lump

        @wave_go.putter
        async def wave_go(self, instance: Any, value: int) -> int:
            n = len(self.wave.value)
            await self.wave.write([float(value) + i for i in range(n)])
            return int(value)

    return BeamlineIOC(prefix=prefix)


def main(argv: list[str] | None = None) -> None:
    """Run the IOC in the foreground until SIGTERM."""
    from caproto.server import run

    p = argparse.ArgumentParser(description="reflexarc's test beamline IOC (caproto)")
    p.add_argument("--prefix", default="RX:")
    p.add_argument("--center", type=float, default=1.234, help="motor position of the detector's peak (mm)")
    p.add_argument("--width", type=float, default=0.6)
    p.add_argument("--height", type=float, default=900.0)
    p.add_argument("--velocity", type=float, default=40.0)
    p.add_argument("--wave-size", type=int, default=1000)
    p.add_argument("--log", default=None, help="append every ramp update here (JSON lines)")
    a = p.parse_args(argv)
    ioc = build_ioc(
        a.prefix,
        center=a.center,
        width=a.width,
        height=a.height,
        velocity=a.velocity,
        wave_size=a.wave_size,
        log_path=a.log,
    )
    print(f"IOC {a.prefix} serving {len(ioc.pvdb)} PVs on 127.0.0.1:{os.environ.get('EPICS_CAS_SERVER_PORT')}")
    sys.stdout.flush()
    with contextlib.suppress(KeyboardInterrupt):
        run(ioc.pvdb, interfaces=["127.0.0.1"])


async def caput(name: str, value: Any, timeout: float = 10.0) -> None:
    """One Channel Access put with completion (caproto's asyncio client; strings go as DBR_STRING)."""
    from caproto import ChannelType
    from caproto.asyncio.client import Context

    ctx = Context()
    try:
        (pv,) = await ctx.get_pvs(name)
        data_type = ChannelType.STRING if isinstance(value, str) else None  # an enum choice by name, too
        await pv.write([value], wait=True, timeout=timeout, data_type=data_type)
    finally:
        await ctx.disconnect()


async def caget(name: str, timeout: float = 5.0) -> Any:
    """One Channel Access read: the first element (a string decoded)."""
    from caproto.asyncio.client import Context

    ctx = Context()
    try:
        (pv,) = await ctx.get_pvs(name)
        value = (await pv.read(timeout=timeout)).data[0]
        return value.decode() if isinstance(value, bytes) else value
    finally:
        await ctx.disconnect()


class IocProcess:
    """The IOC as a child process on a private CA port; :meth:`start`, :meth:`stop`, start again."""

    def __init__(self, workdir: Path, prefix: str = "RX:", port: int | None = None, **options: Any) -> None:
        self.prefix = prefix
        self.port = port or free_ca_port()
        self.env = ca_env(self.port)
        args = [sys.executable, "-m", "reflexarc.scenarios.epics.ioc", "--prefix", prefix]
        for key, value in options.items():
            if value is not None:
                args += [f"--{key.replace('_', '-')}", str(value)]
        env = {**os.environ, **self.env}
        # caproto's server keeps at most 1000 queued updates per subscription and drops the oldest when a
        # client falls further behind (CA allows servers to drop updates under load). On a shared, loaded
        # test machine that can happen to any client for a moment; this IOC keeps more.
        ioc_env = {"CAPROTO_MAX_SUBSCRIPTION_BACKLOG": "100000", "CAPROTO_MAX_TOTAL_SUBSCRIPTION_BACKLOG": "1000000"}
        self.proc = ManagedProcess(
            f"ioc-{prefix}", args, Path(workdir) / f"ioc-{self.port}.log", env={**env, **ioc_env}
        )
        # A CA repeater on the private repeater port: clients register with it and the IOC's beacons
        # reach it (without one, every beacon is refused, and caproto logs each refusal).
        self.repeater = ManagedProcess(
            f"ca-repeater-{self.port}",
            [sys.executable, "-m", "caproto.commandline.repeater", "--quiet"],
            Path(workdir) / f"ca-repeater-{self.port}.log",
            env=env,
        )

    def pv(self, name: str) -> str:
        """Full PV name of ``name`` (``mtr`` -> ``RX:mtr``)."""
        return f"{self.prefix}{name}"

    def start(self, timeout: float = 20.0) -> IocProcess:
        """Start the repeater (once) and the IOC; return when the IOC's TCP listener accepts connections."""
        if not self.repeater.running():
            self.repeater.start()
            self.repeater.wait_ready(lambda: not _udp_free(self.port + 1), timeout)
        self.proc.start()
        self.proc.wait_ready(lambda: port_open("127.0.0.1", self.port), timeout)
        return self

    def stop(self) -> None:
        """Stop the IOC: SIGTERM (then SIGKILL), by PID. The repeater stays for a restart; see :meth:`close`."""
        self.proc.stop(grace=5)

    def kill(self) -> None:
        """SIGKILL: the IOC crashes."""
        self.proc.kill()

    def close(self) -> None:
        """Stop the IOC and the repeater."""
        self.proc.stop(grace=5)
        self.repeater.stop(grace=5)

    def __enter__(self) -> IocProcess:
        """Start the IOC."""
        return self.start()

    def __exit__(self, *exc: object) -> None:
        """Stop the IOC and the repeater."""
        self.close()


if __name__ == "__main__":
    main()
