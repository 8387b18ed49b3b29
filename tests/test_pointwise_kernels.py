"""Generated pointwise kernels: program validation, the torch evaluator against eager, CUDA codegen."""

from __future__ import annotations

import copy
import hashlib
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from hypatia.kernels import pointwise as pw
from hypatia.kernels import pointwise_cuda as pwc
from hypatia.kernels.pointwise import ARITY, PointwiseCompileError, PointwiseProgramError, pointwise_cpu, validate_program
from hypatia.kernels.pointwise_cuda import compile_cuda, pointwise_cuda, program_source, source_hash

ROOT = Path(__file__).resolve().parents[1]


def I(k):
    return ["in", k]


def V(j):
    return ["v", j]


def C(x):
    return ["c", x]


def program(n_inputs, ops, shape, dtype="float32", out=None):
    return {"v": 1, "n_inputs": n_inputs, "ops": ops, "out": len(ops) - 1 if out is None else out, "dtype": dtype, "shape": list(shape)}


@dataclass(frozen=True)
class Case:
    name: str
    program: dict
    inputs: Callable[[str], list[torch.Tensor]]  # device -> input tensors
    eager: Callable[..., torch.Tensor]


def _randn(*shape, dtype=torch.float32, device="cpu"):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(sum(shape) + 7)).to(device, dtype)


def _positive(*shape, dtype=torch.float32, device="cpu"):
    return (torch.rand(*shape, generator=torch.Generator().manual_seed(sum(shape))) * 1.5 + 0.5).to(device, dtype)


def _unary_chain():
    # Sums f(x) over the unary ops, on a transposed (non-contiguous) input.
    ops = [["exp", I(0)], ["tanh", I(0)], ["add", V(0), V(1)], ["sigmoid", I(0)], ["add", V(2), V(3)], ["relu", I(0)]]
    ops += [["add", V(4), V(5)], ["gelu_tanh", I(0)], ["add", V(6), V(7)], ["silu", I(0)], ["add", V(8), V(9)]]
    ops += [["abs", I(0)], ["sqrt", V(11)], ["add", V(10), V(12)], ["add", V(11), C(0.5)], ["rsqrt", V(14)]]
    ops += [["add", V(13), V(15)], ["add", V(11), C(1)], ["log", V(17)], ["add", V(16), V(18)]]

    def eager(x):
        total = x.exp() + x.tanh() + x.sigmoid() + x.relu() + F.gelu(x, approximate="tanh") + F.silu(x)
        return total + x.abs().sqrt() + (x.abs() + 0.5).rsqrt() + (x.abs() + 1).log()

    return Case("unary_transposed", program(1, ops, [6, 10]), lambda d: [_randn(10, 6, device=d).t()], eager)


