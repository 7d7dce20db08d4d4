"""Every built-in technique on the three model families the built-in sources cover.

Tiny random Llama (SmolLM2), Qwen2 (Qwen2.5-Coder: q/k/v biases) and Gemma 3 (gemma-3-270m:
scaled embeddings, ``1 + weight`` RMSNorms, norms around attention and MLP, q/k norms,
sliding-window and global layers) models from :mod:`effinfer.core.testing`:

- model level (rtn, gptq, awq, smoothquant, llm_int8, qat): quantize, stay close to the float
  model, restore exactly, save and reload identically; the scale folding AWQ and SmoothQuant
  use keeps the float function; layer-by-layer calibration sees each layer's real inputs;
- data level (selective_context): compresses a context with each family as the scorer;
- system level (the static engine and the speculative strategies): greedy output equals
  transformers' reference decoding;
- real models (marked ``real_model``): the Qwen2.5-Coder 0.5B and Gemma 3 270M aliases load
  and answer; the Qwen pair shares its tokenizer.
"""

from __future__ import annotations

import pytest
import torch

from effinfer.core.compose import ComposedModel
from effinfer.core.experiment import Experiment
from effinfer.core.generation import GenerationConfig
from effinfer.core.stages import ModulePatcher, Request
from effinfer.core.testing import FAMILY_LAYOUTS, TINY_FAMILIES, tiny_model
from effinfer.plugins.model.calibration import text_source
from effinfer.plugins.model.quantization.checkpoint import load_quantized, save_quantized
from effinfer.plugins.model.quantization.layers import PackedLayer
from effinfer.plugins.model.quantization.layerwise import decoder_layers, first_layer_inputs, run_layer

FAMILIES = list(TINY_FAMILIES)
TEXT = ("The quick brown fox jumps over the lazy dog. Quantization stores weights in fewer bits; "
        "calibration text shows the quantizer which activations are large. ") * 40
SMALL = {"n_samples": 4, "seq_len": 48}

MODEL_STACKS = {
    "rtn": {"bits": 4},
    "gptq": {"bits": 4, **SMALL},
    "awq": {"bits": 4, "alpha_grid": 4, "clip_grid": 4, **SMALL},
    "smoothquant": {"smooth_down_proj": True, **SMALL},
    "llm_int8": {"threshold": 1.5, **SMALL},
    "qat": {"steps": 2, "seq_len": 24, "n_samples": 2, "batch_size": 2, "data": "self_generated"},
}


def build(name: str, config: dict | None = None) -> list:
    return Experiment(techniques=[{"name": name, "config": config or {}}]).build_stack()


@pytest.fixture(params=FAMILIES)
def family(request):
    return request.param


@pytest.fixture
def tiny(family):
    return tiny_model(family, layers=2, seed=0)


def test_tiny_families_have_their_layouts_and_vary(family):
    model, tokenizer = tiny_model(family)
    assert model.config.model_type == FAMILY_LAYOUTS[family]
    ids = tokenizer("a prompt long enough to cross the sliding window", return_tensors="pt").input_ids
    out = model.generate(ids, max_new_tokens=12, do_sample=False)[0, ids.shape[1]:].tolist()
    assert len(set(out)) > 3, "greedy decoding of a tiny model should not repeat one token"


# --------------------------------------------------------------------------- model level


@pytest.mark.parametrize("name", list(MODEL_STACKS))
def test_model_techniques_quantize_restore_and_reload(name, tiny, tmp_path):
    model, tokenizer = tiny
    calibration = text_source(tokenizer, TEXT, seed=1)
    ids = text_source(tokenizer, TEXT, seed=7)(2, 32)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    with torch.no_grad():
        reference = model(ids).logits
        with ComposedModel(model, tokenizer, build(name, MODEL_STACKS[name]), calibration=calibration) as composed:
            layers = [m for m in composed.model.modules() if isinstance(m, PackedLayer)]
            assert len(layers) == 14  # 2 blocks × 7 projections; the output layer is skipped
            out = composed.model(ids).logits
            similarity = torch.nn.functional.cosine_similarity(out.flatten(), reference.flatten(), dim=0)
            assert similarity > 0.8, similarity
            save_quantized(composed.model, tokenizer, tmp_path / name, {"name": name})
        reloaded, _ = load_quantized(tmp_path / name)
        assert reloaded.config.model_type == model.config.model_type
        assert torch.equal(reloaded(ids).logits, out)
    assert all(torch.equal(state[k], v) for k, v in model.state_dict().items())  # the composition restored it


