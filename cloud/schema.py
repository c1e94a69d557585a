"""JSON Schema of ``triggers.yaml``, generated from the pydantic models (for editors)."""

from __future__ import annotations

import json
from typing import Any

from reflexarc.cloud.model import TriggersFile

SCHEMA_ID = "https://reflexarc.invalid/schemas/triggers.json"


def triggers_schema() -> dict[str, Any]:
    """The JSON Schema (draft 2020-12) of a triggers file."""
    schema = TriggersFile.model_json_schema(mode="validation")
    schema["$schema"] = "https://json-schema.org/draft/2020-12/schema"
    schema["$id"] = SCHEMA_ID
    schema["title"] = "reflexarc triggers file"
    return schema


def schema_json() -> str:
    """The schema as indented JSON text."""
    return json.dumps(triggers_schema(), indent=2, sort_keys=False)
