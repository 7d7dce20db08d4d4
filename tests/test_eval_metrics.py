"""Evaluator metrics on tiny random models: perplexity, fidelity, lm-eval bridge, timing, memory."""

from __future__ import annotations

import copy
import math
import statistics
import time

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from effinfer.core.generation import GenerationResult, PlainDecoding, encode_prompts, new_cache, prefill
from effinfer.core.testing import tiny_llama
from effinfer.data import load_task
from effinfer.evaluation.metrics import memory
from effinfer.evaluation.metrics.fidelity import (FidelityAccumulator, GreedyMatch, ReferenceDistributions,
                                                  common_prefix)
from effinfer.evaluation.metrics.perplexity import perplexity, plan_windows
from effinfer.evaluation.metrics.speculative import SpeculativeStats
from effinfer.evaluation.metrics.timing import (Summary, default_clock, drift, interleaved_runs, paired_ratios,
                                                round_robin, time_runs, torch_threads)
from effinfer.evaluation.plots import pareto_front


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    with torch_threads(1):  # tiny models: one thread is fastest, and robust on a busy machine
        yield


@pytest.fixture(scope="module")
def model_and_ids():
    model, tokenizer = tiny_llama(layers=2, seed=1)
    text = "The quick brown fox jumps over the lazy dog. " * 3 + "Pack my box with five dozen liquor jugs."
    ids = tokenizer(text, return_tensors="pt", add_special_tokens=False)["input_ids"][0]
    return model, tokenizer, ids


# --------------------------------------------------------------------------- perplexity


@pytest.mark.parametrize("window,stride", [(16, None), (16, 8), (16, 5), (7, 1)])
def test_windows_score_every_token_once(window, stride):
    n = 53
    windows = plan_windows(n, window, stride)
    targets = [t for w in windows for t in range(w.first_target, w.end)]
    # disjoint windows cannot score their first token (no context); overlapping windows score all
    disjoint = stride is None or stride == window
    assert targets == [t for t in range(1, n) if not (disjoint and t % window == 0)]
    assert all(w.end - w.begin <= window and w.begin < w.first_target for w in windows)


def test_max_windows_limits_the_plan():
    assert len(plan_windows(1000, 100, max_windows=3)) == 3
    with pytest.raises(ValueError, match="stride"):
        plan_windows(100, 10, stride=11)


def hand_nll(model: nn.Module, ids: torch.Tensor, window: int, stride: int) -> tuple[float, int]:
    """Score each token alone: context = its window's tokens before it (one forward per token)."""
    total, count = 0.0, 0
    for t in range(1, len(ids)):
        if stride == window:
            begin = t // window * window
            if begin == t:
                continue  # a disjoint window's first token has no context
        else:
            begin = 0 if t < window else (t - window) // stride * stride + stride
        with torch.no_grad():
            logits = model(input_ids=ids[None, begin:t]).logits[0, -1]
        total -= float(torch.log_softmax(logits.double(), -1)[ids[t]])
        count += 1
    return total, count


@pytest.mark.parametrize("window,stride", [(16, 16), (16, 8)])
def test_perplexity_equals_hand_computation(model_and_ids, window, stride):
    model, tokenizer, ids = model_and_ids
    result = perplexity(model, tokenizer, ids, plan_windows(len(ids), window, stride))
    nll, count = hand_nll(model, ids, window, stride)
    ppl, stderr = result.token_ppl()
    assert sum(result.tokens) == count
    assert ppl == pytest.approx(math.exp(nll / count), rel=1e-4)
    assert stderr > 0


def test_word_perplexity_spreads_the_same_nll_over_words(model_and_ids):
    model, tokenizer, ids = model_and_ids
    result = perplexity(model, tokenizer, ids, plan_windows(len(ids), 32))
    token_ppl, _ = result.token_ppl()
    word_ppl, _ = result.word_ppl()
    assert 0 < sum(result.words) < sum(result.tokens)
    assert word_ppl == pytest.approx(token_ppl ** (sum(result.tokens) / sum(result.words)), rel=1e-6)


# --------------------------------------------------------------------------- fidelity


