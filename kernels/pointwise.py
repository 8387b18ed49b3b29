"""Generated kernels for chains of pointwise ops: the program format and the torch evaluator.

A program is plain data (it travels in msgpack and JSON)::

    {"v": 1, "n_inputs": 2, "ops": [["add", ["in", 0], ["in", 1]], ["gelu", ["v", 0]]],
     "out": 1, "dtype": "float32", "shape": [8, 128, 768]}

Op k produces value k; operands are ``["in", k]``, ``["v", j]`` (j < k) or ``["c", number]``.
Inputs broadcast to ``shape``. An optional ``"order"`` gives the output's memory layout: its
dims from outermost to innermost (absent: row-major). The planner sets it to the layout the
unfused ops produced (a transposed input's layout, as TensorIterator keeps it), since later
views in the graph were traced against that layout. Values are computed in float32 (float64 when an input, a cast or
the output is float64) and rounded to ``dtype`` once at the end and at each explicit ``cast``, so
bf16/fp16 results can differ from eager, which rounds after every op. Integer inputs are computed
as floating point too. Values made by comparisons are booleans, and ``add`` of two booleans is
logical or, as in torch; a bool *input* counts as 0/1 in arithmetic.

The CUDA kernel generated from a program lives in :mod:`hypatia.kernels.pointwise_cuda`.
Importing this module imports neither torch nor cupy. Programs are treated as immutable once
used, since validation is cached per program object.
"""

from __future__ import annotations

import functools
import json
from collections import Counter
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Mapping

from hypatia.kernels.pointwise_layout import from_order, in_order

if TYPE_CHECKING:
    import torch

PROGRAM_VERSION = 1

# op -> number of tensor-or-constant operands (cast also names its target dtype).
ARITY = {
    **dict.fromkeys(["neg", "exp", "log", "tanh", "sigmoid", "relu", "gelu", "gelu_tanh"], 1),
    **dict.fromkeys(["silu", "sqrt", "rsqrt", "abs", "cast"], 1),
    **dict.fromkeys(["add", "sub", "mul", "div", "pow", "maximum", "minimum"], 2),
    **dict.fromkeys(["lt", "le", "gt", "ge", "eq", "ne"], 2),
    "where": 3,
}
COMPARISONS = frozenset({"lt", "le", "gt", "ge", "eq", "ne"})
BOOL_PRESERVING = frozenset({"add", "mul", "maximum", "minimum"})  # bool op bool stays bool in torch
DTYPE_NAMES = ("float32", "float64", "bfloat16", "float16", "bool")
_KEYS = frozenset({"v", "n_inputs", "ops", "out", "dtype", "shape"})
_OPTIONAL_KEYS = frozenset({"order"})

counters: Counter = Counter()


class PointwiseProgramError(ValueError):
    """A pointwise program is malformed, or a call does not fit its program."""


class PointwiseCompileError(RuntimeError):
    """The CUDA kernel for a program cannot be built or launched here; run the chain eagerly."""


@dataclass(frozen=True, eq=False)  # one instance per canonical text, so identity hashing is enough
class Program:
    n_inputs: int
    ops: tuple[tuple[str, tuple[tuple[str, Any], ...], str | None], ...]  # (name, operands, cast target)
    out: int
    dtype: str
    shape: tuple[int, ...]
    kinds: tuple[str, ...]  # "bool" or "num" per value, known without the inputs' dtypes
    needs_f64: bool  # the output or a cast is float64
    last_use: tuple[int, ...]  # per value: the last op reading it (len(ops) for the output)
    input_last_use: tuple[int, ...]
    order: tuple[int, ...] | None = None  # the output's dims, outermost first; None: row-major

    @property
    def computed_shape(self) -> tuple[int, ...]:
        """The shape the kernel computes: ``shape`` with its dims in memory order."""
        return self.shape if self.order is None else tuple(self.shape[d] for d in self.order)


# ---------------------------------------------------------------------------------------------
# Validation


def _is_int(x: Any) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def _is_seq(x: Any) -> bool:
    return isinstance(x, (list, tuple))


