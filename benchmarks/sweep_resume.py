"""A Ray sweep killed with SIGKILL mid-way and resumed: each result ends in the ledger and the
results store exactly once.

    .venv/bin/python benchmarks/sweep_resume.py                       # examples/sweeps/rtn-grid.yaml, Ray
    .venv/bin/python benchmarks/sweep_resume.py --runner local --kill-after 2

Runs ``effinfer sweep GRID --runner ray`` in its own process group, SIGKILLs the group (the
sweep and the local Ray it started) once ``--kill-after`` results are in the ledger, runs the
same command again, then checks the ledger and the results store (a fresh database under
``--out``) against the grid's experiment keys, and prints and writes (``--out``/report.json) what
it saw. Correctness only: nothing here is timed.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def ledger_lines(path: Path) -> int:
    return path.read_text().count("\n") if path.exists() else 0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--grid", type=Path, default=ROOT / "examples" / "sweeps" / "rtn-grid.yaml")
    parser.add_argument("--runner", default="ray", choices=["ray", "local"])
    parser.add_argument("--kill-after", type=int, default=4, help="results in the ledger before the SIGKILL")
    parser.add_argument("--out", type=Path, default=ROOT / "artifacts" / "sweep_resume")
    args = parser.parse_args()

    from effinfer.evaluation.store import ResultsStore
    from effinfer.plugins.system.serving.sweep import expand, load_sweep, run_key

    sweep = load_sweep(args.grid)
    expected = sorted(run_key(e) for e in expand(sweep))
    if args.out.exists():
        for stale in ("results.jsonl", "results.db", "results.db-wal", "results.db-shm"):
            (args.out / stale).unlink(missing_ok=True)
    args.out.mkdir(parents=True, exist_ok=True)
    ledger = args.out / "results.jsonl"
    database = args.out / "results.db"
    command = [sys.executable, "-m", "effinfer.core.cli", "sweep", str(args.grid), "--runner", args.runner,
               "--out", str(args.out), "--store", str(database)]
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    print(f"{len(expected)} experiments; first pass, SIGKILL after {args.kill_after} results", flush=True)
    started = time.perf_counter()
    first = subprocess.Popen(command, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                             start_new_session=True)
    while first.poll() is None and ledger_lines(ledger) < args.kill_after:
        time.sleep(0.05)
    os.killpg(first.pid, signal.SIGKILL)
    first.wait()
    killed_at = ledger_lines(ledger)
    first_s = time.perf_counter() - started
    print(f"killed after {first_s:.0f} s with {killed_at} results in the ledger", flush=True)
    resumed = subprocess.run(command, env=env, capture_output=True, text=True)
    print(resumed.stderr[-1500:], flush=True)
    keys = [json.loads(line)["key"] for line in ledger.read_text().splitlines()]
    with ResultsStore(database) as store:
        stored = [r for r in store.runs() if r.suite == f"sweep:{sweep.name}"]
    store_keys = Counter(r.key.removeprefix("sweep:") for r in stored)
    report = {"grid": str(args.grid.relative_to(ROOT)) if args.grid.is_relative_to(ROOT) else str(args.grid),
              "runner": args.runner, "experiments": len(expected), "killed_after_results": killed_at,
              "first_pass_s": round(first_s, 1), "resume_exit_code": resumed.returncode,
              "ledger_lines": len(keys), "ledger_each_once": sorted(keys) == expected,
              "store_runs": len(stored), "store_each_once": sorted(store_keys) == expected
              and set(store_keys.values()) == {1},
              "ok": sum(r.ok for r in stored), "failed": sum(not r.ok for r in stored),
              "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())}
    (args.out / "report.json").write_text(json.dumps(report, indent=1))
    print(json.dumps(report, indent=1))
    if not (report["ledger_each_once"] and report["store_each_once"] and resumed.returncode == 0):
        raise SystemExit("a result is missing or stored twice")


if __name__ == "__main__":
    main()
