"""``reflexarc edge check FILE``: every problem of an agent file in one run, without connecting.

Checks what the agent would refuse at start-up: the schema (with each source
against its plugin), Python handlers that cannot be imported, key and TLS files
that do not exist, and actuators that would accept commands with no key to
verify them. Exit codes as every check verb (:mod:`reflexarc.checkcli`).
"""

from __future__ import annotations

import importlib
import os
from pathlib import Path
from typing import Annotated, Any

import typer


def check(
    config: Annotated[Path, typer.Argument(metavar="FILE", help="agent.yaml")],
    as_json: Annotated[bool, typer.Option("--json", help="print one JSON object (ok, problems)")] = False,
) -> None:
    """Validate agent.yaml (schema, sources, handlers, key and TLS files) without connecting.

    Lists every problem in one run. Exit 0: OK; 1: problems found; 2: the file cannot be read.
    """
    # Imported here: the main CLI imports this module at start-up.
    from reflexarc.checkcli import finish, load_checked, problem_at
    from reflexarc.config import Problem
    from reflexarc.edge.config import ArgvHandler, PythonHandler, load_agent_config

    cfg, marks = load_checked(config, load_agent_config, as_json)
    problems: list[Problem] = []

    def problem(path: tuple[Any, ...], field: str, message: str) -> None:
        problems.append(problem_at(config, marks, path, field, message))

    for i, act in enumerate(cfg.actuators):
        where = ("actuators", i, "handler")
        if isinstance(act.handler, PythonHandler):
            module, _, func = act.handler.python.partition(":")
            try:
                if not callable(getattr(importlib.import_module(module), func, None)):
                    problem((*where, "python"), f"actuators[{i}].handler.python", f"{module} has no function {func!r}")
            except ImportError as exc:
                problem((*where, "python"), f"actuators[{i}].handler.python", f"cannot import {module!r}: {exc}")
        elif isinstance(act.handler, ArgvHandler) and act.handler.cwd and not cfg.resolve(act.handler.cwd).is_dir():
            problem((*where, "cwd"), f"actuators[{i}].handler.cwd", f"no such directory {cfg.resolve(act.handler.cwd)}")
    env_keys = [k.strip() for k in os.environ.get("RX_VERIFY_KEYS", "").split(",") if k.strip()]
    for i, key in enumerate(cfg.commands.verify_keys):
        if not cfg.resolve(key).is_file():
            problem(
                ("commands", "verify_keys", i), f"commands.verify_keys[{i}]", f"no such key file {cfg.resolve(key)}"
            )
    for key in env_keys:
        if not Path(key).is_file():
            problem((), "RX_VERIFY_KEYS", f"no such key file {key}")
    if cfg.actuators and cfg.commands.require_signed and not (cfg.commands.verify_keys or env_keys):
        problem(
            ("actuators",),
            "commands.verify_keys",
            "actuators accept only signed commands and no public key is configured, so every command "
            "would be refused: list the pipeline's .pub under commands.verify_keys or set RX_VERIFY_KEYS",
        )
    tls = cfg.mqtt.tls
    for name in ("ca_file", "cert_file", "key_file"):
        value = getattr(tls, name) if tls else None
        if value and not cfg.resolve(value).is_file():
            problem(("mqtt", "tls", name), f"mqtt.tls.{name}", f"no such file {cfg.resolve(value)}")
    finish(
        config,
        problems,
        f"{config}: OK — device {cfg.site}/{cfg.device}, MQTT {cfg.mqtt.host}:{cfg.mqtt.port}, "
        f"{len(cfg.sources)} source(s), {len(cfg.actuators)} actuator(s)",
        as_json,
        site=cfg.site,
        device=cfg.device,
    )