CASES = [
    Case(
        "brief_example",
        program(3, [["add", I(0), I(1)], ["mul", V(0), C(0.5)], ["gelu", V(1)], ["where", I(2), V(2), C(0.0)]], [4, 8, 16]),
        lambda d: [_randn(4, 8, 16, device=d), _randn(16, device=d), _randn(4, 1, 16, device=d) > 0],
        lambda x, y, m: torch.where(m, F.gelu((x + y) * 0.5), 0.0),
    ),
    Case(
        "broadcast_arith",
        program(
            2,
            [["sub", I(0), I(1)], ["abs", V(0)], ["add", V(1), C(1.0)], ["div", I(0), V(2)], ["neg", V(3)]]
            + [["maximum", V(4), I(1)], ["minimum", V(5), C(0.25)], ["sub", C(2.0), V(6)], ["div", V(7), C(3)]],
            [5, 7],
        ),
        lambda d: [_randn(5, 1, device=d), _randn(1, 7, device=d)],
        lambda a, b: (2.0 - torch.minimum(torch.maximum(-(a / ((a - b).abs() + 1.0)), b), torch.tensor(0.25))) / 3,
    ),
    _unary_chain(),
    Case(
        "pow",
        program(
            1,
            [["pow", I(0), C(2.0)], ["pow", I(0), C(3)], ["add", V(0), V(1)], ["abs", I(0)], ["pow", V(3), C(0.7)]]
            + [["add", V(2), V(4)], ["add", V(3), C(1.0)], ["pow", V(6), C(-0.5)], ["add", V(5), V(7)]],
            [33],
        ),
        lambda d: [_randn(33, device=d)],
        lambda x: x.pow(2.0) + x.pow(3) + x.abs().pow(0.7) + (x.abs() + 1.0).pow(-0.5),
    ),
    Case(
        "comparisons_to_bool",
        program(
            2,
            [["lt", I(0), I(1)], ["le", I(0), C(0.0)], ["gt", I(1), I(0)], ["ge", I(0), C(0.5)], ["eq", V(0), V(2)]]
            + [["ne", V(1), V(3)], ["add", V(4), V(5)], ["eq", I(0), I(1)], ["mul", V(6), V(7)]],
            [3, 4],
            dtype="bool",
        ),
        lambda d: [_randn(3, 4, device=d), torch.where(torch.arange(12).view(3, 4).to(d) % 3 == 0, _randn(3, 4, device=d), 1.0)],
        lambda a, b: torch.mul(torch.add((a < b) == (b > a), (a <= 0.0) != (a >= 0.5)), a == b),
    ),
    Case(
        "where_and_bool_cast",
        program(
            3,
            [["lt", I(0), I(1)], ["where", V(0), I(0), I(1)], ["cast", I(2), "float32"], ["mul", V(1), V(2)]]
            + [["cast", V(0), "float32"], ["add", V(3), V(4)], ["where", I(2), C(2.0), V(5)]],
            [4, 6],
        ),
        lambda d: [_randn(4, 6, device=d), _randn(6, device=d), _randn(4, 1, device=d) > 0],
        lambda a, b, m: torch.where(m, 2.0, torch.where(a < b, a, b) * m.float() + (a < b).float()),
    ),
    Case(
        "zero_dim_scalar",
        program(2, [["mul", I(0), I(1)], ["add", V(0), I(1)]], [4, 5]),
        lambda d: [_randn(4, 5, device=d), torch.tensor(1.5, device=d)],
        lambda x, s: x * s + s,
    ),
    Case(
        "cast_bf16_mid_chain",
        program(2, [["mul", I(0), C(3.0)], ["cast", V(0), "bfloat16"], ["add", V(1), I(1)]], [64]),
        lambda d: [_randn(64, device=d), _randn(64, device=d)],
        lambda x, y: (x * 3.0).to(torch.bfloat16).float() + y,
    ),
    Case(
        "bf16_inputs",
        program(3, [["mul", I(0), I(1)], ["add", V(0), I(2)], ["silu", V(1)], ["mul", V(2), C(0.5)]], [16, 32], dtype="bfloat16"),
        lambda d: [
            _positive(16, 32, dtype=torch.bfloat16, device=d),
            _positive(32, dtype=torch.bfloat16, device=d),
            _positive(16, 1, dtype=torch.bfloat16, device=d),
        ],
        lambda a, b, c: F.silu(a * b + c) * 0.5,
    ),
    Case(
        "fp16_and_fp32_inputs",
        program(2, [["add", I(0), I(1)], ["cast", V(0), "float16"], ["mul", V(1), C(2.0)]], [8, 8]),
        lambda d: [_randn(8, 8, dtype=torch.float16, device=d), _randn(8, 8, device=d)],
        lambda x, y: (x + y).half().float() * 2.0,
    ),
    Case(
        "float64",
        program(2, [["mul", I(0), I(1)], ["add", V(0), C(0.1)]], [9], dtype="float64"),
        lambda d: [_randn(9, dtype=torch.float64, device=d), _randn(9, device=d)],
        lambda x, y: x * y + 0.1,
    ),
]


def test_cases_use_every_op():
    used = {op[0] for case in CASES for op in case.program["ops"]}
    assert used == set(ARITY)


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.name)
def test_cpu_matches_eager(case):
    inputs = case.inputs("cpu")
    before = [t.clone() for t in inputs]
    out = pointwise_cpu(*inputs, case.program)
    assert list(out.shape) == case.program["shape"] and out.is_contiguous()
    assert out.dtype == getattr(torch, case.program["dtype"])
    torch.testing.assert_close(out, case.eager(*inputs))
    for t, saved in zip(inputs, before):
        assert torch.equal(t, saved), "an input was modified"


def test_cpu_never_returns_an_input():
    x = torch.randn(4)
    out = pointwise_cpu(x, program(1, [["cast", I(0), "float32"]], [4]))
    assert torch.equal(out, x) and out.data_ptr() != x.data_ptr()


