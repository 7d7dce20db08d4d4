"""Soft-prompt compression: a context becomes a few embedding vectors the frozen LM reads.

In-context autoencoder (ICAE; Ge, Hu, Wang, Chen & Wei, "In-context Autoencoder for Context
Compression in a Large Language Model", arXiv:2307.06945) with the continuation objective of
AutoCompressors (Chevalier, Wettig, Ajith & Chen, "Adapting Language Models to Compress
Contexts", arXiv:2305.14788); see also gist tokens (Mu, Li & Goodman, arXiv:2304.08467).

The experiment's own LM, frozen, is the encoder: it reads a context segment followed by ``k``
learned *memory* embeddings, and its last hidden states at those ``k`` positions, through a
learned linear map, are the segment's ``k`` soft tokens. The same frozen LM is the decoder: the
soft tokens stand where the context's tokens stood. Only the memory embeddings, the map and an
"autoencode" marker embedding are trained (``k × hidden + hidden² + 2·hidden`` parameters), on
windows of the Wikipedia calibration split, with two losses from the papers above:

- **continuation** (AutoCompressor): given the soft tokens of a segment, predict the text that
  follows it;
- **reconstruction** (ICAE's autoencoding): given the soft tokens and the marker, regenerate the
  segment itself.

Training runs once per (model, config) through the shared training service
(:mod:`effinfer.plugins.model.training`: progress bar, checkpoint, cost in the run record);
later experiments read the checkpoint.

At request time the documents (else the last user message) are split into segments of
``segment_tokens``; each becomes ``k`` soft tokens. The request's text keeps one *placeholder*
token per soft token (an added special token of the tokenizer that the chat template does not
use), and the embedding module of the model — wrapped by this technique for the composition —
writes the soft tokens at the placeholders. The wrapper holds the soft tokens of the latest
requests; a forward whose rows hold placeholders takes, in row order, the newest ones (rows of
one batch are the requests of that batch, in order). So every decoding strategy and engine that
embeds through the model's embedding module (the HF path, the static engine) reads them; the
rendered prompt really is ``k`` tokens per segment long, which is what prefill pays for.
"""

from __future__ import annotations

from collections import deque
from typing import Any

import torch
import torch.nn.functional as F
from pydantic import BaseModel, ConfigDict, Field, model_validator
from torch import nn

from effinfer.core import Paper, Requirement, Technique, hookimpl
from effinfer.core.stages import DataStage, ModelStage, Request
from effinfer.plugins.data.prompt_compression.common import context_texts, write_back
from effinfer.plugins.model.calibration import model_fingerprint
from effinfer.plugins.model.training import checkpoint_path, run_key, token_batches, train

#: soft contexts the embedding wrapper keeps (requests transformed but not yet embedded)
PENDING = 64


class SoftPromptError(ValueError):
    """A model or tokenizer the soft-prompt compressor cannot work with, with the fix."""


def placeholder_token(tokenizer: Any) -> tuple[str, int]:
    """An added special token the tokenizer parses atomically and the chat template does not use."""
    template = str(getattr(tokenizer, "chat_template", "") or "")
    reserved = {getattr(tokenizer, f"{role}_token", None) for role in ("bos", "eos", "pad", "unk")}
    for token_id, added in sorted(getattr(tokenizer, "added_tokens_decoder", {}).items()):
        content = getattr(added, "content", str(added))
        if getattr(added, "special", False) and content not in reserved and content not in template:
            return content, int(token_id)
    raise SoftPromptError(
        "soft_prompt marks each soft token with an added special token that the chat template does not use, and "
        "this tokenizer has none; add one first, e.g. tokenizer.add_special_tokens("
        "{'additional_special_tokens': ['<|soft|>']})")


class SoftContextEmbedding(nn.Module):
    """The model's embedding module, writing pending soft tokens at placeholder positions."""

    def __init__(self, embed: nn.Module, placeholder_id: int) -> None:
        super().__init__()
        self.embed = embed
        self.placeholder_id = placeholder_id
        self.pending: deque[torch.Tensor] = deque(maxlen=PENDING)

    @property
    def weight(self) -> torch.Tensor:  # code that reads the table (tied heads, engines) sees the original
        return self.embed.weight

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        marked = input_ids == self.placeholder_id
        if not bool(marked.any()):
            return self.embed(input_ids)
        # the placeholder may lie outside the embedding table: embed something valid, then overwrite
        out = self.embed(input_ids.masked_fill(marked, 0)).clone()
        rows = marked.any(-1).nonzero().flatten().tolist()
        if len(rows) > len(self.pending):
            raise SoftPromptError(f"{len(rows)} prompt rows hold soft-token placeholders but {len(self.pending)} "
                                  "soft contexts are pending: a placeholder reached the model without the "
                                  "soft_prompt data stage (or a request was embedded twice in one batch)")
        for row, vectors in zip(rows, list(self.pending)[-len(rows):]):
            positions = marked[row].nonzero().flatten()
            if len(positions) != len(vectors):
                raise SoftPromptError(f"a prompt row holds {len(positions)} placeholders for {len(vectors)} soft "
                                      "tokens; the placeholder token must not occur in the text itself")
            out[row, positions] = vectors.to(out.dtype)
        return out


