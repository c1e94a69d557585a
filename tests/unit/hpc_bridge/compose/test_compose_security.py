"""Identities from hashed tokens, owner checks, and the audit log."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from compose_testkit import ADMIN_TOKEN, ALICE_TOKEN, pools_doc, write_pools

from reflexarc.hpc_bridge.compose import (
    Composer,
    CompositionSpec,
    Identity,
    MachineState,
    PlacementError,
    hash_token,
)

ALICE = Identity(user="alice")
BOB = Identity(user="bob")
OPS = Identity(user="ops", is_admin=True)


@pytest.fixture
def composer(tmp_path: Path) -> Iterator[Composer]:
    """A composer on a fresh SQLite file with the test inventory."""
    with Composer(tmp_path / "compose.db", write_pools(tmp_path / "pools.yaml")) as c:
        yield c


def test_pools_file_holds_only_hashes(tmp_path: Path) -> None:
    text = write_pools(tmp_path / "pools.yaml").read_text()
    assert ALICE_TOKEN not in text
    assert hash_token(ALICE_TOKEN) in text


def test_identity_from_env(composer: Composer, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("RX_COMPOSE_TOKEN", ALICE_TOKEN)
    assert composer.identity_from_env() == ALICE
    monkeypatch.setenv("RX_COMPOSE_TOKEN", ADMIN_TOKEN)
    assert composer.identity_from_env() == OPS


def test_unknown_or_missing_token_is_refused(composer: Composer, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("RX_COMPOSE_TOKEN", "guess")
    with pytest.raises(PermissionError, match="token not recognised"):
        composer.identity_from_env()
    monkeypatch.delenv("RX_COMPOSE_TOKEN")
    with pytest.raises(PermissionError, match="set RX_COMPOSE_TOKEN"):
        composer.identity_from_env()
    last = composer.audit()[-1]
    assert (last.user, last.action, last.outcome) == ("<unknown>", "auth", "refused")


def test_non_owner_cannot_free_admin_can(composer: Composer) -> None:
    m = composer.compose(CompositionSpec(cpus=8, gpus=1), ALICE, name="alice-box")
    with pytest.raises(PermissionError) as err:
        composer.free(m.id, BOB)
    assert str(err.value) == ("bob may not free machine alice-box owned by alice: only its owner or an admin can")
    assert composer.show(m.id).state == MachineState.COMPOSED
    freed = composer.free("alice-box", OPS)
    assert freed.state == MachineState.FREED
    assert composer.pools().used() == 0


def test_non_owner_cannot_change_through_apply(composer: Composer) -> None:
    composer.compose(CompositionSpec(cpus=8), ALICE, name="shared-name")
    text = "machines:\n- name: shared-name\n  spec: {cpus: 16}\n"
    with pytest.raises(PermissionError, match="bob may not change machine shared-name"):
        composer.apply(text, BOB)
    assert composer.show("shared-name").spec.cpus == 8


def test_audit_records_every_change(composer: Composer) -> None:
    m = composer.compose(CompositionSpec(cpus=8), ALICE)
    with pytest.raises(PermissionError):
        composer.free(m.id, BOB)
    with pytest.raises(PlacementError):
        composer.compose(CompositionSpec(cpus=1000), BOB)
    composer.free(m.id, ALICE)
    rows = [(e.user, e.action, e.machine_id, e.outcome) for e in composer.audit()]
    assert rows == [
        ("alice", "compose", m.id, "ok"),
        ("bob", "free", m.id, "refused"),
        ("bob", "compose", None, "failed"),
        ("alice", "free", m.id, "ok"),
    ]
    entries = composer.audit()
    assert "need a compute node with 1000 cores" in entries[2].detail
    assert all(e.at.tzinfo is not None for e in entries)
    assert [e.action for e in composer.audit(machine_id=m.id)] == ["compose", "free", "free"]
    assert len(composer.audit(limit=2)) == 2


def test_plaintext_token_in_pools_is_rejected(tmp_path: Path) -> None:
    doc = pools_doc()
    doc["tokens"] = [{"user": "eve", "token": "plaintext"}]
    path = write_pools(tmp_path / "pools.yaml", doc)
    with pytest.raises(ValueError, match=r"pools\.yaml:\d+:\d+: tokens\[0\]\.token: unknown field"):
        Composer(tmp_path / "c.db", path)