def test_cpu_zero_dim_and_empty():
    p0 = program(1, [["mul", I(0), C(2.0)]], [])
    assert pointwise_cpu(torch.tensor(3.0), p0).item() == 6.0
    empty = pointwise_cpu(torch.randn(0, 4), program(1, [["exp", I(0)]], [0, 4], dtype="bfloat16"))
    assert empty.shape == (0, 4) and empty.dtype == torch.bfloat16


def test_cpu_expands_to_the_program_shape():
    out = pointwise_cpu(torch.ones(3), program(1, [["add", I(0), C(1.0)]], [2, 3]))
    assert out.shape == (2, 3) and out.is_contiguous() and bool((out == 2).all())


BASE = program(2, [["add", I(0), I(1)], ["gelu", V(0)]], [4])
MALFORMED = [
    ("not_a_dict", lambda p: [p], "is a dict"),
    ("missing_key", lambda p: {k: v for k, v in p.items() if k != "shape"}, "lacks shape"),
    ("unknown_key", lambda p: p | {"outs": 1}, "unknown keys outs"),
    ("version", lambda p: p | {"v": 2}, "version 2"),
    ("unknown_op", lambda p: p | {"ops": [["frobnicate", I(0)]], "out": 0}, "unknown op 'frobnicate'"),
    ("forward_ref", lambda p: p | {"ops": [["add", I(0), V(1)], ["gelu", V(0)]]}, "forward reference"),
    ("self_ref", lambda p: p | {"ops": [["add", I(0), I(1)], ["gelu", V(1)]]}, "forward reference"),
    ("arity", lambda p: p | {"ops": [["add", I(0)], ["gelu", V(0)]]}, "add takes 2 operand(s), got 1"),
    ("operand_tag", lambda p: p | {"ops": [["add", I(0), ["x", 1]], ["gelu", V(0)]]}, "unknown operand tag 'x'"),
    ("operand_shape", lambda p: p | {"ops": [["add", I(0), ["in"]], ["gelu", V(0)]]}, "not a [tag, value] pair"),
    ("input_range", lambda p: p | {"ops": [["add", I(0), I(5)], ["gelu", V(0)]]}, "outside n_inputs=2"),
    ("n_inputs", lambda p: p | {"n_inputs": 0}, "n_inputs must be a positive int"),
    ("dtype", lambda p: p | {"dtype": "float8"}, "unknown output dtype 'float8'"),
    ("cast_dtype", lambda p: p | {"ops": [["cast", I(0), "int4"]], "out": 0}, "cast to unknown dtype 'int4'"),
    ("constant", lambda p: p | {"ops": [["add", I(0), C("1")], ["gelu", V(0)]]}, "constant '1' is not a number"),
    ("pow_exponent", lambda p: p | {"ops": [["pow", I(0), I(1)]], "out": 0}, "constant exponent"),
    ("only_constants", lambda p: p | {"ops": [["add", C(1.0), C(2.0)]], "out": 0}, "only constant operands"),
    ("out", lambda p: p | {"out": 2}, "out must index one of the 2 ops"),
    ("shape", lambda p: p | {"shape": [4, -1]}, "shape must be a list of non-negative ints"),
    ("empty_ops", lambda p: p | {"ops": []}, "non-empty"),
    ("op_not_list", lambda p: p | {"ops": ["add", ["gelu", V(0)]]}, "not a list starting with an op name"),
]


@pytest.mark.parametrize("mutate, message", [m[1:] for m in MALFORMED], ids=[m[0] for m in MALFORMED])
def test_malformed_programs_are_rejected(mutate, message):
    bad = mutate(copy.deepcopy(BASE))
    with pytest.raises(PointwiseProgramError) as info:
        validate_program(bad)
    assert message in str(info.value)


def test_call_must_fit_the_program():
    validate_program(BASE)
    with pytest.raises(PointwiseProgramError, match="n_inputs=2 tensors, got 1"):
        pointwise_cpu(torch.ones(4), BASE)


def test_validation_is_cached_per_program():
    p = copy.deepcopy(BASE)
    assert pw._checked(p) is pw._checked(p) is pw._checked(copy.deepcopy(BASE))


