"""Equivalence checking: the e-graph proves the identities it should and no false ones; the
numerical fallback and the dtype-aware comparison used to validate fused plans."""

from __future__ import annotations

import gc
import math

import pytest
import torch

from hypatia.planner.counters import counters
from hypatia.planner.equivalence import (
    Comparison,
    ExpressionError,
    check_numerically,
    compare,
    equivalent,
    prove,
    random_inputs,
    tolerance,
)

PROVABLE = {
    "distribute": (("mul", ("add", "a", "b"), "c"), ("add", ("mul", "a", "c"), ("mul", "b", "c"))),
    "mul_assoc": (("mul", "a", ("mul", "b", "c")), ("mul", ("mul", "a", "b"), "c")),
    "sub_def": (("sub", "a", "b"), ("add", "a", ("mul", -1, "b"))),
    "units": (("add", ("mul", "x", 1), 0), "x"),
    "exp_sum": (("exp", ("add", "a", "b")), ("mul", ("exp", "a"), ("exp", "b"))),
    "double": (("mul", 2, "x"), ("add", "x", "x")),
    "sigmoid_def": (("sigmoid", "x"), ("div", 1, ("add", 1, ("exp", ("neg", "x"))))),
    "half_of_double": (("mul", 0.5, ("add", "x", "x")), "x"),
    "fold_big_literals": (("mul", ("mul", 2.0**600, "x"), 2.0**-600), "x"),
    "square": (
        ("pow", ("add", "a", "b"), 2),
        ("add", ("add", ("mul", "a", "a"), ("mul", 2, ("mul", "a", "b"))), ("mul", "b", "b")),
    ),
}

NOT_PROVABLE = {
    "lost_factor": (("mul", ("add", "a", "b"), "c"), ("add", ("mul", "a", "c"), "b")),
    "sub_swapped": (("sub", "a", "b"), ("sub", "b", "a")),
}


@pytest.fixture(autouse=True, scope="module")
def _free_egraphs_on_this_thread():
    """egglog's high-level e-graphs sit in reference cycles, and their native e-graph may only be
    freed on the thread that made it: collect them here, before a later module's threads could
    be the ones the garbage collector happens to run on."""
    yield
    gc.collect()


@pytest.mark.parametrize("lhs,rhs", PROVABLE.values(), ids=PROVABLE.keys())
def test_prove_true_identities(lhs, rhs):
    assert prove(lhs, rhs) is True
    assert prove(rhs, lhs) is True


@pytest.mark.parametrize("lhs,rhs", NOT_PROVABLE.values(), ids=NOT_PROVABLE.keys())
def test_prove_false_identities(lhs, rhs):
    assert prove(lhs, rhs) is False


def test_prove_counts_outcomes():
    proved, unproved = counters["equivalence.egraph.proved"], counters["equivalence.egraph.unproved"]
    prove("x", ("add", "x", 0))
    prove("x", "y")
    assert counters["equivalence.egraph.proved"] == proved + 1
    assert counters["equivalence.egraph.unproved"] == unproved + 1


@pytest.mark.parametrize("bad", [("frobnicate", "x"), ("exp", "x", "y"), ("add", "x"), None, True])
def test_prove_rejects_malformed_expressions(bad):
    with pytest.raises(ExpressionError):
        prove(bad, "x")


def test_equivalent_proved_by_egraph():
    verdict = equivalent(("sub", "a", "b"), ("add", "a", ("neg", "b")))
    assert (verdict.equal, verdict.method) == (True, "egraph")


def test_equivalent_falls_back_to_random_trials():
    # there are deliberately no log rules, so only the numerical check can vouch for this
    lhs, rhs = ("log", ("exp", "x")), "x"
    assert prove(lhs, rhs) is False
    verdict = equivalent(lhs, rhs, variables={"x": (8, 8)})
    assert (verdict.equal, verdict.method) == (True, "random")
    assert "not refuted" in verdict.detail


