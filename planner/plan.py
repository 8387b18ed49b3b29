"""Plans: which regions of a canonical graph run as which kernel, as a versioned JSON recipe.

Recipe format 2 adds, per region, where it runs (``placement``: on the graph's device, or on
the host with explicit copies) and, per plan, whether its choices were measured (``tuned``)
and the decisions behind them (every candidate region, what was chosen for it and at what
cost). Format 3 adds the executor decision: every candidate executor's measured time for the
graph this plan rewrites, and the one chosen. Formats 1 and 2 are still read: their regions run
on the device, and they carry no decisions or no executor decision.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field, replace
from typing import Any

import msgpack

from hypatia.canonical import CanonicalGraph, is_ref

RECIPE_FORMAT = 3
READABLE_FORMATS = (1, 2, 3)
PLACEMENTS = ("device", "host")
EAGER = "aten/eager"  # the implementation id of a region left to ATen, op by op


class PlanFormatError(ValueError):
    """A recipe does not have the shape of a known format version; it must be re-planned."""


@dataclass(frozen=True)
class Region:
    """A connected set of canonical nodes replaced by one kernel call.

    The call receives ``inputs`` (canonical node indices) then ``consts``; its result replaces
    ``output``; every node in ``nodes`` is removed. ``placement == "host"`` runs a CPU kernel
    on copies of the inputs and copies the result back to the graph's device.
    """

    rule: str
    kernel: str
    inputs: tuple[int, ...]
    consts: tuple[Any, ...]
    output: int
    nodes: tuple[int, ...]
    placement: str = "device"

    @property
    def implementation(self) -> str:
        """The id benchmark traces and decisions use: the kernel id, ``@host`` when copied."""
        return self.kernel if self.placement == "device" else f"{self.kernel}@{self.placement}"

    def to_dict(self) -> dict:
        return {
            "rule": self.rule,
            "kernel": self.kernel,
            "placement": self.placement,
            "inputs": list(self.inputs),
            "consts": list(self.consts),
            "output": self.output,
            "nodes": list(self.nodes),
        }


def region_key(graph: CanonicalGraph, region: Region) -> str:
    """The structural key of a region: ``r1-`` + a hash of the region's nodes (inputs and members numbered locally), its input
    metas, its constants and its output. It names the region's math and shapes, not the graph it came
    from, so the same layer in another model, process or host reuses its measurements."""
    local = {j: ["in", k] for k, j in enumerate(region.inputs)}
    members = sorted(region.nodes)
    local |= {j: ["m", k] for k, j in enumerate(members)}

    def relabel(arg: Any) -> Any:
        if is_ref(arg):
            return local.get(arg[1], ["x", arg[1]])
        if isinstance(arg, list):
            return [relabel(a) for a in arg]
        if isinstance(arg, dict):
            return {k: relabel(v) for k, v in sorted(arg.items())}
        return arg

    body = [
        [graph.nodes[j].meta for j in region.inputs],
        [[graph.nodes[j].op, relabel(graph.nodes[j].args), relabel(graph.nodes[j].kwargs), graph.nodes[j].meta] for j in members],
        relabel(["n", region.output]),
        list(region.consts),
    ]
    return "r1-" + hashlib.sha256(msgpack.packb(body, use_bin_type=True, default=str)).hexdigest()



@dataclass(frozen=True)
class Decision:
    """What was chosen for one candidate region and why: ``chosen`` is an implementation id
    or :data:`EAGER`; costs are seconds under the plan's policy (measured when ``measured``)."""

    rule: str
    output: int
    chosen: str
    cost_s: float
    eager_s: float
    measured: bool
    heuristic: str = ""  # what the static cost model alone would choose (set when measured)
    heuristic_cost_s: float = 0.0  # the measured cost of that choice (0 where it was not measured)

    def to_dict(self) -> dict:
        return {
            "rule": self.rule, "output": self.output, "chosen": self.chosen,
            "cost_us": round(self.cost_s * 1e6, 3), "eager_us": round(self.eager_s * 1e6, 3),
            "measured": self.measured, "heuristic": self.heuristic,
            "heuristic_cost_us": round(self.heuristic_cost_s * 1e6, 3),
        }

    @classmethod
    def from_dict(cls, d: dict) -> "Decision":
        return cls(
            rule=_typed(d["rule"], str), output=_typed(d["output"], int), chosen=_typed(d["chosen"], str),
            cost_s=float(_typed(d["cost_us"], (int, float))) / 1e6, eager_s=float(_typed(d["eager_us"], (int, float))) / 1e6,
            measured=_typed(d["measured"], bool), heuristic=_typed(d.get("heuristic", ""), str),
            heuristic_cost_s=float(_typed(d.get("heuristic_cost_us", 0.0), (int, float))) / 1e6,
        )