def fidelity_of(reference_model, model, tokenizer, ids):
    windows = plan_windows(len(ids), 32)
    reference = ReferenceDistributions(max_positions=50)
    perplexity(reference_model, tokenizer, ids, windows, on_window=reference.add)
    accumulator = FidelityAccumulator(reference)
    perplexity(model, tokenizer, ids, windows, on_window=accumulator.add)
    return reference, accumulator.summary()


def test_kl_is_zero_for_an_identical_model(model_and_ids):
    model, tokenizer, ids = model_and_ids
    reference, summary = fidelity_of(model, copy.deepcopy(model), tokenizer, ids)
    assert reference.taken == 50 and summary["positions"][0] == 50
    assert summary["kl_mean"][0] == pytest.approx(0.0, abs=1e-7)
    assert summary["top1_agreement"][0] == 1.0


def test_kl_is_positive_and_exact_for_a_perturbed_model(model_and_ids):
    model, tokenizer, ids = model_and_ids
    perturbed = copy.deepcopy(model)
    with torch.no_grad():
        perturbed.model.layers[0].mlp.down_proj.weight.add_(0.2 * torch.randn_like(
            perturbed.model.layers[0].mlp.down_proj.weight, generator=None))
    _, summary = fidelity_of(model, perturbed, tokenizer, ids)
    assert summary["kl_mean"][0] > 1e-4
    # the same number from torch's own KL on the first 50 positions
    with torch.no_grad():
        base = model(input_ids=ids[None, :32]).logits[0, :31].log_softmax(-1)
        other = perturbed(input_ids=ids[None, :32]).logits[0, :31].log_softmax(-1)
        base2 = model(input_ids=ids[None, 32:64]).logits[0, :19].log_softmax(-1)
        other2 = perturbed(input_ids=ids[None, 32:64]).logits[0, :19].log_softmax(-1)
    expected = F.kl_div(torch.cat([other, other2]), torch.cat([base, base2]), log_target=True,
                        reduction="none").sum(-1).mean()
    assert summary["kl_mean"][0] == pytest.approx(float(expected), rel=1e-4)


def test_greedy_match():
    assert common_prefix([1, 2, 3], [1, 2, 4]) == 2
    match = GreedyMatch.compare([[1, 2, 3], [5, 6]], [[1, 2, 3], [5, 7]])
    assert (match.mean_prefix, match.identical_fraction, match.n) == (2.0, 0.5, 2)


# --------------------------------------------------------------------------- lm-eval bridge


