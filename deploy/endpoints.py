"""Connect to a device's Docker engine: unix socket, tcp with TLS, or ssh."""

from __future__ import annotations

from typing import Any

from reflexarc.deploy.fleet import Endpoint


class Unreachable(RuntimeError):
    """A Docker endpoint did not answer; the message names it and the cause."""


def connect(endpoint: Endpoint) -> Any:
    """A ``docker.DockerClient`` for ``endpoint`` that answered a ping (blocking: call in a thread).

    Raises :class:`Unreachable` when the engine is down, refuses us or is too
    slow, so one dead device never stops a rollout.
    """
    import docker
    from docker.errors import DockerException
    from docker.tls import TLSConfig

    tls: Any = False
    if endpoint.tls is not None:
        t = endpoint.tls
        tls = TLSConfig(
            client_cert=(t.cert_file, t.key_file) if t.cert_file and t.key_file else None,
            ca_cert=t.ca_file,
            verify=t.verify,
        )
    url = endpoint.url
    if url.startswith("tcp://") and endpoint.tls is not None:
        url = "https://" + url[len("tcp://") :]
    try:
        client = docker.DockerClient(
            base_url=url,
            tls=tls,
            timeout=int(max(1, endpoint.timeout_s)),
            # ssh:// goes through paramiko (no ssh binary or docker CLI needed on the deployer).
            use_ssh_client=False,
        )
    except (DockerException, OSError, ValueError) as exc:
        raise Unreachable(f"{endpoint.url}: {_reason(exc)}") from None
    try:
        client.ping()
    except Exception as exc:  # requests/urllib3/paramiko raise many types; all mean "not reachable"
        client.close()
        raise Unreachable(f"{endpoint.url}: {_reason(exc)}") from None
    return client


def _reason(exc: BaseException) -> str:
    """A one-line cause: the innermost error text of a connection failure."""
    text = str(exc)
    for marker in ("Connection refused", "No such file or directory", "timed out", "Name or service not known"):
        if marker in text:
            return marker.lower()
    return text.splitlines()[0][:200] if text else type(exc).__name__
