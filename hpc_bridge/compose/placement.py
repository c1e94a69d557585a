"""Placement: choose devices for a spec under the fabric constraint.

A GPU, drive or NIC can only be attached to a compute node over the fabric
it sits on, so all devices of one machine come from ONE fabric domain (by
default a rack is its own domain). Placement is a pure function of the spec
and the free devices; the composer calls it inside its allocation
transaction and the database's unique index settles any race.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from .model import CompositionSpec, Device


class PlacementError(Exception):
    """Nothing fits. The message says what is missing and the best available."""


@dataclass(frozen=True)
class _Shortfall:
    """One requirement a domain cannot meet: what is needed, what it has."""

    need: str
    have: int
    have_text: str
    amount: int  # how much was needed, in the unit of ``have``
    where: str  # where the best of it is, e.g. "rack r2"

    @property
    def gap(self) -> float:
        """Missing fraction, 0..1 (to rank domains by how close they came)."""
        return max(0.0, 1.0 - self.have / self.amount) if self.amount else 0.0


def _model_ok(dev: Device, model: str | None) -> bool:
    """GPU model match, case-insensitive (inventories disagree on 'a100' vs 'A100')."""
    return model is None or (dev.model or "").lower() == model.lower()


def _host_ok(dev: Device, spec: CompositionSpec) -> bool:
    """A compute node big enough for the spec."""
    return (dev.cores or 0) >= spec.cpus and (dev.memory_gb or 0) >= spec.memory_gb


def _gpu_label(spec: CompositionSpec) -> str:
    """``gpu(model=A100)`` or ``gpu``."""
    return f"gpu(model={spec.gpu_model})" if spec.gpu_model else "gpu"


def _host_label(spec: CompositionSpec) -> str:
    """Human text of the compute-node requirement."""
    mem = f" and {spec.memory_gb} GB memory" if spec.memory_gb else ""
    return f"a compute node with {spec.cpus} cores{mem}"


def _where(domain: str, devices: Iterable[Device]) -> str:
    """``rack r2`` for a one-rack domain, else ``fabric f1 (racks r1, r2)``."""
    racks = sorted({d.rack for d in devices})
    if len(racks) == 1 and racks[0] == domain:
        return f"rack {domain}"
    if len(racks) == 1:
        return f"rack {racks[0]}, fabric {domain}"
    return f"fabric {domain}: racks {', '.join(racks) or '-'}"


def _pick_storage(candidates: list[Device], need_gb: int) -> list[Device] | None:
    """Drives adding up to ``need_gb``: the smallest single drive that fits,
    else the largest first (fewest drives). None when the total is short."""
    if need_gb <= 0:
        return []
    if sum(d.capacity_gb or 0 for d in candidates) < need_gb:
        return None
    singles = [d for d in candidates if (d.capacity_gb or 0) >= need_gb]
    if singles:
        return [min(singles, key=lambda d: (d.capacity_gb or 0, d.id))]
    chosen: list[Device] = []
    total = 0
    for d in sorted(candidates, key=lambda d: (-(d.capacity_gb or 0), d.id)):
        chosen.append(d)
        total += d.capacity_gb or 0
        if total >= need_gb:
            return chosen
    return None  # pragma: no cover - the sum check above makes this unreachable


def _fit_domain(spec: CompositionSpec, domain: str, devs: list[Device]) -> tuple[list[Device] | None, list[_Shortfall]]:
    """Place the spec inside one domain: (devices, []) or (None, shortfalls)."""
    pref = spec.rack
    shortfalls: list[_Shortfall] = []

    hosts = [d for d in devs if d.kind == "cpu" and _host_ok(d, spec)]
    # Best fit (smallest node that fits) keeps big nodes for big requests.
    hosts.sort(key=lambda d: (d.rack != pref, d.cores or 0, d.memory_gb or 0, d.id))
    if not hosts:
        cpus = [d for d in devs if d.kind == "cpu"]
        largest = max(cpus, key=lambda d: (d.cores or 0, d.memory_gb or 0), default=None)
        have, text = 0, "no free compute node"
        if largest is not None:
            have = largest.cores or 0
            mem = f", {largest.memory_gb} GB" if largest.memory_gb is not None else ""
            text = f"{have} cores{mem}"
        where = _where(domain, [largest] if largest else devs)
        shortfalls.append(_Shortfall(_host_label(spec), have, text, spec.cpus, where))
    host = hosts[0] if hosts else None
    host_rack = host.rack if host else pref

    def near(d: Device) -> tuple[bool, bool, str]:
        # Same rack as the host first (shortest fabric path), then the preferred rack.
        return (d.rack != host_rack, d.rack != pref, d.id)

    gpus = sorted((d for d in devs if d.kind == "gpu" and _model_ok(d, spec.gpu_model)), key=near)
    if len(gpus) < spec.gpus:
        need = f"{spec.gpus} {_gpu_label(spec)}"
        where = _where(domain, gpus or devs)
        shortfalls.append(_Shortfall(need, len(gpus), str(len(gpus)), spec.gpus, where))

    drives = sorted((d for d in devs if d.is_storage), key=near)
    same_rack = [d for d in drives if d.rack == host_rack]
    storage = _pick_storage(same_rack, spec.storage_gb) or _pick_storage(drives, spec.storage_gb)
    if storage is None:
        have = sum(d.capacity_gb or 0 for d in drives)
        need = f"{spec.storage_gb} GB of nvme/storage"
        where = _where(domain, drives or devs)
        shortfalls.append(_Shortfall(need, have, f"{have} GB", spec.storage_gb, where))

    nics = sorted((d for d in devs if d.kind == "nic"), key=near)
    if len(nics) < spec.nics:
        where = _where(domain, nics or devs)
        shortfalls.append(_Shortfall(f"{spec.nics} nic", len(nics), str(len(nics)), spec.nics, where))

    if shortfalls or host is None or storage is None:
        return None, shortfalls
    return [host, *gpus[: spec.gpus], *storage, *nics[: spec.nics]], []


def _domains(free: Sequence[Device]) -> dict[str, list[Device]]:
    """Free devices grouped by fabric domain."""
    by_domain: dict[str, list[Device]] = defaultdict(list)
    for d in free:
        by_domain[d.fabric].append(d)
    return by_domain


def place(spec: CompositionSpec, free: Sequence[Device]) -> list[Device]:
    """Choose devices for ``spec`` from ``free``, all in one fabric domain.

    The domain holding the preferred rack is tried first; when it lacks
    anything, another domain that has all of it is used. Raises
    ``PlacementError`` naming the missing requirement and the most any
    single domain has free.
    """
    by_domain = _domains(free)
    preferred = {d.fabric for d in free if spec.rack and d.rack == spec.rack}
    order = sorted(by_domain, key=lambda name: (name not in preferred, name))
    misses: dict[str, list[_Shortfall]] = {}
    for name in order:
        devices, shortfalls = _fit_domain(spec, name, by_domain[name])
        if devices is not None:
            return devices
        misses[name] = shortfalls
    raise PlacementError(_explain(spec, by_domain, misses))


def _explain(
    spec: CompositionSpec,
    by_domain: dict[str, list[Device]],
    misses: dict[str, list[_Shortfall]],
) -> str:
    """Build the error text: name every requirement no domain meets, with the best
    domain for it; if each is met somewhere but never together, say which domain
    came closest and what it lacks."""
    if not by_domain:
        return f"need {spec.describe()}; no device is free in any pool"
    # requirement -> its shortfall in every domain that misses it
    per_need: dict[str, list[tuple[str, _Shortfall]]] = defaultdict(list)
    for domain, shortfalls in misses.items():
        for s in shortfalls:
            per_need[s.need].append((domain, s))
    lines = []
    for need, entries in per_need.items():
        if len(entries) < len(by_domain):
            continue  # some domain satisfies this requirement on its own
        # The domain with the most of it (ties: by name, for stable messages).
        _, best = min(entries, key=lambda e: (-e[1].have, e[0]))
        if need.startswith("a compute node"):
            lines.append(
                f"need {need} in one fabric domain; the largest free is {best.have_text} ({best.where})"
                if best.have
                else f"need {need}; no compute node is free"
            )
        else:
            lines.append(
                f"need {need} in one fabric domain; the most any domain has free is {best.have_text} ({best.where})"
            )
    if lines:
        return "; ".join(lines)
    closest = min(misses, key=lambda d: (sum(s.gap for s in misses[d]), d))
    lacking = ", ".join(f"{s.need} (has {s.have_text})" for s in misses[closest])
    return (
        f"need {spec.describe()} in one fabric domain; each part is free somewhere but no "
        f"domain has all of it; closest is {_where(closest, by_domain[closest])}, "
        f"which lacks {lacking}"
    )


def satisfies(spec: CompositionSpec, devices: Sequence[Device]) -> bool:
    """True if exactly these devices realise ``spec`` in one fabric domain.

    Used when re-applying an exported machine: its old devices are reused
    only if they still make an equivalent machine.
    """
    if not devices or len({d.fabric for d in devices}) != 1:
        return False
    hosts = [d for d in devices if d.kind == "cpu"]
    gpus = [d for d in devices if d.kind == "gpu"]
    drives = [d for d in devices if d.is_storage]
    nics = [d for d in devices if d.kind == "nic"]
    capacity = sum(d.capacity_gb or 0 for d in drives)
    return (
        len(hosts) == 1
        and _host_ok(hosts[0], spec)
        and len(gpus) == spec.gpus
        and all(_model_ok(g, spec.gpu_model) for g in gpus)
        and len(nics) == spec.nics
        and capacity >= spec.storage_gb
        and (spec.storage_gb > 0 or not drives)
    )
