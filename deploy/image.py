"""Build the edge agent image from the shipped Containerfile on a base image the user names.

The build context is assembled on the deployer's machine: a wheel of
reflexarc (built from a checkout, or given) plus wheels of only what the edge
agent imports (the Kafka, CEL and broker dependencies of the other
tiers stay out), so the image build itself needs no network and no compiler.
The dependency wheels are cached under ``$RX_CACHE_DIR`` (default
``~/.cache/reflexarc``) keyed by the requirement list, so a rebuild only
re-wheels reflexarc.
"""

from __future__ import annotations

import email.parser
import hashlib
import shutil
import subprocess
import sys
import tempfile
import time
import zipfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

DEFAULT_TAG = "reflexarc/edge-agent:latest"
_IGNORE = shutil.ignore_patterns(
    ".git", ".venv", "venv", "build", "dist", "*.egg-info", "__pycache__", ".pytest_cache", ".ruff_cache", ".rx"
)


class ImageBuildError(RuntimeError):
    """The image could not be built; the message says which step failed and its output."""


@dataclass
class BuildResult:
    """What ``build_image`` produced."""

    tag: str
    image_id: str
    seconds: float
    steps: dict[str, float]


def containerfile() -> Path:
    """The Containerfile shipped with reflexarc."""
    return Path(__file__).with_name("Containerfile")


def source_checkout() -> Path | None:
    """The source tree reflexarc runs from, when it is an (editable) checkout with a pyproject.toml."""
    import reflexarc

    root = Path(reflexarc.__file__).resolve().parent.parent
    return root if (root / "pyproject.toml").exists() and (root / "setup.py").exists() else None


def _run(cmd: list[str], what: str, timeout: float = 600.0) -> None:
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, check=False)
    if res.returncode != 0:
        raise ImageBuildError(f"{what} failed ({res.returncode}): {' '.join(cmd)}\n{(res.stdout + res.stderr)[-3000:]}")


def build_wheel(source: Path, out_dir: Path) -> Path:
    """Build a reflexarc wheel from a source tree (copied first, so the checkout gets no build/ litter)."""
    with tempfile.TemporaryDirectory(prefix="rx-wheel-src-") as tmp:
        src = Path(tmp) / "src"
        shutil.copytree(source, src, ignore=_IGNORE)
        _run(
            [sys.executable, "-m", "pip", "wheel", "--no-deps", "-q", "-w", str(out_dir), str(src)],
            "building the wheel",
        )
    wheels = sorted(out_dir.glob("reflexarc-*.whl"))
    if not wheels:
        raise ImageBuildError(f"pip built no reflexarc wheel from {source}")
    return wheels[-1]


EDGE_EXTRA = "edge"


def edge_requirements(wheel: Path) -> list[str]:
    """The edge agent's requirements: the wheel's core dependencies and its ``edge`` extra, with their constraints.

    pyproject.toml's core ``dependencies`` plus ``[project.optional-dependencies] edge``
    are what the agent needs; the image installs reflexarc with nothing of the other
    extras (no Kafka or Dask on a device).
    """
    from packaging.requirements import Requirement

    with zipfile.ZipFile(wheel) as zf:
        meta_name = next(n for n in zf.namelist() if n.endswith(".dist-info/METADATA"))
        meta = email.parser.Parser().parsestr(zf.read(meta_name).decode())
    reqs, core = [], []
    for line in meta.get_all("Requires-Dist") or []:
        req = Requirement(line)
        extras = f"[{','.join(sorted(req.extras))}]" if req.extras else ""
        if req.marker is None:
            core.append(f"{req.name}{extras}{req.specifier}")  # the core every install needs
        # In the extra, and only because of it (not a plain platform marker).
        elif req.marker.evaluate({"extra": EDGE_EXTRA}) and not req.marker.evaluate({"extra": ""}):
            reqs.append(f"{req.name}{extras}{req.specifier}")
    if not reqs:
        raise ImageBuildError(
            f"{wheel.name} declares no '{EDGE_EXTRA}' extra: the edge agent's dependencies are unknown"
        )
    return sorted(core + reqs)