def test_equivalent_refutes_false_identity():
    verdict = equivalent(("div", "a", "b"), ("div", "b", "a"))
    assert (verdict.equal, verdict.method) == (False, "random")
    assert "refuted" in verdict.detail


def test_tolerances_loosen_with_precision():
    assert tolerance(torch.float64) == (1e-7, 1e-7)
    assert tolerance(torch.float32) == (1e-4, 1e-5)
    assert tolerance(torch.float16) == (1e-2, 1e-3)
    assert tolerance(torch.bfloat16) == (1.6e-2, 1e-2)
    assert tolerance(torch.int32) == (0.0, 0.0)


def test_compare_equal_tensors():
    x = torch.randn(4, 5)
    result = compare(x, x.clone())
    assert isinstance(result, Comparison)
    assert result.ok and result.max_abs_err == 0.0


def test_compare_reports_error_beyond_tolerance():
    ref = torch.randn(4, 5, dtype=torch.float64)
    actual = ref.float()
    actual[2, 3] += 0.5
    result = compare(actual, ref)
    assert not result.ok
    assert result.max_abs_err == pytest.approx(0.5, rel=1e-5)
    assert "[2, 3]" in result.detail


def test_compare_bfloat16_against_float64_reference():
    ref = torch.randn(256, dtype=torch.float64)
    assert compare(ref.to(torch.bfloat16), ref).ok


def test_compare_shape_mismatch_names_shapes():
    result = compare(torch.zeros(2, 3), torch.zeros(3, 2))
    assert not result.ok
    assert "(2, 3)" in result.detail and "(3, 2)" in result.detail


def test_compare_dtype_mismatch():
    # a float64 reference is allowed for any float; a float16 one for float32 is not
    assert not compare(torch.zeros(3), torch.zeros(3, dtype=torch.float16)).ok
    assert not compare(torch.zeros(3, dtype=torch.int32), torch.zeros(3, dtype=torch.int64)).ok


def test_compare_nan_only_where_reference_has_nan():
    ref = torch.tensor([1.0, math.nan, 3.0], dtype=torch.float64)
    assert compare(torch.tensor([1.0, math.nan, 3.0]), ref).ok
    assert not compare(torch.tensor([math.nan, 2.0, 3.0]), ref).ok
    flipped = compare(torch.tensor([-math.inf]), torch.tensor([math.inf], dtype=torch.float64))
    assert not flipped.ok and flipped.max_abs_err == math.inf


def test_compare_integers_exactly():
    x = torch.arange(6)
    assert compare(x, x.clone()).ok
    y = x.clone()
    y[4] += 1
    assert not compare(y, x).ok


def test_compare_nested_structures():
    a, b = torch.randn(3), torch.arange(3)
    assert compare((a, [b, None]), (a.double(), [b, None])).ok
    bad = compare((a, [b + 1]), (a.double(), [b]))
    assert not bad.ok and bad.detail.startswith("[1][0]")
    assert not compare((a,), (a, a)).ok


def test_random_inputs_deterministic_and_typed():
    specs = [((2, 3), "float32"), ((4,), "bfloat16"), ((5,), "bool"), ((6,), "int64")]
    first, again = random_inputs(specs, seed=7), random_inputs(specs, seed=7)
    assert all(torch.equal(x, y) for x, y in zip(first, again))
    assert not torch.equal(first[0], random_inputs(specs, seed=8)[0])
    assert [t.dtype for t in first] == [torch.float32, torch.bfloat16, torch.bool, torch.int64]
    assert [tuple(t.shape) for t in first] == [(2, 3), (4,), (5,), (6,)]
    assert int(first[3].min()) >= 0 and int(first[3].max()) < 16


def test_check_numerically_accepts_float32_kernel():
    x, w = random_inputs([((16, 32), "float32"), ((32, 8), "float32")])

    def kernel(x, w):
        return torch.softmax(x @ w, dim=-1)

    result = check_numerically(kernel, kernel, [x, w], trials=2)
    assert result.ok, result.detail


