"""Linear -> activation -> Linear as one plan region (the two-layer MLP).

Built on the linear_activation family's e-nodes: ``addmm(bias2, h, w2)`` where ``h`` is a
``hypatia.linear_<act>`` (possibly viewed to 3-D and back), optionally viewed at the end.
"""

from __future__ import annotations

from hypatia.planner.rules import Family, Fusion, Match, Rule, int_list, shape_of
from hypatia.planner.rules.linear_activation import ACTIVATIONS, VIEWS


def _patterns(act: str) -> tuple:
    first = (f"hypatia.linear_{act}", "$bias1", "$x", "$w1")
    hidden = (first,) + tuple((v, first, "_") for v in VIEWS)
    second = tuple(("aten.addmm.default", "$bias2", h, "$w2") for h in hidden)
    return second + tuple((v, s, "_") for v in VIEWS for s in second)


def _build(act: str):
    def build(match: Match) -> Fusion | None:
        addmms = match.members("aten.addmm.default")
        if len(addmms) != 2 or any(match.node(a).kwargs for a in addmms):
            return None
        first, second = addmms
        out_shape = None
        if match.node(match.root).op in VIEWS:
            out_shape = int_list(match.node(match.root).args[1])
            if out_shape is None:
                return None
        # A view between the layers may only bring the activation back to the first GEMM's
        # 2-D shape (the 3-D linear form views out and back in).
        hidden = match.node(second).args[1][1]
        if match.node(hidden).op in VIEWS and shape_of(match.graph, hidden) != shape_of(match.graph, first):
            return None
        i = match.inputs
        return Fusion(act, (i["bias1"], i["x"], i["w1"], i["bias2"], i["w2"]), (out_shape,))

    return build


RULES = tuple(Rule(f"mlp_{act}", "mlp", "mlp", _build(act), _patterns(act)) for act in ACTIVATIONS)

FAMILY = Family("mlp", RULES)
