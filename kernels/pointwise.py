"""Generated kernels for chains of pointwise ops: the program format, a torch evaluator, CUDA codegen.

A program is plain data (it travels in msgpack and JSON)::

    {"v": 1, "n_inputs": 2, "ops": [["add", ["in", 0], ["in", 1]], ["gelu", ["v", 0]]],
     "out": 1, "dtype": "float32", "shape": [8, 128, 768]}

Op k produces value k; operands are ``["in", k]``, ``["v", j]`` (j < k) or ``["c", number]``.
Inputs broadcast to ``shape``. Values are computed in float32 (float64 when an input, a cast or
the output is float64) and rounded to ``dtype`` once at the end and at each explicit ``cast``, so
bf16/fp16 results can differ from eager, which rounds after every op. Integer inputs are computed
as floating point too. Values made by comparisons are booleans, and ``add`` of two booleans is
logical or, as in torch; a bool *input* counts as 0/1 in arithmetic.

On CUDA, one kernel is generated per program and input dtypes; sizes and strides are kernel
arguments, so programs that differ only in sizes (not rank) share a kernel. Importing this module
imports neither torch nor cupy: the daemon warms kernels with it. Programs are treated as
immutable once used, since validation is cached per program object.
"""

from __future__ import annotations

import functools
import hashlib
import json
import math
import threading
from collections import Counter
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Mapping, Sequence

if TYPE_CHECKING:
    import torch

PROGRAM_VERSION = 1
KERNEL_NAME = "hy_pointwise"
BLOCK = 256

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
    if unknown := sorted(map(str, program.keys() - _KEYS)):
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
    last_use[out] = len(ops)
    needs_f64 = dtype == "float64" or any(t == "float64" for _, _, t in parsed)
    return Program(n_inputs, tuple(parsed), out, dtype, tuple(shape), tuple(kinds), needs_f64, tuple(last_use), tuple(input_last_use))


_BY_ID: dict[int, tuple[Any, Program]] = {}  # holds the program object, so its id is not reused
_BY_TEXT: dict[str, Program] = {}


def _checked(program: Any) -> Program:
    hit = _BY_ID.get(id(program))
    if hit is not None and hit[0] is program:
        return hit[1]
    try:
        text = json.dumps(program, sort_keys=True, separators=(",", ":"))
    except (TypeError, ValueError):
        text = None  # not JSON-able, so _parse will say what is wrong
    parsed = _BY_TEXT.get(text) if text is not None else None
    if parsed is None:
        parsed = _parse(program)
        if text is not None:
            _BY_TEXT[text] = parsed
    _BY_ID[id(program)] = (program, parsed)
    return parsed


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
    import torch

    prog, inputs = _split(args)
    compute = torch.float64 if prog.needs_f64 or any(t.dtype == torch.float64 for t in inputs) else torch.float32
    device = next((t.device for t in inputs if t.dim() > 0), inputs[0].device)  # not a CPU scalar's
    table = _torch_ops()
    values: list = [None] * len(prog.ops)
    owned = [False] * len(prog.ops)  # a tensor this call made, so in-place ops may reuse it
    converted: dict[int, Any] = {}

    def fetch(ref, k, cond=False):
        tag, x = ref
        if tag == "c":
            return x, False
        if tag == "v":
            t, mine = values[x], owned[x] and prog.last_use[x] == k
        else:
            t = inputs[x]
            if not cond and t.dtype != compute:
                if x not in converted:
                    converted[x] = t.to(compute)
                t = converted[x]
            mine = t is not inputs[x] and prog.input_last_use[x] == k
        if cond and t.dtype != torch.bool:
            return t != 0, False
        return t, mine

    def lift(x, dtype):
        return x if isinstance(x, torch.Tensor) else torch.full((), x, dtype=dtype, device=device)

    with torch.no_grad():  # out= and in-place ops refuse tensors that require grad
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
                        objs[i], mine[i] = objs[i].to(compute), True
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
                    (o for o, m in zip(objs, mine) if m and o.dtype == kind and _fits(o, tensors)),
                    None,
                )
                fn = table["nary"][name]
                result, own = (fn(*objs) if out is None else fn(*objs, out=out)), True
            values[k], owned[k] = result, own

        result = values[prog.out]
        if tuple(result.shape) != prog.shape:
            result = result.expand(prog.shape)
        final = result.to(getattr(torch, prog.dtype)).contiguous()
        if not owned[prog.out] and final.data_ptr() == result.data_ptr():
            final = final.clone()  # never hand back an alias of an input
        return final


