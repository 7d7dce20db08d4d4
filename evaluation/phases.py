"""The measurement phases of one evaluated stack, in the order the evaluator runs them.

Each phase reads the composed model from a :class:`StackRun` and adds metrics to its
record. Phases that a stack cannot influence are not re-measured: a stack with no
model-level technique and no system-level hook other than a decoding strategy leaves the
model's next-token distributions untouched, so its perplexity (and, without a data-level
technique, its task accuracy) is copied from the baseline and flagged ``inherited``.

Speed is measured side by side: a stack's speed cells run in rounds alternating with the
bench's baseline model (kept alive by the evaluator as a :class:`BaselinePeer`), and every
``*_ratio`` is the median of per-round ratios of adjacent measurements, with their spread;
``speed.drift`` is 1 when the baseline measured next to the stack moved more than the
tolerance (``SpeedSpec.drift_tolerance``) from the bench's first baseline measurement or
during the rounds (its ``params["reasons"]`` say where), 0 otherwise.

Metric names (``<corpus>``, ``<task>``, ``<cell>`` = ``p<prompt tokens>_b<batch>``, ``<category>``)::

    setup.load_s  setup.apply_s
    perplexity.<corpus>.token  perplexity.<corpus>.word
    accuracy.<task>.acc  accuracy.<task>.acc_norm  accuracy.mean.acc  accuracy.mean.acc_norm
    fidelity.kl_mean  fidelity.kl_p99  fidelity.top1_agreement
    fidelity.greedy_prefix_tokens  fidelity.greedy_identical
    speed.<cell>.ttft_s  speed.<cell>.prefill_s  speed.<cell>.decode_tok_s  speed.<cell>.latency_s
    speed.<cell>.tokens_per_s  speed.<cell>.prompt_tokens
    speed.<cell>.decode_ratio  speed.<cell>.ttft_ratio  speed.<cell>.latency_ratio      (stacks only)
    speed.<cell>.baseline_decode_tok_s  speed.<cell>.baseline_ttft_s                    (stacks only)
    speed.drift                                                                         (stacks only)
    machine.load_before  machine.load_after
    generation.decode_tok_s  generation.latency_s  generation.<category>.decode_tok_s  generation.new_tokens
    generation.decode_ratio  generation.baseline_decode_tok_s                          (stacks only)
    speculative.mean_accepted  speculative.acceptance_rate  speculative.tokens_per_step
    memory.weight_bytes  memory.kv_cache_bytes  memory.kv_bytes_per_token  memory.peak_rss_bytes
    memory.cuda_peak_bytes  memory.rss_after_release_bytes (the evaluator, once the stack is released)
    roofline.bytes_per_token  roofline.tok_s  roofline.fraction
"""

from __future__ import annotations

import math
import shutil
import tempfile
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from effinfer.core.compose import ComposedModel
from effinfer.core.generation import GenerationConfig, GenerationResult
from effinfer.core.stages import Request
from effinfer.core.technique import Technique
from effinfer.data import load_prompts
from effinfer.data.bigbench import unavailable_reason as bigbench_unavailable_reason
from effinfer.evaluation.metrics import memory
from effinfer.evaluation.metrics.fidelity import FidelityAccumulator, GreedyMatch, ReferenceDistributions
from effinfer.evaluation.metrics.lm_eval_bridge import lm_eval_scores, prepare_tasks, rewrite_questions
from effinfer.evaluation.metrics.perplexity import perplexity, plan_windows
from effinfer.evaluation.metrics.roofline import roofline
from effinfer.evaluation.metrics.speculative import SpeculativeStats
from effinfer.evaluation.metrics.timing import (Clock, Summary, Timed, drift, interleaved_runs, load_average,
                                                paired_ratios, time_runs)
from effinfer.evaluation.records import RunRecord
from effinfer.evaluation.suites import Suite
from effinfer.evaluation.tasks_data_level import data_tasks_phase
from effinfer.evaluation.tasks_long_context import long_context_phase


@dataclass
class Reference:
    """What the baseline leaves behind for the experiments of the same bench."""

    distributions: ReferenceDistributions | None = None
    outputs: list[list[int]] | None = None