@pytest.mark.parametrize("technique", ["awq", "smoothquant"])
def test_scale_folding_keeps_the_float_model(technique, tiny):
    """Dividing a producer by ``s`` and multiplying its readers by ``s`` changes nothing (Gemma: ``1 + w`` gains)."""
    from effinfer.plugins.model.quantization import awq, smoothquant
    from effinfer.plugins.model.quantization.scaling import fold_scales

    model, _ = tiny
    ids = torch.randint(0, 200, (1, 24))
    groups_of = awq.scale_groups if technique == "awq" else (
        lambda layer: smoothquant.smoothing_groups(layer, down_proj=True))
    with torch.no_grad():
        before = model(ids).logits
        patcher = ModulePatcher()
        for layer in model.model.layers:
            for group in groups_of(layer):
                width = layer.get_submodule(group.linears[0]).in_features
                fold_scales(layer, group, torch.rand(width, generator=torch.Generator().manual_seed(width)) * 3 + 0.1,
                            patcher)
        torch.testing.assert_close(model(ids).logits, before, atol=2e-4, rtol=1e-4)
        patcher.restore()
        assert torch.equal(model(ids).logits, before)


def test_norm_gain_conventions_are_measured():
    from transformers.models.gemma3.modeling_gemma3 import Gemma3RMSNorm
    from transformers.models.llama.modeling_llama import LlamaRMSNorm

    from effinfer.plugins.model.quantization.scaling import norm_gain_offset

    llama, gemma, layer_norm = LlamaRMSNorm(7), Gemma3RMSNorm(7), torch.nn.LayerNorm(7)
    with torch.no_grad():
        for norm in (llama, gemma, layer_norm):
            norm.weight.normal_(0.5, 0.2)
        layer_norm.bias.normal_()
    assert (norm_gain_offset(llama), norm_gain_offset(gemma), norm_gain_offset(layer_norm)) == (0.0, 1.0, 0.0)
    with pytest.raises(ValueError, match="cannot fold scales into odd .Identity.: it has no per-channel weight"):
        norm_gain_offset(torch.nn.Identity(), "odd")


def test_gemma_gains_lost_to_rounding_are_refused():
    """``(1 + w) / s − 1`` in bfloat16 cannot hold a gain much smaller than 1."""
    from effinfer.plugins.model.quantization.scaling import ScaleGroup, fold_scales

    model, _ = tiny_model("gemma3", layers=1, dtype=torch.bfloat16)
    group = ScaleGroup("input_layernorm", ["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"])
    with pytest.raises(ValueError, match="loses .* of a gain to rounding; load the model in float32"):
        fold_scales(model.model.layers[0], group, torch.full((64,), 300.0), ModulePatcher())


def test_layerwise_calibration_gives_every_layer_its_own_inputs(family):
    """Gemma 3's global and sliding-window layers get different masks and rotary embeddings."""
    model, tokenizer = tiny_model(family, layers=3, seed=2)
    ids = text_source(tokenizer, TEXT, seed=3)(2, 40)  # longer than the tiny Gemma's window (8)
    _, layers = decoder_layers(model)
    outputs = []
    handles = [layer.register_forward_hook(lambda _m, _a, out: outputs.append(out[0] if isinstance(out, tuple)
                                                                             else out)) for layer in layers]
    with torch.no_grad():
        model(ids)
        for handle in handles:
            handle.remove()
        batches = first_layer_inputs(model, ids, batch_size=1)
        assert all(isinstance(layer, type(layers[0])) for layer in layers), "the real layers are back"
        for layer, expected in zip(layers, outputs):
            batches = run_layer(layer, batches)
            torch.testing.assert_close(torch.cat([b.hidden for b in batches]), expected)


