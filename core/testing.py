"""Tiny random models for tests, in this project and in plugin packages.

``tiny_llama()``, ``tiny_qwen2()`` and ``tiny_gemma3()`` build randomly initialised
models of the three families the built-in model sources cover (SmolLM2, Qwen2.5-Coder,
Gemma 3), with a byte-level tokenizer, in a fraction of a second and with no download:
enough to check shapes, losslessness and composition without a real model.
``tiny_model(family)`` picks one by name, for parametrized tests::

    from effinfer.core.testing import TINY_FAMILIES, tiny_llama, tiny_model
    model, tokenizer = tiny_llama(layers=2, seed=0)

    @pytest.mark.parametrize("family", TINY_FAMILIES)
    def test_something(family):
        model, tokenizer = tiny_model(family)
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers
from transformers import (Gemma3ForCausalLM, Gemma3TextConfig, LlamaConfig, LlamaForCausalLM, PreTrainedModel,
                          PreTrainedTokenizerFast, Qwen2Config, Qwen2ForCausalLM)

SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
CHAT_TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n{{ message['content'] }}"
    "<|im_end|>\n{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def byte_tokenizer() -> PreTrainedTokenizerFast:
    """A byte-level tokenizer (256 byte tokens + ChatML specials); any text round-trips."""
    alphabet = pre_tokenizers.ByteLevel.alphabet()
    vocab = {token: i for i, token in enumerate(SPECIAL_TOKENS + sorted(alphabet))}
    core = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    core.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    core.decoder = decoders.ByteLevel()
    core.add_special_tokens(SPECIAL_TOKENS)
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=core, bos_token="<|im_start|>", eos_token="<|im_end|>",
        unk_token="<|endoftext|>", pad_token="<|im_end|>",
    )
    tokenizer.chat_template = CHAT_TEMPLATE
    return tokenizer


def tiny_llama(layers: int = 2, hidden: int = 64, heads: int = 4, kv_heads: int = 2,
               intermediate: int = 128, seed: int = 0, init_scale: float = 0.3, dtype: torch.dtype = torch.float32
               ) -> tuple[LlamaForCausalLM, PreTrainedTokenizerFast]:
    """A random Llama (SmolLM2's architecture, scaled down) and its byte tokenizer."""
    tokenizer = byte_tokenizer()
    config = LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=hidden, intermediate_size=intermediate,
        num_hidden_layers=layers, num_attention_heads=heads, num_key_value_heads=kv_heads,
        max_position_embeddings=2048, tie_word_embeddings=True,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        # HF's default 0.02 gives near-uniform logits and one repeated token; a larger
        # scale makes greedy paths varied, so losslessness tests can actually fail.
        initializer_range=init_scale,
    )
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config).to(dtype).eval()
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    return model, tokenizer


def _finish(model: PreTrainedModel, tokenizer: PreTrainedTokenizerFast, dtype: torch.dtype) -> None:
    model.to(dtype).eval()
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.generation_config.pad_token_id = tokenizer.pad_token_id


def _token_ids(tokenizer: PreTrainedTokenizerFast) -> dict[str, int]:
    return {"vocab_size": len(tokenizer), "bos_token_id": tokenizer.bos_token_id,
            "eos_token_id": tokenizer.eos_token_id, "pad_token_id": tokenizer.pad_token_id}


def _randomize_norms(model: PreTrainedModel, seed: int, spread: float) -> None:
    """Move every RMSNorm gain off its neutral value, as in a trained model.

    A freshly initialised norm is the identity (gain 1), which hides mistakes in code that
    folds scales into norms (e.g. Gemma's ``(1 + weight)`` gain); trained models never
    have it.
    """
    generator = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for name, module in model.named_modules():
            if "norm" in type(module).__name__.lower() and isinstance(getattr(module, "weight", None), torch.Tensor):
                module.weight.add_(torch.randn(module.weight.shape, generator=generator) * spread)