def dependency_wheels(requirements: list[str], cache: Path) -> Path:
    """A directory of wheels for ``requirements`` (and theirs), built once per requirement list."""
    key = hashlib.sha256(repr((sys.version_info[:2], sorted(requirements))).encode()).hexdigest()[:16]
    out = cache / "wheelhouse" / key
    if (out / ".complete").exists():
        return out
    out.mkdir(parents=True, exist_ok=True)
    _run(
        [sys.executable, "-m", "pip", "wheel", "-q", "--only-binary=:all:", "-w", str(out), *requirements],
        "fetching dependency wheels",
    )
    (out / ".complete").touch()
    return out


def build_image(
    client: Any,
    base: str,
    tag: str = DEFAULT_TAG,
    *,
    source: Path | None = None,
    wheel: Path | None = None,
    cache: Path | None = None,
    log: Callable[[str], None] = lambda _line: None,
) -> BuildResult:
    """Build the agent image ``tag`` on ``base`` through ``client``'s engine (blocking).

    ``wheel``: a prebuilt reflexarc wheel; else one is built from ``source``
    (default: the checkout reflexarc runs from).
    """
    from docker.errors import BuildError, ImageNotFound

    from reflexarc.paths import cache_dir

    t0 = time.monotonic()
    steps: dict[str, float] = {}
    try:
        client.images.get(base)
    except ImageNotFound:
        raise ImageBuildError(
            f"base image {base!r} is not on the engine: load or import it first "
            "(docker load / docker import; see docs/deploy.md)"
        ) from None
    cache = cache or cache_dir()
    with tempfile.TemporaryDirectory(prefix="rx-image-ctx-") as tmp:
        ctx = Path(tmp)
        wheels = ctx / "wheels"
        wheels.mkdir()
        if wheel is None:
            src = source or source_checkout()
            if src is None:
                raise ImageBuildError("reflexarc is not running from a checkout: pass --source DIR or --wheel FILE")
            log(f"building the reflexarc wheel from {src}")
            wheel = build_wheel(src, wheels)
        else:
            shutil.copy2(wheel, wheels / wheel.name)
        steps["wheel"] = time.monotonic() - t0
        reqs = edge_requirements(wheel)
        (wheels / "requirements.txt").write_text("\n".join(reqs) + "\n")
        t1 = time.monotonic()
        log(f"dependency wheels for: {', '.join(reqs)}")
        house = dependency_wheels(reqs, cache)
        for w in house.glob("*.whl"):
            if not w.name.startswith("reflexarc-"):
                # Hard links: the context is on the same disk as the cache most of the time.
                try:
                    (wheels / w.name).hardlink_to(w)
                except OSError:
                    shutil.copy2(w, wheels / w.name)
        steps["dependencies"] = time.monotonic() - t1
        shutil.copy2(containerfile(), ctx / "Containerfile")
        t2 = time.monotonic()
        log(f"building {tag} on {base}")
        try:
            image, output = client.images.build(
                path=str(ctx),
                dockerfile="Containerfile",
                tag=tag,
                buildargs={"BASE_IMAGE": base},
                # No bridge on edge hosts (and none needed: the build is offline).
                network_mode="host",
                rm=True,
                forcerm=True,
                pull=False,
                labels={"io.reflexarc.version": wheel.name.split("-")[1]},
            )
        except BuildError as exc:
            text = "".join(str(c.get("stream", c.get("error", ""))) for c in exc.build_log)
            raise ImageBuildError(f"docker build failed: {exc.msg}\n{text[-3000:]}") from None
        for chunk in output:
            if "stream" in chunk and chunk["stream"].strip():
                log(chunk["stream"].rstrip())
        steps["docker build"] = time.monotonic() - t2
    return BuildResult(tag, image.id, time.monotonic() - t0, steps)