# ---------------------------------------------------------------------------------------------
# CUDA source: one kernel per (program, input dtypes); sizes and strides are arguments

_PRELUDE = r"""
// bf16 and fp16 by hand: NVRTC need not find cuda_bf16.h or cuda_fp16.h.
__device__ __forceinline__ float hy_bf16_to_f32(unsigned short x) { return __uint_as_float(((unsigned)x) << 16); }
__device__ __forceinline__ unsigned short hy_f32_to_bf16(float f) {
  unsigned u = __float_as_uint(f);
  if ((u & 0x7fffffffu) > 0x7f800000u) return (unsigned short)0x7fc0;  // NaN stays NaN
  return (unsigned short)((u + 0x7fffu + ((u >> 16) & 1u)) >> 16);  // round to nearest even
}
__device__ __forceinline__ float hy_f16_to_f32(unsigned short x) {
  float f; asm("cvt.f32.f16 %0, %1;" : "=f"(f) : "h"(x)); return f;
}
__device__ __forceinline__ unsigned short hy_f32_to_f16(float f) {
  unsigned short h; asm("cvt.rn.f16.f32 %0, %1;" : "=h"(h) : "f"(f)); return h;
}
// Division by a size through its magic number (valid below 2**31): a multiply, an add, a shift.
__device__ __forceinline__ unsigned hy_divu(unsigned a, unsigned magic, unsigned shift) {
  return (__umulhi(a, magic) + a) >> shift;
}
__device__ __forceinline__ hy_t hy_max(hy_t a, hy_t b) { return (a != a || a > b) ? a : b; }  // NaN wins, as torch
__device__ __forceinline__ hy_t hy_min(hy_t a, hy_t b) { return (a != a || a < b) ? a : b; }
"""
# dtype -> (C element type, expression turning one loaded element {0} into a number)
ELEMENTS = {
    "float32": ("float", "{0}"),
    "float64": ("double", "{0}"),
    "bfloat16": ("unsigned short", "hy_bf16_to_f32({0})"),
    "float16": ("unsigned short", "hy_f16_to_f32({0})"),
    "bool": ("unsigned char", "({0} ? 1 : 0)"),
    "uint8": ("unsigned char", "{0}"),
    "int32": ("int", "{0}"),
    "int64": ("long long", "{0}"),
}
STORES = {
    "float32": "(float){0}",
    "float64": "(double){0}",
    "bfloat16": "hy_f32_to_bf16((float){0})",
    "float16": "hy_f32_to_f16((float){0})",
    "bool": "({0} != (hy_t)0)",
}
_BOOL = "(({0}) ? (hy_t)1 : (hy_t)0)"
# op -> (float32 expression, float64 expression) over operands {0}, {1}, {2}.
EXPRESSIONS = {
    "add": ("({0} + {1})",) * 2,
    "sub": ("({0} - {1})",) * 2,
    "mul": ("({0} * {1})",) * 2,
    "div": ("({0} / {1})",) * 2,
    "neg": ("(-{0})",) * 2,
    "exp": ("expf({0})", "exp({0})"),
    "log": ("logf({0})", "log({0})"),
    "tanh": ("tanhf({0})", "tanh({0})"),
    "sigmoid": ("(1.0f / (1.0f + expf(-{0})))", "(1.0 / (1.0 + exp(-{0})))"),
    "relu": ("(({0} < (hy_t)0) ? (hy_t)0 : {0})",) * 2,  # NaN passes through, as torch
    "gelu": ("(0.5f * {0} * (1.0f + erff({0} * 0.70710678f)))", "(0.5 * {0} * (1.0 + erf({0} * 0.7071067811865476)))"),
    "gelu_tanh": (
        "(0.5f * {0} * (1.0f + tanhf(0.7978845608f * ({0} + 0.044715f * {0} * {0} * {0}))))",
        "(0.5 * {0} * (1.0 + tanh(0.7978845608028654 * ({0} + 0.044715 * {0} * {0} * {0}))))",
    ),
    "silu": ("({0} / (1.0f + expf(-{0})))", "({0} / (1.0 + exp(-{0})))"),
    "sqrt": ("sqrtf({0})", "sqrt({0})"),
    "rsqrt": ("rsqrtf({0})", "rsqrt({0})"),
    "abs": ("fabsf({0})", "fabs({0})"),
    "maximum": ("hy_max({0}, {1})",) * 2,
    "minimum": ("hy_min({0}, {1})",) * 2,
    "where": ("(({0} != (hy_t)0) ? {1} : {2})",) * 2,
    **{
        op: (_BOOL.format("{0} %s {1}" % sym),) * 2
        for op, sym in {"lt": "<", "le": "<=", "gt": ">", "ge": ">=", "eq": "==", "ne": "!="}.items()
    },
}
# Exponents torch's pow kernels special-case; the rest go to powf/pow.
POW_EXPRESSIONS = {
    0.0: "(hy_t)1",
    0.5: "sqrt{f}({0})",
    -0.5: "rsqrt{f}({0})",
    1.0: "{0}",
    2.0: "({0} * {0})",
    3.0: "({0} * {0} * {0})",
    -1.0: "((hy_t)1 / {0})",
    -2.0: "((hy_t)1 / ({0} * {0}))",
}
CASTS = {
    "float32": "(hy_t)(float){0}",
    "float64": "(hy_t){0}",
    "bfloat16": "(hy_t)hy_bf16_to_f32(hy_f32_to_bf16((float){0}))",
    "float16": "(hy_t)hy_f16_to_f32(hy_f32_to_f16((float){0}))",
    "bool": _BOOL.format("{0} != (hy_t)0"),
}


