"""Attention written out by hand -> ``scaled_dot_product_attention``.

AOTAutograd spells ``a @ b`` on 4-D tensors as expand -> (clone) -> view -> bmm -> view; two
rewrites fold every such spelling into one ``hypatia.matmul`` e-node. Models spell the
attention probabilities many ways too: ATen's softmax or a hand-written one (found by the
normalization family), computed in float32 and cast back to a 16-bit dtype (``transformers``),
followed by dropout that draws nothing (p = 0, or not training: a clone, or the dropout op
where tracing keeps it). The ``probs`` rewrites fold each of those into one ``hypatia.probs``
e-node, so the rules only enumerate what matters: the scale (mul or div by a constant, or
none), the mask (additive, a bias then an additive mask as T5 spells it, ``masked_fill``,
``where`` on a boolean mask, or ``where`` then an additive mask as GPT-2 spells it), then the
matmul with V.

A rewrite cannot see dtypes or argument values, so ``build`` checks them on the region's nodes:
casts only widen to float32 and come back to the inputs' dtype, softmax runs over the last
dimension, dropout draws nothing, the scale is a constant and a mask never widens the scores.
Dropout with p > 0 in training never matches: the e-graph keeps it opaque (its random stream
could not match eager's). ``repeat_kv`` (GQA) stays outside the region: SDPA gets the expanded
K and V, which keeps every backend (and any mask) available to it.
"""

from __future__ import annotations

import math

from hypatia.canonical import is_ref, refs
from hypatia.planner.egraph import identity_dropout
from hypatia.planner.rules import Family, Fusion, Lit, Match, Rewrite, Rule, last_dim, scalar, shape_of, tensor_meta

VIEWS = ("aten.view.default", "aten._unsafe_view.default")
EXPAND = ("aten.expand.default", "$a", "_")

MATMUL_REWRITES = tuple(
    Rewrite(f"batch_flatten {view} {form}", (view, inner, "_"), ("hypatia.bflat", "$a"))
    for view in VIEWS
    for form, inner in (("expand", EXPAND), ("clone", ("aten.clone.default", EXPAND, "_")))
) + tuple(
    Rewrite(f"matmul {view}", (view, ("aten.bmm.default", ("hypatia.bflat", "$a"), ("hypatia.bflat", "$b")), "_"), ("hypatia.matmul", "$a", "$b"))
    for view in VIEWS
)

# -- the probabilities, however a model spells them -------------------------------------------

PROBS = ("hypatia.probs", "$s")
CASTS = ("aten._to_copy.default", "prims.convert_element_type.default")
DROPOUTS = ("aten.dropout.default", "aten.native_dropout.default")


def _cast(x, keywords: int) -> tuple:
    """``_to_copy(x, dtype=..[, layout, device, ...])``: its keyword arguments are children."""
    return ("aten._to_copy.default", x, *("_",) * keywords)


CAST_FORMS = tuple((f"to_copy{n}", lambda x, n=n: _cast(x, n)) for n in range(1, 6)) + (
    ("convert_element_type", lambda x: ("prims.convert_element_type.default", x, "_")),
)

PROBS_REWRITES = (
    Rewrite("probs.softmax", ("aten._softmax.default", "$s", "_", Lit(False)), PROBS),
    Rewrite("probs.hand_written_softmax", ("hypatia.softmax", "$s"), PROBS),
    # CUDA's softmax(x, dtype=float32) of a float16 x: half_to_float, then a cast back
    Rewrite("probs.half_to_float_softmax", ("aten._softmax.default", "$s", "_", Lit(True)), PROBS),
    *(Rewrite(f"probs.float32_softmax.{name}", ("aten._softmax.default", cast("$s"), "_", Lit(False)), PROBS)
      for name, cast in CAST_FORMS),
    *(Rewrite(f"probs.cast_back.{name}", cast(PROBS), PROBS) for name, cast in CAST_FORMS),
    # dropout that draws nothing, as tracing leaves it
    Rewrite("probs.clone", ("aten.clone.default", PROBS), PROBS),
    Rewrite("probs.clone_format", ("aten.clone.default", PROBS, "_"), PROBS),
    Rewrite("probs.alias", ("aten.alias.default", PROBS), PROBS),
    Rewrite("probs.dropout_off", ("aten.dropout.default", PROBS, "_", "_"), PROBS),
    Rewrite("probs.native_dropout_off", ("_operator.getitem", ("aten.native_dropout.default", PROBS, "_", "_"), Lit(0)), PROBS),
)

# -- scale, mask, and the rules -----------------------------------------------------------------

