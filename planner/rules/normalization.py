"""Normalizations, softmax and GELU written out by hand -> one kernel each.

These are not trees (``x`` feeds both the mean and the subtraction), so they are graph
patterns found by networkx and fed to the e-graph, where later families build on them
(attention matches ``hypatia.softmax``; linear_activation matches ``hypatia.gelu``). Every
spelling AOTAutograd produces for the common ways of writing them is generated below.
"""

from __future__ import annotations

import math
from itertools import product
from typing import Any

from hypatia.planner.rules import Family, Fusion, GraphPattern, Match, Rule, int_list, last_dim, scalar, shape_of

MEAN, SUB, ADD, MUL, DIV = "aten.mean.dim", "aten.sub.Tensor", "aten.add.Tensor", "aten.mul.Tensor", "aten.div.Tensor"
POW, SQRT, RSQRT = "aten.pow.Tensor_Scalar", "aten.sqrt.default", "aten.rsqrt.default"
VAR = "aten.var.correction"


def _consts(match: Match, op: str) -> list[float]:
    out = []
    for i in match.members(op):
        out.extend(v for v in (scalar(a) for a in match.node(i).args) if v is not None)
    return out


def _close(values: list[float], expected: list[float]) -> bool:
    return len(values) == len(expected) and all(math.isclose(a, b, rel_tol=1e-6) for a, b in zip(sorted(values), sorted(expected)))


def _reductions_on_last(match: Match, ops: tuple[str, ...], keepdim_pos: int = 2) -> bool:
    for op in ops:
        for i in match.members(op):
            node = match.node(i)
            rank = len(shape_of(match.graph, node.args[0][1]) or [])
            keep = node.args[keepdim_pos] if len(node.args) > keepdim_pos else node.kwargs.get("keepdim", False)
            if not last_dim(node.args[1], rank) or keep is not True:
                return False
    return True


# -- softmax ----------------------------------------------------------------------------------

SOFTMAX_PATTERNS = (
    GraphPattern({"m": ("aten.amax.default", ("$x", "_", "_")), "s": (SUB, ("$x", "m")), "e": ("aten.exp.default", ("s",)),
                  "z": ("aten.sum.dim_IntList", ("e", "_", "_")), "d": (DIV, ("e", "z"))}, "d"),
    GraphPattern({"mx": ("aten.max.dim", ("$x", "_", "_")), "m": ("_operator.getitem", ("mx", "_")), "s": (SUB, ("$x", "m")),
                  "e": ("aten.exp.default", ("s",)), "z": ("aten.sum.dim_IntList", ("e", "_", "_")), "d": (DIV, ("e", "z"))}, "d"),
)


def _dims(match: Match, op: str) -> list:
    return [match.node(i).args[1] for i in match.members(op)]


def _single_dim(dims: Any, rank: int) -> int | None:
    """The one (non-negative) dimension an encoded dim argument names, or None."""
    items = int_list(dims) if isinstance(dims, list) else [dims]
    if not rank or items is None or len(items) != 1 or not isinstance(items[0], int) or isinstance(items[0], bool):
        return None
    return items[0] % rank


def build_softmax(match: Match) -> Fusion | None:
    x = match.inputs["x"]
    rank = len(shape_of(match.graph, x) or [])
    reduce_dims = _dims(match, "aten.amax.default") + _dims(match, "aten.max.dim")
    sum_dims = _dims(match, "aten.sum.dim_IntList")
    dims = {_single_dim(d, rank) for d in reduce_dims + sum_dims}
    if len(dims) != 1 or None in dims:
        return None
    for i in match.members("aten.amax.default") + match.members("aten.max.dim") + match.members("aten.sum.dim_IntList"):
        node = match.node(i)
        if (node.args[2] if len(node.args) > 2 else node.kwargs.get("keepdim")) is not True:
            return None
    for i in match.members("_operator.getitem"):
        if match.node(i).args[1] != 0:
            return None
    return Fusion("softmax", (x,), (dims.pop(),))


# -- layer norm and RMS norm -------------------------------------------------------------------


def _layer_norm_patterns() -> tuple[GraphPattern, ...]:
    """variance {pow-mean over one shared x-mu, over a second copy, var.correction} x
    normalize {div by sqrt, mul by rsqrt} x affine {none, *w +b after, w* first}."""
    out = []
    for variance, normalize, affine in product(("shared", "copied", "var"), ("div", "mul"), ("none", "after", "first")):
        n = {"mu": (MEAN, ("$x", "_", "_")), "d": (SUB, ("$x", "mu"))}
        if variance == "var":
            n["var"] = (VAR, ("$x", "_"))
        else:
            n["p"] = (POW, ("d", "_"))
            n["var"] = (MEAN, ("p", "_", "_"))
        centred = "d"
        if variance == "copied":
            n["d2"] = (SUB, ("$x", "mu"))
            centred = "d2"
        n["eps"] = (ADD, ("var", "_"))
        n["r"] = (SQRT, ("eps",)) if normalize == "div" else (RSQRT, ("eps",))
        op = DIV if normalize == "div" else MUL
        if affine == "first":
            if normalize == "div":
                continue
            n["wd"] = (MUL, ("$w", centred))
            n["n"] = (MUL, ("wd", "r"))
            n["out"] = (ADD, ("n", "$b"))
        else:
            n["n"] = (op, (centred, "r"))
            if affine == "after":
                n["w"] = (MUL, ("n", "$w"))
                n["out"] = (ADD, ("w", "$b"))
        out.append(GraphPattern(n, "out" if affine != "none" else "n"))
    return tuple(out)