def _literal(x: bool | int | float) -> str:
    x = float(x)
    if math.isnan(x):
        return "((hy_t)__longlong_as_double(0x7ff8000000000000LL))"
    if math.isinf(x):
        return "((hy_t)__longlong_as_double((long long)0x%sULL))" % ("7ff0000000000000" if x > 0 else "fff0000000000000")
    return f"((hy_t){x!r})"  # repr round-trips, so the C double is the Python float


def _expression(prog: Program, k: int, f64: bool) -> str:
    name, operands, target = prog.ops[k]
    names = [{"in": "x{}", "v": "v{}"}[tag].format(x) if tag != "c" else _literal(x) for tag, x in operands]
    if name == "cast":
        return CASTS[target].format(*names)
    if name == "pow":
        template = POW_EXPRESSIONS.get(float(operands[1][1]), "pow{f}({0}, {1})")
        return template.replace("{f}", "" if f64 else "f").format(*names)
    if name == "add" and prog.kinds[k] == "bool":  # bool + bool is logical or in torch
        return _BOOL.format("({0} != (hy_t)0) | ({1} != (hy_t)0)").format(*names)
    return EXPRESSIONS[name][f64].format(*names)


def _loop(prog: Program, dtypes: tuple[str, ...], f64: bool, wide: bool) -> list[str]:
    """The grid-stride loop, in 64-bit (``wide``) or 32-bit index arithmetic."""
    idx, inner = ("long long" if wide else "unsigned"), max(1, len(prog.shape)) - 1
    used = sorted({x for _, operands, _ in prog.ops for tag, x in operands if tag == "in"})
    lines = [f"for ({idx} i = blockIdx.x * ({idx})blockDim.x + threadIdx.x; i < ({idx})a.n; i += ({idx})gridDim.x * blockDim.x) {{"]
    body = [f"{idx} rem = i;", *(f"{idx} o{k} = 0;" for k in used)]
    # Dims innermost first; the outermost needs no division, its stride is outer{k}.
    for d in range(inner):
        div = f"rem / a.size{d}" if wide else f"hy_divu(rem, ({idx})a.magic{d}, ({idx})a.shift{d})"
        body.append(f"{'  ' * d}if (a.rank > {d + 1}) {{ const {idx} q{d} = {div}; const {idx} r{d} = rem - q{d} * ({idx})a.size{d};")
        body += [f"{'  ' * d}  o{k} += r{d} * ({idx})a.st{k}_{d};" for k in used] + [f"{'  ' * d}  rem = q{d};"]
    body += ["}" * inner] if inner else []
    body += [f"o{k} += rem * ({idx})a.outer{k};" for k in used]
    body += [f"const hy_t x{k} = (hy_t){ELEMENTS[dtypes[k]][1].format(f'in{k}[o{k}]')};" for k in used]
    body += [f"const hy_t v{k} = {_expression(prog, k, f64)};" for k in range(len(prog.ops))]
    body.append(f"out_[i] = {STORES[prog.dtype].format(f'v{prog.out}')};")
    return lines + ["  " + line for line in body] + ["}"]