@dataclass(frozen=True)
class StackKind:
    """Which measurements a stack can change."""

    changes_logits: bool
    data_level: bool
    decoding_strategy: bool
    lossless: bool

    @classmethod
    def of(cls, techniques: list[Technique]) -> StackKind:
        def touches_model(t: Technique) -> bool:
            hooks = set(t.stage_hooks())
            return "effinfer_transform_model" in hooks or "effinfer_configure_system" in hooks

        return cls(
            changes_logits=any(touches_model(t) for t in techniques),
            data_level=any("data" in t.levels() for t in techniques),
            decoding_strategy=any(t.is_decoding_strategy() for t in techniques),
            lossless=bool(techniques) and all(t.lossless for t in techniques),
        )


@dataclass
class BaselinePeer:
    """The bench's baseline model, kept alive so each stack's speed is timed next to it."""

    composed: ComposedModel
    record: RunRecord  # its own (first) measurement: the reference for drift
    recorder: memory.CacheRecorder | None = None

    def generate(self, requests: list[Request], config: GenerationConfig) -> tuple[list[Any], GenerationResult]:
        try:
            return self.composed.generate(requests, config)
        finally:
            if self.recorder is not None:
                self.recorder.reset()  # the peer's caches must not pile up in its recorder

    def close(self) -> None:
        self.composed.restore()
        self.recorder = None


@dataclass
class StackRun:
    """Everything the phases of one stack share."""

    record: RunRecord
    composed: ComposedModel
    techniques: list[Technique]
    suite: Suite
    reference: Reference
    corpus_ids: Callable[..., torch.Tensor]  # (corpus, at_least tokens or None) -> ids
    tasks_dir: Callable[[], Any]
    bandwidth: Callable[[], float | None]
    clock: Clock
    cache_factory: Any = None  # the stack's own factory (None: the default dynamic cache)
    recorder: memory.CacheRecorder | None = None
    advance: Callable[[str], None] = lambda phase: None
    state: dict[str, Any] = field(default_factory=dict)
    #: the baseline timed next to this stack (``None``: the baseline itself, or no peer kept)
    peer: BaselinePeer | None = None
    drift_tolerance: float = 0.10

    @property
    def side_by_side(self) -> bool:
        return self.peer is not None and not self.baseline

    @property
    def baseline(self) -> bool:
        return self.record.is_baseline

    @property
    def kind(self) -> StackKind:
        return StackKind.of(self.techniques)

    @property
    def model(self) -> torch.nn.Module:
        return self.composed.model

    @property
    def tokenizer(self) -> Any:
        return self.composed.tokenizer


def inherit(run: StackRun, prefix: str, reason: str) -> None:
    """Copy the baseline's metrics under ``prefix`` into this record, flagged as inherited."""
    base = run.record.baseline
    if base is None:
        return
    for name, metric in base.metrics.items():
        if name.startswith(prefix):
            run.record.metrics[name] = metric.model_copy(update={"inherited": True,
                                                                  "params": metric.params | {"reason": reason}})


# --------------------------------------------------------------------------- perplexity + fidelity


def perplexity_phase(run: StackRun) -> None:
    spec = run.suite.perplexity
    if spec is None:
        return
    if not (run.baseline or run.kind.changes_logits):
        inherit(run, "perplexity.", "weights and KV cache untouched by this stack")
        return
    fidelity = run.suite.fidelity
    collector: Any = None
    if fidelity is not None and run.baseline:
        run.reference.distributions = collector = ReferenceDistributions(fidelity.max_positions)
    elif fidelity is not None and run.reference.distributions is not None:
        collector = FidelityAccumulator(run.reference.distributions)
    needed = None if spec.max_windows is None else spec.window + (spec.max_windows - 1) * (spec.stride or spec.window)
    for position, corpus in enumerate(spec.corpora):
        ids = run.corpus_ids(corpus, needed)
        windows = plan_windows(len(ids), spec.window, spec.stride, spec.max_windows)
        result = perplexity(run.model, run.tokenizer, ids, windows, cache_factory=run.cache_factory,
                            on_window=collector.add if collector is not None and position == 0 else None,
                            progress=lambda: run.advance(f"perplexity ({corpus})"))
        params = {"window": spec.window, "stride": spec.stride or spec.window, "windows": len(windows)}
        for unit, (value, stderr) in (("token", result.token_ppl()), ("word", result.word_ppl())):
            run.record.add(f"perplexity.{corpus}.{unit}", value, stderr=_finite(stderr),
                           n=sum(result.tokens if unit == "token" else result.words), unit="ppl",
                           higher_is_better=False, params=params)
    if isinstance(collector, FidelityAccumulator):
        summary = collector.summary()
        n = int(summary["positions"][0])
        run.record.add("fidelity.kl_mean", summary["kl_mean"][0], stderr=_finite(summary["kl_mean"][1]), n=n,
                       unit="nats", higher_is_better=False)
        run.record.add("fidelity.kl_p99", summary["kl_p99"][0], n=n, unit="nats", higher_is_better=False)
        run.record.add("fidelity.top1_agreement", summary["top1_agreement"][0],
                       stderr=summary["top1_agreement"][1], n=n, higher_is_better=True)


