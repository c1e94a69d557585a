"""Pieces of the agent that need no broker: property packing, argv rendering, ACL text."""

from __future__ import annotations

import pytest
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from reflexarc.edge.acl import device_acl
from reflexarc.edge.actuators import HandlerError, render_argv
from reflexarc.edge.link import pack_publish_properties
from reflexarc.envelope import Envelope
from reflexarc.topics import Topics


def test_packed_properties_match_paho() -> None:
    env = Envelope.for_device("io.reflexarc.data", "bl1", "det1", {"v": "é" * 200}, subject="s")
    _, props, ctype = env.to_mqtt(binary=True)
    ref = Properties(PacketTypes.PUBLISH)
    ref.UserProperty = props
    ref.ContentType = ctype
    assert pack_publish_properties(props, ctype) == ref.pack()
    assert pack_publish_properties([("k", "v" * 300)] * 50, None) == _paho([("k", "v" * 300)] * 50)


def _paho(props: list[tuple[str, str]]) -> bytes:
    p = Properties(PacketTypes.PUBLISH)
    p.UserProperty = props
    return p.pack()


def test_argv_is_never_a_shell() -> None:
    argv = render_argv(["move", "--to", "{pos}", "--tag={tag}"], {"pos": 1.5, "tag": "a; rm -rf /"})
    assert argv == ["move", "--to", "1.5", "--tag=a; rm -rf /"]
    assert render_argv(["x", "{o}", "{b}"], {"o": {"a": 1}, "b": True}) == ["x", '{"a": 1}', "true"]
    with pytest.raises(HandlerError, match="no arg 'missing'"):
        render_argv(["x", "{missing}"], {})


def test_device_acl_block() -> None:
    text = device_acl(Topics(), "bl1", "det1")
    assert text.strip().splitlines() == [
        "user bl1-det1",
        "topic write rx/bl1/det1/data/+",
        "topic write rx/bl1/det1/ack",
        "topic readwrite rx/bl1/det1/status",
        "topic read rx/bl1/det1/cmd",
        "topic read rx/bl1/det1/receipt",
    ]
