"""Bluesky runs as events: a RunEngine callback that hands documents to the edge agent, and the source that reads them.

The hand-over is a JSON-lines document file on the instrument's disk::

    RunEngine --(name, doc)--> Publisher --append + fsync--> scan.jsonl
    edge agent: bluesky source --follows scan.jsonl--> spool --> MQTT --> Kafka

:class:`Publisher` is subscribed to a RunEngine (``RE.subscribe(Publisher("scan.jsonl"))``)
and appends every document (``start``, ``descriptor``, ``event``, ``stop``,
and ``resource``/``datum``/pages when a plan makes them) as one line
``{"name": ..., "doc": ...}``, flushed and fsync'd before the RunEngine goes
on. The agent's ``bluesky`` source follows the file, emits each document as an
event and checkpoints the byte offset with it in the spool. So documents are
on disk before the plan continues and in the spool before the source moves on:
neither an unreachable broker nor a restart of the agent loses or reorders
one. The file is also what ``suitcase-jsonl``-style tools write (a
``[name, doc]`` line is read too), so any document producer can feed it.

Each event's data is ``{"name", "doc", "run"}``; ``run`` repeats the run's
``uid`` and the start document's fields listed in ``run_metadata`` on every
document of the run (just the ``uid`` when the start was not seen, ``{}``
when not even the run is known), so a trigger can select on document type and run
metadata alike, e.g. ``event.data.name == "stop" && event.data.doc.exit_status
== "success" && event.data.run.plan_name == "scan"``. Event ids are stable
(from the document's uid), so a redelivery deduplicates.
"""

from __future__ import annotations

import asyncio
import json
import math
import os
import threading
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Literal

from pydantic import Field

from reflexarc.edge.sources import Emit, Reading, Source, SourceConfig
from reflexarc.events import stable_id

DOCUMENT_NAMES = (
    "start",
    "descriptor",
    "event",
    "event_page",
    "stop",
    "resource",
    "datum",
    "datum_page",
    "stream_resource",
    "stream_datum",
)


