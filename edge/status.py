"""The agent's status file, and reading it back for ``reflexarc edge status``.

The running agent rewrites ``STATE_DIR/status.json`` every second (atomically,
by rename). ``edge status`` reads it, checks that the process is alive and the
file fresh, and adds what only the spool knows (waiting events per stream,
recent dead letters) by opening the SQLite spool read-only.
"""

from __future__ import annotations

import json
import os
import sqlite3
import time
from pathlib import Path
from typing import Any

STALE_AFTER_S = 5.0


def write_status(path: Path, status: dict[str, Any]) -> None:
    """Write ``status`` as JSON, atomically (readers never see half a file)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(status, indent=2, default=str))
    os.replace(tmp, path)


def _alive(pid: int | None) -> bool:
    if not pid:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def spool_summary(spool_path: Path) -> dict[str, Any]:
    """Waiting events per stream, lifetime counters and recent dead letters, read-only."""
    if not spool_path.exists():
        return {"exists": False}
    db = sqlite3.connect(f"{spool_path.absolute().as_uri()}?mode=ro", uri=True)
    try:
        streams = dict(db.execute("SELECT stream, COUNT(*) FROM events GROUP BY stream").fetchall())
        counters = dict(db.execute("SELECT name, value FROM counters").fetchall())
        dead = [
            {"error": e, "origin": o, "at": a}
            for e, o, a in db.execute("SELECT error, origin, at FROM dead ORDER BY id DESC LIMIT 5")
        ]
    finally:
        db.close()
    return {"exists": True, "streams": streams, "counters": counters, "recent_dead_letters": dead}


def read_status(status_path: Path, spool_path: Path) -> dict[str, Any]:
    """What ``edge status`` shows: the agent's last status plus the spool's own account."""
    out: dict[str, Any] = {"status_file": str(status_path)}
    try:
        status = json.loads(status_path.read_text())
    except (OSError, ValueError):
        status = None
    if status is None:
        out["state"] = "never started (no status file)"
    else:
        age = time.time() - float(status.get("updated_at", 0))
        if status.get("stopped"):
            out["state"] = "stopped"
        elif _alive(status.get("pid")) and age < STALE_AFTER_S:
            out["state"] = "running"
        else:
            out["state"] = f"not running (last update {age:.0f} s ago)"
        out["agent"] = status
    out["spool"] = spool_summary(spool_path)
    return out
