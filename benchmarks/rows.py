"""Rows of a results file: written as they are measured, and found again (with why, when not)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any


def append_row(progress: Path | str | None, row: Any) -> None:
    """Append ``row`` (a row, or a case's rows) to the JSON-lines file ``progress``, if given."""
    if progress is not None:
        with open(progress, "a") as f:
            f.write(json.dumps(row, default=str) + "\n")


class MissingRow(LookupError):
    """A row asked for is not in the results; the message names the row and why it is missing."""


def find(results: dict, section: str, **match: Any) -> dict:
    """The measured row of ``section`` whose fields equal ``match`` (it may carry an ``error``).

    Raises :class:`MissingRow` naming the row and the reason: the section is absent or failed,
    the case was skipped (and why: a time budget, a missing package, ...), or no such row was made."""
    wanted = f"{section} row " + ", ".join(f"{k}={v}" for k, v in match.items())
    data = results.get("sections", {}).get(section)
    if data is None:
        raise MissingRow(f"no {wanted}: the results have no {section} section "
                         f"(sections: {', '.join(results.get('sections', {})) or 'none'})")
    rows = data.get("rows", [])
    for r in rows:
        if "skipped" not in r and all(r.get(k) == v for k, v in match.items()):
            return r
    for r in rows:  # a skipped case stands for every row it would have made
        if "skipped" in r and all(r[k] == v for k, v in match.items() if k in r):
            raise MissingRow(f"no {wanted}: the case was skipped ({r['skipped']})")
    notes = "; ".join(data.get("notes", []))
    raise MissingRow(f"no {wanted}: none of the section's {len(rows)} rows matches"
                     + (f"; the section's notes: {notes}" if notes else ""))
