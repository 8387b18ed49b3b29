"""Compiled code shared through hypatiad: a graph is compiled once per host, not once per process.

Before Inductor compiles a graph, the client asks the daemon for that graph's artifacts (the
bytes of Inductor's FX graph and AOTAutograd cache entries, Triton kernels included, as
``torch.compiler.save_cache_artifacts`` makes them). A hit is checked against its digest and
loaded into the local caches, so Inductor finds everything warm. On a miss the daemon lets one
process compile (it sends a heartbeat meanwhile) and tells the others to wait; the compiler
sends the artifacts of its compile, which every waiter then loads. A waiter whose compiler died
or went silent compiles itself, and no process waits longer than ``HYPATIA_COMPILE_WAIT_S``.

The key (``c1-``) is the plan keys (graph, workload, environment: device model, driver, CUDA,
torch, Triton and Hypatia versions), the executor candidate, the device index, a digest of the
compiler's versions and code-changing settings, and what Inductor was given (Dynamo's graph, or
the graph with the plan's regions that Inductor sees). The index is in it because Inductor's
own keys and generated code name the device (``cuda:1``): ranks that each see their GPU as
``cuda:0`` (``torchrun --virtual-local-rank``, one GPU per container) share one compile, and
processes on the same GPU always do.

Warm start: a graph that Inductor compiled straight from Dynamo's graph is also found by
Dynamo's graph itself (the ``s1-`` source key), so a later process loads its artifacts and
compiles without Hypatia tracing, keying and rewriting it; AOTAutograd's cache then skips its
retrace too. Nothing here ever fails a compile: any problem means this process compiles alone.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import socket
import threading
import time
from dataclasses import dataclass
from typing import Any, Callable

import torch
import torch.fx

from hypatia import __version__
from hypatia.client.capture import encode_arg, graph_workload_key, op_name, tensor_digest
from hypatia.client.rpc import DaemonClient
from hypatia.client.torch_internals import compiler_settings, recording_artifacts
from hypatia.config import Config
from hypatia.executors import parse as parse_candidate
from hypatia.planner.artifacts import digest_of
from hypatia.planner.plan import Plan

log = logging.getLogger("hypatia.client")

DYNAMO = "dynamo"  # what Inductor was given when it compiled Dynamo's graph unchanged


def _sha(obj: Any) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, separators=(",", ":"), default=repr).encode()).hexdigest()


def config_digest() -> str:
    """The compiler's versions and the settings that change its code."""
    from hypatia.client.executors.inductor import library_digest

    versions = [torch.__version__, torch.version.cuda, getattr(torch.version, "hip", None), __version__, library_digest()]
    try:
        import triton

        versions.append(triton.__version__)
    except ImportError:
        versions.append(None)
    return _sha([versions, compiler_settings()])


def dynamo_digest(gm: torch.fx.GraphModule) -> str:
    """A digest of Dynamo's graph: its operators, arguments and constants in graph order (its
    inputs are described by the workload key)."""
    index: dict[torch.fx.Node, int] = {}
    nodes = []
    for i, node in enumerate(gm.graph.nodes):
        index[node] = i
        if node.op == "get_attr":
            value = getattr(gm, node.target, None) if isinstance(node.target, str) else None
            nodes.append(["get_attr", tensor_digest(value) if isinstance(value, torch.Tensor) else repr(type(value))])
        elif node.op == "placeholder":
            nodes.append(["placeholder"])
        else:
            nodes.append([op_name(node), encode_arg(list(node.args), index), encode_arg(dict(node.kwargs), index)
                          if node.kwargs else None])
    return _sha(nodes)


@dataclass(frozen=True)
class CompileKey:
    """Everything an artifact is stored under and with."""

    graph_key: str
    workload_key: str
    env_key: str
    candidate: str
    device_index: int
    config: str  # config_digest()
    given: str  # DYNAMO, or a digest of the regions Inductor was given rewritten
    source_key: str  # s1-: Dynamo's graph, its inputs and the config

    @property
    def key(self) -> str:
        return "c1-" + _sha([self.graph_key, self.workload_key, self.env_key, self.candidate, self.device_index,
                             self.config, self.given])

    def body(self) -> dict:
        return {"key": self.key, "graph_key": self.graph_key, "workload_key": self.workload_key,
                "env_key": self.env_key, "candidate": self.candidate, "device_index": self.device_index,
                "source_key": self.source_key, "direct": self.given == DYNAMO}