# --------------------------------------------------------------------------- task accuracy


def tasks_phase(run: StackRun) -> None:
    spec = run.suite.tasks
    if spec is None:
        return
    kind = run.kind
    if not (run.baseline or kind.changes_logits or kind.data_level):
        inherit(run, "accuracy.", "model untouched and prompts unchanged by this stack")
        return
    unavailable = bigbench_unavailable_reason()
    if unavailable:
        run.record.notes.append(unavailable)
        return
    run.advance("tasks")
    if kind.data_level:
        # the data stage rewrites each question before the model scores it
        def transform(question: str) -> str:
            return run.composed.transform_request(Request.from_text(question)).text()

        folder = Path(tempfile.mkdtemp(prefix="effinfer-tasks-data-"))
        try:
            include = prepare_tasks(folder, spec.names, spec.limit)
            rewrite_questions(include, spec.names, transform)
            scores = lm_eval_scores(run.model, run.tokenizer, include, spec.names, spec.batch_size)
        finally:
            shutil.rmtree(folder, ignore_errors=True)
        scorer = "lm-eval HFLM, data stage applied to each question"
    else:
        scores = lm_eval_scores(run.model, run.tokenizer, run.tasks_dir(), spec.names, spec.batch_size)
        scorer = "lm-eval HFLM"
    for metric in ("acc", "acc_norm"):
        for name, score in scores.items():
            value, stderr = score[metric]
            run.record.add(f"accuracy.{name}.{metric}", value, stderr=_finite(stderr), n=score["n"],
                           higher_is_better=True, params={"scorer": scorer, "limit": spec.limit})
        values = [score[metric][0] for score in scores.values()]
        errors = [score[metric][1] for score in scores.values()]
        run.record.add(f"accuracy.mean.{metric}", sum(values) / len(values),
                       stderr=_finite(math.sqrt(sum(e * e for e in errors)) / len(errors)),
                       n=sum(score["n"] for score in scores.values()), higher_is_better=True,
                       params={"tasks": spec.names, "scorer": scorer})


# --------------------------------------------------------------------------- speed grid


def speed_prompts(ids: torch.Tensor, tokenizer: Any, length: int, batch: int) -> list[str]:
    """``batch`` different texts of about ``length`` tokens: consecutive spans from the corpus's start."""
    needed = length * batch
    if len(ids) < needed:
        raise ValueError(f"the corpus has {len(ids)} tokens; a {length}×{batch} speed cell needs {needed}")
    return [tokenizer.decode(ids[b * length:(b + 1) * length].tolist()) for b in range(batch)]


def speed_phase(run: StackRun) -> None:
    spec = run.suite.speed
    if spec is None:
        return
    _note_load(run, "machine.load_before")
    ids = run.corpus_ids("wikipedia", max(spec.prompt_lengths) * max(spec.batch_sizes))
    config = GenerationConfig(max_new_tokens=spec.new_tokens, chat_template=False)
    for length in spec.prompt_lengths:
        for batch in spec.batch_sizes:
            run.advance(f"speed p{length}×b{batch}")
            requests = [Request.from_text(text) for text in speed_prompts(ids, run.tokenizer, length, batch)]

            def call() -> tuple[list[Any], GenerationResult]:
                if run.recorder is not None:
                    run.recorder.reset()
                return run.composed.generate(requests, config)

            cell = f"p{length}_b{batch}"
            if run.side_by_side:
                peer = run.peer
                base_timed, timed = interleaved_runs(lambda: peer.generate(requests, config), call, spec.warmup,
                                                     spec.repeats, clock=run.clock)
                _record_ratios(run, cell, base_timed, timed)
            else:
                timed = time_runs(call, spec.warmup, spec.repeats, clock=run.clock)
            _record_cell(run, cell, timed)
            if batch == 1 and length == max(spec.prompt_lengths) and run.recorder is not None:
                _record_kv(run, timed[-1].value[0], batch)


