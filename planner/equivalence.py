"""Equivalence of computations: prove small algebraic identities with an e-graph, and otherwise
compare results numerically (dtype-aware tolerances, random inputs, input-mutation checks).

Expressions are nested tuples such as ``("add", "x", ("mul", 2, "y"))``: a ``str`` is a
variable, an ``int``/``float`` a constant, and a tuple an operator applied to sub-expressions.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from fractions import Fraction
from typing import Any

import torch

from hypatia.planner.counters import counters

Expression = str | int | float | tuple

# operator -> (arity, method of the egglog sort taking the other operands, torch function)
OPS: dict[str, tuple[int, str, Callable[..., torch.Tensor]]] = {
    "add": (2, "__add__", torch.add), "mul": (2, "__mul__", torch.mul),
    "sub": (2, "__sub__", torch.sub), "div": (2, "__truediv__", torch.div),
    "pow": (2, "__pow__", torch.pow), "neg": (1, "__neg__", torch.neg),
    "exp": (1, "exp", torch.exp), "log": (1, "log", torch.log), "tanh": (1, "tanh", torch.tanh),
    "sigmoid": (1, "sigmoid", torch.sigmoid), "relu": (1, "relu", torch.relu),
    "sqrt": (1, "sqrt", torch.sqrt), "rsqrt": (1, "rsqrt", torch.rsqrt),
}

# Bounds on saturation. The expressions proved here are a few dozen nodes; past these limits
# associativity and commutativity are enumerating orderings, not closing in on a proof.
MATCH_LIMIT = 2_000
NODE_LIMIT = 20_000


class ExpressionError(ValueError):
    """An expression tree uses an unknown operator, a wrong arity or an unsupported leaf."""


@dataclass(frozen=True)
class Comparison:
    """Outcome of comparing a result against a reference."""

    ok: bool
    max_abs_err: float
    max_rel_err: float
    detail: str


@dataclass(frozen=True)
class Verdict:
    """Whether two expressions are equal and how that was decided.

    ``method == "egraph"`` with ``equal`` is a proof; ``method == "random"`` with ``equal``
    only means no random trial refuted the identity.
    """

    equal: bool
    method: str
    detail: str


# --------------------------------------------------------------------------- symbolic


@functools.cache
def _language() -> tuple[Any, Any]:
    """The egglog sort and ruleset, declared once per process. egglog is imported here, not at
    the top, so that the numerical half of this module works without it."""
    from egglog import BigRat, BigRatLike, Expr, StringLike, birewrite, ne, rewrite, ruleset, vars_

    class Term(Expr):
        def __init__(self, value: BigRatLike) -> None: ...
        @classmethod
        def var(cls, name: StringLike) -> Term: ...
        def __add__(self, other: Term) -> Term: ...
        def __mul__(self, other: Term) -> Term: ...
        def __sub__(self, other: Term) -> Term: ...
        def __truediv__(self, other: Term) -> Term: ...
        def __pow__(self, other: Term) -> Term: ...
        def __neg__(self) -> Term: ...
        def inv(self) -> Term: ...
        def exp(self) -> Term: ...
        def log(self) -> Term: ...
        def tanh(self) -> Term: ...
        def sigmoid(self) -> Term: ...
        def relu(self) -> Term: ...
        def sqrt(self) -> Term: ...
        def rsqrt(self) -> Term: ...

    def k(num: int, den: int = 1) -> Term:
        # egglog does not convert a Python int to BigRat by itself
        return Term(BigRat(num, den))

    a, b, c = vars_("a b c", Term)
    p, q = vars_("p q", BigRat)
    # Identities over the reals, read as "equal wherever both sides are defined". Two rules
    # lean on that reading: a*0 = 0 assumes a finite (IEEE has inf*0 = nan), and a/b becomes
    # a*inv(b) (which IEEE agrees with even at b = 0). Nothing ever cancels b*inv(b) = 1, as
    # that is false at b = 0, so no rule needs b != 0 except folding the inverse of a literal,
    # which checks it. There are no log rules on purpose: log(a*b) = log a + log b fails for
    # negative a and b, and log(exp a) = a is left to the numerical check.
    rules = ruleset(
        # definitions: every operator reduces to +, *, inv, exp, sqrt and literals
        rewrite(a - b).to(a + k(-1) * b),
        rewrite(-a).to(k(-1) * a),
        rewrite(a / b).to(a * b.inv()),
        rewrite(a.rsqrt()).to(a.sqrt().inv()),
        rewrite(a.sigmoid()).to((k(1) + (k(-1) * a).exp()).inv()),
        rewrite(a.tanh()).to(k(2) * (k(2) * a).sigmoid() + k(-1)),
        rewrite(a ** k(1)).to(a),
        rewrite(a ** k(2)).to(a * a),
        rewrite(a ** k(-1)).to(a.inv()),
        rewrite(a ** k(1, 2)).to(a.sqrt()),
        rewrite(a ** k(-1, 2)).to(a.rsqrt()),
        # commutative ring
        rewrite(a + b).to(b + a),
        rewrite(a * b).to(b * a),
        birewrite((a + b) + c).to(a + (b + c)),
        birewrite((a * b) * c).to(a * (b * c)),
        birewrite(a * (b + c)).to(a * b + a * c),
        rewrite(a + k(0)).to(a),
        rewrite(a * k(1)).to(a),
        rewrite(a * k(0)).to(k(0)),
        rewrite(a + a).to(k(2) * a),
        rewrite(a + Term(p) * a).to(Term(p + BigRat(1, 1)) * a),
        # exp, inv, relu
        birewrite((a + b).exp()).to(a.exp() * b.exp()),
        rewrite(k(0).exp()).to(k(1)),
        birewrite((a * b).inv()).to(a.inv() * b.inv()),
        rewrite(a.relu().relu()).to(a.relu()),
        # constant folding on exact rationals
        rewrite(Term(p) + Term(q)).to(Term(p + q)),
        rewrite(Term(p) * Term(q)).to(Term(p * q)),
        rewrite(Term(p).inv()).to(Term(BigRat(1, 1) / p), ne(p).to(BigRat(0, 1))),
    )
    return Term, rules


def _check_node(expr: Expression) -> None:
    if isinstance(expr, tuple):
        if not expr or expr[0] not in OPS:
            raise ExpressionError(f"unknown operator in {expr!r}")
        arity = OPS[expr[0]][0]
        if len(expr) != arity + 1:
            raise ExpressionError(f"{expr[0]} takes {arity} operand(s), got {len(expr) - 1}")
    elif isinstance(expr, bool) or not isinstance(expr, (str, int, float)):
        raise ExpressionError(f"unsupported leaf {expr!r}")


def _to_term(expr: Expression, term: Any) -> Any:
    from egglog import BigInt, BigRat

    _check_node(expr)
    if isinstance(expr, str):
        return term.var(expr)
    if isinstance(expr, (int, float)):
        if not math.isfinite(expr):
            # no rational for inf/nan: an opaque symbol equals only itself, which is sound
            return term.var(f"literal:{expr!r}")
        value = Fraction(expr)
        # through strings: egglog passes a plain int on as an i64, which 1e300 overflows
        return term(BigRat(BigInt.from_string(str(value.numerator)), BigInt.from_string(str(value.denominator))))
    first, *rest = (_to_term(arg, term) for arg in expr[1:])
    return getattr(first, OPS[expr[0]][1])(*rest)


def prove(lhs: Expression, rhs: Expression, *, iterations: int = 12) -> bool:
    """True iff equality saturation puts ``lhs`` and ``rhs`` in one e-class within
    ``iterations`` rounds. False means "not proved", not "unequal"."""
    from egglog import EGraph, back_off, eq, run

    term, rules = _language()
    egraph = EGraph()
    goal = eq(egraph.let("lhs", _to_term(lhs, term))).to(egraph.let("rhs", _to_term(rhs, term)))
    proved = egraph.check_bool(goal)
    for _ in range(iterations):
        if proved:
            break
        # One round per call, each with a fresh back-off scheduler: a rule with more than
        # MATCH_LIMIT matches sits the round out, so a round adds at most about
        # rules x MATCH_LIMIT nodes, and NODE_LIMIT caps the total between rounds.
        # (egglog refuses an `until` equality fact together with a custom scheduler, hence
        # the check here rather than inside the schedule.)
        report = egraph.run(run(rules, scheduler=back_off(match_limit=MATCH_LIMIT)))
        proved = egraph.check_bool(goal)
        if not report.updated or sum(size for _, size in egraph.all_function_sizes()) > NODE_LIMIT:
            break
    counters[f"equivalence.egraph.{'proved' if proved else 'unproved'}"] += 1
    return proved


# --------------------------------------------------------------------------- numerical

# Looser than torch.testing's same-dtype defaults (float32 1.3e-6/1e-5, float16 1e-3/1e-5,
# bfloat16 1.6e-2/1e-5): a fused kernel reorders arithmetic, reductions especially, so its
# rounding error grows with the reduction length, and the reference is float64, so all of
# that error shows.
_TOLERANCES: dict[torch.dtype, tuple[float, float]] = {
    torch.float64: (1e-7, 1e-7),
    torch.float32: (1e-4, 1e-5),
    torch.float16: (1e-2, 1e-3),
    torch.bfloat16: (1.6e-2, 1e-2),
    torch.complex128: (1e-7, 1e-7),
    torch.complex64: (1e-4, 1e-5),
}


def tolerance(dtype: torch.dtype) -> tuple[float, float]:
    """``(rtol, atol)`` for a kernel computing in ``dtype`` against a float64 reference;
    ``(0.0, 0.0)`` (exact) for integer and bool dtypes."""
    if dtype in _TOLERANCES:
        return _TOLERANCES[dtype]
    if not (dtype.is_floating_point or dtype.is_complex):
        return (0.0, 0.0)
    raise ValueError(f"no comparison tolerance defined for {dtype}")


def _inexact(dtype: torch.dtype) -> bool:
    return dtype.is_floating_point or dtype.is_complex


def _wide(dtype: torch.dtype) -> torch.dtype:
    return torch.complex128 if dtype.is_complex else torch.float64


def _fail(detail: str) -> Comparison:
    return Comparison(False, math.inf, math.inf, detail)


def _compare_tensors(actual: torch.Tensor, reference: torch.Tensor, where: str) -> Comparison:
    """One tensor against its reference, computed on ``actual``'s device (the reference is
    moved there); only scalars (maxima, the count, the worst element) reach the host."""
    if actual.shape != reference.shape:
        return _fail(f"{where}shape {tuple(actual.shape)} != reference shape {tuple(reference.shape)}")
    inexact = _inexact(actual.dtype)
    if reference.dtype != actual.dtype and not (inexact and reference.dtype == _wide(actual.dtype)):
        return _fail(f"{where}dtype {actual.dtype} != reference dtype {reference.dtype}")
    if actual.numel() == 0:
        return Comparison(True, 0.0, 0.0, f"{where}empty")
    rtol, atol = tolerance(actual.dtype)
    device = actual.device
    a = actual.detach().to(device, _wide(actual.dtype))
    r = reference.detach().to(device, _wide(actual.dtype))
    if inexact:
        close = torch.isclose(a, r, rtol=rtol, atol=atol, equal_nan=True)
    else:  # in their own dtype: int64 beyond 2**53 does not survive float64
        close = actual.detach() == reference.detach().to(device)
    # equal values (matching infs, NaN on both sides) have no error; NaN or inf on one side
    # only has an infinite one
    same = (a == r) | (a.isnan() & r.isnan())
    abs_err = torch.where(same, 0.0, (a - r).abs().nan_to_num(nan=math.inf, posinf=math.inf))
    rel_err = torch.where(abs_err == 0, 0.0, abs_err / r.abs()).nan_to_num(nan=math.inf, posinf=math.inf)
    # one transfer (one device sync) for the three scalars every comparison needs; a count
    # in float64 is exact below 2**53 elements
    max_abs, max_rel, differ = torch.stack(
        [abs_err.max(), rel_err.max(), (~close).sum().to(torch.float64)]
    ).tolist()
    if differ == 0:
        return Comparison(True, max_abs, max_rel, f"{where}ok (rtol={rtol:g}, atol={atol:g})")
    excess = torch.where(close, -math.inf, abs_err - rtol * r.abs()).nan_to_num(nan=math.inf)
    worst = _unravel(int(excess.argmax()), tuple(a.shape))
    got, want = torch.stack([a[worst], r[worst]]).tolist()
    return Comparison(
        False, max_abs, max_rel,
        f"{where}{int(differ)} of {a.numel()} elements differ beyond rtol={rtol:g}, "
        f"atol={atol:g}; max abs err {max_abs:.3g}, max rel err {max_rel:.3g}; worst at "
        f"{list(worst)}: {got!r} vs reference {want!r}",
    )


def _unravel(flat: int, shape: tuple[int, ...]) -> tuple[int, ...]:
    """The index in ``shape`` of row-major position ``flat``, worked out on the host."""
    index = []
    for size in reversed(shape):
        flat, i = divmod(flat, size)
        index.append(i)
    return tuple(reversed(index))


def _describe(value: Any) -> str:
    if isinstance(value, torch.Tensor):
        return f"tensor{tuple(value.shape)}:{value.dtype}"
    if isinstance(value, (tuple, list)):
        return f"{type(value).__name__} of {len(value)}"
    return type(value).__name__


def _compare(actual: Any, reference: Any, where: str) -> list[Comparison]:
    """Leaf-by-leaf comparisons; ``where`` is the index path, e.g. ``"[1][0]"``."""
    prefix = f"{where}: " if where else ""
    seqs = isinstance(actual, (tuple, list)), isinstance(reference, (tuple, list))
    if any(seqs):
        if not all(seqs) or len(actual) != len(reference):
            return [_fail(f"{prefix}structure {_describe(actual)} != reference {_describe(reference)}")]
        return [c for i, pair in enumerate(zip(actual, reference)) for c in _compare(*pair, f"{where}[{i}]")]
    if isinstance(actual, (int, float)) and isinstance(reference, (int, float)):
        # Python scalars (sizes, flags) returned beside tensors
        dtype = torch.float64 if isinstance(actual, float) or isinstance(reference, float) else torch.int64
        actual, reference = torch.tensor(actual, dtype=dtype), torch.tensor(reference, dtype=dtype)
    if isinstance(actual, torch.Tensor) and isinstance(reference, torch.Tensor):
        return [_compare_tensors(actual, reference, prefix)]
    if actual is None and reference is None:
        return [Comparison(True, 0.0, 0.0, f"{prefix}None")]
    return [_fail(f"{prefix}{_describe(actual)} != reference {_describe(reference)}")]


def compare(actual: Any, reference: Any) -> Comparison:
    """Compare a tensor or nested tuple/list of tensors against a reference of the same
    structure and shapes, in float64 with ``tolerance(actual.dtype)``; a floating reference
    may be float64. NaN matches NaN; integer and bool tensors must be equal exactly."""
    parts = _compare(actual, reference, "")
    failed = [c.detail for c in parts if not c.ok]
    return Comparison(
        ok=not failed,
        max_abs_err=max((c.max_abs_err for c in parts), default=0.0),
        max_rel_err=max((c.max_rel_err for c in parts), default=0.0),
        detail="; ".join(failed) if failed else f"ok ({len(parts)} value(s))",
    )


def random_inputs(
    specs: Sequence[tuple[Sequence[int], str]], *, seed: int = 0, device: str | torch.device = "cpu"
) -> list[torch.Tensor]:
    """One tensor per ``(shape, dtype_name)``, drawn on ``device``: floats standard normal,
    bool Bernoulli(0.5), integers uniform in [0, 16). The same seed gives the same values on
    the same kind of device (CPU and CUDA generators differ)."""
    # Drawn where the tensors will live: a CPU draw of a large model's inputs, copied over,
    # costs more than the checks themselves. CUDA spreads a large draw over a grid sized by
    # the GPU's multiprocessor count, so its values can also differ between GPU models.
    device = torch.device(device)
    gen = torch.Generator(device=device).manual_seed(seed)
    return [_draw(tuple(shape), _dtype(name), gen, device) for shape, name in specs]


def _dtype(name: str | torch.dtype) -> torch.dtype:
    dtype = name if isinstance(name, torch.dtype) else getattr(torch, str(name).removeprefix("torch."), None)
    if not isinstance(dtype, torch.dtype):
        raise ValueError(f"unknown dtype {name!r}")
    return dtype


def _draw(shape: tuple[int, ...], dtype: torch.dtype, gen: torch.Generator, device: torch.device) -> torch.Tensor:
    if _inexact(dtype):
        # drawn wide and rounded, so a float16 input is its float64 twin rounded
        return torch.randn(shape, generator=gen, dtype=_wide(dtype), device=device).to(dtype)
    if dtype == torch.bool:
        return torch.bernoulli(torch.full(shape, 0.5, device=device), generator=gen).bool()
    return torch.randint(0, 16, shape, generator=gen, dtype=dtype, device=device)


# Integer dtypes by element size, to compare values by their bit patterns
_SAME_WIDTH_INT = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}


def _bits(t: torch.Tensor) -> torch.Tensor:
    """``t`` reinterpreted (not converted) as integers of the same width, complex as its real
    and imaginary parts, so that ``==`` tells NaN payloads and the sign of zero apart."""
    if t.is_complex():
        t = torch.view_as_real(t)
    return t.view(_SAME_WIDTH_INT[t.element_size()])


def _bit_identical(after: Any, before: Any) -> bool:
    """Whether ``after`` is ``before`` bit for bit: tensors of the same shape, dtype and
    strides holding the same bit patterns, compared on their device; sequences item by item;
    anything else by ``==`` (or identity, so a NaN scalar equals itself)."""
    if isinstance(before, torch.Tensor):
        return (
            isinstance(after, torch.Tensor)
            and (after.shape, after.dtype, after.stride()) == (before.shape, before.dtype, before.stride())
            and after.device == before.device
            and torch.equal(_bits(after.detach()), _bits(before))
        )
    if isinstance(before, (tuple, list)):
        return (
            type(after) is type(before)
            and len(after) == len(before)
            and all(_bit_identical(x, y) for x, y in zip(after, before))
        )
    return after is before or after == before


def _clone(value: Any, widen: bool = False) -> Any:
    if isinstance(value, torch.Tensor):
        dtype = _wide(value.dtype) if widen and _inexact(value.dtype) else value.dtype
        return value.detach().to(dtype, copy=True)
    if isinstance(value, (tuple, list)):
        return type(value)(_clone(v, widen) for v in value)
    return value


def check_numerically(
    fn: Callable[..., Any], reference_fn: Callable[..., Any], inputs: Sequence[Any], *, trials: int = 1
) -> Comparison:
    """Run ``fn`` on clones of ``inputs`` and ``reference_fn`` on float64 copies, and compare.
    ``fn`` runs ``trials`` times on fresh clones (to catch state kept between calls); a run
    that changes a bit, the shape, dtype or strides of an input fails. The caller's own
    tensors are never handed out."""
    # kept on the inputs' device to compare each trial's arguments with: hashing them on the
    # host meant copying every input there, which cost more than the kernels being checked
    before = _clone(list(inputs))
    expected = reference_fn(*_clone(list(inputs), widen=True))
    result = Comparison(True, 0.0, 0.0, "no trials run")
    for trial in range(trials):
        args = _clone(list(inputs))
        got = fn(*args)
        changed = [i for i, (x, y) in enumerate(zip(args, before)) if not _bit_identical(x, y)]
        if changed:
            return _fail(f"kernel modified an input (argument(s) {changed}) in trial {trial}")
        result = compare(got, expected)
        if not result.ok:
            return Comparison(False, result.max_abs_err, result.max_rel_err, f"trial {trial}: {result.detail}")
    return result


# --------------------------------------------------------------------------- both

def _variables(expr: Expression) -> set[str]:
    _check_node(expr)
    if isinstance(expr, str):
        return {expr}
    if isinstance(expr, tuple):
        return set().union(*(_variables(arg) for arg in expr[1:]))
    return set()


def evaluate(expr: Expression, env: dict[str, torch.Tensor]) -> torch.Tensor:
    """Evaluate an expression tree with torch in float64, variables taken from ``env``."""
    _check_node(expr)
    if isinstance(expr, str):
        return env[expr]
    if isinstance(expr, (int, float)):
        return torch.tensor(float(expr), dtype=torch.float64)
    return OPS[expr[0]][2](*(evaluate(arg, env) for arg in expr[1:]))


def equivalent(
    lhs: Expression, rhs: Expression, *, variables: dict[str, tuple] | None = None, trials: int = 3, seed: int = 0
) -> Verdict:
    """Prove ``lhs == rhs`` with the e-graph (method "egraph"); failing that, evaluate both in
    float64 on ``trials`` random inputs (method "random"), where ``equal`` only means "not
    refuted". Variables are uniform in [0.5, 2] so log, sqrt, rsqrt and pow are defined;
    ``variables`` maps names to shapes (default ``(64,)``)."""
    if prove(lhs, rhs):
        return Verdict(True, "egraph", "both sides reached one e-class")
    names = sorted(_variables(lhs) | _variables(rhs))
    shapes = {name: tuple((variables or {}).get(name, (64,))) for name in names}
    for trial in range(trials):
        gen = torch.Generator().manual_seed(seed + trial)
        env = {n: 0.5 + 1.5 * torch.rand(shapes[n], generator=gen, dtype=torch.float64) for n in names}
        left, right = torch.broadcast_tensors(evaluate(lhs, env), evaluate(rhs, env))
        result = compare(left, right)
        if not result.ok:
            counters["equivalence.random.refuted"] += 1
            return Verdict(False, "random", f"refuted in trial {trial} (seed {seed + trial}): {result.detail}")
    counters["equivalence.random.not_refuted"] += 1
    return Verdict(True, "random", f"not proved; not refuted on {trials} random trial(s) in float64")