def _operand(ref: Any, k: int, n_inputs: int, where: str) -> tuple[str, Any]:
    if not _is_seq(ref) or len(ref) != 2:
        raise PointwiseProgramError(f"{where}: operand {ref!r} is not a [tag, value] pair")
    tag, x = ref
    if tag == "in":
        if not _is_int(x) or not 0 <= x < n_inputs:
            raise PointwiseProgramError(f"{where}: operand {ref!r} refers to an input outside n_inputs={n_inputs}")
    elif tag == "v":
        if not _is_int(x) or x < 0:
            raise PointwiseProgramError(f"{where}: operand {ref!r} is not a value index")
        if x >= k:
            raise PointwiseProgramError(f"{where}: operand {ref!r} is a forward reference (only values before op {k} exist)")
    elif tag == "c":
        if not isinstance(x, (bool, int, float)):
            raise PointwiseProgramError(f"{where}: constant {x!r} is not a number")
        try:
            float(x)
        except OverflowError:
            raise PointwiseProgramError(f"{where}: constant {x!r} is out of floating-point range") from None
    else:
        raise PointwiseProgramError(f"{where}: unknown operand tag {tag!r} (expected 'in', 'v' or 'c')")
    return (tag, x)


def _kind(name: str, operands: tuple, target: str | None, kinds: list[str]) -> str:
    def is_bool(ref):
        return (ref[0] == "v" and kinds[ref[1]] == "bool") or (ref[0] == "c" and isinstance(ref[1], bool))

    if name in COMPARISONS or (name == "cast" and target == "bool"):
        return "bool"
    if (name in BOOL_PRESERVING and all(map(is_bool, operands))) or (name == "where" and all(map(is_bool, operands[1:]))):
        return "bool"
    return "num"


def _parse(program: Any) -> Program:
    if not isinstance(program, Mapping):
        raise PointwiseProgramError(f"a pointwise program is a dict, not {type(program).__name__}")
    if missing := sorted(_KEYS - program.keys()):
        raise PointwiseProgramError(f"program lacks {', '.join(missing)}")
    if unknown := sorted(map(str, program.keys() - _KEYS - _OPTIONAL_KEYS)):
        raise PointwiseProgramError(f"program has unknown keys {', '.join(unknown)}")
    if not _is_int(program["v"]) or program["v"] != PROGRAM_VERSION:
        raise PointwiseProgramError(f"program version {program['v']!r} is not supported (this reads v{PROGRAM_VERSION})")
    n_inputs, ops = program["n_inputs"], program["ops"]
    if not _is_int(n_inputs) or n_inputs < 1:
        raise PointwiseProgramError(f"n_inputs must be a positive int, got {n_inputs!r}")
    if not _is_seq(ops) or not ops:
        raise PointwiseProgramError("ops must be a non-empty list")
    parsed, kinds = [], []
    last_use, input_last_use = [0] * len(ops), [0] * n_inputs
    for k, op in enumerate(ops):
        where = f"op {k}"
        if not _is_seq(op) or not op or not isinstance(op[0], str):
            raise PointwiseProgramError(f"{where}: {op!r} is not a list starting with an op name")
        name, args, target = op[0], list(op[1:]), None
        if name not in ARITY:
            raise PointwiseProgramError(f"{where}: unknown op {name!r}")
        if name == "cast" and args:
            target = args.pop()
            if target not in DTYPE_NAMES:
                raise PointwiseProgramError(f"{where}: cast to unknown dtype {target!r} (one of {', '.join(DTYPE_NAMES)})")
        if len(args) != ARITY[name]:
            raise PointwiseProgramError(f"{where}: {name} takes {ARITY[name]} operand(s), got {len(args)}")
        operands = tuple(_operand(a, k, n_inputs, where) for a in args)
        if all(tag == "c" for tag, _ in operands):
            raise PointwiseProgramError(f"{where}: {name} has only constant operands (fold it before building the program)")
        if name == "pow" and operands[1][0] != "c":
            raise PointwiseProgramError(f"{where}: pow takes a constant exponent, got {args[1]!r}")
        for tag, x in operands:
            if tag == "v":
                last_use[x] = k
            elif tag == "in":
                input_last_use[x] = k
        kinds.append(_kind(name, operands, target, kinds))
        parsed.append((name, operands, target))
    out, dtype, shape = program["out"], program["dtype"], program["shape"]
    if not _is_int(out) or not 0 <= out < len(ops):
        raise PointwiseProgramError(f"out must index one of the {len(ops)} ops, got {out!r}")
    if dtype not in DTYPE_NAMES:
        raise PointwiseProgramError(f"unknown output dtype {dtype!r} (one of {', '.join(DTYPE_NAMES)})")
    if not _is_seq(shape) or not all(_is_int(s) and s >= 0 for s in shape):
        raise PointwiseProgramError(f"shape must be a list of non-negative ints, got {shape!r}")
    order = program.get("order")
    if order is not None and (not _is_seq(order) or not all(map(_is_int, order))
                              or sorted(order) != list(range(len(shape)))):
        raise PointwiseProgramError(f"order must be a permutation of the output's {len(shape)} dims, got {order!r}")
    last_use[out] = len(ops)
    needs_f64 = dtype == "float64" or any(t == "float64" for _, _, t in parsed)
    return Program(n_inputs, tuple(parsed), out, dtype, tuple(shape), tuple(kinds), needs_f64, tuple(last_use),
                   tuple(input_last_use), None if order is None or list(order) == sorted(order) else tuple(order))