@dataclass(frozen=True)
class ExecutorTime:
    """One candidate executor's measured time for a whole step of the rewritten graph (forward,
    and backward in training); ``error`` where it could not be built or run."""

    name: str
    median_us: float
    spread_us: float = 0.0
    samples: int = 0
    error: str = ""

    def to_dict(self) -> dict:
        return {"name": self.name, "median_us": self.median_us, "spread_us": self.spread_us, "samples": self.samples,
                "error": self.error}

    @classmethod
    def from_dict(cls, d: dict) -> "ExecutorTime":
        return cls(name=_typed(d["name"], str), median_us=float(_typed(d["median_us"], (int, float))),
                   spread_us=float(_typed(d.get("spread_us", 0.0), (int, float))),
                   samples=_typed(d.get("samples", 0), int), error=_typed(d.get("error", ""), str))


@dataclass(frozen=True)
class ExecutorDecision:
    """Which executor runs the rewritten graph, measured as the model ran every candidate."""

    chosen: str
    training: bool
    times: tuple[ExecutorTime, ...] = ()

    def to_dict(self) -> dict:
        return {"chosen": self.chosen, "training": self.training, "times": [t.to_dict() for t in self.times]}

    @classmethod
    def from_dict(cls, d: Any) -> "ExecutorDecision":
        if not isinstance(d, dict):
            raise TypeError(f"an executor decision is a map, not {type(d).__name__}")
        return cls(chosen=_typed(d["chosen"], str), training=_typed(d["training"], bool),
                   times=tuple(ExecutorTime.from_dict(t) for t in d.get("times", ())))