def test_source_is_deterministic_and_hashed():
    src = program_source(BASE)
    assert src == program_source(copy.deepcopy(BASE)) == program_source(BASE)
    assert source_hash(BASE) == hashlib.sha256(src.encode()).hexdigest()
    assert "#include" not in src and "hy_pointwise" in src
    # The kernel takes sizes and strides as arguments: one per rank, not per shape.
    assert source_hash(BASE | {"shape": [1024]}) == source_hash(BASE)
    variants = [
        BASE | {"shape": [4, 4]},
        BASE | {"dtype": "bfloat16"},
        BASE | {"ops": [["add", I(0), I(1)], ["gelu_tanh", V(0)]]},
        BASE | {"ops": [["add", I(0), C(1.5)], ["gelu", V(0)]]},
        BASE | {"ops": [["add", I(0), C(2.5)], ["gelu", V(0)]]},
    ]
    hashes = {source_hash(BASE), *map(source_hash, variants)}
    assert len(hashes) == 1 + len(variants)


def test_source_follows_the_input_dtypes():
    assert "typedef float hy_t;" in program_source(BASE) and "erff(" in program_source(BASE)
    assert "typedef double hy_t;" in program_source(BASE | {"dtype": "float64"})
    assert "typedef double hy_t;" in program_source(BASE, ["float64", "float32"])
    assert "hy_bf16_to_f32(in1[o1])" in program_source(BASE, [torch.float32, torch.bfloat16])
    assert source_hash(BASE, ["float32", "float32"]) == source_hash(BASE)
    assert source_hash(BASE, ["float32", "float16"]) != source_hash(BASE)
    # Without dtypes, where-conditions are bool and the rest take the output's dtype.
    example = CASES[0].program | {"dtype": "bfloat16"}
    assert pwc._default_dtypes(pw._checked(example)) == ("bfloat16", "bfloat16", "bool")
    with pytest.raises(PointwiseCompileError, match="complex64"):
        program_source(BASE, ["float32", torch.complex64])


def test_magic_division():
    rng = np.random.default_rng(0)
    for divisor in [1, 2, 3, 7, 768, 1000, 4097, 65535, 2**20 + 1, 2**31 - 1, *rng.integers(1, 2**31, 50).tolist()]:
        magic, shift = pwc._magic(divisor)
        assert magic < 2**32 and shift < 32
        a = np.concatenate([rng.integers(0, 2**31, 2000, dtype=np.uint64), np.array([0, divisor - 1, divisor, 2**31 - 1], np.uint64)])
        q = ((a * np.uint64(magic)) >> np.uint64(32)) + a >> np.uint64(shift)
        np.testing.assert_array_equal(q, a // np.uint64(divisor))


def test_import_needs_neither_torch_nor_cupy():
    code = "import sys, hypatia.kernels.pointwise; assert not {'torch', 'cupy'} & set(sys.modules), sys.modules.keys()"
    subprocess.run([sys.executable, "-c", code], cwd=ROOT, check=True, timeout=60)


def test_compile_without_cupy_names_the_source(monkeypatch):
    monkeypatch.setitem(sys.modules, "cupy", None)
    monkeypatch.setattr(pwc, "_KERNELS", {})
    p = BASE | {"ops": [["add", I(0), C(12345.5)], ["gelu", V(0)]]}
    with pytest.raises(PointwiseCompileError, match=source_hash(p)[:16]):
        compile_cuda(p)


def _bf16_bits_reference(x: np.ndarray) -> np.ndarray:
    """The kernel's float32 -> bfloat16 conversion (hy_f32_to_bf16), step for step."""
    u = x.astype(np.float32).view(np.uint32).astype(np.uint64)
    rounded = ((u + 0x7FFF + ((u >> 16) & 1)) >> 16) & 0xFFFF
    nan = (u & 0x7FFFFFFF) > 0x7F800000
    return np.where(nan, 0x7FC0, rounded).astype(np.uint16)


def test_bf16_conversion_matches_torch():
    assert "(u + 0x7fffu + ((u >> 16) & 1u)) >> 16" in program_source(BASE)
    special = np.array([0.0, -0.0, 1.0, -1.0, np.inf, -np.inf, np.nan, -np.nan, 3.0e38, 3.4028235e38, 1e-40, -1e-45], np.float32)
    ties = (np.arange(1 << 16, dtype=np.uint32) << 15 | 0x8000).view(np.float32)  # exact halfway points
    bits = np.random.default_rng(0).integers(0, 1 << 32, 200_000, dtype=np.uint64).astype(np.uint32)
    x = np.concatenate([special, ties, bits.view(np.float32)])
    expected = torch.from_numpy(x).to(torch.bfloat16)
    got = _bf16_bits_reference(x)
    nan = np.isnan(x)  # torch's NaN bits differ between its own code paths; NaN-ness is what counts
    np.testing.assert_array_equal(got[~nan], expected.view(torch.int16).numpy().view(np.uint16)[~nan])
    back = (got.astype(np.uint32) << 16).view(np.float32)
    np.testing.assert_array_equal(back, expected.float().numpy())  # NaN equals NaN here


# ---------------------------------------------------------------------------------------------
# CUDA (run with -m gpu on a machine with a CUDA device and cupy)

GPU_TOLERANCE = {torch.float32: dict(rtol=1e-5, atol=1e-5), torch.float64: dict(rtol=1e-12, atol=1e-12)}


@pytest.mark.gpu
@pytest.mark.parametrize("case", CASES, ids=lambda c: c.name)
def test_cuda_matches_eager_and_cpu(case):
    inputs = case.inputs("cuda")
    before = [t.clone() for t in inputs]
    out = pointwise_cuda(*inputs, case.program)
    assert out.device.type == "cuda" and list(out.shape) == case.program["shape"] and out.is_contiguous()
    assert out.dtype == getattr(torch, case.program["dtype"])
    tolerance = GPU_TOLERANCE.get(out.dtype, {})
    torch.testing.assert_close(out, case.eager(*inputs), **tolerance)
    torch.testing.assert_close(out, pointwise_cpu(*inputs, case.program), **tolerance)
    for t, saved in zip(inputs, before):
        assert torch.equal(t, saved)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=["fp32", "bf16", "fp16"])
