"""``effinfer sweep``: grid expansion, a run killed with SIGKILL and resumed stores each result once."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from effinfer.core.errors import ExperimentError
from effinfer.evaluation.store import ResultsStore
from effinfer.plugins.system.serving.sweep import Ledger, SweepFile, expand, pending, run_key


def _sweep_file(tmp_path: Path, model_dir: Path) -> Path:
    sweep = {"name": "t", "models": [str(model_dir), str(tmp_path / "no-such-model")],
             "stacks": [[], ["rtn"]], "grid": {"rtn": {"bits": [2, 3, 4, 8]}},
             "base": {"generation": {"max_new_tokens": 3, "chat_template": False}, "prompts": ["hello"]}}
    path = tmp_path / "grid.yaml"
    path.write_text(yaml.safe_dump(sweep))
    return path


def test_grid_expands_to_one_experiment_per_combination_and_typos_are_all_reported(tmp_path):
    experiments = expand(SweepFile(models=["a", "b"], stacks=[[], ["rtn:bits=4"]],
                                   grid={"rtn": {"group_size": [16, 32, 64]}}))
    assert len(experiments) == 2 * (1 + 3)
    assert len({run_key(e) for e in experiments}) == 8
    with pytest.raises(ExperimentError) as error:
        expand(SweepFile(models=["a"], stacks=[["rtm"], ["rtn"]], grid={"rtn": {"bits": [5]}}))
    assert len(error.value.problems) == 2 and "rtm" in str(error.value) and "bits" in str(error.value)


def test_ledger_cuts_a_torn_last_line(tmp_path):
    path = tmp_path / "results.jsonl"
    path.write_text(json.dumps({"key": "a", "status": "ok"}) + "\n" + '{"key": "b", "sta')
    ledger = Ledger(path)
    ledger.append({"key": "c", "status": "ok"})
    assert [r["key"] for r in ledger.records()] == ["a", "c"]


@pytest.mark.parametrize("runner", ["local", pytest.param("ray", marks=pytest.mark.slow)])
def test_a_sweep_killed_with_sigkill_and_resumed_stores_each_run_exactly_once(tmp_path, tiny_model_dir, runner):
    if runner == "ray":
        pytest.importorskip("ray")
    path = _sweep_file(tmp_path, tiny_model_dir)
    expected = {run_key(e) for e in expand(SweepFile.model_validate(yaml.safe_load(path.read_text())))}
    assert len(expected) == 10
    ledger = tmp_path / "grid.results" / "results.jsonl"
    command = [sys.executable, "-m", "effinfer.core.cli", "sweep", str(path), "--runner", runner]
    database = tmp_path / "results.db"
    env = dict(os.environ, PYTHONUNBUFFERED="1", EFFINFER_RESULTS=str(database))
    # its own process group, so that SIGKILL takes the sweep and (with Ray) the local Ray processes it started
    first = subprocess.Popen(command, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                             start_new_session=True)
    deadline = time.time() + 120
    while time.time() < deadline and first.poll() is None:
        if ledger.exists() and ledger.read_text().count("\n") >= 2:
            break
        time.sleep(0.02)
    os.killpg(first.pid, signal.SIGKILL)
    first.wait()
    stored = ledger.read_text().count("\n")
    assert 2 <= stored < 10, f"the first pass should be killed mid-way (stored {stored})"
    second = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)
    assert second.returncode == 0, second.stderr[-2000:]
    assert f"{stored} already stored" in second.stderr
    records = [json.loads(line) for line in ledger.read_text().splitlines()]
    keys = [r["key"] for r in records]
    assert sorted(keys) == sorted(expected), "each run exactly once"
    ok = [r for r in records if r["status"] == "ok"]
    failed = [r for r in records if r["status"] == "failed"]
    assert len(ok) == 5 and len(failed) == 5  # the missing model fails its 5 runs; the others still ran
    assert all("no-such-model" in r["error"] for r in failed)
    assert pending(expand(SweepFile.model_validate(yaml.safe_load(path.read_text()))), Ledger(ledger)) == []
    with ResultsStore(database) as results:  # the results store holds each run once too
        stored_runs = [r for r in results.runs() if r.suite == "sweep:t"]
    assert sorted(r.key for r in stored_runs) == sorted(f"sweep:{k}" for k in expected)
    assert sum(r.ok for r in stored_runs) == 5
    assert all(r.value("generation.decode_tok_s") > 0 for r in stored_runs if r.ok)
