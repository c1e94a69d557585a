"""Mosquitto ACL entries that confine each device to its own topic prefix."""

from __future__ import annotations

from reflexarc.topics import Topics


def device_acl(topics: Topics, site: str, device: str, username: str | None = None) -> str:
    """The ACL block for one device: write its data/ack/status, read its commands and receipts, nothing else."""
    user = username or f"{site}-{device}"
    return (
        f"user {user}\n"
        f"topic write {topics.mqtt_ingest_filters(site, device)[0]}\n"
        f"topic write {topics.mqtt_ack(site, device)}\n"
        f"topic readwrite {topics.mqtt_status(site, device)}\n"
        f"topic read {topics.mqtt_cmd(site, device)}\n"
        f"topic read {topics.mqtt_receipt(site, device)}\n\n"
    )


def bridge_acl(topics: Topics, username: str = "fog") -> str:
    """The ACL block for a fog bridge: read every device's traffic, send commands and receipts."""
    ns = topics.namespace
    return f"user {username}\ntopic readwrite {ns}/#\n\n"
