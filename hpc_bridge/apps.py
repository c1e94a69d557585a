"""Apps: what a site can run, declared with ``@app``/``@implement`` or in ``site.yaml``.

An app is referenced by name from triggers. Its code travels as a reference
(``package.module:function``) plus, optionally, a packed environment; never as
a pickle. Three kinds:

* Python function apps (``function: "pkg.mod:func"``), called with the
  request's ``args`` as keyword arguments, returning a JSON-serialisable dict;
* shell-command apps (``argv: ["wc", "-l", "{path}"]``), where ``{name}``
  placeholders are filled from the request's args (no shell is involved);
* MPI apps (``argv`` plus ``mpi: {ranks: 4, launcher: mpirun}``).

Decorators, for apps written in Python::

    from reflexarc.hpc_bridge import app, implement

    @app(cpus=1, timeout_s=30, retries=2, on_failure="retry")
    def denoise(frame: list[float]) -> dict: ...

    @implement(denoise, gpus=1)          # chosen where the site offers a GPU
    def denoise_gpu(frame: list[float]) -> dict: ...

``site.yaml`` then names the function (``function: "mylab.apps:denoise"``),
or lists the module under ``modules:`` to register every ``@app`` in it. Values
written in ``site.yaml`` override the decorator's.
"""

from __future__ import annotations

import importlib
import re
from collections.abc import Callable
from typing import Any, Literal, TypeVar, overload

from pydantic import Field, field_validator, model_validator

from reflexarc.config import StrictModel
from reflexarc.hpc_bridge.states import OnFailure

F = TypeVar("F", bound=Callable[..., Any])

_REF_RE = re.compile(r"^[A-Za-z_][\w.]*:[A-Za-z_][\w.]*$")
_PLACEHOLDER_RE = re.compile(r"\{([A-Za-z_]\w*)\}")


class AppError(ValueError):
    """An app is misdeclared, cannot be found, or cannot run at this site."""


class SiteResources(StrictModel):
    """What the site offers to one task (used to choose an implementation and to check fits)."""

    cpus: int = Field(1, ge=1)
    gpus: int = Field(0, ge=0)
    gpu_model: str | None = None
    memory_gb: float | None = Field(None, gt=0)


class Implementation(StrictModel):
    """An alternative implementation of an app for other hardware (``@implement``)."""

    function: str = Field(description="package.module:function")
    cpus: int | None = Field(None, ge=1)
    gpus: int = Field(0, ge=0)
    gpu_model: str | None = None
    memory_gb: float | None = Field(None, gt=0)

    @field_validator("function")
    @classmethod
    def _check_ref(cls, v: str) -> str:
        return check_reference(v)


class MpiSpec(StrictModel):
    """How to launch an MPI app: its ranks are reserved inside one allocation, then launched there."""

    ranks: int = Field(2, ge=1)
    ranks_per_node: int | None = Field(
        None, ge=1, description="ranks on each node (default: as many as fit, fewest nodes)"
    )
    launcher: Literal["mpirun", "mpiexec", "srun"] = "mpirun"
    launcher_args: list[str] = Field(
        default_factory=list,
        description="extra launcher flags, e.g. ['--oversubscribe', '--allow-run-as-root']",
    )


class EnvSpec(StrictModel):
    """A packed environment for the app (PONCHO-style): built once, cached by hash, unpacked per node."""

    pack: bool = Field(True, description="build and run inside a packed venv")
    requirements: list[str] = Field(
        default_factory=list,
        description="extra requirements (pip syntax) on top of the imports found in the code",
    )
    paths: list[str] = Field(
        default_factory=list, description="directories with the app's own code, copied into the env"
    )


class RefArg(StrictModel):
    """An argument that is a reference to a stored object (an event's ``data.ref``), and how the app gets it.

    ``download``: a local path in the task's directory, checksum-verified before the app starts;
    ``pass``: the URL itself (the app reads it, e.g. with fsspec).
    """

    stage: Literal["download", "pass"] = "download"


