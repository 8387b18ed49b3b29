"""A candidate region as something the tuner can run on its own: synthetic inputs matching
the workload, its ATen nodes as a callable (eager, op by op), and the accuracy check of an
implementation against them."""

from __future__ import annotations

import operator
from typing import Any, Callable

import torch

from hypatia.canonical import CanonicalGraph, is_ref
from hypatia.planner import equivalence
from hypatia.planner.plan import Region
from hypatia.planner.rules import tensor_meta

SEED = 4321


# Arguments whose values must be non-negative for the op to mean anything (a variance under a
# square root): random inputs feeding them are drawn positive in every draw.
NONNEGATIVE_ARGS = {
    "aten._native_batch_norm_legit_no_training.default": (4,),
    "aten._native_batch_norm_legit.default": (4,),
    "aten.native_batch_norm.default": (4,),
    "aten.sqrt.default": (0,),
    "aten.rsqrt.default": (0,),
    "aten.log.default": (0,),
}


def must_be_positive(uses: list[tuple[str, int]]) -> bool:
    """Whether an input used as ``(op, argument position)`` in ``uses`` must be drawn positive."""
    return any(position in NONNEGATIVE_ARGS.get(op, ()) for op, position in uses)


class NotMeasurable(Exception):
    """A region uses something the tuner cannot rebuild from the canonical graph alone
    (a symbolic size, an opaque Python object); it keeps its heuristic choice."""


def cast_keeping_float64(x: torch.Tensor, **kwargs: Any) -> torch.Tensor:
    """``aten._to_copy``, except that a float64 tensor cast to another floating dtype stays
    float64: the float64 reference of a region that computes a softmax in float32 and casts
    it back to bfloat16 then computes it all in float64, instead of mixing dtypes."""
    dtype = kwargs.get("dtype")
    if x.dtype == torch.float64 and isinstance(dtype, torch.dtype) and dtype.is_floating_point:
        kwargs = {**kwargs, "dtype": torch.float64}
    return torch.ops.aten._to_copy.default(x, **kwargs)


# Ops the unfused reference runs in their float64-preserving form.
REFERENCE_OPS: dict[str, Callable] = {"aten._to_copy.default": cast_keeping_float64}


def _resolve(op: str) -> Callable:
    if op == "_operator.getitem":
        return operator.getitem
    if op in REFERENCE_OPS:
        return REFERENCE_OPS[op]
    namespace, _, rest = op.partition(".")
    name, _, overload = rest.partition(".")
    try:
        return getattr(getattr(getattr(torch.ops, namespace), name), overload or "default")
    except AttributeError:
        raise NotMeasurable(f"op {op} is not an ATen operator this torch has") from None


def _tensor(meta: Any, device: torch.device, seed: int) -> torch.Tensor:
    m = tensor_meta(meta)
    if m is None or not all(isinstance(s, int) for s in m[0]):
        raise NotMeasurable(f"input meta {meta!r} is not a tensor of static shape")
    shape, dtype = m[0], m[1]
    stride = meta[2] if isinstance(meta[2], list) and all(isinstance(s, int) for s in meta[2]) else None
    value = equivalence.random_inputs([(shape, dtype)], seed=seed, device=device)[0]
    return value if stride is None else laid_out(value, stride)


def laid_out(value: torch.Tensor, stride: Any) -> torch.Tensor:
    """``value`` with the model's layout ``stride`` (a transposed weight stays transposed); dims
    of stride 0 (an expanded mask) hold one value along them, as in the model. A layout whose
    elements overlap otherwise cannot be written; it gets ``value`` as it is."""
    stride = tuple(int(s) for s in stride)
    shape = tuple(value.shape)
    base = value[tuple(slice(0, 1) if st == 0 else slice(None) for st in stride)]
    out = torch.empty_strided(base.shape, stride, dtype=value.dtype, device=value.device)
    if torch._debug_has_internal_overlap(out) != 0:
        return value
    return out.copy_(base).expand(shape)


def synthetic_inputs(graph: CanonicalGraph, region: Region, device: torch.device, positive: bool = False) -> list[torch.Tensor]:
    """Random tensors with the shapes, strides and dtypes of the region's inputs."""
    uses: dict[int, list[tuple[str, int]]] = {j: [] for j in region.inputs}
    for i in region.nodes:
        for position, arg in enumerate(graph.nodes[i].args):
            if is_ref(arg) and arg[1] in uses:
                uses[arg[1]].append((graph.nodes[i].op, position))
    out = []
    for k, j in enumerate(region.inputs):
        t = _tensor(graph.nodes[j].meta, device, SEED + 7 * k + int(positive))
        if (positive or must_be_positive(uses[j])) and t.is_floating_point():
            t = t.abs().add_(0.5)
        out.append(t)
    return out


