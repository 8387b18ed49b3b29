"""Several runs' ``results.json`` -> one results dict, so that one GPU run can be split into
commands that each fit a time limit (different ``--sections`` and ``--workloads``).

Sections found in several files are combined row by row: a row measured in any file replaces
the same row skipped in another, and of two measured rows the later file's is kept.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

# What names one row of each section (a skipped runtime case has no backend: it stands for all).
IDENTITY = {
    "runtime": ("workload", "dtype", "mode", "backend"),
    "families": ("family", "dtype", "backend"),
    "first_call": ("workload", "config", "mode"),
    "daemon": ("figure", "nodes"),
    "clients": ("kind", "clients"),
    "multiprocess": ("backend", "processes", "workload"),
}
# Identity fields a skipped row may lack: it then stands for every row that has the rest.
WILDCARDS = ("backend",)


class MergeError(Exception):
    """The results files cannot be combined (unreadable, or from different machines)."""


def load(path: Path) -> dict[str, Any]:
    try:
        results = json.loads(Path(path).read_text())
    except (OSError, ValueError) as exc:
        raise MergeError(f"cannot read {path}: {exc}") from None
    if not (isinstance(results, dict) and isinstance(results.get("meta"), dict)
            and isinstance(results.get("sections"), dict)):
        raise MergeError(f"{path} is not a benchmark results file (no meta and sections)")
    return results


def _identity(section: str, row: dict) -> tuple:
    return tuple(row.get(f) for f in IDENTITY.get(section, ()))


def _covered(section: str, skipped: dict, measured: list[dict]) -> bool:
    """Whether a measured row stands where ``skipped`` does (matching every field it has)."""
    fields = [f for f in IDENTITY.get(section, ()) if not (f in WILDCARDS and f not in skipped)]
    return any(all(r.get(f) == skipped.get(f) for f in fields) for r in measured)


def merge_rows(section: str, row_lists: list[list[dict]]) -> list[dict]:
    """The rows of one section from several runs, in first-seen order, without duplicates."""
    if section not in IDENTITY:  # unknown section: keep everything
        return [r for rows in row_lists for r in rows]
    by_id: dict[tuple, dict] = {}
    for rows in row_lists:
        for r in rows:
            key = _identity(section, r)
            if key not in by_id or "skipped" in by_id[key] or "skipped" not in r:
                by_id[key] = r
    measured = [r for r in by_id.values() if "skipped" not in r]
    return [r for r in by_id.values() if "skipped" not in r or not _covered(section, r, measured)]


def merge(paths: list[Path]) -> dict[str, Any]:
    """One results dict from the files at ``paths`` (in order); raises :class:`MergeError`."""
    runs = [load(p) for p in paths]
    if not runs:
        raise MergeError("give at least one results.json to merge")
    devices = {r["meta"].get("device_name") for r in runs}
    if len(devices) > 1:
        raise MergeError(f"the files come from different machines ({', '.join(map(str, sorted(devices, key=str)))}); "
                         "merge only the runs of one machine")
    meta = dict(runs[-1]["meta"])
    meta["elapsed_s"] = round(sum(r["meta"].get("elapsed_s") or 0 for r in runs), 1)
    meta["merged_from"] = [{"file": str(p), "date": r["meta"].get("date"), "git_commit": r["meta"].get("git_commit"),
                            "sections": list(r["sections"]), "elapsed_s": r["meta"].get("elapsed_s"),
                            "budget_s": r["meta"].get("budget_s")} for p, r in zip(paths, runs)]
    sections: dict[str, Any] = {}
    for name in dict.fromkeys(n for r in runs for n in r["sections"]):
        parts = [r["sections"][name] for r in runs if name in r["sections"]]
        merged = {k: v for part in parts for k, v in part.items() if k not in ("rows", "notes", "elapsed_s")}
        merged["rows"] = merge_rows(name, [p.get("rows", []) for p in parts])
        merged["notes"] = list(dict.fromkeys(n for p in parts for n in p.get("notes", [])))
        merged["elapsed_s"] = round(sum(p.get("elapsed_s") or 0 for p in parts), 1)
        sections[name] = merged
    commits = {r["meta"].get("git_commit") for r in runs}
    if len(commits) > 1:
        meta["note"] = f"merged runs of different commits: {', '.join(sorted(map(str, commits)))}"
    return {"meta": meta, "sections": sections}
