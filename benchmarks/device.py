"""The ``hypatia`` device, measured: per-op interception cost on the client, and step times of
models run on the device from a process that sees no GPU, against the same models run in a
process of the daemon's host on its device (eager, and Hypatia's backend). Ratios only: every
row of one run is measured on one machine, side by side.

``python -m benchmarks.device [--quick] [--out DIR] [--workloads a,b] [--steps N] [--batch N] [--kinds a,b]``

One hypatiad is started the way a user starts it, in a fresh HYPATIA_HOME; each row is one
process (:mod:`benchmarks.device_worker`). The device rows' clients run with
``CUDA_VISIBLE_DEVICES=""``; the daemon keeps the GPU (its CPU where there is none). The
``device_ipc`` rows' client has that GPU too (same host): its batches go up by CUDA IPC handle.
The ``remote`` rows are remote mode (``HYPATIA_MODE=remote``): a CPU model compiled in a client
with no GPU, its graphs run on the daemon's device through the same requests. Reported
per device row: median step time, bytes up and down per step after the first (weights must
not move again) and on the first, and the daemon's memory. Nothing here is asserted.
"""

from __future__ import annotations

import argparse
import json
import shutil
import tempfile
from pathlib import Path

import torch

from benchmarks.multiprocess import base_env, run_module
from benchmarks.workloads import by_name

FULL = {"workloads": ("bert_base", "gpt2_small", "transformer_block"), "steps": 20}
QUICK = {"workloads": ("mlp_small",), "steps": 3}
TRAINING = ("transformer_block",)  # the small transformer's training step
KINDS = ("eager", "hypatia", "device", "device_compiled", "device_ipc", "remote")


def _row(env: dict, *argv: str, timeout: float) -> dict:
    proc = run_module(env, "benchmarks.device_worker", *argv, timeout=timeout)
    lines = [line for line in proc.stdout.splitlines() if line.startswith("{")]
    if proc.returncode != 0 or not lines:
        return {"kind": argv[0], "workload": argv[1], "mode": argv[2],
                "error": f"exit {proc.returncode}: {(proc.stderr or proc.stdout)[-1500:]}"}
    return json.loads(lines[-1])


def run(quick: bool, workloads: tuple[str, ...] | None = None, steps: int | None = None,
        timeout: float = 1800, kinds: tuple[str, ...] = KINDS, batch: int | None = None,
        progress: Path | None = None) -> dict:
    sizes = QUICK if quick else FULL
    workloads = workloads or sizes["workloads"]
    steps = steps or sizes["steps"]
    gpu = torch.cuda.is_available()
    dtype = "bfloat16" if gpu else "float32"
    home = Path(tempfile.mkdtemp(prefix="hd-", dir="/tmp"))
    env = base_env(home) | {"HYPATIA_BACKGROUND_TUNING": "0"}
    client_env = env | {"CUDA_VISIBLE_DEVICES": "", "HYPATIA_AUTOSTART": "0"}
    # local rows run beside the daemon; device rows see no GPU, except device_ipc's, which shares it
    envs = {"eager": env, "hypatia": env, "device": client_env, "device_compiled": client_env,
            "device_ipc": env | {"HYPATIA_AUTOSTART": "0"},
            # remote mode: the client's own executor is its fallback only, not measured (aten)
            "remote": client_env | {"HYPATIA_MODE": "remote", "HYPATIA_EXECUTOR": "aten"}}
    rows: list[dict] = []
    started = run_module(env, "hypatia.daemon", "start", timeout=120)
    if started.returncode != 0:
        raise RuntimeError(f"hypatiad start exited {started.returncode}: {started.stderr[-800:]}")
    try:
        rows.append(_row(client_env, "intercept", "-", "-", str(2000 if quick else 20000), dtype, "0", timeout=timeout))
        for name in workloads:
            w = by_name(name)
            size = batch or w.batch_for("cuda" if gpu else "cpu", quick)
            for mode in ("inference", "training") if name in TRAINING or quick else ("inference",):
                for kind in kinds:
                    if kind == "device_ipc" and not gpu:
                        continue  # CUDA IPC needs a GPU the client shares with the daemon
                    rows.append(_row(envs[kind], kind, name, mode, str(steps), dtype, str(size), timeout=timeout))
                    if progress is not None:  # each row as it comes: a run cut short keeps what it measured
                        with progress.open("a") as f:
                            f.write(json.dumps(rows[-1]) + "\n")
    finally:
        run_module(env, "hypatia.daemon", "stop", timeout=120)
        shutil.rmtree(home, ignore_errors=True)
    return {"gpu": torch.cuda.get_device_name(0) if gpu else None, "dtype": dtype, "rows": rows,
            "summary": summarize(rows)}


