"""The daemon's log of failed requests: one line per failure, rate-limited per kind.

A failure is logged as one line (method, error type, message); its traceback, when it has one,
only at DEBUG. The same kind of failure (method and error type) repeated is logged at its 1st,
2nd, 4th, 8th... occurrence, each line saying how many were left out since the one before, so
a flood of bad requests or a handler failing on every call leaves a log of a few lines, and a
reader still learns how often it happened (every failure is also counted in the stats).
"""

from __future__ import annotations

import logging
import threading
from collections import Counter

MAX_KINDS = 4096  # distinct (method, error) pairs remembered; beyond that the oldest are forgotten


class FailureLog:
    """Thread-safe: the server thread and the worker threads both report failures here."""

    def __init__(self, logger: logging.Logger):
        self.log = logger
        self._seen: Counter = Counter()
        self._lock = threading.Lock()

    def failed(self, method: str, error: str, message: str, level: int = logging.WARNING,
               exc: BaseException | None = None) -> bool:
        """Record a failure of ``method`` with ``error`` (an error code or exception type name);
        whether it was written at ``level`` (else at DEBUG only)."""
        key = (method[:64], error[:64])
        with self._lock:
            if key not in self._seen and len(self._seen) >= MAX_KINDS:
                self._seen.pop(next(iter(self._seen)))
            self._seen[key] += 1
            n = self._seen[key]
        shown = n & (n - 1) == 0  # 1, 2, 4, 8, ...
        left_out = n - 1 - n // 2 if shown and n > 2 else 0  # those since the previous line (at n/2)
        suffix = f" [{n} such failures so far, {left_out} not logged since the last]" if n > 1 else ""
        self.log.log(level if shown else logging.DEBUG, "%s failed: %s: %s%s", method, error, message[:500], suffix)
        if exc is not None and exc.__traceback__ is not None and self.log.isEnabledFor(logging.DEBUG):
            self.log.debug("traceback of that %s failure:", method, exc_info=exc)
        return shown