def _generate(prog: Program, dtypes: tuple[str, ...]) -> str:
    compute = _compute(prog, dtypes)
    f64, n, inner = compute == "float64", prog.n_inputs, max(1, len(prog.shape)) - 1
    params = [f"{ELEMENTS[prog.dtype][0]}* __restrict__ out_"]
    params += [f"const {ELEMENTS[dtypes[k]][0]}* __restrict__ in{k}" for k in range(n)]
    # Sizes and strides travel as one struct by value: one kernel argument is cheaper to pass than many.
    fields = ["n", "wide", "rank", *(f"{field}{d}" for d in range(inner) for field in ("size", "magic", "shift"))]
    fields += [s for k in range(n) for s in (f"outer{k}", *(f"st{k}_{d}" for d in range(inner)))]
    params.append("const hy_args a")
    summary = [
        f"// v{k} = {name}({', '.join(f'{tag}{x}' if tag != 'c' else repr(x) for tag, x in ops)}{', ' + t if t else ''})"
        for k, (name, ops, t) in enumerate(prog.ops)
    ]
    head = f"// Hypatia pointwise kernel: inputs {', '.join(dtypes)}; rank <= {inner + 1}; computed in {compute}; output {prog.dtype}"
    return "\n".join(
        [
            head,
            *summary,
            f"typedef {'double' if f64 else 'float'} hy_t;",
            _PRELUDE.strip(),
            "struct hy_args { long long " + ", ".join(fields) + "; };",
            f'extern "C" __global__ void {KERNEL_NAME}(' + ", ".join(params) + ") {",
            "  if (a.wide) {",
            *("    " + line for line in _loop(prog, dtypes, f64, wide=True)),
            "  } else {",
            *("    " + line for line in _loop(prog, dtypes, f64, wide=False)),
            "  }",
            "}",
            "",
        ]
    )


def _compute(prog: Program, dtypes: tuple[str, ...]) -> str:
    return "float64" if prog.needs_f64 or "float64" in dtypes else "float32"


def _default_dtypes(prog: Program) -> tuple[str, ...]:
    """A guess at the inputs' dtypes for warming: where-conditions are bool, the rest the output's."""
    conditions, others = set(), set()
    for name, operands, _ in prog.ops:
        for i, (tag, x) in enumerate(operands):
            if tag == "in":
                (conditions if name == "where" and i == 0 else others).add(x)
    number = "float32" if prog.dtype == "bool" else prog.dtype
    return tuple("bool" if k in conditions - others else number for k in range(prog.n_inputs))


def _dtypes(prog: Program, input_dtypes: Sequence | None) -> tuple[str, ...]:
    dtypes = _default_dtypes(prog) if input_dtypes is None else tuple(str(d).removeprefix("torch.") for d in input_dtypes)
    if len(dtypes) != prog.n_inputs:
        raise PointwiseProgramError(f"program takes n_inputs={prog.n_inputs} tensors, got {len(dtypes)} dtypes")
    for k, dtype in enumerate(dtypes):
        if dtype not in ELEMENTS:
            raise PointwiseCompileError(f"the pointwise kernel cannot load input {k} of dtype {dtype}")
    return dtypes


