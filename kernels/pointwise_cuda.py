"""The CUDA side of pointwise chains: one kernel generated per (program, input dtypes), compiled
by NVRTC through cupy and cached by source hash.

Sizes and strides are kernel arguments, so programs that differ only in sizes (not rank) share
a kernel. Importing this module imports neither torch nor cupy: the daemon can warm kernels with
it; both are imported where a kernel is built or launched.
"""

from __future__ import annotations

import functools
import hashlib
import math
import threading
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Sequence

from hypatia.kernels.pointwise import (PointwiseCompileError, PointwiseProgramError, Program, _checked, _split, counters,
                                       from_order, in_order)

if TYPE_CHECKING:
    import torch

KERNEL_NAME = "hy_pointwise"
BLOCK = 256

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
    # computed in the output's memory order, so the kernel writes it contiguously
    inputs = [in_order(t, prog) for t in inputs]
    out = torch.empty(prog.computed_shape, dtype=getattr(torch, prog.dtype), device=device)
    if out.numel() == 0:
        return from_order(out, prog)
    layout = _layout(inputs, prog.computed_shape)
    cupy = _cupy(_source(prog, dtypes)[1])
    import numpy as np

    with cupy.cuda.Device(device.index):
        kernel = _kernel(prog, dtypes)
        stream = _cupy_stream(cupy, device.index, torch.cuda.current_stream(device).cuda_stream)
        pointers = (np.uint64(out.data_ptr()), *(np.uint64(t.data_ptr()) for t in inputs))
        blocks = min(-(-out.numel() // BLOCK), _max_blocks(device.index))
        with stream:
            kernel((blocks,), (BLOCK,), (*pointers, layout))
    return from_order(out, prog)
