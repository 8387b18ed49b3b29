"""Fault switches for tests, read from ``HYPATIA_FAULTS`` (comma-separated; off by default).

``fail_start`` exit before serving; ``slow_start=S`` sleep S seconds before binding;
``no_reply=METHOD`` drop requests of METHOD; ``crash=METHOD`` SIGKILL itself on METHOD;
``delay=METHOD:S`` sleep S seconds while handling METHOD; ``fail_tuning`` every tuning raises.
"""

from __future__ import annotations

import os
import signal
import time
from dataclasses import dataclass, field


@dataclass(frozen=True)
class Faults:
    fail_start: bool = False
    slow_start: float = 0.0
    no_reply: frozenset[str] = frozenset()
    crash: frozenset[str] = frozenset()
    delay: dict = field(default_factory=dict)
    fail_tuning: bool = False

    @classmethod
    def parse(cls, spec: str) -> "Faults":
        fail_start, slow_start, no_reply, crash, delay, fail_tuning = False, 0.0, set(), set(), {}, False
        for item in filter(None, (s.strip() for s in spec.split(","))):
            name, _, value = item.partition("=")
            if name == "fail_start":
                fail_start = True
            elif name == "slow_start":
                slow_start = float(value)
            elif name == "no_reply":
                no_reply.add(value)
            elif name == "crash":
                crash.add(value)
            elif name == "fail_tuning":
                fail_tuning = True
            elif name == "delay":
                method, _, seconds = value.partition(":")
                delay[method] = float(seconds)
            else:
                raise ValueError(f"unknown fault {name!r} in HYPATIA_FAULTS")
        return cls(fail_start, slow_start, frozenset(no_reply), frozenset(crash), delay, fail_tuning)

    def tuning(self) -> None:
        """Called before each tuning."""
        if self.fail_tuning:
            raise RuntimeError("fault injected: fail_tuning")

    def on_request(self, method: str) -> bool:
        """Apply the faults for ``method``; False means: do not answer it."""
        if method in self.crash:
            os.kill(os.getpid(), signal.SIGKILL)
        if method in self.delay:
            time.sleep(self.delay[method])
        return method not in self.no_reply
