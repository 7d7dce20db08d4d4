"""The SQLite results store: schema, round trip, failures, the default location."""

from __future__ import annotations

import sqlite3

import pytest

from effinfer.evaluation.records import RunRecord, StackSpec
from effinfer.evaluation.store import SCHEMA_VERSION, ResultsStore, StoreError, default_store_path


def a_record(name: str = "rtn", status: str = "ok", **metrics: float) -> RunRecord:
    techniques = [] if name == "baseline" else [{"name": name, "config": {"bits": 4}}]
    record = RunRecord(spec=StackSpec(name=name, techniques=techniques), key=f"key-{name}", model="tiny",
                       suite="tiny", status=status, seconds=1.5, environment={"cpu": "test", "threads": 1},
                       notes=["model · rtn: quantized 3 layers"])
    for metric, value in metrics.items():
        record.add(metric, value)
    return record


def test_round_trip_keeps_every_field(tmp_path):
    path = tmp_path / "results.db"
    with ResultsStore(path) as store:
        bench = store.start_bench("tiny", "tiny", command="effinfer bench", environment={"cpu": "test"})
        record = a_record()
        record.bench_id = bench
        record.add("perplexity.wikipedia.token", 23.1, stderr=1.9, n=2044, unit="ppl", higher_is_better=False,
                   params={"window": 512})
        record.add("speed.p128_b1.decode_tok_s", 11.1, low=10.8, high=11.3, n=3, unit="tok/s")
        record.add("accuracy.mean.acc", 0.52, inherited=True, params={"reason": "untouched"})
        run_id = store.save_run(record)
        store.finish_bench(bench)
    with ResultsStore(path) as store:
        loaded = store.run(run_id)
        assert store.schema_version == SCHEMA_VERSION
        assert store.benches()[0]["finished"] is not None
    assert loaded.from_store and loaded.run_id == run_id and loaded.bench_id == bench
    assert loaded.spec == record.spec and loaded.notes == record.notes
    assert loaded.environment == record.environment
    assert loaded.metrics == record.metrics


def test_failed_runs_are_stored_with_their_error_and_never_found_as_done(tmp_path):
    with ResultsStore(tmp_path / "r.db") as store:
        failed = a_record(status="failed")
        failed.error = "RuntimeError: boom"
        store.save_run(failed)
        assert store.find_ok(failed.key) is None
        assert store.runs(status="failed")[0].error == "RuntimeError: boom"
        store.save_run(a_record(**{"x": 1.0}))
        assert store.find_ok(failed.key).value("x") == 1.0


def test_wal_mode_and_one_transaction_per_run(tmp_path):
    path = tmp_path / "r.db"
    with ResultsStore(path) as store:
        bad = a_record(x=1.0)
        bad.metrics["x"].params["unserializable"] = object()  # stored as its repr: still one transaction
        store.save_run(bad)
    raw = sqlite3.connect(path)
    assert raw.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    assert raw.execute("SELECT COUNT(*) FROM runs").fetchone()[0] == 1


def test_a_failing_insert_leaves_nothing_behind(tmp_path):
    """The run row and its metrics go in one transaction: a failure on the metrics rolls back the run."""
    with ResultsStore(tmp_path / "r.db") as store:
        record = a_record(x=1.0, y=2.0)
        original = store._db

        class Failing:
            def __getattr__(self, name):
                return getattr(original, name)

            def executemany(self, *args):
                raise sqlite3.OperationalError("disk full")

        store._db = Failing()
        with pytest.raises(sqlite3.OperationalError):
            store.save_run(record)
        store._db = original
        assert store.runs() == []


def test_newer_schema_is_refused(tmp_path):
    path = tmp_path / "r.db"
    ResultsStore(path).close()
    raw = sqlite3.connect(path)
    raw.execute("UPDATE meta SET value = '99' WHERE key = 'schema_version'")
    raw.commit()
    raw.close()
    with pytest.raises(StoreError, match="newer"):
        ResultsStore(path)


def test_default_path_follows_the_environment(tmp_path, monkeypatch):
    monkeypatch.setenv("EFFINFER_RESULTS", str(tmp_path / "x" / "r.db"))
    assert default_store_path() == tmp_path / "x" / "r.db"
    monkeypatch.delenv("EFFINFER_RESULTS")
    monkeypatch.setenv("EFFINFER_CACHE", str(tmp_path / "cache"))
    assert default_store_path() == tmp_path / "cache" / "results" / "effinfer.db"


def test_bench_runs_link_their_baseline(tmp_path):
    with ResultsStore(tmp_path / "r.db") as store:
        bench = store.start_bench("tiny", "tiny")
        for record in (a_record("baseline", x=1.0), a_record("rtn", x=3.0)):
            record.bench_id = bench
            store.save_run(record)
        runs = store.bench_runs(bench)
    assert [r.name for r in runs] == ["baseline", "rtn"]
    assert runs[1].baseline.name == "baseline" and runs[1].delta("x") == 2.0


def test_terminal_table_keeps_brackets_in_stack_names():
    from rich.console import Console

    from effinfer.evaluation.report import rich_table

    record = a_record("draft_model:techniques=[rtn:bits=4]")
    console = Console(width=300, record=True)
    console.print(rich_table([record]))
    assert "draft_model:techniques=[rtn:bits=4]" in console.export_text()
