"""Plans: which regions of a canonical graph run as which kernel, as a versioned recipe."""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from typing import Any

RECIPE_FORMAT = 1


class PlanFormatError(ValueError):
    """A recipe does not have the shape of this format version; it must be re-planned."""


@dataclass(frozen=True)
class Region:
    """A connected set of canonical nodes replaced by one kernel call.

    The call receives ``inputs`` (canonical node indices) then ``consts``; its result replaces
    ``output``; every node in ``nodes`` is removed.
    """

    rule: str
    kernel: str
    inputs: tuple[int, ...]
    consts: tuple[Any, ...]
    output: int
    nodes: tuple[int, ...]

    def to_dict(self) -> dict:
        return {
            "rule": self.rule,
            "kernel": self.kernel,
            "inputs": list(self.inputs),
            "consts": list(self.consts),
            "output": self.output,
            "nodes": list(self.nodes),
        }


@dataclass(frozen=True)
class Plan:
    graph_key: str
    regions: tuple[Region, ...] = ()
    policy: str = "HEURISTIC"
    revision: int = 1
    rules_fired: dict = field(default_factory=dict)
    validated: tuple[int, ...] = ()  # outputs of regions already checked in strict mode

    def without(self, failed: set[int], passed: set[int]) -> "Plan":
        """The next revision: regions whose output is in ``failed`` dropped (they run unfused),
        those in ``passed`` remembered as validated."""
        regions = tuple(r for r in self.regions if r.output not in failed)
        validated = tuple(sorted((set(self.validated) | passed) & {r.output for r in regions}))
        return Plan(self.graph_key, regions, self.policy, self.revision + 1, self.rules_fired, validated)

    def to_recipe(self) -> dict:
        return {
            "format": RECIPE_FORMAT,
            "graph_key": self.graph_key,
            "policy": self.policy,
            "revision": self.revision,
            "regions": [r.to_dict() for r in self.regions],
            "validated": list(self.validated),
        }

    @classmethod
    def from_recipe(cls, recipe: Any) -> "Plan":
        if not isinstance(recipe, dict) or recipe.get("format") != RECIPE_FORMAT:
            raise PlanFormatError(f"recipe is not format {RECIPE_FORMAT}")
        try:
            regions = tuple(
                Region(
                    rule=_typed(r["rule"], str),
                    kernel=_typed(r["kernel"], str),
                    inputs=tuple(_typed(i, int) for i in r["inputs"]),
                    consts=tuple(r["consts"]),
                    output=_typed(r["output"], int),
                    nodes=tuple(_typed(i, int) for i in r["nodes"]),
                )
                for r in recipe["regions"]
            )
            return cls(
                graph_key=_typed(recipe["graph_key"], str),
                regions=regions,
                policy=_typed(recipe["policy"], str),
                revision=_typed(recipe["revision"], int),
                validated=tuple(_typed(i, int) for i in recipe.get("validated", ())),
            )
        except (KeyError, TypeError) as exc:
            raise PlanFormatError(f"recipe is malformed: {exc}") from None


def _typed(value: Any, kind: type) -> Any:
    if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
        raise TypeError(f"expected {kind.__name__}, got {type(value).__name__}")
    return value


def recipe_text(recipe: dict) -> str:
    """The canonical JSON text of a recipe, as stored and checksummed."""
    return json.dumps(recipe, sort_keys=True, separators=(",", ":"))


def recipe_checksum(keys: tuple[str, str, str], text: str) -> str:
    return hashlib.sha256("\0".join([*keys, text]).encode()).hexdigest()
