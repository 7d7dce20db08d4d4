"""The core decode loop equals transformers' generate and honours its settings."""

from __future__ import annotations

import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from effinfer.core.generation import GenerationConfig, PlainDecoding, encode_prompts, stop_token_ids
from effinfer.core.testing import tiny_llama

words = st.text(alphabet="abcdefgh ijk.,", min_size=1, max_size=30)


def plain(model, tokenizer, prompts, **config):
    config = GenerationConfig(**config)
    ids, mask = encode_prompts(tokenizer, prompts)
    return PlainDecoding().generate(model, ids, mask, config, stop_token_ids(tokenizer, model, config)), ids, mask


@settings(max_examples=12, deadline=None)
@given(seed=st.integers(0, 50), prompts=st.lists(words, min_size=1, max_size=3), new=st.integers(1, 24))
def test_greedy_equals_hf_generate(seed, prompts, new):
    model, tokenizer = tiny_llama(seed=seed)
    result, ids, mask = plain(model, tokenizer, prompts, max_new_tokens=new)
    reference = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=new, do_sample=False)
    for row, tokens in enumerate(result.sequences):
        expected = reference[row, ids.shape[1]:].tolist()
        assert tokens == expected[:len(tokens)]
        assert len(tokens) == new or tokens[-1] == tokenizer.eos_token_id


def test_sampling_is_seeded(tiny):
    model, tokenizer = tiny
    first, _, _ = plain(model, tokenizer, ["hello"], do_sample=True, seed=3, max_new_tokens=20)
    again, _, _ = plain(model, tokenizer, ["hello"], do_sample=True, seed=3, max_new_tokens=20)
    other, _, _ = plain(model, tokenizer, ["hello"], do_sample=True, seed=4, max_new_tokens=20)
    assert first.sequences == again.sequences
    assert first.sequences != other.sequences


def test_top_k_one_is_greedy(tiny):
    model, tokenizer = tiny
    greedy, _, _ = plain(model, tokenizer, ["abc"], max_new_tokens=15)
    top1, _, _ = plain(model, tokenizer, ["abc"], do_sample=True, top_k=1, max_new_tokens=15)
    assert greedy.sequences == top1.sequences


def test_stop_token_ends_generation(tiny):
    model, tokenizer = tiny
    free, _, _ = plain(model, tokenizer, ["abc"], max_new_tokens=15)
    stop = free.sequences[0][4]
    stopped, _, _ = plain(model, tokenizer, ["abc"], max_new_tokens=15, stop_token_ids=[stop])
    first = free.sequences[0].index(stop)
    assert stopped.sequences[0] == free.sequences[0][:first + 1]


def test_timings_are_separate(tiny):
    model, tokenizer = tiny
    result, _, _ = plain(model, tokenizer, ["abc", "de"], max_new_tokens=5)
    assert result.prefill_seconds > 0 and result.decode_seconds > 0
    assert result.forward_steps == 4  # the first token comes from the prefill


def test_byte_tokenizer_round_trips():
    _, tokenizer = tiny_llama()
    text = "héllo, wörld — ∑ 42"
    assert tokenizer.decode(tokenizer(text)["input_ids"]) == text
    assert torch.is_tensor(encode_prompts(tokenizer, [text])[0])
