"""The evaluator end to end on a tiny model: sweeps, failures, skipping, losslessness, reports, CLI."""

from __future__ import annotations

import json
import types

import pytest
import torch
from typer.testing import CliRunner

from effinfer.core import Paper, Technique, hookimpl
from effinfer.core.registry import build_registry
from effinfer.core.technique import Requirement
from effinfer.core.testing import tiny_llama
from effinfer.evaluation import Evaluator, ResultsStore, evaluate, get_suite
from effinfer.evaluation.metrics.timing import torch_threads
from effinfer.evaluation.report import markdown_report, rows

NODE = "model.compression.quantization.ptq.weight_only"


class Boom(Technique):
    """Fails while transforming the model."""

    name = "boom"
    node = NODE
    paper = Paper(title="A failing technique", year=2024)

    @hookimpl
    def effinfer_transform_model(self, stage):
        raise RuntimeError("boom went the technique")


class FakeLossless(Technique):
    """Claims to be lossless but perturbs the weights."""

    name = "fake_lossless"
    node = NODE
    lossless = True

    @hookimpl
    def effinfer_transform_model(self, stage):
        with torch.no_grad():
            for p in stage.model.parameters():
                p.add_(0.3 * torch.randn_like(p))


class Calibrated(Technique):
    """Records the shape of the calibration batch it was given."""

    name = "calibrated"
    node = NODE
    requires = frozenset({Requirement.CALIBRATION_DATA})
    seen: list[tuple[int, ...]] = []

    @hookimpl
    def effinfer_transform_model(self, stage):
        Calibrated.seen.append(tuple(stage.calibration_batches(2, 16).shape))


@hookimpl
def effinfer_register_techniques(register):
    for cls in (Boom, FakeLossless, Calibrated):
        register(cls)


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    with torch_threads(1):  # tiny models: one thread is fastest, and robust on a busy machine
        yield


@pytest.fixture(scope="module")
def registry():
    plugin = types.SimpleNamespace(effinfer_register_techniques=effinfer_register_techniques)
    return build_registry(extra_plugins=[(plugin, "eval-test-techniques")])


@pytest.fixture(scope="module")
def tiny_model():
    return tiny_llama(layers=2, seed=0)


# a smaller tiny suite: no tasks (the bridge has its own tests), one speed cell
SUITE = get_suite("tiny").model_copy(update={"tasks": None})


def test_sweep_records_failures_goes_on_and_skips_stored_runs(tmp_path, registry, tiny_model):
    db = tmp_path / "r.db"
    stacks = [["boom"], ["rtn"], ["prompt_lookup"]]
    with Evaluator(tiny_model, suite=SUITE, store=db, registry=registry, model_name="tiny") as ev:
        first = ev.sweep(stacks)
    assert [r.status for r in first.runs] == ["failed", "ok", "ok"]
    assert "boom went the technique" in first.runs[0].error
    assert first.baseline.ok and all(r.baseline is first.baseline for r in first.runs[1:])

    with Evaluator(tiny_model, suite=SUITE, store=db, registry=registry, model_name="tiny") as ev:
        again = ev.sweep(stacks)
    assert [r.from_store for r in again.runs] == [False, True, True]  # failures are retried
    assert again.runs[1].run_id == first.runs[1].run_id
    assert again.runs[1].baseline.run_id == first.baseline.run_id  # compared with the baseline it was measured with

    with Evaluator(tiny_model, suite=SUITE, store=db, registry=registry, model_name="tiny") as ev:
        redone = ev.sweep([["rtn"]], redo=True)
    assert not redone.runs[0].from_store and redone.baseline.run_id != first.baseline.run_id

    with ResultsStore(db) as store:
        assert [b["runs"] for b in store.benches()] == [2, 2, 4]  # newest first; 2nd: baseline + boom retried
        assert len(store.runs(status="failed")) == 2