_BY_ID: dict[int, tuple[Any, Program, str | None]] = {}  # holds the program object, so its id is not reused
_BY_TEXT: dict[str, Program] = {}


def _entry(program: Any) -> tuple[Program, str | None]:
    """(the parsed program, its canonical JSON text), cached per program object."""
    hit = _BY_ID.get(id(program))
    if hit is not None and hit[0] is program:
        return hit[1], hit[2]
    try:
        text = json.dumps(program, sort_keys=True, separators=(",", ":"))
    except (TypeError, ValueError):
        text = None  # not JSON-able, so _parse will say what is wrong
    parsed = _BY_TEXT.get(text) if text is not None else None
    if parsed is None:
        parsed = _parse(program)
        if text is not None:
            _BY_TEXT[text] = parsed
    _BY_ID[id(program)] = (program, parsed, text)
    return parsed, text


def _checked(program: Any) -> Program:
    return _entry(program)[0]


def program_text(program: Any) -> str:
    """The canonical JSON text of ``program`` (validated), as ``hypatia::pointwise`` takes it."""
    return _entry(program)[1]


_PROGRAMS: dict[str, Any] = {}


def program_of(text: str) -> dict:
    """The program whose JSON text is ``text``, validated; one object per text, so per-program
    caches (validation, compiled kernels) keep working across calls."""
    program = _PROGRAMS.get(text)
    if program is None:
        try:
            program = json.loads(text)
        except (TypeError, ValueError) as exc:
            raise PointwiseProgramError(f"a pointwise program must be JSON text: {exc}") from None
        _checked(program)
        if len(_PROGRAMS) > 4096:
            _PROGRAMS.clear()
        _PROGRAMS[text] = program
    return program


def validate_program(program: Any) -> None:
    """Raise PointwiseProgramError saying what is wrong with ``program``; cached per program."""
    _checked(program)


def _split(args: tuple) -> tuple[Program, list]:
    if not args:
        raise PointwiseProgramError("a pointwise kernel takes its inputs, then the program")
    *inputs, program = args
    prog = _checked(program)
    if len(inputs) != prog.n_inputs:
        raise PointwiseProgramError(f"program takes n_inputs={prog.n_inputs} tensors, got {len(inputs)}")
    return prog, inputs


# ---------------------------------------------------------------------------------------------
# Evaluation through torch ops


@functools.cache
def _torch_ops() -> dict:
    import torch

    F = torch.nn.functional
    unary = {  # op -> (fresh result, in place on an operand we own)
        name: (getattr(torch, name), lambda x, m=name + "_": getattr(x, m)())
        for name in ("neg", "exp", "log", "tanh", "sigmoid", "relu", "sqrt", "rsqrt", "abs")
    }
    unary["gelu"] = (F.gelu, torch.ops.aten.gelu_)
    unary["gelu_tanh"] = (lambda x: F.gelu(x, approximate="tanh"), lambda x: torch.ops.aten.gelu_(x, approximate="tanh"))
    unary["silu"] = (F.silu, lambda x: F.silu(x, inplace=True))
    nary = {name: getattr(torch, name) for name in ("add", "sub", "mul", "div", "maximum", "minimum", "where", *COMPARISONS)}
    return {"unary": unary, "nary": nary}


def _fits(target, others) -> bool:
    """True when broadcasting ``others`` against ``target`` keeps target's shape."""
    for o in others:
        if o.dim() > target.dim():
            return False
        for a, b in zip(reversed(target.shape), reversed(o.shape)):
            if a != b and b != 1:
                return False
    return True


def pointwise_cpu(*args) -> torch.Tensor:
    """Run the program (last argument) on the input tensors with torch ops, on their device."""
    prog, inputs = _split(args)
    return _evaluate(prog, inputs, reuse=True)


