"""Case studies of the debug toolkit: BERT-base, a ResNet that fits a CPU, and the transformer
block, each compiled by Hypatia with artifacts on, compared by KernelDiff against a float64 copy,
and reported (``hypatia-ctl report``), by one command::

    python -m benchmarks.case_studies --out docs/case-studies

Each model runs in a fresh process with a private daemon (its own ``HYPATIA_HOME``) and its own
``HYPATIA_ARTIFACTS`` folder; the report of each lands in ``OUT/<model>/report.{html,json}`` and
``OUT/summary.json`` holds what KernelDiff and the report found, for the written summary beside it.
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
import textwrap
import time
from pathlib import Path

import torch
from torch import nn

from benchmarks.fresh_process import base_env, hypatiad

MODELS = ("bert_base", "resnet_small", "transformer_block")
CALLS = 60  # calls after the first: the executor choice measures 3 + 10 calls of each candidate


class BasicBlock(nn.Module):
    """ResNet's basic block: two 3x3 convolutions with BatchNorm, and the shortcut."""

    def __init__(self, cin: int, cout: int, stride: int):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.shortcut = nn.Sequential()
        if stride != 1 or cin != cout:
            self.shortcut = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = torch.relu(self.bn1(self.conv1(x)))
        return torch.relu(self.bn2(self.conv2(y)) + self.shortcut(x))


class ResNetSmall(nn.Module):
    """ResNet-10 for 32x32 images (one basic block per stage, 64 to 512 channels)."""

    def __init__(self, classes: int = 10):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 64, 3, 1, 1, bias=False), nn.BatchNorm2d(64), nn.ReLU())
        widths = (64, 128, 256, 512)
        self.stages = nn.Sequential(*[BasicBlock(widths[max(i - 1, 0)], w, 1 if i == 0 else 2)
                                      for i, w in enumerate(widths)])
        self.head = nn.Linear(512, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(torch.flatten(nn.functional.adaptive_avg_pool2d(self.stages(self.stem(x)), 1), 1))


def build(name: str) -> tuple[nn.Module, tuple]:
    """The model (eval mode, float32, seeded) and its inputs."""
    torch.manual_seed(0)
    if name == "resnet_small":
        return ResNetSmall().eval(), (torch.randn(8, 3, 32, 32),)
    from benchmarks.workloads import by_name

    w = by_name(name)
    batch = w.batch_for("cpu")
    return w.build().eval(), tuple(w.make_inputs(batch, torch.device("cpu"), torch.float32))


CHILD = textwrap.dedent(
    """
    import json, os, sys, time
    import torch
    from benchmarks.case_studies import CALLS, build
    from hypatia.client.backend import session
    from hypatia.debug import compare
    from hypatia.debug.folder import process_folder

    name = sys.argv[1]
    model, inputs = build(name)
    start = time.perf_counter()
    compiled = torch.compile(model, backend="hypatia")
    with torch.no_grad():
        compiled(*inputs)
        compile_s = time.perf_counter() - start
        for _ in range(CALLS):  # enough for the executor choice to be measured and stored
            compiled(*inputs)
    folder = process_folder(os.environ["HYPATIA_ARTIFACTS"])
    first = sorted(folder.glob("graph-*"))[0]
    report = compare(model, inputs, reference="float64", grads=False, out_dir=first)
    print(json.dumps({"model": name, "first_call_s": round(compile_s, 1), "passed": report.passed,
                      "failed": [t.name for t in report.tensors if not t.passed],
                      "worst": max(((t.name, t.max_abs) for t in report.tensors), key=lambda x: x[1], default=None),
                      "attribution": [a.to_dict() for a in report.attribution],
                      "counters": dict(session().counters), "graph_folder": first.name}))
    """
)


def run_model(name: str, out: Path, timeout: float) -> dict:
    """One model: its process with artifacts on, KernelDiff, then the report into ``out/name``."""
    scratch = Path(tempfile.mkdtemp(prefix="hcs-", dir="/tmp"))
    home, artifacts = scratch / "h", scratch / "a"
    env = base_env() | {"HYPATIA_HOME": str(home), "HYPATIA_ARTIFACTS": str(artifacts),
                        "TORCHINDUCTOR_CACHE_DIR": str(scratch / "i")}
    home.mkdir()
    try:
        proc = subprocess.run([sys.executable, "-c", CHILD, name], env=env, capture_output=True, text=True,
                              timeout=timeout)
        if proc.returncode != 0:
            return {"model": name, "error": proc.stderr[-3000:]}
        found = json.loads(proc.stdout.strip().splitlines()[-1])
        target = out / name
        if target.exists():
            shutil.rmtree(target)
        for fmt in ("json", "html"):
            made = subprocess.run([sys.executable, "-m", "hypatia.daemon.ctl", "report", "--format", fmt,
                                   "--artifacts", str(artifacts), "--out", str(target)],
                                  env=env, capture_output=True, text=True, timeout=300)
            if made.returncode != 0:
                found.setdefault("report_errors", []).append(made.stderr[-1500:])
        return found
    finally:
        hypatiad("stop", home)
        shutil.rmtree(scratch, ignore_errors=True)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", type=Path, default=Path("docs/case-studies"))
    p.add_argument("--models", default=",".join(MODELS), help=f"comma-separated subset of {', '.join(MODELS)}")
    p.add_argument("--timeout-s", type=float, default=1800)
    args = p.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    results = []
    for name in args.models.split(","):
        started = time.monotonic()
        row = run_model(name, args.out, args.timeout_s) | {"wall_s": round(time.monotonic() - started, 1)}
        print(json.dumps({k: v for k, v in row.items() if k != "counters"}), flush=True)
        results.append(row)
    (args.out / "summary.json").write_text(json.dumps({"torch": torch.__version__, "models": results}, indent=1))
    return 0 if all("error" not in r for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())