def _samples(timed: list[Timed[Any]]) -> dict[str, list[float]]:
    """Per-run samples of one speed cell (``nan`` where a run has no decode step)."""
    results = [t.value[1] for t in timed]
    e2e = [t.seconds for t in timed]
    return {
        "latency_s": e2e,
        "ttft_s": [t.seconds - r.decode_seconds for t, r in zip(timed, results)],
        "prefill_s": [r.prefill_seconds for r in results],
        "decode_tok_s": [(r.new_tokens - len(r.sequences)) / r.decode_seconds if r.decode_seconds > 0
                         else math.nan for r in results],
        "tokens_per_s": [r.new_tokens / s if s > 0 else math.nan for r, s in zip(results, e2e)],
    }


def _record_cell(run: StackRun, cell: str, timed: list[Any]) -> None:
    results = [t.value[1] for t in timed]
    samples = _samples(timed)
    prompt_tokens = sum(c.prompt_tokens for c in timed[-1].value[0]) / len(timed[-1].value[0])
    params = {"prompt_tokens": prompt_tokens, "new_tokens": results[-1].new_tokens}
    if run.side_by_side:
        params["rounds"] = "alternating with the baseline"
    for name, unit, better in (("ttft_s", "s", False), ("latency_s", "s", False), ("prefill_s", "s", False),
                               ("decode_tok_s", "tok/s", True), ("tokens_per_s", "tok/s", True)):
        if finite := [v for v in samples[name] if math.isfinite(v)]:
            _add_summary(run.record, f"speed.{cell}.{name}", finite, unit, better, params)
    run.record.add(f"speed.{cell}.prompt_tokens", prompt_tokens, unit="tokens")


#: per-cell ratios recorded for a stack: (sample, metric suffix, higher is better)
RATIOS = (("decode_tok_s", "decode_ratio", True), ("ttft_s", "ttft_ratio", False),
          ("latency_s", "latency_ratio", False))


def _record_ratios(run: StackRun, cell: str, base_timed: list[Timed[Any]], timed: list[Timed[Any]]) -> None:
    """Ratios of adjacent rounds (stack ÷ baseline), the baseline's own numbers, its drift."""
    base, mine = _samples(base_timed), _samples(timed)
    params = {"pairs": len(timed), "order": "A B, B A, … (adjacent rounds, order alternating)"}
    for sample, suffix, better in RATIOS:
        try:
            summary = paired_ratios(mine[sample], base[sample])
        except ValueError:  # no finite pair (e.g. no decode step)
            continue
        run.record.add(f"speed.{cell}.{suffix}", summary.median, low=summary.low, high=summary.high, n=summary.n,
                       unit="×", higher_is_better=better, params=params | {"spread": summary.spread})
    for sample, unit, better in (("decode_tok_s", "tok/s", True), ("ttft_s", "s", False)):
        if finite := [v for v in base[sample] if math.isfinite(v)]:
            _add_summary(run.record, f"speed.{cell}.baseline_{sample}", finite, unit, better,
                         {"measured": "next to this stack"})
    decode = [v for v in base["decode_tok_s"] if math.isfinite(v)]
    reason = drift(decode, run.peer.record.value(f"speed.{cell}.decode_tok_s"), run.drift_tolerance)
    if reason is not None:
        run.state.setdefault("drift", {})[f"speed {cell}"] = reason


def _note_load(run: StackRun, name: str) -> None:
    if name == "machine.load_before" and name in run.record.metrics:
        return
    load = load_average()
    if load is not None:
        run.record.add(name, load, params={"source": "os.getloadavg, 1 minute"})


def _add_summary(record: RunRecord, name: str, samples: list[float], unit: str, better: bool | None,
                 params: dict[str, Any]) -> None:
    summary = Summary.of(samples)
    record.add(name, summary.median, low=summary.low, high=summary.high, n=summary.n, unit=unit,
               higher_is_better=better, params=params | {"spread": summary.spread})


