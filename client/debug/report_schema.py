"""The JSON Schema (draft 2020-12) of the report, ``hypatia-report/1``, and a validator for the
part of JSON Schema it uses (type, const, enum, required, properties, additionalProperties,
items, minimum), so checking a report needs no extra package."""

from __future__ import annotations

from typing import Any

_NUM = {"type": "number"}
_INT = {"type": "integer", "minimum": 0}
_STR = {"type": "string"}
_NUM_OR_TEXT = {"type": ["number", "string", "null"]}  # "nan"/"inf" stand for non-finite floats
_OBJ_OR_NULL = {"type": ["object", "null"]}


def _obj(props: dict[str, Any], extra: bool | dict = False) -> dict[str, Any]:
    return {"type": "object", "required": sorted(props), "properties": props, "additionalProperties": extra}


def _list(item: dict[str, Any]) -> dict[str, Any]:
    return {"type": "array", "items": item}


_EXECUTOR = {"chosen": _STR, "times": {"type": "object", "additionalProperties": {"type": ["number", "null"]}},
             "speedup": {"type": ["number", "null"]}, "source": {"enum": ["daemon", "artifacts"]}}

SUMMARY = _obj({
    "processes": _INT,
    "graphs": _INT,
    "graph_breaks": _INT,
    "fallbacks": _list(_obj({"reason": _STR, "count": _INT})),
    "regions_per_rule": {"type": "object", "additionalProperties": _INT},
    "executors": _list(_obj({"graph": _STR, **_EXECUTOR})),
    "verdicts": _obj({"passed": _INT, "failed": _INT}),
    "kerneldiff": _list(_obj({"graph": _STR, "passed": {"type": "boolean"},
                              "worst_tensor": {"type": ["string", "null"]}, "max_abs": _NUM_OR_TEXT})),
    "constraint_violations": _list(_obj({"graph": _STR, "adapter": _STR,
                                         "kind": _STR, "node": _STR, "detail": _STR})),
})

GRAPH = _obj({
    "id": _STR, "process": _STR, "name": _STR, "path": _STR,
    "summary": _OBJ_OR_NULL, "stats": _OBJ_OR_NULL, "rewrites": _OBJ_OR_NULL,
    "graph_breaks": _list({"type": "object"}),
    "kerneldiff": _OBJ_OR_NULL,
    "executor": {"anyOf": [{"type": "null"}, _obj(_EXECUTOR)]},
    "files": _list(_obj({"name": _STR, "bytes": _INT})),
    "repros": _list(_STR),
    "missing": _list(_STR),
})

PROCESS = _obj({"name": _STR, "path": _STR, "info": _OBJ_OR_NULL, "graph_breaks": _list({"type": "object"}),
                "graphs": _INT, "files": _list(_obj({"name": _STR, "bytes": _INT}))})

SCHEMA: dict[str, Any] = {
    "$schema": "https://json-schema.org/draft/2020-12/schema",
    "$id": "hypatia-report/1",
    "title": "Hypatia debug report",
    **_obj({
        "schema": {"const": "hypatia-report/1"},
        "generated": _STR,
        "artifacts": {"type": ["string", "null"]},
        "summary": SUMMARY,
        "processes": _list(PROCESS),
        "graphs": _list(GRAPH),
        "daemon": {"anyOf": [{"type": "null"}, {"type": "object", "required": ["running"],
                                                 "properties": {"running": {"type": "boolean"}}}]},
        "notes": _list(_STR),
    }),
}


class SchemaViolation(ValueError):
    """A document does not match the schema; the message names the JSON path."""


_TYPES = {
    "object": lambda v: isinstance(v, dict),
    "array": lambda v: isinstance(v, list),
    "string": lambda v: isinstance(v, str),
    "boolean": lambda v: isinstance(v, bool),
    "null": lambda v: v is None,
    "integer": lambda v: isinstance(v, int) and not isinstance(v, bool),
    "number": lambda v: isinstance(v, (int, float)) and not isinstance(v, bool),
}


def errors(doc: Any, schema: dict[str, Any] = SCHEMA, path: str = "$") -> list[str]:
    """Every place where ``doc`` breaks ``schema``, as "path: why" lines (empty when it matches)."""
    found: list[str] = []
    if "anyOf" in schema:
        if all(errors(doc, s, path) for s in schema["anyOf"]):
            found.append(f"{path}: matches none of the allowed shapes")
        return found
    kinds = schema.get("type")
    if kinds is not None:
        kinds = [kinds] if isinstance(kinds, str) else kinds
        if not any(_TYPES[k](doc) for k in kinds):
            return [f"{path}: expected {' or '.join(kinds)}, got {type(doc).__name__}"]
    if "const" in schema and doc != schema["const"]:
        found.append(f"{path}: expected {schema['const']!r}")
    if "enum" in schema and doc not in schema["enum"]:
        found.append(f"{path}: {doc!r} is not one of {schema['enum']}")
    if "minimum" in schema and isinstance(doc, (int, float)) and doc < schema["minimum"]:
        found.append(f"{path}: {doc} < {schema['minimum']}")
    if isinstance(doc, dict):
        props = schema.get("properties", {})
        for key in schema.get("required", ()):
            if key not in doc:
                found.append(f"{path}: lacks {key!r}")
        extra = schema.get("additionalProperties", True)
        for key, value in doc.items():
            if key in props:
                found += errors(value, props[key], f"{path}.{key}")
            elif extra is False:
                found.append(f"{path}: unexpected key {key!r}")
            elif isinstance(extra, dict):
                found += errors(value, extra, f"{path}.{key}")
    if isinstance(doc, list) and "items" in schema:
        for i, item in enumerate(doc):
            found += errors(item, schema["items"], f"{path}[{i}]")
    return found


def validate(doc: Any, schema: dict[str, Any] = SCHEMA) -> None:
    """Raise :class:`SchemaViolation` listing every mismatch when ``doc`` does not match."""
    found = errors(doc, schema)
    if found:
        raise SchemaViolation("; ".join(found[:20]) + (f" (and {len(found) - 20} more)" if len(found) > 20 else ""))
