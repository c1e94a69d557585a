"""Packed environments (PONCHO's job): the same Python packages on every node.

For an app with ``env:`` in ``site.yaml``:

1. **analyse** — read the app's module source (not import it) for its imports,
   map each to the installed distribution and version that provides it
   (``importlib.metadata``), add the app's declared ``requirements``, and
   note the app's own code (``env.paths`` and the module's own package);
2. **build** — a relocatable venv with ``uv`` (``pip`` if uv is missing),
   install the requirements, copy the app's own code in (a ``.pth`` file with
   relative paths puts it on ``sys.path``), check every import works;
3. **pack** — a tarball named by the hash of that spec, cached: the same spec
   is never built twice;
4. **unpack** — once per node under a file lock (``worker.ensure_unpacked``),
   then the task runs with that environment's interpreter.
"""

from __future__ import annotations

import ast
import hashlib
import importlib.metadata as md
import importlib.util
import json
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
import time
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path

from reflexarc.hpc_bridge.apps import AppSpec
from reflexarc.hpc_bridge.worker import ensure_unpacked

_STDLIB = set(sys.stdlib_module_names) | {"__future__"}


class EnvError(RuntimeError):
    """An environment could not be analysed, built or packed; the text says what to fix."""


@dataclass
class EnvSpec:
    """What goes into a packed environment; its hash names the tarball."""

    python: str
    requirements: list[str]
    local_code: dict[str, str] = field(default_factory=dict)  # folder/file -> content hash
    modules: list[str] = field(default_factory=list)  # must import inside the env
    unresolved: list[str] = field(default_factory=list)  # imports no installed dist provides

    @property
    def hash(self) -> str:
        """sha256 of the spec (requirements, Python version, the code's content)."""
        doc = {"python": self.python, "requirements": self.requirements, "local_code": self.local_code}
        return hashlib.sha256(json.dumps(doc, sort_keys=True).encode()).hexdigest()


@dataclass
class Packed:
    """A packed environment in the cache."""

    tarball: Path
    spec: EnvSpec
    cached: bool
    seconds: float = 0.0

    @property
    def hash(self) -> str:
        """The spec's hash."""
        return self.spec.hash


@dataclass
class EnvInfo:
    """One cached environment, for ``reflexarc env list``."""

    hash: str
    tarball: Path
    size: int
    created: datetime
    apps: list[str]
    requirements: list[str]


def _imports_of(source: str) -> set[str]:
    tree = ast.parse(source)
    names: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names.update(a.name.split(".")[0] for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module.split(".")[0])
    return names


def _content_hash(path: Path) -> str:
    h = hashlib.sha256()
    files = [path] if path.is_file() else sorted(p for p in path.rglob("*") if p.is_file())
    for f in files:
        if "__pycache__" in f.parts or f.suffix == ".pyc":
            continue
        h.update(str(f.relative_to(path.parent)).encode())
        h.update(f.read_bytes())
    return h.hexdigest()


def _is_local(dist: md.Distribution) -> bool:
    """Installed from a folder (editable or not): not something an index can give us."""
    text = dist.read_text("direct_url.json")
    if not text:
        return False
    try:
        return "dir_info" in json.loads(text)
    except ValueError:
        return False


