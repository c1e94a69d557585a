"""A Kafka-protocol cluster behind a real TLS listener on loopback, for tests of clients on a secured cluster.

Tansu 0.6 as shipped here did not complete an aiokafka TLS handshake on its
``--cert`` listener when we tried ("early eof"), and with ``--authentication``
it refuses the very request that creates the first SCRAM user
(NotAuthenticated). So TLS is terminated by a small proxy in this process, with a
certificate made for the test. Tansu advertises the proxy's port, so every
connection a client makes (bootstrap and each broker it learns from metadata)
is TLS and must verify the certificate against the CA file it was given.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import ipaddress
import os
import ssl
import threading
from dataclasses import dataclass
from pathlib import Path

from reflexarc.brokers import tansu_binary
from reflexarc.process import ManagedProcess, free_port, port_open


def self_signed_cert(directory: Path, host: str = "127.0.0.1") -> tuple[Path, Path]:
    """Write a self-signed server certificate for ``host`` (its own CA) and its key; return (cert, key)."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    directory.mkdir(parents=True, exist_ok=True)
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, host)])
    now = dt.datetime.now(dt.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(days=1))
        .add_extension(x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address(host))]), critical=False)
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(key, hashes.SHA256())
    )
    cert_file, key_file = directory / "server.pem", directory / "server.key"
    cert_file.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_file.write_bytes(
        key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    )
    os.chmod(key_file, 0o600)
    return cert_file, key_file


class TlsProxy:
    """Terminates TLS on ``port`` and forwards each connection's bytes to ``upstream`` (a thread with its own loop)."""

    def __init__(self, upstream: tuple[str, int], cert_file: Path, key_file: Path, port: int | None = None) -> None:
        self.upstream = upstream
        self.port = port or free_port()
        self._ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        self._ctx.load_cert_chain(cert_file, key_file)
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="tls-proxy", daemon=True)
        self._server: asyncio.Server | None = None

    async def _pipe(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        with contextlib.suppress(OSError, ConnectionError):
            while data := await reader.read(65536):
                writer.write(data)
                await writer.drain()
        writer.close()

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            up_reader, up_writer = await asyncio.open_connection(*self.upstream)
        except OSError:
            writer.close()
            return
        await asyncio.gather(self._pipe(reader, up_writer), self._pipe(up_reader, writer))

    def start(self) -> TlsProxy:
        """Listen on 127.0.0.1:``port``; returns once it accepts connections."""
        self._thread.start()
        fut = asyncio.run_coroutine_threadsafe(
            asyncio.start_server(self._handle, "127.0.0.1", self.port, ssl=self._ctx), self._loop
        )
        self._server = fut.result(timeout=10)
        return self

    def stop(self) -> None:
        """Close the listener and stop the thread."""
        if self._server is not None:
            self._loop.call_soon_threadsafe(self._server.close)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(timeout=10)


@dataclass
class TlsKafka:
    """Tansu behind a :class:`TlsProxy`: clients use ``bootstrap_servers`` with SSL and ``ca_file``."""

    tansu: ManagedProcess
    proxy: TlsProxy
    ca_file: Path

    @property
    def bootstrap_servers(self) -> str:
        """``host:port`` of the TLS listener."""
        return f"127.0.0.1:{self.proxy.port}"

    def stop(self) -> None:
        """Stop the proxy and the broker."""
        self.proxy.stop()
        self.tansu.stop()


def start_tls_kafka(data_dir: Path) -> TlsKafka:
    """Start Tansu on a plain loopback port, advertising a TLS proxy's port, and the proxy in front of it."""
    data_dir.mkdir(parents=True, exist_ok=True)
    cert_file, key_file = self_signed_cert(data_dir / "tls")
    plain, tls_port = free_port(), free_port()
    proc = ManagedProcess(
        "tansu-tls",
        [
            str(tansu_binary()),
            "broker",
            "--listener-url",
            f"tcp://127.0.0.1:{plain}",
            "--advertised-listener-url",
            f"tcp://127.0.0.1:{tls_port}",
            "--storage-engine",
            "memory://tansu/",
        ],
        data_dir / "tansu.log",
        env={**os.environ, "RUST_LOG": os.environ.get("RUST_LOG", "warn")},
    )
    proc.start()
    proc.wait_ready(lambda: port_open("127.0.0.1", plain))
    proxy = TlsProxy(("127.0.0.1", plain), cert_file, key_file, port=tls_port).start()
    return TlsKafka(proc, proxy, cert_file)
