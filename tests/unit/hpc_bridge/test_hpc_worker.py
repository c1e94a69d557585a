"""The worker: runs apps, writes outcomes atomically, unpacks environments once."""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
import tarfile
import threading
from pathlib import Path

from reflexarc.hpc_bridge import worker
from reflexarc.hpc_bridge.worker import RunSpec, ensure_unpacked, execute, read_outcome

APPS = "reflexarc.hpc_bridge.examples.apps"


def spec(tmp_path: Path, **kw: object) -> RunSpec:
    base = {
        "task_id": "t",
        "attempt": 1,
        "kind": "python",
        "workdir": str(tmp_path / "w"),
        "result_path": str(tmp_path / "w" / "outcome.json"),
    }
    base.update(kw)
    return RunSpec(**base)  # type: ignore[arg-type]


def test_python_app_success_and_failure(tmp_path: Path) -> None:
    ok = execute(spec(tmp_path, function=f"{APPS}:add", args={"a": 1, "b": 2}))
    assert ok["ok"] and ok["result"] == {"sum": 3}
    assert read_outcome(str(tmp_path / "w" / "outcome.json")) == json.loads(json.dumps(ok))
    bad = execute(spec(tmp_path, function=f"{APPS}:fail", args={"message": "nope"}))
    assert not bad["ok"] and "RuntimeError: nope" in bad["error"] and "Traceback" in bad["traceback"]


def test_unserialisable_result_is_an_error(tmp_path: Path) -> None:
    out = execute(spec(tmp_path, function="os:getcwd"))  # str -> wrapped as {"value": ...}
    assert out["ok"] and isinstance(out["result"]["value"], str)
    out = execute(spec(tmp_path, function="builtins:object"))
    assert not out["ok"] and "not JSON serializable" in out["error"]


def test_shell_app_output_and_exit_code(tmp_path: Path) -> None:
    ok = execute(spec(tmp_path, kind="shell", argv=["sh", "-c", "echo '{\"n\": 2}'"]))
    assert ok["ok"] and ok["result"]["output"] == {"n": 2}
    bad = execute(spec(tmp_path, kind="shell", argv=["sh", "-c", "echo oops >&2; exit 3"]))
    assert not bad["ok"] and "exited with code 3: oops" in bad["error"]


def test_serve_protocol_keeps_app_prints_out_of_the_channel(tmp_path: Path) -> None:
    s = spec(tmp_path, function="builtins:print", args={"end": "noise\n"})
    proc = subprocess.run(
        [sys.executable, worker.__file__, "serve"], input=s.to_json() + "\n", capture_output=True, text=True, timeout=60
    )
    lines = proc.stdout.splitlines()
    assert json.loads(lines[0])["ready"] and json.loads(lines[1])["ok"] and len(lines) == 2
    assert "noise" in (tmp_path / "w" / "task.log").read_text()


def test_ensure_unpacked_once_under_concurrency(tmp_path: Path) -> None:
    tarball = tmp_path / "env.tar.gz"
    with tarfile.open(tarball, "w:gz") as tf:
        data = b"#!/bin/sh\n"
        info = tarfile.TarInfo("bin/python")
        info.size = len(data)
        tf.addfile(info, io.BytesIO(data))
    results: list[str] = []
    threads = [
        threading.Thread(target=lambda: results.append(ensure_unpacked(str(tarball), "h1", str(tmp_path / "root"))))
        for _ in range(4)
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(set(results)) == 1 and os.path.exists(results[0])
    assert sorted(os.listdir(tmp_path / "root")) == [".h1.lock", "h1"]
