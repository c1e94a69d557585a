"""Which address of this host pilot workers connect back to (scheduler or interchange).

On a cluster the agent runs on a login or service node and the workers on
compute nodes: they must reach an address of the agent's host on a network
the compute nodes share (often a high-speed one: ``ib0``, ``hsn0``). That is
a setting (``address`` or ``interface``) and it is checked here, so that a
typo fails at start-up with the field's name instead of leaving allocations
whose workers never connect.
"""

from __future__ import annotations

import logging
import socket

from reflexarc.hpc_bridge.engines.base import EngineError

log = logging.getLogger(__name__)

LOOPBACK = "127.0.0.1"


def local_addresses() -> dict[str, list[str]]:
    """Interface name -> its IPv4 and IPv6 addresses, for this host."""
    import psutil  # a dependency of distributed

    out: dict[str, list[str]] = {}
    for name, addrs in psutil.net_if_addrs().items():
        for a in addrs:
            if a.family in (socket.AF_INET, socket.AF_INET6):
                out.setdefault(name, []).append(a.address.split("%", 1)[0])
    return out


def _describe(interfaces: dict[str, list[str]]) -> str:
    return ", ".join(f"{name} {' '.join(addrs)}" for name, addrs in sorted(interfaces.items())) or "none"


def resolve_address(address: str | None, interface: str | None, field: str) -> str:
    """The address workers connect to: ``interface``'s, or ``address`` (checked), or loopback.

    ``field`` is where the settings are in site.yaml (e.g. ``engine.parsl``);
    errors name it. A host name is accepted when it resolves to an address of
    this host.
    """
    interfaces = local_addresses()
    if interface:
        addrs = interfaces.get(interface)
        if not addrs:
            raise EngineError(
                f"{field}.interface: {interface!r} is not a network interface of this host "
                f"({socket.gethostname()}); its interfaces: {_describe(interfaces)}"
            )
        ipv4 = [a for a in addrs if ":" not in a]
        return (ipv4 or addrs)[0]
    if address:
        mine = {a for addrs in interfaces.values() for a in addrs}
        try:
            resolved = {info[4][0] for info in socket.getaddrinfo(address, None)}
        except OSError:
            resolved = set()
        if not resolved & mine:
            raise EngineError(
                f"{field}.address: {address!r} is not an address of this host ({socket.gethostname()}), so "
                f"workers could not connect back to it; its interfaces: {_describe(interfaces)} "
                f"(or set {field}.interface)"
            )
        return address
    log.info("%s: workers connect back to %s (set address or interface when they run on other nodes)", field, LOOPBACK)
    return LOOPBACK
