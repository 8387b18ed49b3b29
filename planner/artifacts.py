"""Compiled code in the store: Inductor's cache artifacts per graph, checked and bounded.

Part of :class:`~hypatia.planner.store.Store`, apart because it is one idea: code compiled once
per host (or per cluster, on PostgreSQL) and handed to every later process. An artifact is
code, so it is served only when its content still has the sha256 digest it was stored with;
one that does not (a damaged page, a truncated write) is quarantined and never served. The
artifacts together stay under a size limit: past it the least recently used go first.
"""

from __future__ import annotations

import hashlib
import json
import time
from dataclasses import dataclass

from hypatia.planner.connections import operation, write

# The columns of an artifact's row besides its content, in the order of :class:`Artifact`.
_META = ("key", "graph_key", "workload_key", "env_key", "candidate", "device_index", "source_key", "direct",
         "digest", "size")


@dataclass(frozen=True)
class Artifact:
    """What is stored with an artifact's content: its key, the plan it was compiled for, the
    executor candidate and device index it was compiled for, Dynamo's graph it came from
    (``source_key``; ``direct`` when Inductor was given that graph unchanged), and the
    content's sha256 ``digest`` and ``size``."""

    key: str
    graph_key: str
    workload_key: str
    env_key: str
    candidate: str
    device_index: int
    source_key: str
    direct: bool
    digest: str
    size: int

    def row(self) -> dict:
        return {name: getattr(self, name) if name != "direct" else int(self.direct) for name in _META}


def digest_of(content: bytes) -> str:
    return hashlib.sha256(content).hexdigest()


class ArtifactStore:
    """The artifact operations of :class:`~hypatia.planner.store.Store` (which provides the
    connections, ``_insert``, ``_quarantine`` and ``counters``)."""

    @write
    def put_artifact(self, artifact: Artifact, content: bytes, limit_bytes: int) -> int:
        """Store ``content`` under ``artifact.key`` (replacing what was there), then evict the
        least recently used artifacts until all fit in ``limit_bytes``; returns how many were
        evicted. Content whose digest is not ``artifact.digest`` is refused (ValueError)."""
        if digest_of(content) != artifact.digest or len(content) != artifact.size:
            raise ValueError(f"the artifact's content ({len(content)} bytes) does not match its digest and size")
        now = time.time()
        db = self._db()
        with db.atomic():  # an upsert: daemons sharing a PostgreSQL store may store one key at once
            self._upsert(db, "artifacts", artifact.row() | {
                "content": content, "created_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(now)),
                "last_used": now, "uses": 0}, ("key",))
            evicted = self._evict(db, limit_bytes, keep=artifact.key)
        self.counters["artifacts_evicted"] += evicted
        return evicted

    def _evict(self, db, limit_bytes: int, keep: str) -> int:
        total = db.execute("SELECT coalesce(sum(size), 0) FROM artifacts").fetchone()[0]
        if total <= limit_bytes:
            return 0
        evicted = 0
        for key, size in db.execute("SELECT key, size FROM artifacts ORDER BY last_used, key").fetchall():
            if total <= limit_bytes:
                break
            if key == keep:  # the newest stays even alone over the limit: it was just asked for
                continue
            db.execute("DELETE FROM artifacts WHERE key = ?", (key,))
            total -= size
            evicted += 1
        return evicted

    @operation
    def get_artifact(self, key: str) -> tuple[Artifact, bytes] | None:
        """The artifact stored under ``key`` and its content, or None. One whose content does
        not match its digest is quarantined (never served again) and is a miss."""
        row = self._db().execute(f"SELECT {', '.join(_META)}, content FROM artifacts WHERE key = ?", (key,)).fetchone()
        if row is None:
            return None
        artifact, content = _artifact(row[:-1]), bytes(row[-1] or b"")
        if len(content) != artifact.size or digest_of(content) != artifact.digest:
            self._quarantine_artifact(artifact, len(content))
            return None
        return artifact, content

    @write
    def _quarantine_artifact(self, artifact: Artifact, found: int) -> None:
        db = self._db()
        with db.atomic():
            db.execute("DELETE FROM artifacts WHERE key = ?", (artifact.key,))
            self._quarantine(db, "artifacts", artifact.key, json.dumps(artifact.row()),
                             f"content of {found} bytes does not match the stored digest and size ({artifact.size} bytes)")
        self.counters["artifacts_quarantined"] += 1

    @write
    def touch_artifact(self, key: str) -> None:
        """Mark the artifact used now (the least recently used are evicted first)."""
        db = self._db()
        with db.atomic():
            db.execute("UPDATE artifacts SET last_used = ?, uses = uses + 1 WHERE key = ?", (time.time(), key))

    @operation
    def direct_artifacts(self, source_key: str, env_key: str, device_index: int) -> list[Artifact]:
        """The artifacts compiled straight from the Dynamo graph ``source_key`` names, in this
        environment and on this device index (one per executor candidate and setting)."""
        rows = self._db().execute(
            f"SELECT {', '.join(_META)} FROM artifacts WHERE source_key = ? AND env_key = ? AND device_index = ? "
            "AND direct = 1 ORDER BY last_used DESC", (source_key, env_key, device_index)).fetchall()
        return [_artifact(r) for r in rows]

    @operation
    def artifact_totals(self) -> tuple[int, int]:
        """(how many artifacts are stored, their bytes)."""
        count, size = self._db().execute("SELECT count(*), coalesce(sum(size), 0) FROM artifacts").fetchone()
        return int(count), int(size)

    @operation
    def flush_artifacts(self) -> int:
        """Delete every artifact (the plans stay); returns how many were deleted."""
        db = self._db()
        with db.atomic():
            count = db.execute("SELECT count(*) FROM artifacts").fetchone()[0]
            db.execute("DELETE FROM artifacts")
        db.compact()
        return int(count)


def _artifact(row) -> Artifact:
    values = dict(zip(_META, row))
    return Artifact(**(values | {"direct": bool(values["direct"]), "device_index": int(values["device_index"]),
                                 "size": int(values["size"])}))