class EnvManager:
    """Builds, caches and unpacks packed environments in ``cache_dir``."""

    def __init__(self, cache_dir: Path, python: str | None = None, unpack_dir: str | None = None) -> None:
        self.cache_dir = Path(cache_dir)
        self.python = python or sys.executable
        self.unpack_dir = unpack_dir

    # ---- analysis -----------------------------------------------------------------------
    def analyse(self, app_name: str, spec: AppSpec) -> EnvSpec:
        """What the app's environment must contain (no code of the app is executed)."""
        env = spec.env
        paths = [Path(os.path.expanduser(p)).resolve() for p in (env.paths if env else [])]
        for p in paths:
            if not p.exists():
                raise EnvError(f"app {app_name!r}: env path {p} does not exist")
        refs = [spec.function] if spec.function else []
        refs += [i.function for i in spec.implementations]
        dists = md.packages_distributions()
        requirements: dict[str, str] = {}
        local: dict[str, Path] = {p.name: p for p in paths}
        modules: list[str] = []
        unresolved: set[str] = set()
        for ref in refs:
            module = ref.split(":", 1)[0]
            modules.append(module)
            origin, top_path = self._find_source(module, paths)
            top = module.split(".")[0]
            if top_path is not None and not any(top_path == p or p in top_path.parents for p in paths):
                owners = dists.get(top, [])
                if not owners or all(_is_local(md.distribution(o)) for o in owners):
                    local[top_path.name] = top_path  # the app's own code travels with it
                else:
                    for o in owners:
                        requirements[o.lower()] = f"{o}=={md.version(o)}"
            for name in _imports_of(origin.read_text()):
                if name in _STDLIB or name == top or name in local:
                    continue
                owners = dists.get(name, [])
                if not owners:
                    unresolved.add(name)
                for o in owners:
                    dist = md.distribution(o)
                    if _is_local(dist):
                        raise EnvError(
                            f"app {app_name!r} imports {name!r} from {o}, installed from a local folder; "
                            f"add that folder to env.paths or a requirement for it to env.requirements"
                        )
                    requirements[o.lower()] = f"{dist.metadata['Name']}=={dist.version}"
        declared = list(env.requirements) if env else []
        for req in declared:
            key = req.split("@")[0].split("=")[0].split("<")[0].split(">")[0].split("[")[0].strip().lower()
            requirements[key] = req  # an explicit requirement wins over the detected version
        return EnvSpec(
            python=f"{sys.version_info.major}.{sys.version_info.minor}",
            requirements=sorted(requirements.values(), key=str.lower),
            local_code={str(p): _content_hash(p) for p in sorted(local.values())},
            modules=sorted(set(modules)),
            unresolved=sorted(unresolved),
        )

    def _find_source(self, module: str, paths: list[Path]) -> tuple[Path, Path | None]:
        """The module's source file and the folder/file of its top-level package."""
        saved = list(sys.path)
        sys.path[:0] = [str(p) for p in paths]
        try:
            found = importlib.util.find_spec(module)
        except (ImportError, ValueError) as exc:
            raise EnvError(f"cannot find module {module!r}: {exc}; add its folder to env.paths") from exc
        finally:
            sys.path[:] = saved
        if found is None or not found.origin or not found.origin.endswith(".py"):
            raise EnvError(f"cannot find the source of module {module!r}; add its folder to env.paths")
        origin = Path(found.origin)
        depth = module.count(".") + (1 if origin.name == "__init__.py" else 0)
        top = origin
        for _ in range(depth):
            top = top.parent
        return origin, top

    # ---- build & pack -------------------------------------------------------------------------
    def tarball_of(self, env_hash: str) -> Path:
        """Cache path of the tarball for a spec hash."""
        return self.cache_dir / f"env-{env_hash[:24]}.tar.gz"

    def pack(self, app_name: str, spec: AppSpec) -> Packed:
        """The app's packed environment: from the cache, or built now (under a lock)."""
        import fcntl

        t0 = time.monotonic()
        env = self.analyse(app_name, spec)
        self.cache_dir.mkdir(parents=True, exist_ok=True)
        tarball = self.tarball_of(env.hash)
        with open(self.cache_dir / f".{env.hash[:24]}.lock", "w") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            cached = tarball.exists()
            if not cached:
                self._build(env, tarball)
            self._remember(env, tarball, app_name)
        return Packed(tarball, env, cached, time.monotonic() - t0)

    def _build(self, env: EnvSpec, tarball: Path) -> None:
        with tempfile.TemporaryDirectory(prefix="rx-env-build-", dir=self.cache_dir) as tmp:
            venv = Path(tmp) / "env"
            uv = shutil.which("uv") or str(Path(sys.executable).parent / "uv")
            if Path(uv).exists():
                self._run([uv, "venv", "--relocatable", "--quiet", "--python", self.python, str(venv)])
                install = [uv, "pip", "install", "--quiet", "--python", str(venv / "bin" / "python")]
            else:
                self._run([self.python, "-m", "venv", "--without-pip", str(venv)])
                install = [self.python, "-m", "pip", "install", "--quiet", "--prefix", str(venv)]
            if env.requirements:
                self._run([*install, *env.requirements])
            site = next((venv / "lib").glob("python*/site-packages"))
            lines = []
            for i, path in enumerate(sorted(env.local_code)):
                src = Path(path)
                holder = venv / "rx-code" / f"{i}"
                holder.mkdir(parents=True)
                if src.is_dir():
                    shutil.copytree(src, holder / src.name, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
                else:
                    shutil.copy2(src, holder / src.name)
                # A folder given in env.paths is itself a sys.path entry; a package goes in its holder.
                entry = holder / src.name if src.is_dir() and not (src / "__init__.py").exists() else holder
                lines.append(os.path.relpath(entry, site))
            (site / "rx-code.pth").write_text("\n".join(lines) + "\n")
            if env.modules:
                check = "import importlib, sys\nfor m in sys.argv[1:]: importlib.import_module(m)"
                out = subprocess.run(
                    [str(venv / "bin" / "python"), "-c", check, *env.modules],
                    capture_output=True,
                    text=True,
                    check=False,
                )
                if out.returncode != 0:
                    raise EnvError(
                        f"the packed environment cannot import the app: {out.stderr.strip().splitlines()[-1:]}"
                        f"; unresolved imports {env.unresolved}: add them to env.requirements"
                    )
            part = tarball.with_suffix(".part")
            with tarfile.open(part, "w:gz", compresslevel=1) as tf:
                tf.add(venv, arcname=".")
            os.replace(part, tarball)

    @staticmethod
    def _run(argv: list[str]) -> None:
        out = subprocess.run(argv, capture_output=True, text=True, check=False)
        if out.returncode != 0:
            raise EnvError(f"{' '.join(argv[:3])} ... failed ({out.returncode}): {out.stderr.strip()[-2000:]}")

    def _remember(self, env: EnvSpec, tarball: Path, app_name: str) -> None:
        meta_path = tarball.with_name(tarball.name.replace(".tar.gz", ".json"))
        meta = {"apps": [], **json.loads(meta_path.read_text())} if meta_path.exists() else {"apps": []}
        meta.update(asdict(env), hash=env.hash)
        meta["apps"] = sorted(set(meta["apps"]) | {app_name})
        meta.setdefault("created", datetime.now(UTC).isoformat())
        meta_path.write_text(json.dumps(meta, indent=1))

    # ---- use -----------------------------------------------------------------------------------------
    def python_for(self, app_name: str, spec: AppSpec) -> Path:
        """Pack (or reuse) and unpack on this node; the interpreter to run the app with."""
        packed = self.pack(app_name, spec)
        return Path(ensure_unpacked(str(packed.tarball), packed.hash[:24], self.unpack_dir))

    def list(self) -> list[EnvInfo]:
        """Every environment in the cache, newest first."""
        out = []
        for meta_path in sorted(self.cache_dir.glob("env-*.json")):
            meta = json.loads(meta_path.read_text())
            tarball = meta_path.with_name(meta_path.name.replace(".json", ".tar.gz"))
            if not tarball.exists():
                continue
            out.append(
                EnvInfo(
                    meta["hash"],
                    tarball,
                    tarball.stat().st_size,
                    datetime.fromisoformat(meta["created"]),
                    meta["apps"],
                    meta["requirements"],
                )
            )
        return sorted(out, key=lambda e: e.created, reverse=True)
