"""``reflexarc demo --scenario epics``: a Bluesky scan on a Channel Access IOC closes the loop through HPC.

1. a caproto IOC starts on a private Channel Access port on loopback: a motor
   and a detector whose counts peak at a motor position chosen for this run;
2. the four tiers start on embedded brokers, with the same CA settings;
3. a RunEngine scans the detector over the motor; its documents reach Kafka
   through the edge agent (``bluesky`` source), the PVs through the ``epics`` source;
4. the scan's ``stop`` fires the trigger, the local site fits the peak from
   the run's events, and ``on_result`` moves the motor there through the
   ``epics`` actuator (put with completion, readback within tolerance);
5. the motor's readback is read from the IOC once more, independently.

Exits 0 only when the loop closed and the motor stands at the fitted position
(and the fit found the peak the IOC was given).
"""

from __future__ import annotations

import asyncio
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.live import Live

from reflexarc.brokers import MqttFlavour
from reflexarc.observer import LoopObserver, LoopStats
from reflexarc.scenarios.epics.ioc import IocProcess
from reflexarc.supervisor import Supervisor, load_pipeline
from reflexarc.topics import Topics

PREFIX = "RXDEMO:"
TOLERANCE_MM = 0.002  # the actuator's readback tolerance (agent.yaml / motor.py)
FIT_TOLERANCE_MM = 0.05  # how close the fit must come to the peak the IOC was given


def read_pv(name: str, env: dict[str, str], timeout: float = 10.0) -> float:
    """One Channel Access read in a child process (caproto's sync client), with the scenario's CA settings."""
    code = "import sys; from caproto.sync.client import read; print(float(read(sys.argv[1], timeout=5, repeater=False).data[0]))"
    out = subprocess.run(
        [sys.executable, "-c", code, name],
        env={**os.environ, **env},
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )
    if out.returncode != 0:
        raise RuntimeError(f"cannot read {name}: {out.stderr.strip()[-300:]}")
    return float(out.stdout.strip())


async def run_scan(scenario: Path, env: dict[str, str], log: Path) -> dict[str, Any]:
    """The Bluesky scan, in its own process (RunEngine + ophyd on caproto); its summary line."""
    with open(log, "ab") as fh:
        proc = await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "reflexarc.scenarios.epics.scan",
            "--prefix",
            PREFIX,
            "--out",
            str(scenario / "scan.jsonl"),
            "--start",
            "-5",
            "--stop",
            "5",
            "--num",
            "41",
            env={**os.environ, **env},
            stdout=asyncio.subprocess.PIPE,
            stderr=fh,
        )
        out, _ = await proc.communicate()
    if proc.returncode != 0:
        raise RuntimeError(f"the scan failed ({proc.returncode}); see {log}")
    summary: dict[str, Any] = json.loads(out.decode().strip().splitlines()[-1])
    return summary


def verdict(stats: LoopStats, readback: float | None, centre: float) -> tuple[bool, str]:
    """Did the loop close with the motor at the fitted position? (ok, explanation)."""
    from rich.markup import escape

    results = [r for r in stats.results.values() if r.status == "done" and isinstance(r.result, dict)]
    if not stats.tasks:
        return False, "no trigger fired: the scan's stop document did not reach the trigger engine"
    if not results:
        reasons = "; ".join(f"{r.status}: {r.error}" for r in stats.results.values()) or "no result"
        return False, f"the fit did not finish ({escape(reasons)})"
    fitted = float(results[-1].result["position"])  # type: ignore[index]  # a done fit carries its result
    if not stats.all_closed():
        refused = "; ".join(a.reason or "" for a in stats.acks.values() if not a.ok) or "no answer"
        return False, f"fitted {fitted:.4f} mm but the motor command did not complete ({escape(refused)})"
    if readback is None:
        return False, f"fitted {fitted:.4f} mm; the motor's readback could not be read from the IOC"
    if abs(readback - fitted) > TOLERANCE_MM:
        return False, f"fitted {fitted:.4f} mm but the motor reads {readback:.4f} mm on the IOC"
    if abs(fitted - centre) > FIT_TOLERANCE_MM:
        return False, f"the motor is at the fit ({fitted:.4f} mm), but the peak was at {centre:.3f} mm"
    return True, (
        f"scan -> fit at the site -> motor moved: peak at {fitted:.4f} mm (IOC's peak {centre:.3f} mm), "
        f"readback {readback:.4f} mm on the IOC"
    )


