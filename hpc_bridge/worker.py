"""Runs one app invocation and writes its outcome; the only code that executes apps.

This module uses the standard library only, so that it runs unchanged under
any interpreter: the site's Python, a packed environment's Python, or the
Python on a batch node. Engines drive it in one of two ways:

* ``python worker.py serve`` — a long-lived worker reading one JSON
  :class:`RunSpec` per line on stdin and answering one JSON outcome per line
  on stdout (the ``local`` engine keeps a pool of these);
* ``python worker.py run SPEC.json`` — one task, then exit (batch jobs), exit
  code 0 when the app succeeded.

Either way the outcome is also written atomically to ``spec.result_path``
*before* it is reported, so a site agent that crashed meanwhile finds the
result on disk after its restart and never runs a finished task again.

How durable that file must be depends on who reads it. A batch job or a pilot
task (``run``, :func:`execute_json` from a pilot) may end while no agent is
there: its file is the only record, so it is fsynced. A ``serve`` worker and a
Dask task answer their agent directly (a pipe, a future), and the agent commits
the outcome to its job store (SQLite, fsynced) before anything is reported: the
file only has to outlive the agent *process* (the page cache does: a SIGKILLed
agent's successor reads it), not the machine, so it is not fsynced. After a
power loss, a task that ended in the few milliseconds before the store's next
commit runs again, exactly like one that was still running; no result is ever
reported from a file that is not durable.
"""

from __future__ import annotations

import contextlib
import importlib
import json
import os
import socket
import subprocess
import sys
import tempfile
import time
import traceback
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

OUTPUT_TAIL = 4000


@dataclass
class RunSpec:
    """Everything a worker needs to run one attempt of one task (JSON on the wire)."""

    task_id: str
    attempt: int
    kind: str  # python | shell | mpi
    workdir: str
    result_path: str
    function: str | None = None
    argv: list[str] | None = None
    args: dict[str, Any] = field(default_factory=dict)
    python: str | None = None  # interpreter of a packed environment (already unpacked here)
    env_tarball: str | None = None  # packed environment to unpack on the node that runs it
    env_hash: str | None = None
    pythonpath: list[str] = field(default_factory=list)
    environment: dict[str, str] = field(default_factory=dict)
    cpus: int = 1
    gpus: int = 0
    memory_gb: float | None = None
    walltime_s: float | None = None
    timeout_s: float | None = None
    #: Run a Python app in a child process even inside a shared worker (Dask), so that
    #: ``environment`` applies (e.g. the devices of a composed machine).
    isolate: bool = False
    #: MPI ranks the launcher in ``argv`` starts (each with ``cpus`` cores): engines reserve them.
    ranks: int = 1
    #: Ranks on each node (0: as many as fit).
    ranks_per_node: int = 0

    def to_json(self) -> str:
        """One line of JSON.

        The fields are JSON values already: the instance's own dict is dumped as it is,
        with no deep copy (``dataclasses.asdict`` cost 30-50 µs a task).
        """
        return json.dumps(self.__dict__, separators=(",", ":"))

    @classmethod
    def from_json(cls, text: str | bytes) -> RunSpec:
        """Inverse of :meth:`to_json`."""
        return cls(**json.loads(text))


def _now() -> str:
    return datetime.now(UTC).isoformat()


def _load(ref: str) -> Any:
    module_name, _, attr = ref.partition(":")
    obj: Any = importlib.import_module(module_name)
    for part in attr.split("."):
        obj = getattr(obj, part)
    return obj


def _tail(text: str) -> str:
    return text if len(text) <= OUTPUT_TAIL else "..." + text[-OUTPUT_TAIL:]


def _run_python(spec: RunSpec) -> dict[str, Any]:
    for p in reversed(spec.pythonpath):
        if p not in sys.path:
            sys.path.insert(0, p)
    func = _load(spec.function or "")
    value = func(**spec.args)
    result = value if isinstance(value, dict) else {"value": value}
    json.dumps(result)  # fail here, with the app's name, if it cannot travel
    return result


def _run_command(spec: RunSpec) -> dict[str, Any]:
    env = {**os.environ, **spec.environment}
    proc = subprocess.run(spec.argv or [], cwd=spec.workdir, env=env, capture_output=True, text=True, check=False)
    result: dict[str, Any] = {
        "returncode": proc.returncode,
        "stdout": _tail(proc.stdout),
        "stderr": _tail(proc.stderr),
    }
    with contextlib.suppress(ValueError):
        parsed = json.loads(proc.stdout)
        if isinstance(parsed, dict):
            result["output"] = parsed
    if proc.returncode != 0:
        raise RuntimeError(
            f"command {spec.argv[0] if spec.argv else '?'} exited with code {proc.returncode}: "
            f"{_tail(proc.stderr.strip()) or '(no stderr)'}"
        )
    return result