def tiny_qwen2(layers: int = 2, hidden: int = 64, heads: int = 4, kv_heads: int = 2, intermediate: int = 128,
               seed: int = 0, init_scale: float = 0.3, dtype: torch.dtype = torch.float32, norm_spread: float = 0.2
               ) -> tuple[Qwen2ForCausalLM, PreTrainedTokenizerFast]:
    """A random Qwen2 (Qwen2.5-Coder's architecture, scaled down: q/k/v biases, tied embeddings)."""
    tokenizer = byte_tokenizer()
    config = Qwen2Config(
        hidden_size=hidden, intermediate_size=intermediate, num_hidden_layers=layers,
        num_attention_heads=heads, num_key_value_heads=kv_heads, max_position_embeddings=2048,
        tie_word_embeddings=True, initializer_range=init_scale, rope_theta=1e6, **_token_ids(tokenizer),
    )
    torch.manual_seed(seed)
    model = Qwen2ForCausalLM(config)
    with torch.no_grad():  # HF initialises biases to zero; Qwen2.5's are not
        for module in model.modules():
            if isinstance(module, torch.nn.Linear) and module.bias is not None:
                module.bias.normal_(0.0, init_scale)
    _randomize_norms(model, seed, norm_spread)
    _finish(model, tokenizer, dtype)
    return model, tokenizer


def tiny_gemma3(layers: int = 2, hidden: int = 64, heads: int = 4, kv_heads: int = 1, intermediate: int = 128,
                head_dim: int = 16, sliding_window: int = 8, seed: int = 0, init_scale: float = 0.3,
                dtype: torch.dtype = torch.float32, norm_spread: float = 0.2, tied: bool = False
                ) -> tuple[Gemma3ForCausalLM, PreTrainedTokenizerFast]:
    """A random Gemma 3 text model (gemma-3-270m's architecture, scaled down).

    It keeps what sets Gemma 3 apart from Llama: embeddings scaled by ``sqrt(hidden)``,
    RMSNorms with gain ``1 + weight``, norms after attention and around the MLP, q/k
    norms, GELU-tanh MLP, and interleaved sliding-window / global layers (every layer but
    each sixth and the last is local; the window is ``sliding_window`` tokens, small here
    so short tests cross it). The output layer is untied by default (gemma-3-270m ties
    it): with random weights, a tied head scaled by ``sqrt(hidden)`` embeddings makes
    greedy decoding repeat one token, which would let losslessness tests pass vacuously.
    """
    tokenizer = byte_tokenizer()
    layer_types = ["full_attention" if (i + 1) % 6 == 0 or i == layers - 1 else "sliding_attention"
                   for i in range(layers)]
    config = Gemma3TextConfig(
        hidden_size=hidden, intermediate_size=intermediate, num_hidden_layers=layers,
        num_attention_heads=heads, num_key_value_heads=kv_heads, head_dim=head_dim,
        query_pre_attn_scalar=head_dim, sliding_window=sliding_window, layer_types=layer_types,
        max_position_embeddings=2048, tie_word_embeddings=tied, initializer_range=init_scale,
        rope_parameters={"full_attention": {"rope_type": "default", "rope_theta": 1e6},
                         "sliding_attention": {"rope_type": "default", "rope_theta": 1e4}},
        **_token_ids(tokenizer),
    )
    torch.manual_seed(seed)
    model = Gemma3ForCausalLM(config)
    _randomize_norms(model, seed, norm_spread)
    _finish(model, tokenizer, dtype)
    return model, tokenizer


#: tiny model builders by family name, and the Hugging Face ``model_type`` each one has
TINY_FAMILIES: dict[str, Callable[..., tuple[PreTrainedModel, PreTrainedTokenizerFast]]] = {
    "llama": tiny_llama, "qwen2": tiny_qwen2, "gemma3": tiny_gemma3,
}
FAMILY_LAYOUTS = {"llama": "llama", "qwen2": "qwen2", "gemma3": "gemma3_text"}


def tiny_model(family: str = "llama", **options: Any) -> tuple[PreTrainedModel, PreTrainedTokenizerFast]:
    """A tiny random model of one family (``"llama"``, ``"qwen2"``, ``"gemma3"``); ``options`` go to its builder.

    Meant for parametrized tests, e.g. ``@pytest.mark.parametrize("family", TINY_FAMILIES)``.
    """
    if family not in TINY_FAMILIES:
        raise ValueError(f"unknown model family {family!r}; choose one of {', '.join(TINY_FAMILIES)}")
    return TINY_FAMILIES[family](**options)
