"""``reflexarc deadletters list|show|replay``: inspect the dead-letter topic and send letters back once fixed.

Every tier dead-letters what it cannot take, with the reason (``rx-error``)
and the stage that refused it (``rx-stage``). ``list`` shows them, ``show``
prints chosen ones whole (headers, key, payload), and ``replay`` sends chosen
ones back to the Kafka topic they were consumed from, unchanged: their
CloudEvent ids are kept, so a consumer that already took one drops it.
"""

from __future__ import annotations

import asyncio
import base64
import json
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer

if TYPE_CHECKING:  # the Kafka client is imported when a command runs, not by every `reflexarc` call
    from reflexarc.clientconfig import ClientConfig
    from reflexarc.deadletters import StoredLetter

app = typer.Typer(help="Inspect dead letters and replay them once their cause is fixed.", no_args_is_help=True)

ConfigOpt = Annotated[
    Path | None,
    typer.Option(
        "--config",
        "-c",
        metavar="FILE",
        dir_okay=False,
        help="YAML with kafka: (TLS, SASL) and namespace:, as a tier's (default: RX_KAFKA_*, RX_NAMESPACE)",
    ),
]
BootstrapOpt = Annotated[str | None, typer.Option(help="Kafka bootstrap servers (overrides the file)")]
NamespaceOpt = Annotated[str | None, typer.Option(help="topic namespace (overrides the file)")]
StageOpt = Annotated[str | None, typer.Option(help="only letters whose stage matches this glob (triggers.*)")]
TimeoutOpt = Annotated[float, typer.Option(help="seconds to read the dead-letter topic to its end")]


def _letters(
    config: Path | None, bootstrap: str | None, namespace: str | None, timeout: float
) -> tuple[ClientConfig, list[StoredLetter]]:
    from reflexarc.clientconfig import load_client_config
    from reflexarc.deadletters import DeadLettersError, read_letters

    cfg = load_client_config(config, bootstrap, namespace)
    try:
        return cfg, asyncio.run(read_letters(cfg.kafka, cfg.topics().kafka_deadletter, timeout))
    except DeadLettersError as exc:
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(1) from None


def _text(data: bytes | None) -> str | None:
    if data is None:
        return None
    try:
        return data.decode()
    except UnicodeDecodeError:
        return "base64:" + base64.b64encode(data).decode()


def _summary(s: StoredLetter) -> dict[str, Any]:
    dl = s.letter
    return {
        "id": s.id,
        "time": dl.time.isoformat(),
        "stage": dl.stage,
        "origin": dl.origin,
        "error": dl.error,
        "replayable": s.replayable,
    }


def _whole(s: StoredLetter) -> dict[str, Any]:
    dl = s.letter
    return {
        **_summary(s),
        "topic": dl.topic,
        "key": _text(dl.key),
        "payload": _text(dl.payload),
        "headers": [[k, _text(v)] for k, v in dl.extra_headers],
    }


@app.command("list")
def list_letters(
    config: ConfigOpt = None,
    bootstrap: BootstrapOpt = None,
    namespace: NamespaceOpt = None,
    stage: StageOpt = None,
    as_json: Annotated[bool, typer.Option("--json", help="one JSON object per line")] = False,
    timeout: TimeoutOpt = 30.0,
) -> None:
    """Every dead letter: id (PARTITION:OFFSET), time, stage, origin and the reason."""
    from reflexarc.deadletters import select

    _, letters = _letters(config, bootstrap, namespace, timeout)
    if stage is not None:
        letters = select(letters, stage=stage)
    for s in letters:
        if as_json:
            typer.echo(json.dumps(_summary(s)))
        else:
            mark = "" if s.replayable else "  (not replayable)"
            typer.echo(
                f"{s.id:>10}  {s.letter.time:%Y-%m-%dT%H:%M:%S}  {s.letter.stage:<24} "
                f"{s.letter.origin}  {s.letter.error}{mark}"
            )
    if not as_json:
        typer.echo(f"{len(letters)} dead letter(s)", err=True)


@app.command()
def show(
    ids: Annotated[list[str], typer.Argument(metavar="ID", help="PARTITION:OFFSET, as `list` prints")],
    config: ConfigOpt = None,
    bootstrap: BootstrapOpt = None,
    namespace: NamespaceOpt = None,
    timeout: TimeoutOpt = 30.0,
) -> None:
    """Chosen dead letters whole, as JSON: headers, key and payload (text, or base64: when binary)."""
    from reflexarc.deadletters import DeadLettersError, select

    _, letters = _letters(config, bootstrap, namespace, timeout)
    try:
        chosen = select(letters, ids)
    except DeadLettersError as exc:
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(1) from None
    for s in chosen:
        typer.echo(json.dumps(_whole(s), indent=2))


@app.command("replay")
def replay_letters(
    ids: Annotated[list[str] | None, typer.Argument(metavar="ID", help="PARTITION:OFFSET, as `list` prints")] = None,
    stage: StageOpt = None,
    config: ConfigOpt = None,
    bootstrap: BootstrapOpt = None,
    namespace: NamespaceOpt = None,
    timeout: TimeoutOpt = 30.0,
) -> None:
    """Send chosen dead letters back to the topic they were consumed from, unchanged (same event ids).

    Fix the cause first (a trigger, an app, a site's configuration): the
    consumer then takes the event as if it came the first time; one it has
    already taken is dropped as a duplicate. The letters stay in the
    dead-letter topic (it is a log); `list` still shows them.
    """
    from reflexarc.deadletters import DeadLettersError, replay, select

    if not ids and stage is None:
        raise typer.BadParameter("name the letters (ID...) or a --stage glob", param_hint="ID")
    cfg, letters = _letters(config, bootstrap, namespace, timeout)
    try:
        chosen = select(letters, ids or (), stage)
        sent = asyncio.run(replay(cfg.kafka, chosen))
    except DeadLettersError as exc:
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(1) from None
    for s, where in sent:
        typer.echo(f"replayed {s.id} ({s.letter.stage}) -> {where}")
    typer.echo(f"{len(sent)} dead letter(s) replayed", err=True)
