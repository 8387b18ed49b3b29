"""Fault switches for tests, read from ``HYPATIA_FAULTS`` (comma-separated; off by default).

``fail_start`` exit before serving; ``slow_start=S`` sleep S seconds before binding;
``no_reply=METHOD`` drop requests of METHOD; ``crash=METHOD`` SIGKILL itself on METHOD;
``delay=METHOD:S`` sleep S seconds while handling METHOD (on the server thread, so every
client waits); ``slow_plan=S`` every planning takes S seconds longer (in its worker process,
so requests pile up in flight while the server thread stays responsive, and a deadline or a
stop kills it there); ``fail_tuning`` every tuning raises; ``slow_tuning=S`` every tuning takes
S seconds longer (in the tuning worker); ``fail=METHOD`` the handler of METHOD raises (an
internal error, as a bug would); ``protocol_version=N`` speak wire protocol N, as a daemon of
another release would.
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
    slow_plan: float = 0.0
    protocol_version: int | None = None
    fail: frozenset[str] = frozenset()
    slow_tuning: float = 0.0

    @classmethod
    def parse(cls, spec: str) -> "Faults":
        fail_start, slow_start, no_reply, crash, delay, fail_tuning = False, 0.0, set(), set(), {}, False
        slow_plan, protocol_version, fail, slow_tuning = 0.0, None, set(), 0.0
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
            elif name == "slow_plan":
                slow_plan = float(value)
            elif name == "fail":
                fail.add(value)
            elif name == "slow_tuning":
                slow_tuning = float(value)
            elif name == "protocol_version":
                protocol_version = int(value)
            else:
                raise ValueError(f"unknown fault {name!r} in HYPATIA_FAULTS")
        return cls(fail_start, slow_start, frozenset(no_reply), frozenset(crash), delay, fail_tuning,
                   slow_plan, protocol_version, frozenset(fail), slow_tuning)

    def speak_protocol(self) -> None:
        """With ``protocol_version=N``, make this process frame, check and announce protocol N
        everywhere the daemon uses the version (call before serving)."""
        if self.protocol_version is None:
            return
        from hypatia import protocol
        from hypatia.daemon import service

        protocol.PROTOCOL_VERSION = self.protocol_version  # read at call time by encode/decode
        service.PROTOCOL_VERSION = self.protocol_version  # the handshake check and stats

    def planning(self) -> None:
        """Called in the planning worker before each planning."""
        if self.slow_plan:
            time.sleep(self.slow_plan)

    def tuning(self) -> None:
        """Called in the tuning worker before each tuning."""
        if self.slow_tuning:
            time.sleep(self.slow_tuning)
        if self.fail_tuning:
            raise RuntimeError("fault injected: fail_tuning")

    def on_request(self, method: str) -> bool:
        """Apply the faults for ``method``; False means: do not answer it."""
        if method in self.crash:
            os.kill(os.getpid(), signal.SIGKILL)
        if method in self.fail:
            raise RuntimeError(f"fault injected: fail={method}")
        if method in self.delay:
            time.sleep(self.delay[method])
        return method not in self.no_reply
