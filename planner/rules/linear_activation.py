"""linear (addmm with bias) followed by ReLU or GELU -> one kernel-library call.

Matches ``act(addmm(bias, mat1, mat2))`` and ``act(view(addmm(...), shape))`` (the 3-D linear
form). The addmm and the view must have no user other than the next node of the chain: a
pre-activation that is also saved for backward (GELU in training) or returned stays unfused.
"""

from __future__ import annotations

from dataclasses import dataclass

from hypatia.canonical import CanonicalGraph, is_ref
from hypatia.kernels import lookup
from hypatia.kernels.registry import DEVICE_BACKENDS
from hypatia.planner.plan import Region

OP = "linear_activation"
VIEW_OPS = ("aten.view.default", "aten._unsafe_view.default")


@dataclass(frozen=True)
class Rule:
    name: str
    activation: str
    approximate: str | None
    signature: str


RULES = (
    Rule("linear_relu", "aten.relu.default", None, "relu"),
    Rule("linear_gelu", "aten.gelu.default", "none", "gelu"),
    Rule("linear_gelu_tanh", "aten.gelu.default", "tanh", "gelu_tanh"),
)


def _approximate(node) -> str | None:
    if node.op != "aten.gelu.default":
        return None
    if "approximate" in node.kwargs:
        return node.kwargs["approximate"]
    return node.args[1] if len(node.args) > 1 else "none"


def _int_list(arg) -> list[int] | None:
    if isinstance(arg, list) and len(arg) == 2 and arg[0] == "l":
        items = arg[1]
        if all(isinstance(v, int) and not isinstance(v, bool) for v in items):
            return list(items)
    return None


def _device_type(meta) -> str | None:
    return meta[4] if isinstance(meta, list) and len(meta) == 5 and meta[0] == "T" else None


def match(graph: CanonicalGraph, rule: Rule, claimed: set[int]) -> list[Region]:
    """Every non-overlapping place in ``graph`` where ``rule`` applies."""
    regions = []
    nodes = graph.nodes
    for idx, act in enumerate(nodes):
        if act.op != rule.activation or _approximate(act) != rule.approximate or idx in claimed:
            continue
        if not act.args or not is_ref(act.args[0]):
            continue
        chain = [idx]
        src = act.args[0][1]
        shape = None
        if nodes[src].op in VIEW_OPS:
            view = nodes[src]
            shape = _int_list(view.args[1]) if len(view.args) > 1 else None
            if view.users != 1 or shape is None or not is_ref(view.args[0]):
                continue
            chain.append(src)
            src = view.args[0][1]
        addmm = nodes[src]
        if addmm.op != "aten.addmm.default" or addmm.users != 1 or len(addmm.args) != 3:
            continue
        if any(addmm.kwargs.get(k, 1) != 1 for k in ("beta", "alpha")) or not all(map(is_ref, addmm.args)):
            continue
        chain.append(src)
        if claimed.intersection(chain):
            continue
        backend = DEVICE_BACKENDS.get(_device_type(act.meta))
        spec = lookup(OP, backend, rule.signature) if backend else None
        if spec is None:
            continue
        claimed.update(chain)
        regions.append(
            Region(
                rule=rule.name,
                kernel=spec.id,
                inputs=tuple(a[1] for a in addmm.args),
                consts=(shape,),
                output=idx,
                nodes=tuple(sorted(chain)),
            )
        )
    return regions
