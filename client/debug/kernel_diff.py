"""KernelDiff: a model compiled by Hypatia against a reference (eager, Inductor, or an eager
float64 copy), tensor by tensor, with the fused region that causes a difference named.

:func:`compare` runs both on the same inputs and seed, compares every output (nested in tuples,
lists, dicts, dataclasses and ``transformers`` ``ModelOutput``s, each named by its path) and every
parameter's gradient, and repeats the compiled run to tell nondeterminism from error. Where a
tensor fails under the ``hypatia`` backend, each fused region of the graphs just compiled is left
unfused in turn (:attr:`Session.region_filter`) and the model compared again.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator

import torch

from hypatia.debug import heatmap, png
from hypatia.debug.metrics import DEFAULT_CHUNK, TensorDiff, max_abs_between, tensor_diff

REFERENCES = ("eager", "inductor", "float64")
SEED = 0
MAX_HEATMAPS = 8
WORST_FEW = 3  # heatmaps drawn when nothing fails


class UnknownReference(ValueError):
    """``reference`` is not one of :data:`REFERENCES`."""


@dataclass(frozen=True)
class RegionAttribution:
    """The model compared again with one fused region left unfused: the largest error left on
    the tensors that failed, and whether they all pass without it."""

    region: int
    rule: str
    kernel: str
    max_abs_without: float
    explains: bool
    graph_key: str = ""

    def to_dict(self) -> dict:
        m = self.max_abs_without
        return {"region": self.region, "rule": self.rule, "kernel": self.kernel,
                "max_abs_without": m if math.isfinite(m) else str(m), "explains": self.explains}


@dataclass(frozen=True)
class DiffReport:
    """What :func:`compare` found; ``to_dict()`` is the ``kerneldiff.json`` format."""

    reference: str
    atol: float | None
    rtol: float | None
    allowed_share: float
    repeats: int
    tensors: tuple[TensorDiff, ...]
    attribution: tuple[RegionAttribution, ...] = ()
    maps: dict = field(default_factory=dict, repr=False, compare=False)  # name -> pooled error map

    @property
    def passed(self) -> bool:
        return all(t.passed for t in self.tensors)

    @property
    def failing(self) -> list[TensorDiff]:
        return [t for t in self.tensors if not t.passed]

    def heatmap_files(self) -> list[str]:
        """The files :meth:`write` draws, relative to its folder (the summary plot last)."""
        index = {t.name: i for i, t in enumerate(self.tensors)}
        files = [f"heatmaps/{heatmap.file_name(index[name], name)}" for name in self.maps]
        return files + (["heatmaps/summary.png"] if self.tensors else [])

    def to_dict(self) -> dict:
        return {"reference": self.reference, "atol": self.atol, "rtol": self.rtol, "allowed_share": self.allowed_share,
                "repeats": self.repeats, "passed": self.passed, "tensors": [t.to_dict() for t in self.tensors],
                "attribution": [a.to_dict() for a in self.attribution], "heatmaps": self.heatmap_files()}

    def write(self, folder: str | os.PathLike) -> Path:
        """Write ``kerneldiff.json`` and the heatmaps under ``folder``; the JSON's path."""
        folder = Path(folder)
        (folder / "heatmaps").mkdir(parents=True, exist_ok=True)
        index = {t.name: i for i, t in enumerate(self.tensors)}
        for name, grid in self.maps.items():
            png.write(folder / "heatmaps" / heatmap.file_name(index[name], name), heatmap.heatmap_pixels(grid))
        if self.tensors:
            png.write(folder / "heatmaps" / "summary.png", heatmap.summary_pixels(
                [t.max_abs for t in self.tensors], [t.passed for t in self.tensors]))
        path = folder / "kerneldiff.json"
        tmp = folder / f".kerneldiff.json.{os.getpid()}.tmp"
        tmp.write_text(json.dumps(self.to_dict(), indent=2) + "\n")
        os.replace(tmp, path)
        return path

    def __str__(self) -> str:
        head = f"KernelDiff against {self.reference}: {'PASSED' if self.passed else 'FAILED'} " \
               f"({len(self.failing)} of {len(self.tensors)} tensors fail)"
        rows = [("tensor", "shape", "dtype", "max_abs", "max_rel", "rmse", "past_tol", "nan/inf", "noise", "")]
        for t in self.tensors:
            noise = "-" if t.noise_max_abs is None else f"{t.noise_max_abs:.2g}"
            rows.append((t.name, "x".join(map(str, t.shape)) or "()", t.dtype, f"{t.max_abs:.3g}", f"{t.max_rel:.3g}",
                         f"{t.rmse:.3g}", f"{t.share_past_tol:.2%}", f"{t.nan}/{t.inf}", noise, "ok" if t.passed else "FAIL"))
        widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
        lines = [head] + ["  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in rows]
        for a in self.attribution:
            lines.append(f"region {a.region} {a.rule} ({a.kernel}): max_abs without it {a.max_abs_without:.3g}"
                         + (" -- explains the difference" if a.explains else ""))
        return "\n".join(lines)


# -- naming the tensors of nested outputs ----------------------------------------------------
def named_tensors(obj: Any, path: str = "out") -> Iterator[tuple[str, torch.Tensor]]:
    """Every tensor in ``obj`` with its path: ``out[0]``, ``out.logits`` (a dict's string keys,
    a dataclass's fields, a ModelOutput's or namedtuple's names), ``out['a b']`` for other keys."""
    if isinstance(obj, torch.Tensor):
        yield path, obj
    elif hasattr(obj, "items") and callable(obj.items):  # dict, ModelOutput
        for key, value in obj.items():
            yield from named_tensors(value, _child(path, key))
    elif dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        for f in dataclasses.fields(obj):
            yield from named_tensors(getattr(obj, f.name), f"{path}.{f.name}")
    elif isinstance(obj, tuple) and hasattr(obj, "_fields"):  # namedtuple
        for key in obj._fields:
            yield from named_tensors(getattr(obj, key), f"{path}.{key}")
    elif isinstance(obj, (tuple, list)):
        for i, value in enumerate(obj):
            yield from named_tensors(value, f"{path}[{i}]")
    elif hasattr(obj, "to_tuple") and callable(obj.to_tuple):
        for i, value in enumerate(obj.to_tuple()):
            yield from named_tensors(value, f"{path}[{i}]")


def _child(path: str, key: Any) -> str:
    return f"{path}.{key}" if isinstance(key, str) and key.isidentifier() else f"{path}[{key!r}]"


def _map_tensors(obj: Any, fn: Callable[[torch.Tensor], torch.Tensor]) -> Any:
    """``obj`` with ``fn`` applied to every tensor in its tuples, lists and dicts."""
    if isinstance(obj, torch.Tensor):
        return fn(obj)
    if isinstance(obj, dict):
        return {k: _map_tensors(v, fn) for k, v in obj.items()}
    if isinstance(obj, (tuple, list)) and not hasattr(obj, "_fields"):
        return type(obj)(_map_tensors(v, fn) for v in obj)
    return obj


# -- running -------------------------------------------------------------------------------
@dataclass(frozen=True)
class _Run:
    tensors: dict[str, torch.Tensor]  # outputs then gradients, by name, detached


def _split_inputs(inputs: Any) -> tuple[tuple, dict]:
    if isinstance(inputs, torch.Tensor):
        return (inputs,), {}
    if isinstance(inputs, dict):
        return (), dict(inputs)
    return tuple(inputs), {}


def _run(model: torch.nn.Module, params: torch.nn.Module, args: tuple, kwargs: dict, grads: bool,
         loss: Callable[[Any], torch.Tensor] | None) -> _Run:
    """One forward (and backward of the loss) of ``model`` under seed :data:`SEED`; the
    gradients are read from ``params`` (the module ``model`` wraps)."""
    devices = sorted({p.device.index or 0 for p in params.parameters() if p.is_cuda})
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(SEED)
        for p in params.parameters():
            p.grad = None
        with torch.set_grad_enabled(grads and torch.is_grad_enabled()):
            out = model(*args, **kwargs)
        named = {name: t.detach() for name, t in named_tensors(out)}
        if grads and torch.is_grad_enabled():
            total = loss(out) if loss is not None else sum(
                (t.to(_accumulator(t)).sum() for _, t in named_tensors(out) if t.is_floating_point() and t.requires_grad),
                torch.zeros(()))
            if total.requires_grad:
                total.backward()
                for name, p in params.named_parameters():
                    if p.requires_grad and p.grad is not None:
                        named[f"grad.{name}"] = p.grad.detach()
    return _Run(named)


def _accumulator(t: torch.Tensor) -> torch.dtype:
    return torch.float64 if t.dtype == torch.float64 else torch.float32


def _reference_model(model: torch.nn.Module, reference: str) -> tuple[Callable[..., Any], torch.nn.Module]:
    twin = copy.deepcopy(model)
    if reference == "eager":
        return twin, twin
    if reference == "inductor":
        return torch.compile(twin, backend="inductor"), twin
    return twin.to(torch.float64), twin


def _to_float64(obj: Any) -> Any:
    return _map_tensors(obj, lambda t: t.to(torch.float64) if t.is_floating_point() else t)


@dataclass(frozen=True)
class _Options:
    atol: float | None
    rtol: float | None
    allowed_share: float
    chunk_elems: int


def _diffs(run: _Run, ref: _Run, noise: dict[str, float], o: _Options) -> list[TensorDiff]:
    """Every tensor of ``run`` against ``ref``; one only a side has compares with zeros (a
    gradient one side did not produce, an output the other did not return)."""
    names = list(run.tensors) + [n for n in ref.tensors if n not in run.tensors]
    out = []
    for name in names:
        actual, expected = run.tensors.get(name), ref.tensors.get(name)
        actual = torch.zeros_like(expected) if actual is None else actual
        expected = torch.zeros_like(actual) if expected is None else expected
        out.append(tensor_diff(name, actual, expected, atol=o.atol, rtol=o.rtol, allowed_share=o.allowed_share,
                               chunk_elems=o.chunk_elems, noise_max_abs=noise.get(name)))
    return out


def compare(model: torch.nn.Module, inputs: Any, *, reference: str = "eager", backend: Any = "hypatia",
            atol: float | None = None, rtol: float | None = None, allowed_share: float = 0.0, repeats: int = 3,
            grads: bool = True, loss: Callable[[Any], torch.Tensor] | None = None, chunk_elems: int = DEFAULT_CHUNK,
            out_dir: str | os.PathLike | None = None, max_regions: int = 16, attribute: bool = True) -> DiffReport:
    """Compare ``torch.compile(model, backend=backend)`` with ``reference`` on ``inputs`` (a
    tensor, a tuple of arguments, or a dict of keyword arguments); ``model`` itself is not run or
    changed (copies are). Resets Dynamo's caches. Tolerances default by dtype as in
    ``torch.testing.assert_close``. With ``out_dir``, the report is also written there."""
    if reference not in REFERENCES:
        raise UnknownReference(f"reference must be one of {', '.join(REFERENCES)}, not {reference!r}")
    opts = _Options(atol, rtol, allowed_share, chunk_elems)
    args, kwargs = _split_inputs(inputs)
    ref_callable, ref_params = _reference_model(model, reference)
    ref_args, ref_kwargs = (_to_float64(args), _to_float64(kwargs)) if reference == "float64" else (args, kwargs)
    ref = _run(ref_callable, ref_params, ref_args, ref_kwargs, grads, loss)
    noise: dict[str, float] = {}
    if reference != "float64":  # a float64 reference's own spread says nothing of the compiled model's
        again = _run(ref_callable, ref_params, ref_args, ref_kwargs, grads, loss)
        noise = {name: max_abs_between(t, again.tensors[name], chunk_elems) if name in again.tensors else float("inf")
                 for name, t in ref.tensors.items()}
        del again

    torch._dynamo.reset()
    session, plans_before = _hypatia_plans(backend)
    twin = copy.deepcopy(model)
    compiled = torch.compile(twin, backend=backend)
    first = _run(compiled, twin, args, kwargs, grads, loss)
    new_plans = _new_plans(session, plans_before)
    for _ in range(max(0, repeats - 1)):
        again = _run(compiled, twin, args, kwargs, grads, loss)
        for name, t in first.tensors.items():
            other = again.tensors.get(name)
            spread = max_abs_between(t, other, chunk_elems) if other is not None else float("inf")
            noise[name] = max(noise.get(name, 0.0), spread)
        del again
    diffs = _diffs(first, ref, noise, opts)
    maps = _maps(first, ref, diffs, chunk_elems)
    del compiled, twin, first  # the attribution's compiles hold their own copies
    failing = [d.name for d in diffs if not d.passed]
    attribution: tuple[RegionAttribution, ...] = ()
    if failing and attribute and session is not None and new_plans:
        attribution = tuple(_attribute(session, new_plans, model, args, kwargs, grads, loss, backend, ref, failing,
                                       opts, max_regions))
    report = DiffReport(reference, atol, rtol, allowed_share, repeats, tuple(diffs), attribution, maps)
    if out_dir is not None:
        report.write(out_dir)
    return report


def _maps(run: _Run, ref: _Run, diffs: list[TensorDiff], chunk_elems: int) -> dict[str, torch.Tensor]:
    """Pooled error maps of the failing tensors (the worst few when none fails)."""
    chosen = [d for d in diffs if not d.passed]
    if not chosen:
        chosen = sorted((d for d in diffs if d.max_abs > 0), key=lambda d: -d.max_abs)[:WORST_FEW]
    chosen = sorted(chosen, key=lambda d: (-d.share_past_tol, -d.max_abs))[:MAX_HEATMAPS]
    maps = {}
    for d in sorted(chosen, key=lambda d: [x.name for x in diffs].index(d.name)):
        actual, expected = run.tensors.get(d.name), ref.tensors.get(d.name)
        if actual is None or expected is None or actual.shape != expected.shape or actual.numel() == 0:
            continue
        maps[d.name] = heatmap.error_map(actual, expected, chunk_elems)
    return maps


# -- attribution -----------------------------------------------------------------------------
def _hypatia_plans(backend: Any) -> tuple[Any, list]:
    """Hypatia's session and the plans it holds now (None, [] for another backend)."""
    if backend != "hypatia":
        return None, []
    from hypatia.client.backend import session

    s = session()
    return s, list(s.plans)


def _new_plans(session: Any, before: list) -> list:
    if session is None:
        return []
    seen = {id(entry) for entry in before}
    return [plan for entry in list(session.plans) if id(entry) not in seen for plan in entry[1:]]


def _attribute(session: Any, plans: list, model: torch.nn.Module, args: tuple, kwargs: dict, grads: bool,
               loss: Callable | None, backend: Any, ref: _Run, failing: list[str], opts: _Options,
               max_regions: int) -> Iterator[RegionAttribution]:
    """Compare again with each fused region left unfused, one at a time (at most
    ``max_regions``; regions equal in index and value across graphs are dropped together)."""
    seen = set()
    candidates = []
    for plan in plans:
        for i, region in enumerate(plan.regions):
            key = (i, json.dumps(region.to_dict(), sort_keys=True, default=str))  # consts may hold lists
            if key not in seen:
                seen.add(key)
                candidates.append((i, region, plan.graph_key))
    for i, region, graph_key in candidates[:max_regions]:
        def keep(j: int, r: Any, dropped=(i, region)) -> bool:
            return (j, r) != dropped

        torch._dynamo.reset()
        session.region_filter = keep
        try:
            twin = copy.deepcopy(model)
            run = _run(torch.compile(twin, backend=backend), twin, args, kwargs, grads, loss)
        finally:
            session.region_filter = None
            torch._dynamo.reset()
        diffs = {d.name: d for d in _diffs(run, ref, {}, opts) if d.name in failing}
        worst = max((diffs[n].max_abs if n in diffs else float("inf")) for n in failing)
        explains = all(n in diffs and diffs[n].passed for n in failing)
        yield RegionAttribution(i, region.rule, region.kernel, worst, explains, graph_key)