def _prepare(arg: Any, device: torch.device) -> Any:
    """Everything in an encoded argument but its node references, decoded once: dtypes,
    devices, enums, and tensors baked into the graph (as synthetic values)."""
    if is_ref(arg) or not isinstance(arg, list):
        return arg
    tag = arg[0] if arg else None
    if tag == "l":
        return ["l", [_prepare(a, device) for a in arg[1]]]
    if tag == "slice":
        return ["slice", [_prepare(a, device) for a in arg[1]]]
    if tag == "dtype":
        return getattr(torch, arg[1])
    if tag == "device":
        return device if arg[1] == device.type else torch.device(arg[1])
    if tag == "enum":
        return getattr(torch, str(arg[1]).rsplit(".", 1)[-1])
    if tag == "tensor":
        return _tensor(arg[1], device, SEED)
    if tag == "ellipsis":
        return Ellipsis
    raise NotMeasurable(f"argument {str(arg)[:80]} cannot be rebuilt without the model")


def _fill(arg: Any, values: dict[int, Any]) -> Any:
    if is_ref(arg):
        return values[arg[1]]
    if isinstance(arg, list):
        items = [_fill(a, values) for a in arg[1]]
        return slice(*items) if arg[0] == "slice" else items
    return arg


def eager_callable(graph: CanonicalGraph, region: Region, device: torch.device) -> Callable[..., Any]:
    """The region's own ATen nodes, run one by one on the region's inputs."""
    steps = []
    for j in sorted(region.nodes):
        node = graph.nodes[j]
        if node.op in ("placeholder", "get_attr"):
            raise NotMeasurable(f"node {j} ({node.op}) cannot be inside a measured region")
        kwargs = {k: _prepare(v, device) for k, v in node.kwargs.items()}
        steps.append((j, _resolve(node.op), [_prepare(a, device) for a in node.args], kwargs))

    def run(*inputs: Any) -> Any:
        values: dict[int, Any] = dict(zip(region.inputs, inputs))
        for j, fn, args, kwargs in steps:
            values[j] = fn(*[_fill(a, values) for a in args], **{k: _fill(v, values) for k, v in kwargs.items()})
        return values[region.output]

    return run


# A fused kernel may round differently from the unfused ops (a folded conv, one GEMM epilogue
# instead of two passes); it passes when its error against float64 is of the order of what
# the unfused ops in the same dtype make themselves.
EAGER_ERROR_FACTOR = 4.0


class Reference:
    """The unfused ops on each draw of inputs, each result computed once however many
    implementations are checked against it: in float64 (what every implementation is compared
    with) and the unfused ops' own error in the draws' dtype (their rounding allowance)."""

    def __init__(self, fn: Callable[..., Any], draws: list[list[torch.Tensor]]):
        self.fn, self.draws = fn, draws
        self._wide: dict[int, Any] = {}
        self._own: dict[int, equivalence.Comparison] = {}

    def wide(self, k: int) -> Callable[..., Any]:
        """A reference function for draw ``k`` that computes its float64 result only once."""
        def reference(*widened: Any) -> Any:
            if k not in self._wide:
                self._wide[k] = self.fn(*widened)
            return self._wide[k]
        return reference

    def own(self, k: int) -> equivalence.Comparison:
        if k not in self._own:
            self._own[k] = equivalence.check_numerically(self.fn, self.wide(k), self.draws[k])
        return self._own[k]


def check(fn: Callable[..., Any], reference: Reference) -> equivalence.Comparison:
    """``fn`` against the float64 reference on every draw of inputs: within the dtype's
    tolerance, or within EAGER_ERROR_FACTOR times the unfused ops' own error in that dtype;
    inputs must stay bit-identical. Returns the worst comparison (or the first failure)."""
    worst = None
    with torch.no_grad():
        for k, inputs in enumerate(reference.draws):
            result = equivalence.check_numerically(fn, reference.wide(k), inputs)
            if not result.ok and "modified an input" not in result.detail:
                own = reference.own(k)
                bound = EAGER_ERROR_FACTOR * own.max_abs_err
                if bound > 0 and result.max_abs_err <= bound:
                    result = equivalence.Comparison(
                        True, result.max_abs_err, result.max_rel_err,
                        f"max abs err {result.max_abs_err:.3g} within {EAGER_ERROR_FACTOR:g}x the unfused ops' own ({own.max_abs_err:.3g})")
            if not result.ok:
                return result
            if worst is None or result.max_abs_err > worst.max_abs_err:
                worst = result
    return worst or equivalence.Comparison(True, 0.0, 0.0, "no draws")
