"""Example apps for detector frames passed by reference (see docs/data.md).

Declared in ``site.yaml`` with the frame argument staged in::

    apps:
      frame_stats:
        function: reflexarc.hpc_bridge.examples.frames:frame_stats
        refs: {frame: {stage: download}}
"""

from __future__ import annotations

import hashlib
import os
from typing import Any


def frame_stats(frame: str, profile: bool = False, **_: Any) -> dict[str, Any]:
    """Statistics of one ``.npy`` frame at the local path ``frame`` (its sha256 too, to check what was read).

    ``profile``: also the mean of each row (a larger result, which the site may pass on by reference).
    """
    import numpy as np

    array = np.load(frame, allow_pickle=False)
    extra = {"profile": array.reshape(array.shape[0], -1).mean(axis=1).tolist()} if profile else {}
    return {
        **extra,
        "mean": float(array.mean()),
        "max": float(array.max()),
        "shape": list(array.shape),
        "dtype": str(array.dtype),
        "sha256": hashlib.sha256(array.tobytes()).hexdigest(),
        "path": os.path.abspath(frame),
    }


def url_of(frame: str) -> dict[str, Any]:
    """Return what the app was given (a ``stage: pass`` argument is the URL)."""
    return {"frame": frame}