def source_key(dynamo: str, workload_key: str, config: str) -> str:
    return "s1-" + _sha([dynamo, workload_key, config])


@dataclass(frozen=True)
class Source:
    """Dynamo's graph as the daemon knows it: its s1- key and the compiler digest in it."""

    key: str
    config: str


class Heartbeat:
    """Tells the daemon every ``interval_s`` that this process still compiles ``key`` (a thread
    with its own socket: the session's is busy with the compile's own requests)."""

    def __init__(self, config: Config, holder: str, key: str, interval_s: float):
        self.config, self.holder, self.key, self.interval_s = config, holder, key, interval_s
        self.stopped = threading.Event()
        self.thread = threading.Thread(target=self._run, name="hypatia-compile-heartbeat", daemon=True)

    def __enter__(self) -> "Heartbeat":
        self.thread.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self.stopped.set()
        self.thread.join(timeout=5)

    def _run(self) -> None:
        client = DaemonClient(self.config, timeout_ms=max(1000, int(self.interval_s * 1000)), retries=0)
        try:
            while not self.stopped.wait(self.interval_s):
                try:
                    client.call("compile_heartbeat", {"holder": self.holder, "keys": [self.key]})
                except Exception as exc:  # noqa: BLE001 - a missed beat at worst lets a waiter compile too
                    log.debug("compile heartbeat failed: %s", exc)
        finally:
            client.close()


