"""``reflexarc schema KIND``: print the JSON Schema of a file kind (see :mod:`reflexarc.schemas`)."""

from __future__ import annotations

from enum import StrEnum
from pathlib import Path
from typing import Annotated

import typer


class Kind(StrEnum):
    """The file kinds; kept in step with reflexarc.schemas.KINDS (a test checks it) so `--help` imports no tier."""

    triggers = "triggers"
    agent = "agent"
    fog = "fog"
    site = "site"
    pipeline = "pipeline"
    fleet = "fleet"
    pools = "pools"


def schema(
    kind: Annotated[Kind, typer.Argument(metavar="KIND", help="file kind: " + ", ".join(k.value for k in Kind))],
    output: Annotated[
        Path | None, typer.Option("--output", "-o", metavar="FILE", help="write here instead of stdout")
    ] = None,
) -> None:
    """Print the JSON Schema of a file kind, for editors and CI.

    Point an editor at it with a first line like
    [bold]# yaml-language-server: $schema=./schemas/triggers.json[/]
    """
    from reflexarc.schemas import schema_text

    text = schema_text(kind.value)
    if output is None:
        typer.echo(text)
    else:
        output.write_text(text + "\n")
        typer.echo(f"wrote {output}", err=True)
