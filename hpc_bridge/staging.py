"""Stage-in: arguments that are references to stored objects become what the app declared it wants.

An app declares in ``site.yaml``::

    apps:
      frame_stats:
        function: mylab.apps:frame_stats
        refs:
          frame: {stage: download}     # the app gets a local path

The trigger passes the event's reference (``args: {frame: event.data.ref}``):
``{url, size, sha256, ...}`` or a bare URL. Before the attempt is submitted,
:func:`stage_in` downloads it into the attempt's work directory (streamed,
checked against its sha256 and size) and replaces the argument with the
local path. A missing object, a wrong checksum or a refused access fails the
attempt with ``stage-in: <reason>``; it is retryable, so the app's retry
policy applies (a corrupted object may be rewritten meanwhile).

Stage-out: when ``results.store`` of ``site.yaml`` is a URL (``s3://bucket/results``),
a result above ``results.inline_max_bytes`` is uploaded there as JSON by
:func:`stage_out`; the result event carries its URL (``result_ref``) and,
as ``result``, the result's small fields plus ``ref`` (url, size, sha256), so
that ``on_result`` can use them without downloading.

Store settings (endpoint, credentials) come from the site's environment:
``RX_S3_ENDPOINT_URL`` and botocore's credential chain (see :mod:`reflexarc.objectstore`).
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
from pathlib import Path, PurePosixPath
from typing import Any

from pydantic import ValidationError

from reflexarc.hpc_bridge.apps import AppSpec, RefArg, mpi_argv, render_argv
from reflexarc.hpc_bridge.engines import EngineError
from reflexarc.hpc_bridge.store import Outcome
from reflexarc.hpc_bridge.worker import RunSpec
from reflexarc.objectstore import ObjectRef, ObjectStoreSettings, StageError, download, put_bytes

#: Sub-directory of an attempt's work directory where downloads land.
STAGE_DIR = "stage-in"
#: Fields of a large result at most this big (as JSON) also stay inline, next to its reference.
INLINE_FIELD_MAX = 1024


class StageInError(EngineError):
    """A referenced argument could not be staged in; retryable under the app's policy."""


def _ref(name: str, value: object) -> ObjectRef:
    try:
        return ObjectRef.from_data(value)
    except ValidationError as exc:
        raise StageInError(f"stage-in: argument {name!r} is not a reference: {exc.errors()[0]['msg']}") from None


def _stage_one(
    name: str, index: int | None, value: object, decl: RefArg, workdir: str, settings: ObjectStoreSettings | None
) -> str:
    """Stage one reference (blocking: runs in a thread); returns the argument's new value."""
    ref = _ref(name, value)
    if decl.stage == "pass":
        return ref.url
    base = PurePosixPath(ref.url.split("://", 1)[-1]).name or "object"
    sub = name if index is None else f"{name}/{index}"
    dest = Path(workdir) / STAGE_DIR / sub / base
    try:
        download(ref, dest, settings)
    except StageError as exc:
        raise StageInError(f"stage-in: {exc}") from None
    except (OSError, ValueError) as exc:  # no credentials, unreachable store, bad URL
        raise StageInError(f"stage-in: {ref.url}: {type(exc).__name__}: {exc}") from None
    return str(dest)


def _stage_all(app: AppSpec, args: dict[str, Any], workdir: str, settings: ObjectStoreSettings | None) -> bool:
    staged = False
    for name, decl in app.refs.items():
        if name not in args or args[name] is None:
            continue  # an optional argument the trigger did not give
        value = args[name]
        if isinstance(value, list):
            args[name] = [_stage_one(name, i, v, decl, workdir, settings) for i, v in enumerate(value)]
        else:
            args[name] = _stage_one(name, None, value, decl, workdir, settings)
        staged = True
    return staged


async def stage_in(app: AppSpec, spec: RunSpec, settings: ObjectStoreSettings | None = None) -> None:
    """Replace ``spec``'s referenced arguments by local paths (or URLs); raise :class:`StageInError` on failure.

    ``spec.args`` is the job's own request dict: it is copied, never changed in place. A command
    app's ``argv`` is rendered again from the staged arguments.
    """
    if not app.refs:
        return
    args = dict(spec.args)
    if not await asyncio.to_thread(_stage_all, app, args, spec.workdir, settings):
        return
    spec.args = args
    if app.argv is not None:
        argv = render_argv(app.argv, args)
        spec.argv = mpi_argv(app.mpi, argv) if app.mpi is not None else argv


def is_store_url(store: str | None) -> bool:
    """True when a ``results.store`` setting names an object store URL rather than a directory."""
    return store is not None and "://" in store


async def stage_out(outcome: Outcome, store: str, name: str, settings: ObjectStoreSettings | None = None) -> Outcome:
    """Upload ``outcome``'s result as ``STORE/NAME.json``; the outcome then carries its reference and small fields."""
    result = outcome.result or {}
    url = f"{store.rstrip('/')}/{name}.json"
    ref = await asyncio.to_thread(put_bytes, url, json.dumps(result).encode(), settings, "application/json")
    small = {k: v for k, v in result.items() if len(json.dumps(v)) <= INLINE_FIELD_MAX}
    return dataclasses.replace(outcome, result={**small, "ref": ref.to_data()}, result_ref=ref.url)
