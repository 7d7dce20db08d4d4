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


# ---------------------------------------------------------------- bench state (issue 11 item 7)


def test_a_bench_closed_while_an_exception_propagates_is_interrupted(tmp_path):
    with ResultsStore(tmp_path / "r.db") as store:
        done = store.start_bench("tiny", "tiny")
        store.finish_bench(done)
        broken = store.start_bench("tiny", "tiny")
        with pytest.raises(KeyboardInterrupt):
            try:
                raise KeyboardInterrupt
            finally:
                store.finish_bench(broken)  # what the evaluator's close() does on the way out
        try:  # an exception being handled when the bench opened is no sign of interruption
            raise ValueError("handled before the bench")
        except ValueError:
            inside = store.start_bench("tiny", "tiny")
            store.finish_bench(inside)
        assert {b["id"]: b["status"] for b in store.benches()} == {done: "finished", broken: "interrupted",
                                                                   inside: "finished"}


def test_a_bench_left_open_is_interrupted_when_its_store_closes(tmp_path):
    store = ResultsStore(tmp_path / "r.db")
    bench = store.start_bench("tiny", "tiny")
    store.close()
    with ResultsStore(tmp_path / "r.db") as again:
        assert again.bench_status(bench) == "interrupted"


def test_a_running_bench_whose_process_died_is_settled_as_interrupted(tmp_path):
    """kill -9 leaves the row 'running'; the next reader sees its pid is gone."""
    import subprocess
    import sys

    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    pid = int(dead.stdout)
    with ResultsStore(tmp_path / "r.db") as store:
        bench = store.start_bench("tiny", "tiny")
        record = a_record()
        record.bench_id = bench
        store.save_run(record)
    raw = sqlite3.connect(tmp_path / "r.db")  # what a killed process leaves behind
    raw.execute("UPDATE benches SET status = 'running', finished = NULL, pid = ? WHERE id = ?", (pid, bench))
    live = raw.execute("INSERT INTO benches (started, suite, model, status, pid, host) "
                       "SELECT started, suite, model, 'running', ?, host FROM benches WHERE id = ?",
                       (__import__("os").getpid(), bench)).lastrowid
    raw.commit()
    raw.close()
    with ResultsStore(tmp_path / "r.db") as store:
        statuses = {b["id"]: (b["status"], b["runs"]) for b in store.benches()}
        assert statuses == {bench: ("interrupted", 1), live: ("running", 0)}  # this process is alive
        assert store.find_ok(record.key) is not None  # what it measured is kept, so a rerun resumes


def test_version_1_databases_are_upgraded(tmp_path):
    path = tmp_path / "old.db"
    raw = sqlite3.connect(path)
    raw.executescript("""
        CREATE TABLE meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
        INSERT INTO meta VALUES ('schema_version', '1');
        CREATE TABLE benches (id INTEGER PRIMARY KEY AUTOINCREMENT, started TEXT NOT NULL, finished TEXT,
            suite TEXT NOT NULL, model TEXT NOT NULL, command TEXT NOT NULL DEFAULT '',
            environment TEXT NOT NULL DEFAULT '{}');
        INSERT INTO benches (started, finished, suite, model) VALUES ('2026-01-01', '2026-01-01', 'q', 'm');
        INSERT INTO benches (started, finished, suite, model) VALUES ('2026-01-02', NULL, 'q', 'm');
    """)
    raw.commit()
    raw.close()
    with ResultsStore(path) as store:
        assert store.schema_version == SCHEMA_VERSION == 2
        assert [b["status"] for b in store.benches()] == ["interrupted", "finished"]


def test_each_store_has_its_own_id(tmp_path):
    with ResultsStore(tmp_path / "a.db") as a, ResultsStore(tmp_path / "b.db") as b:
        first, second = a.store_id, b.store_id
    assert first != second and len(first) == 12
    with ResultsStore(tmp_path / "a.db", read_only=True) as again:
        assert again.store_id == first


@pytest.mark.parametrize("content", [b"not a database at all", b"\x00" * 64])
def test_a_file_that_is_not_a_database_is_refused_and_kept(tmp_path, content):
    path = tmp_path / "r.db"
    path.write_bytes(content)
    with pytest.raises(StoreError, match="not an effinfer results database"):
        ResultsStore(path)
    assert path.read_bytes() == content


def test_an_interrupted_sweep_is_recorded_and_resumed(tmp_path, tiny):
    """Ctrl-C in the middle of a sweep: the bench is interrupted, what was measured is kept, and the
    same sweep run again measures only the rest."""
    import types

    from effinfer.core import Technique, hookimpl
    from effinfer.core.registry import build_registry
    from effinfer.evaluation import Evaluator, get_suite

    class CtrlC(Technique):
        """Presses Ctrl-C while its stack is being set up."""

        name = "ctrl_c"
        node = "model.compression.quantization.ptq.weight_only"
        armed = True

        @hookimpl
        def effinfer_transform_model(self, stage):
            if CtrlC.armed:
                raise KeyboardInterrupt

    @hookimpl
    def effinfer_register_techniques(register):
        register(CtrlC)

    plugin = types.SimpleNamespace(effinfer_register_techniques=effinfer_register_techniques)
    registry = build_registry(extra_plugins=[(plugin, "ctrl-c")])
    suite = get_suite("tiny").model_copy(update={"tasks": None, "generation": None, "roofline": None,
                                                 "speed": None, "fidelity": None})
    stacks = [[], ["rtn:bits=8"], ["ctrl_c"], ["rtn:bits=4"]]
    db = tmp_path / "r.db"
    with pytest.raises(KeyboardInterrupt), Evaluator(tiny, suite=suite, store=db, registry=registry,
                                                     model_name="tiny") as ev:
        ev.sweep(stacks)
    with ResultsStore(db) as store:
        [first] = store.benches()
        assert first["status"] == "interrupted" and first["runs"] == 2  # baseline and rtn:bits=8
    CtrlC.armed = False
    with Evaluator(tiny, suite=suite, store=db, registry=registry, model_name="tiny") as ev:
        again = ev.sweep(stacks)
    assert [r.name for r in again.runs if r.from_store] == ["rtn:bits=8"] or \
        [r.name for r in again.runs if r.from_store] == ["baseline", "rtn:bits=8"]
    assert [r.status for r in again.runs] == ["ok"] * 4
    with ResultsStore(db) as store:
        assert [b["status"] for b in store.benches()] == ["finished", "interrupted"]
