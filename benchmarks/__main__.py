"""``python -m benchmarks``: Hypatia against eager PyTorch and TorchInductor.

Runs the sections in one process (fresh subprocesses where a section needs them), prints a
markdown report, and writes ``results.json``, ``results.md`` and ``speedup.png`` to ``--out``.
``--quick`` is a small CPU smoke run that makes every one of its rows however long they take
(no time budget unless ``--budget-s`` gives one); ``--save-results`` also files the JSON under
``benchmarks/results/``. A private daemon (its own HYPATIA_HOME) serves the run.
``--merge FILE ...`` measures nothing: it combines the results of several runs (a GPU run split
into commands by ``--sections`` and ``--workloads``) into one report.
"""

from __future__ import annotations

import argparse
import datetime as dt
import math
import os
import platform
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
ORDER = ("daemon", "clients", "runtime", "families", "first_call", "multiprocess")
# Share of the time budget each section may use (the rest carries over to the next ones).
SHARES = {"daemon": 0.03, "clients": 0.05, "runtime": 0.45, "families": 0.1, "first_call": 0.3, "multiprocess": 0.07}
DTYPE_NAMES = ("bfloat16", "float32")
QUICK_CLIENT_TIMEOUT_MS = 600_000


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m benchmarks", description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="a small CPU subset (a few minutes); every row is made, "
                   "with no time budget unless --budget-s gives one")
    p.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto", help="default: cuda if available")
    p.add_argument("--sections", default=",".join(ORDER), help=f"comma-separated subset of {', '.join(ORDER)}")
    p.add_argument("--workloads", default="",
                   help="comma-separated workload names for the runtime and first_call sections, in the order to run them")
    p.add_argument("--dtypes", default="", help=f"comma-separated subset of {', '.join(DTYPE_NAMES)} for the runtime and "
                   "families sections (default: both; float32 with --quick)")
    p.add_argument("--modes", default="", help="comma-separated subset of inference, training for the runtime and "
                   "first_call sections (default: both)")
    p.add_argument("--budget-s", type=float, default=None,
                   help="soft time budget for the whole run: cases past it are listed as skipped (default: none "
                   "with --quick, 390 s on a GPU, 3600 s on a CPU)")
    p.add_argument("--out", type=Path, default=None, help="output directory (default benchmarks/out/<time>)")
    p.add_argument("--progress", type=Path, default=None, help="append the rows of the runtime, first_call and multiprocess sections to this "
                   "JSON-lines file as they are measured (a run cut short keeps them)")
    p.add_argument("--save-results", action="store_true", help="also copy results.json to benchmarks/results/")
    p.add_argument("--merge", type=Path, nargs="+", metavar="FILE", default=None,
                   help="measure nothing: combine these results.json files (runs of one machine) into one report")
    args = p.parse_args(argv)
    for option, given, known in (("--dtypes", args.dtypes, DTYPE_NAMES), ("--sections", args.sections, ORDER),
                                 ("--modes", args.modes, ("inference", "training"))):
        unknown = [v for v in given.split(",") if v and v not in known]
        if unknown:
            p.error(f"{option}: {', '.join(unknown)} not in {', '.join(known)}")
    return args


def _git_commit() -> str | None:
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True, timeout=5).stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        return None


def _daemon(env_home: str, verb: str) -> None:
    env = dict(os.environ, HYPATIA_HOME=env_home)
    subprocess.run([sys.executable, "-m", "hypatia.daemon", verb], env=env, check=verb == "start", capture_output=True, timeout=120)


def write_report(results: dict, out: Path, save: bool) -> None:
    """Write the report files to ``out``, print the markdown, and with ``save`` file the JSON
    under ``benchmarks/results/`` (named by machine and date)."""
    from benchmarks import report

    paths = report.write(results, out)
    print(paths["markdown"].read_text())
    for kind, path in paths.items():
        print(f"[benchmarks] {kind}: {path}", file=sys.stderr)
    if save:
        slug = re.sub(r"[^a-z0-9]+", "-", results["meta"]["device_name"].lower()).strip("-")
        try:
            day = dt.datetime.strptime(results["meta"]["date"], "%Y-%m-%d %H:%M UTC").strftime("%Y%m%d")
        except (KeyError, TypeError, ValueError):
            day = dt.datetime.now(dt.timezone.utc).strftime("%Y%m%d")
        target = ROOT / "benchmarks" / "results" / f"{slug}-{day}.json"
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(paths["json"], target)
        print(f"[benchmarks] saved {target}", file=sys.stderr)


