"""Actuators: signed commands in, exactly one ack/nack per command id out.

A command is checked before anything runs: it must parse as a
:class:`~reflexarc.events.Command` addressed to this device, carry a valid
pipeline signature (Ed25519, unless ``require_signed: false``), be fresh, be
new (not a replay of an answered id), name a declared actuator and carry args
that satisfy that actuator's JSON Schema. Any failure is answered with a nack
whose ``reason`` says which check failed; the handler never runs.

Exactly-once answers: the answer is stored in the spool database before it is
published, and the MQTT command message is acknowledged only after the
broker took the answer. A redelivered command (same id and signature, not
yet acknowledged) gets the stored answer again (same event id, so consumers
deduplicate). A handler that was running when the agent died is not re-run
(at-most-once execution); its command is answered "interrupted".
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import inspect
import json
import logging
import re
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime
from importlib import import_module
from typing import Any

from jsonschema import Draft202012Validator

from reflexarc.edge.config import ActuatorSettings, AgentConfig, ArgvHandler, PythonHandler
from reflexarc.edge.epics_actuator import EpicsActuator, EpicsCommandError, EpicsHandler
from reflexarc.edge.metrics import EdgeMetrics
from reflexarc.edge.spool import AsyncSpool
from reflexarc.envelope import Envelope, EnvelopeError, EventType, utcnow
from reflexarc.events import Command, CommandAck, stable_id
from reflexarc.mqtt import MqttClient, MqttMessage
from reflexarc.signing import SIG_ATTR, SignatureError, verify_envelope
from reflexarc.topics import TopicError, Topics

log = logging.getLogger(__name__)

_PLACEHOLDER = re.compile(r"\{([A-Za-z_][A-Za-z0-9_]*)\}")
_OUTPUT_LIMIT = 4096


class HandlerError(RuntimeError):
    """A handler failed; the text is the nack reason."""


def load_python_handler(ref: str) -> Callable[..., Any]:
    """Import ``module:function``; a clear error if it is not there."""
    module_name, _, attr = ref.partition(":")
    try:
        module = import_module(module_name)
    except ImportError as exc:
        raise ValueError(f"handler {ref!r}: cannot import {module_name!r}: {exc}") from None
    func = module
    for part in attr.split("."):
        func = getattr(func, part, None)  # type: ignore[assignment]  # walks module attributes; checked callable below
        if func is None:
            raise ValueError(f"handler {ref!r}: {module_name!r} has no {attr!r}")
    if not callable(func):
        raise ValueError(f"handler {ref!r} is not callable")
    return func


def _argv_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, dict | list) or value is None:
        return json.dumps(value)
    return str(value)


def render_argv(argv: list[str], args: dict[str, Any]) -> list[str]:
    """Fill ``{name}`` placeholders from args; each element stays one argument (no shell)."""

    def sub(m: re.Match[str]) -> str:
        name = m.group(1)
        if name not in args:
            raise HandlerError(f"argv needs {{{name}}} but the command has no arg {name!r}")
        return _argv_value(args[name])

    return [_PLACEHOLDER.sub(sub, item) for item in argv]


@dataclass
class Actuator:
    """A declared actuator, ready to run."""

    settings: ActuatorSettings
    validator: Draft202012Validator
    func: Callable[..., Any] | None
    lock: asyncio.Lock
    epics: EpicsActuator | None = None

    @classmethod
    def build(cls, settings: ActuatorSettings) -> Actuator:
        """Compile the schema and import the handler (fail at start, not at the first command)."""
        func = None
        epics = None
        if isinstance(settings.handler, PythonHandler):
            func = load_python_handler(settings.handler.python)
        elif isinstance(settings.handler, EpicsHandler):
            epics = EpicsActuator(settings.handler.epics)
        return cls(settings, Draft202012Validator(settings.args_schema), func, asyncio.Lock(), epics)

    def check_args(self, args: dict[str, Any]) -> None:
        """Raise :class:`HandlerError` naming the first schema violation."""
        errors = sorted(self.validator.iter_errors(args), key=lambda e: list(e.absolute_path))
        if errors:
            err = errors[0]
            where = "/".join(str(p) for p in err.absolute_path) or "(args)"
            raise HandlerError(f"invalid args for actuator {self.settings.name!r}: {where}: {err.message}")

    async def run(self, args: dict[str, Any], cwd: str) -> dict[str, Any] | None:
        """Run the handler with a timeout; return its JSON result."""
        timeout = self.settings.timeout_s
        handler = self.settings.handler
        if isinstance(handler, EpicsHandler):
            assert self.epics is not None
            try:
                return await asyncio.wait_for(self.epics.run(args), timeout)
            except TimeoutError:
                raise HandlerError(f"handler timed out after {timeout:g}s") from None
            except EpicsCommandError as exc:
                raise HandlerError(str(exc)) from None
        if isinstance(handler, PythonHandler):
            assert self.func is not None
            try:
                if inspect.iscoroutinefunction(self.func):
                    result = await asyncio.wait_for(self.func(**args), timeout)
                else:
                    # Handlers may block (drive hardware): keep them off the event loop.
                    result = await asyncio.wait_for(asyncio.to_thread(self.func, **args), timeout)
            except TimeoutError:
                raise HandlerError(f"handler timed out after {timeout:g}s") from None
            except Exception as exc:
                raise HandlerError(f"handler raised {type(exc).__name__}: {exc}") from None
            if result is None:
                return None
            if not isinstance(result, dict):
                result = {"value": result}
            plain: dict[str, Any] = json.loads(json.dumps(result, default=str))
            return plain
        return await self._run_argv(handler, args, timeout, cwd)

    async def _run_argv(self, handler: ArgvHandler, args: dict[str, Any], timeout: float, cwd: str) -> dict[str, Any]:
        argv = render_argv(handler.argv, args)
        try:
            proc = await asyncio.create_subprocess_exec(
                *argv,
                stdin=asyncio.subprocess.PIPE if handler.stdin_json else asyncio.subprocess.DEVNULL,
                stdout=asyncio.subprocess.PIPE,
                stderr=asyncio.subprocess.PIPE,
                cwd=handler.cwd or cwd,
            )
        except OSError as exc:
            raise HandlerError(f"cannot run {argv[0]!r}: {exc.strerror}") from None
        stdin = json.dumps(args).encode() if handler.stdin_json else None
        try:
            out, err = await asyncio.wait_for(proc.communicate(stdin), timeout)
        except TimeoutError:
            with contextlib.suppress(ProcessLookupError):
                proc.kill()
            await proc.wait()
            raise HandlerError(f"{argv[0]} timed out after {timeout:g}s and was killed") from None
        result: dict[str, Any] = {
            "returncode": proc.returncode,
            "stdout": out.decode(errors="replace")[-_OUTPUT_LIMIT:],
            "stderr": err.decode(errors="replace")[-_OUTPUT_LIMIT:],
        }
        with contextlib.suppress(ValueError):
            parsed = json.loads(out)
            if isinstance(parsed, dict):
                result["output"] = parsed
        if proc.returncode != 0:
            raise HandlerError(
                f"{argv[0]} exited with code {proc.returncode}: {result['stderr'].strip()[-300:]}",
            )
        return result


class Rejected(Exception):
    """A command was refused before running; ``reason`` goes into the nack."""

    def __init__(self, kind: str, reason: str, command_id: str, actuator: str | None = None) -> None:
        super().__init__(reason)
        self.kind = kind
        self.reason = reason
        self.command_id = command_id
        self.actuator = actuator


class CommandProcessor:
    """Receives commands for one device, runs them, answers each exactly once."""

    def __init__(
        self,
        cfg: AgentConfig,
        client: MqttClient,
        spool: AsyncSpool,
        metrics: EdgeMetrics,
        verify_keys: list[Any],
    ) -> None:
        self.cfg = cfg
        self.client = client
        self.spool = spool
        self.metrics = metrics
        self.keys = verify_keys
        self.topics: Topics = cfg.topics()
        self.actuators = {a.name: Actuator.build(a) for a in cfg.actuators}
        self._tasks: set[asyncio.Task[None]] = set()
        # Commands held unacknowledged at once: the client's Receive Maximum also leaves room for receipts.
        self._slots = asyncio.Semaphore(cfg.commands.receive_maximum)
        self.last: dict[str, Any] | None = None  # last answer, for status

    def submit(self, msg: MqttMessage) -> None:
        """Take one command message (in arrival order); it is handled in its own task."""
        task = asyncio.create_task(self._handle_in_slot(msg))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _handle_in_slot(self, msg: MqttMessage) -> None:
        # Semaphore waiters are served in order, so commands keep their arrival order.
        async with self._slots:
            await self.handle(msg)

    async def drain(self, timeout: float) -> None:
        """Wait for running commands to finish (at shutdown)."""
        if self._tasks:
            await asyncio.wait(list(self._tasks), timeout=timeout)

    # ---- one command ----------------------------------------------------------
    async def handle(self, msg: MqttMessage) -> None:
        """Check, run and answer one command message; ack it only once the answer is out."""
        try:
            env, cmd = self._parse(msg)
        except Rejected as rej:
            await self._answer_rejection(msg, rej, None)
            return
        actuator = self.actuators.get(cmd.actuator)
        lock = actuator.lock if actuator else asyncio.Lock()
        async with lock:  # one command at a time per actuator, in arrival order
            await self._handle_command(msg, env, cmd, actuator)

    def _parse(self, msg: MqttMessage) -> tuple[Envelope, Command]:
        digest = hashlib.sha256(msg.payload).hexdigest()
        fallback_id = f"malformed-{stable_id(msg.topic, digest)[:16]}"
        try:
            topic = self.topics.parse_mqtt(msg.topic)
            env = Envelope.from_mqtt(msg.payload, msg.user_properties, msg.content_type, topic)
        except (EnvelopeError, TopicError) as exc:
            raise Rejected("malformed", f"malformed: {exc}", fallback_id) from None
        if env.type != EventType.COMMAND.value:
            raise Rejected(
                "malformed",
                f"malformed: expected a {EventType.COMMAND.value} event, got {env.type}",
                env.id or fallback_id,
            )
        try:
            cmd = Command.from_envelope(env)
        except EnvelopeError as exc:
            raise Rejected("malformed", f"malformed: {exc}", env.id or fallback_id) from None
        return env, cmd

    async def _handle_command(self, msg: MqttMessage, env: Envelope, cmd: Command, actuator: Actuator | None) -> None:
        sig = env.extensions.get(SIG_ATTR)
        seen = await self.spool.call(self.spool.spool.command, cmd.command_id)  # type: ignore[union-attr]  # open while commands run
        if seen is not None:
            state, seen_sig, answer = seen
            if state == "done" or sig != seen_sig:
                # We acknowledged this id already: the broker will not redeliver it, so this
                # is a replay. Nack it under a distinct event id: the real answer stands.
                self.metrics.commands_rejected.labels("replayed").inc()
                reason = f"replayed: command {cmd.command_id} was already answered; the handler was not run"
                nack = self._ack(cmd.command_id, cmd.actuator, ok=False, reason=reason)
                digest = hashlib.sha256(msg.payload).hexdigest()[:12]
                await self._publish(nack.to_envelope().with_(id=f"{cmd.command_id}.ack.replay-{digest}"))
                self.client.ack(msg)
                log.warning("%s", reason)
                return
            if state == "running":
                # The agent died while the handler ran: never run it twice.
                self.metrics.commands_failed.labels(cmd.actuator).inc()
                ack = self._ack(
                    cmd.command_id,
                    cmd.actuator,
                    ok=False,
                    reason="interrupted: the agent restarted while the handler ran; not re-run",
                )
                await self._finish(msg, ack, sig)
                return
            # "answered": stored but maybe not delivered, the broker redelivers it.
            self.metrics.commands_duplicate.inc()
            if answer is not None:
                await self._publish(Envelope.from_json(answer))
            self.client.ack(msg)
            await self._set(cmd.command_id, "done", sig, None)
            return
        try:
            self._check(env, cmd, actuator)
        except Rejected as rej:
            await self._answer_rejection(msg, rej, sig)
            return
        assert actuator is not None
        await self._set(cmd.command_id, "running", sig, None)
        try:
            result = await actuator.run(cmd.args, self.cfg.base_dir)
        except HandlerError as exc:
            self.metrics.commands_failed.labels(cmd.actuator).inc()
            log.warning("command %s on %s failed: %s", cmd.command_id, cmd.actuator, exc)
            ack = self._ack(cmd.command_id, cmd.actuator, ok=False, reason=str(exc))
        else:
            self.metrics.commands_ok.labels(cmd.actuator).inc()
            self.metrics.observe_loop(cmd)
            ack = self._ack(cmd.command_id, cmd.actuator, ok=True, result=result)
        await self._finish(msg, ack, sig)

    def _check(self, env: Envelope, cmd: Command, actuator: Actuator | None) -> None:
        cid, act = cmd.command_id, cmd.actuator
        if cmd.site != self.cfg.site or cmd.device != self.cfg.device:
            raise Rejected("misaddressed", f"misaddressed: command is for {cmd.site}/{cmd.device}", cid, act)
        if self.cfg.commands.require_signed or env.extensions.get(SIG_ATTR):
            try:
                verify_envelope(env, self.keys, self.cfg.commands.max_age_s)
            except SignatureError as exc:
                kind = str(exc).split(":", 1)[0].replace(" ", "_")
                raise Rejected(kind, str(exc), cid, act) from None
        if cmd.deadline is not None and cmd.deadline < utcnow():
            raise Rejected(
                "expired", f"expired: the command's deadline {cmd.deadline.isoformat()} has passed", cid, act
            )
        if actuator is None:
            known = ", ".join(sorted(self.actuators)) or "none"
            raise Rejected("unknown_actuator", f"unknown actuator {act!r} (this device has: {known})", cid, act)
        try:
            actuator.check_args(cmd.args)
        except HandlerError as exc:
            raise Rejected("invalid_args", str(exc), cid, act) from None

    async def _answer_rejection(self, msg: MqttMessage, rej: Rejected, sig: str | None) -> None:
        self.metrics.commands_rejected.labels(rej.kind).inc()
        log.warning("command %s rejected: %s", rej.command_id, rej.reason)
        ack = self._ack(rej.command_id, rej.actuator, ok=False, reason=rej.reason)
        await self._finish(msg, ack, sig)

    def _ack(
        self,
        command_id: str,
        actuator: str | None,
        *,
        ok: bool,
        result: dict[str, Any] | None = None,
        reason: str | None = None,
    ) -> CommandAck:
        return CommandAck(
            command_id=command_id,
            site=self.cfg.site,
            device=self.cfg.device,
            actuator=actuator,
            ok=ok,
            result=result,
            reason=reason,
        )

    async def _finish(self, msg: MqttMessage, ack: CommandAck, sig: str | None) -> None:
        env = ack.to_envelope()
        # Store the answer first: a redelivery after a crash gets this same answer.
        await self._set(ack.command_id, "answered", sig, env.to_json())
        await self._publish(env)
        self.client.ack(msg)
        await self._set(ack.command_id, "done", sig, None)
        self.last = {
            "command_id": ack.command_id,
            "actuator": ack.actuator,
            "ok": ack.ok,
            "reason": ack.reason,
            "at": datetime.now().astimezone().isoformat(),
        }

    async def _set(self, command_id: str, state: str, sig: str | None, answer: bytes | None) -> None:
        await self.spool.call(self.spool.spool.set_command, command_id, state, sig, answer)  # type: ignore[union-attr]  # open while commands run

    async def _publish(self, env: Envelope) -> None:
        payload, props, ctype = env.to_mqtt(binary=self.client.v5)
        # Waits for the broker's PUBACK (across reconnects: paho re-sends it).
        await self.client.publish(
            self.topics.mqtt_ack(self.cfg.site, self.cfg.device),
            payload,
            1,
            user_properties=props,
            content_type=ctype,
        )
