"""The static-cache engine: same tokens as HF generate, batches, sampling, fallbacks, settings.

No test compiles (compiling takes tens of seconds on a 2-core CPU): the compiled path is
exercised by ``benchmarks/engine.py``; here a failing ``torch.compile`` is simulated to
check the fallback.
"""

from __future__ import annotations

import types
import warnings
from pathlib import Path

import pytest
import torch
from transformers import DynamicCache, GPT2Config, GPT2LMHeadModel

from effinfer.core import compose as compose_module
from effinfer.core import hookimpl
from effinfer.core.compose import ComposedModel
from effinfer.core.registry import build_registry, get_registry
from effinfer.core.errors import ExperimentError
from effinfer.core.experiment import Experiment, Runtime
from effinfer.core.generation import GenerationConfig, PlainDecoding, encode_prompts, stop_token_ids
from effinfer.core.testing import tiny_llama
from effinfer.core.engines import DecodeEngine, HFEngine, tree_geometry
from effinfer.plugins.system.engine import Engine, StaticDecoding, StaticEngine, StaticKVCache
from effinfer.plugins.system.engine import compile as compile_module

PROMPTS = ["The quick brown fox jumps over the lazy dog.", "Hi", "Tell me about the sea, please."]


@pytest.fixture(autouse=True)
def one_thread():
    """Tiny models run faster on one thread, and the CPU is shared."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def batch(tokenizer, prompts=PROMPTS):
    return encode_prompts(tokenizer, prompts, chat_template=True)


def run(strategy, model, tokenizer, config, prompts=PROMPTS, cache_factory=None):
    ids, mask = batch(tokenizer, prompts)
    return strategy.generate(model, ids, mask, config, stop_token_ids(tokenizer, model, config),
                             cache_factory=cache_factory)


def test_greedy_tokens_equal_hf_generate_on_a_left_padded_batch(tiny):
    model, tokenizer = tiny
    ids, mask = batch(tokenizer)
    assert (mask == 0).any(), "the batch must be left-padded for this test to mean something"
    config = GenerationConfig(max_new_tokens=24)
    ours = run(StaticDecoding(), model, tokenizer, config)
    with torch.inference_mode():
        reference = model.generate(ids, attention_mask=mask, max_new_tokens=24, do_sample=False)
    hf = reference[:, ids.shape[1]:].tolist()
    stop = stop_token_ids(tokenizer, model, config)
    for row, tokens in enumerate(ours.sequences):
        assert tokens == hf[row][:len(tokens)]
        assert len(tokens) == 24 or tokens[-1] in stop
    assert ours.sequences == run(PlainDecoding(), model, tokenizer, config).sequences


@pytest.mark.parametrize("family", ["llama", "qwen2", "gemma3"])
def test_greedy_and_logits_equal_hf_on_every_layout(family):
    """Qwen2's biases; Gemma 3's scaled embeddings, q/k norms, four norms per block and sliding-window
    layers (the window of 8 tokens is crossed by these prompts): the static engine runs them itself."""
    from effinfer.core.testing import tiny_model

    model, tokenizer = tiny_model(family, layers=3, seed=1)
    ids, mask = batch(tokenizer)
    assert (mask == 0).any() and ids.shape[1] > 16
    config = GenerationConfig(max_new_tokens=16)
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)  # no fallback to the HF path
        ours = run(StaticDecoding(), model, tokenizer, config)
    with torch.inference_mode():
        reference = model.generate(ids, attention_mask=mask, max_new_tokens=16, do_sample=False)
    for row, tokens in enumerate(ours.sequences):
        assert tokens == reference[row, ids.shape[1]:].tolist()[:len(tokens)]
    engine = Engine(model)
    cache = engine.cache_for(ids.shape[0], ids.shape[1] + 4)
    logits = engine.prefill(cache, ids, mask).logits[:, -1]
    with torch.inference_mode():
        expected = model(input_ids=ids, attention_mask=mask).logits[:, -1].float()
    torch.testing.assert_close(logits, expected, atol=1e-4, rtol=1e-4)


def test_seeded_sampling_equals_the_reference_loop(tiny):
    model, tokenizer = tiny
    config = GenerationConfig(max_new_tokens=16, do_sample=True, seed=7, top_k=40, temperature=0.8)
    ours = run(StaticDecoding(), model, tokenizer, config)
    assert ours.sequences == run(PlainDecoding(), model, tokenizer, config).sequences
    again = run(StaticDecoding(), model, tokenizer, config)
    assert again.sequences == ours.sequences
    other = run(StaticDecoding(), model, tokenizer, config.model_copy(update={"seed": 8}))
    assert other.sequences != ours.sequences


def test_prefill_and_steps_match_hf_logits(tiny):
    model, tokenizer = tiny
    ids, mask = batch(tokenizer)
    engine = Engine(model)
    cache = engine.cache_for(ids.shape[0], ids.shape[1] + 4)
    ours = engine.prefill(cache, ids, mask).logits[:, -1]
    with torch.inference_mode():
        theirs = model(input_ids=ids, attention_mask=mask).logits[:, -1].float()
    torch.testing.assert_close(ours, theirs, atol=1e-4, rtol=1e-4)
    step = engine.decode(cache, ours.argmax(-1))
    with torch.inference_mode():
        longer = torch.cat([ids, ours.argmax(-1)[:, None]], dim=1)
        longer_mask = torch.cat([mask, mask.new_ones(mask.shape[0], 1)], dim=1)
        expected = model(input_ids=longer, attention_mask=longer_mask).logits[:, -1].float()
    torch.testing.assert_close(step, expected, atol=1e-4, rtol=1e-4)
    assert cache.length == ids.shape[1] + 1


def test_tree_forward_gives_each_branch_its_own_context(tiny):
    """A token tree's nodes see only their ancestors: each branch's logits equal a plain chain's."""
    model, tokenizer = tiny
    ids = torch.tensor([tokenizer("branching test")["input_ids"]])
    engine = Engine(model)
    cache = engine.cache_for(1, 64)
    engine.prefill(cache, ids, torch.ones_like(ids))
    # root 10; branches 10→20→30 and 10→21
    tree = engine.forward(cache, torch.tensor([[10, 20, 30, 21]]), parents=[-1, 0, 1, 0]).logits[0]
    chain_a = engine.forward(cache, torch.tensor([[10, 20, 30]])).logits[0]
    chain_b = engine.forward(cache, torch.tensor([[10, 21]])).logits[0]
    torch.testing.assert_close(tree[[0, 1, 2]], chain_a, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(tree[3], chain_b[1], atol=1e-5, rtol=1e-5)


def test_commit_moves_the_accepted_branch_into_place(tiny):
    model, tokenizer = tiny
    ids = torch.tensor([tokenizer("commit test")["input_ids"]])
    engine = Engine(model)
    cache = engine.cache_for(1, 64)
    engine.prefill(cache, ids, torch.ones_like(ids))
    start = cache.length
    engine.forward(cache, torch.tensor([[10, 20, 30, 21, 31]]), parents=[-1, 0, 1, 0, 3])
    cache.commit([0, 3, 4])  # keep the branch 10 → 21 → 31
    after_tree = engine.decode(cache, torch.tensor([5]))
    fresh = engine.cache_for(1, 64)
    engine.prefill(fresh, torch.cat([ids, torch.tensor([[10, 21, 31]])], dim=1),
                   torch.ones(1, ids.shape[1] + 3, dtype=torch.long))
    assert fresh.length == start + 3
    torch.testing.assert_close(after_tree, engine.decode(fresh, torch.tensor([5])), atol=1e-5, rtol=1e-5)


def test_tree_geometry_checks_parents():
    depth, mask = tree_geometry([-1, 0, 1, 0], 4, torch.device("cpu"))
    assert depth.tolist() == [0, 1, 2, 1]
    assert mask.tolist() == [[1, 0, 0, 0], [1, 1, 0, 0], [1, 1, 1, 0], [1, 0, 0, 1]]
    with pytest.raises(ValueError, match="parents"):
        tree_geometry([-1, 2, 0], 3, torch.device("cpu"))


def test_cache_is_reused_when_it_fits_and_refuses_overflow(tiny):
    model, tokenizer = tiny
    engine = Engine(model)
    first = engine.cache_for(2, 100)
    assert engine.cache_for(2, 200) is first  # capacities are rounded up to 256
    assert engine.cache_for(1, 100) is not first
    cache = StaticKVCache.allocate(1, 1, 1, 4, 2, torch.float32, "cpu")
    cache.length = 3
    with pytest.raises(RuntimeError, match="cache full"):
        cache.check_room(2)


def test_a_failing_compile_falls_back_to_eager_with_a_warning(tiny, monkeypatch):
    model, tokenizer = tiny

    def broken_compile(fn, **kwargs):
        def call(*args):
            raise RuntimeError("inductor exploded")
        return call

    monkeypatch.setattr(compile_module.torch, "compile", broken_compile)
    config = GenerationConfig(max_new_tokens=8)
    strategy = StaticDecoding(StaticEngine(compile=True))
    with pytest.warns(RuntimeWarning, match="inductor exploded"):
        result = run(strategy, model, tokenizer, config)
    assert result.sequences == run(StaticDecoding(), model, tokenizer, config).sequences
    report = strategy.engine.compile_report()
    assert report["steps"]["decode step"]["active"] is False
    assert "inductor exploded" in report["steps"]["decode step"]["failure"]


def test_unsupported_architectures_use_the_hf_path():
    _, tokenizer = tiny_llama()
    gpt2 = GPT2LMHeadModel(GPT2Config(vocab_size=len(tokenizer), n_positions=256, n_embd=32, n_layer=1,
                                      n_head=2, eos_token_id=tokenizer.eos_token_id)).eval()
    config = GenerationConfig(max_new_tokens=6)
    strategy = StaticDecoding()
    with pytest.warns(RuntimeWarning, match="static engine unavailable"):
        ours = run(strategy, gpt2, tokenizer, config)
    assert ours.sequences == run(PlainDecoding(), gpt2, tokenizer, config).sequences


def test_a_kv_cache_policy_keeps_the_hf_path_and_a_recorder_sees_static_buffers(tiny):
    model, tokenizer = tiny
    config = GenerationConfig(max_new_tokens=6)

    class PolicyCache(DynamicCache):
        pass

    made = []

    def policy(m):
        made.append(PolicyCache(config=m.config))
        return made[-1]

    with pytest.warns(RuntimeWarning, match="KV-cache policy"):
        run(StaticDecoding(), model, tokenizer, config, cache_factory=policy)
    assert made[0].get_seq_length() > 0  # the policy's cache did the work

    recorded = []

    def recorder(m):
        recorded.append(DynamicCache(config=m.config))
        return recorded[-1]

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        run(StaticDecoding(), model, tokenizer, config, cache_factory=recorder)
    assert isinstance(recorded[0].static_kv, StaticKVCache)


def test_experiments_default_to_the_static_engine_and_can_choose_hf(tiny, tmp_path):
    model, tokenizer = tiny
    assert isinstance(ComposedModel(model, tokenizer).strategy, StaticDecoding)
    assert isinstance(ComposedModel(model, tokenizer, engine="hf").strategy, PlainDecoding)
    runtime = Experiment().runtime
    assert (runtime.engine, runtime.compile) == ("static", False)
    with ComposedModel(model, tokenizer, engine="static", compile=False) as composed:
        assert isinstance(composed.system.engine, StaticEngine) and composed.system.engine.compile is False
        static = composed.generate(["Hello"], GenerationConfig(max_new_tokens=8))[1]
    with ComposedModel(model, tokenizer, engine="hf") as composed:
        reference = composed.generate(["Hello"], GenerationConfig(max_new_tokens=8))[1]
    assert static.sequences == reference.sequences
    bad = tmp_path / "bad.yaml"
    bad.write_text("runtime:\n  engine: statik\n")
    with pytest.raises(ExperimentError, match=r"runtime.engine: unknown engine 'statik'; did you mean: static\?"):
        Experiment.from_yaml(bad).build_stack()


def test_the_static_engine_is_a_plugin_registered_through_the_public_hook():
    """Core does not import the engine: the entry point registers it like any third party."""
    import importlib.metadata

    registry = get_registry()
    assert set(registry.engines) >= {"hf", "static"}
    assert registry.engines["static"].distribution == "effinfer"
    points = {ep.name: ep.value for ep in importlib.metadata.entry_points(group="effinfer")}
    assert points.get("engine") == "effinfer.plugins.system.engine"
    core = Path(compose_module.__file__).parent
    offenders = [f.name for f in core.glob("*.py") if "import effinfer.plugins" in f.read_text()
                 or "from effinfer.plugins" in f.read_text()]
    assert not offenders, f"core modules import a plugin: {offenders}"


def test_a_third_party_engine_is_chosen_by_name_and_duplicates_are_refused(tiny):
    model, tokenizer = tiny
    made = []

    class Mine(HFEngine):
        name = "mine"

    def factory(compile=False):
        made.append(compile)
        return Mine(compile)

    plugin = types.ModuleType("my_engine")
    plugin.effinfer_register_engines = hookimpl(lambda register: register("mine", factory, description="demo"))
    clash = types.ModuleType("clash")
    clash.effinfer_register_engines = hookimpl(lambda register: register("static", factory))
    registry = build_registry([(plugin, "my_engine"), (clash, "clash")])
    assert registry.engines["mine"].description == "demo"
    assert [b.plugin for b in registry.broken] == ["clash"]
    assert "engine name 'static' is already registered" in registry.broken[0].error
    assert registry.engines["static"].factory is not factory
    composed = ComposedModel(model, tokenizer, engine="mine", compile=True, registry=registry)
    assert isinstance(composed.engine, Mine) and composed.engine.compile and made == [True]
    assert isinstance(composed.strategy, PlainDecoding)
    runtime = Runtime(engine="mine")
    assert Experiment(runtime=runtime).build_stack(registry) == []
    with pytest.raises(ExperimentError, match="unknown engine 'mine'"):
        Experiment(runtime=runtime).build_stack()  # the process-wide registry does not have it


@pytest.mark.real_model
def test_real_model_greedy_equals_hf_generate(smollm2):
    model, tokenizer = smollm2
    ids, mask = encode_prompts(tokenizer, ["What is the capital of France?", "Name three colours."])
    config = GenerationConfig(max_new_tokens=24)
    ours = StaticDecoding().generate(model, ids, mask, config, stop_token_ids(tokenizer, model, config))
    with torch.inference_mode():
        reference = model.generate(ids, attention_mask=mask, max_new_tokens=24, do_sample=False)
    for row, tokens in enumerate(ours.sequences):
        assert tokens == reference[row, ids.shape[1]:].tolist()[:len(tokens)]
    assert "Paris" in tokenizer.decode(ours.sequences[0])


def test_the_compiled_code_path_gives_the_same_tokens(tiny, monkeypatch):
    """What compiling changes — fused projections, trees padded to a bucket — run eagerly here."""
    from effinfer.plugins.system.speculative.lookahead import Lookahead, LookaheadDecoding

    model, tokenizer = tiny
    monkeypatch.setattr(compile_module.torch, "compile", lambda fn, **kwargs: fn)
    config = GenerationConfig(max_new_tokens=20)
    assert run(StaticDecoding(StaticEngine(compile=True)), model, tokenizer, config).sequences == \
        run(StaticDecoding(), model, tokenizer, config).sequences
    lookahead = LookaheadDecoding(Lookahead.Config(), StaticEngine(compile=True))
    assert run(lookahead, model, tokenizer, config).sequences == run(StaticDecoding(), model, tokenizer, config).sequences
    assert lookahead.engine.compile_report()["steps"]["tree step"]["shapes"] == 1  # one bucket


# --------------------------------------------------------------------------- a third-party engine, every strategy

class CountingRunner:
    """Wraps the core's HF runner and counts what the loop calls."""

    def __init__(self, inner, calls):
        self.inner, self.calls = inner, calls

    model = property(lambda self: self.inner.model)
    length = property(lambda self: self.inner.length)

    def __getattr__(self, name):
        method = getattr(self.inner, name)
        if name in {"prefill", "forward", "commit", "truncate", "step"}:
            def counted(*args, **kwargs):
                self.calls[name] += 1
                return method(*args, **kwargs)
            return counted
        return method


class CountingEngine(HFEngine):
    """A third-party engine: the HF path, counting runner calls and plain decodes."""

    name = "counting"
    made: list = []

    def __init__(self, compile=False):
        super().__init__(compile)
        self.calls = __import__("collections").Counter()
        self.runner_names = []
        CountingEngine.made.append(self)

    def decoding(self):
        self.calls["decoding"] += 1
        return super().decoding()

    def runner(self, model, tokens, max_nodes, cache_factory=None, name="target"):
        self.runner_names.append(name)
        return CountingRunner(super().runner(model, tokens, max_nodes, cache_factory, name), self.calls)


SPECULATIVE = {
    "prompt_lookup": {"num_draft_tokens": 3},
    "draft_model": {"techniques": ["rtn:bits=8"], "num_draft_tokens": 3},
    "self_speculative": {"skip_layers": [1], "num_draft_tokens": 2},
    "lookahead": {"window": 3, "ngram": 2},
    "rest": {"max_nodes": 4},
    "medusa": {"heads": 2, "topk": [2, 2], "max_nodes": 4},
}


@pytest.mark.parametrize("name", sorted(SPECULATIVE))
def test_every_speculative_strategy_runs_on_a_third_party_engine(name, monkeypatch):
    """The runtime's engine reaches every strategy through SystemStage.engine: its runners do all the work."""
    import numpy as np

    from effinfer.core.runner import run_experiment
    from effinfer.core.testing import tiny_llama
    from effinfer.plugins.system.speculative import medusa, rest
    from effinfer.plugins.system.speculative.datastore import Datastore
    from effinfer.plugins.system.speculative.medusa_heads import MedusaHeads, TrainingReport

    trained_on = []

    def quick_heads(model, tokenizer, options, engine):  # no corpus, no training: random heads
        trained_on.append(engine)
        torch.manual_seed(0)
        heads = MedusaHeads(model.config.hidden_size, options.heads).to(next(model.parameters()).dtype)
        return heads, TrainingReport(0, 0, 0, 0.0, 0.0, 0.0, 0, 0.0, [], cached=True)

    monkeypatch.setattr(medusa, "train_medusa", quick_heads)
    monkeypatch.setattr(rest, "build_datastore",
                        lambda tokenizer, corpora, split: (Datastore(np.arange(300) % 40 + 3), Path("."), True))
    plugin = types.ModuleType("counting_engine")
    plugin.effinfer_register_engines = hookimpl(lambda register: register("counting", CountingEngine))
    registry = build_registry([(plugin, "counting_engine")])
    model, tokenizer = tiny_llama(layers=3, seed=2, dtype=torch.float64)
    prompts = ["abc abc abc abd", "hello hello"]
    experiment = Experiment(techniques=[{"name": name, "config": SPECULATIVE[name]}], prompts=prompts, runtime=Runtime(engine="counting"),
                            generation=GenerationConfig(max_new_tokens=12))
    CountingEngine.made.clear()
    result = run_experiment(experiment, registry, model, tokenizer)
    [engine] = CountingEngine.made
    assert engine.calls["prefill"] >= 2 and engine.calls["forward"] >= 2 and engine.calls["commit"] >= 2
    assert engine.runner_names.count("target") == 2  # one per prompt
    if name in ("draft_model", "self_speculative"):
        assert {"draft", "self-draft"} & set(engine.runner_names), engine.runner_names
    if name == "medusa":
        assert trained_on == [engine]
    plain = Experiment(prompts=prompts, runtime=Runtime(engine="hf"), generation=experiment.generation)
    assert [c.tokens for c in result.completions] == \
        [c.tokens for c in run_experiment(plain, registry, model, tokenizer).completions]


def test_the_engine_table_does_not_keep_models_alive():
    """Engines are cached per model in a WeakKeyDictionary: an engine must not hold its model strongly."""
    import gc

    from effinfer.core.testing import tiny_llama
    from effinfer.plugins.system.engine import static

    model, tokenizer = tiny_llama(layers=1)
    run(StaticDecoding(), model, tokenizer, GenerationConfig(max_new_tokens=2))
    assert model in static._ENGINES
    before = len(static._ENGINES)
    del model
    gc.collect()
    assert len(static._ENGINES) == before - 1
