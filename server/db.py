"""SQLite job and key store (one file in the data directory, WAL journal).

Every call opens (or reuses, per thread) a connection with a busy timeout, so the API
threads, the dispatcher thread and the worker processes can all write safely. Timestamps
are ISO-8601 UTC strings.
"""

from __future__ import annotations

import datetime as _dt
import json
import sqlite3
import threading
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, cast, get_args

__all__ = ["ACTIVE_STATES", "FINAL_STATES", "Database", "Job", "JobKind", "JobStatus",
           "KeyRow", "utcnow"]

#: A job's states: queued -> running -> one of the final states (a running job interrupted
#: by a server stop goes back to queued).
JobStatus = Literal["queued", "running", "succeeded", "failed", "cancelled"]
FinalStatus = Literal["succeeded", "failed", "cancelled"]
#: What a job does: fit a volume, or build a dictionary.
JobKind = Literal["fit", "dictionary"]
ACTIVE_STATES: tuple[JobStatus, ...] = ("queued", "running")
FINAL_STATES: tuple[FinalStatus, ...] = get_args(FinalStatus)

SCHEMA = """
CREATE TABLE IF NOT EXISTS keys (
    id TEXT PRIMARY KEY,
    name TEXT NOT NULL UNIQUE,
    hash TEXT NOT NULL,
    is_admin INTEGER NOT NULL DEFAULT 0,
    created TEXT NOT NULL,
    revoked TEXT
);
CREATE TABLE IF NOT EXISTS jobs (
    seq INTEGER PRIMARY KEY AUTOINCREMENT,
    id TEXT NOT NULL UNIQUE,
    owner TEXT NOT NULL,
    kind TEXT NOT NULL,
    model TEXT NOT NULL,
    options TEXT NOT NULL DEFAULT '{}',
    inputs TEXT NOT NULL DEFAULT '{}',
    status TEXT NOT NULL,
    progress REAL NOT NULL DEFAULT 0,
    created TEXT NOT NULL,
    started TEXT,
    finished TEXT,
    error TEXT,
    attempts INTEGER NOT NULL DEFAULT 0,
    cancel_requested INTEGER NOT NULL DEFAULT 0,
    deleted INTEGER NOT NULL DEFAULT 0,
    outputs TEXT NOT NULL DEFAULT '[]',
    result TEXT NOT NULL DEFAULT '{}'
);
CREATE INDEX IF NOT EXISTS jobs_owner ON jobs(owner, seq);
CREATE INDEX IF NOT EXISTS jobs_status ON jobs(status, seq);
CREATE TABLE IF NOT EXISTS meta (
    key TEXT PRIMARY KEY,
    value TEXT
);
"""


def utcnow() -> str:
    """The current UTC time, ISO-8601 with seconds precision and a ``Z``-free offset."""
    return _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="milliseconds")


#: A row of the keys table (``id``, ``name``, ``hash``, ``is_admin``, ``created``,
#: ``revoked``); :class:`server.auth.ApiKey` is its typed view.
KeyRow = dict[str, Any]


@dataclass(frozen=True)
class Job:
    """One job as stored: what was asked (kind, model, options, input file names), its
    state and what it produced. Immutable: the database is the only thing that changes
    it, and every read returns a new record."""

    id: str
    seq: int
    owner: str
    kind: JobKind
    model: str
    status: JobStatus
    created: str
    options: dict[str, Any] = field(default_factory=dict)
    inputs: dict[str, str] = field(default_factory=dict)
    progress: float = 0.0
    started: str | None = None
    finished: str | None = None
    error: str | None = None
    attempts: int = 0
    cancel_requested: bool = False
    deleted: bool = False
    outputs: list[str] = field(default_factory=list)
    result: dict[str, Any] = field(default_factory=dict)

    @property
    def active(self) -> bool:
        """Queued or running."""
        return self.status in ACTIVE_STATES