def summarize(rows: list[dict]) -> list[dict]:
    """Per workload and mode: the device's step time over local eager's and local Hypatia's."""
    by = {(r.get("workload"), r.get("mode"), r["kind"]): r for r in rows if "median_ms" in r}
    out = []
    for (workload, mode, kind), r in by.items():
        if not kind.startswith("device") and kind != "remote":  # the rows from a client of the daemon
            continue
        eager, local = by.get((workload, mode, "eager")), by.get((workload, mode, "hypatia"))
        out.append({"workload": workload, "mode": mode, "kind": kind, "batch": r.get("batch"), "device_ms": r["median_ms"],
                    "vs_local_eager": round(r["median_ms"] / eager["median_ms"], 3) if eager else None,
                    "vs_local_hypatia": round(r["median_ms"] / local["median_ms"], 3) if local else None,
                    "bytes_up_per_step": r.get("bytes_up_per_step"), "bytes_up_first": r.get("bytes_up_first")})
    return out


def markdown(results: dict) -> str:
    lines = [f"# The hypatia device ({results['gpu'] or 'CPU'}, {results['dtype']})", "",
             "| workload | mode | row | batch | device ms | / local eager | / local hypatia | bytes up per step | bytes up, first |",
             "|---|---|---|---|---|---|---|---|---|"]
    for s in results["summary"]:
        lines.append(f"| {s['workload']} | {s['mode']} | {s['kind']} | {s['batch']} | {s['device_ms']} | {s['vs_local_eager']} | "
                     f"{s['vs_local_hypatia']} | {s['bytes_up_per_step']} | {s['bytes_up_first']} |")
    intercept = next((r for r in results["rows"] if r["kind"] == "intercept"), {})
    lines += ["", f"Per-op interception on the client (us): {intercept.get('us_per_op', intercept.get('error'))}"]
    errors = [r for r in results["rows"] if "error" in r]
    lines += [f"- {r['kind']}/{r.get('workload')}/{r.get('mode')}: {r['error'][:300]}" for r in errors]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.device", description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="the small MLP only, a few steps (a CPU smoke run)")
    p.add_argument("--out", type=Path, default=Path("device-results"), help="where results.json and results.md go")
    p.add_argument("--workloads", help="comma-separated workload names (default: bert_base,gpt2_small,transformer_block)")
    p.add_argument("--steps", type=int, help="timed steps per row")
    p.add_argument("--batch", type=int, help="the batch size of every workload (default: each workload's own)")
    p.add_argument("--kinds", default=",".join(KINDS),
                   help="which rows per workload: eager and hypatia (local), device and device_compiled (a client with no "
                        "GPU), device_ipc (a client with the daemon's GPU) (default: all five)")
    args = p.parse_args(argv)
    kinds = tuple(k for k in args.kinds.split(",") if k)
    unknown = set(kinds) - set(KINDS)
    if unknown:
        p.error(f"unknown kind(s) {', '.join(sorted(unknown))}; known: {', '.join(KINDS)}")
    args.out.mkdir(parents=True, exist_ok=True)
    results = run(args.quick, tuple(args.workloads.split(",")) if args.workloads else None, args.steps, kinds=kinds, batch=args.batch,
                  progress=args.out / "rows.jsonl")
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "results.json").write_text(json.dumps(results, indent=1))
    (args.out / "results.md").write_text(markdown(results))
    print(markdown(results))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