async def run_epics_demo(
    drain_timeout: float = 60.0,
    mqtt_flavour: MqttFlavour | None = None,
    console: Console | None = None,
    live: bool = True,
    centre: float | None = None,
) -> tuple[int, LoopStats]:
    """Run the EPICS scenario once; return the exit code and what was observed."""
    from reflexarc.demo import hpc_sites, render, scenario_dir, summary_table

    console = console or Console()
    work = Path(tempfile.mkdtemp(prefix="reflexarc-demo-epics-"))
    scenario = work / "scenario"
    shutil.copytree(scenario_dir("epics"), scenario, ignore=shutil.ignore_patterns("__pycache__", "*.py"))
    pipeline_file = scenario / "pipeline.yaml"
    cfg = load_pipeline(pipeline_file)
    centre = round(random.uniform(-3.0, 3.0), 3) if centre is None else centre
    ioc = IocProcess(work, prefix=PREFIX, center=centre)
    # caproto re-searches lost PVs with a backoff of up to 5 s; 1 s is kinder to a demo.
    env = {**ioc.env, "RX_EPICS_PREFIX": PREFIX, "CAPROTO_CLIENT_MAX_RETRY_SEARCHES_INTERVAL_SEC": "1"}
    sup = Supervisor(cfg, base_dir=scenario, run_dir=work / "run", mqtt_flavour=mqtt_flavour, extra_env=env)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    ok, message, keep = False, "", None
    stats = LoopStats()
    tasks: list[asyncio.Task[Any]] = []
    console.print(f"[bold]reflexarc demo[/] (epics): work dir {work}")
    try:
        with console.status("starting a caproto IOC, an MQTT broker, a Kafka broker and 4 tiers (about 10 s)..."):
            await asyncio.to_thread(ioc.start)
            await asyncio.to_thread(sup.start)
        observer = LoopObserver(sup.kafka_settings(), Topics(cfg.namespace), hpc_sites(scenario, pipeline_file))
        stats = observer.stats
        tasks = [asyncio.create_task(observer.run(stop)), asyncio.create_task(sup.run(stop))]
        title = f"EPICS beamline: caproto IOC {PREFIX} (CA port {ioc.port}), Bluesky scan -> fit -> motor"
        started = time.monotonic()
        with Live(
            render(stats, "scanning", 0, title), console=console, refresh_per_second=4, auto_refresh=live
        ) as view:
            scan = asyncio.create_task(run_scan(scenario, env, work / "scan.log"))
            deadline = started + drain_timeout
            while not stop.is_set() and time.monotonic() < deadline:
                phase = "scanning" if not scan.done() else "fitting and moving the motor"
                view.update(render(stats, phase, time.monotonic() - started, title))
                if scan.done() and (exc := scan.exception()) is not None:
                    raise exc
                if scan.done() and stats.all_closed():
                    break
                for t in tasks:
                    if t.done() and (exc := t.exception()) is not None:
                        raise exc
                await asyncio.sleep(0.25)
            view.update(render(stats, "done", time.monotonic() - started, title))
        run = scan.result() if scan.done() and not scan.exception() else {}
        readback = None
        try:
            readback = await asyncio.to_thread(read_pv, f"{PREFIX}mtr.RBV", env)
        except (RuntimeError, subprocess.TimeoutExpired) as exc:
            console.print(f"[red]{exc}[/]")
        ok, message = verdict(stats, readback, centre)
        if run:
            console.print(f"scan {run.get('uid', '?')[:8]}: {run.get('exit_status')}, {run.get('documents')} documents")
    finally:
        stop.set()
        await asyncio.gather(*tasks, return_exceptions=True)
        if not ok and (work / "run" / "logs").exists():
            keep = Path(tempfile.mkdtemp(prefix="reflexarc-demo-logs-"))
            shutil.copytree(work / "run" / "logs", keep, dirs_exist_ok=True)
            for extra in (work / "scan.log", ioc.proc.log_path):
                if extra.exists():
                    shutil.copy(extra, keep)
        await asyncio.to_thread(sup.stop)
        await asyncio.to_thread(ioc.close)
        shutil.rmtree(work, ignore_errors=True)
    console.print()
    console.print(summary_table(stats))
    if ok:
        console.print(f"[green]{message}[/]")
        return 0, stats
    console.print(f"[red]{message or 'the demo did not finish'}[/]")
    if keep:
        console.print(f"tier logs kept in {keep}")
    return 1, stats