@contextlib.contextmanager
def _task_log(path: str) -> Any:
    # Send the app's own prints (fd 1 and 2) to the task's log file, so the
    # protocol channel stays clean and `jobs show` can show the output.
    sys.stdout.flush()
    sys.stderr.flush()
    saved = os.dup(1), os.dup(2)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    try:
        os.dup2(fd, 1)
        os.dup2(fd, 2)
        yield
    finally:
        sys.stdout.flush()
        sys.stderr.flush()
        os.dup2(saved[0], 1)
        os.dup2(saved[1], 2)
        for f in (fd, *saved):
            os.close(f)


def _environment_snapshot() -> dict[Any, Any]:
    # CPython keeps the encoded environment in ``os.environ._data``: copying and comparing it is
    # C-level and cheap, where rebuilding ``os.environ`` costs a putenv/unsetenv per variable.
    data = getattr(os.environ, "_data", None)
    return dict(data) if isinstance(data, dict) else dict(os.environ)


def _restore_environment(old: dict[Any, Any]) -> None:
    data = getattr(os.environ, "_data", None)
    if isinstance(data, dict) and data == old:
        return  # neither the spec nor the app changed it (the usual case)
    decoded = {os.fsdecode(k): os.fsdecode(v) for k, v in old.items()} if isinstance(data, dict) else old
    os.environ.clear()
    os.environ.update(decoded)


def execute(spec: RunSpec, own_process: bool = True, sync: bool = True) -> dict[str, Any]:
    """Run ``spec`` in this process; write and return the outcome (never raises for app errors).

    With ``own_process`` (a worker process of ours) the app runs in its work
    directory, with its environment variables, its output in ``task.log``.
    Inside a shared process (a Dask worker thread) process-wide state is left
    alone: no chdir, no fd redirection, no environment changes for Python apps.
    ``sync=False``: the outcome file is not fsynced, for a caller whose agent
    commits the outcome itself (see the module doc).
    """
    os.makedirs(spec.workdir, exist_ok=True)
    started = _now()
    outcome: dict[str, Any] = {"ok": False, "result": None, "error": None}
    old_env = _environment_snapshot() if own_process else {}
    cwd = os.getcwd()
    try:
        if own_process:
            os.environ.update(spec.environment)
            os.chdir(spec.workdir)
        log_ctx = _task_log(os.path.join(spec.workdir, "task.log")) if own_process else contextlib.nullcontext()
        with log_ctx:
            if spec.kind == "python":
                outcome["result"] = _run_python(spec)
            else:
                outcome["result"] = _run_command(spec)
        outcome["ok"] = True
    except (Exception, SystemExit) as exc:  # the app's failure is data, not our crash
        where = spec.function or (spec.argv[0] if spec.argv else "?")
        outcome["error"] = f"{where}: {type(exc).__name__}: {exc}"
        outcome["traceback"] = _tail(traceback.format_exc())
    finally:
        if own_process:
            os.chdir(cwd)
            _restore_environment(old_env)
    outcome.update(
        started_at=started,
        finished_at=_now(),
        host=socket.gethostname(),
        pid=os.getpid(),
        python=sys.executable,
    )
    if spec.environment.get("RX_MACHINE"):
        # A composed machine: the events name it rather than the host it is on.
        outcome["machine"] = spec.environment["RX_MACHINE"]
    write_outcome(spec.result_path, outcome, sync)
    return outcome


def write_outcome(path: str, outcome: dict[str, Any], sync: bool = True) -> None:
    """Write atomically (temp file, fsync, rename): a reader sees all of it or nothing.

    ``sync=False`` skips the fsync: the file survives the death of any process, not of the machine.
    """
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    tmp = f"{path}.tmp.{os.getpid()}"
    try:
        data = json.dumps(outcome)
    except (TypeError, ValueError) as exc:
        outcome = {**outcome, "ok": False, "result": None, "error": f"result is not JSON: {exc}"}
        data = json.dumps(outcome)
    with open(tmp, "w") as f:
        f.write(data)
        if sync:
            f.flush()
            os.fsync(f.fileno())
    os.replace(tmp, path)


def read_outcome(path: str) -> dict[str, Any] | None:
    """The outcome written at ``path``, or ``None`` if there is none (yet)."""
    try:
        with open(path) as f:
            return json.load(f)  # type: ignore[no-any-return]  # a JSON object: the file is ours
    except (OSError, ValueError):
        return None


def unpack_root() -> str:
    """Node-local folder for unpacked environments (``RX_ENV_UNPACK_DIR`` overrides)."""
    return os.environ.get("RX_ENV_UNPACK_DIR") or os.path.join(tempfile.gettempdir(), f"rx-envs-{os.getuid()}")


