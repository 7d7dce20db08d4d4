"""Speculative decoding: the shared verifier, losslessness of every strategy, the sampling law.

- verifier unit tests: all drafted tokens accepted, none, the right branch of a tree;
- a hypothesis property: every greedy strategy reproduces plain greedy decoding on random
  tiny models and prompts (on the static engine, and for a subset on the HF path);
- speculative sampling keeps the target distribution: the rejection rule on synthetic
  distributions, and end to end with a draft model (chi-square against exact probabilities);
- invalid configurations are refused with messages that say what to change.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from effinfer.core.errors import ExperimentError
from effinfer.core.experiment import Experiment
from effinfer.core.generation import GenerationConfig, encode_prompts, sampling_probs, stop_token_ids
from effinfer.core.stages import SystemStage
from effinfer.core.testing import tiny_llama
from effinfer.core.engines import HFEngine
from effinfer.plugins.system.engine import StaticDecoding, StaticEngine
from effinfer.plugins.system.speculative.datastore import Datastore, frequent_prefixes, suffix_array
from effinfer.plugins.system.speculative.draft_model import DraftModel, DraftModelDecoding
from effinfer.plugins.system.speculative.lookahead import Lookahead, LookaheadDecoding, NgramPool, diagonal_ngrams
from effinfer.plugins.system.speculative.medusa import Medusa, MedusaDecoding, candidate_prefixes
from effinfer.plugins.system.speculative.medusa_heads import MedusaHeads
from effinfer.plugins.system.speculative.prompt_lookup import PromptLookup, PromptLookupDecoding
from effinfer.plugins.system.speculative.rest import Rest, RestDecoding
from effinfer.plugins.system.speculative.self_speculative import SelfSpeculative, SelfSpeculativeDecoding
from effinfer.plugins.system.speculative.tree import TokenTree
from effinfer.plugins.system.speculative.verifier import verify, verify_greedy, verify_sampling

GREEDY = GenerationConfig(max_new_tokens=8)


@pytest.fixture(autouse=True)
def one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def one_hot_logits(choices: list[int], vocab: int = 12) -> torch.Tensor:
    logits = torch.full((len(choices), vocab), -10.0)
    logits[torch.arange(len(choices)), torch.tensor(choices)] = 10.0
    return logits


# --------------------------------------------------------------------------- verifier


def test_all_drafted_tokens_accepted_plus_the_bonus():
    tree = TokenTree.chain(root=1, draft=[2, 3, 4])
    verdict = verify_greedy(tree, one_hot_logits([2, 3, 4, 5]))
    assert (verdict.path, verdict.tokens, verdict.accepted) == ([0, 1, 2, 3], [2, 3, 4, 5], 3)


def test_no_drafted_token_accepted_gives_the_target_token():
    tree = TokenTree.chain(root=1, draft=[2, 3, 4])
    verdict = verify_greedy(tree, one_hot_logits([7, 3, 4, 5]))
    assert (verdict.path, verdict.tokens, verdict.accepted) == ([0], [7], 0)


def test_partial_acceptance_stops_at_the_first_mismatch():
    verdict = verify_greedy(TokenTree.chain(1, [2, 3, 4]), one_hot_logits([2, 9, 4, 5]))
    assert (verdict.path, verdict.tokens) == ([0, 1], [2, 9])


def test_tree_verification_follows_the_branch_the_target_chooses():
    # root 1 → {2 → 3, 6 → 7 → 8}; target: after 1 comes 6, after 6 comes 7, after 7 comes 11
    tree = TokenTree.from_paths(1, [[2, 3], [6, 7, 8]])
    assert tree.tokens == [1, 2, 3, 6, 7, 8] and tree.parents == [-1, 0, 1, 0, 3, 4]
    logits = one_hot_logits([6, 3, 0, 7, 11, 0])
    verdict = verify(tree, logits, GREEDY)
    assert (verdict.path, verdict.tokens) == ([0, 3, 4], [6, 7, 11])


def test_token_trees_merge_prefixes_and_prune():
    tree = TokenTree.from_paths(0, [[1, 2, 3], [1, 2, 4], [5]])
    assert tree.tokens == [0, 1, 2, 3, 4, 5] and tree.children()[2] == [3, 4]
    assert tree.pruned(max_depth=1).tokens == [0, 1, 5]
    small = tree.pruned(max_depth=9, max_nodes=3)
    assert small.tokens == [0, 1, 2] and small.parents == [-1, 0, 1]
    with pytest.raises(ValueError, match="parents"):
        TokenTree([0, 1], [-1, 1])


def chi_square_limit(dof: int, z: float = 3.09) -> float:
    """Upper α≈0.001 quantile of χ²(dof) (Wilson–Hilferty)."""
    return dof * (1 - 2 / (9 * dof) + z * math.sqrt(2 / (9 * dof))) ** 3


def chi_square(counts: np.ndarray, probs: np.ndarray) -> tuple[float, int]:
    expected = probs * counts.sum()
    keep = expected > 0
    assert counts[~keep].sum() == 0, "a token with probability 0 was emitted"
    return float(((counts[keep] - expected[keep]) ** 2 / expected[keep]).sum()), int(keep.sum()) - 1


@pytest.mark.parametrize("draft_kind", ["sampled", "point_mass_tree"])
def test_rejection_rule_emits_the_target_distribution(draft_kind):
    p = torch.tensor([0.05, 0.4, 0.25, 0.2, 0.1])
    q = torch.tensor([0.3, 0.1, 0.4, 0.1, 0.1])
    generator = torch.Generator().manual_seed(0)
    counts = np.zeros(5)
    for _ in range(6000):
        if draft_kind == "sampled":  # one drafted token drawn from q
            token = int(torch.multinomial(q, 1, generator=generator))
            tree = TokenTree.chain(9, [token], [q])
        else:  # two deterministic candidates as siblings
            tree = TokenTree.from_paths(9, [[2], [0]])
        verdict = verify_sampling(tree, torch.stack([p] * tree.size), generator)
        counts[verdict.tokens[0]] += 1
    statistic, dof = chi_square(counts, p.numpy())
    assert statistic < chi_square_limit(dof)


def test_speculative_sampling_with_a_draft_model_keeps_the_target_distribution():
    """Joint law of the first two sampled tokens (the second one verified by rejection)."""
    target, tokenizer = tiny_llama(layers=2, seed=3, dtype=torch.float64)
    draft, _ = tiny_llama(layers=2, seed=3, dtype=torch.float64)
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():  # a draft close to, but not equal to, the target
        for parameter in draft.parameters():
            parameter.add_(0.5 * parameter.std() * torch.randn(parameter.shape, generator=generator, dtype=torch.float64))
    config = GenerationConfig(max_new_tokens=3, do_sample=True, top_k=3, temperature=1.5, chat_template=False)
    ids, mask = encode_prompts(tokenizer, ["xy"], chat_template=False)
    with torch.inference_mode():
        first = sampling_probs(target(ids).logits[0, -1].float(), config)
        firsts = first.nonzero().flatten().tolist()
        joint = {}
        for t1 in firsts:
            second = sampling_probs(target(torch.cat([ids, torch.tensor([[t1]])], 1)).logits[0, -1].float(), config)
            for t2 in second.nonzero().flatten().tolist():
                joint[(t1, t2)] = float(first[t1] * second[t2])
    cells = sorted(joint)
    strategy = DraftModelDecoding(DraftModel.Config(source="tiny", num_draft_tokens=2), draft=draft)
    counts = np.zeros(len(cells))
    accepted = drafted = 0
    for seed in range(700):
        result = strategy.generate(target, ids, mask, config.model_copy(update={"seed": seed}), set())
        counts[cells.index(tuple(result.sequences[0][:2]))] += 1
        accepted += result.accepted_per_step[0]
        drafted += result.drafted_per_step[0]
    # both branches of the rule must be exercised for the test to mean something
    assert 100 < accepted < drafted - 100, (accepted, drafted)
    statistic, dof = chi_square(counts, np.array([joint[c] for c in cells]))
    assert statistic < chi_square_limit(dof)


# --------------------------------------------------------------------------- losslessness


def random_heads(hidden: int, count: int, seed: int) -> MedusaHeads:
    torch.manual_seed(seed)
    heads = MedusaHeads(hidden, count).double()
    for block in heads.blocks:
        torch.nn.init.normal_(block.weight, std=0.5)
    return heads


def make_strategy(name: str, seed: int, prompt_ids: list[int], settings):
    if name == "prompt_lookup":
        return PromptLookupDecoding(PromptLookup.Config(num_draft_tokens=1 + seed % 5), settings)
    if name == "draft_model":
        draft, _ = tiny_llama(layers=1, seed=seed + 1, dtype=torch.float64)
        return DraftModelDecoding(DraftModel.Config(source="tiny", num_draft_tokens=1 + seed % 4), settings,
                                  draft=draft)
    if name == "self_speculative":
        return SelfSpeculativeDecoding(SelfSpeculative.Config(skip_layers=[1], num_draft_tokens=2 + seed % 3),
                                       settings)
    if name == "lookahead":
        return LookaheadDecoding(Lookahead.Config(window=2 + seed % 4, ngram=2 + seed % 3), settings)
    if name == "rest":
        noise = np.random.default_rng(seed).integers(0, 259, 400)
        return RestDecoding(Rest.Config(max_nodes=6), Datastore(np.concatenate([noise, prompt_ids * 2])), settings)
    return MedusaDecoding(Medusa.Config(heads=2, topk=[3, 2], max_nodes=5), random_heads(32, 2, seed), settings)


STRATEGIES = ["prompt_lookup", "draft_model", "self_speculative", "lookahead", "rest", "medusa"]
PROMPT_TEXT = st.text(alphabet="abcde fgh.", min_size=1, max_size=30)


@pytest.mark.parametrize("name", STRATEGIES)
@settings(max_examples=6, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(seed=st.integers(0, 50), prompt=PROMPT_TEXT, new_tokens=st.integers(1, 24))
def test_every_greedy_strategy_reproduces_plain_greedy(name, seed, prompt, new_tokens):
    model, tokenizer = tiny_llama(layers=3, hidden=32, heads=4, kv_heads=2, intermediate=64, seed=seed,
                                  dtype=torch.float64)
    ids, mask = encode_prompts(tokenizer, [prompt, prompt[::-1] + "abc"], chat_template=True)
    config = GenerationConfig(max_new_tokens=new_tokens)
    stops = stop_token_ids(tokenizer, model, config)
    plain = StaticDecoding().generate(model, ids, mask, config, stops)
    strategy = make_strategy(name, seed, ids[0][mask[0].bool()].tolist(), StaticEngine())
    result = strategy.generate(model, ids, mask, config, stops)
    assert result.sequences == plain.sequences
    assert len(result.accepted_per_step) == len(result.drafted_per_step)
    assert all(0 <= a <= d for a, d in zip(result.accepted_per_step, result.drafted_per_step))


@pytest.mark.parametrize("name", STRATEGIES)
def test_strategies_are_lossless_on_the_hf_path_too(name):
    model, tokenizer = tiny_llama(layers=3, hidden=32, heads=4, kv_heads=2, intermediate=64, seed=5,
                                  dtype=torch.float64)
    ids, mask = encode_prompts(tokenizer, ["abc abc abc abd", "hello"], chat_template=True)
    config = GenerationConfig(max_new_tokens=20)
    stops = stop_token_ids(tokenizer, model, config)
    plain = HFEngine().decoding().generate(model, ids, mask, config, stops)
    strategy = make_strategy(name, 5, ids[0][mask[0].bool()].tolist(), HFEngine())
    assert strategy.generate(model, ids, mask, config, stops).sequences == plain.sequences


def test_speculation_actually_accepts_tokens_when_the_draft_is_good():
    model, tokenizer = tiny_llama(layers=2, seed=0, dtype=torch.float64)
    ids, mask = encode_prompts(tokenizer, ["hello"], chat_template=True)
    config = GenerationConfig(max_new_tokens=30)
    stops = stop_token_ids(tokenizer, model, config)
    same_model = DraftModelDecoding(DraftModel.Config(source="self", num_draft_tokens=4), StaticEngine(), draft=model)
    result = same_model.generate(model, ids, mask, config, stops)
    assert result.sequences == StaticDecoding().generate(model, ids, mask, config, stops).sequences
    assert min(result.accepted_per_step[:-1]) == 4  # a perfect draft is always accepted
    assert result.forward_steps < 10


def test_self_speculative_on_the_hf_path_drafts_with_a_layer_skipped_view():
    """No shared cache there: the draft is the target without the skipped blocks (no weight copied)."""
    from effinfer.plugins.system.speculative.self_speculative import layer_skipped_view

    model, tokenizer = tiny_llama(layers=4, seed=0, dtype=torch.float64)
    view = layer_skipped_view(model, (0, 1, 3))
    assert len(view.model.layers) == 3 and len(model.model.layers) == 4
    assert view.model.layers[2].self_attn.q_proj is model.model.layers[3].self_attn.q_proj
    assert view.model.layers[2].self_attn.layer_idx == 2 and model.model.layers[3].self_attn.layer_idx == 3
    ids, mask = encode_prompts(tokenizer, ["hello there", "abc"], chat_template=True)
    config = GenerationConfig(max_new_tokens=16)
    stops = stop_token_ids(tokenizer, model, config)
    strategy = SelfSpeculativeDecoding(SelfSpeculative.Config(skip_layers=[2]), HFEngine())
    assert strategy.generate(model, ids, mask, config, stops).sequences == \
        HFEngine().decoding().generate(model, ids, mask, config, stops).sequences


# --------------------------------------------------------------------------- drafters' parts


@settings(max_examples=30, deadline=None)
@given(st.lists(st.integers(0, 4), min_size=1, max_size=60))
def test_suffix_array_sorts_suffixes_and_finds_every_occurrence(tokens):
    order = suffix_array(np.array(tokens))
    assert [tokens[i:] for i in order] == sorted(tokens[i:] for i in range(len(tokens)))
    store = Datastore(np.array(tokens))
    pattern = tokens[len(tokens) // 2:len(tokens) // 2 + 2]
    lo, hi = store.find(pattern)
    expected = {i for i in range(len(tokens)) if tokens[i:i + len(pattern)] == pattern}
    assert set(store.suffixes[lo:hi].tolist()) == expected


def test_rest_retrieves_the_longest_suffix_and_keeps_frequent_prefixes():
    store = Datastore(np.array([1, 2, 3, 4, 9, 1, 2, 3, 5, 7, 2, 3, 4, 8]))
    assert sorted(store.continuations([0, 1, 2, 3], 1, 3, 10, 2)) == [[4, 9], [5, 7]]
    assert sorted(store.continuations([5, 2, 3], 1, 3, 10, 1)) == [[4], [4], [5]]
    assert frequent_prefixes([[4, 9], [4, 8], [5, 7]], max_nodes=3) == [[4], [5], [4, 8]]


def test_lookahead_collects_diagonal_ngrams_and_pools_them():
    levels = [{10: 1, 11: 2, 12: 3}, {10: 4, 11: 5, 12: 6}]
    outputs = {11: 7, 12: 8, 13: 9}
    assert diagonal_ngrams(levels, outputs, 3) == [(1, 5, 8), (2, 6, 9)]
    pool = NgramPool(per_key=2)
    for gram in [(1, 2, 3), (1, 4, 5), (1, 2, 3), (1, 6, 7)]:
        pool.add(gram)
    assert pool.lookup(1, 5) == [(6, 7), (2, 3)]


def test_medusa_tree_takes_the_most_probable_prefixes():
    probs = torch.tensor([[0.1, 0.6, 0.3], [0.5, 0.1, 0.4]])
    assert candidate_prefixes(probs, [2, 2], max_nodes=4) == [[1], [2], [1, 0], [1, 2]]


def test_medusa_heads_train_on_self_generated_text(monkeypatch, tmp_path):
    from effinfer.data import cache
    from effinfer.plugins.system.speculative import medusa_heads

    monkeypatch.setattr(cache, "cache_dir", lambda: tmp_path)
    monkeypatch.setattr(medusa_heads, "training_prompts",
                        lambda count, corpora: [f"Tell me about {w}." for w in "abcdefgh"][:count])
    model, tokenizer = tiny_llama(layers=1, seed=0)
    options = Medusa.Config(heads=2, topk=[2, 2], train_prompts=4, train_new_tokens=16, epochs=2, batch_size=16)
    heads, report = medusa_heads.train_medusa(model, tokenizer, options, StaticEngine())
    assert report.positions > 20 and report.train_seconds > 0 and not report.cached
    assert len(report.head_top1) == 2
    assert all(p.requires_grad for p in model.parameters()), "training must not freeze the model for good"
    _, again = medusa_heads.train_medusa(model, tokenizer, options, StaticEngine())
    assert again.cached and again.final_loss == report.final_loss


# --------------------------------------------------------------------------- composition and configs


def test_draft_model_composes_a_compressed_copy_of_the_target(tiny):
    model, tokenizer = tiny
    technique = DraftModel({"techniques": ["rtn:bits=8"], "num_draft_tokens": 3})
    strategy = technique.effinfer_decoding_strategy(SystemStage(model, tokenizer))
    assert any("rtn: quantized" in note for note in technique.notes)
    assert type(strategy.draft.model.layers[0].self_attn.q_proj).__name__ == "QuantizedLinear"
    assert type(model.model.layers[0].self_attn.q_proj).__name__ == "Linear", "the target is untouched"
    ids, mask = encode_prompts(tokenizer, ["abc abc"], chat_template=True)
    config = GenerationConfig(max_new_tokens=12)
    stops = stop_token_ids(tokenizer, model, config)
    result = strategy.generate(model, ids, mask, config, stops)
    assert result.sequences == StaticDecoding().generate(model, ids, mask, config, stops).sequences
    assert sum(result.accepted_per_step) > 0, "an int8 copy of the target agrees with it most of the time"


def problems(*techniques: str) -> str:
    with pytest.raises(ExperimentError) as error:
        Experiment(techniques=list(techniques)).build_stack()
    return str(error.value)


def test_invalid_configs_are_refused_with_the_fix():
    assert "set `source` to a draft model or `techniques`" in problems("draft_model")
    assert "unknown technique 'rtm'" in problems("draft_model:techniques=[rtm]")
    assert "must transform the model, not decode" in problems("draft_model:techniques=[lookahead]")
    assert "min_suffix (9) must be ≤ max_suffix (4)" in problems("rest:min_suffix=9,max_suffix=4")
    assert "unknown corpora ['wikipedia2']" in problems("rest:corpora=[wikipedia2]")
    assert "topk needs one entry per head" in problems("medusa:heads=2,topk=[4]")
    assert "ngram" in problems("lookahead:ngram=1")
    assert "num_draft_tokens" in problems("self_speculative:num_draft_tokens=0")
    assert "both decoding strategies" in problems("lookahead", "rest")


def test_self_speculative_checks_its_layers_against_the_model(tiny):
    from effinfer.core.compose import compose_stack
    from effinfer.core.errors import EffinferError

    model, tokenizer = tiny
    [problem] = SelfSpeculative({"skip_layers": [99]}).check_model_config(model.config)
    assert problem == "skip_layers [99] are out of range for a model with 2 layers; choose skip_layers between 0 and 1, or use skip_ratio"
    with pytest.raises(EffinferError, match=r"self_speculative: skip_layers \[99\] are out of range"):
        compose_stack(model, tokenizer, [SelfSpeculative({"skip_layers": [99]})])
    with pytest.raises(ValueError, match=r"skip_layers \[7\] are out of range for a model with 2 layers"):
        SelfSpeculative({"skip_layers": [7]}).effinfer_decoding_strategy(SystemStage(model, tokenizer))


# --------------------------------------------------------------------------- other layouts


@pytest.mark.parametrize("engine", ["static", "hf"])
@pytest.mark.parametrize("family", ["qwen2", "gemma3"])
@pytest.mark.parametrize("name", STRATEGIES)
def test_every_strategy_is_lossless_on_qwen2_and_gemma3(name, family, engine):
    """Qwen2 (q/k/v biases) and Gemma 3 (scaled embeddings, q/k norms, four norms per block,
    sliding-window layers crossed by these prompts) on the static engine and on the HF path."""
    from effinfer.core.testing import tiny_model

    model, tokenizer = tiny_model(family, layers=3, hidden=32, intermediate=64, seed=4, dtype=torch.float64)
    ids, mask = encode_prompts(tokenizer, ["abc abc abc abd, abc abc", "hello"], chat_template=True)
    if family == "gemma3":
        assert ids.shape[1] > 2 * model.config.sliding_window
    config = GenerationConfig(max_new_tokens=16)
    stops = stop_token_ids(tokenizer, model, config)
    plain = HFEngine().decoding().generate(model, ids, mask, config, stops)
    chosen = StaticEngine() if engine == "static" else HFEngine()
    strategy = make_strategy(name, 4, ids[0][mask[0].bool()].tolist(), chosen)
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)  # the static engine must not step aside
        result = strategy.generate(model, ids, mask, config, stops)
    assert result.sequences == plain.sequences
    assert sum(result.drafted_per_step) > 0 or name == "rest"  # rest's random datastore may have no match


def test_the_hf_runner_keeps_every_position_of_a_default_sliding_window_cache():
    """Gemma 3 on the HF path with a recorder's default cache (sliding-window layers): a tree past the
    window commits correctly."""
    from transformers import DynamicCache

    from effinfer.core.testing import tiny_model

    model, tokenizer = tiny_model("gemma3", layers=3, hidden=32, intermediate=64, seed=4, dtype=torch.float64)
    ids, mask = encode_prompts(tokenizer, ["abc abc abc abd, abc abc", "hello"], chat_template=True)
    config = GenerationConfig(max_new_tokens=16)
    stops = stop_token_ids(tokenizer, model, config)
    made = []

    def recorder(m):
        made.append(DynamicCache(config=m.config))
        return made[-1]

    strategy = make_strategy("lookahead", 4, [], HFEngine())
    result = strategy.generate(model, ids, mask, config, stops, cache_factory=recorder)
    assert result.sequences == HFEngine().decoding().generate(model, ids, mask, config, stops).sequences
    assert made and made[0].get_seq_length() > model.config.sliding_window