def test_speed_is_measured_side_by_side_and_drift_is_flagged_and_redone(tmp_path, registry, tiny_model):
    db = tmp_path / "r.db"
    with Evaluator(tiny_model, suite=SUITE, store=db, registry=registry, model_name="tiny",
                   drift_tolerance=1e-9) as ev:  # any change of the baseline counts as drift
        first = ev.sweep([["rtn"]])
    base, rtn = first.baseline, first.runs[0]
    cell = "speed.p32_b1"
    assert f"{cell}.decode_ratio" not in base.metrics and "speed.drift" not in base.metrics
    ratio = rtn.metrics[f"{cell}.decode_ratio"]
    assert ratio.n == SUITE.speed.repeats and ratio.low <= ratio.value <= ratio.high and ratio.unit == "×"
    adjacent = rtn.metrics[f"{cell}.baseline_decode_tok_s"]
    assert adjacent.n == SUITE.speed.repeats and adjacent.params["measured"] == "next to this stack"
    assert {f"{cell}.ttft_ratio", f"{cell}.latency_ratio", "generation.decode_ratio",
            "generation.baseline_decode_tok_s", "machine.load_before", "machine.load_after"} <= set(rtn.metrics)
    assert rtn.value("speed.drift") == 1.0 and rtn.metrics["speed.drift"].params["reasons"]
    table = {row[0]: row for row in rows(first.records)}
    assert "⚠ drifted" in table["rtn"][-1] and f"(×{ratio.value:.2f} [" in " ".join(table["rtn"])
    report = markdown_report(first.records, first.environment, title="drift")
    assert "--redo-drifted" in report and "bench peak RSS" in report and "speed drifted" in report

    with Evaluator(tiny_model, suite=SUITE, store=db, registry=registry, model_name="tiny",
                   drift_tolerance=10) as ev:
        kept = ev.sweep([["rtn"]])
        redone = ev.sweep([["rtn"]], redo_drifted=True)
    assert kept.runs[0].from_store and kept.runs[0].run_id == rtn.run_id  # stored, even though drifted
    assert not redone.runs[0].from_store and redone.runs[0].value("speed.drift") == 0.0
    assert "⚠" not in rows(redone.records)[1][-1]


def test_metrics_of_each_kind_of_stack(registry, tiny_model):
    with Evaluator(tiny_model, suite=SUITE, store=False, registry=registry) as ev:
        base = ev.baseline()
        rtn = ev.evaluate(["rtn:bits=4"])
        lookup = ev.evaluate(["prompt_lookup"])
        compressed = ev.evaluate(["selective_context:ratio=0.5"])
    assert base.ok and rtn.ok and lookup.ok and compressed.ok, [r.error for r in (base, rtn, lookup, compressed)]
    # a model-level technique changes the logits and the weight bytes
    assert rtn.value("fidelity.kl_mean") > 0 and rtn.value("memory.weight_bytes") < base.value("memory.weight_bytes")
    assert not rtn.metrics["perplexity.wikipedia.token"].inherited
    # a decoding strategy cannot change perplexity: copied, flagged; speculative stats measured
    assert lookup.metrics["perplexity.wikipedia.token"].inherited
    assert lookup.value("perplexity.wikipedia.token") == base.value("perplexity.wikipedia.token")
    assert "fidelity.kl_mean" not in lookup.metrics and "speculative.acceptance_rate" in lookup.metrics
    # a prompt compressor shortens the prompts the speed grid sends
    assert compressed.value("speed.p32_b1.prompt_tokens") < base.value("speed.p32_b1.prompt_tokens")
    for record in (base, rtn):
        decode = record.metrics["speed.p32_b1.decode_tok_s"]
        assert decode.n == SUITE.speed.repeats and decode.low <= decode.value <= decode.high
        assert record.value("memory.kv_cache_bytes") > 0 and record.value("roofline.fraction") > 0
    assert "memory_bandwidth" in base.environment and base.environment["threads"] >= 1


