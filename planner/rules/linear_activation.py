"""linear (addmm with bias) followed by an activation -> one kernel-library call.

Matches ``act(addmm(bias, x, w))`` and ``act(view(addmm(...), shape))`` (the 3-D linear form).
A pre-activation that has another user (GELU's input saved for backward, or returned) keeps
the chain unfused: the engine rejects regions whose inner values escape.
"""

from __future__ import annotations

from hypatia.planner.rules import Family, Fusion, Kw, Lit, Match, Rule, int_list

ADDMM = ("aten.addmm.default", "$bias", "$x", "$w")
VIEWS = ("aten.view.default", "aten._unsafe_view.default")

# activation name -> the ATen spellings of the activation over X
ACTIVATIONS = {
    "relu": (("aten.relu.default", "X"),),
    "gelu": (("aten.gelu.default", "X"), ("aten.gelu.default", "X", Kw("approximate", "none")), ("hypatia.gelu", "X")),
    "gelu_tanh": (("aten.gelu.default", "X", Kw("approximate", "tanh")), ("aten.gelu.default", "X", Lit("tanh")), ("hypatia.gelu_tanh", "X")),
    "silu": (("aten.silu.default", "X"),),
}


def _fill(pattern, x):
    if pattern == "X":
        return x
    if isinstance(pattern, tuple):
        return tuple(_fill(p, x) for p in pattern)
    return pattern


def activated(act: str, inner) -> tuple:
    """Every spelling of ``act`` applied to ``inner`` and to a view of it."""
    forms = (inner,) + tuple((v, inner, "_") for v in VIEWS)
    return tuple(_fill(spelling, form) for spelling in ACTIVATIONS[act] for form in forms)


def view_shape(match: Match) -> list[int] | None | bool:
    """The view between the addmm and the activation (None when there is none; False when it
    is not a plain list of ints)."""
    views = [i for v in VIEWS for i in match.members(v)]
    if not views:
        return None
    return int_list(match.node(views[0]).args[1]) or False


def _build(act: str):
    def build(match: Match) -> Fusion | None:
        (addmm,) = match.members("aten.addmm.default")
        if match.node(addmm).kwargs:  # beta / alpha scaling
            return None
        shape = view_shape(match)
        if shape is False:
            return None
        i = match.inputs
        return Fusion(act, (i["bias"], i["x"], i["w"]), (shape,))

    return build


RULES = tuple(
    Rule(f"linear_{act}", "linear_activation", "linear_activation", _build(act), activated(act, ADDMM))
    for act in ACTIVATIONS
)

FAMILY = Family("linear_activation", RULES)