def test_lm_eval_bridge_matches_the_direct_scorer(needs_bigbench, tmp_path):
    from effinfer.evaluation.metrics.lm_eval_bridge import lm_eval_scores, prepare_tasks, rewrite_questions
    from effinfer.evaluation.metrics.multiple_choice import score_examples

    model, tokenizer = tiny_llama(layers=2, seed=3)
    names = ["general_knowledge", "phrase_relatedness"]
    bridge = lm_eval_scores(model, tokenizer, prepare_tasks(tmp_path / "plain", names, 10), names, batch_size=4)
    shorten = lambda q: q[: max(8, len(q) // 2)]  # noqa: E731 - a stand-in data stage
    include = prepare_tasks(tmp_path / "data", names, 10)
    rewrite_questions(include, names, shorten)
    bridged_data = lm_eval_scores(model, tokenizer, include, names, batch_size=4)
    for name in names:
        examples = load_task(name, limit=10)
        direct = score_examples(model, tokenizer, examples)
        with_data_stage = score_examples(model, tokenizer, examples, transform=shorten)
        assert bridge[name]["n"] == direct["n"] == 10
        for metric in ("acc", "acc_norm"):
            assert bridge[name][metric] == pytest.approx(direct[metric])
            assert bridged_data[name][metric] == pytest.approx(with_data_stage[metric])


def test_direct_log_likelihoods_equal_hflm_log_likelihoods():
    from lm_eval.api.instance import Instance
    from lm_eval.models.huggingface import HFLM

    from effinfer.evaluation.metrics.multiple_choice import choice_log_likelihoods, context_text

    model, tokenizer = tiny_llama(layers=2, seed=4)
    context, choices = context_text("Which is a colour?"), ["red", "seven", "a chair"]
    lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=2, device="cpu")
    requests = [Instance("loglikelihood", {}, (context, " " + c), i) for i, c in enumerate(choices)]
    theirs = [ll for ll, _ in lm.loglikelihood(requests, disable_tqdm=True)]
    ours = choice_log_likelihoods(model, tokenizer, context, choices)
    assert ours == pytest.approx(theirs, rel=1e-4)
    assert len(set(round(x, 3) for x in ours)) == 3  # distinct scores: the comparison can fail


# --------------------------------------------------------------------------- timing harness


class FakeClock:
    """A clock the timed function advances by chosen amounts."""

    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def test_timing_excludes_warmup_and_measures_each_run():
    clock = FakeClock()
    durations = iter([50.0, 40.0, 1.0, 2.0, 3.0])  # two warm-up runs, then three timed runs

    def work() -> str:
        clock.now += next(durations)
        return "done"

    runs = time_runs(work, warmup=2, repeats=3, clock=clock)
    assert [r.seconds for r in runs] == [1.0, 2.0, 3.0]
    assert all(r.value == "done" for r in runs)
    summary = Summary.of([r.seconds for r in runs])
    assert (summary.median, summary.low, summary.high, summary.spread) == (2.0, 1.0, 3.0, "minmax")
    assert Summary.of([1.0, 2.0, 3.0, 4.0, 100.0]).spread == "iqr"


def test_timing_rejects_a_clock_that_goes_backwards():
    clock = FakeClock()

    def work() -> None:
        clock.now -= 1.0

    with pytest.raises(RuntimeError, match="monotonic"):
        time_runs(work, warmup=0, repeats=1, clock=clock)


def test_interleaved_runs_alternate_the_order_and_pair_adjacent_rounds():
    clock = FakeClock()
    calls: list[str] = []

    def runner(name: str, seconds: float):
        def run() -> str:
            calls.append(name)
            clock.now += seconds
            return name
        return run

    base, cand = interleaved_runs(runner("A", 2.0), runner("B", 1.0), warmup=1, rounds=4, clock=clock)
    assert calls == ["A", "B", "A", "B", "B", "A", "A", "B", "B", "A"]  # warm-up, then AB BA AB BA
    assert [r.seconds for r in base] == [2.0] * 4 and [r.seconds for r in cand] == [1.0] * 4
    with pytest.raises(ValueError, match="rounds"):
        interleaved_runs(runner("A", 1), runner("B", 1), warmup=0, rounds=0, clock=clock)


def test_round_robin_reverses_the_order_every_round():
    calls: list[str] = []
    out = round_robin({name: (lambda name=name: calls.append(name) or name.lower()) for name in "ABC"}, rounds=3)
    assert calls == list("ABCCBAABC") and out == {"A": ["a"] * 3, "B": ["b"] * 3, "C": ["c"] * 3}
    with pytest.raises(ValueError, match="rounds"):
        round_robin({"A": lambda: None}, rounds=0)


def test_paired_ratios_cancel_a_drift_that_hits_both_sides():
    # the machine slows down 3x over the rounds; the candidate is always 2x the baseline's speed
    baseline = [100.0, 70.0, 50.0, 33.0]
    candidate = [2 * b for b in baseline]
    summary = paired_ratios(candidate, baseline)
    assert summary.median == pytest.approx(2.0) and summary.low == pytest.approx(2.0) and summary.n == 4
    # dividing by the first baseline measurement alone would have said 1.2x
    assert statistics.median(candidate) / baseline[0] == pytest.approx(1.2)
    assert paired_ratios([1.0, math.nan, 3.0], [1.0, 1.0, 0.0]).n == 1  # unusable pairs are dropped
    with pytest.raises(ValueError, match="equal lengths"):
        paired_ratios([1.0], [1.0, 2.0])


@pytest.mark.parametrize("samples,reference,flagged", [
    ([100, 101, 99, 100], 100, None),        # steady
    ([100, 101, 99, 100], 80, "bench's start"),  # moved away from the first baseline measurement
    ([100, 100, 70, 70], 85, "during the rounds"),  # load changed while the stack was measured
    ([100], None, None),
])
def test_drift_flags_a_baseline_that_moved(samples, reference, flagged):
    reason = drift([float(s) for s in samples], reference, tolerance=0.10)
    assert (reason is None) if flagged is None else (flagged in reason)


def test_default_clock_is_monotonic_perf_counter():
    assert default_clock() is time.perf_counter
    assert time.get_clock_info("perf_counter").monotonic


# --------------------------------------------------------------------------- memory


def test_weight_bytes_count_buffers_and_tied_storage_once():
    shared = nn.Linear(8, 4, bias=False)
    model = nn.Sequential(shared, nn.ReLU(), nn.Linear(4, 8, bias=False))
    model[2].weight = nn.Parameter(shared.weight.data.t())  # a view of the same storage
    model.register_buffer("packed", torch.zeros(10, dtype=torch.uint8))
    assert memory.weight_bytes(model) == 8 * 4 * 4 + 10


def test_tied_embeddings_count_once():
    model, _ = tiny_llama(layers=1)
    assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()
    params = sum(p.numel() * p.element_size() for p in model.parameters())  # parameters() dedups
    buffers = sum(b.numel() * b.element_size() for b in model.buffers())
    assert memory.weight_bytes(model) == params + buffers


def test_kv_cache_bytes_of_a_dynamic_cache():
    model, tokenizer = tiny_llama(layers=2, hidden=64, heads=4, kv_heads=2)
    recorder = memory.CacheRecorder(None)
    ids = torch.randint(10, 200, (1, 20))
    prefill(model, ids, torch.ones_like(ids), recorder(model))
    layers, kv_heads, head_dim = 2, 2, 16
    assert recorder.kv_bytes() == 2 * layers * kv_heads * head_dim * 20 * 4


def test_peak_rss_resets_and_sees_a_large_allocation():
    if not memory.reset_peak_rss():
        pytest.skip("VmHWM cannot be reset on this platform")
    before = memory.peak_rss_bytes()
    block = torch.ones(64 * 2**20 // 4)  # 64 MiB, touched
    assert memory.peak_rss_bytes() >= before + 48 * 2**20
    del block


def test_hollow_module_releases_the_weights_and_trim_reports():
    model, _ = tiny_llama(layers=2, hidden=64)
    held = memory.weight_bytes(model)
    assert memory.hollow_module(model) == held and memory.weight_bytes(model) == 0
    assert all(p.numel() == 0 for p in model.parameters())
    assert isinstance(memory.trim_heap(), bool)
    rss = memory.release_memory()
    assert rss is None or rss > 0


# --------------------------------------------------------------------------- speculative stats, pareto


def test_speculative_stats():
    results = [GenerationResult([[1] * 9], 0.1, 1.0, forward_steps=3, accepted_per_step=[2, 3, 0],
                                drafted_per_step=[4, 4, 4])]
    stats = SpeculativeStats.collect(results)
    assert stats.mean_accepted == pytest.approx(5 / 3)
    assert stats.acceptance_rate == pytest.approx(5 / 12)
    assert stats.tokens_per_step == pytest.approx(9 / 4)
    assert SpeculativeStats.collect([GenerationResult([[1, 2]], 0.1, 0.1, 1)]) is None


def test_plain_decoding_reports_no_speculative_stats():
    model, tokenizer = tiny_llama(layers=1)
    ids, mask = encode_prompts(tokenizer, ["hello"])
    from effinfer.core.generation import GenerationConfig

    result = PlainDecoding().generate(model, ids, mask, GenerationConfig(max_new_tokens=3), set())
    assert SpeculativeStats.collect([result]) is None
    assert new_cache(model) is not None


def test_pareto_front():
    points = [(10.0, 0.5), (20.0, 0.4), (5.0, 0.6), (8.0, 0.45), (20.0, 0.3)]
    assert pareto_front(points) == [1, 0, 2]
    assert pareto_front([(1.0, 30.0), (2.0, 20.0), (0.5, 25.0)], maximize_y=False) == [1]
