"""What is stored by reference, and what garbage collection removes (``reflexarc data ls|gc``).

Objects live under a root URL (the claim-check or results store). An object
is kept while it is younger than the retention, and removed after it; an
object that no event references (an *orphan*: an edge crashed between its
upload and its spool, or its event was lost upstream) is removed once older
than ``grace`` — the grace covers an upload whose event is still on its way.
Which objects events reference is read from the pipeline's topics (every
string in an event's data that names an object under the root).
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

from reflexarc.objectstore import ObjectStoreSettings, open_store

_DURATION = re.compile(r"^(\d+(?:\.\d+)?)([smhd])$")
_UNIT = {"s": 1, "m": 60, "h": 3600, "d": 86400}


def parse_duration(text: str) -> timedelta:
    """``30s``, ``10m``, ``12h``, ``7d`` -> a timedelta; ValueError otherwise."""
    m = _DURATION.match(text.strip())
    if not m:
        raise ValueError(f"not a duration: {text!r} (write e.g. 30s, 10m, 12h, 7d)")
    return timedelta(seconds=float(m.group(1)) * _UNIT[m.group(2)])


@dataclass(frozen=True, slots=True)
class StoredObject:
    """One object under the root."""

    url: str
    size: int
    modified: datetime


def _modified(info: dict[str, Any]) -> datetime:
    value = info.get("LastModified") or info.get("mtime") or info.get("created")
    if isinstance(value, datetime):
        return value if value.tzinfo else value.replace(tzinfo=UTC)
    if isinstance(value, int | float):
        return datetime.fromtimestamp(value, UTC)
    return datetime.now(UTC)  # unknown: treated as new, so never removed by age


def list_objects(root: str, settings: ObjectStoreSettings | None = None) -> list[StoredObject]:
    """Every object under ``root`` (recursively), with its size and modification time."""
    fs, path = open_store(root, settings)
    protocol = root.split("://", 1)[0] if "://" in root else "file"
    try:
        found: dict[str, dict[str, Any]] = fs.find(path, detail=True)
    except FileNotFoundError:
        return []
    out = []
    for p, info in sorted(found.items()):
        if info.get("type") == "directory":
            continue
        url = f"{protocol}://{p}" if protocol != "file" else f"file://{p}"
        out.append(StoredObject(url, int(info.get("size") or 0), _modified(info)))
    return out


def referenced_urls(data_items: Iterable[Any], root: str) -> set[str]:
    """URLs under ``root`` named anywhere in the given event data (references, bare URLs, result refs)."""
    prefix = root.rstrip("/") + "/"
    found: set[str] = set()
    stack = list(data_items)
    while stack:
        item = stack.pop()
        if isinstance(item, str):
            if item.startswith(prefix):
                found.add(item)
        elif isinstance(item, dict):
            stack.extend(item.values())
        elif isinstance(item, list):
            stack.extend(item)
    return found


@dataclass(frozen=True, slots=True)
class Removal:
    """An object garbage collection removes, and why."""

    obj: StoredObject
    reason: str  # "expired" or "orphan"


def plan_gc(
    objects: Iterable[StoredObject],
    referenced: set[str],
    retention: timedelta,
    grace: timedelta,
    now: datetime | None = None,
) -> list[Removal]:
    """Objects to remove: older than ``retention``, or unreferenced and older than ``grace``."""
    now = now or datetime.now(UTC)
    out = []
    for obj in objects:
        age = now - obj.modified
        if age > retention:
            out.append(Removal(obj, "expired"))
        elif obj.url not in referenced and age > grace:
            out.append(Removal(obj, "orphan"))
    return out


def remove(removals: Iterable[Removal], settings: ObjectStoreSettings | None = None) -> int:
    """Delete the planned objects; returns how many."""
    n = 0
    for r in removals:
        fs, path = open_store(r.obj.url, settings)
        fs.rm_file(path)
        n += 1
    return n