# --------------------------------------------------------------------------- data level


def test_selective_context_compresses_with_each_family(tiny):
    model, tokenizer = tiny
    document = ("Selective context drops the least informative phrases of a long context. " * 6).strip()
    request = Request.from_text("Summarize the document.", documents=[document])
    with ComposedModel(model, tokenizer, build("selective_context", {"ratio": 0.5, "min_tokens": 8})) as composed:
        compressed = composed.transform_request(request)
    assert len(compressed.documents[0]) < 0.8 * len(document)
    assert any(name == "selective_context" for _, name, _ in composed.report.entries)


# --------------------------------------------------------------------------- system level

SYSTEM_STACKS = {
    "static": None,  # the static engine's plain greedy loop, no strategy
    "prompt_lookup": {"num_draft_tokens": 3},
    "draft_model": {"techniques": ["rtn:bits=8"], "num_draft_tokens": 3},
    "self_speculative": {"skip_layers": [1], "num_draft_tokens": 2},
    "lookahead": {"window": 3, "ngram": 3},
    "rest": {"max_nodes": 6},
    "medusa": {"heads": 2, "topk": [2, 2], "max_nodes": 4, "train_prompts": 4, "train_new_tokens": 16,
               "epochs": 1, "batch_size": 16},
}
#: (family, technique) cases known to fail, with the reason; strict, so they flip to a failure once fixed
SYSTEM_XFAIL: dict[tuple[str, str], str] = {}
PROMPT = "abc abc abd. The window of a sliding layer is short; abc abc abd"


def system_case(family: str, name: str):
    reason = SYSTEM_XFAIL.get((family, name))
    marks = [pytest.mark.xfail(strict=True, reason=reason)] if reason else []
    return pytest.param(family, name, marks=marks, id=f"{family}-{name}")


