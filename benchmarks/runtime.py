"""Step time of each workload under eager PyTorch, ``torch.compile`` and Hypatia, side by side in
one process, with each compiled output's relative error against an eager float64 reference.

The backends (:data:`BACKENDS`): ``eager``; ``dynamo``, ``torch.compile(backend="eager")``,
Dynamo's capture and guards around the same ops, the floor every backend pays; ``inductor``,
``torch.compile``'s default; ``inductor_ro``, its ``mode="reduce-overhead"`` (CUDA graphs);
``hypatia_first``, what a first process runs before anything is measured (the plan the daemon
answers at once, under Inductor), timed once the daemon's background tuning is done so the
tuner does not share the machine with the timing; and ``hypatia``, Hypatia as a user gets it:
the default policy and executor choice in a later process, once the daemon holds the tuned plan
and the executor decision for every graph (:mod:`benchmarks.hypatia_runs` says how).
"""

from __future__ import annotations

import copy
import gc
import importlib.util
import time
from typing import Any

import torch

from benchmarks import hypatia_runs
from benchmarks.rows import append_row
from benchmarks.timing import measure
from benchmarks.workloads import QUICK_WORKLOADS, WORKLOADS, Workload, loss_of, primary_output

BACKENDS = ("eager", "dynamo", "inductor", "inductor_ro", "hypatia_first", "hypatia")
DTYPES = {"bfloat16": torch.bfloat16, "float32": torch.float32}  # the order of a run: bf16 first
MODES = ("inference", "training")


def _compiled(model: torch.nn.Module, backend: str):
    if backend == "eager":
        return model
    if backend == "dynamo":
        return torch.compile(model, backend="eager")
    if backend == "inductor":
        return torch.compile(model)
    if backend == "inductor_ro":
        return torch.compile(model, mode="reduce-overhead")
    hypatia_runs.new_session(backend)
    return torch.compile(model, backend="hypatia")


def changed_decisions() -> list[dict]:
    """The tuned plans' decisions (this session's compiles) where the tuner chose differently
    from the heuristic, with both measured costs."""
    from hypatia.client.backend import session

    out = []
    for phase, plan in session().plans:
        for d in plan.decisions:
            if d.measured and d.heuristic and d.heuristic != d.chosen:
                out.append({"phase": phase} | d.to_dict())
    return out


def _rel_error(out: torch.Tensor, ref: torch.Tensor) -> float:
    out, ref = out.detach().double(), ref.detach().double()
    return float((out - ref).norm() / ref.norm().clamp_min(1e-30))


def _step_fn(fn, model, inputs, mode: str):
    if mode == "inference":
        def step():
            with torch.no_grad():
                return fn(*inputs)
        return step
    opt = torch.optim.SGD(model.parameters(), lr=1e-4)

    def step():
        opt.zero_grad(set_to_none=True)
        out = fn(*inputs)
        loss_of(out).backward()
        opt.step()
        return out
    return step


def cast_inputs(inputs: tuple, dtype: torch.dtype) -> tuple:
    return tuple(x.to(dtype) if x.is_floating_point() else x for x in inputs)


def float64_reference(base: torch.nn.Module, inputs64: tuple) -> torch.Tensor:
    """The eager output of a float64 copy of ``base``: what every backend's error is measured against."""
    ref_model = copy.deepcopy(base).double()
    with torch.no_grad():
        return primary_output(ref_model(*inputs64)).detach()


def timing_args(device: str, quick: bool) -> dict[str, Any]:
    if quick:
        return dict(min_repeats=5, max_repeats=30, min_time_s=0.2)
    if device == "cuda":  # CUDA events are steady; the GPU's time goes to compiling instead
        return dict(warmup=3, min_repeats=10, max_repeats=50, min_time_s=0.2)
    return dict(min_repeats=10, max_repeats=100, min_time_s=1.0)


def _release(device: str) -> None:
    """Free what the previous backend's compiled code and CUDA graphs held."""
    gc.collect()
    if device == "cuda":
        torch.cuda.empty_cache()


def measure_backend(base: torch.nn.Module, backend: str, dtype: torch.dtype, inputs: tuple, reference: torch.Tensor,
                    mode: str, device: str, timing: dict[str, Any]) -> dict[str, Any]:
    """Compile a copy of ``base`` with ``backend`` and time it: first call, relative error against
    ``reference``, the step-time figures and (CUDA) peak memory; Hypatia's rows also say what
    their session ran. Raises what the backend raises."""
    torch._dynamo.reset()
    _release(device)
    model = copy.deepcopy(base).to(dtype)
    step = _step_fn(_compiled(model, backend), model, inputs, mode)
    row: dict[str, Any] = {}
    if device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    t0 = time.perf_counter()
    out = step()
    if device == "cuda":
        torch.cuda.synchronize()
    row["first_call_s"] = round(time.perf_counter() - t0, 3)
    # now, before another call can replay a CUDA graph over this output
    row["rel_error"] = _rel_error(primary_output(out), reference)
    del out
    if backend == "hypatia_first":
        try:
            row["tuning_wait_s"] = hypatia_runs.wait_for_daemon()
        except hypatia_runs.DaemonNotIdle as exc:
            row["note"] = f"timed with the daemon busy: {exc}"
    if backend in hypatia_runs.SETTINGS:
        # timed in the steady state: after any executor measurement of this session
        row["steps_before_timing"] = hypatia_runs.run_until_chosen(step, device)
    row.update(measure(step, device, **timing).to_dict())
    if device == "cuda":
        row["peak_mem_mib"] = round(torch.cuda.max_memory_allocated() / 2**20, 1)
    if backend in hypatia_runs.SETTINGS:
        row.update(hypatia_runs.session_report())
    if backend == "hypatia":
        row["decisions_changed"] = changed_decisions()
    return row


