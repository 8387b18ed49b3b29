"""Attention written out by hand -> ``scaled_dot_product_attention``.

AOTAutograd spells ``a @ b`` on 4-D tensors as expand -> (clone) -> view -> bmm -> view; two
rewrites fold every such spelling into one ``hypatia.matmul`` e-node, so the attention rules
only enumerate what matters: scale by mul or div (or none), an optional mask (additive,
``masked_fill`` or ``where``), softmax (ATen's or the hand-written one found by the
normalization family), then the matmul with V. Dropout is not fused: with p > 0 its random
stream could not match eager, and in inference AOTAutograd has already removed it.
"""

from __future__ import annotations

from hypatia.planner.rules import Family, Fusion, Lit, Match, Rewrite, Rule, last_dim, scalar, shape_of

VIEWS = ("aten.view.default", "aten._unsafe_view.default")
EXPAND = ("aten.expand.default", "$a", "_")

REWRITES = tuple(
    Rewrite(f"batch_flatten {view} {form}", (view, inner, "_"), ("hypatia.bflat", "$a"))
    for view in VIEWS
    for form, inner in (("expand", EXPAND), ("clone", ("aten.clone.default", EXPAND, "_")))
) + tuple(
    Rewrite(f"matmul {view}", (view, ("aten.bmm.default", ("hypatia.bflat", "$a"), ("hypatia.bflat", "$b")), "_"), ("hypatia.matmul", "$a", "$b"))
    for view in VIEWS
)

SCORES = ("hypatia.matmul", "$q", "$kt")
SCALED = (SCORES, ("aten.mul.Tensor", SCORES, "_"), ("aten.div.Tensor", SCORES, "_"))
MASKS = {
    "add": lambda s: ("aten.add.Tensor", s, "$mask"),
    "fill": lambda s: ("aten.masked_fill.Scalar", s, "$mask", "_"),
    "keep": lambda s: ("aten.where.self", "$mask", s, "$fill"),
}
SOFTMAX = (lambda s: ("aten._softmax.default", s, "_", Lit(False)), lambda s: ("hypatia.softmax", s))


def _patterns(masks) -> tuple:
    out = []
    for scaled in SCALED:
        for masked in [m(scaled) for m in masks] if masks else [scaled]:
            for softmax in SOFTMAX:
                out.append(("hypatia.matmul", softmax(masked), "$v"))
    return tuple(out)


def _scale(match: Match) -> float | None:
    for op, invert in (("aten.mul.Tensor", False), ("aten.div.Tensor", True)):
        for i in match.members(op):
            consts = [scalar(a) for a in match.node(i).args if not isinstance(a, list)]
            consts = [c for c in consts if c is not None]
            if len(consts) != 1 or consts[0] == 0:
                return None
            return 1.0 / consts[0] if invert else consts[0]
    return 1.0


def _softmax_on_last(match: Match) -> bool:
    for i in match.members("aten._softmax.default"):
        rank = len(shape_of(match.graph, i) or [])
        if not last_dim(match.node(i).args[1], rank):
            return False
    for op in ("aten.amax.default", "aten.sum.dim_IntList", "aten.max.dim"):
        for i in match.members(op):
            rank = len(shape_of(match.graph, match.node(i).args[0][1]) or [])
            if not last_dim(match.node(i).args[1], rank):
                return False
    return True


def _build(kind: str | None):
    def build(match: Match) -> Fusion | None:
        g, inp = match.graph, match.inputs
        q, kt, v = (shape_of(g, inp[n]) for n in ("q", "kt", "v"))
        if not (q and kt and v) or not (len(q) == len(kt) == len(v) >= 3):
            return None
        if kt[-2] != q[-1] or v[-2] != kt[-1] or shape_of(g, match.root) != q[:-1] + [v[-1]]:
            return None
        # expand must not broadcast: SDPA's batch semantics are then exactly bmm's.
        for i in match.members("aten.expand.default"):
            if shape_of(g, i) != shape_of(g, match.node(i).args[0][1]):
                return None
        if not _softmax_on_last(match):
            return None
        scale = _scale(match)
        if scale is None:
            return None
        if kind is None:
            return Fusion("sdpa", (inp["q"], inp["kt"], inp["v"]), (scale,))
        (masked,) = match.members({"add": "aten.add.Tensor", "fill": "aten.masked_fill.Scalar", "keep": "aten.where.self"}[kind])
        scores = q[:-1] + [kt[-1]]
        if shape_of(g, masked) != scores:  # the mask must not broadcast the scores any further
            return None
        fill = None
        if kind == "fill":
            fill = scalar(match.node(masked).args[2])
            if fill is None or fill > -1e4:
                return None
            return Fusion("sdpa_mask", (inp["q"], inp["kt"], inp["v"], inp["mask"]), (scale, kind, fill))
        if kind == "keep":
            return Fusion("sdpa_where", (inp["q"], inp["kt"], inp["v"], inp["mask"], inp["fill"]), (scale,))
        return Fusion("sdpa_mask", (inp["q"], inp["kt"], inp["v"], inp["mask"]), (scale, kind, None))

    return build


RULES = (
    Rule("attention", "attention", "attention", _build(None), _patterns(None)),
    *(Rule(f"attention_{kind}_mask", "attention", "attention", _build(kind), _patterns([m])) for kind, m in MASKS.items()),
)

FAMILY = Family("attention", RULES, REWRITES)