def test_cuda_dtypes_broadcast_and_strides(dtype):
    name = str(dtype).removeprefix("torch.")
    p = program(3, [["add", I(0), I(1)], ["mul", V(0), C(0.5)], ["gelu", V(1)], ["where", I(2), V(2), C(0.0)]], [6, 40, 24], dtype=name)
    x = _randn(6, 24, 40, dtype=dtype, device="cuda").transpose(1, 2)  # non-contiguous
    y = _randn(40, 1, dtype=dtype, device="cuda")
    m = torch.rand(6, 1, 24, device="cuda") > 0.3
    out = pointwise_cuda(x, y, m, p)
    # The documented semantics: float32 inside, one rounding at the end.
    expected = torch.where(m, F.gelu((x.float() + y.float()) * 0.5), 0.0).to(dtype)
    torch.testing.assert_close(out, expected, **GPU_TOLERANCE.get(dtype, {}))
    torch.testing.assert_close(out, pointwise_cpu(x, y, m, p), **GPU_TOLERANCE.get(dtype, {}))
    eager = torch.where(m, F.gelu((x + y) * 0.5), 0.0)
    torch.testing.assert_close(out, eager, rtol=4e-2, atol=2e-2)


@pytest.mark.gpu
def test_cuda_half_conversions_are_exact():
    halves = torch.arange(-(1 << 15), 1 << 15, dtype=torch.int32).to(torch.int16).view(torch.float16).cuda()
    widened = pointwise_cuda(halves, program(1, [["cast", I(0), "float32"]], [1 << 16]))
    _assert_same_bits(widened, halves.float())
    for dtype, name in ((torch.float16, "float16"), (torch.bfloat16, "bfloat16")):
        bits = torch.randint(-(1 << 31), 1 << 31, (1 << 20,), dtype=torch.int64).to(torch.int32)
        x = torch.cat([bits.view(torch.float32), torch.tensor([0.0, -0.0, 65504.0, 65520.0, 1e-8, float("inf"), float("nan")])])
        narrowed = pointwise_cuda(x.cuda(), program(1, [["cast", I(0), "float32"]], [x.numel()], dtype=name))
        _assert_same_bits(narrowed.cpu(), x.to(dtype))


def _assert_same_bits(a, b):
    """Bit-identical, except that any NaN matches any NaN (torch's own NaN bits vary by path)."""
    int_type = {2: torch.int16, 4: torch.int32}[a.element_size()]
    nan = torch.isnan(b)
    assert torch.equal(torch.isnan(a), nan)
    assert torch.equal(a.view(int_type)[~nan], b.view(int_type)[~nan])


