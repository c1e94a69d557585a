"""The scenario's experiment: a Bluesky ``scan`` of the IOC's detector over its motor, documents to the edge agent.

::

    python -m reflexarc.scenarios.epics.scan --prefix RXDEMO: --out scan.jsonl [--start -5 --stop 5 --num 41]

ophyd's EPICS signals run on caproto's client (no EPICS C libraries). The
RunEngine's documents go to :class:`reflexarc.edge.bluesky.Publisher`, which
appends them to ``--out``, the file the agent's ``bluesky`` source follows.
Prints the run's uid and exit status as one JSON line.
"""

from __future__ import annotations

import argparse
import json
from typing import Any

from reflexarc.edge.bluesky import Publisher


def devices(prefix: str, timeout: float = 10.0) -> tuple[Any, Any]:
    """The IOC's motor (setpoint ``mtr``, readback ``mtr.RBV``, put-completion) and detector ``det``."""
    import ophyd

    ophyd.set_cl("caproto")
    from ophyd import EpicsSignal, EpicsSignalRO

    motor = EpicsSignal(f"{prefix}mtr.RBV", write_pv=f"{prefix}mtr", put_complete=True, name="motor")
    det = EpicsSignalRO(f"{prefix}det", name="det")
    motor.wait_for_connection(timeout=timeout)
    det.wait_for_connection(timeout=timeout)
    return motor, det


def run_scan(prefix: str, out: str, start: float, stop: float, num: int, **md: Any) -> dict[str, Any]:
    """Run the scan; return ``{"uid", "exit_status", "documents"}``."""
    from bluesky import RunEngine
    from bluesky.plans import scan

    motor, det = devices(prefix)
    stops: list[dict[str, Any]] = []
    with Publisher(out) as publisher:
        engine = RunEngine({}, context_managers=[])
        engine.subscribe(publisher)
        engine.subscribe(lambda name, doc: stops.append(doc) if name == "stop" else None)
        ran = engine(scan([det], motor, start, stop, num), **md)
        # A tuple of run uids (the default), or a RunEngineResult with call_returns_result=True.
        (uid,) = ran if isinstance(ran, tuple) else ran.run_start_uids
        written = publisher.written
    return {"uid": uid, "exit_status": stops[-1]["exit_status"] if stops else None, "documents": written}


def main(argv: list[str] | None = None) -> None:
    """Command line: run one scan and print its uid."""
    p = argparse.ArgumentParser(description="a Bluesky scan over the scenario's IOC")
    p.add_argument("--prefix", default="RXDEMO:")
    p.add_argument("--out", required=True, help="document file the edge agent follows")
    p.add_argument("--start", type=float, default=-5.0)
    p.add_argument("--stop", type=float, default=5.0)
    p.add_argument("--num", type=int, default=41)
    p.add_argument("--sample", default="demo")
    a = p.parse_args(argv)
    print(json.dumps(run_scan(a.prefix, a.out, a.start, a.stop, a.num, sample=a.sample)), flush=True)


if __name__ == "__main__":
    main()