def test_lossless_claims_are_checked(registry, tiny_model):
    with Evaluator(tiny_model, suite=SUITE, store=False, registry=registry) as ev:
        honest = ev.evaluate(["prompt_lookup"])
        liar = ev.evaluate(["fake_lossless"])
    assert honest.value("fidelity.greedy_identical") == 1.0
    assert any(n.startswith("lossless claim verified") for n in honest.notes)
    assert liar.value("fidelity.greedy_identical") < 1.0
    assert any("VIOLATED" in n for n in liar.notes)
    table = {row[0]: row[-1] for row in rows([ev.baseline_record, honest, liar])}
    assert "lossless ✓" in table["prompt_lookup"] and "LOSSLESS ✗" in table["fake_lossless"]


def test_calibration_data_reaches_techniques_that_ask(registry, tiny_model):
    Calibrated.seen.clear()
    suite = SUITE.model_copy(update={"perplexity": None, "fidelity": None, "generation": None, "speed": None,
                                     "roofline": None})
    with Evaluator(tiny_model, suite=suite, store=False, registry=registry) as ev:
        record = ev.evaluate(["calibrated"])
    assert record.ok, record.error
    assert Calibrated.seen == [(2, 16)]


def test_evaluate_function_and_markdown_report(tiny_model):
    record = evaluate(["rtn"], model=tiny_model, suite=SUITE, store=False)
    assert record.ok and record.baseline.ok and record.delta("perplexity.wikipedia.token") is not None
    text = markdown_report([record.baseline, record], record.environment, title="tiny report")
    assert "| baseline |" in text and "| rtn |" in text and "measured memory bandwidth" in text


def test_cli_bench_and_results(tmp_path, tiny_model_dir):
    from effinfer.core.cli import app
    from effinfer.evaluation.cli import effinfer_register_commands

    if not any(c.name == "bench" for c in app.registered_commands):
        effinfer_register_commands(app)
    suite_file = tmp_path / "tiny.yaml"
    suite_file.write_text(json.dumps(SUITE.model_dump(mode="json", exclude={"name"})))
    db, out = tmp_path / "r.db", tmp_path / "out"
    runner = CliRunner()
    result = runner.invoke(app, ["bench", "-t", "rtn", "-c", "selective_context+rtn", "--suite", str(suite_file),
                                 "--model", str(tiny_model_dir), "--store", str(db), "--out", str(out),
                                 "--threads", "1"])
    assert result.exit_code == 0, result.output
    assert "baseline" in result.output and "selective_context+rtn" in result.output
    assert {p.name for p in out.iterdir()} == {"report.md", "pareto.png", "bars.png"}
    assert (out / "pareto.png").read_bytes()[:4] == b"\x89PNG"

    listed = runner.invoke(app, ["results", "list", "--store", str(db)])
    assert listed.exit_code == 0 and "tiny" in listed.output
    shown = runner.invoke(app, ["results", "show", "--store", str(db)])
    assert shown.exit_code == 0 and "rtn" in shown.output
    compared = runner.invoke(app, ["results", "compare", "1", "2", "--store", str(db)])
    assert compared.exit_code == 0, compared.output
    exported = runner.invoke(app, ["results", "export", "--format", "json", "--store", str(db)])
    runs = json.loads(exported.output)
    assert len(runs) == 3 and all(r["status"] == "ok" for r in runs)
    csv_out = runner.invoke(app, ["results", "export", "--store", str(db)])
    assert csv_out.output.splitlines()[0].startswith("run_id,bench_id,stack")
    missing = runner.invoke(app, ["results", "list", "--store", str(tmp_path / "none.db")])
    assert missing.exit_code == 2


def test_default_bench_stacks(registry):
    from effinfer.core.experiment import Runtime
    from effinfer.evaluation.cli import default_stacks, parse_composition

    stacks, skipped = default_stacks(registry, Runtime())
    names = ["+".join(t.name for t in stack) for stack in stacks]
    assert {"rtn", "prompt_lookup", "selective_context", "selective_context+rtn+prompt_lookup"} <= set(names)
    assert not {"boom", "drop_layers"} & set(names)  # only built-ins (distribution "effinfer")
    assert [t.config for t in parse_composition("a+b:bits=4")] == [{}, {"bits": 4}]
    with pytest.raises(ValueError, match="empty part"):
        parse_composition("a++b")


