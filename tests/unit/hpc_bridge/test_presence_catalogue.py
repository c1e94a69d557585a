"""The app catalogue a site announces in its heartbeat."""

from __future__ import annotations

from reflexarc.hpc_bridge.apps import AppSpec
from reflexarc.hpc_bridge.service.presence import app_catalogue


def test_app_fingerprint_changes_with_the_app_definition() -> None:
    one = app_catalogue({"fit": AppSpec(function="m:f", cpus=2)})["fit"]
    same = app_catalogue({"fit": AppSpec(function="m:f", cpus=2)})["fit"]
    other = app_catalogue({"fit": AppSpec(function="m:f", cpus=4)})["fit"]
    assert one.fingerprint == same.fingerprint != other.fingerprint
    assert (one.cpus, one.gpus) == (2, 0)
