"""Apps: declarations, templates, implementation choice."""

from __future__ import annotations

import pytest

from reflexarc.hpc_bridge.apps import (
    AppError,
    AppSpec,
    MpiSpec,
    SiteResources,
    choose_implementation,
    merge_with_decorator,
    mpi_argv,
    render_argv,
)
from reflexarc.hpc_bridge.states import OnFailure

APPS = "reflexarc.hpc_bridge.examples.apps"


def test_render_argv_fills_placeholders_without_format_language() -> None:
    assert render_argv(["wc", "-l", "{path}", "--n={n}"], {"path": "/x y", "n": 3}) == ["wc", "-l", "/x y", "--n=3"]
    # No attribute access or indexing: such text stays literal.
    assert render_argv(["{a.__class__}"], {"a": 1}) == ["{a.__class__}"]


def test_render_argv_names_missing_arguments() -> None:
    with pytest.raises(AppError, match=r"\['path'\].*gave \['n'\]"):
        render_argv(["wc", "{path}"], {"n": 1})


def test_mpi_launchers() -> None:
    assert mpi_argv(MpiSpec(ranks=4, launcher_args=["--oversubscribe"]), ["./sim"]) == [
        "mpirun",
        "-n",
        "4",
        "--oversubscribe",
        "./sim",
    ]
    assert mpi_argv(MpiSpec(ranks=2, launcher="srun"), ["./sim"]) == ["srun", "--ntasks=2", "./sim"]


def test_app_spec_needs_exactly_one_kind() -> None:
    with pytest.raises(ValueError, match="exactly one"):
        AppSpec(function=f"{APPS}:add", argv=["true"])
    with pytest.raises(ValueError, match="exactly one"):
        AppSpec()
    with pytest.raises(ValueError, match=r"package\.module:function"):
        AppSpec(function="not a reference")
    assert AppSpec(argv=["x"], mpi=MpiSpec()).kind == "mpi"


def test_policies_decide_retries() -> None:
    assert AppSpec(argv=["x"]).effective_retries == 1
    assert AppSpec(argv=["x"], retries=3).effective_retries == 3
    assert AppSpec(argv=["x"], retries=3, on_failure=OnFailure.FAIL).effective_retries == 0
    assert AppSpec(argv=["x"], retries=3, on_failure=OnFailure.CANCEL_SUCCESSORS).effective_retries == 0
    assert AppSpec(argv=["x"], on_failure=OnFailure.IGNORE).effective_retries == 0


def test_decorators_supply_defaults_and_implementations() -> None:
    spec = merge_with_decorator(AppSpec(function=f"{APPS}:denoise", timeout_s=5))
    assert spec.retries == 1 and spec.timeout_s == 5  # decorator's retries, YAML's timeout
    assert [i.function for i in spec.implementations] == [f"{APPS}:denoise_gpu"]
    cpu = choose_implementation("denoise", spec, SiteResources(cpus=4, gpus=0))
    gpu = choose_implementation("denoise", spec, SiteResources(cpus=4, gpus=2))
    assert cpu.function.endswith(":denoise") and gpu.function.endswith(":denoise_gpu")


def test_no_fitting_implementation_says_why() -> None:
    spec = AppSpec(function=f"{APPS}:add", cpus=16)
    with pytest.raises(AppError, match="needs 16 CPUs, site offers 2"):
        choose_implementation("add", spec, SiteResources(cpus=2))


def test_missing_function_fails_with_advice() -> None:
    with pytest.raises(AppError, match="no attribute 'nope'"):
        merge_with_decorator(AppSpec(function=f"{APPS}:nope"))
    with pytest.raises(AppError, match="packed environment"):
        merge_with_decorator(AppSpec(function="no_such_module_xyz:f"))
