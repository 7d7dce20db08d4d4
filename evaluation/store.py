"""The results store: every run in one SQLite database (schema versioned, WAL, one transaction per run).

Tables::

    meta(key, value)                      schema_version, store_id
    benches(id, started, finished, suite, model, command, environment, status, pid, host, heartbeat)
    runs(id, bench_id, key, name, baseline, spec, model, suite, status, error, started,
         seconds, notes, environment)
    metrics(run_id, name, value, stderr, low, high, n, unit, higher_is_better, inherited, params)

``runs.key`` identifies *what* was measured (model, suite fingerprint, stack, runtime,
machine); a sweep skips a stack whose key already has an ``ok`` run, so rerunning an
interrupted bench measures only what it had not stored. A bench is ``running`` while its
process lives (``pid``, ``host``, ``heartbeat`` at every stored run), then ``finished`` or
``interrupted`` (Ctrl-C, an error, or a process that died without closing it: readers
mark a ``running`` bench whose process is gone as ``interrupted``). The default database
is ``$EFFINFER_RESULTS`` or ``<cache>/results/effinfer.db`` (``<cache>`` is
``$EFFINFER_CACHE`` or ``~/.cache/effinfer``).
"""

from __future__ import annotations

import hashlib
import json
import os
import socket
import sqlite3
import sys
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from effinfer.core.errors import EffinferError
from effinfer.data.cache import cache_dir
from effinfer.evaluation.records import Metric, RunRecord, StackSpec

RESULTS_ENV = "EFFINFER_RESULTS"
SCHEMA_VERSION = 2
#: a ``running`` bench on another host whose heartbeat is older than this is taken as interrupted
STALE_HEARTBEAT_S = 24 * 3600

_SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS benches (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    started TEXT NOT NULL, finished TEXT, suite TEXT NOT NULL, model TEXT NOT NULL,
    command TEXT NOT NULL DEFAULT '', environment TEXT NOT NULL DEFAULT '{}',
    status TEXT NOT NULL DEFAULT 'running', pid INTEGER, host TEXT, heartbeat TEXT
);
CREATE TABLE IF NOT EXISTS runs (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    bench_id INTEGER REFERENCES benches(id),
    key TEXT NOT NULL, name TEXT NOT NULL, baseline INTEGER NOT NULL,
    spec TEXT NOT NULL, model TEXT NOT NULL, suite TEXT NOT NULL,
    status TEXT NOT NULL CHECK (status IN ('ok', 'failed')), error TEXT,
    started TEXT NOT NULL, seconds REAL NOT NULL,
    notes TEXT NOT NULL DEFAULT '[]', environment TEXT NOT NULL DEFAULT '{}'
);
CREATE INDEX IF NOT EXISTS runs_key ON runs(key, status);
CREATE INDEX IF NOT EXISTS runs_bench ON runs(bench_id);
CREATE TABLE IF NOT EXISTS metrics (
    run_id INTEGER NOT NULL REFERENCES runs(id) ON DELETE CASCADE,
    name TEXT NOT NULL, value REAL NOT NULL, stderr REAL, low REAL, high REAL, n INTEGER,
    unit TEXT NOT NULL DEFAULT '', higher_is_better INTEGER, inherited INTEGER NOT NULL DEFAULT 0,
    params TEXT NOT NULL DEFAULT '{}',
    PRIMARY KEY (run_id, name)
);
"""


#: columns added to ``benches`` by schema version 2 (bench state), with their SQL type
_BENCH_STATE_COLUMNS = {"status": "TEXT NOT NULL DEFAULT 'running'", "pid": "INTEGER", "host": "TEXT",
                        "heartbeat": "TEXT"}


class StoreError(EffinferError, RuntimeError):
    """The results database cannot be used as it is."""


class StoreNotWritable(StoreError):
    """The results database (or its folder) cannot be written; it may still be read."""


def default_store_path() -> Path:
    """``$EFFINFER_RESULTS`` or ``<cache>/results/effinfer.db``."""
    configured = os.environ.get(RESULTS_ENV)
    return Path(configured).expanduser() if configured else cache_dir() / "results" / "effinfer.db"


def now() -> str:
    """The current UTC time, ISO 8601, to the second."""
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


class ResultsStore:
    """A SQLite results database; ``ResultsStore(":memory:")`` keeps everything in memory."""

    def __init__(self, path: str | Path | None = None, *, read_only: bool = False) -> None:
        self.path = str(path) if path is not None else str(default_store_path())
        self.read_only = read_only
        if self.path != ":memory:":
            self._check_path(Path(self.path))
        try:
            self._db = self._connect()
            self._migrate()
        except sqlite3.DatabaseError as error:
            raise self._unusable(error) from None
        #: benches this object opened and has not closed (interrupted on close), with the
        #: exception being handled when each was opened (not a sign of interruption)
        self._open_benches: dict[int, BaseException | None] = {}
        #: every bench this object opened, in order
        self.opened: list[int] = []

    def _connect(self) -> sqlite3.Connection:
        if self.read_only and self.path != ":memory:":
            uri = f"{Path(self.path).resolve().as_uri()}?mode=ro"
            try:
                db = sqlite3.connect(uri, uri=True, timeout=30.0, isolation_level=None)
                db.execute("SELECT 1 FROM meta LIMIT 1")
            except sqlite3.OperationalError:  # a WAL database in a folder we cannot write: read it as it is
                db = sqlite3.connect(uri + "&immutable=1", uri=True, timeout=30.0, isolation_level=None)
        else:
            db = sqlite3.connect(self.path, timeout=30.0, isolation_level=None)  # explicit transactions
        db.row_factory = sqlite3.Row
        db.execute("PRAGMA foreign_keys = ON")
        if self.path != ":memory:" and not self.read_only:
            db.execute("PRAGMA journal_mode = WAL")
        return db

    def _check_path(self, path: Path) -> None:
        """Refuse, with the fix, a path that cannot hold a database (before SQLite says something vague)."""
        if path.is_dir():
            raise StoreError(f"the results database {path} is a folder; give a file path, e.g. {path / 'effinfer.db'}")
        if self.read_only:
            if not path.is_file():
                raise StoreError(f"no results database at {path}; run `effinfer bench` first or pass --store")
            return
        parent = next((p for p in path.parents if p.exists()), None)
        if parent is not None and not parent.is_dir():
            raise StoreError(f"cannot create the results database {path}: {parent} is a file, not a folder; "
                             "pass --store (or set EFFINFER_RESULTS) with a path in a folder")
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
        except OSError as error:
            raise StoreNotWritable(f"cannot create the folder of the results database {path} ({error.strerror}); "
                             "pass --store (or set EFFINFER_RESULTS) with a writable path") from None
        if path.is_file() and path.stat().st_size:
            with open(path, "rb") as handle:
                if handle.read(16) != b"SQLite format 3\x00":
                    raise StoreError(f"{path} is not an effinfer results database (not a SQLite file); "
                                     "move it away or pass --store with another path")

    def _unusable(self, error: sqlite3.DatabaseError) -> StoreError:
        text = str(error)
        if "readonly" in text or "unable to open" in text or "read-only" in text:
            return StoreNotWritable(f"the results database {self.path} is not writable ({text}); pass --store (or set "
                              f"{RESULTS_ENV}) with a writable path, or fix the file's permissions")
        return StoreError(f"the results database {self.path} is damaged or not a database ({text}); move it "
                          f"away (a new one is created) or pass --store with another path")

    @classmethod
    def for_reading(cls, path: str | Path | None = None) -> ResultsStore:
        """Open to read: writable when possible (to settle dead benches), else read-only."""
        try:
            return cls(path)
        except StoreNotWritable:
            return cls(path, read_only=True)

    @classmethod
    def open(cls, store: ResultsStore | str | Path | None) -> ResultsStore:
        """A store from a store, a path, or ``None`` (the default database)."""
        return store if isinstance(store, ResultsStore) else cls(store)

    def close(self) -> None:
        """Close the database; a bench this object opened and nobody finished is marked interrupted."""
        for bench_id in sorted(getattr(self, "_open_benches", {})):
            try:
                self.finish_bench(bench_id, "interrupted")
            except sqlite3.Error:  # closing must not hide the error that got us here
                pass
        self._db.close()

    def __enter__(self) -> ResultsStore:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # ------------------------------------------------------------------ schema

    def _migrate(self) -> None:
        if self.read_only:
            if self.schema_version < SCHEMA_VERSION:
                raise StoreError(f"{self.path} is read-only and has schema version {self.schema_version}; "
                                 "open it once writable (any `effinfer results` command) to upgrade it")
        else:
            self._db.executescript(_SCHEMA)  # idempotent: CREATE ... IF NOT EXISTS
            row = self._db.execute("SELECT value FROM meta WHERE key = 'schema_version'").fetchone()
            if row is None:
                with self._transaction() as db:
                    db.execute("INSERT INTO meta VALUES ('schema_version', ?)", (str(SCHEMA_VERSION),))
            elif int(row["value"]) < SCHEMA_VERSION:
                self._upgrade(int(row["value"]))
            if self.path != ":memory:":
                self.store_id  # noqa: B018 — given once, while the database is writable
        if self.schema_version > SCHEMA_VERSION:
            raise StoreError(
                f"{self.path} has schema version {self.schema_version}, newer than this effinfer understands "
                f"({SCHEMA_VERSION}); upgrade effinfer or point {RESULTS_ENV} at another database"
            )

    def _upgrade(self, version: int) -> None:
        """Version 1 → 2: bench state columns; a v1 bench never finished is recorded as interrupted."""
        columns = {row["name"] for row in self._db.execute("PRAGMA table_info(benches)")}
        with self._transaction() as db:
            for name, sql_type in _BENCH_STATE_COLUMNS.items():
                if name not in columns:
                    db.execute(f"ALTER TABLE benches ADD COLUMN {name} {sql_type}")
            if version < 2:
                db.execute("UPDATE benches SET status = CASE WHEN finished IS NULL THEN 'interrupted' "
                           "ELSE 'finished' END")
            db.execute("UPDATE meta SET value = ? WHERE key = 'schema_version'", (str(SCHEMA_VERSION),))

    @property
    def store_id(self) -> str:
        """A random id given to this database when first opened writable (names its report folders)."""
        row = self._db.execute("SELECT value FROM meta WHERE key = 'store_id'").fetchone()
        if row is not None:
            return str(row["value"])
        if self.read_only:
            return hashlib.sha256(str(Path(self.path).resolve()).encode()).hexdigest()[:12]
        with self._transaction() as db:
            db.execute("INSERT OR IGNORE INTO meta VALUES ('store_id', ?)", (uuid.uuid4().hex[:12],))
        return str(self._db.execute("SELECT value FROM meta WHERE key = 'store_id'").fetchone()["value"])

    @property
    def schema_version(self) -> int:
        return int(self._db.execute("SELECT value FROM meta WHERE key = 'schema_version'").fetchone()["value"])

    @contextmanager
    def _transaction(self) -> Iterator[sqlite3.Connection]:
        try:
            self._db.execute("BEGIN IMMEDIATE")
            yield self._db
            self._db.execute("COMMIT")
        except BaseException:
            self._db.execute("ROLLBACK")
            raise

    # ------------------------------------------------------------------ writing

    def start_bench(self, suite: str, model: str, command: str = "",
                    environment: dict[str, Any] | None = None) -> int:
        """Open a bench (one sweep) as ``running`` by this process; returns its id."""
        with self._transaction() as db:
            cursor = db.execute(
                "INSERT INTO benches (started, suite, model, command, environment, status, pid, host, heartbeat)"
                " VALUES (?, ?, ?, ?, ?, 'running', ?, ?, ?)",
                (now(), suite, model, command, json.dumps(environment or {}, default=str), os.getpid(),
                 _this_host(), now()),
            )
        bench_id = int(cursor.lastrowid)
        self._open_benches[bench_id] = sys.exc_info()[1]
        self.opened.append(bench_id)
        return bench_id

    def finish_bench(self, bench_id: int, status: str | None = None) -> None:
        """Close a bench as ``finished``, or ``interrupted``.

        Without ``status`` it is ``interrupted`` when called while an exception raised since the
        bench started is propagating (Ctrl-C, an error that ended the sweep: the evaluator
        closes its bench on the way out), ``finished`` otherwise.
        """
        if status is None:
            in_flight = sys.exc_info()[1]
            opened_in = self._open_benches.get(bench_id)
            status = "interrupted" if in_flight is not None and in_flight is not opened_in else "finished"
        if status not in ("finished", "interrupted"):
            raise StoreError(f"a bench ends finished or interrupted (got {status!r})")
        with self._transaction() as db:
            db.execute("UPDATE benches SET finished = ?, status = ?, heartbeat = ? WHERE id = ?",
                       (now(), status, now(), bench_id))
        self._open_benches.pop(bench_id, None)

    def bench_status(self, bench_id: int) -> str | None:
        """``running``, ``finished`` or ``interrupted`` (a dead ``running`` bench is settled first)."""
        row = self._db.execute("SELECT * FROM benches WHERE id = ?", (bench_id,)).fetchone()
        return None if row is None else self._settled(dict(row))["status"]

    def save_run(self, record: RunRecord) -> int:
        """Store a run and its metrics in one transaction; sets and returns ``record.run_id``."""
        if record.status not in ("ok", "failed"):
            raise StoreError(f"only ok or failed runs are stored (got status {record.status!r})")
        with self._transaction() as db:
            cursor = db.execute(
                "INSERT INTO runs (bench_id, key, name, baseline, spec, model, suite, status, error, started,"
                " seconds, notes, environment) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                (record.bench_id, record.key, record.name, int(record.is_baseline),
                 record.spec.model_dump_json(), record.model, record.suite, record.status, record.error,
                 record.started or now(), record.seconds, json.dumps(record.notes),
                 json.dumps(record.environment, default=str)),
            )
            run_id = int(cursor.lastrowid)
            if record.bench_id is not None:
                db.execute("UPDATE benches SET heartbeat = ? WHERE id = ? AND status = 'running'",
                           (now(), record.bench_id))
            db.executemany(
                "INSERT INTO metrics VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                [(run_id, name, m.value, m.stderr, m.low, m.high, m.n, m.unit,
                  None if m.higher_is_better is None else int(m.higher_is_better), int(m.inherited),
                  json.dumps(m.params, default=str)) for name, m in record.metrics.items()],
            )
        record.run_id = run_id
        return run_id

    # ------------------------------------------------------------------ reading

    def find_ok(self, key: str) -> RunRecord | None:
        """The newest successful run with this key, or ``None``."""
        row = self._db.execute("SELECT * FROM runs WHERE key = ? AND status = 'ok' ORDER BY id DESC LIMIT 1",
                               (key,)).fetchone()
        return self._record(row) if row else None

    def run(self, run_id: int) -> RunRecord:
        row = self._db.execute("SELECT * FROM runs WHERE id = ?", (run_id,)).fetchone()
        if row is None:
            raise StoreError(f"no run with id {run_id} in {self.path} (see `effinfer results list`)")
        return self._record(row)

    def runs(self, bench_id: int | None = None, name: str | None = None, status: str | None = None,
             limit: int | None = None) -> list[RunRecord]:
        """Runs, newest first, optionally of one bench, one stack name or one status."""
        clauses, args = [], []
        for column, value in (("bench_id", bench_id), ("name", name), ("status", status)):
            if value is not None:
                clauses.append(f"{column} = ?")
                args.append(value)
        sql = "SELECT * FROM runs" + (" WHERE " + " AND ".join(clauses) if clauses else "") + " ORDER BY id DESC"
        if limit is not None:
            sql += f" LIMIT {int(limit)}"
        return [self._record(row) for row in self._db.execute(sql, args).fetchall()]

    def benches(self, limit: int | None = None) -> list[dict[str, Any]]:
        """Benches, newest first, with their number of runs and failures and their status
        (``running``, ``finished``, ``interrupted``; a ``running`` bench whose process is gone
        is reported, and recorded when the database is writable, as ``interrupted``)."""
        sql = ("SELECT b.*, COUNT(r.id) AS runs, SUM(r.status = 'failed') AS failed FROM benches b "
               "LEFT JOIN runs r ON r.bench_id = b.id GROUP BY b.id ORDER BY b.id DESC")
        if limit is not None:
            sql += f" LIMIT {int(limit)}"
        rows = self._db.execute(sql).fetchall()
        return [self._settled(dict(row)) | {"environment": json.loads(row["environment"]), "failed": row["failed"] or 0}
                for row in rows]

    def _settled(self, row: dict[str, Any]) -> dict[str, Any]:
        """A ``running`` bench whose process is gone becomes ``interrupted`` (kill -9, power loss)."""
        if row.get("status") != "running" or row["id"] in self._open_benches or _alive(row):
            return row
        row["status"] = "interrupted"
        if not self.read_only:
            with self._transaction() as db:
                db.execute("UPDATE benches SET status = 'interrupted' WHERE id = ? AND status = 'running'",
                           (row["id"],))
        return row

    def latest_bench_id(self) -> int | None:
        row = self._db.execute("SELECT MAX(id) AS id FROM benches").fetchone()
        return row["id"]

    def bench_runs(self, bench_id: int) -> list[RunRecord]:
        """The runs of one bench in the order they were stored, each linked to its baseline.

        A bench whose stacks were all skipped has no baseline row; their stored baselines are
        loaded from the benches they were measured in.
        """
        records = list(reversed(self.runs(bench_id=bench_id)))
        baselines = {r.bench_id: r for r in records if r.is_baseline and r.ok}
        for record in records:
            if record.is_baseline:
                continue
            if record.bench_id not in baselines:
                baselines[record.bench_id] = self.baseline_of(record.bench_id)
            record.baseline = baselines[record.bench_id]
        return records

    def baseline_of(self, bench_id: int | None) -> RunRecord | None:
        """The successful baseline run of a bench, if it has one."""
        row = self._db.execute("SELECT * FROM runs WHERE bench_id IS ? AND baseline = 1 AND status = 'ok' "
                               "ORDER BY id DESC LIMIT 1", (bench_id,)).fetchone()
        return self._record(row) if row else None

    def _record(self, row: sqlite3.Row) -> RunRecord:
        metrics = {
            m["name"]: Metric(value=m["value"], stderr=m["stderr"], low=m["low"], high=m["high"], n=m["n"],
                              unit=m["unit"], inherited=bool(m["inherited"]), params=json.loads(m["params"]),
                              higher_is_better=None if m["higher_is_better"] is None else bool(m["higher_is_better"]))
            for m in self._db.execute("SELECT * FROM metrics WHERE run_id = ? ORDER BY name", (row["id"],))
        }
        return RunRecord(
            run_id=row["id"], bench_id=row["bench_id"], key=row["key"], spec=StackSpec.model_validate_json(row["spec"]),
            model=row["model"], suite=row["suite"], status=row["status"], error=row["error"], started=row["started"],
            seconds=row["seconds"], metrics=metrics, notes=json.loads(row["notes"]),
            environment=json.loads(row["environment"]), from_store=True,
        )


def _this_host() -> str:
    return socket.gethostname()


def _alive(row: dict[str, Any]) -> bool:
    """Whether the process that opened a ``running`` bench may still be running it."""
    if row.get("host") and row["host"] != _this_host():
        try:
            beat = datetime.fromisoformat(row.get("heartbeat") or row["started"])
        except ValueError:
            return False
        return (datetime.now(timezone.utc) - beat).total_seconds() < STALE_HEARTBEAT_S
    pid = row.get("pid")
    if not pid:
        return False
    try:
        os.kill(int(pid), 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's live process
        return True
    return True
