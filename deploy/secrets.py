"""Read the secrets a device's container gets, from the deployer's environment or files.

Values exist only in memory and in the container's environment (set at
create); they are never written to the fleet file, the agent.yaml, the image
or the deploy output.
"""

from __future__ import annotations

import os
from pathlib import Path

from reflexarc.deploy.fleet import SecretRef


class SecretError(ValueError):
    """A secret could not be read; the message says which and how to provide it."""


def read_secret(name: str, ref: SecretRef) -> str:
    """The value of one secret."""
    if ref.env is not None:
        value = os.environ.get(ref.env)
        if value is None:
            raise SecretError(f"secret {name} is read from ${ref.env}, which is not set: export it before deploying")
        return value
    assert ref.file is not None
    try:
        return Path(ref.file).read_text().rstrip("\r\n")
    except OSError as exc:
        raise SecretError(f"secret {name} is read from {ref.file}: {exc.strerror}") from None


def read_secrets(refs: dict[str, SecretRef]) -> dict[str, str]:
    """Every secret of a device, by environment variable name."""
    return {name: read_secret(name, ref) for name, ref in refs.items()}