def ensure_unpacked(tarball: str, env_hash: str, root: str | None = None) -> str:
    """Unpack a packed environment once per node (under a file lock); return its Python.

    Concurrent tasks on the same node wait for the first one to finish
    unpacking; a half-unpacked folder is never used (it is unpacked beside
    the final name and renamed into place).
    """
    import fcntl
    import shutil
    import tarfile

    root = root or unpack_root()
    os.makedirs(root, exist_ok=True)
    target = os.path.join(root, env_hash)
    python = os.path.join(target, "bin", "python")
    if os.path.exists(os.path.join(target, ".rx-complete")):
        return python
    with open(os.path.join(root, f".{env_hash}.lock"), "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if os.path.exists(os.path.join(target, ".rx-complete")):
            return python
        tmp = f"{target}.tmp.{os.getpid()}"
        shutil.rmtree(tmp, ignore_errors=True)
        shutil.rmtree(target, ignore_errors=True)
        with tarfile.open(tarball) as tf:
            tf.extractall(tmp, filter="tar")
        open(os.path.join(tmp, ".rx-complete"), "w").close()
        os.replace(tmp, target)
    return python


def _is_this_python(python: str) -> bool:
    # Compare environments, not binaries: a venv's python is a symlink to its base interpreter.
    prefix = os.path.dirname(os.path.dirname(os.path.abspath(python)))
    return os.path.abspath(prefix) == os.path.abspath(sys.prefix)


def _resolve_env(spec: RunSpec) -> RunSpec:
    if spec.env_tarball and not spec.python:
        spec.python = ensure_unpacked(spec.env_tarball, spec.env_hash or "env")
    return spec


def execute_json(spec_json: str, sync: bool = True) -> dict[str, Any]:
    """Entry point for engines that call in-process (Dask): JSON in, outcome out.

    A spec with a packed environment runs in a child process of that
    environment's interpreter instead (unpacked on this node first).
    ``sync=False``: the caller's agent commits the outcome itself (see the module doc).
    """
    spec = _resolve_env(RunSpec.from_json(spec_json))
    if spec.isolate or (spec.python and not _is_this_python(spec.python)):
        return run_in_interpreter(spec)
    return execute(spec, own_process=False, sync=sync)


def run_in_interpreter(spec: RunSpec) -> dict[str, Any]:
    """Run ``spec`` under ``spec.python`` (``worker.py run``) and return its outcome."""
    os.makedirs(spec.workdir, exist_ok=True)
    spec_path = os.path.join(spec.workdir, "spec.json")
    with open(spec_path, "w") as f:
        f.write(spec.to_json())
    subprocess.run([spec.python or sys.executable, os.path.abspath(__file__), "run", spec_path], check=False)
    outcome = read_outcome(spec.result_path)
    if outcome is None:
        outcome = {"ok": False, "result": None, "error": f"worker under {spec.python} wrote no outcome"}
    return outcome


def skip_marker(spec: RunSpec) -> str:
    """A file that, present when a ``serve`` worker reads ``spec``, makes it answer without running it.

    The local engine writes it for a task queued in a busy worker's pipe whose start was called off.
    """
    return f"{spec.result_path}.skip"


def serve() -> int:
    """Line protocol on stdin/stdout until EOF."""
    # The protocol owns the original stdout; anything else printed goes to stderr.
    proto = os.fdopen(os.dup(1), "w", buffering=1)
    os.dup2(2, 1)
    sys.stdout = sys.stderr
    proto.write(json.dumps({"ready": True, "pid": os.getpid()}) + "\n")
    for line in sys.stdin:
        if not line.strip():
            continue
        started = time.monotonic()
        spec = RunSpec.from_json(line)
        if os.path.exists(skip_marker(spec)):
            proto.write(json.dumps({"ok": False, "result": None, "error": "called off before it started"}) + "\n")
            continue
        # Our agent reads the answer on the pipe and commits it before reporting it.
        outcome = execute(spec, sync=False)
        outcome["seconds"] = time.monotonic() - started
        proto.write(json.dumps(outcome) + "\n")
    return 0


def main(argv: list[str]) -> int:
    """``serve`` or ``run SPEC.json``."""
    if argv[:1] == ["serve"]:
        return serve()
    if len(argv) == 2 and argv[0] == "run":
        with open(argv[1]) as f:
            spec = _resolve_env(RunSpec.from_json(f.read()))
        if spec.python and not _is_this_python(spec.python):
            return 0 if run_in_interpreter(spec)["ok"] else 1
        return 0 if execute(spec)["ok"] else 1
    print("usage: worker.py serve | worker.py run SPEC.json", file=sys.stderr)
    return 2


if __name__ == "__main__":
    # Run as a script, this file's folder would come first on sys.path and its
    # sibling modules (apps.py, cli.py, ...) could shadow an app's imports.
    if sys.path and os.path.abspath(sys.path[0]) == os.path.dirname(os.path.abspath(__file__)):
        del sys.path[0]
    sys.exit(main(sys.argv[1:]))