def pointwise_torch_reference(inputs: list, program: Any) -> torch.Tensor:
    """:func:`pointwise_cpu` without in-place ops or ``out=``, so autograd differentiates it:
    the same values, for ``hypatia::pointwise``'s backward."""
    prog, inputs = _split((*inputs, program))
    return _evaluate(prog, inputs, reuse=False)


def fake_output(program: Any, device: Any) -> torch.Tensor:
    """An empty tensor with the shape, dtype and strides the kernels return for ``program``."""
    import torch

    prog = _checked(program)
    return from_order(torch.empty(prog.computed_shape, dtype=getattr(torch, prog.dtype), device=device), prog)


def _evaluate(prog: Program, inputs: list, reuse: bool) -> torch.Tensor:
    """The program on ``inputs`` through torch ops; ``reuse`` lets it write into the
    intermediates it made (and never under autograd)."""
    import contextlib

    import torch

    compute = torch.float64 if prog.needs_f64 or any(t.dtype == torch.float64 for t in inputs) else torch.float32
    device = next((t.device for t in inputs if t.dim() > 0), inputs[0].device)  # not a CPU scalar's
    inputs = [in_order(t, prog) for t in inputs]  # computed in memory order, so the result has the layout
    table = _torch_ops()
    values: list = [None] * len(prog.ops)
    owned = [False] * len(prog.ops)  # a tensor this call made, so in-place ops may reuse it
    converted: dict[int, Any] = {}

    def fetch(ref, k, cond=False):
        tag, x = ref
        if tag == "c":
            return x, False
        if tag == "v":
            t, mine = values[x], reuse and owned[x] and prog.last_use[x] == k
        else:
            t = inputs[x]
            if not cond and t.dtype != compute:
                if x not in converted:
                    converted[x] = t.to(compute)
                t = converted[x]
            mine = reuse and t is not inputs[x] and prog.input_last_use[x] == k
        if cond and t.dtype != torch.bool:
            return t != 0, False
        return t, mine

    def lift(x, dtype):
        return x if isinstance(x, torch.Tensor) else torch.full((), x, dtype=dtype, device=device)

    # out= and in-place ops refuse tensors that require grad
    with torch.no_grad() if reuse else contextlib.nullcontext():
        for k, (name, operands, target) in enumerate(prog.ops):
            kind = torch.bool if prog.kinds[k] == "bool" else compute
            if name == "where":
                fetched = [fetch(operands[0], k, cond=True)] + [fetch(r, k) for r in operands[1:]]
            else:
                fetched = [fetch(r, k) for r in operands]
            objs, mine = [t for t, _ in fetched], [m for _, m in fetched]
            if kind is compute:  # bool operands count as 0/1 where the result is a number
                for i in range(name == "where", len(objs)):
                    if isinstance(objs[i], torch.Tensor) and objs[i].dtype == torch.bool:
                        objs[i], mine[i] = objs[i].to(compute), reuse
            if name == "cast":
                x = objs[0]
                if target == "bool":
                    result, own = (x, mine[0]) if x.dtype == torch.bool else (x != 0, True)
                elif x.dtype == compute and getattr(torch, target) == compute:
                    result, own = x, mine[0]
                else:
                    result, own = x.to(getattr(torch, target)).to(compute), True
            elif name in table["unary"]:
                fresh, inplace = table["unary"][name]
                result, own = (inplace(objs[0]) if mine[0] else fresh(objs[0])), True
            elif name == "pow":
                result, own = (objs[0].pow_(objs[1]) if mine[0] else torch.pow(objs[0], objs[1])), True
            else:
                if name in ("maximum", "minimum", "where"):
                    objs = [lift(o, torch.bool if isinstance(o, bool) else compute) for o in objs]
                elif not isinstance(objs[0], torch.Tensor):
                    objs[0] = lift(objs[0], torch.bool if isinstance(objs[0], bool) else compute)
                tensors = [o for o in objs if isinstance(o, torch.Tensor)]
                out = next(
                    (o for o, m in zip(objs, mine) if reuse and m and o.dtype == kind and _fits(o, tensors)),
                    None,
                )
                fn = table["nary"][name]
                result, own = (fn(*objs) if out is None else fn(*objs, out=out)), True
            values[k], owned[k] = result, own

        result = values[prog.out]
        if tuple(result.shape) != prog.computed_shape:
            result = result.expand(prog.computed_shape)
        final = result.to(getattr(torch, prog.dtype)).contiguous()
        if reuse and not owned[prog.out] and final.data_ptr() == result.data_ptr():
            final = final.clone()  # never hand back an alias of an input
        return from_order(final, prog)
