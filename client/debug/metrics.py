"""Error metrics of one tensor against its reference, computed chunk by chunk over the flattened
tensors so no error tensor the size of a large tensor is ever held."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import torch

DEFAULT_CHUNK = 1 << 22
WORST_K = 8

# torch.testing.assert_close's defaults: (rtol, atol) by dtype; integers and bool must be equal
_TOLERANCES = {
    torch.float16: (1e-3, 1e-5),
    torch.bfloat16: (1.6e-2, 1e-5),
    torch.float32: (1.3e-6, 1e-5),
    torch.float64: (1e-7, 1e-7),
    torch.complex64: (1.3e-6, 1e-5),
    torch.complex128: (1e-7, 1e-7),
}
REL_FLOOR_MIN = 1e-12


def default_tolerance(dtype: torch.dtype) -> tuple[float, float]:
    """(atol, rtol) as torch.testing.assert_close chooses them for ``dtype`` (0, 0 when exact)."""
    rtol, atol = _TOLERANCES.get(dtype, (0.0, 0.0))
    return atol, rtol


@dataclass(frozen=True)
class TensorDiff:
    """One tensor compared with its reference. Errors are over the positions where both are
    finite; relative errors divide by ``max(|ref|, atol)``; ``share_past_tol`` counts elements
    with ``|a - b| > atol + rtol * |b|`` and those where only one side is NaN/Inf (or they differ)."""

    name: str
    shape: tuple[int, ...]
    dtype: str
    max_abs: float
    mean_abs: float
    max_rel: float
    mean_rel: float
    rmse: float
    share_past_tol: float
    nan: int
    inf: int
    ref_nan: int
    ref_inf: int
    worst: tuple[tuple[int, ...], ...]
    passed: bool
    noise_max_abs: float | None = None

    def to_dict(self) -> dict:
        d = asdict(self)
        d["shape"] = list(self.shape)
        d["worst"] = [list(i) for i in self.worst]
        return {k: (_json_float(v) if isinstance(v, float) else v) for k, v in d.items()}


def _json_float(x: float) -> float | str:
    """JSON has no NaN or Infinity: they are written as strings."""
    return x if math.isfinite(x) else str(x)


def _flat(t: torch.Tensor) -> torch.Tensor:
    t = t.detach()
    if t.is_complex():
        t = torch.view_as_real(t)
    return t.reshape(-1)


def _sync(*tensors: torch.Tensor) -> None:
    for t in tensors:
        if t.is_cuda:
            torch.cuda.synchronize(t.device)


def tensor_diff(name: str, actual: torch.Tensor, reference: torch.Tensor, *, atol: float | None = None,
                rtol: float | None = None, allowed_share: float = 0.0, chunk_elems: int = DEFAULT_CHUNK,
                k: int = WORST_K, noise_max_abs: float | None = None) -> TensorDiff:
    """The metrics of ``actual`` against ``reference`` (same shape; the reference may be of a
    wider dtype). Tolerances default by ``actual``'s dtype; ``passed`` means at most
    ``allowed_share`` of the elements are past tolerance and no NaN/Inf is new."""
    shape = tuple(actual.shape)
    dtype = str(actual.dtype).removeprefix("torch.")
    d_atol, d_rtol = default_tolerance(actual.dtype)
    atol = d_atol if atol is None else atol
    rtol = d_rtol if rtol is None else rtol
    if tuple(reference.shape) != shape:
        inf = float("inf")
        return TensorDiff(name, shape, dtype, inf, inf, inf, inf, inf, 1.0, 0, 0, 0, 0, (), False, noise_max_abs)
    _sync(actual, reference)
    a_all, b_all = _flat(actual), _flat(reference).to(actual.device)
    n = a_all.numel()
    floor = max(atol, REL_FLOOR_MIN)
    zero = torch.zeros((), dtype=torch.float64, device=a_all.device)
    max_abs, sum_abs, max_rel, sum_rel, sum_sq = zero, zero, zero, zero, zero
    finite_n, past, nan, inf, ref_nan, ref_inf = (torch.zeros((), dtype=torch.int64, device=a_all.device) for _ in range(6))
    top_v = torch.empty(0, dtype=torch.float64, device=a_all.device)
    top_i = torch.empty(0, dtype=torch.int64, device=a_all.device)
    for start in range(0, n, max(1, chunk_elems)):
        a = a_all[start:start + chunk_elems].double()
        b = b_all[start:start + chunk_elems].double()
        fa, fb = torch.isfinite(a), torch.isfinite(b)
        both = fa & fb
        same = (torch.isnan(a) & torch.isnan(b)) | (~fa & ~fb & (a == b))  # the same NaN or Inf
        odd = ~both & ~same  # one side a number and the other not, or two different Infs
        err = torch.where(both, (a - b).abs(), 0.0)
        rel = err / b.abs().clamp(min=floor).where(both, 1.0)
        max_abs = torch.maximum(max_abs, err.max())
        max_rel = torch.maximum(max_rel, rel.max())
        sum_abs, sum_rel, sum_sq = sum_abs + err.sum(), sum_rel + rel.sum(), sum_sq + err.square().sum()
        finite_n = finite_n + both.sum()
        past = past + ((both & (err > atol + rtol * b.abs())) | odd).sum()
        nan, inf = nan + torch.isnan(a).sum(), inf + torch.isinf(a).sum()
        ref_nan, ref_inf = ref_nan + torch.isnan(b).sum(), ref_inf + torch.isinf(b).sum()
        rank = torch.where(odd, float("inf"), err)
        v, i = rank.topk(min(k, rank.numel()))
        i, by_index = i.sort()  # equal errors: the lower index first
        v = v[by_index]
        top_v, order = torch.cat([top_v, v]).sort(descending=True, stable=True)
        top_i = torch.cat([top_i, i + start])[order]
        top_v, top_i = top_v[:k], top_i[:k]
    _sync(max_abs)
    count = int(finite_n)
    worst = tuple(_unravel(int(i), actual) for v, i in zip(top_v.tolist(), top_i.tolist()) if v > 0)
    share = int(past) / n if n else 0.0
    nan_, inf_, rnan, rinf = int(nan), int(inf), int(ref_nan), int(ref_inf)
    passed = share <= allowed_share and nan_ <= rnan and inf_ <= rinf
    return TensorDiff(
        name=name, shape=shape, dtype=dtype, max_abs=float(max_abs), mean_abs=float(sum_abs) / count if count else 0.0,
        max_rel=float(max_rel), mean_rel=float(sum_rel) / count if count else 0.0,
        rmse=math.sqrt(float(sum_sq) / count) if count else 0.0, share_past_tol=share,
        nan=nan_, inf=inf_, ref_nan=rnan, ref_inf=rinf, worst=worst, passed=passed, noise_max_abs=noise_max_abs)


def _unravel(flat: int, t: torch.Tensor) -> tuple[int, ...]:
    """The index tuple of flat element ``flat`` (of the real view, for complex tensors)."""
    shape = tuple(t.shape) + ((2,) if t.is_complex() else ())
    index = []
    for size in reversed(shape):
        index.append(flat % size if size else 0)
        flat //= size if size else 1
    return tuple(reversed(index))


def max_abs_between(a: torch.Tensor, b: torch.Tensor, chunk_elems: int = DEFAULT_CHUNK) -> float:
    """The largest ``|a - b|``, chunk by chunk; the same NaN or Inf on both sides counts as 0,
    a NaN or Inf on one side only as Inf. Different shapes: Inf."""
    if a.shape != b.shape:
        return float("inf")
    _sync(a, b)
    fa, fb = _flat(a), _flat(b).to(a.device)
    worst = torch.zeros((), dtype=torch.float64, device=fa.device)
    for start in range(0, fa.numel(), max(1, chunk_elems)):
        x, y = fa[start:start + chunk_elems].double(), fb[start:start + chunk_elems].double()
        both = torch.isfinite(x) & torch.isfinite(y)
        same = (torch.isnan(x) & torch.isnan(y)) | (x == y)
        err = torch.where(both, (x - y).abs(), torch.where(same, 0.0, float("inf")))
        worst = torch.maximum(worst, err.max())
    return float(worst)