def jsonable(obj: Any) -> Any:
    """A document as plain JSON: numpy scalars and arrays to Python, non-finite floats to null."""
    if isinstance(obj, dict):
        return {str(k): jsonable(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [jsonable(v) for v in obj]
    if isinstance(obj, float):
        # JSON has no NaN/Infinity, and the fog refuses payloads that carry them.
        return obj if math.isfinite(obj) else None
    if isinstance(obj, str | int | bool) or obj is None:
        return obj
    if hasattr(obj, "tolist"):  # numpy arrays and scalars
        return jsonable(obj.tolist())
    return str(obj)


class Publisher:
    """A RunEngine callback: every document becomes one fsync'd line of ``path`` for the edge agent.

    ``RE.subscribe(Publisher("/data/bl1/scan.jsonl"))``; point the agent's
    ``bluesky`` source at the same file. ``sync=False`` skips the fsync (a
    crash of the machine may then lose the last documents; a crash of the
    RunEngine process still does not).
    """

    def __init__(self, path: str | os.PathLike[str], *, sync: bool = True) -> None:
        self.path = Path(path)
        self.sync = sync
        self.written = 0
        self._lock = threading.Lock()  # RunEngine callbacks may come from more than one thread
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._fh = open(self.path, "ab")  # noqa: SIM115 - closed in close()
        if self._fh.tell() > 0 and not self._ends_with_newline():
            # A line half-written by a crashed writer: end it, so it cannot swallow the next document.
            self._fh.write(b"\n")

    def _ends_with_newline(self) -> bool:
        with open(self.path, "rb") as fh:
            fh.seek(-1, os.SEEK_END)
            return fh.read(1) == b"\n"

    def __call__(self, name: str, doc: dict[str, Any]) -> None:
        """Append one document; returns once it is on disk."""
        line = json.dumps({"name": name, "doc": jsonable(doc)}, separators=(",", ":"), allow_nan=False)
        with self._lock:
            self._fh.write(line.encode() + b"\n")
            self._fh.flush()
            if self.sync:
                os.fsync(self._fh.fileno())
            self.written += 1

    def close(self) -> None:
        """Close the file."""
        with self._lock:
            self._fh.close()

    def __enter__(self) -> Publisher:
        """Use as a context manager."""
        return self

    def __exit__(self, *exc: object) -> None:
        """Close the file."""
        self.close()


class BlueskyConfig(SourceConfig):
    """``type: bluesky`` — follow a JSON-lines document file, one event per document."""

    type: Literal["bluesky"] = "bluesky"
    stream: str = Field("bluesky", description="stream of the documents (one stream keeps a run in order)")
    path: str = Field(description="the document file (what reflexarc.edge.bluesky.Publisher writes)")
    poll_s: float = Field(0.05, gt=0, le=10, description="how often to look for new documents")
    run_metadata: list[str] = Field(
        default_factory=lambda: ["plan_name", "scan_id", "sample"],
        description="start-document fields repeated as data.run on every document of the run",
    )
    documents: list[str] | None = Field(None, description="document names to publish (default: all)")


class BlueskySource(Source[BlueskyConfig]):
    """Follows the document file from its checkpoint (byte offset + open runs) and emits each document."""

    config_model = BlueskyConfig

    @property
    def checkpoint_key(self) -> str:
        """One checkpoint per document file."""
        return f"bluesky:{self.config.path}"

    async def run(self, emit: Emit) -> None:
        """Follow the file forever."""
        cfg = self.config
        path = self.ctx.resolve(cfg.path)
        state: dict[str, Any] = {"offset": 0, "runs": {}, "descriptors": {}, "resources": {}}
        if self.ctx.checkpoint:
            state.update(json.loads(self.ctx.checkpoint))
        offset: int = int(state["offset"])
        buffer = b""
        while True:
            chunk, size = await asyncio.to_thread(self._read, path, offset + len(buffer))
            if size is not None and size < offset:
                self.ctx.log.warning(
                    "%s shrank below the checkpoint (%d < %d): reading it from the start", path, size, offset
                )
                offset, buffer = 0, b""
                continue
            if not chunk:
                await asyncio.sleep(cfg.poll_s)
                continue
            buffer += chunk
            *lines, buffer = buffer.split(b"\n")
            for raw in lines:
                offset += len(raw) + 1
                if raw.strip():
                    await self._line(raw, offset, state, path, emit)
            if len(lines) > 256:
                await asyncio.sleep(0)

    @staticmethod
    def _read(path: Path, start: int) -> tuple[bytes, int | None]:
        try:
            with open(path, "rb") as fh:
                size = os.fstat(fh.fileno()).st_size
                if size <= start:
                    return b"", size
                fh.seek(start)
                return fh.read(min(size - start, 4 << 20)), size
        except FileNotFoundError:
            return b"", None

    async def _line(self, raw: bytes, offset: int, state: dict[str, Any], path: Path, emit: Emit) -> None:
        cfg = self.config
        where = f"{path}@{offset - len(raw) - 1}"
        try:
            obj = json.loads(raw)
            if isinstance(obj, list) and len(obj) == 2:
                obj = {"name": obj[0], "doc": obj[1]}
            name, doc = obj["name"], obj["doc"]
            if name not in DOCUMENT_NAMES or not isinstance(doc, dict):
                raise ValueError(f"not a bluesky document: name {name!r}")
        except (ValueError, KeyError, TypeError) as exc:
            await self.ctx.reject(f"{where}: {exc}", where, raw)
            state["offset"] = offset
            return
        run = self._track(name, doc, state)
        state["offset"] = offset
        if name == "stop":
            self._forget(doc.get("run_start"), state)
        checkpoint = json.dumps(state, separators=(",", ":"))
        if cfg.documents is not None and name not in cfg.documents:
            return
        uid = doc.get("uid") or doc.get("datum_id") or stable_id(str(path), str(offset))
        data = {"name": name, "doc": doc, "run": run}
        when = doc.get("time")
        await emit(
            Reading(
                cfg.stream,
                data,
                id=stable_id(self.ctx.site, self.ctx.device, cfg.stream, name, str(uid)),
                time=datetime.fromtimestamp(when, UTC) if isinstance(when, int | float) else None,
                checkpoint=checkpoint,
            )
        )

    def _track(self, name: str, doc: dict[str, Any], state: dict[str, Any]) -> dict[str, Any]:
        """Remember runs, descriptors and resources; the ``run`` summary this document belongs to."""
        cfg = self.config
        runs: dict[str, Any] = state["runs"]
        if name == "start":
            run = {"uid": doc.get("uid")}
            run.update({k: doc[k] for k in cfg.run_metadata if k in doc})
            runs[str(doc.get("uid"))] = run
            return run
        run_uid: Any = None
        if name in ("descriptor", "stop", "resource", "stream_resource"):
            run_uid = doc.get("run_start")
            if name == "descriptor":
                state["descriptors"][str(doc.get("uid"))] = run_uid
            elif name in ("resource", "stream_resource"):
                state["resources"][str(doc.get("uid"))] = run_uid
        elif name in ("event", "event_page"):
            run_uid = state["descriptors"].get(str(doc.get("descriptor")))
        elif name in ("datum", "datum_page", "stream_datum"):
            ref = doc.get("resource") or doc.get("stream_resource")
            run_uid = state["resources"].get(str(ref))
        if run_uid is None:
            return {}  # a document of a run whose descriptor or resource was not seen
        # A run whose start was not seen (the file began mid-run) still names its uid.
        return runs.get(str(run_uid)) or {"uid": run_uid}

    @staticmethod
    def _forget(run_uid: Any, state: dict[str, Any]) -> None:
        # A finished run leaves the checkpoint: it stays small however many runs pass.
        state["runs"].pop(str(run_uid), None)
        for key in ("descriptors", "resources"):
            state[key] = {k: v for k, v in state[key].items() if v != run_uid}