class Compressor(nn.Module):
    """Memory embeddings, the hidden → embedding map and the autoencode marker."""

    def __init__(self, hidden: int, k: int, embed_scale: float) -> None:
        super().__init__()
        self.memory = nn.Parameter(torch.randn(k, hidden) * embed_scale)
        self.project = nn.Linear(hidden, hidden)
        self.marker = nn.Parameter(torch.randn(1, hidden) * embed_scale)
        with torch.no_grad():  # start as "the hidden state, rescaled to the embeddings' size"
            self.project.weight.copy_(torch.eye(hidden) * embed_scale)
            self.project.bias.zero_()

    def compress(self, model: nn.Module, embed: nn.Module, ids: torch.Tensor) -> torch.Tensor:
        """``B × k × hidden`` soft tokens of ``B × n`` context ids (the LM frozen, gradients reach us)."""
        memory = self.memory[None].expand(ids.shape[0], -1, -1).to(model.dtype)
        inputs = torch.cat([embed(ids), memory], dim=1)
        hidden = model.get_decoder()(inputs_embeds=inputs, use_cache=False).last_hidden_state
        return self.project(hidden[:, -self.memory.shape[0]:].float()).to(model.dtype)


def soft_loss(model: nn.Module, embed: nn.Module, compressor: Compressor, ids: torch.Tensor, segment: int,
              continuation: float, reconstruction: float) -> torch.Tensor:
    """The training loss on ``B × (segment + m)`` windows: continuation of ``ids[:, segment:]`` and
    reconstruction of ``ids[:, :segment]``, each given the soft tokens of ``ids[:, :segment]``."""
    context, following = ids[:, :segment], ids[:, segment:]
    soft = compressor.compress(model, embed, context)
    k = soft.shape[1]
    total = soft.new_zeros((), dtype=torch.float32)
    if continuation and following.shape[1]:
        logits = model(inputs_embeds=torch.cat([soft, embed(following)], 1), use_cache=False).logits
        total = total + continuation * F.cross_entropy(logits[:, k - 1:-1].float().flatten(0, 1), following.flatten())
    if reconstruction:
        marker = compressor.marker[None].expand(ids.shape[0], -1, -1).to(soft.dtype)
        logits = model(inputs_embeds=torch.cat([soft, marker, embed(context)], 1), use_cache=False).logits
        total = total + reconstruction * F.cross_entropy(logits[:, k:-1].float().flatten(0, 1), context.flatten())
    return total


class SoftPromptConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    soft_tokens: int = Field(16, ge=1, le=512, description="soft tokens per context segment (k)")
    segment_tokens: int = Field(128, ge=8, le=4096, description="context tokens compressed into one group of k "
                                                                "soft tokens")
    min_tokens: int = Field(32, ge=0, description="contexts shorter than this are left alone")
    steps: int = Field(150, ge=1, le=100_000, description="training steps of the compressor")
    batch_size: int = Field(2, ge=1, le=256, description="windows per step")
    continuation_tokens: int = Field(48, ge=0, le=4096, description="tokens after each training segment the "
                                                                     "continuation loss predicts (0: no continuation)")
    continuation: float = Field(1.0, ge=0.0, le=100.0, description="weight of the continuation loss")
    reconstruction: float = Field(1.0, ge=0.0, le=100.0, description="weight of the reconstruction loss")
    lr: float = Field(1e-3, gt=0.0, le=1.0, description="AdamW peak learning rate")
    seed: int = Field(0, ge=0, description="seed of the training windows and the initial memory")
    checkpoint: bool = Field(True, description="keep the trained compressor in the cache (an identical run is "
                                               "read back instead of trained again)")

    @model_validator(mode="after")
    def _consistent(self) -> SoftPromptConfig:
        if self.soft_tokens >= self.segment_tokens:
            raise ValueError(f"soft_tokens ({self.soft_tokens}) must be below segment_tokens ({self.segment_tokens}): "
                             "otherwise nothing is compressed")
        if not self.continuation and not self.reconstruction:
            raise ValueError("continuation and reconstruction are both 0: give one of them a positive weight")
        if self.continuation and not self.continuation_tokens:
            raise ValueError("continuation > 0 needs continuation_tokens ≥ 1 (or set continuation to 0)")
        return self