@pytest.fixture
def offline_corpus(monkeypatch, tmp_path):
    """REST's datastore and Medusa's training prompts from a fixed text, cached in a scratch folder."""
    import effinfer.data as data

    monkeypatch.setenv("EFFINFER_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(data, "load_corpus", lambda name, split="all", **_: {"text": [TEXT, PROMPT * 3]})


@pytest.mark.parametrize(("family", "name"), [system_case(f, n) for f in FAMILIES for n in SYSTEM_STACKS])
def test_system_techniques_reproduce_reference_greedy_decoding(family, name, offline_corpus):
    # float64 keeps near-ties from flipping between the two paths (Medusa's float32 heads feed it in float64)
    model, tokenizer = tiny_model(family, layers=3, seed=4, dtype=torch.float64)
    config = GenerationConfig(max_new_tokens=24)
    request = Request.from_text(PROMPT)
    with ComposedModel(model, tokenizer, [], engine="hf") as plain:
        [reference], _ = plain.generate([request], config)
    stack = [] if SYSTEM_STACKS[name] is None else build(name, SYSTEM_STACKS[name])
    with ComposedModel(model, tokenizer, stack, engine="static") as composed:
        [completion], _ = composed.generate([request], config)
    assert completion.tokens == reference.tokens


@pytest.mark.parametrize("family", FAMILIES)
def test_the_reference_path_is_transformers_generate(family):
    model, tokenizer = tiny_model(family, layers=3, seed=4, dtype=torch.float64)
    config = GenerationConfig(max_new_tokens=24)
    with ComposedModel(model, tokenizer, [], engine="hf") as plain:
        [completion], _ = plain.generate([Request.from_text(PROMPT)], config)
    ids = tokenizer.apply_chat_template([{"role": "user", "content": PROMPT}], add_generation_prompt=True,
                                        return_tensors="pt", return_dict=True)["input_ids"]
    expected = model.generate(ids, max_new_tokens=24, do_sample=False)[0, ids.shape[1]:].tolist()
    assert completion.tokens == expected[:len(completion.tokens)] and len(completion.tokens) > 0


@pytest.mark.parametrize("dtype", [torch.float64, torch.bfloat16])
def test_medusa_on_a_float64_model(offline_corpus, dtype):
    """Float32 heads (trained and cached in float32) feed the model's LM head in the model's dtype."""
    model, tokenizer = tiny_model("llama", layers=3, seed=4, dtype=dtype)
    with ComposedModel(model, tokenizer, build("medusa", SYSTEM_STACKS["medusa"]), engine="static") as composed:
        [completion], result = composed.generate([Request.from_text(PROMPT)], GenerationConfig(max_new_tokens=8))
        assert composed.strategy.heads.model_dtype == dtype and len(completion.tokens) > 0
        assert result.drafted_per_step  # the heads drafted
    if dtype == torch.float64:  # lossless in a wide enough dtype: plain greedy's tokens
        with ComposedModel(model, tokenizer, [], engine="hf") as plain:
            [reference], _ = plain.generate([Request.from_text(PROMPT)], GenerationConfig(max_new_tokens=8))
        assert completion.tokens == reference.tokens


# --------------------------------------------------------------------------- real models (CI downloads ~750 MB once)

QWEN_DRAFT, QWEN_TARGET, GEMMA = "qwen2.5-coder-0.5b-instruct", "qwen2.5-coder-1.5b-instruct", "gemma-3-270m"


@pytest.fixture(scope="module")
def qwen_coder():
    from effinfer.core.models import load_model

    return load_model(QWEN_DRAFT)


@pytest.mark.real_model
def test_qwen_coder_loads_by_alias_and_answers(qwen_coder):
    from effinfer.core.runner import run_experiment

    model, tokenizer = qwen_coder
    assert (model.config.model_type, model.config.num_hidden_layers, model.config.hidden_size) == ("qwen2", 24, 896)
    run = run_experiment(Experiment(model=QWEN_DRAFT, prompts=["What is the capital of France?"],
                                    generation={"max_new_tokens": 10}), model=model, tokenizer=tokenizer)
    assert "Paris" in run.completions[0].text


@pytest.mark.real_model
def test_gemma_base_model_loads_by_alias_and_continues_a_fact():
    from effinfer.core.generation import PlainDecoding, encode_prompts, stop_token_ids
    from effinfer.core.models import load_model

    model, tokenizer = load_model(GEMMA)
    assert (model.config.model_type, model.config.num_hidden_layers, model.config.sliding_window) == (
        "gemma3_text", 18, 512)
    ids, mask = encode_prompts(tokenizer, ["The Eiffel Tower is located in the city of"], chat_template=False)
    config = GenerationConfig(max_new_tokens=4)
    result = PlainDecoding().generate(model, ids, mask, config, stop_token_ids(tokenizer, model, config))
    assert "Paris" in tokenizer.decode(result.sequences[0])


@pytest.mark.real_model
def test_the_qwen_pair_shares_its_tokenizer(qwen_coder):
    """The 0.5B drafts for the 1.5B: their token ids must be identical (the 1.5B is not fetched by the tests)."""
    from transformers import AutoTokenizer

    from effinfer.core.models import BUILTIN_ALIASES

    target = BUILTIN_ALIASES[QWEN_TARGET].folder
    if not (target / ".complete").exists():
        pytest.skip(f"{QWEN_TARGET} (6.7 GB once converted) is not in the cache; "
                    f"`effinfer generate --model {QWEN_TARGET}` fetches it")
    draft_tokenizer, target_tokenizer = qwen_coder[1], AutoTokenizer.from_pretrained(target)
    texts = ["The quick brown fox jumps over the lazy dog.", "def fib(n):\n    return n if n < 2 else fib(n - 1)",
             "Ünïcödé — 日本語のテキスト 🚀🐍", "<|im_start|>user\nhi<|im_end|>"]
    for text in texts:
        assert draft_tokenizer(text)["input_ids"] == target_tokenizer(text)["input_ids"]
    assert len(draft_tokenizer) == len(target_tokenizer)