@functools.cache
def _source(prog: Program, dtypes: tuple[str, ...]) -> tuple[str, str]:
    source = _generate(prog, dtypes)
    return source, hashlib.sha256(source.encode()).hexdigest()


def program_source(program: Any, input_dtypes: Sequence[str | torch.dtype] | None = None) -> str:
    """The CUDA C++ source for ``program`` and its inputs' dtypes (names or torch dtypes).

    Without ``input_dtypes``, where-conditions are taken as bool and every other input as the
    output's dtype. The source depends on the rank of the shape, not on the sizes.
    """
    prog = _checked(program)
    return _source(prog, _dtypes(prog, input_dtypes))[0]


def source_hash(program: Any, input_dtypes: Sequence[str | torch.dtype] | None = None) -> str:
    """The sha256 (hex) of :func:`program_source`, the key of the compiled-kernel cache."""
    prog = _checked(program)
    return _source(prog, _dtypes(prog, input_dtypes))[1]


# ---------------------------------------------------------------------------------------------
# Compiling and launching

_KERNELS: dict[str, Any] = {}  # source hash -> cupy.RawKernel
_COMPILE_LOCK = threading.Lock()


def _cupy(digest: str):
    try:
        import cupy
    except ImportError as e:
        raise PointwiseCompileError(f"pointwise kernel {digest[:16]}: cupy is not installed ({e})") from e
    return cupy


def _kernel(prog: Program, dtypes: tuple[str, ...]):
    source, digest = _source(prog, dtypes)
    kernel = _KERNELS.get(digest)
    if kernel is not None:
        counters["pointwise.cache_hits"] += 1
        return kernel
    with _COMPILE_LOCK:
        if digest in _KERNELS:
            counters["pointwise.cache_hits"] += 1
            return _KERNELS[digest]
        cupy = _cupy(digest)
        try:
            kernel = cupy.RawKernel(source, KERNEL_NAME)
            kernel.compile()  # now, not at the first launch, so warming and errors happen here
        except Exception as e:
            counters["pointwise.compile_errors"] += 1
            raise PointwiseCompileError(f"pointwise kernel {digest[:16]} did not compile: {e}") from e
        counters["pointwise.compiles"] += 1
        _KERNELS[digest] = kernel
        return kernel


def compile_cuda(program: Any, input_dtypes: Sequence[str | torch.dtype] | None = None) -> Any:
    """The compiled ``cupy.RawKernel`` for ``program`` (see :func:`program_source`), cached by source hash."""
    prog = _checked(program)
    return _kernel(prog, _dtypes(prog, input_dtypes))


def _magic(divisor: int) -> tuple[int, int]:
    """Multiplier and shift with (umulhi(a, m) + a) >> s == a // divisor for a < 2**31."""
    shift = max(0, (divisor - 1).bit_length())
    return ((1 << 32) * ((1 << shift) - divisor)) // divisor + 1, shift


def _broadcast_strides(t, shape: tuple[int, ...], k: int) -> list[int]:
    if t.dim() > len(shape):
        raise PointwiseProgramError(f"input {k} of shape {list(t.shape)} has more dims than the output {list(shape)}")
    strides = [0] * (len(shape) - t.dim())
    for size, stride, out in zip(t.shape, t.stride(), shape[len(shape) - t.dim() :]):
        if size != out and size != 1:
            raise PointwiseProgramError(f"input {k} of shape {list(t.shape)} does not broadcast to {list(shape)}")
        strides.append(stride if size == out and size != 1 else 0)
    return strides


_LAYOUTS: dict[tuple, Any] = {}