def _loads(text: str | None, default: object) -> Any:
    return json.loads(text) if text else default


def _job(row: sqlite3.Row) -> Job:
    return Job(
        id=row["id"], seq=int(row["seq"]), owner=row["owner"],
        kind=cast(JobKind, row["kind"]), model=row["model"],
        status=cast(JobStatus, row["status"]), created=row["created"],
        options=_loads(row["options"], {}), inputs=_loads(row["inputs"], {}),
        progress=float(row["progress"]), started=row["started"], finished=row["finished"],
        error=row["error"], attempts=int(row["attempts"]),
        cancel_requested=bool(row["cancel_requested"]), deleted=bool(row["deleted"]),
        outputs=_loads(row["outputs"], []), result=_loads(row["result"], {}))


def _maybe_job(row: sqlite3.Row | None) -> Job | None:
    return None if row is None else _job(row)


class Database:
    """The server's SQLite store. Safe to share between threads; open a new instance in
    each process."""

    def __init__(self, path: str | Path, *, timeout: float = 30.0) -> None:
        self.path = Path(path)
        self.timeout = float(timeout)
        self._local = threading.local()

    # -- connections -------------------------------------------------------------------
    def connect(self) -> sqlite3.Connection:
        conn = getattr(self._local, "conn", None)
        if conn is None:
            conn = sqlite3.connect(self.path, timeout=self.timeout, isolation_level=None,
                                   check_same_thread=False)
            conn.row_factory = sqlite3.Row
            conn.execute(f"PRAGMA busy_timeout = {int(self.timeout * 1000)}")
            conn.execute("PRAGMA foreign_keys = ON")
            conn.execute("PRAGMA synchronous = NORMAL")
            self._local.conn = conn
        return conn

    def close(self) -> None:
        conn = getattr(self._local, "conn", None)
        if conn is not None:
            conn.close()
            self._local.conn = None

    @contextmanager
    def transaction(self, immediate: bool = True) -> Iterator[sqlite3.Connection]:
        """A write transaction (``BEGIN IMMEDIATE``: the write lock is taken up front)."""
        conn = self.connect()
        conn.execute("BEGIN IMMEDIATE" if immediate else "BEGIN")
        try:
            yield conn
        except BaseException:
            conn.execute("ROLLBACK")
            raise
        conn.execute("COMMIT")

    def initialize(self) -> None:
        """Create the file and tables (idempotent) and switch the journal to WAL."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        conn = self.connect()
        mode = conn.execute("PRAGMA journal_mode = WAL").fetchone()[0]
        if str(mode).lower() != "wal":  # pragma: no cover - e.g. a network file system
            raise RuntimeError(f"cannot use WAL journal mode on {self.path} (got {mode})")
        conn.executescript(SCHEMA)

    def check_writable(self) -> None:
        """Raise if the database cannot be written (readiness probe)."""
        with self.transaction() as conn:
            conn.execute("INSERT INTO meta(key, value) VALUES ('heartbeat', ?) "
                         "ON CONFLICT(key) DO UPDATE SET value = excluded.value", (utcnow(),))

    # -- keys --------------------------------------------------------------------------
    def insert_key(self, key_id: str, name: str, digest: str, is_admin: bool) -> KeyRow:
        with self.transaction() as conn:
            conn.execute("INSERT INTO keys(id, name, hash, is_admin, created) "
                         "VALUES (?, ?, ?, ?, ?)", (key_id, name, digest, int(is_admin), utcnow()))
        row = self.get_key(key_id)
        if row is None:  # pragma: no cover - inserted just above
            raise RuntimeError(f"key {key_id} vanished")
        return row

    def get_key(self, key_id: str) -> KeyRow | None:
        row = self.connect().execute("SELECT * FROM keys WHERE id = ?", (key_id,)).fetchone()
        return dict(row) if row else None

    def find_key(self, name_or_id: str) -> KeyRow | None:
        row = self.connect().execute(
            "SELECT * FROM keys WHERE id = ? OR name = ? ORDER BY id = ? DESC LIMIT 1",
            (name_or_id, name_or_id, name_or_id)).fetchone()
        return dict(row) if row else None

    def list_keys(self) -> list[KeyRow]:
        rows = self.connect().execute("SELECT * FROM keys ORDER BY rowid").fetchall()
        return [dict(r) for r in rows]

    def revoke_key(self, key_id: str) -> bool:
        with self.transaction() as conn:
            cur = conn.execute("UPDATE keys SET revoked = ? WHERE id = ? AND revoked IS NULL",
                               (utcnow(), key_id))
        return cur.rowcount > 0

    # -- jobs --------------------------------------------------------------------------
    @staticmethod
    def new_job_id() -> str:
        return uuid.uuid4().hex

    def count_active(self, owner: str) -> int:
        row = self.connect().execute(
            "SELECT COUNT(*) FROM jobs WHERE owner = ? AND status IN ('queued', 'running')",
            (owner,)).fetchone()
        return int(row[0])

    def insert_job(self, job_id: str, *, owner: str, kind: JobKind, model: str,
                   options: dict[str, Any], inputs: dict[str, str],
                   max_active: int | None = None) -> Job | None:
        """Insert a queued job; returns None (and inserts nothing) when ``owner`` already
        has ``max_active`` queued or running jobs."""
        with self.transaction() as conn:
            if max_active is not None:
                active = conn.execute(
                    "SELECT COUNT(*) FROM jobs WHERE owner = ? AND status IN "
                    "('queued', 'running')", (owner,)).fetchone()[0]
                if active >= max_active:
                    return None
            conn.execute(
                "INSERT INTO jobs(id, owner, kind, model, options, inputs, status, created) "
                "VALUES (?, ?, ?, ?, ?, ?, 'queued', ?)",
                (job_id, owner, kind, model, json.dumps(options), json.dumps(inputs), utcnow()))
        return self.get_job(job_id)

    def get_job(self, job_id: str) -> Job | None:
        return _maybe_job(self.connect().execute("SELECT * FROM jobs WHERE id = ?",
                                           (job_id,)).fetchone())

    def list_jobs(self, owner: str | None, *, limit: int, offset: int = 0,
                  before_seq: int | None = None, kind: str | None = None,
                  status: str | None = None) -> tuple[list[Job], int]:
        """Jobs newest first (by insertion order), and the total count matching the
        filters (ignoring paging)."""
        where, args = ["deleted = 0"], list[object]()
        if owner is not None:
            where.append("owner = ?")
            args.append(owner)
        if kind is not None:
            where.append("kind = ?")
            args.append(kind)
        if status is not None:
            where.append("status = ?")
            args.append(status)
        conn = self.connect()
        total = conn.execute(f"SELECT COUNT(*) FROM jobs WHERE {' AND '.join(where)}",
                             args).fetchone()[0]
        if before_seq is not None:
            where.append("seq < ?")
            args.append(before_seq)
        rows = conn.execute(
            f"SELECT * FROM jobs WHERE {' AND '.join(where)} ORDER BY seq DESC "
            "LIMIT ? OFFSET ?", [*args, limit, offset]).fetchall()
        return [_job(r) for r in rows], int(total)

    def jobs_with_status(self, *statuses: str) -> list[Job]:
        marks = ",".join("?" * len(statuses))
        rows = self.connect().execute(
            f"SELECT * FROM jobs WHERE status IN ({marks}) ORDER BY seq", statuses).fetchall()
        return [_job(r) for r in rows]

    def dictionaries_used_by(self, owner: str) -> set[str]:
        """Names of the dictionaries the succeeded jobs of ``owner`` used (or built)."""
        rows = self.connect().execute(
            "SELECT result FROM jobs WHERE owner = ? AND status = 'succeeded'",
            (owner,)).fetchall()
        names = set()
        for (text,) in rows:
            try:
                name = json.loads(text or "{}").get("dictionary")
            except (ValueError, AttributeError):
                continue
            if isinstance(name, str):
                names.add(name)
        return names

    def all_job_ids(self) -> set[str]:
        return {r[0] for r in self.connect().execute("SELECT id FROM jobs").fetchall()}

    def next_queued(self, exclude: set[str] | frozenset[str] = frozenset()) -> Job | None:
        rows = self.connect().execute(
            "SELECT * FROM jobs WHERE status = 'queued' AND cancel_requested = 0 "
            "ORDER BY seq LIMIT ?", (len(exclude) + 1,)).fetchall()
        for row in rows:
            if row["id"] not in exclude:
                return _job(row)
        return None

    def claim(self, job_id: str) -> bool:
        """queued -> running (attempts + 1, started now); False if no longer queued."""
        with self.transaction() as conn:
            cur = conn.execute(
                "UPDATE jobs SET status = 'running', attempts = attempts + 1, started = ?, "
                "progress = 0, error = NULL WHERE id = ? AND status = 'queued' "
                "AND cancel_requested = 0", (utcnow(), job_id))
        return cur.rowcount > 0

    def set_progress(self, job_id: str, fraction: float) -> None:
        fraction = min(max(float(fraction), 0.0), 1.0)
        with self.transaction() as conn:
            conn.execute("UPDATE jobs SET progress = MAX(progress, ?) WHERE id = ? "
                         "AND status = 'running'", (fraction, job_id))

    def finish(self, job_id: str, status: FinalStatus, *, error: str | None = None,
               outputs: list[str] | None = None, result: dict[str, Any] | None = None,
               from_states: tuple[str, ...] = ACTIVE_STATES) -> bool:
        """Move an active job to a final state; False if it was not in ``from_states``."""
        if status not in FINAL_STATES:
            raise ValueError(f"not a final state: {status}")
        sets = ["status = ?", "finished = ?", "error = ?"]
        args: list[object] = [status, utcnow(), error]
        if status == "succeeded":
            sets.append("progress = 1")
        if outputs is not None:
            sets.append("outputs = ?")
            args.append(json.dumps(outputs))
        if result is not None:
            sets.append("result = ?")
            args.append(json.dumps(result))
        marks = ",".join("?" * len(from_states))
        with self.transaction() as conn:
            cur = conn.execute(
                f"UPDATE jobs SET {', '.join(sets)} WHERE id = ? AND status IN ({marks})",
                [*args, job_id, *from_states])
        return cur.rowcount > 0

    def requeue(self, job_id: str, note: str | None = None, *,
                refund_attempt: bool = False) -> bool:
        """running -> queued (after an interruption that was not the job's fault);
        ``refund_attempt`` does not count the interrupted run against the attempt limit."""
        refund = ", attempts = MAX(attempts - 1, 0)" if refund_attempt else ""
        with self.transaction() as conn:
            cur = conn.execute(
                "UPDATE jobs SET status = 'queued', progress = 0, started = NULL, "
                f"error = ?{refund} WHERE id = ? AND status = 'running'", (note, job_id))
        return cur.rowcount > 0

    def request_cancel(self, job_id: str) -> Job | None:
        """Flag a job for cancellation; a queued job is cancelled at once."""
        with self.transaction() as conn:
            conn.execute("UPDATE jobs SET cancel_requested = 1 WHERE id = ? AND status IN "
                         "('queued', 'running')", (job_id,))
            conn.execute("UPDATE jobs SET status = 'cancelled', finished = ?, "
                         "error = 'cancelled by the owner' WHERE id = ? AND status = 'queued'",
                         (utcnow(), job_id))
        return self.get_job(job_id)

    def mark_deleted(self, job_id: str) -> None:
        with self.transaction() as conn:
            conn.execute("UPDATE jobs SET deleted = 1, outputs = '[]' WHERE id = ?", (job_id,))
