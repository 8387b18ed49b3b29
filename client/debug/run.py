"""``hypatia-ctl debug run``: a script run with ``HYPATIA_ARTIFACTS`` set, and the process
folders it wrote."""

from __future__ import annotations

import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

DEFAULT_OUT = "hypatia-artifacts"


@dataclass(frozen=True)
class Run:
    """A finished run: the script's exit status and the process folders it (and its children) wrote."""

    returncode: int
    out: Path
    folders: tuple[Path, ...]


def _folders(out: Path) -> set[Path]:
    return {p for p in out.iterdir() if (p / "process.json").exists()} if out.is_dir() else set()


def run_script(script: str, args: list[str], out: str | Path = DEFAULT_OUT) -> Run:
    """Run ``python script args`` (this interpreter) with ``HYPATIA_ARTIFACTS=out``; a status
    from a signal is given as 128 + the signal's number, as a shell gives it."""
    root = Path(out).expanduser().absolute()
    before = _folders(root)
    env = dict(os.environ, HYPATIA_ARTIFACTS=str(root))
    code = subprocess.call([sys.executable, script, *args], env=env)
    return Run(128 - code if code < 0 else code, root, tuple(sorted(_folders(root) - before)))


def describe(run: Run) -> str:
    """Where the run's artifacts are, for people."""
    if not run.folders:
        return (f"no artifacts were written to {run.out}: nothing was compiled with backend=\"hypatia\" "
                "(or the script ended first)")
    graphs = sum(len(list(f.glob("graph-*"))) for f in run.folders)
    lines = [f"artifacts of {len(run.folders)} process(es), {graphs} compiled graph(s), in {run.out}:"]
    lines += [f"  {f}" for f in run.folders]
    return "\n".join(lines)
