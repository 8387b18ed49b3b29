"""Step time of each workload under eager PyTorch, Inductor and Hypatia, side by side in one
process, with each compiled output's relative error against an eager float64 reference.

Hypatia runs twice: ``hypatia`` with the HEURISTIC policy (the static cost model's plan, what a
first compile gets) and ``hypatia_tuned`` with EXPLORE (every candidate measured before the
plan is served, what every later compile gets once background tuning is done). The tuned rows
carry the decisions where the tuner chose differently from the heuristic."""

from __future__ import annotations

import copy
import importlib.util
import json
import os
import time
from typing import Any

import torch

from benchmarks.timing import measure
from benchmarks.workloads import QUICK_WORKLOADS, WORKLOADS, Workload, loss_of, primary_output

# "dynamo" is torch.compile(backend="eager"): Dynamo's capture and guards around the same ops,
# the floor every torch.compile backend pays on top of eager.
BACKENDS = ("eager", "dynamo", "inductor", "hypatia", "hypatia_tuned")
POLICY = {"hypatia": "HEURISTIC", "hypatia_tuned": "EXPLORE"}
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}
MODES = ("inference", "training")


def _compiled(model: torch.nn.Module, backend: str):
    if backend == "eager":
        return model
    if backend == "inductor":
        return torch.compile(model)
    if backend == "dynamo":
        return torch.compile(model, backend="eager")
    from hypatia.client.backend import reset_session

    os.environ["HYPATIA_POLICY"] = POLICY[backend]
    reset_session()  # the next compile reads the policy
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
    if device == "cuda":  # CUDA events are steady; the time goes to compiling instead
        return dict(warmup=5, min_repeats=20, max_repeats=100, min_time_s=0.3)
    return dict(min_repeats=10, max_repeats=100, min_time_s=1.0)


def measure_backend(base: torch.nn.Module, backend: str, dtype: torch.dtype, inputs: tuple, reference: torch.Tensor,
                    mode: str, device: str, timing: dict[str, Any]) -> dict[str, Any]:
    """Compile a copy of ``base`` with ``backend`` and time it: first call, relative error against
    ``reference``, the step-time figures and (CUDA) peak memory. Raises what the backend raises."""
    torch._dynamo.reset()
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
    if backend == "hypatia_tuned":  # let the graph's plan-or-eager measurement settle first
        from hypatia.client.choice import TIMED_ROUNDS, WARMUP_ROUNDS

        for _ in range(2 * (WARMUP_ROUNDS + TIMED_ROUNDS)):
            step()
    row["rel_error"] = _rel_error(primary_output(out), reference)
    row.update(measure(step, device, **timing).to_dict())
    if device == "cuda":
        row["peak_mem_mib"] = round(torch.cuda.max_memory_allocated() / 2**20, 1)
    if backend == "hypatia_tuned":
        from hypatia.client.backend import session

        row["decisions_changed"] = changed_decisions()
        row["graph_choices"] = list(session().choices)
    return row


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
    rows = []
    for backend in BACKENDS:
        row: dict[str, Any] = {"workload": w.name, "dtype": dtype_name, "mode": mode, "backend": backend, "batch": batch}
        try:
            row.update(measure_backend(base, backend, DTYPES[dtype_name], inputs, reference, mode, device, timing_args(device, quick)))
        except Exception as exc:  # one failing backend must not hide the others' numbers
            row["error"] = error_text(exc)
        rows.append(row)
    return add_speedups(rows)


def run(device: str, quick: bool, budget_s: float, only: list[str] | None = None, progress=None) -> dict:
    """Every (workload, dtype, mode) on ``device``; cases past ``budget_s`` are recorded as skipped.
    ``progress`` (a path) gets each case's rows as a JSON line as soon as they are measured."""
    start = time.monotonic()
    names = list(QUICK_WORKLOADS) if quick else [w.name for w in WORKLOADS]
    if only:
        names = [n for n in names if n in only]
    dtypes = ["float32"] if quick else list(DTYPES)
    rows: list[dict] = []
    notes: list[str] = []
    for w in WORKLOADS:
        if w.name not in names:
            continue
        if w.gpu_only and device != "cuda":
            notes.append(f"{w.name}: GPU only")
            continue
        if w.requires and importlib.util.find_spec(w.requires) is None:
            notes.append(f"{w.name}: skipped, needs `{w.requires}` (pip install -e '.[bench]')")
            continue
        for dtype_name in dtypes:
            for mode in MODES:
                if time.monotonic() - start > budget_s:
                    rows.append({"workload": w.name, "dtype": dtype_name, "mode": mode, "skipped": "time budget"})
                    continue
                case = run_case(w, device, dtype_name, mode, quick)
                rows.extend(case)
                if progress is not None:
                    with open(progress, "a") as f:
                        f.write(json.dumps(case, default=str) + "\n")
    return {"rows": rows, "notes": notes}
