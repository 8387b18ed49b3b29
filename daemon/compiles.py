"""Compiled code: hypatiad keeps Inductor's artifacts per graph and has each graph compiled once.

A client that misses asks with ``claim``: the first is told to compile (it holds the claim and
sends a heartbeat while it compiles), the others are told to wait and ask again. The holder's
``put_compiled`` stores the artifact and ends the claim (a put refused ends it too: the next
client that asks compiles); every later ask is a hit. A claim whose holder stops beating (its
process died, or hangs with its heartbeat thread) for three heartbeats is given to the next
client that asks, so a waiter never waits on a dead compile; a waiter that has waited
``HYPATIA_COMPILE_WAIT_S`` compiles by itself whatever the daemon says.

Artifacts are code. They are accepted only from this host's own user (the private ipc socket;
never over TCP, whose clients are other hosts) and handed out only when their content still has
the digest it was stored with (:mod:`hypatia.planner.artifacts`). A shared PostgreSQL store is
one trust domain: whoever can write its tables can give code to every daemon that reads it.
All on the server thread: every operation here is one indexed row.
"""

from __future__ import annotations

import logging
import re
import time
from collections import Counter, OrderedDict
from dataclasses import dataclass

from hypatia import limits
from hypatia.config import Config
from hypatia.executors import UnknownCandidate, parse as parse_candidate
from hypatia.kernels.registry import UnknownKernel, transparent
from hypatia.planner.artifacts import Artifact, digest_of
from hypatia.planner.plan import Plan
from hypatia.planner.store import Store
from hypatia.protocol import BadRequest, ProtocolError, TooLarge, require

log = logging.getLogger("hypatia.daemon")

ARTIFACT_KEY = re.compile(r"c1-[0-9a-f]{64}")
SOURCE_KEY = re.compile(r"s1-[0-9a-f]{64}")
DIGEST = re.compile(r"[0-9a-f]{64}")
MAX_CLAIMS = 4096  # compiles in progress the daemon keeps track of
MAX_DEVICE_INDEX = 1 << 16
MAX_HEARTBEAT_KEYS = 256
STALLED_AFTER_BEATS = 3
COUNTERS = ("hits", "misses", "stored", "evicted", "refused", "compiles_granted", "waits", "takeovers",
            "released", "warm_hits", "warm_misses")


class ArtifactRefused(BadRequest):
    """An artifact the daemon will not keep: sent over TCP, or its content is not its digest."""


@dataclass
class Claim:
    holder: str
    beat: float  # monotonic time of its last heartbeat (or of the claim)