def test_check_numerically_flags_input_mutation():
    (x,) = random_inputs([((64,), "float32")])
    original = x.clone()
    result = check_numerically(lambda t: t.relu_(), torch.relu, [x])
    assert not result.ok
    assert "kernel modified an input" in result.detail
    assert torch.equal(x, original)


def test_random_inputs_draw_on_the_device_with_its_generator():
    # the promise is per kind of device: on the CPU, the CPU generator's stream for the seed
    (x,) = random_inputs([((5,), "float64")], seed=11, device=torch.device("cpu"))
    assert x.device.type == "cpu"
    assert torch.equal(x, torch.randn(5, dtype=torch.float64, generator=torch.Generator().manual_seed(11)))
    assert torch.equal(x, random_inputs([((5,), "float64")], seed=11, device="cpu")[0])


def test_random_inputs_round_the_wide_draw():
    (half,) = random_inputs([((64,), "float16")], seed=3)
    (wide,) = random_inputs([((64,), "float64")], seed=3)
    assert torch.equal(half, wide.to(torch.float16))
    (c64,) = random_inputs([((8,), "complex64")], seed=3)
    assert torch.equal(c64, random_inputs([((8,), "complex128")], seed=3)[0].to(torch.complex64))


def test_random_inputs_reject_unknown_dtypes():
    with pytest.raises(ValueError, match="float33"):
        random_inputs([((2,), "float33")])


# compare's results and messages on fixed cases, as they were when the comparison ran on the CPU
COMPARISONS = {
    "close": (
        torch.tensor([1.0, 2.0, 3.00001]), torch.tensor([1.0, 2.0, 3.0], dtype=torch.float64),
        (True, 1.0013580322265625e-05, 3.337860107421875e-06, "ok (1 value(s))"),
    ),
    "beyond_transposed": (
        torch.tensor([[1.0, 2.0], [3.5, 4.0]]).t(), torch.tensor([[1.0, 2.0], [3.0, 4.0]], dtype=torch.float64).t(),
        (False, 0.5, 0.16666666666666666, "1 of 4 elements differ beyond rtol=0.0001, atol=1e-05; max abs err 0.5, "
         "max rel err 0.167; worst at [0, 1]: 3.5 vs reference 3.0"),
    ),
    "nan_on_one_side": (
        torch.tensor([math.nan, 2.0, 3.0]), torch.tensor([1.0, math.nan, 3.0], dtype=torch.float64),
        (False, math.inf, math.inf, "2 of 3 elements differ beyond rtol=0.0001, atol=1e-05; max abs err inf, "
         "max rel err inf; worst at [1]: 2.0 vs reference nan"),
    ),
    "opposite_infs": (
        torch.tensor([-math.inf]), torch.tensor([math.inf], dtype=torch.float64),
        (False, math.inf, math.inf, "1 of 1 elements differ beyond rtol=0.0001, atol=1e-05; max abs err inf, "
         "max rel err inf; worst at [0]: -inf vs reference inf"),
    ),
    "ints": (
        torch.tensor([0, 1, 2, 9]), torch.tensor([0, 1, 2, 3]),
        (False, 6.0, 2.0, "1 of 4 elements differ beyond rtol=0, atol=0; max abs err 6, max rel err 2; "
         "worst at [3]: 9.0 vs reference 3.0"),
    ),
    "bools": (
        torch.tensor([True, False]), torch.tensor([True, True]),
        (False, 1.0, 1.0, "1 of 2 elements differ beyond rtol=0, atol=0; max abs err 1, max rel err 1; "
         "worst at [1]: 0.0 vs reference 1.0"),
    ),
    "complex": (
        torch.tensor([1 + 1j, 2 + 0j], dtype=torch.complex64), torch.tensor([1 + 1j, 2 + 0.5j], dtype=torch.complex128),
        (False, 0.5, 0.24253562503633297, "1 of 2 elements differ beyond rtol=0.0001, atol=1e-05; max abs err 0.5, "
         "max rel err 0.243; worst at [1]: (2+0j) vs reference (2+0.5j)"),
    ),
    "nested": (
        (torch.ones(2), [torch.tensor([1, 2]), None]), (torch.ones(2, dtype=torch.float64), [torch.tensor([1, 3]), None]),
        (False, 1.0, 0.3333333333333333, "[1][0]: 1 of 2 elements differ beyond rtol=0, atol=0; max abs err 1, "
         "max rel err 0.333; worst at [1]: 2.0 vs reference 3.0"),
    ),
    "empty": (torch.zeros(0, 3), torch.zeros(0, 3), (True, 0.0, 0.0, "ok (1 value(s))")),
    "zero_dim": (
        torch.tensor(1.5), torch.tensor(1.0, dtype=torch.float64),
        (False, 0.5, 0.5, "1 of 1 elements differ beyond rtol=0.0001, atol=1e-05; max abs err 0.5, max rel err 0.5; "
         "worst at []: 1.5 vs reference 1.0"),
    ),
}


