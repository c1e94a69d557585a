"""``reflexarc up``: every tier of a pipeline as child processes under one supervisor.

The pipeline file names the tier processes and their own config files; where
it names no brokers, embedded ones are started on loopback. Each tier is a
separate OS process (``python -m reflexarc <tier> run FILE``) so that a crash
in one never takes down another; the supervisor restarts a crashed tier with
backoff (safe, because every hop is at-least-once and every consumer
idempotent) and stops everything on SIGTERM/Ctrl-C. Children die with the
supervisor even on ``kill -9`` (PR_SET_PDEATHSIG).

Example ``pipeline.yaml``::

    name: beamline
    processes:
      - {tier: site,  config: site.yaml}
      - {tier: cloud, config: triggers.yaml}
      - {tier: fog,   config: fog.yaml}
      - {tier: edge,  config: agent.yaml}
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from pydantic import Field, model_validator

from reflexarc.brokers import EmbeddedBrokers, MqttFlavour
from reflexarc.config import (
    ConfigError,
    KafkaSettings,
    MqttSettings,
    Problem,
    StrictModel,
    load_yaml,
)
from reflexarc.process import READY_ENV, ManagedProcess

log = logging.getLogger(__name__)

Tier = Literal["edge", "fog", "cloud", "site"]
# Start order: consumers before producers, so nothing waits on a group join.
_START_ORDER: dict[str, int] = {"site": 0, "cloud": 1, "fog": 2, "edge": 3}


class ProcessSpec(StrictModel):
    """One tier process of the pipeline."""

    tier: Tier
    config: str = Field(description="the tier's own YAML file, relative to the pipeline file")
    name: str | None = Field(None, description="label in logs and status (default: tier-N)")
    restart: Literal["on-failure", "never"] = "on-failure"


class BrokerSpec(StrictModel):
    """Existing brokers to use instead of embedded ones."""

    mqtt: MqttSettings | None = None
    kafka: KafkaSettings | None = None


class SigningSpec(StrictModel):
    """Where the command-signing key pair comes from (paths, never key material in YAML)."""

    key_file: str | None = Field(None, description="Ed25519 private key (PEM) the cloud tier signs with")
    verify_key_files: list[str] = Field(default_factory=list, description="public keys the edge accepts")


class PipelineConfig(StrictModel):
    """A whole pipeline: which tier processes to run, on which brokers."""

    name: str = "pipeline"
    namespace: str = "rx"
    brokers: BrokerSpec | None = Field(None, description="omit to start embedded brokers on loopback")
    signing: SigningSpec = Field(default_factory=SigningSpec)
    processes: list[ProcessSpec] = Field(min_length=1)

    @model_validator(mode="after")
    def _unique_names(self) -> PipelineConfig:
        counts: dict[str, int] = {}
        for p in self.processes:
            counts[p.tier] = counts.get(p.tier, 0) + 1
            if p.name is None:
                p.name = f"{p.tier}-{counts[p.tier]}"
        names = [p.name for p in self.processes if p.name is not None]  # all named just above
        dupes = {n for n in names if names.count(n) > 1}
        if dupes:
            raise ValueError(f"process names must be unique, repeated: {sorted(dupes)}")
        return self


def load_pipeline(path: str | Path) -> PipelineConfig:
    """Load a pipeline file and check that every tier config it names exists."""
    path = Path(path)
    cfg = load_yaml(path, PipelineConfig)
    missing = [
        Problem(str(path), None, None, f"processes[{i}].config", f"file not found: {path.parent / p.config}")
        for i, p in enumerate(cfg.processes)
        if not (path.parent / p.config).exists()
    ]
    if missing:
        raise ConfigError(missing)
    return cfg


@dataclass
class Child:
    """A supervised tier process."""

    spec: ProcessSpec
    process: ManagedProcess
    ready_file: Path | None = None
    restarts: int = 0
    started_at: float = 0.0
    next_start: float = 0.0


@dataclass
class Supervisor:
    """Runs a pipeline: brokers (embedded or given), keys, and tier processes."""

    config: PipelineConfig
    base_dir: Path
    run_dir: Path | None = None
    mqtt_flavour: MqttFlavour | None = None
    extra_env: dict[str, str] = field(default_factory=dict)
    ready_timeout: float = 90.0
    brokers: EmbeddedBrokers | None = field(default=None, init=False)
    children: list[Child] = field(default_factory=list, init=False)
    env: dict[str, str] = field(default_factory=dict, init=False)
    _tmp: tempfile.TemporaryDirectory[str] | None = field(default=None, init=False, repr=False)

    # ---- start-up -------------------------------------------------------------
    def start(self) -> None:
        """Start brokers (if embedded), prepare keys, create topics, start tier processes."""
        if self.run_dir is None:
            self._tmp = tempfile.TemporaryDirectory(prefix=f"reflexarc-{self.config.name}-")
            self.run_dir = Path(self._tmp.name)
        self.run_dir.mkdir(parents=True, exist_ok=True)
        env = {
            **os.environ,
            "RX_NAMESPACE": self.config.namespace,
            # Tiers keep spools, job databases and checkpoints here unless their config says otherwise.
            "RX_STATE_DIR": str(self.run_dir / "state"),
            **self.extra_env,
        }
        b = self.config.brokers
        if b is None or b.mqtt is None or b.kafka is None:
            self.brokers = EmbeddedBrokers(
                data_dir=self.run_dir / "brokers",
                mqtt_flavour=self.mqtt_flavour,
                kafka_bootstrap_servers=b.kafka.bootstrap_servers if b and b.kafka else None,
            ).start()
            env.update(self.brokers.env())
        if b is not None and b.mqtt is not None:
            env.update(RX_MQTT_HOST=b.mqtt.host, RX_MQTT_PORT=str(b.mqtt.port), RX_MQTT_PROTOCOL=b.mqtt.protocol)
        if b is not None and b.kafka is not None:
            env["RX_KAFKA_BOOTSTRAP"] = b.kafka.bootstrap_servers
        env.update(self._keys(env))
        self.env = env
        # Two waves: every consumer tier at once, then (when all are ready) the
        # devices. MQTT drops a message nobody is subscribed to yet, so a device
        # must not publish before the fog bridge has subscribed.
        for wave in (("site", "cloud", "fog"), ("edge",)):
            launched = []
            for spec in sorted(self.config.processes, key=lambda p: _START_ORDER[p.tier]):
                if spec.tier not in wave:
                    continue
                argv = [sys.executable, "-m", "reflexarc", spec.tier, "run", str(self.base_dir / spec.config)]
                ready = self.run_dir / "ready" / f"{spec.name}"
                proc = ManagedProcess(
                    spec.name or spec.tier,
                    argv,
                    self.run_dir / "logs" / f"{spec.name}.log",
                    env={**env, READY_ENV: str(ready)},
                    cwd=self.base_dir,
                )
                child = Child(spec, proc, ready_file=ready)
                self._launch(child)
                self.children.append(child)
                launched.append(child)
            for child in launched:
                assert child.ready_file is not None
                child.process.wait_ready(child.ready_file.exists, timeout=self.ready_timeout)

    def _keys(self, env: dict[str, str]) -> dict[str, str]:
        signing = self.config.signing
        if signing.key_file:
            out = {"RX_SIGNING_KEY": str(self.base_dir / signing.key_file)}
            if signing.verify_key_files:
                out["RX_VERIFY_KEYS"] = ",".join(str(self.base_dir / k) for k in signing.verify_key_files)
            return out
        if env.get("RX_SIGNING_KEY"):
            return {}
        # No key configured: a throwaway pair for this run, so commands are
        # still signed and verified end to end (secure by default).
        from reflexarc.signing import generate_keypair

        assert self.run_dir is not None
        private, public = generate_keypair(self.run_dir / "keys", "pipeline")
        return {"RX_SIGNING_KEY": str(private), "RX_VERIFY_KEYS": str(public)}

    def _launch(self, child: Child) -> None:
        if child.ready_file is not None:
            child.ready_file.unlink(missing_ok=True)
        child.process.start()
        child.started_at = time.monotonic()
        log.info("started %s (pid %s)", child.spec.name, child.process.pid)

    # ---- supervision ----------------------------------------------------------
    def check(self) -> list[str]:
        """Restart crashed tiers (with backoff); return a line per event for the caller to show."""
        events = []
        now = time.monotonic()
        for c in self.children:
            if c.process.running():
                continue
            code = c.process.proc.returncode if c.process.proc else None
            if c.spec.restart == "never":
                continue
            if c.next_start == 0.0:
                # Back off 1, 2, 4 ... 30 s; a tier that ran a minute starts over at 1 s.
                if now - c.started_at > 60:
                    c.restarts = 0
                delay = min(30.0, 2.0**c.restarts)
                c.next_start = now + delay
                events.append(f"{c.spec.name} exited with {code}; restarting in {delay:.0f}s\n{c.process.log_tail(5)}")
            elif now >= c.next_start:
                c.restarts += 1
                c.next_start = 0.0
                self._launch(c)
                events.append(f"{c.spec.name} restarted (restart #{c.restarts})")
        return events

    async def run(self, stop: asyncio.Event) -> None:
        """Supervise until ``stop`` is set."""
        while not stop.is_set():
            for line in self.check():
                log.warning("%s", line)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), 0.5)

    def child(self, name: str) -> Child:
        """The supervised process with this name (e.g. ``edge-1``)."""
        for c in self.children:
            if c.spec.name == name:
                return c
        raise KeyError(name)

    def stop(self) -> None:
        """Stop tiers (producers first, so consumers drain) then brokers."""
        for c in sorted(self.children, key=lambda c: -_START_ORDER[c.spec.tier]):
            c.process.stop(grace=15)
        if self.brokers is not None:
            self.brokers.stop()
        if self._tmp is not None:
            self._tmp.cleanup()
            self._tmp = None

    def kafka_settings(self) -> KafkaSettings:
        """Kafka settings of the running pipeline (for observers)."""
        return KafkaSettings(bootstrap_servers=self.env["RX_KAFKA_BOOTSTRAP"])

    def mqtt_settings(self) -> MqttSettings:
        """MQTT settings of the running pipeline."""
        return MqttSettings(
            host=self.env["RX_MQTT_HOST"],
            port=int(self.env["RX_MQTT_PORT"]),
            protocol=self.env.get("RX_MQTT_PROTOCOL", "5"),  # type: ignore[arg-type]  # pydantic checks the text against the Literal
        )