SCORES = ("hypatia.matmul", "$q", "$kt")
SCALED = (SCORES, ("aten.mul.Tensor", SCORES, "_"), ("aten.div.Tensor", SCORES, "_"))
WHERE = "aten.where.self"
# kind -> the masked scores; a "_" fill is a constant computed in the region (full, scalar_tensor)
MASKS = {
    "add": (lambda s: ("aten.add.Tensor", s, "$mask"),),
    # a bias, then the mask (T5's position bias): two additive masks
    "bias": (lambda s: ("aten.add.Tensor", ("aten.add.Tensor", s, "$bias"), "$mask"),),
    "fill": (lambda s: ("aten.masked_fill.Scalar", s, "$mask", "_"),),
    "keep": (lambda s: (WHERE, "$mask", s, "_"), lambda s: (WHERE, "$mask", s, "$fill")),
    "keep_add": (lambda s: ("aten.add.Tensor", (WHERE, "$keep", s, "_"), "$mask"),),
}

# A fill at or below this absorbs any score in float32 arithmetic (s + fill == fill), so an
# additive mask gives eager's answer even on a row where every position is masked.
ABSORBING = -1e30
# A fill above this is not a mask (the masked positions would keep weight).
MASKING = -1e4

SOFTMAX_OPS = ("aten._softmax.default", "aten.amax.default", "aten.sub.Tensor", "aten.exp.default",
               "aten.sum.dim_IntList", "aten.max.dim", "_operator.getitem")
REGION_OPS = frozenset((*VIEWS, "aten.expand.default", "aten.clone.default", "aten.bmm.default", "aten.mul.Tensor",
                        "aten.div.Tensor", "aten.add.Tensor", WHERE, "aten.masked_fill.Scalar", "aten.alias.default",
                        "aten.full.default", "aten.scalar_tensor.default", *SOFTMAX_OPS, *CASTS, *DROPOUTS))


def _patterns(kind: str | None) -> tuple:
    out = []
    for scaled in SCALED:
        for masked in [m(scaled) for m in MASKS[kind]] if kind else [scaled]:
            out.append(("hypatia.matmul", ("hypatia.probs", masked), "$v"))
    return tuple(out)


def _dtype(match: Match, i: int) -> str | None:
    m = tensor_meta(match.graph.nodes[i].meta)
    return m[1] if m else None


def _const(match: Match, arg) -> float | None:
    """A constant argument's value: a number, or a 0-d ``full`` / ``scalar_tensor`` node."""
    if not is_ref(arg):
        return scalar(arg)
    node = match.graph.nodes[arg[1]]
    if node.op == "aten.scalar_tensor.default" and node.args:
        return scalar(node.args[0])
    if node.op == "aten.full.default" and len(node.args) >= 2 and node.args[0] == ["l", []]:
        return scalar(node.args[1])
    return None


def _region_ops_known(match: Match) -> bool:
    """Only attention's own operators in the region, around exactly two batched matmuls."""
    ops = [match.node(i).op for i in match.nodes]
    return set(ops) <= REGION_OPS and ops.count("aten.bmm.default") == 2


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


def _casts_widen_and_return(match: Match, dtype: str) -> bool:
    """Casts only go between the inputs' dtype and float32 (softmax computed wider, then cast
    back): SDPA accumulates at least that precisely. Nothing changes device."""
    allowed = {dtype, "float32"}
    for i in [j for op in CASTS for j in match.members(op)] + match.members("aten._softmax.default"):
        source = match.node(i).args[0]
        if not is_ref(source):
            return False
        a, b = tensor_meta(match.graph.nodes[source[1]].meta), tensor_meta(match.node(i).meta)
        if not (a and b) or a[1] not in allowed or b[1] not in allowed or a[2] != b[2]:
            return False
    return True


def _dropout_off(match: Match) -> bool:
    if not all(identity_dropout(match.node(i)) for op in DROPOUTS for i in match.members(op)):
        return False
    # only the dropout's value (result 0) may be read, never its mask
    return all(match.node(i).args[1] == 0 for i in match.members("_operator.getitem")
               if match.graph.nodes[match.node(i).args[0][1]].op == "aten.native_dropout.default")


def _scale(match: Match) -> float | None:
    """The constant the scores are multiplied by (1.0 where they are not scaled), or None."""
    bmms = set(match.members("aten.bmm.default"))
    scores = {i for op in VIEWS for i in match.members(op)
              if i != match.root and any(j in bmms for j in refs(match.node(i).args))}
    scaling = [i for op in ("aten.mul.Tensor", "aten.div.Tensor") for i in match.members(op)
               if scores.intersection(refs(match.node(i).args))]
    if not scaling:
        return 1.0
    if len(scaling) != 1:
        return None
    node = match.node(scaling[0])
    others = [a for a in node.args if not (is_ref(a) and a[1] in scores)]
    value = _const(match, others[0]) if len(others) == 1 else None
    if value is None or value == 0 or not math.isfinite(value):
        return None
    return 1.0 / value if node.op == "aten.div.Tensor" else value


