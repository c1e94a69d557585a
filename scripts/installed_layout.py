"""Run a tool that finds modules by walking folders over the package layout as it is installed.

    python scripts/installed_layout.py mypy -p reflexarc --config-file "$PWD/pyproject.toml"
    python scripts/installed_layout.py lint-imports "$PWD/pyproject.toml"

setup.py installs ``edge/`` as ``reflexarc.edge``, ``fog/`` as ``reflexarc.fog``
and so on. Python's import system follows that mapping, but mypy and
import-linter (grimp) look for ``reflexarc/edge/`` on disk and would not see
the tiers at all. This script lays out ``build/layout/reflexarc/``: a folder of
symbolic links, one to each entry of ``reflexarc/`` and one per tier folder
under its installed name, rebuilt on every run so new modules are never
missed. The tool then runs from ``build/layout`` with that folder first on
``PYTHONPATH``, and paths in its output are turned back into checkout paths
(``reflexarc/edge/agent.py`` -> ``edge/agent.py``).

The tool runs in ``build/layout``: give it absolute paths (the Makefile passes
``$(CURDIR)/pyproject.toml``).
"""

from __future__ import annotations

import ast
import contextlib
import os
import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
LAYOUT = ROOT / "build" / "layout"


def tiers() -> dict[str, str]:
    """``{installed name: folder}`` of the tiers, read from setup.py's ``TIERS`` (the one place that maps them)."""
    tree = ast.parse((ROOT / "setup.py").read_text())
    for node in tree.body:
        if isinstance(node, ast.Assign) and any(isinstance(t, ast.Name) and t.id == "TIERS" for t in node.targets):
            return dict(ast.literal_eval(node.value))
    raise SystemExit("setup.py defines no TIERS mapping")


def _link(link: Path, target: Path) -> None:
    want = os.path.relpath(target, link.parent)
    if link.is_symlink() and os.readlink(link) == want:
        return
    if link.is_symlink() or link.exists():
        link.unlink()
    # Another `make check` in the same checkout may have made it meanwhile.
    with contextlib.suppress(FileExistsError):
        link.symlink_to(want)


def build_layout() -> Path:
    """Create or refresh ``build/layout/reflexarc``; return ``build/layout``."""
    pkg = LAYOUT / "reflexarc"
    pkg.mkdir(parents=True, exist_ok=True)
    wanted: dict[str, Path] = {
        entry.name: entry for entry in (ROOT / "reflexarc").iterdir() if entry.name != "__pycache__"
    }
    for name, folder in tiers().items():
        wanted[name] = ROOT / folder
    for entry in pkg.iterdir():
        if entry.name not in wanted:
            entry.unlink()
    for name, target in wanted.items():
        _link(pkg / name, target)
    return LAYOUT


def main(argv: list[str]) -> int:
    """Run ``argv`` (a tool and its arguments) over the installed layout; its exit status is ours."""
    if not argv:
        raise SystemExit(__doc__)
    layout = build_layout()
    tool = argv[0]
    exe = Path(sys.executable).parent / tool
    cmd = [str(exe) if exe.exists() else tool, *argv[1:]]
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(layout), env.get("PYTHONPATH", "")) if p)
    proc = subprocess.run(cmd, cwd=layout, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    # Installed module paths back to checkout paths, longest tier name first (none is a prefix of another today).
    back = [(re.compile(rf"(?<![\w/.])reflexarc/{name}/"), f"{folder}/") for name, folder in tiers().items()]
    for line in proc.stdout.splitlines():
        for pattern, folder in back:
            line = pattern.sub(folder, line)
        print(line)
    return proc.returncode


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