def measure_hypatia(base: torch.nn.Module, dtype: torch.dtype, inputs: tuple, reference: torch.Tensor, mode: str,
                    device: str, timing: dict[str, Any]) -> dict[str, Any]:
    """The ``hypatia`` row: warm-up sessions until the daemon holds a tuned plan and an executor
    decision for every graph, then a fresh session measured like every other backend."""

    def make_step():
        model = copy.deepcopy(base).to(dtype)
        return _step_fn(_compiled(model, "hypatia"), model, inputs, mode)

    torch._dynamo.reset()
    _release(device)
    warm = hypatia_runs.warm_up(make_step, device)
    return warm | measure_backend(base, "hypatia", dtype, inputs, reference, mode, device, timing)


def error_text(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {str(exc)[:300]}"


def add_speedups(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Set ``speedup`` (eager median / this median) on every timed row of one case."""
    eager = next((r for r in rows if r["backend"] == "eager" and "median_ms" in r), None)
    for r in rows:
        if eager and "median_ms" in r:
            r["speedup"] = round(eager["median_ms"] / r["median_ms"], 4)
    return rows


def run_case(w: Workload, device: str, dtype_name: str, mode: str, quick: bool) -> list[dict[str, Any]]:
    """All backends for one (workload, dtype, mode); one row per backend."""
    torch.manual_seed(0)
    base = w.build().to(device)
    base.train(not w.eval_mode and mode == "training")
    batch = w.batch_for(device, quick)
    inputs64 = w.make_inputs(batch, torch.device(device), torch.float64 if not w.integer_inputs else torch.float32)
    reference = float64_reference(base, inputs64)
    inputs = cast_inputs(inputs64, DTYPES[dtype_name])
    timing = timing_args(device, quick)
    rows = []
    for backend in BACKENDS:
        row: dict[str, Any] = {"workload": w.name, "dtype": dtype_name, "mode": mode, "backend": backend, "batch": batch}
        started = time.monotonic()
        try:
            if backend == "hypatia":
                row.update(measure_hypatia(base, DTYPES[dtype_name], inputs, reference, mode, device, timing))
            else:
                row.update(measure_backend(base, backend, DTYPES[dtype_name], inputs, reference, mode, device, timing))
        except Exception as exc:  # one failing backend must not hide the others' numbers
            row["error"] = error_text(exc)
        row["wall_s"] = round(time.monotonic() - started, 3)
        rows.append(row)
    torch._dynamo.reset()
    _release(device)
    return add_speedups(rows)


def _hypatia_notes(case: list[dict[str, Any]]) -> list[str]:
    """What went other than planned in a case's ``hypatia`` row, for the section's notes."""
    out = []
    for r in case:
        if r["backend"] != "hypatia":
            continue
        name = f"{r['workload']}/{r['dtype']}/{r['mode']} hypatia"
        out += [f"{name}: {n}" for n in r.get("warmup_notes", [])]
        if "median_ms" in r and not r.get("served_from_daemon"):
            out.append(f"{name}: not every graph was served its executor by the daemon: {r.get('hypatia_counters')}")
    return out


def run(device: str, quick: bool, budget_s: float, only: list[str] | None = None, progress=None,
        dtypes: list[str] | None = None, modes: list[str] | None = None) -> dict:
    """Every (dtype, workload, mode) on ``device``: bfloat16 first, the workloads in the order of
    ``only`` where it names them. A case is skipped (and recorded so) when it would end past
    ``budget_s``, judged by the longest case of its workload so far or, for a workload's first
    case, the longest case of any. ``progress`` (a path) gets each case's rows as a JSON line as
    soon as they are measured."""
    start = time.monotonic()
    by_name = {w.name: w for w in WORKLOADS}
    names = list(QUICK_WORKLOADS) if quick else list(by_name)
    if only:
        names = [n for n in only if n in names]
    dtypes = [d for d in DTYPES if d in (dtypes or (["float32"] if quick else list(DTYPES)))]
    rows: list[dict] = []
    notes: list[str] = []
    runnable = []
    for w in (by_name[n] for n in names):
        if w.gpu_only and device != "cuda":
            notes.append(f"{w.name}: GPU only")
        elif w.requires and importlib.util.find_spec(w.requires) is None:
            notes.append(f"{w.name}: skipped, needs `{w.requires}` (pip install -e '.[bench]')")
        else:
            runnable.append(w)
    longest: dict[str, float] = {}  # workload -> its longest case so far
    for dtype_name in dtypes:
        for w in runnable:
            for mode in (m for m in MODES if modes is None or m in modes):
                elapsed = time.monotonic() - start
                if elapsed + longest.get(w.name, max(longest.values(), default=0.0)) > budget_s:
                    rows.append({"workload": w.name, "dtype": dtype_name, "mode": mode, "skipped": "time budget"})
                    continue
                case = run_case(w, device, dtype_name, mode, quick)
                longest[w.name] = max(longest.get(w.name, 0.0), time.monotonic() - start - elapsed)
                rows.extend(case)
                notes.extend(_hypatia_notes(case))
                append_row(progress, case)
    notes.append("hypatia_first: the plan a first process gets, under Inductor (HYPATIA_EXECUTOR=inductor), timed after "
                 "the daemon finished tuning it in the background (tuning_wait_s)")
    notes.append("hypatia: default policy and executor choice in a later process (a fresh client session and a fresh "
                 "Dynamo against the same daemon), after warm-up sessions of the same model left the daemon holding "
                 "a tuned plan and an executor decision for every graph (warmup_sessions, warmup_s); "
                 "served_from_daemon says its session built only the executors the daemon chose")
    return {"rows": rows, "notes": notes}