class AppSpec(StrictModel):
    """One app entry of ``site.yaml`` (or of an ``@app`` decorator)."""

    function: str | None = Field(None, description="package.module:function of a Python app")
    argv: list[str] | None = Field(None, description="command template of a shell/MPI app")
    mpi: MpiSpec | None = None
    cpus: int = Field(1, ge=1)
    gpus: int = Field(0, ge=0)
    gpu_model: str | None = None
    memory_gb: float | None = Field(None, gt=0)
    walltime_s: float | None = Field(None, gt=0, description="batch walltime (default: timeout_s)")
    timeout_s: float | None = Field(None, gt=0, description="kill and report timed_out after this")
    retries: int = Field(0, ge=0)
    on_failure: OnFailure = OnFailure.RETRY
    implementations: list[Implementation] = Field(default_factory=list)
    env: EnvSpec | None = None
    environment: dict[str, str] = Field(default_factory=dict, description="environment variables")
    refs: dict[str, RefArg] = Field(
        default_factory=dict, description="arguments that are references to stored objects, by name (staged in)"
    )

    @field_validator("function")
    @classmethod
    def _check_function(cls, v: str | None) -> str | None:
        return None if v is None else check_reference(v)

    @model_validator(mode="after")
    def _check_kind(self) -> AppSpec:
        if (self.function is None) == (self.argv is None):
            raise ValueError("give exactly one of 'function' (a Python app) or 'argv' (a command)")
        if self.mpi is not None and self.argv is None:
            raise ValueError("an MPI app needs 'argv' (the program and its arguments)")
        if self.argv is not None and not self.argv:
            raise ValueError("'argv' must name a program")
        if self.implementations and self.function is None:
            raise ValueError("'implementations' are alternative Python functions; this app has none")
        return self

    @property
    def kind(self) -> Literal["python", "shell", "mpi"]:
        """``python``, ``shell`` or ``mpi``."""
        if self.function is not None:
            return "python"
        return "mpi" if self.mpi is not None else "shell"

    @property
    def effective_retries(self) -> int:
        """Retries allowed by the policy: ``retry`` means at least one, ``cancel``/``fail`` none."""
        if self.on_failure is OnFailure.RETRY:
            return max(1, self.retries)
        if self.on_failure in (OnFailure.CANCEL_SUCCESSORS, OnFailure.FAIL):
            return 0
        return self.retries


def check_reference(ref: str) -> str:
    """Return ``ref`` if it looks like ``package.module:function``, else raise :class:`AppError`."""
    if not _REF_RE.match(ref):
        raise AppError(f"invalid code reference {ref!r}: write it as 'package.module:function'")
    return ref


def reference_of(func: Callable[..., Any]) -> str:
    """The ``module:qualname`` reference of a function."""
    return f"{func.__module__}:{func.__qualname__}"


def load_reference(ref: str) -> Any:
    """Import ``package.module:attr`` and return the attribute (raises :class:`AppError`)."""
    module_name, _, attr = check_reference(ref).partition(":")
    try:
        obj: Any = importlib.import_module(module_name)
    except ImportError as exc:
        raise AppError(
            f"cannot import {module_name!r} for {ref!r}: {exc}. Install it into the site's Python, "
            "or give the app an 'env' to run it in a packed environment"
        ) from exc
    for part in attr.split("."):
        try:
            obj = getattr(obj, part)
        except AttributeError:
            raise AppError(f"module {module_name!r} has no attribute {attr!r} (from {ref!r})") from None
    return obj


# ---- decorators ------------------------------------------------------------------
REGISTRY: dict[str, AppSpec] = {}


@overload
def app(func: F) -> F: ...


@overload
def app(
    func: None = None,
    *,
    name: str | None = None,
    cpus: int = 1,
    gpus: int = 0,
    gpu_model: str | None = None,
    memory_gb: float | None = None,
    walltime_s: float | None = None,
    timeout_s: float | None = None,
    retries: int = 0,
    on_failure: str | OnFailure = OnFailure.RETRY,
    requirements: list[str] | None = None,
) -> Callable[[F], F]: ...


def app(
    func: F | None = None,
    *,
    name: str | None = None,
    cpus: int = 1,
    gpus: int = 0,
    gpu_model: str | None = None,
    memory_gb: float | None = None,
    walltime_s: float | None = None,
    timeout_s: float | None = None,
    retries: int = 0,
    on_failure: str | OnFailure = OnFailure.RETRY,
    requirements: list[str] | None = None,
) -> F | Callable[[F], F]:
    """Declare a Python function as an app, with its resources and failure policy.

    Usable bare (``@app``) or with arguments (``@app(cpus=4, retries=2)``). The
    function stays a plain function; the declaration is kept in
    ``func.__rx_app__`` and in :data:`REGISTRY` under ``name`` (default: the
    function's name).
    """

    def wrap(f: F) -> F:
        spec = AppSpec(
            function=reference_of(f),
            cpus=cpus,
            gpus=gpus,
            gpu_model=gpu_model,
            memory_gb=memory_gb,
            walltime_s=walltime_s,
            timeout_s=timeout_s,
            retries=retries,
            on_failure=OnFailure(on_failure),
            env=EnvSpec(requirements=list(requirements)) if requirements else None,
        )
        f.__rx_app__ = spec  # type: ignore[attr-defined]  # the declaration rides on the function object
        REGISTRY[name or f.__name__] = spec
        return f

    return wrap(func) if func is not None else wrap


