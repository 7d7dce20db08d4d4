"""effinfer.evaluation — the shared evaluator: accuracy, fidelity, speed and memory, one protocol.

::

    from effinfer.evaluation import evaluate, bench, Evaluator, ResultsStore, get_suite

    record = evaluate(["rtn:bits=4"], suite="quick")     # the baseline is measured in the same run
    print(record.value("perplexity.wikipedia.token"), record.delta("accuracy.mean.acc"))

See :mod:`effinfer.evaluation.api` for the functions, :mod:`effinfer.evaluation.phases` for
every metric name, :mod:`effinfer.evaluation.suites` for the ``quick``/``standard``/``full``
suites and :mod:`effinfer.evaluation.store` for the SQLite results store.
"""

from effinfer.evaluation.api import bench, evaluate
from effinfer.evaluation.evaluator import BenchResult, Evaluator, stack_spec
from effinfer.evaluation.records import Metric, RunRecord, StackSpec
from effinfer.evaluation.store import ResultsStore, default_store_path
from effinfer.evaluation.suites import SUITES, Suite, get_suite

__all__ = [
    "SUITES",
    "BenchResult",
    "Evaluator",
    "Metric",
    "ResultsStore",
    "RunRecord",
    "StackSpec",
    "Suite",
    "bench",
    "default_store_path",
    "evaluate",
    "get_suite",
    "stack_spec",
]
