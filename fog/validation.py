"""Per-stream validation of event data: JSON Schema or a pydantic model declared in fog.yaml.

Validators are built once per stream entry at start-up (a bad schema is a
configuration error, reported with file and line) and return ``None`` for a
valid event or a short reason naming the offending field for a bad one.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, create_model

from reflexarc.fog.config import FieldSpec, StreamSettings

Validator = Callable[[dict[str, Any] | bytes | None], str | None]

_TYPES: dict[str, Any] = {
    "number": float,
    "integer": int,
    "string": str,
    "boolean": bool,
    "object": dict[str, Any],
    "array": list[Any],
    "any": Any,
}


def _field(spec: FieldSpec) -> tuple[Any, Any]:
    typ: Any = _TYPES[spec.type]
    if spec.enum is not None:
        typ = Literal[tuple(spec.enum)]
    if not spec.required:
        typ = typ | None
    constraints: dict[str, Any] = {
        k: v
        for k, v in {
            "ge": spec.ge,
            "gt": spec.gt,
            "le": spec.le,
            "lt": spec.lt,
            "min_length": spec.min_length,
            "max_length": spec.max_length,
            "pattern": spec.pattern,
        }.items()
        if v is not None
    }
    default = ... if spec.required else None
    return typ, Field(default, **constraints)


def build_model(
    name: str, fields: dict[str, FieldSpec], extra: Literal["allow", "forbid", "ignore"] = "allow"
) -> type[BaseModel]:
    """A pydantic model from declared fields (strict: '1' is not a number)."""
    model_fields = {fname: _field(spec) for fname, spec in fields.items()}
    config = ConfigDict(extra=extra, strict=True)
    model: type[BaseModel] = create_model(f"Stream_{name}", __config__=config, **model_fields)  # type: ignore[call-overload]  # fields built at run time
    return model


def _pydantic_validator(model: type[BaseModel]) -> Validator:
    def check(data: dict[str, Any] | bytes | None) -> str | None:
        if not isinstance(data, dict):
            return "data must be a JSON object for this stream's model"
        try:
            model.model_validate(data)
        except ValidationError as exc:
            err = exc.errors()[0]
            where = ".".join(str(p) for p in err["loc"]) or "data"
            more = f" (and {exc.error_count() - 1} more)" if exc.error_count() > 1 else ""
            return f"model violation at {where}: {err['msg']}{more}"
        return None

    return check


def _schema_validator(schema: dict[str, Any]) -> Validator:
    from jsonschema import validators
    from jsonschema.exceptions import best_match

    cls = validators.validator_for(schema)
    v = cls(schema, format_checker=cls.FORMAT_CHECKER)

    def check(data: dict[str, Any] | bytes | None) -> str | None:
        if not isinstance(data, dict):
            return "data must be a JSON object for this stream's schema"
        err = best_match(v.iter_errors(data))
        if err is None:
            return None
        where = "/".join(str(p) for p in err.absolute_path) or "(root)"
        return f"schema violation at {where}: {err.message}"

    return check


def build_validator(stream: StreamSettings) -> Validator | None:
    """The validator of a stream entry, or ``None`` when it declares nothing to check."""
    checks: list[Validator] = []
    if stream.require_json:
        checks.append(lambda d: None if isinstance(d, dict) else "data must be a JSON object")
    schema = stream.schema_in_force()
    if schema is not None:
        checks.append(_schema_validator(schema))
    if stream.fields:
        safe = "".join(c if c.isalnum() else "_" for c in stream.match)
        checks.append(_pydantic_validator(build_model(safe, stream.fields, stream.extra_fields)))
    if not checks:
        return None
    if len(checks) == 1:
        return checks[0]

    def all_of(data: dict[str, Any] | bytes | None) -> str | None:
        for c in checks:
            reason = c(data)
            if reason is not None:
                return reason
        return None

    return all_of
