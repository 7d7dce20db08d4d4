"""The three first techniques (one per level) and how they compose."""

from __future__ import annotations

import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from effinfer.core.compose import ComposedModel
from effinfer.core.generation import GenerationConfig, PlainDecoding, encode_prompts, stop_token_ids
from effinfer.core.stages import Request, SystemStage
from effinfer.core.testing import tiny_llama
from effinfer.plugins.data.input_compression.selective_context import SelectiveContext, compress, lexical_units
from effinfer.plugins.model.quantization.packing import pack_codes, quantize, unpack_codes
from effinfer.plugins.model.quantization.rtn import RTN, QuantizedLinear
from effinfer.plugins.system.speculative.prompt_lookup import PromptLookup, find_draft

bit_widths = st.sampled_from([2, 4, 8])


@settings(max_examples=40, deadline=None)
@given(bits=bit_widths, rows=st.integers(1, 12), groups=st.integers(1, 4), group=st.sampled_from([8, 16, 32]),
       symmetric=st.booleans(), scale=st.floats(1e-3, 1e2), seed=st.integers(0, 2**16))
def test_rtn_error_is_at_most_half_a_step(bits, rows, groups, group, symmetric, scale, seed):
    weight = torch.randn(rows, groups * group, generator=torch.Generator().manual_seed(seed)) * scale
    packed = quantize(weight, bits, group, symmetric)
    error = (weight - packed.dequantize()).abs().view(rows, groups, group).amax(-1)
    assert torch.all(error <= packed.scales.float() / 2 * (1 + 1e-5) + 1e-7)


@settings(max_examples=40, deadline=None)
@given(bits=bit_widths, rows=st.integers(1, 6), n=st.integers(1, 70), seed=st.integers(0, 1000))
def test_pack_unpack_round_trip(bits, rows, n, seed):
    codes = torch.randint(0, 2**bits, (rows, n), generator=torch.Generator().manual_seed(seed), dtype=torch.uint8)
    packed = pack_codes(codes, bits)
    assert packed.shape == (rows, -(-n * bits // 8))
    assert torch.equal(unpack_codes(packed, bits, n), codes)


def test_packed_bytes_match_the_arithmetic():
    weight = torch.randn(96, 64)
    int4 = quantize(weight, 4, 32, symmetric=False)
    assert int4.nbytes == 96 * 64 // 2 + 96 * 2 * 2 + 96 * 2  # codes + fp16 scales + uint8 zeros
    int8 = quantize(weight, 8, None, symmetric=True)
    assert int8.nbytes == 96 * 64 + 96 * 2


def test_rtn_swaps_linears_and_the_composition_restores_them(tiny):
    model, tokenizer = tiny
    ids, _ = encode_prompts(tokenizer, ["restore me"])
    before = model(ids).logits
    originals = {n: m for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)}
    with ComposedModel(model, tokenizer, [RTN({"bits": 8})]) as composed:
        swapped = [m for m in composed.model.modules() if isinstance(m, QuantizedLinear)]
        assert len(swapped) == len(originals) - 1  # lm_head skipped by default
        during = composed.model(ids).logits
        assert not torch.equal(during, before)
        assert torch.nn.functional.cosine_similarity(during.flatten(), before.flatten(), dim=0) > 0.99
        [(level, name, note)] = composed.report.entries
        assert (level, name) == ("model", "rtn") and "int8" in note
    assert {n: m for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)} == originals
    assert torch.equal(model(ids).logits, before)


def test_rtn_group_size_that_does_not_divide_is_explained(tiny):
    model, tokenizer = tiny
    try:
        with ComposedModel(model, tokenizer, [RTN({"bits": 4, "group_size": 48})]):
            raise AssertionError("expected a ValueError")
    except ValueError as error:
        assert "group_size=48 does not divide the layer's 64 input features" in str(error)


def test_prompt_lookup_drafts_the_latest_match():
    assert find_draft([1, 2, 3, 9, 1, 2, 3, 7, 8, 1, 2, 3], max_ngram=3, min_ngram=1, num_draft=2) == [7, 8]
    assert find_draft([5, 6, 7], max_ngram=3, min_ngram=1, num_draft=4) == []


prompts = st.text(alphabet="ab cd.", min_size=2, max_size=40)


@settings(max_examples=15, deadline=None)
@given(seed=st.integers(0, 100), prompt=prompts, new=st.integers(1, 30), draft=st.integers(1, 8))
def test_prompt_lookup_equals_plain_greedy(seed, prompt, new, draft):
    model, tokenizer = tiny_llama(seed=seed)
    config = GenerationConfig(max_new_tokens=new)
    ids, mask = encode_prompts(tokenizer, [prompt + prompt])
    stops = stop_token_ids(tokenizer, model, config)
    plain = PlainDecoding().generate(model, ids, mask, config, stops)
    strategy = PromptLookup({"num_draft_tokens": draft}).effinfer_decoding_strategy(stage=SystemStage(model, tokenizer))
    assert strategy.generate(model, ids, mask, config, stops).sequences == plain.sequences


def test_selective_context_removes_the_requested_share(tiny):
    model, tokenizer = tiny
    technique = SelectiveContext({"ratio": 0.4, "unit": "word", "min_tokens": 0})
    text = "the quick brown fox jumps over the lazy dog while the cat sleeps on the warm mat"
    request = Request.from_text("Summarize.", documents=[text])
    with ComposedModel(model, tokenizer, [technique]) as composed:
        compressed = composed.transform_request(request).documents[0]
    kept_words = compressed.split()
    assert set(kept_words) <= set(text.split())
    before, after = len(tokenizer(text)["input_ids"]), len(tokenizer(compressed)["input_ids"])
    assert 0.55 * before <= after + 1 and after < before  # word boundaries make it approximate
    assert request.documents == [text]  # the caller's request is not mutated
    [(level, name, note)] = composed.report.entries
    assert (level, name) == ("data", "selective_context") and "target 40%" in note


def test_selective_context_drops_least_informative_units_first():
    text = "aa bb cc"
    spans = [(0, 2), (3, 5), (6, 8)]
    units = lexical_units(text, spans, torch.tensor([5.0, 0.1, 3.0]), unit="word")
    assert compress(text, units, ratio=0.34)[0] == "aa cc"
