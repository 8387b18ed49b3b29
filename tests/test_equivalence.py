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