def _record_kv(run: StackRun, completions: list[Any], batch: int) -> None:
    kv = run.recorder.kv_bytes()
    context = sum(c.prompt_tokens + len(c.tokens) for c in completions)
    slots = run.recorder.allocated_token_slots()
    run.record.add("memory.kv_cache_bytes", kv, unit="B", higher_is_better=False,
                   params={"context_tokens": context, "batch": batch, "allocated_token_slots": slots})
    # per token of cache capacity: a pre-allocated cache holds more slots than the context fills
    per_token = kv / slots if slots else (kv / context if context else None)
    if per_token is not None:
        run.record.add("memory.kv_bytes_per_token", per_token, unit="B/token", higher_is_better=False)


# --------------------------------------------------------------------------- generation on the prompt set


def generation_phase(run: StackRun) -> None:
    spec = run.suite.generation
    if spec is None:
        return
    prompts = [p for category in spec.categories
               for p in load_prompts(category, n_per_category=spec.n_per_category, max_chars=spec.max_chars)]
    outputs: list[list[int]] = []
    results: list[GenerationResult] = []
    latencies: list[float] = []
    per_category: dict[str, list[GenerationResult]] = {}
    base_results: list[GenerationResult] = []
    _note_load(run, "machine.load_before")
    for index, prompt in enumerate(prompts):
        run.advance(f"generation ({prompt.category})")
        config = GenerationConfig(max_new_tokens=min(prompt.max_new_tokens, spec.max_new_tokens))
        request = Request(messages=[dict(m) for m in prompt.messages])
        if run.side_by_side and index % 2 == 1:  # the baseline next to the stack, order alternating
            base_results.append(run.peer.generate([request], config)[1])
        started = run.clock()
        completions, result = run.composed.generate([request], config)
        latencies.append(run.clock() - started)
        if run.side_by_side and index % 2 == 0:
            base_results.append(run.peer.generate([request], config)[1])
        outputs.append(completions[0].tokens)
        results.append(result)
        per_category.setdefault(prompt.category, []).append(result)
    run.record.add("generation.decode_tok_s", _decode_rate(results), unit="tok/s", higher_is_better=True,
                   n=len(results), params={"prompts": [p.id for p in prompts]})
    for category, category_results in per_category.items():
        run.record.add(f"generation.{category}.decode_tok_s", _decode_rate(category_results), unit="tok/s",
                       higher_is_better=True, n=len(category_results))
    _add_summary(run.record, "generation.latency_s", latencies, "s", False, {})
    if base_results:
        _record_generation_ratio(run, results, base_results)
    run.record.add("generation.new_tokens", sum(len(o) for o in outputs), unit="tokens")
    _record_speculative(run, results)
    _record_greedy_match(run, outputs)


def _record_generation_ratio(run: StackRun, results: list[GenerationResult],
                             base_results: list[GenerationResult]) -> None:
    """Decode speed on the prompt set ÷ the baseline's on the same prompt, run right next to it."""
    base_rate = _decode_rate(base_results)
    run.record.add("generation.baseline_decode_tok_s", base_rate, unit="tok/s", higher_is_better=True,
                   n=len(base_results), params={"measured": "next to this stack, prompt by prompt"})
    try:
        summary = paired_ratios([_decode_rate([r]) for r in results], [_decode_rate([r]) for r in base_results])
    except ValueError:
        return
    run.record.add("generation.decode_ratio", summary.median, low=summary.low, high=summary.high, n=summary.n,
                   unit="×", higher_is_better=True,
                   params={"spread": summary.spread, "pairs": "one per prompt, order alternating"})
    reason = drift([base_rate], run.peer.record.value("generation.decode_tok_s"), run.drift_tolerance)
    if reason is not None:
        run.state.setdefault("drift", {})["generation"] = reason


def drift_phase(run: StackRun) -> None:
    """``speed.drift`` (1: a baseline measured next to this stack moved beyond the tolerance) and the load after."""
    if run.side_by_side and (run.suite.speed is not None or run.suite.generation is not None):
        reasons = run.state.get("drift", {})
        run.record.add("speed.drift", float(bool(reasons)),
                       params={"tolerance": run.drift_tolerance, "reasons": reasons})
    if "machine.load_before" in run.record.metrics:
        _note_load(run, "machine.load_after")


