"""JSON Schemas of every file kind reflexarc reads, generated from the same pydantic models that validate them.

Editors use them through the yaml-language-server modeline on a file's first line::

    # yaml-language-server: $schema=./schemas/triggers.json

(write the schema with ``reflexarc schema triggers > schemas/triggers.json``). The models
stay the single definition: a field added to a model appears in its schema.
"""

from __future__ import annotations

import importlib
import json
from typing import Any

#: File kind -> (module, model class, what the file is). Imported only when asked for.
KINDS: dict[str, tuple[str, str, str]] = {
    "triggers": ("reflexarc.cloud.model", "TriggersFile", "reflexarc triggers file (triggers.yaml)"),
    "agent": ("reflexarc.edge.config", "AgentConfig", "reflexarc edge agent file (agent.yaml)"),
    "fog": ("reflexarc.fog.config", "FogConfig", "reflexarc fog bridge file (fog.yaml)"),
    "site": ("reflexarc.hpc_bridge.site_config", "SiteConfig", "reflexarc HPC site file (site.yaml)"),
    "pipeline": ("reflexarc.supervisor", "PipelineConfig", "reflexarc pipeline file (pipeline.yaml)"),
    "fleet": ("reflexarc.deploy.fleet", "FleetFile", "reflexarc fleet inventory (fleet.yaml)"),
    "pools": ("reflexarc.hpc_bridge.compose.inventory", "PoolsConfig", "reflexarc resource pools (pools.yaml)"),
}

SCHEMA_BASE = "https://reflexarc.invalid/schemas/"


def schema_of(kind: str) -> dict[str, Any]:
    """The JSON Schema (draft 2020-12) of file kind ``kind`` (one of :data:`KINDS`); ``KeyError`` otherwise."""
    module, attr, title = KINDS[kind]
    model = getattr(importlib.import_module(module), attr)
    schema: dict[str, Any] = model.model_json_schema(mode="validation")
    # Fields the loader fills in (never written in the file) are not part of the file's schema.
    for internal in ("base_dir",):
        schema.get("properties", {}).pop(internal, None)
    schema["$schema"] = "https://json-schema.org/draft/2020-12/schema"
    schema["$id"] = f"{SCHEMA_BASE}{kind}.json"
    schema["title"] = title
    return schema


def schema_text(kind: str) -> str:
    """The schema as indented JSON text."""
    return json.dumps(schema_of(kind), indent=2)