class SoftPrompt(Technique):
    name = "soft_prompt"
    node = "data.input_compression.soft_prompt"
    paper = Paper(title="In-context Autoencoder for Context Compression in a Large Language Model", year=2023,
                  arxiv="2307.06945")
    summary = ("The frozen LM reads a context segment plus k learned memory embeddings; its hidden states there, "
               "through a learned map, become k soft tokens that replace the segment (trained here on the "
               "calibration corpus to continue and to reconstruct the segment, ICAE / AutoCompressor style).")
    lossless = False
    requires = frozenset({Requirement.TRAINING})
    bench_config = {"soft_tokens": 16, "segment_tokens": 128, "steps": 40, "batch_size": 1}

    Config = SoftPromptConfig

    def __init__(self, config: Any = None) -> None:
        super().__init__(config)
        self.compressor: Compressor | None = None
        self.wrapper: SoftContextEmbedding | None = None
        self.placeholder = ""
        self.cost = None

    # ------------------------------------------------------------------ model stage: train, wrap

    @hookimpl
    def effinfer_transform_model(self, stage: ModelStage) -> None:
        model = stage.model
        self.placeholder, placeholder_id = placeholder_token(stage.tokenizer)
        embed = model.get_input_embeddings()
        if isinstance(embed, SoftContextEmbedding):
            raise SoftPromptError("soft_prompt is already in this stack: use it once")
        self.compressor = self.train_compressor(model, stage.tokenizer, embed)
        self.wrapper = SoftContextEmbedding(embed, placeholder_id)
        decoder = model.get_decoder()
        stage.patcher.set_attr(decoder, "embed_tokens", self.wrapper)

    def train_compressor(self, model: nn.Module, tokenizer: Any, embed: nn.Module) -> Compressor:
        c = self.config
        device = next(model.parameters()).device
        torch.manual_seed(c.seed)
        scale = float(embed.weight.detach().float().std()) * _embedding_multiplier(model)
        compressor = Compressor(model.config.hidden_size, c.soft_tokens, scale).to(device)
        parameters = {name: p for name, p in compressor.named_parameters()}
        path = checkpoint_path(self.name, run_key(self.name, model_fingerprint(model), str(model.dtype),
                                                  c.model_dump(exclude={"checkpoint", "min_tokens"}))) \
            if c.checkpoint else None
        window = c.segment_tokens + (c.continuation_tokens if c.continuation else 0)
        batches = (b.to(device) for b in token_batches(tokenizer, c.batch_size, window, c.seed))
        frozen = [p for p in model.parameters() if p.requires_grad]
        for p in frozen:  # gradients flow through the LM to the compressor, never into the LM
            p.requires_grad_(False)
        try:
            with torch.inference_mode(False):
                self.cost = train(parameters, lambda ids: soft_loss(model, embed, compressor, ids, c.segment_tokens,
                                                                    c.continuation, c.reconstruction),
                                  batches, c.steps, lr=c.lr, warmup=max(1, c.steps // 10), checkpoint=path,
                                  description=f"{self.name}: compressor (k={c.soft_tokens})")
        finally:
            for p in frozen:
                p.requires_grad_(True)
        self.note(f"compressor ({sum(p.numel() for p in parameters.values())} parameters, k={c.soft_tokens} per "
                  f"{c.segment_tokens} tokens): {self.cost.describe()}")
        compressor.requires_grad_(False)
        return compressor.eval()

    # ------------------------------------------------------------------ data stage: compress

    @hookimpl
    def effinfer_transform_request(self, request: Request, stage: DataStage) -> None:
        if self.compressor is None or self.wrapper is None:
            raise SoftPromptError("soft_prompt's data stage ran before its model stage; compose the stack with "
                                  "compose_stack / effinfer run so the compressor is trained first")
        texts, documents = context_texts(request)
        tokenizer = stage.tokenizer
        ids = tokenizer("\n\n".join(t for t in texts if t.strip()), add_special_tokens=False)["input_ids"]
        c = self.config
        if len(ids) < max(c.min_tokens, c.soft_tokens + 1):
            self.note(f"left a {len(ids)}-token context alone (min_tokens {c.min_tokens})")
            return
        vectors = self.soft_tokens(stage.model, ids)
        self.wrapper.pending.append(vectors)
        write_back(request, [self.placeholder * len(vectors)], documents)
        self.note(f"compressed {len(ids)} context tokens to {len(vectors)} soft tokens")

    @torch.inference_mode()
    def soft_tokens(self, model: nn.Module, ids: list[int]) -> torch.Tensor:
        """``(segments · k) × hidden`` soft tokens of a context (segments compressed one by one)."""
        c = self.config
        device = next(model.parameters()).device
        embed = self.wrapper.embed if self.wrapper is not None else model.get_input_embeddings()
        pieces = [ids[i:i + c.segment_tokens] for i in range(0, len(ids), c.segment_tokens)]
        return torch.cat([self.compressor.compress(model, embed, torch.tensor([p], device=device))[0]
                          for p in pieces])


def _embedding_multiplier(model: nn.Module) -> float:
    """Gemma scales its embeddings by sqrt(hidden) inside the embedding module."""
    scale = getattr(model.get_input_embeddings(), "embed_scale", None)
    return float(scale) if scale is not None else 1.0