def _decode_rate(results: list[GenerationResult]) -> float:
    tokens = sum(r.new_tokens - len(r.sequences) for r in results)
    seconds = sum(r.decode_seconds for r in results)
    return tokens / seconds if seconds > 0 else float("nan")


def _record_speculative(run: StackRun, results: list[GenerationResult]) -> None:
    stats = SpeculativeStats.collect(results)
    if stats is None:
        return
    run.record.add("speculative.mean_accepted", stats.mean_accepted, n=stats.steps, unit="tokens/step",
                   higher_is_better=True)
    run.record.add("speculative.acceptance_rate", stats.acceptance_rate, n=stats.steps, higher_is_better=True)
    run.record.add("speculative.tokens_per_step", stats.tokens_per_step, n=stats.steps, unit="tokens/step",
                   higher_is_better=True)


def _record_greedy_match(run: StackRun, outputs: list[list[int]]) -> None:
    if run.baseline:
        run.reference.outputs = outputs
        return
    if run.reference.outputs is None:
        run.record.notes.append("greedy match not measured: the baseline produced no reference outputs")
        return
    match = GreedyMatch.compare(outputs, run.reference.outputs)
    lossless = run.kind.lossless
    run.record.add("fidelity.greedy_prefix_tokens", match.mean_prefix, n=match.n, unit="tokens",
                   higher_is_better=True)
    run.record.add("fidelity.greedy_identical", match.identical_fraction, n=match.n, higher_is_better=True,
                   params={"lossless_claimed": lossless})
    if lossless:
        identical = round(match.identical_fraction * match.n)
        verdict = "verified" if identical == match.n else "VIOLATED"
        run.record.notes.append(f"lossless claim {verdict}: {identical}/{match.n} greedy outputs identical "
                                "to the baseline's")


# --------------------------------------------------------------------------- memory + roofline


def weights_phase(run: StackRun) -> None:
    run.record.add("memory.weight_bytes", memory.weight_bytes(run.model), unit="B", higher_is_better=False)


def peak_memory_phase(run: StackRun) -> None:
    """Peak RSS / CUDA peak since :func:`start_peak_tracking` (speed grid + generation)."""
    if run.suite.memory is None or not run.suite.memory.track_peak:
        return
    peak = memory.peak_rss_bytes()
    run.record.add("memory.peak_rss_bytes", peak, unit="B", higher_is_better=False,
                   params={"window": "speed grid and generation" if run.state.get("rss_reset")
                           else "process lifetime (VmHWM could not be reset)"})
    cuda = memory.cuda_peak_bytes()
    if cuda is not None:
        run.record.add("memory.cuda_peak_bytes", cuda, unit="B", higher_is_better=False)


def start_peak_tracking(run: StackRun) -> None:
    if run.suite.memory is None or not run.suite.memory.track_peak:
        return
    run.state["rss_reset"] = memory.reset_peak_rss()
    memory.reset_cuda_peak()


def roofline_phase(run: StackRun) -> None:
    bandwidth = run.bandwidth()
    weights = run.record.value("memory.weight_bytes")
    if bandwidth is None or weights is None or run.suite.speed is None:
        return
    cell = f"p{max(run.suite.speed.prompt_lengths)}_b1"
    decode = run.record.value(f"speed.{cell}.decode_tok_s")
    kv = run.record.value("memory.kv_cache_bytes") or 0.0
    result = roofline(int(weights), int(kv), bandwidth, decode)
    params = {"cell": cell, "bandwidth_bytes_per_s": bandwidth}
    run.record.add("roofline.bytes_per_token", result.bytes_per_token, unit="B", higher_is_better=False,
                   params=params)
    run.record.add("roofline.tok_s", result.roofline_tok_s, unit="tok/s", params=params)
    if result.fraction is not None:
        run.record.add("roofline.fraction", result.fraction, higher_is_better=True, params=params)


def _finite(value: float | None) -> float | None:
    return value if value is not None and math.isfinite(value) else None


PHASES: tuple[Callable[[StackRun], None], ...] = (
    weights_phase, perplexity_phase, tasks_phase, start_peak_tracking, speed_phase, generation_phase,
    data_tasks_phase, long_context_phase, drift_phase, peak_memory_phase, roofline_phase,
)
