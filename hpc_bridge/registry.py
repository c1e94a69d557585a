"""The apps a site offers: ``site.yaml`` entries merged with ``@app`` declarations."""

from __future__ import annotations

import importlib

from reflexarc.hpc_bridge.apps import REGISTRY, AppError, AppSpec, merge_with_decorator
from reflexarc.hpc_bridge.site_config import SiteConfig


def resolve_apps(cfg: SiteConfig, import_code: bool = True) -> dict[str, AppSpec]:
    """Every app of the site by name.

    Modules listed under ``modules:`` are imported and their ``@app``
    functions registered; ``apps:`` entries are added (and override). With
    ``import_code`` each Python app's function is imported once, so a typo
    in a reference fails at start-up with the reason, not at the first task.
    """
    apps: dict[str, AppSpec] = {}
    for mod in cfg.modules:
        try:
            importlib.import_module(mod)
        except ImportError as exc:
            raise AppError(f"site.yaml modules: cannot import {mod!r}: {exc}") from exc
        for name, spec in REGISTRY.items():
            if spec.function and spec.function.split(":", 1)[0] == mod:
                apps[name] = spec
    for name, spec in cfg.apps.items():
        try:
            apps[name] = merge_with_decorator(spec, import_code=import_code)
        except AppError as exc:
            raise AppError(f"app {name!r}: {exc}") from exc
    return apps