def implement(
    base: Callable[..., Any],
    *,
    gpus: int = 0,
    gpu_model: str | None = None,
    cpus: int | None = None,
    memory_gb: float | None = None,
) -> Callable[[F], F]:
    """Register the decorated function as an alternative implementation of ``base``.

    The site picks, per task, the implementation asking for the most GPUs that
    it can offer (so a GPU version wins where there is a GPU, the CPU version
    runs everywhere else).
    """
    spec: AppSpec | None = getattr(base, "__rx_app__", None)
    if spec is None:
        raise AppError(f"{reference_of(base)} is not an app: decorate it with @app first")

    def wrap(f: F) -> F:
        spec.implementations.append(
            Implementation(function=reference_of(f), gpus=gpus, gpu_model=gpu_model, cpus=cpus, memory_gb=memory_gb)
        )
        return f

    return wrap


# ---- resolution --------------------------------------------------------------------
def merge_with_decorator(spec: AppSpec, import_code: bool = True) -> AppSpec:
    """Fill fields not written in YAML from the function's ``@app`` declaration, if any.

    The function is imported (which also checks that it exists) unless the app
    runs in a packed environment, whose packages the site's Python may lack.
    """
    if spec.function is None or not import_code or (spec.env is not None and spec.env.pack):
        return spec
    func = load_reference(spec.function)
    if not callable(func):
        raise AppError(f"{spec.function!r} is not callable")
    declared: AppSpec | None = getattr(func, "__rx_app__", None)
    if declared is None:
        return spec
    merged = declared.model_dump()
    merged.update(spec.model_dump(include=spec.model_fields_set))
    if "implementations" not in spec.model_fields_set:
        merged["implementations"] = [i.model_dump() for i in declared.implementations]
    return AppSpec.model_validate(merged)


def choose_implementation(name: str, spec: AppSpec, offer: SiteResources) -> Implementation:
    """The implementation of ``spec`` to run at a site offering ``offer``.

    Candidates are the app's own function and its ``implementations``; the
    one asking for the most GPUs that the site can give wins.
    """
    main = Implementation.model_construct(
        function=spec.function or "",
        cpus=spec.cpus,
        gpus=spec.gpus,
        gpu_model=spec.gpu_model,
        memory_gb=spec.memory_gb,
    )
    candidates = sorted([main, *spec.implementations], key=lambda i: -i.gpus)
    refused = []
    for impl in candidates:
        why = _does_not_fit(impl, spec, offer)
        if why is None:
            return impl
        refused.append(f"{impl.function}: {why}")
    raise AppError(f"no implementation of app {name!r} fits this site: " + "; ".join(refused))


def _does_not_fit(impl: Implementation, spec: AppSpec, offer: SiteResources) -> str | None:
    cpus = impl.cpus or spec.cpus
    if impl.gpus > offer.gpus:
        return f"needs {impl.gpus} GPU(s), site offers {offer.gpus}"
    if impl.gpus and impl.gpu_model and offer.gpu_model != impl.gpu_model:
        return f"needs GPU model {impl.gpu_model}, site has {offer.gpu_model or 'none named'}"
    if cpus > offer.cpus:
        return f"needs {cpus} CPUs, site offers {offer.cpus}"
    mem = impl.memory_gb or spec.memory_gb
    if mem and offer.memory_gb and mem > offer.memory_gb:
        return f"needs {mem} GB memory, site offers {offer.memory_gb}"
    return None


def render_argv(template: list[str], args: dict[str, Any]) -> list[str]:
    """Fill ``{name}`` placeholders from ``args``; no format mini-language, no attribute access.

    Raises :class:`AppError` naming any placeholder the request did not supply.
    """
    missing: list[str] = []

    def sub(m: re.Match[str]) -> str:
        key = m.group(1)
        if key not in args:
            missing.append(key)
            return m.group(0)
        return str(args[key])

    out = [_PLACEHOLDER_RE.sub(sub, part) for part in template]
    if missing:
        raise AppError(
            f"command template needs argument(s) {sorted(set(missing))} that the request does not give "
            f"(it gave {sorted(args)})"
        )
    return out


def mpi_argv(mpi: MpiSpec, argv: list[str]) -> list[str]:
    """The launcher command line for an MPI app, run inside the allocation that holds its ranks.

    ``srun`` makes a job step of that allocation (inside a pilot the worker sets
    ``SLURM_OVERLAP=1``, so the step may share the cores the pilot's worker step
    holds: the site reserved them for these ranks). ``mpirun`` is Open MPI's
    (``--npernode``), ``mpiexec`` MPICH/Hydra's (``-ppn``).
    """
    if mpi.launcher == "srun":
        per_node = [f"--ntasks-per-node={mpi.ranks_per_node}"] if mpi.ranks_per_node else []
        return ["srun", f"--ntasks={mpi.ranks}", *per_node, *mpi.launcher_args, *argv]
    if mpi.ranks_per_node:
        flag = "--npernode" if mpi.launcher == "mpirun" else "-ppn"
        return [mpi.launcher, "-n", str(mpi.ranks), flag, str(mpi.ranks_per_node), *mpi.launcher_args, *argv]
    return [mpi.launcher, "-n", str(mpi.ranks), *mpi.launcher_args, *argv]
