"""Fail if a ``type: ignore`` in the packages lacks an error code or a reason.

The project's form is ``...  # type: ignore[code]  # why mypy is wrong here``.
mypy itself refuses an ignore without a code (``ignore-without-code``) and
reports those that became unnecessary (``warn_unused_ignores``); a reason is
for the reader, so only this check can ask for one.
"""

from __future__ import annotations

import re
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = ("reflexarc", "edge", "fog", "cloud", "hpc_bridge", "deploy")
_IGNORE = re.compile(r"#\s*type:\s*ignore(?P<code>\[[^\]]+\])?(?P<rest>.*)$")


def problems() -> list[str]:
    """``path:line: what is missing`` for every bad ``type: ignore``."""
    found: list[str] = []
    for package in PACKAGES:
        for path in sorted((ROOT / package).rglob("*.py")):
            for n, line in enumerate(path.read_text().splitlines(), 1):
                m = _IGNORE.search(line)
                if m is None:
                    continue
                where = f"{path.relative_to(ROOT)}:{n}"
                if not m["code"]:
                    found.append(f"{where}: type: ignore without an error code")
                elif not re.match(r"\s*#\s*\S", m["rest"]):
                    found.append(f"{where}: type: ignore{m['code']} without a reason (add '  # why')")
    return found


def main() -> int:
    """Print the problems; exit 1 if there are any."""
    found = problems()
    for p in found:
        print(p)
    print(f"type: ignore check: {len(found)} problem(s)")
    return 1 if found else 0


if __name__ == "__main__":
    sys.exit(main())
