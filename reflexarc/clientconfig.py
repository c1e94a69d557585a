"""Connection settings of the clients (``reflexarc results subscribe``, :class:`SiteClient`), loaded like a tier's.

A client reaches the same cluster as the tiers with the same settings: a
``kafka:`` section (TLS, SASL, partitions ...) and a ``namespace``, from a
YAML file (``--config FILE``) or, when the file has no such section, from the
``RX_KAFKA_*`` and ``RX_NAMESPACE`` variables, exactly as every tier reads
them (:meth:`reflexarc.config.KafkaSettings.from_env`)::

    # kafka.yaml
    namespace: rx
    kafka:
      bootstrap_servers: broker1.example.org:9093
      security_protocol: SASL_SSL
      sasl_mechanism: SCRAM-SHA-512
      username: analyst
      password_env: KAFKA_PASSWORD
      tls: {ca_file: /etc/ssl/certs/site-ca.pem}

Command-line flags (``--bootstrap``, ``--namespace``) override the file.
"""

from __future__ import annotations

import os

from pydantic import Field

from reflexarc.config import KafkaSettings, StrictModel, load_yaml
from reflexarc.topics import DEFAULT_NAMESPACE, Topics


class ClientConfig(StrictModel):
    """What a client needs to reach the pipeline's Kafka cluster: the cluster and the topic namespace."""

    namespace: str = Field(
        default_factory=lambda: os.environ.get("RX_NAMESPACE", DEFAULT_NAMESPACE),
        description="prefix of every topic (default: $RX_NAMESPACE or 'rx')",
    )
    kafka: KafkaSettings = Field(default_factory=KafkaSettings.from_env)

    def topics(self) -> Topics:
        """The topic helper for this namespace."""
        return Topics(self.namespace)


def load_client_config(
    path: str | os.PathLike[str] | None = None, bootstrap: str | None = None, namespace: str | None = None
) -> ClientConfig:
    """Settings from ``path`` (or the environment), then the command-line overrides ``bootstrap`` and ``namespace``.

    Raises :class:`reflexarc.config.ConfigError` naming file, line and field for a bad file.
    """
    cfg = load_yaml(path, ClientConfig) if path is not None else ClientConfig()
    if bootstrap:
        cfg.kafka = cfg.kafka.model_copy(update={"bootstrap_servers": bootstrap})
    if namespace:
        Topics(namespace)  # a bad namespace is an error here, not a topic name nobody reads
        cfg.namespace = namespace
    return cfg


def kafka_is_configured(path: str | os.PathLike[str] | None, bootstrap: str | None) -> bool:
    """False when neither a flag, a file nor ``RX_KAFKA_BOOTSTRAP`` names a cluster (the default is only a guess)."""
    if bootstrap or os.environ.get("RX_KAFKA_BOOTSTRAP"):
        return True
    if path is None:
        return False
    return "kafka" in load_yaml(path, ClientConfig).model_fields_set
