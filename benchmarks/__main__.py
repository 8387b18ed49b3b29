"""``python -m benchmarks``: Hypatia against eager PyTorch and TorchInductor.

Runs the sections in one process (fresh subprocesses where a section needs them), prints a
markdown report, and writes ``results.json``, ``results.md`` and ``speedup.png`` to ``--out``.
``--quick`` is a small CPU smoke run; ``--save-results`` also files the JSON under
``benchmarks/results/``. A private daemon (its own HYPATIA_HOME) serves the run.
"""

from __future__ import annotations

import argparse
import datetime as dt
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
SHARES = {"daemon": 0.05, "clients": 0.1, "runtime": 0.5, "families": 0.15, "first_call": 0.15, "multiprocess": 0.15}


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m benchmarks", description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="a small CPU subset that runs in about a minute")
    p.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto", help="default: cuda if available")
    p.add_argument("--sections", default=",".join(ORDER), help=f"comma-separated subset of {', '.join(ORDER)}")
    p.add_argument("--workloads", default="", help="comma-separated workload names for the runtime section")
    p.add_argument("--budget-s", type=float, default=None, help="soft time budget for the whole run")
    p.add_argument("--out", type=Path, default=None, help="output directory (default benchmarks/out/<time>)")
    p.add_argument("--progress", type=Path, default=None, help="append each runtime case's rows to this JSON-lines file as measured")
    p.add_argument("--save-results", action="store_true", help="also copy results.json to benchmarks/results/")
    return p.parse_args(argv)


def _git_commit() -> str | None:
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True, timeout=5).stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        return None


def _daemon(env_home: str, verb: str) -> None:
    env = dict(os.environ, HYPATIA_HOME=env_home)
    subprocess.run([sys.executable, "-m", "hypatia.daemon", verb], env=env, check=verb == "start", capture_output=True, timeout=120)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    home = tempfile.mkdtemp(prefix="hyb-", dir="/tmp")
    os.environ["HYPATIA_HOME"] = home  # before the first compile: the session reads it then
    # "hypatia" rows are the static plan a first compile gets; the runtime section adds tuned rows
    os.environ.setdefault("HYPATIA_POLICY", "HEURISTIC")

    import torch

    import hypatia
    from benchmarks import report
    from hypatia.planner.environment import cpu_model
    from hypatia.config import load

    device = ("cuda" if torch.cuda.is_available() else "cpu") if args.device == "auto" else args.device
    if args.quick and device != "cpu":
        device = "cpu"
    sections = [s for s in ORDER if s in args.sections.split(",")]
    # quick: 120 s for the sections that take their budget, plus about 10 s for the clients section
    budget = args.budget_s or (130.0 if args.quick else 540.0 if device == "cuda" else 3600.0)
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
            "budget_s": budget,
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
            print(f"[benchmarks] {name} (budget {section_budget:.0f} s)", file=sys.stderr, flush=True)
            try:
                if name == "daemon":
                    from benchmarks import daemon_figures

                    data = daemon_figures.run(device, args.quick, section_budget, load())
                elif name == "clients":
                    from benchmarks import clients

                    data = clients.run(device, args.quick, section_budget)
                elif name == "runtime":
                    from benchmarks import runtime

                    only = [w for w in args.workloads.split(",") if w] or None
                    data = runtime.run(device, args.quick, section_budget, only, progress=args.progress)
                elif name == "families":
                    from benchmarks import families

                    data = families.run(device, args.quick, section_budget)
                elif name == "first_call":
                    from benchmarks import first_call

                    data = first_call.run(device, args.quick, section_budget)
                else:
                    from benchmarks import multiprocess

                    data = multiprocess.run(device, args.quick, section_budget)
            except Exception as exc:  # a broken section is reported, the others still run
                data = {"rows": [], "notes": [f"section failed: {type(exc).__name__}: {exc}"]}
            data["elapsed_s"] = round(time.monotonic() - t0, 1)
            results["sections"][name] = data
    finally:
        _daemon(home, "stop")
        shutil.rmtree(home, ignore_errors=True)
    results["meta"]["elapsed_s"] = round(time.monotonic() - started, 1)
    out = args.out or ROOT / "benchmarks" / "out" / now.strftime("%Y%m%d-%H%M%S")
    paths = report.write(results, out)
    print(paths["markdown"].read_text())
    for kind, path in paths.items():
        print(f"[benchmarks] {kind}: {path}", file=sys.stderr)
    if args.save_results:
        slug = re.sub(r"[^a-z0-9]+", "-", results["meta"]["device_name"].lower()).strip("-")
        target = ROOT / "benchmarks" / "results" / f"{slug}-{now.strftime('%Y%m%d')}.json"
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(paths["json"], target)
        print(f"[benchmarks] saved {target}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
