"""Equivalence of computations: prove small algebraic identities with an e-graph, and otherwise
compare results numerically (dtype-aware tolerances, random inputs, input-mutation checks).

Expressions are nested tuples such as ``("add", "x", ("mul", 2, "y"))``: a ``str`` is a
variable, an ``int``/``float`` a constant, and a tuple an operator applied to sub-expressions.
"""

from __future__ import annotations

import functools
import hashlib
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
    if actual.shape != reference.shape:
        return _fail(f"{where}shape {tuple(actual.shape)} != reference shape {tuple(reference.shape)}")
    inexact = _inexact(actual.dtype)
    if reference.dtype != actual.dtype and not (inexact and reference.dtype == _wide(actual.dtype)):
        return _fail(f"{where}dtype {actual.dtype} != reference dtype {reference.dtype}")
    if actual.numel() == 0:
        return Comparison(True, 0.0, 0.0, f"{where}empty")
    rtol, atol = tolerance(actual.dtype)
    a = actual.detach().to("cpu", _wide(actual.dtype))
    r = reference.detach().to("cpu", _wide(actual.dtype))
    if inexact:
        close = torch.isclose(a, r, rtol=rtol, atol=atol, equal_nan=True)
    else:  # in their own dtype: int64 beyond 2**53 does not survive float64
        close = actual.detach().cpu() == reference.detach().cpu()
    # equal values (matching infs, NaN on both sides) have no error; NaN or inf on one side
    # only has an infinite one
    same = (a == r) | (a.isnan() & r.isnan())
    abs_err = torch.where(same, 0.0, (a - r).abs().nan_to_num(nan=math.inf, posinf=math.inf))
    rel_err = torch.where(abs_err == 0, 0.0, abs_err / r.abs()).nan_to_num(nan=math.inf, posinf=math.inf)
    max_abs, max_rel = abs_err.max().item(), rel_err.max().item()
    if bool(close.all()):
        return Comparison(True, max_abs, max_rel, f"{where}ok (rtol={rtol:g}, atol={atol:g})")
    excess = torch.where(close, -math.inf, abs_err - rtol * r.abs()).nan_to_num(nan=math.inf).reshape(-1)
    worst = tuple(int(i) for i in torch.unravel_index(excess.argmax(), a.shape))
    return Comparison(
        False, max_abs, max_rel,
        f"{where}{int((~close).sum())} of {a.numel()} elements differ beyond rtol={rtol:g}, "
        f"atol={atol:g}; max abs err {max_abs:.3g}, max rel err {max_rel:.3g}; worst at "
        f"{list(worst)}: {a[worst].item()!r} vs reference {r[worst].item()!r}",
    )


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
    """One tensor per ``(shape, dtype_name)``: floats standard normal, bool Bernoulli(0.5),
    integers uniform in [0, 16). The same seed gives the same values on every device."""
    # drawn on the CPU, so the values do not depend on the device's generator
    gen = torch.Generator().manual_seed(seed)
    out = []
    for shape, name in specs:
        dtype = name if isinstance(name, torch.dtype) else getattr(torch, str(name).removeprefix("torch."), None)
        if not isinstance(dtype, torch.dtype):
            raise ValueError(f"unknown dtype {name!r}")
        if _inexact(dtype):
            # drawn wide and rounded, so a float16 input is its float64 twin rounded
            t = torch.randn(tuple(shape), generator=gen, dtype=_wide(dtype)).to(dtype)
        elif dtype == torch.bool:
            t = torch.bernoulli(torch.full(tuple(shape), 0.5), generator=gen).bool()
        else:
            t = torch.randint(0, 16, tuple(shape), generator=gen, dtype=dtype)
        out.append(t.to(device))
    return out


def _checksum(value: Any) -> Any:
    """Bit-exact fingerprint: NaNs and -0.0 count as unchanged only if truly unchanged."""
    if isinstance(value, torch.Tensor):
        raw = value.detach().cpu().contiguous().reshape(-1)
        data = raw.view(torch.uint8).numpy().tobytes() if raw.numel() else b""
        return (tuple(value.shape), value.dtype, hashlib.blake2b(data, digest_size=16).hexdigest())
    if isinstance(value, (tuple, list)):
        return tuple(_checksum(v) for v in value)
    return repr(value)


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
    that writes into its inputs fails. The caller's own tensors are never handed out."""
    before = _checksum(list(inputs))
    expected = reference_fn(*_clone(list(inputs), widen=True))
    result = Comparison(True, 0.0, 0.0, "no trials run")
    for trial in range(trials):
        args = _clone(list(inputs))
        got = fn(*args)
        after = _checksum(args)
        if after != before:
            changed = [i for i, (x, y) in enumerate(zip(after, before)) if x != y]
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