def merge_main(args: argparse.Namespace) -> int:
    from benchmarks.merge import MergeError, merge

    try:
        results = merge(args.merge)
    except MergeError as exc:
        print(f"python -m benchmarks --merge: {exc}", file=sys.stderr)
        return 2
    out = args.out or ROOT / "benchmarks" / "out" / dt.datetime.now().strftime("%Y%m%d-%H%M%S-merged")
    write_report(results, out, args.save_results)
    return 0


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.merge:
        return merge_main(args)
    import torch

    import hypatia
    from benchmarks.workloads import WORKLOADS
    from hypatia.planner.environment import cpu_model
    from hypatia.config import load

    only = [w for w in args.workloads.split(",") if w] or None
    unknown = sorted(set(only or ()) - {w.name for w in WORKLOADS})
    if unknown:
        print(f"python -m benchmarks: unknown workload(s) {', '.join(unknown)}; known: "
              f"{', '.join(w.name for w in WORKLOADS)}", file=sys.stderr)
        return 2
    home = tempfile.mkdtemp(prefix="hyb-", dir="/tmp")
    os.environ["HYPATIA_HOME"] = home  # before the first compile: the session reads it then
    # the daemon figures' compiles get the static plan; the runtime and families sections set
    # their own settings per backend (benchmarks.hypatia_runs.SETTINGS)
    os.environ.setdefault("HYPATIA_POLICY", "HEURISTIC")
    if args.quick:
        # a smoke run of the machinery: every compile waits for the daemon's answer (planning takes
        # seconds on a busy machine) instead of planning in-process after the default 2 s
        os.environ.setdefault("HYPATIA_TIMEOUT_MS", str(QUICK_CLIENT_TIMEOUT_MS))
    device = ("cuda" if torch.cuda.is_available() else "cpu") if args.device == "auto" else args.device
    if args.quick and device != "cpu":
        device = "cpu"
    sections = [s for s in ORDER if s in args.sections.split(",")]
    dtypes = [d for d in args.dtypes.split(",") if d] or None
    modes = [m for m in args.modes.split(",") if m] or None
    if args.progress is not None:
        args.progress.parent.mkdir(parents=True, exist_ok=True)
    # quick: every row, however slow the machine (the tests read them all); cuda: one command of a
    # split run (see docs/benchmarks.md)
    budget = args.budget_s or (math.inf if args.quick else 390.0 if device == "cuda" else 3600.0)
    now = dt.datetime.now(dt.timezone.utc)
    results: dict = {
        "meta": {
            "date": now.strftime("%Y-%m-%d %H:%M UTC"),
            "device": device,
            "device_name": torch.cuda.get_device_name(0) if device == "cuda" else cpu_model(),
            "torch": torch.__version__,
            "cuda": torch.version.cuda,
            "hypatia": hypatia.__version__,
            "python": platform.python_version(),
            "cpu": cpu_model(),
            "cpu_count": os.cpu_count(),
            "git_commit": _git_commit(),
            "quick": args.quick,
            "budget_s": budget if math.isfinite(budget) else None,
            "argv": sys.argv[1:] if argv is None else list(argv),
        },
        "sections": {},
    }
    started = time.monotonic()
    _daemon(home, "start")
    try:
        for i, name in enumerate(sections):
            remaining = budget - (time.monotonic() - started)
            share = SHARES[name] / sum(SHARES[s] for s in sections[i:])
            section_budget = max(0.0, remaining * share)
            t0 = time.monotonic()
            print(f"[benchmarks] {name}" + (f" (budget {section_budget:.0f} s)" if math.isfinite(section_budget) else ""),
                  file=sys.stderr, flush=True)
            try:
                if name == "daemon":
                    from benchmarks import daemon_figures

                    data = daemon_figures.run(device, args.quick, section_budget, load())
                elif name == "clients":
                    from benchmarks import clients

                    data = clients.run(device, args.quick, section_budget)
                elif name == "runtime":
                    from benchmarks import runtime

                    data = runtime.run(device, args.quick, section_budget, only, progress=args.progress, dtypes=dtypes,
                                       modes=modes)
                elif name == "families":
                    from benchmarks import families

                    data = families.run(device, args.quick, section_budget, dtypes=dtypes)
                elif name == "first_call":
                    from benchmarks import first_call

                    data = first_call.run(device, args.quick, section_budget, only, modes=modes, progress=args.progress)
                else:
                    from benchmarks import multiprocess

                    data = multiprocess.run(device, args.quick, section_budget, progress=args.progress)
            except Exception as exc:  # a broken section is reported, the others still run
                data = {"rows": [], "notes": [f"section failed: {type(exc).__name__}: {exc}"]}
            data["elapsed_s"] = round(time.monotonic() - t0, 1)
            results["sections"][name] = data
    finally:
        _daemon(home, "stop")
        shutil.rmtree(home, ignore_errors=True)
    results["meta"]["elapsed_s"] = round(time.monotonic() - started, 1)
    write_report(results, args.out or ROOT / "benchmarks" / "out" / now.strftime("%Y%m%d-%H%M%S"), args.save_results)
    return 0


if __name__ == "__main__":
    sys.exit(main())