def _layout(inputs: list, shape: tuple[int, ...]):
    """The kernel's hy_args: n, wide, rank, then sizes and strides, with dims collapsed."""
    key = (shape, tuple((t.shape, t.stride()) for t in inputs))
    hit = _LAYOUTS.get(key)
    if hit is not None:
        return hit
    import numpy as np

    strides = [_broadcast_strides(t, shape, k) for k, t in enumerate(inputs)]
    # Drop size-1 dims and merge neighbours that every input walks contiguously (outermost first).
    dims: list[tuple[int, list[int]]] = []
    for d, size in enumerate(shape):
        if size == 1:
            continue
        column = [s[d] for s in strides]
        if dims and all(prev == s * size for prev, s in zip(dims[-1][1], column)):
            dims[-1] = (dims[-1][0] * size, column)
        else:
            dims.append((size, column))
    dims = dims or [(1, [0] * len(inputs))]
    inner = max(1, len(shape)) - 1
    slots = dims[:0:-1] + [(1, [0] * len(inputs))] * (inner - len(dims) + 1)  # innermost first, padded
    numel = math.prod(shape)
    widest = max([numel] + [sum((size - 1) * col[k] for size, col in dims) for k in range(len(inputs))])
    args = [numel, int(widest >= 2**31), len(dims)]
    for size, _ in slots:
        args += [size, *_magic(size)]
    for k in range(len(inputs)):
        args += [dims[0][1][k], *(column[k] for _, column in slots)]
    packed = np.zeros((), np.dtype([("a", np.int64, (len(args),))]))
    packed["a"] = args
    layout = packed[()]  # a numpy struct scalar, which cupy passes by value as hy_args
    if len(_LAYOUTS) > 4096:
        _LAYOUTS.clear()
    _LAYOUTS[key] = layout
    return layout


@functools.cache
def _max_blocks(device_index: int) -> int:
    import torch

    # A few waves of resident blocks; the grid-stride loop covers the rest.
    return torch.cuda.get_device_properties(device_index).multi_processor_count * 32


@dataclass(frozen=True)
class _StreamHandle:
    """A raw CUDA stream in the CUDA stream protocol, which cupy's ``Stream.from_external`` reads."""

    ptr: int

    def __cuda_stream__(self) -> tuple[int, int]:
        return (0, self.ptr)


_STREAMS: dict[tuple[int, int], Any] = {}


def _cupy_stream(cupy, device_index: int, ptr: int):
    stream = _STREAMS.get((device_index, ptr))
    if stream is None:
        if hasattr(cupy.cuda.Stream, "from_external"):  # cupy >= 14 deprecates ExternalStream
            stream = cupy.cuda.Stream.from_external(_StreamHandle(ptr))
        else:
            stream = cupy.cuda.ExternalStream(ptr, device_index)
        _STREAMS[(device_index, ptr)] = stream
    return stream


def pointwise_cuda(*args) -> torch.Tensor:
    """Run the program (last argument) as one generated CUDA kernel on torch's current stream."""
    import torch

    prog, inputs = _split(args)
    device = next((t.device for t in inputs if t.device.type == "cuda"), None)
    if device is None:
        raise PointwiseProgramError("pointwise_cuda needs at least one CUDA input")
    for k, t in enumerate(inputs):
        if t.device != device:
            if t.device.type == "cpu" and t.dim() == 0:
                inputs[k] = t.to(device)  # a CPU scalar, as torch's own binary ops accept
            else:
                raise PointwiseProgramError(f"input {k} is on {t.device}, the others on {device}")
    dtypes = _dtypes(prog, [t.dtype for t in inputs])
    out = torch.empty(prog.shape, dtype=getattr(torch, prog.dtype), device=device)
    if out.numel() == 0:
        return out
    layout = _layout(inputs, prog.shape)
    cupy = _cupy(_source(prog, dtypes)[1])
    import numpy as np

    with cupy.cuda.Device(device.index):
        kernel = _kernel(prog, dtypes)
        stream = _cupy_stream(cupy, device.index, torch.cuda.current_stream(device).cuda_stream)
        pointers = (np.uint64(out.data_ptr()), *(np.uint64(t.data_ptr()) for t in inputs))
        blocks = min(-(-out.numel() // BLOCK), _max_blocks(device.index))
        with stream:
            kernel((blocks,), (BLOCK,), (*pointers, layout))
    return out