@pytest.mark.parametrize("actual,reference,expected", COMPARISONS.values(), ids=COMPARISONS.keys())
def test_compare_results_and_messages(actual, reference, expected):
    result = compare(actual, reference)
    assert (result.ok, result.max_abs_err, result.max_rel_err, result.detail) == expected


def _identity(t):
    return t


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32, torch.float64,
                                   torch.complex64, torch.complex128])
def test_input_check_catches_the_sign_of_a_zero(dtype):
    # -0.0 == 0.0, so the numbers agree and only the bits show the write
    result = check_numerically(lambda t: t.fill_(-0.0).clone(), _identity, [torch.zeros(4, dtype=dtype)])
    assert not result.ok
    assert result.detail == "kernel modified an input (argument(s) [0]) in trial 0"


def _nan_with_payload(payload: int) -> torch.Tensor:
    return torch.tensor([0x7FC00000 | payload, 0x3F800000], dtype=torch.int32).view(torch.float32)  # [nan, 1.0]


def test_input_check_catches_a_changed_nan_payload():
    def kernel(t):
        t.view(torch.int32)[0] = 0x7FC00000 | 2
        return t.clone()

    result = check_numerically(kernel, _identity, [_nan_with_payload(1)])
    assert not result.ok
    assert result.detail == "kernel modified an input (argument(s) [0]) in trial 0"


def test_input_check_passes_inputs_left_as_they_were():
    # a NaN payload and a negative zero survive the copies; writing back the same bits is no change
    x = torch.cat([_nan_with_payload(5), torch.tensor([-0.0])])

    def rewrite_in_place(t, n):
        t.copy_(t.clone())
        return t * n

    result = check_numerically(rewrite_in_place, lambda t, n: t * n, [x, math.nan], trials=2)
    assert result.ok, result.detail


def test_input_check_catches_a_changed_layout():
    # the same values in the same shape, transposed in place: only the strides changed
    result = check_numerically(lambda t: t.t_().clone(), _identity, [torch.zeros(3, 3)])
    assert result.detail == "kernel modified an input (argument(s) [0]) in trial 0"


def test_input_check_names_the_argument_and_the_trial():
    calls = []

    def writes_on_its_second_call(a, b):
        calls.append(None)
        if len(calls) == 2:
            b.add_(1)
        return a + b

    result = check_numerically(writes_on_its_second_call, torch.add, [torch.ones(3), torch.ones(3)], trials=3)
    assert result.detail == "kernel modified an input (argument(s) [1]) in trial 1"


def test_input_check_catches_a_mutated_list_argument():
    def appends(t, sizes):
        sizes.append(1)
        return t.clone()

    result = check_numerically(appends, lambda t, sizes: t, [torch.ones(2), [2]])
    assert result.detail == "kernel modified an input (argument(s) [1]) in trial 0"
