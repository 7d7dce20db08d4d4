"""The results store: every run in one SQLite database (schema versioned, WAL, one transaction per run).

Tables::

    meta(key, value)                      schema_version
    benches(id, started, finished, suite, model, command, environment)
    runs(id, bench_id, key, name, baseline, spec, model, suite, status, error, started,
         seconds, notes, environment)
    metrics(run_id, name, value, stderr, low, high, n, unit, higher_is_better, inherited, params)

``runs.key`` identifies *what* was measured (model, suite fingerprint, stack, runtime,
machine); a sweep skips a stack whose key already has an ``ok`` run. The default database
is ``$EFFINFER_RESULTS`` or ``<cache>/results/effinfer.db`` (``<cache>`` is
``$EFFINFER_CACHE`` or ``~/.cache/effinfer``).
"""

from __future__ import annotations

import json
import os
import sqlite3
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from effinfer.data.cache import cache_dir
from effinfer.evaluation.records import Metric, RunRecord, StackSpec

RESULTS_ENV = "EFFINFER_RESULTS"
SCHEMA_VERSION = 1

_SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS benches (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    started TEXT NOT NULL, finished TEXT, suite TEXT NOT NULL, model TEXT NOT NULL,
    command TEXT NOT NULL DEFAULT '', environment TEXT NOT NULL DEFAULT '{}'
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


class StoreError(RuntimeError):
    """The results database cannot be used as it is."""


def default_store_path() -> Path:
    """``$EFFINFER_RESULTS`` or ``<cache>/results/effinfer.db``."""
    configured = os.environ.get(RESULTS_ENV)
    return Path(configured).expanduser() if configured else cache_dir() / "results" / "effinfer.db"


def now() -> str:
    """The current UTC time, ISO 8601, to the second."""
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


class ResultsStore:
    """A SQLite results database; ``ResultsStore(":memory:")`` keeps everything in memory."""

    def __init__(self, path: str | Path | None = None) -> None:
        self.path = str(path) if path is not None else str(default_store_path())
        if self.path != ":memory:":
            Path(self.path).parent.mkdir(parents=True, exist_ok=True)
        self._db = sqlite3.connect(self.path, timeout=30.0, isolation_level=None)  # explicit transactions
        self._db.row_factory = sqlite3.Row
        self._db.execute("PRAGMA foreign_keys = ON")
        if self.path != ":memory:":
            self._db.execute("PRAGMA journal_mode = WAL")
        self._migrate()

    @classmethod
    def open(cls, store: ResultsStore | str | Path | None) -> ResultsStore:
        """A store from a store, a path, or ``None`` (the default database)."""
        return store if isinstance(store, ResultsStore) else cls(store)

    def close(self) -> None:
        self._db.close()

    def __enter__(self) -> ResultsStore:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # ------------------------------------------------------------------ schema

    def _migrate(self) -> None:
        self._db.executescript(_SCHEMA)  # idempotent: CREATE ... IF NOT EXISTS
        row = self._db.execute("SELECT value FROM meta WHERE key = 'schema_version'").fetchone()
        if row is None:
            with self._transaction() as db:
                db.execute("INSERT INTO meta VALUES ('schema_version', ?)", (str(SCHEMA_VERSION),))
        elif int(row["value"]) > SCHEMA_VERSION:
            raise StoreError(
                f"{self.path} has schema version {row['value']}, newer than this effinfer understands "
                f"({SCHEMA_VERSION}); upgrade effinfer or point {RESULTS_ENV} at another database"
            )

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
        """Open a bench (one sweep); returns its id."""
        with self._transaction() as db:
            cursor = db.execute(
                "INSERT INTO benches (started, suite, model, command, environment) VALUES (?, ?, ?, ?, ?)",
                (now(), suite, model, command, json.dumps(environment or {}, default=str)),
            )
        return int(cursor.lastrowid)

    def finish_bench(self, bench_id: int) -> None:
        with self._transaction() as db:
            db.execute("UPDATE benches SET finished = ? WHERE id = ?", (now(), bench_id))

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
        """Benches, newest first, with their number of runs and failures."""
        sql = ("SELECT b.*, COUNT(r.id) AS runs, SUM(r.status = 'failed') AS failed FROM benches b "
               "LEFT JOIN runs r ON r.bench_id = b.id GROUP BY b.id ORDER BY b.id DESC")
        if limit is not None:
            sql += f" LIMIT {int(limit)}"
        rows = self._db.execute(sql).fetchall()
        return [dict(row) | {"environment": json.loads(row["environment"]), "failed": row["failed"] or 0}
                for row in rows]

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