@pytest.mark.gpu
def test_compile_cuda_caches_by_source(monkeypatch):
    monkeypatch.setattr(pwc, "_KERNELS", {})
    p = BASE | {"ops": [["add", I(0), C(271.5)], ["gelu", V(0)]]}
    before = dict(pw.counters)
    first, second = compile_cuda(p), compile_cuda(copy.deepcopy(p))
    assert first is second
    assert pw.counters["pointwise.compiles"] - before.get("pointwise.compiles", 0) == 1
    assert pw.counters["pointwise.cache_hits"] - before.get("pointwise.cache_hits", 0) == 1


@pytest.mark.gpu
def test_compile_errors_name_the_source(monkeypatch):
    monkeypatch.setattr(pwc, "_KERNELS", {})
    p = BASE | {"ops": [["add", I(0), C(314.5)], ["gelu", V(0)]]}
    source = program_source(p)
    monkeypatch.setattr(pwc, "_source", lambda prog, dtypes: (source.replace("hy_t v1", "hy_t v1 = ;"), "f" * 64))
    before = pw.counters["pointwise.compile_errors"]
    with pytest.raises(PointwiseCompileError, match="f" * 16):
        compile_cuda(p)
    assert pw.counters["pointwise.compile_errors"] == before + 1


@pytest.mark.gpu
def test_cuda_zero_dim_empty_and_cpu_scalar():
    p0 = program(2, [["mul", I(0), I(1)]], [])
    assert pointwise_cuda(torch.tensor(3.0, device="cuda"), torch.tensor(2.0, device="cuda"), p0).item() == 6.0
    x = torch.randn(5, 3, device="cuda")
    out = pointwise_cuda(x, torch.tensor(2.0), program(2, [["mul", I(0), I(1)]], [5, 3]))
    torch.testing.assert_close(out, x * 2)
    empty = pointwise_cuda(torch.randn(0, 3, device="cuda"), torch.randn(3, device="cuda"), program(2, [["add", I(0), I(1)]], [0, 3]))
    assert empty.shape == (0, 3) and empty.device.type == "cuda"


@pytest.mark.gpu
def test_cuda_grid_stride_loop_and_side_stream(monkeypatch):
    monkeypatch.setattr(pwc, "_max_blocks", lambda device_index: 3)
    x, y = torch.randn(300, 257, device="cuda"), torch.randn(257, device="cuda")
    p = program(2, [["sub", I(0), I(1)], ["relu", V(0)]], [300, 257])
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        out = pointwise_cuda(x, y, p)
    stream.synchronize()
    torch.testing.assert_close(out, (x - y).relu())


@pytest.mark.gpu
def test_cuda_float64_inputs_int_inputs_and_unsupported_dtypes():
    x, n = torch.randn(64, dtype=torch.float64, device="cuda"), torch.arange(64, device="cuda")
    p = program(2, [["mul", I(0), I(1)], ["add", V(0), C(1e-9)]], [64])
    torch.testing.assert_close(pointwise_cuda(x, n, p), pointwise_cpu(x, n, p), rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(pointwise_cuda(x, n, p), (x * n + 1e-9).float(), rtol=1e-6, atol=1e-6)
    with pytest.raises(PointwiseCompileError, match="complex64"):
        pointwise_cuda(torch.ones(4, dtype=torch.complex64, device="cuda"), program(1, [["neg", I(0)]], [4]))
    with pytest.raises(PointwiseProgramError, match="does not broadcast"):
        pointwise_cuda(torch.ones(3, device="cuda"), program(1, [["neg", I(0)]], [4]))


@pytest.mark.gpu
def test_cuda_indexes_past_32_bits():
    if torch.cuda.get_device_properties(0).total_memory < 16 << 30:
        pytest.skip("needs 16 GiB of GPU memory")
    rows = (1 << 30) + 8  # 4 * rows > 2**32 elements, with one division per element
    x = torch.tensor([[1.0], [-1.0], [2.0], [-2.0]], device="cuda")
    out = pointwise_cuda(x, program(1, [["gt", I(0), C(0.0)]], [4, rows], dtype="bool"))
    assert out[:, -3:].tolist() == [[True] * 3, [False] * 3, [True] * 3, [False] * 3]
    assert int(out.sum()) == 2 * rows