class Compiles:
    """The compiled-code handlers (server thread) over ``store``."""

    def __init__(self, config: Config, store: Store):
        self.config = config
        self.store = store
        self.counters: Counter = Counter()
        self.claims: OrderedDict[str, Claim] = OrderedDict()

    @property
    def stall_s(self) -> float:
        return STALLED_AFTER_BEATS * self.config.compile_heartbeat_s

    # -- the handlers ----------------------------------------------------------------------
    def get(self, body: dict, rid: int, over_tcp: bool = False) -> dict:
        """``get_compiled``: the artifact, or on a miss with ``claim``, who compiles it. A client
        over TCP (another host) may wait for a compile here but is never given one: its artifact
        would be refused, and this host's processes would wait on a compile never shared."""
        key = _key(body, "key", ARTIFACT_KEY, rid)
        holder = limits.text(body, "holder", limits.MAX_HOST_CHARS + 16, rid, required=True)
        found = self.store.get_artifact(key)
        if found is not None:
            return {"artifact": self._served(*found)}
        self.counters["misses"] += 1
        if not body.get("claim"):
            return {}
        now = time.monotonic()
        claim = self.claims.get(key)
        if claim is not None and claim.holder != holder and now - claim.beat <= self.stall_s:
            self.counters["waits"] += 1
            return {"wait": True, "holder": claim.holder, "retry_ms": 250}
        if over_tcp:
            return {}
        if claim is not None and claim.holder != holder:
            self.counters["takeovers"] += 1  # its holder went silent: the asker compiles
            log.info("compile of %s by %s had no heartbeat for %.0f s; %s compiles it", key[:16], claim.holder,
                     now - claim.beat, holder)
        self.claims[key] = Claim(holder, now)
        self.claims.move_to_end(key)
        while len(self.claims) > MAX_CLAIMS:
            self.claims.popitem(last=False)
        self.counters["compiles_granted"] += 1
        return {"compile": True, "heartbeat_s": self.config.compile_heartbeat_s}

    def heartbeat(self, body: dict, rid: int, over_tcp: bool = False) -> dict:
        holder = limits.text(body, "holder", limits.MAX_HOST_CHARS + 16, rid, required=True)
        if over_tcp:  # a TCP client never holds a claim: it may not keep one of this host's alive
            return {"held": []}
        keys = body.get("keys")
        if not isinstance(keys, list) or len(keys) > MAX_HEARTBEAT_KEYS:
            raise BadRequest(f"keys must be a list of at most {MAX_HEARTBEAT_KEYS} artifact keys", rid)
        now, held = time.monotonic(), []
        for key in keys:
            claim = self.claims.get(key) if isinstance(key, str) else None
            if claim is not None and claim.holder == holder:
                claim.beat = now
                held.append(key)
        return {"held": held}

    def release(self, body: dict, rid: int, over_tcp: bool = False) -> dict:
        key = _key(body, "key", ARTIFACT_KEY, rid)
        holder = limits.text(body, "holder", limits.MAX_HOST_CHARS + 16, rid, required=True)
        if over_tcp:  # nor end one
            return {}
        claim = self.claims.get(key)
        if claim is not None and claim.holder == holder:
            del self.claims[key]
            self.counters["released"] += 1
        return {}

    def put(self, body: dict, rid: int, over_tcp: bool) -> dict:
        key = _key(body, "key", ARTIFACT_KEY, rid)
        holder = limits.text(body, "holder", limits.MAX_HOST_CHARS + 16, rid, required=True)
        if over_tcp:
            self.counters["refused"] += 1
            raise ArtifactRefused("compiled code is accepted only from this host's own user (the ipc socket); "
                                  "hosts share it through a shared PostgreSQL store (HYPATIA_STORE)", rid)
        try:
            content = require(body, "content", bytes, rid)
            if len(content) > self.config.compiled_entry_bytes:
                self.counters["refused"] += 1
                raise TooLarge(f"an artifact of {len(content)} bytes is over HYPATIA_COMPILED_ENTRY_MB "
                               f"({self.config.compiled_entry_bytes} bytes)", rid)
            artifact = self._artifact(body, key, content, rid)
            if digest_of(content) != artifact.digest:
                self.counters["refused"] += 1
                raise ArtifactRefused("the artifact's content does not match its digest (truncated or damaged on "
                                      "the way); it is not stored", rid)
        except ProtocolError:
            self._end_claim(key, holder)  # nothing to wait for: the next process that asks compiles
            raise
        evicted = self.store.put_artifact(artifact, content, self.config.compiled_cache_mb << 20)
        self.claims.pop(key, None)  # stored: whoever else still compiles it is not waited for
        if evicted is None:  # the store cannot be written now (counted there): the next process compiles
            return {"stored": False}
        self.counters["stored"] += 1
        self.counters["evicted"] += evicted
        log.info("stored compiled code %s (%s, %d bytes) for %s%s", key[:16], artifact.candidate, artifact.size,
                 artifact.graph_key[:16], f"; evicted {evicted}" if evicted else "")
        return {"stored": True, "evicted": evicted}

    def warm_start(self, body: dict, rid: int) -> dict:
        """The artifact a graph compiled straight from Dynamo's graph starts from, when its plan
        chose (or the client forces) the executor that compiled it, and the plan still gives
        Inductor Dynamo's graph unchanged (no region Inductor would see rewritten)."""
        source = _key(body, "source_key", SOURCE_KEY, rid)
        env_key = limits.text(body, "env_key", limits.MAX_KEY_CHARS, rid, required=True)
        device_index = limits.integer(body, "device_index", 0, MAX_DEVICE_INDEX, rid, required=True)
        forced = limits.text(body, "candidate", limits.MAX_NAME_CHARS, rid, default="")
        for artifact in self.store.direct_artifacts(source, env_key, device_index):
            plan = self.store.get_plan((artifact.graph_key, artifact.workload_key, artifact.env_key))
            if plan is None or _inductor_sees_regions(plan):
                continue  # the plan now rewrites what Inductor is given: compiled anew on the full path
            wanted = forced or (plan.executor.chosen if plan.executor is not None else "")
            if artifact.candidate != wanted:
                continue
            found = self.store.get_artifact(artifact.key)
            if found is None:  # quarantined just now
                continue
            self.counters["warm_hits"] += 1
            return {"artifact": self._served(*found), "candidate": artifact.candidate,
                    "keys": [artifact.graph_key, artifact.workload_key, artifact.env_key], "plan": plan.to_recipe()}
        self.counters["warm_misses"] += 1
        return {}

    # -- helpers ---------------------------------------------------------------------------
    def _end_claim(self, key: str, holder: str) -> None:
        claim = self.claims.get(key)
        if claim is not None and claim.holder == holder:
            del self.claims[key]

    def _served(self, artifact: Artifact, content: bytes) -> dict:
        self.counters["hits"] += 1
        self.store.touch_artifact(artifact.key)
        return {"content": content, "digest": artifact.digest, "candidate": artifact.candidate}

    def _artifact(self, body: dict, key: str, content: bytes, rid: int) -> Artifact:
        candidate = limits.text(body, "candidate", limits.MAX_NAME_CHARS, rid, required=True)
        try:
            parse_candidate(candidate)
        except UnknownCandidate as exc:
            raise BadRequest(str(exc), rid) from None
        source = limits.text(body, "source_key", limits.MAX_KEY_CHARS, rid, default="")
        if source and not SOURCE_KEY.fullmatch(source):
            raise BadRequest("source_key must be s1- and 64 hex digits", rid)
        return Artifact(
            key=key,
            graph_key=limits.text(body, "graph_key", limits.MAX_KEY_CHARS, rid, required=True),
            workload_key=limits.text(body, "workload_key", limits.MAX_KEY_CHARS, rid, required=True),
            env_key=limits.text(body, "env_key", limits.MAX_KEY_CHARS, rid, required=True),
            candidate=candidate,
            device_index=limits.integer(body, "device_index", 0, MAX_DEVICE_INDEX, rid, required=True),
            source_key=source,
            direct=bool(require(body, "direct", bool, rid)),
            digest=_key(body, "digest", DIGEST, rid),
            size=len(content),
        )

    def stats(self) -> dict:
        now = time.monotonic()
        live = sum(1 for c in self.claims.values() if now - c.beat <= self.stall_s)  # the silent are not compiling
        count, size = self.store.artifact_totals()
        return {"count": count, "bytes": size, "limit_bytes": self.config.compiled_cache_mb << 20,
                "compiling": live, "quarantined": self.store.counters["artifacts_quarantined"]} | {
                    name: self.counters[name] for name in COUNTERS}

    def flush(self) -> int:
        self.claims.clear()
        return self.store.flush_artifacts()


def _inductor_sees_regions(plan: Plan) -> bool:
    """Whether Inductor is given ``plan``'s graph rewritten (a region it sees through), not Dynamo's."""
    try:
        return any(transparent(r.kernel, r.placement) for r in plan.regions)
    except UnknownKernel:  # a kernel of another installation: not this one's to judge
        return True


def _key(body: dict, field: str, pattern: re.Pattern, rid: int) -> str:
    value = limits.text(body, field, limits.MAX_KEY_CHARS, rid, required=True)
    if not pattern.fullmatch(value):
        raise BadRequest(f"{field} is not a key of the form {pattern.pattern}", rid)
    return value
