"""Where reflexarc keeps files of its own on this machine."""

from __future__ import annotations

import os
from pathlib import Path


def cache_dir() -> Path:
    """Where built artefacts are cached: ``$RX_CACHE_DIR`` or ``~/.cache/reflexarc``.

    Everything under it can be rebuilt (wheels of an agent image, debootstrap'd
    base images), so deleting it only costs time.
    """
    return Path(os.environ.get("RX_CACHE_DIR") or Path.home() / ".cache" / "reflexarc")
