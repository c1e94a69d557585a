"""A real Docker engine for tests (Debian ``docker.io``), and a locally built base image.

    from reflexarc.testing.docker import DockerEngine, base_image

    with DockerEngine() as engine:                 # private dockerd on a unix socket
        tag = base_image(engine.client)            # debootstrap'd Debian + python3, cached
        engine.client.containers.run(tag, ["python3", "-V"], network_mode="host", remove=True)

What it does: starts ``dockerd`` as a child process with its own data root,
exec root, pid file and unix socket in a private directory, without a bridge
or iptables (``--bridge=none``: containers use ``network_mode="host"`` and
reach services on 127.0.0.1), and waits until the API answers ``/_ping``.
``stop()`` kills every container of this engine, stops dockerd by PID (its
own containerd goes with it), unmounts what dockerd leaves mounted under the
directory (``exec/netns/default``, overlay layers) and removes the directory.

No image can be pulled on test machines, so :func:`base_image` builds one:
``debootstrap --variant=minbase`` of Debian bookworm with python3, tarred
once into a cache directory (``$RX_CACHE_DIR`` or ``~/.cache/reflexarc``)
keyed by its inputs, then ``docker import``-ed into the engine (a few seconds
when cached, about 40 s the first time). Requires root, like dockerd.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import shutil
import subprocess
import tempfile
import time
from pathlib import Path
from types import TracebackType
from typing import IO, Any

from reflexarc.paths import cache_dir

__all__ = ["DockerEngine", "DockerEngineError", "base_image", "base_image_tarball", "cache_dir"]

_DEBIAN_MIRROR = os.environ.get("RX_DEBIAN_MIRROR", "http://deb.debian.org/debian")


class DockerEngineError(RuntimeError):
    """dockerd did not start, or the base image could not be built (the message carries the log tail)."""


def _tail(path: Path, lines: int = 20) -> str:
    """Last lines of a log file (for error messages)."""
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return "(no log)"


def _mounts_under(root: Path) -> list[str]:
    """Mount points below ``root``, deepest first (so they can be unmounted in order)."""
    prefix = str(root.resolve()) + "/"
    found: list[str] = []
    with contextlib.suppress(OSError):
        for line in Path("/proc/self/mounts").read_text().splitlines():
            parts = line.split()
            if len(parts) > 1:
                # /proc/mounts escapes spaces as \040; our paths have none.
                point = parts[1]
                if point.startswith(prefix):
                    found.append(point)
    return sorted(found, key=len, reverse=True)


class DockerEngine:
    """One private ``dockerd`` on a unix socket in ``workdir`` (default: a new temporary directory).

    Attributes after ``start()``: ``socket`` (path), ``base_url``
    (``unix://...``, what a fleet file or ``DOCKER_HOST`` takes), ``client``
    (a ``docker.DockerClient``), ``pid`` and ``workdir``.
    """

    def __init__(self, workdir: str | Path | None = None, *, start_timeout_s: float = 30.0) -> None:
        """Describe the engine; nothing starts before ``start()``."""
        self._own_dir = workdir is None
        # A short path: unix socket paths are limited to 107 bytes.
        self.workdir = Path(workdir) if workdir else Path(tempfile.mkdtemp(prefix="rx-dockerd-"))
        self.start_timeout_s = start_timeout_s
        self.socket = self.workdir / "docker.sock"
        self.base_url = f"unix://{self.socket}"
        self._proc: subprocess.Popen[bytes] | None = None
        self._log: IO[bytes] | None = None
        self._client: Any = None

    @property
    def log_path(self) -> Path:
        """dockerd's own log (stdout and stderr)."""
        return self.workdir / "dockerd.log"

    @property
    def pid(self) -> int | None:
        """PID of the running dockerd, or None."""
        return self._proc.pid if self._proc is not None and self._proc.poll() is None else None

    @property
    def client(self) -> Any:
        """A ``docker.DockerClient`` for this engine (created on first use)."""
        if self._client is None:
            import docker

            self._client = docker.DockerClient(base_url=self.base_url, timeout=60)
        return self._client

    def start(self) -> DockerEngine:
        """Start dockerd and wait until its API answers."""
        if len(str(self.socket)) > 100:
            raise DockerEngineError(f"socket path too long for a unix socket: {self.socket}; use a shorter workdir")
        self.workdir.mkdir(parents=True, exist_ok=True)
        args = [
            "dockerd",
            "--data-root", str(self.workdir / "data"),
            "--exec-root", str(self.workdir / "exec"),
            "--pidfile", str(self.workdir / "dockerd.pid"),
            "-H", self.base_url,
            # No bridge and no iptables: the test machine has neither; containers use the host network.
            "--iptables=false", "--ip-forward=false", "--ip-masq=false", "--bridge=none",
            "--storage-driver=overlay2",
            "--default-ulimit", "nofile=20000:20000",
            # containerd's own socket and state stay inside our directory too.
            "--containerd-namespace", "rx-test", "--containerd-plugins-namespace", "rx-test-plugins",
        ]  # fmt: skip
        self._log = open(self.log_path, "ab")  # noqa: SIM115 - closed in stop()
        self._proc = subprocess.Popen(
            args,
            stdout=self._log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            start_new_session=True,  # a Ctrl-C of the test run must not skip our clean stop
        )
        try:
            self._wait_ready()
        except BaseException:
            self.stop()
            raise
        return self

    def _wait_ready(self) -> None:
        """Poll ``/_ping`` until it answers (or dockerd died / time ran out)."""
        import docker
        from docker.errors import DockerException

        deadline = time.monotonic() + self.start_timeout_s
        last = ""
        while time.monotonic() < deadline:
            assert self._proc is not None
            if self._proc.poll() is not None:
                raise DockerEngineError(f"dockerd exited with {self._proc.returncode}\n{_tail(self.log_path)}")
            if self.socket.exists():
                try:
                    probe = docker.DockerClient(base_url=self.base_url, timeout=5)
                    try:
                        probe.ping()
                        return
                    finally:
                        probe.close()
                except (DockerException, OSError) as exc:
                    last = str(exc)
            time.sleep(0.1)
        raise DockerEngineError(f"dockerd not ready after {self.start_timeout_s}s ({last})\n{_tail(self.log_path)}")

    def _kill_containers(self) -> None:
        """Kill every container of this engine: dockerd would otherwise wait out each stop timeout."""
        from docker.errors import DockerException

        with contextlib.suppress(DockerException, OSError):
            for c in self.client.containers.list(all=True):
                with contextlib.suppress(DockerException):
                    if c.status in ("running", "restarting", "paused"):
                        c.kill()

    def stop(self) -> None:
        """Kill containers, stop dockerd by PID, unmount its leftovers, remove the directory. Safe twice."""
        if self.pid is not None:
            self._kill_containers()
        if self._client is not None:
            with contextlib.suppress(Exception):
                self._client.close()
            self._client = None
        if self._proc is not None:
            if self._proc.poll() is None:
                self._proc.terminate()
                try:
                    self._proc.wait(timeout=20)
                except subprocess.TimeoutExpired:
                    self._proc.kill()
                    self._proc.wait(timeout=10)
            self._proc = None
        if self._log is not None:
            self._log.close()
            self._log = None
        # dockerd leaves exec/netns/default (and, after a kill, overlay mounts) mounted.
        for point in _mounts_under(self.workdir):
            subprocess.run(["umount", "-l", point], capture_output=True, check=False)
        if self._own_dir:
            shutil.rmtree(self.workdir, ignore_errors=True)

    def __enter__(self) -> DockerEngine:
        """Start the engine."""
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        """Stop the engine."""
        self.stop()


def base_image_tarball(
    suite: str = "bookworm",
    include: tuple[str, ...] = ("python3", "python3-venv", "ca-certificates"),
    *,
    mirror: str = _DEBIAN_MIRROR,
    cache: Path | None = None,
    timeout_s: float = 600.0,
) -> Path:
    """A tarball of a minimal Debian root filesystem, built once by debootstrap and cached.

    The cache key covers every input (suite, packages, mirror), so changing one
    builds a new tarball; the file appears atomically (a concurrent run never
    sees half of it).
    """
    key = hashlib.sha256(repr((suite, "minbase", sorted(include), mirror)).encode()).hexdigest()[:16]
    out_dir = (cache or cache_dir()) / "base-images"
    out = out_dir / f"debian-{suite}-{key}.tar"
    if out.exists():
        return out
    if shutil.which("debootstrap") is None:
        raise DockerEngineError(
            "debootstrap is not installed: apt-get install debootstrap (see scripts/system-deps.sh)"
        )
    out_dir.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="rx-rootfs-", dir=out_dir) as tmp:
        rootfs = Path(tmp) / "rootfs"
        cmd = ["debootstrap", "--variant=minbase", f"--include={','.join(include)}", suite, str(rootfs), mirror]
        res = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout_s, check=False)
        if res.returncode != 0:
            raise DockerEngineError(
                f"debootstrap failed ({res.returncode}); is {mirror} reachable?\n{res.stdout[-2000:]}{res.stderr[-2000:]}"
            )
        # Package caches are not part of an image.
        shutil.rmtree(rootfs / "var/cache/apt/archives", ignore_errors=True)
        (rootfs / "var/cache/apt/archives/partial").mkdir(parents=True, exist_ok=True)
        part = Path(tmp) / "rootfs.tar"
        subprocess.run(["tar", "-C", str(rootfs), "--numeric-owner", "-cf", str(part), "."], check=True)
        os.replace(part, out)
    return out


def base_image(client: Any, tag: str = "reflexarc-test/debian-python:bookworm", **tarball_kwargs: Any) -> str:
    """Import the cached Debian+python3 tarball into ``client``'s engine as ``tag`` (once); return the tag."""
    from docker.errors import ImageNotFound

    with contextlib.suppress(ImageNotFound):
        client.images.get(tag)
        return tag
    tarball = base_image_tarball(**tarball_kwargs)
    repo, _, version = tag.rpartition(":")
    if not repo or "/" in version:
        repo, version = tag, "latest"
    # From the path (sent with a Content-Length): import_image_from_stream's chunked
    # upload is refused by dockerd 20.10 ("invalid byte in chunk length").
    client.api.import_image(src=str(tarball), repository=repo, tag=version)
    client.images.get(tag)  # raises if the import did not produce it
    return tag