def _mask_node(match: Match, op: str, name: str) -> int | None:
    """The region's ``op`` node that reads input ``name``."""
    nodes = [i for i in match.members(op) if match.inputs[name] in refs(match.node(i).args)]
    return nodes[0] if len(nodes) == 1 else None


def _build(kind: str | None):
    def build(match: Match) -> Fusion | None:
        g, inp = match.graph, match.inputs
        q, kt, v = (shape_of(g, inp[n]) for n in ("q", "kt", "v"))
        if not (q and kt and v) or not (len(q) == len(kt) == len(v) >= 3):
            return None
        if kt[-2] != q[-1] or v[-2] != kt[-1] or shape_of(g, match.root) != q[:-1] + [v[-1]]:
            return None
        dtype = _dtype(match, inp["q"])
        if dtype not in ("float32", "float16", "bfloat16", "float64"):
            return None
        if any(_dtype(match, i) != dtype for i in (inp["kt"], inp["v"], match.root)):
            return None
        # expand must not broadcast: SDPA's batch semantics are then exactly bmm's.
        for i in match.members("aten.expand.default"):
            if shape_of(g, i) != shape_of(g, match.node(i).args[0][1]):
                return None
        if not (_region_ops_known(match) and _softmax_on_last(match) and _casts_widen_and_return(match, dtype)
                and _dropout_off(match)):
            return None
        scale = _scale(match)
        if scale is None:
            return None
        qkv = (inp["q"], inp["kt"], inp["v"])
        if kind is None:
            return Fusion("sdpa", qkv, (scale,))
        return _masked(match, kind, q[:-1] + [kt[-1]], dtype, qkv, scale)

    return build


def _masked(match: Match, kind: str, scores: list, dtype: str, qkv: tuple, scale: float) -> Fusion | None:
    """The fused call for a masked form, or None where the mask is not one SDPA can take as it
    is: it widens the scores, is of another dtype, or its fill would not mask."""
    g, inp = match.graph, match.inputs
    op = {"fill": "aten.masked_fill.Scalar", "keep": WHERE}.get(kind, "aten.add.Tensor")
    masked = _mask_node(match, op, "mask")
    if masked is None or shape_of(g, masked) != scores:  # the mask must not broadcast the scores any further
        return None
    additive = ("mask", "bias") if kind == "bias" else ("mask",) if kind in ("add", "keep_add") else ()
    if any(_dtype(match, inp[name]) != dtype for name in additive):
        return None
    if kind == "add":
        return Fusion("sdpa_mask", (*qkv, inp["mask"]), (scale, "add", None))
    if kind == "bias":
        biased = _mask_node(match, "aten.add.Tensor", "bias")
        if biased is None or shape_of(g, biased) != scores:
            return None
        return Fusion("sdpa_bias_mask", (*qkv, inp["bias"], inp["mask"]), (scale,))
    if kind == "fill":
        fill = scalar(match.node(masked).args[2])
        if _dtype(match, inp["mask"]) != "bool" or fill is None or fill > MASKING:
            return None
        return Fusion("sdpa_mask", (*qkv, inp["mask"]), (scale, "fill", fill))
    keep = _mask_node(match, WHERE, "keep" if kind == "keep_add" else "mask")
    if keep is None or shape_of(g, keep) != scores or _dtype(match, g.nodes[keep].args[0][1]) != "bool":
        return None
    if kind == "keep" and "fill" in inp:  # a fill the planner cannot read (a tensor constant): a 0-d input
        if shape_of(g, inp["fill"]) != [] or _const(match, ["n", inp["fill"]]) is not None:
            return None
        return Fusion("sdpa_where", (*qkv, inp["mask"], inp["fill"]), (scale,))
    fill = _const(match, g.nodes[keep].args[2])
    if fill is None or fill > MASKING:
        return None
    if kind == "keep":
        return Fusion("sdpa_mask", (*qkv, inp["mask"]), (scale, "keep", fill))
    if fill > ABSORBING:  # where's fill, then the additive mask: exact only when the fill absorbs
        return None
    return Fusion("sdpa_keep_add", (*qkv, inp["keep"], inp["mask"]), (scale, fill))


RULES = (
    Rule("attention", "attention", "attention", _build(None), _patterns(None)),
    *(Rule(f"attention_{kind}_mask", "attention", "attention", _build(kind), _patterns(kind)) for kind in MASKS),
)

FAMILY = Family("attention", RULES, MATMUL_REWRITES + PROBS_REWRITES)