class CodeSharing:
    """This process's side of compiled-code sharing: ``client`` is the session's connection
    (used under the session's lock), ``counters`` the session's counters."""

    def __init__(self, config: Config, client: DaemonClient, counters, note_once: Callable[[str, str], None]):
        self.config = config
        self.client = client
        self.counters = counters
        self.note_once = note_once
        self.holder = f"{socket.gethostname()[:200]}:{os.getpid()}"

    def usable(self) -> bool:
        """Whether loading artifacts can help: Inductor's local FX graph cache must be on."""
        import torch._inductor.config as inductor_config

        if not inductor_config.fx_graph_cache:
            self.note_once("compiled-off", "Inductor's FX graph cache is off (TORCHINDUCTOR_FX_GRAPH_CACHE=0), so "
                           "compiled code is not shared through hypatiad")
            return False
        return True

    # -- one compile -------------------------------------------------------------------------
    def compile(self, key: CompileKey, build: Callable[[], Callable]) -> Callable:
        """``build()`` (an Inductor compile) with this graph's artifacts loaded first when the
        daemon has them, or compiled here once for every process and sent to the daemon."""
        deadline = time.monotonic() + self.config.compile_wait_s
        waited = False
        while True:
            try:
                reply = self.client.call("get_compiled", {"key": key.key, "holder": self.holder, "claim": True})
            except Exception as exc:  # noqa: BLE001 - no daemon to share with: compile alone
                self.counters["artifacts_unshared"] += 1
                self.note_once("compiled-unshared", f"compiled code is not shared through hypatiad ({exc}); "
                               "this process compiles its graphs itself")
                return build()
            if reply.get("artifact"):
                if self.load(reply["artifact"]):
                    return build()
                return self._compile(key, build, claimed=False)
            if reply.get("compile"):
                if waited:
                    self.counters["artifacts_took_over"] += 1  # the compiler went silent
                return self._compile(key, build, claimed=True, heartbeat_s=float(reply.get("heartbeat_s", 2)))
            if not reply.get("wait"):
                return build()
            if not waited:
                waited = True
                self.counters["artifacts_waited"] += 1
                log.info("waiting for %s to compile a graph (%s)", reply.get("holder"), key.key[:16])
            if time.monotonic() >= deadline:
                self.counters["artifacts_took_over"] += 1
                self.note_once("compiled-waited", f"waited {self.config.compile_wait_s} s (HYPATIA_COMPILE_WAIT_S) for "
                               f"another process to compile a graph; compiling it here")
                return self._compile(key, build, claimed=False)
            time.sleep(min(max(int(reply.get("retry_ms", 250)), 50), 2000) / 1000)

    def load(self, artifact: dict) -> bool:
        """Load a served artifact into the local caches, if its content is its digest."""
        content = artifact.get("content")
        if not isinstance(content, bytes) or digest_of(content) != artifact.get("digest"):
            self.counters["artifacts_damaged"] += 1
            return False
        try:
            info = torch.compiler.load_cache_artifacts(content)
        except Exception as exc:  # noqa: BLE001 - e.g. the local cache directory cannot be written
            log.debug("could not load compiled artifacts: %s", exc)
            info = None
        if info is None:
            self.counters["artifacts_unloadable"] += 1
            return False
        self.counters["artifacts_loaded"] += 1
        return True

    def _compile(self, key: CompileKey, build: Callable[[], Callable], claimed: bool,
                 heartbeat_s: float = 2.0) -> Callable:
        try:
            with Heartbeat(self.config, self.holder, key.key, heartbeat_s) if claimed else contextlib.nullcontext():
                with recording_artifacts() as recorded:
                    compiled = build()
        except BaseException:
            if claimed:
                self._release(key)
            raise
        content = recorded.content
        if content is None or len(content) > self.config.compiled_entry_bytes:
            if content is not None:
                self.counters["artifacts_too_large"] += 1
                self.note_once("compiled-large", f"a graph's compiled code ({len(content) >> 20} MiB) is over "
                               "HYPATIA_COMPILED_ENTRY_MB and is not shared")
            if claimed:
                self._release(key)
            return compiled
        body = key.body() | {"holder": self.holder, "content": content, "digest": digest_of(content)}
        try:
            self.client.call("put_compiled", body, timeout_ms=max(self.config.timeout_ms, 30_000))
            self.counters["artifacts_compiled"] += 1
        except Exception as exc:  # noqa: BLE001 - not shared: the next process compiles too
            self.counters["artifacts_unshared"] += 1
            self.note_once("compiled-put", f"hypatiad did not keep a graph's compiled code ({exc})")
        return compiled

    def _release(self, key: CompileKey) -> None:
        try:
            self.client.call("compile_release", {"key": key.key, "holder": self.holder})
        except Exception as exc:  # noqa: BLE001 - the claim then ends when its heartbeat does
            log.debug("could not release a compile claim: %s", exc)

    # -- one graph ---------------------------------------------------------------------------
    def source(self, gm: torch.fx.GraphModule, example_inputs: list, phase: str) -> Source | None:
        """Dynamo's graph ``gm`` named for the daemon (with the compiler's digest), when an
        Inductor executor may run it and loading artifacts can help; else None."""
        forced = self.config.executor
        if (forced != "auto" and parse_candidate(forced)[0] != "inductor") or not self.usable():
            return None
        config = config_digest()
        workload = graph_workload_key(example_inputs, phase)[0]
        return Source(source_key(dynamo_digest(gm), workload, config), config)

    def warm_start(self, graphs, source: Source, index: int) -> tuple[Callable, Plan, tuple[str, str, str]] | None:
        """Inductor's code for Dynamo's graph, started from the artifacts the daemon keeps for it
        with the executor its plan chose (or the one forced): no trace, key or rewrite of
        Hypatia's own. Returns (compiled, plan, plan keys) or None (the full path then runs)."""
        from hypatia.client import executors
        from hypatia.planner import environment

        env_key, _ = environment.describe(graphs.device, index)
        forced = "" if self.config.executor == "auto" else self.config.executor
        try:
            reply = self.client.call("warm_start", {"source_key": source.key, "env_key": env_key,
                                                    "device_index": index, "candidate": forced})
            if not reply.get("artifact"):
                return None
            plan, candidate, keys = Plan.from_recipe(reply["plan"]), reply["candidate"], tuple(reply["keys"])
            parse_candidate(candidate)
        except Exception as exc:  # noqa: BLE001 - no daemon yet (DaemonGone at once), ...: the full path
            log.debug("no warm start: %s", exc)  # starts one, asks again and falls back there
            return None
        if (self.config.policy == "EXPLORE" and not plan.tuned) or not self.load(reply["artifact"]):
            return None
        self.counters["warm_starts"] += 1
        self.counters[f"executor.{candidate}"] += 1
        if not forced:
            self.counters["executor_from_daemon"] += 1  # the plan's measured choice
        return executors.build(candidate, graphs), plan, keys

    def sharer(self, keys: tuple[str, str, str], index: int, plan: Plan, source: Source) -> Callable:
        """``share(candidate, direct, compile)`` for one graph's executors (see
        :class:`~hypatia.client.executors.Graphs`)."""
        from hypatia.kernels import transparent

        visible = [r.to_dict() for r in plan.regions if transparent(r.kernel, r.placement)]

        def share(candidate: str, direct: bool, compile: Callable[[], Callable]) -> Callable:
            given = DYNAMO if direct else _sha(visible)
            key = CompileKey(keys[0], keys[1], keys[2], candidate, index, source.config, given, source.key)
            return self.compile(key, compile)

        return share