def test_bench_by_taxonomy_node(registry):
    """``--node`` selects every registered technique under a node (third-party ones too) and
    refuses a misspelt node or one without techniques, naming the fix."""
    from effinfer.core.experiment import Runtime
    from effinfer.evaluation.cli import MAIN_BENCH, chosen_stacks

    stacks, _ = chosen_stacks([], [], registry, Runtime(), ["model.compression.sparsification"])
    names = ["+".join(t.name for t in stack) for stack in stacks]
    assert "drop_layers" in names and "rtn" not in names
    stacks, _ = chosen_stacks(["rtn"], [], registry, Runtime(), ["model.compression.sparsification"])
    assert ["+".join(t.name for t in stack) for stack in stacks][-1] == "rtn"
    with pytest.raises(ValueError, match="did you mean model.compression.sparsification"):
        chosen_stacks([], [], registry, Runtime(), ["model.compression.sparsificatio"])
    main, _ = chosen_stacks([], [], registry, Runtime())
    assert {stack[0].name for stack in main if len(stack) == 1} <= set(MAIN_BENCH)


def test_suite_with_changes_validates_the_new_sections():
    suite = get_suite("quick").with_changes(name="custom", speed={"prompt_lengths": [64], "batch_sizes": [2]})
    assert suite.name == "custom" and suite.speed.prompt_lengths == [64] and suite.speed.batch_sizes == [2]
    assert suite.speed.repeats == type(suite.speed)().repeats  # unspecified fields take the section's defaults
    assert get_suite("quick").with_changes(tasks=None).tasks is None
    with pytest.raises(ValueError, match="prompt_length"):
        get_suite("quick").with_changes(speed={"prompt_length": [64]})


def test_a_bare_technique_name_takes_its_bench_config(registry):
    from effinfer.core.experiment import Runtime
    from effinfer.evaluation.cli import chosen_stacks

    stacks, _ = chosen_stacks(["qat", "qat:steps=3", "rtn"], ["qat+prompt_lookup"], registry, Runtime())
    qat_bench = registry.techniques["qat"].technique.bench_config
    assert stacks[0][0].config == qat_bench and stacks[1][0].config == {"steps": 3}
    assert stacks[2][0].config == {}  # rtn has no bench_config: its defaults already run
    assert stacks[3][0].config == qat_bench


def test_kv_bytes_per_token_is_the_arithmetic_on_the_static_engine(tiny_model):
    record = evaluate([], model=tiny_model, suite=SUITE, store=False)
    config = tiny_model[0].config
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    per_token = 2 * config.num_hidden_layers * config.num_key_value_heads * head_dim * 4  # keys + values, fp32
    metric = record.metrics["memory.kv_bytes_per_token"]
    # capacity-based, so unfilled pre-allocated slots do not inflate it; the static cache's padding
    # mask adds about one byte per slot
    assert per_token <= metric.value < per_token + 2
    held = record.metrics["memory.kv_cache_bytes"]
    assert held.params["allocated_token_slots"] * metric.value == held.value


def test_a_missing_bigbench_source_leaves_the_tasks_out_with_the_reason(registry, tiny_model, monkeypatch):
    from effinfer.evaluation import phases

    reason = "BIG-bench tasks not measured: test reason"
    monkeypatch.setattr(phases, "bigbench_unavailable_reason", lambda: reason)
    suite = get_suite("tiny").model_copy(update={"speed": None, "generation": None, "roofline": None})
    assert suite.tasks is not None
    with Evaluator(tiny_model, suite=suite, store=False, registry=registry) as ev:
        record = ev.evaluate(["rtn:bits=4"])
    for run in (record.baseline, record):
        assert run.ok and reason in run.notes and not any(m.startswith("accuracy.") for m in run.metrics)
