"""How every check verb ends (``triggers validate``, ``fog check``, ``site check``, ``edge check``).

One convention for all of them, so scripts and CI can rely on it:

* exit 0: the file is fine (one summary line on stdout);
* exit 1: problems were found - every one of them is listed, one a line, ``file:line:col: field: message``;
* exit 2: the check could not run (usage error, unreadable file): one ``error:`` line
  (raised through the CLI's error boundary, :mod:`reflexarc.errors`).

``--json`` prints one object instead: ``{"file", "ok", "problems": [{file, line, column, field, message}], ...}``.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any, NoReturn

import typer
import yaml

from reflexarc.config import ConfigError, Problem, parse_yaml_text

Marks = dict[tuple[Any, ...], yaml.Mark]

#: The check verbs' exit codes.
OK, PROBLEMS, CANNOT_CHECK = 0, 1, 2


def problem_json(p: Problem) -> dict[str, Any]:
    """One problem as a JSON object."""
    return {"file": p.file, "line": p.line, "column": p.column, "field": p.field, "message": p.message}


def require_file(path: Path) -> None:
    """Exit 2 with one line when ``path`` is not a readable file (the check cannot run)."""
    if not path.is_file():
        raise FileNotFoundError(2, "No such file", str(path))  # the error boundary words it and exits 2


def load_checked(file: Path, loader: Callable[[Path], Any], as_json: bool) -> tuple[Any, Marks]:
    """The file loaded by ``loader`` and the YAML position of every field; its schema problems end the check (exit 1).

    A file that cannot be read ends it with exit 2 (through the CLI's error boundary).
    """
    require_file(file)
    try:
        cfg = loader(file)
    except ConfigError as exc:
        finish(file, exc.problems, "", as_json)
    _data, marks = parse_yaml_text(file.read_text(), str(file))
    return cfg, marks


def problem_at(file: Path, marks: Marks, path: tuple[Any, ...], field: str, message: str) -> Problem:
    """A problem placed at ``path`` in the file (or at its nearest parent that is written there)."""
    mark = next((marks[path[:n]] for n in range(len(path), -1, -1) if path[:n] in marks), None)
    return Problem(str(file), mark.line + 1 if mark else None, mark.column + 1 if mark else None, field, message)


def finish(file: Path, problems: Iterable[Problem], ok_line: str, as_json: bool = False, **extra: Any) -> NoReturn:
    """Print the outcome of a check and exit 0 (no problems) or 1 (problems, all of them listed)."""
    found = sorted(problems, key=lambda p: (p.file, p.line or 0, p.column or 0))
    if as_json:
        typer.echo(
            json.dumps({"file": str(file), "ok": not found, "problems": [problem_json(p) for p in found], **extra})
        )
        raise typer.Exit(PROBLEMS if found else OK)
    if not found:
        typer.echo(ok_line)
        raise typer.Exit(OK)
    for p in found:
        typer.echo(str(p), err=True)
    n = len(found)
    typer.echo(f"{file}: {n} problem{'s' if n != 1 else ''}", err=True)
    raise typer.Exit(PROBLEMS)