def _eps(match: Match) -> float | None:
    # The only scalar added is epsilon; the affine add has a tensor bias.
    eps = _consts(match, ADD)
    return eps[0] if len(eps) == 1 and 0 < eps[0] < 1 else None


def _affine_is_per_feature(match: Match, names: tuple[str, ...]) -> bool:
    x = shape_of(match.graph, match.inputs["x"])
    return all(shape_of(match.graph, match.inputs[n]) == x[-1:] for n in names if n in match.inputs)


def build_layer_norm(match: Match) -> Fusion | None:
    if not _reductions_on_last(match, (MEAN,)) or not _close(_consts(match, POW), [2.0] * len(match.members(POW))):
        return None
    for i in match.members(VAR):
        node = match.node(i)
        rank = len(shape_of(match.graph, node.args[0][1]) or [])
        if not last_dim(node.args[1], rank) or node.kwargs.get("correction") != 0 or node.kwargs.get("keepdim") is not True:
            return None
    eps = _eps(match)
    if eps is None or not _affine_is_per_feature(match, ("w", "b")):
        return None
    if shape_of(match.graph, match.root) != shape_of(match.graph, match.inputs["x"]):
        return None
    i = match.inputs
    if "w" in i:
        return Fusion("layer_norm", (i["x"], i["w"], i["b"]), (eps,))
    return Fusion("layer_norm_plain", (i["x"],), (eps,))


RMS_PATTERNS = tuple(
    GraphPattern(
        {"p": (POW, ("$x", "_")), "ms": (MEAN, ("p", "_", "_")), "eps": (ADD, ("ms", "_")), "r": (RSQRT, ("eps",)),
         "n": (MUL, ("$x", "r")), **({"out": (MUL, ("n", "$w"))} if weighted else {})},
        "out" if weighted else "n",
    )
    for weighted in (True, False)
)


def build_rms_norm(match: Match) -> Fusion | None:
    if not _reductions_on_last(match, (MEAN,)) or not _close(_consts(match, POW), [2.0]):
        return None
    eps = _eps(match)
    if eps is None or not _affine_is_per_feature(match, ("w",)):
        return None
    if shape_of(match.graph, match.root) != shape_of(match.graph, match.inputs["x"]):
        return None
    i = match.inputs
    return Fusion("rms_norm", (i["x"], i["w"]), (eps,)) if "w" in i else Fusion("rms_norm_plain", (i["x"],), (eps,))


# -- GELU written out --------------------------------------------------------------------------

GELU_PATTERNS = (
    # 0.5 * x * (1 + erf(x / sqrt(2)))   [x * 0.5 first, or the product scaled at the end]
    *(GraphPattern({"s": (scale_op, ("$x", "_")), "e": ("aten.erf.default", ("s",)), "a": (ADD, ("e", "_")),
                    "h": (MUL, ("$x", "_")), "out": (MUL, ("h", "a"))}, "out") for scale_op in (MUL, DIV)),
    *(GraphPattern({"s": (scale_op, ("$x", "_")), "e": ("aten.erf.default", ("s",)), "a": (ADD, ("e", "_")),
                    "h": (MUL, ("$x", "a")), "out": (MUL, ("h", "_"))}, "out") for scale_op in (MUL, DIV)),
)
GELU_TANH_PATTERNS = tuple(
    GraphPattern({"c": (POW, ("$x", "_")), "k": (MUL, ("c", "_")), "i": (ADD, ("$x", "k")), "s": (MUL, ("i", "_")),
                  "t": ("aten.tanh.default", ("s",)), "a": (ADD, ("t", "_")), **tail}, "out")
    for tail in ({"h": (MUL, ("$x", "_")), "out": (MUL, ("h", "a"))}, {"h": (MUL, ("$x", "a")), "out": (MUL, ("h", "_"))})
)


def build_gelu(match: Match) -> Fusion | None:
    muls, divs, adds = _consts(match, MUL), _consts(match, DIV), _consts(match, ADD)
    if not _close(adds, [1.0]) or not (_close(muls + [1 / d for d in divs], [0.5, 1 / math.sqrt(2)])):
        return None
    return Fusion("gelu", (match.inputs["x"],))


def build_gelu_tanh(match: Match) -> Fusion | None:
    if not _close(_consts(match, POW), [3.0]) or not _close(_consts(match, ADD), [1.0]):
        return None
    if not _close(_consts(match, MUL), [0.044715, math.sqrt(2 / math.pi), 0.5]):
        return None
    return Fusion("gelu_tanh", (match.inputs["x"],))


def _graph_rules(name: str, build, patterns) -> tuple[Rule, ...]:
    return tuple(Rule(name, "normalization", "normalization", build, graph_pattern=p) for p in patterns)


RULES = (
    *_graph_rules("softmax", build_softmax, SOFTMAX_PATTERNS),
    *_graph_rules("layer_norm", build_layer_norm, _layer_norm_patterns()),
    *_graph_rules("rms_norm", build_rms_norm, RMS_PATTERNS),
    *_graph_rules("gelu", build_gelu, GELU_PATTERNS),
    *_graph_rules("gelu_tanh", build_gelu_tanh, GELU_TANH_PATTERNS),
)

FAMILY = Family("normalization", RULES)
