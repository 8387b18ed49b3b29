"""Running a planned graph in the client: the planned module, with eager PyTorch behind it.

The executable itself is built by :func:`hypatia.planner.executable.apply_plan`, shared with the
daemon's remote mode.
"""

from __future__ import annotations

from typing import Callable


class GuardedCall:
    """Runs the planned graph; on any error from it, warns once, counts, and runs eager from then on."""

    def __init__(self, planned: Callable, eager: Callable, on_failure: Callable[[BaseException], None]):
        # An instance attribute, not a class one: Dynamo wraps backward functions with
        # functools.wraps, which copies only the instance __dict__.
        self._boxed_call = True
        self.planned = planned
        self.eager = eager
        self.on_failure = on_failure
        self.failed = False

    def __call__(self, args: list) -> object:
        if not self.failed:
            try:
                return self.planned(*args)
            except Exception as exc:  # noqa: BLE001 - any kernel failure degrades to eager
                self.failed = True
                self.on_failure(exc)
        return self.eager(*args)
