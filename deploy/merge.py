"""Deep merge of configuration layers (base, labels, device)."""

from __future__ import annotations

import copy
from collections.abc import Mapping
from typing import Any


def deep_merge(base: Mapping[str, Any], override: Mapping[str, Any]) -> dict[str, Any]:
    """``base`` with ``override`` on top: mappings merge recursively, anything else is replaced.

    Lists are replaced, not concatenated: a layer that lists sources means
    "these sources", and there is no way to remove an inherited list item
    otherwise. ``None`` in ``override`` deletes the key (``mqtt: null`` drops
    an inherited block). Neither argument is modified.
    """
    out = copy.deepcopy(dict(base))
    for key, value in override.items():
        if value is None:
            out.pop(key, None)
        elif isinstance(value, Mapping) and isinstance(out.get(key), Mapping):
            out[key] = deep_merge(out[key], value)
        else:
            out[key] = copy.deepcopy(value)
    return out