@dataclass(frozen=True)
class Plan:
    graph_key: str
    regions: tuple[Region, ...] = ()
    policy: str = "HEURISTIC"
    revision: int = 1
    rules_fired: dict = field(default_factory=dict)
    validated: tuple[int, ...] = ()  # outputs of regions already checked in strict mode
    tuned: bool = False  # every choice rests on measurements (where a candidate could be measured)
    decisions: tuple[Decision, ...] = ()
    executor: ExecutorDecision | None = None  # measured for this revision's rewritten graph

    def without(self, failed: set[int], passed: set[int]) -> "Plan":
        """The next revision: regions whose output is in ``failed`` dropped (they run unfused),
        those in ``passed`` remembered as validated. Dropping a region changes the rewritten
        graph, so its executor decision goes too."""
        regions = tuple(r for r in self.regions if r.output not in failed)
        validated = tuple(sorted((set(self.validated) | passed) & {r.output for r in regions}))
        executor = self.executor if len(regions) == len(self.regions) else None
        return replace(self, regions=regions, revision=self.revision + 1, validated=validated, executor=executor)

    def with_executor(self, decision: ExecutorDecision) -> "Plan":
        """The next revision, carrying ``decision``."""
        return replace(self, revision=self.revision + 1, executor=decision)

    def superseding(self, previous: "Plan | None") -> "Plan":
        """This plan as the next revision after ``previous``: validated where it already says so
        (its verdicts) or where ``previous`` validated the same kernel in the same place."""
        if previous is None:
            return self
        before = {(r.output, r.implementation) for r in previous.regions if r.output in previous.validated}
        kept = {r.output for r in self.regions if (r.output, r.implementation) in before}
        validated = tuple(sorted(kept | set(self.validated)))
        same = [r.to_dict() for r in self.regions] == [r.to_dict() for r in previous.regions]  # the same rewrite
        return replace(self, revision=previous.revision + 1, validated=validated,
                       executor=previous.executor if same else None)

    def to_recipe(self) -> dict:
        return {
            "format": RECIPE_FORMAT,
            "graph_key": self.graph_key,
            "policy": self.policy,
            "revision": self.revision,
            "tuned": self.tuned,
            "regions": [r.to_dict() for r in self.regions],
            "validated": list(self.validated),
            "decisions": [d.to_dict() for d in self.decisions],
            "executor": self.executor.to_dict() if self.executor is not None else None,
        }

    @classmethod
    def from_recipe(cls, recipe: Any) -> "Plan":
        if not isinstance(recipe, dict) or recipe.get("format") not in READABLE_FORMATS:
            raise PlanFormatError(f"recipe is not one of formats {READABLE_FORMATS}")
        try:
            regions = tuple(
                Region(
                    rule=_typed(r["rule"], str),
                    kernel=_typed(r["kernel"], str),
                    inputs=tuple(_typed(i, int) for i in r["inputs"]),
                    consts=tuple(r["consts"]),
                    output=_typed(r["output"], int),
                    nodes=tuple(_typed(i, int) for i in r["nodes"]),
                    placement=_placement(r.get("placement", "device")),
                )
                for r in recipe["regions"]
            )
            return cls(
                graph_key=_typed(recipe["graph_key"], str),
                regions=regions,
                policy=_typed(recipe["policy"], str),
                revision=_typed(recipe["revision"], int),
                validated=tuple(_typed(i, int) for i in recipe.get("validated", ())),
                tuned=_typed(recipe.get("tuned", False), bool),
                decisions=tuple(Decision.from_dict(d) for d in recipe.get("decisions", ())),
                executor=ExecutorDecision.from_dict(recipe["executor"]) if recipe.get("executor") is not None else None,
            )
        except (KeyError, TypeError, ValueError) as exc:
            raise PlanFormatError(f"recipe is malformed: {exc}") from None


def _placement(value: Any) -> str:
    if value not in PLACEMENTS:
        raise TypeError(f"placement {value!r} is not one of {PLACEMENTS}")
    return value


def _typed(value: Any, kind: type | tuple) -> Any:
    kinds = kind if isinstance(kind, tuple) else (kind,)
    if not isinstance(value, kinds) or (bool not in kinds and isinstance(value, bool)):
        raise TypeError(f"expected {'/'.join(k.__name__ for k in kinds)}, got {type(value).__name__}")
    return value


def recipe_text(recipe: dict) -> str:
    """The canonical JSON text of a recipe, as stored and checksummed."""
    return json.dumps(recipe, sort_keys=True, separators=(",", ":"))


def recipe_checksum(keys: tuple[str, str, str], text: str) -> str:
    return hashlib.sha256("\0".join([*keys, text]).encode()).hexdigest()


def verified_plan(keys: tuple[str, str, str], text: Any, checksum: Any) -> "Plan":
    """The plan a stored row holds, if its checksum and recipe verify (PlanFormatError if not)."""
    try:
        if not isinstance(text, str) or recipe_checksum(keys, text) != checksum:
            raise PlanFormatError("checksum does not match")
        plan = Plan.from_recipe(json.loads(text))
    except ValueError as exc:  # PlanFormatError is one; so is a JSON error
        raise PlanFormatError(str(exc)) from None
    if plan.graph_key != keys[0]:
        raise PlanFormatError("recipe names another graph")
    return plan
