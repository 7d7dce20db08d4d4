"""Self-speculative decoding: the target drafts with a subset of its own layers.

Zhang et al., "Draft & Verify: Lossless Large Language Model Acceleration via
Self-Speculative Decoding", arXiv:2309.08168. No second model and no training: the
draft is the target with some intermediate layers skipped. It shares the target's KV
cache: a drafted token's keys and values are written, for the kept layers only, in the
columns after the committed prefix; the verification pass then rewrites those columns
for every layer, so no draft state ever needs rolling back. Drafting stops early when the
draft's confidence in its token falls below a threshold (the paper's adaptive draft
length, with a fixed threshold).

Sharing the cache needs a runner that can run a subset of the layers over its own cache
(``step_layers``, which the static engine's runner offers). On any other engine the draft
is a *layer-skipped view* of the target — the same modules, the skipped blocks left out,
no weight copied — decoded by its own runner of the same engine, like a draft model.
"""

from __future__ import annotations

import copy
from typing import Any

import torch
from pydantic import BaseModel, ConfigDict, Field
from torch import nn

from effinfer.core import Paper, Technique, hookimpl
from effinfer.core.stages import SystemStage
from effinfer.plugins.system.speculative.api import (DecodeEngine, Session, SpeculativeDecoding, TokenTree,
                                                     draft_chain, draft_token)


def draft_layers(num_layers: int, skip_layers: list[int] | None, skip_ratio: float) -> tuple[int, ...]:
    """The layers the draft runs: all but ``skip_layers``, or ``skip_ratio`` of them spread evenly
    over the middle (the first two and last two layers are always kept)."""
    if skip_layers is not None:
        bad = [i for i in skip_layers if not 0 <= i < num_layers]
        if bad:
            raise ValueError(f"skip_layers {bad} are out of range for a model with {num_layers} layers")
        skipped = set(skip_layers)
    else:
        middle = list(range(2, num_layers - 2))
        count = min(len(middle), round(skip_ratio * num_layers))
        skipped = {middle[int(i * len(middle) / count)] for i in range(count)} if count else set()
    kept = tuple(i for i in range(num_layers) if i not in skipped)
    if not kept:
        raise ValueError("the draft would skip every layer")
    return kept


def module_copy(module: nn.Module) -> nn.Module:
    """A shallow copy of ``module`` with its own table of submodules (parameters stay shared)."""
    twin = copy.copy(module)
    twin._modules = dict(module._modules)
    return twin


def layer_skipped_view(model: nn.Module, kept: tuple[int, ...]) -> nn.Module:
    """``model`` running only the decoder blocks ``kept``: shallow copies re-indexed for the cache
    (block ``kept[j]`` becomes layer ``j``), the config trimmed to match; no weight is copied."""
    decoder = model.get_decoder()
    config = copy.deepcopy(model.config)
    config.num_hidden_layers = len(kept)
    if getattr(config, "layer_types", None):
        config.layer_types = [config.layer_types[i] for i in kept]
    blocks = []
    for new_index, old_index in enumerate(kept):
        block = module_copy(decoder.layers[old_index])
        attention = module_copy(block.self_attn)
        attention.layer_idx = new_index
        block._modules["self_attn"] = attention
        if hasattr(block, "layer_idx"):
            block.layer_idx = new_index
        blocks.append(block)
    view_decoder = module_copy(decoder)
    view_decoder._modules["layers"] = nn.ModuleList(blocks)
    view_decoder.config = config
    view = module_copy(model)
    name = next(key for key, child in model._modules.items() if child is decoder)
    view._modules[name] = view_decoder
    view.config = config
    return view


class SelfSpeculativeDecoding(SpeculativeDecoding):
    name = "self_speculative"

    def __init__(self, config: SelfSpeculative.Config, engine: DecodeEngine | None = None) -> None:
        super().__init__(engine)
        self.config = config
        self.max_tree_nodes = config.num_draft_tokens + 1
        self._views: dict[int, tuple[nn.Module, nn.Module]] = {}

    def begin(self, session: Session) -> None:
        model = session.model
        layers = draft_layers(model.config.num_hidden_layers, self.config.skip_layers, self.config.skip_ratio)
        session.state["layers"] = layers
        if hasattr(session.runner, "step_layers"):
            return  # draft inside the target's own cache
        target, view = self._views.get(id(model), (None, None))
        if target is not model:
            view = layer_skipped_view(model, layers)
            self._views = {id(model): (model, view)}
        runner = self.engine.runner(view, len(session.context) + session.budget + self.max_tree_nodes,
                                    self.max_tree_nodes, name="self-draft")
        runner.prefill(torch.tensor([session.context[:-1]], device=next(model.parameters()).device))
        session.state["draft"], session.state["fed"] = runner, session.context[:-1]

    def propose(self, session: Session) -> TokenTree:
        count = min(self.config.num_draft_tokens, session.budget - 1)
        if "draft" in session.state:
            return draft_chain(session.state["draft"], session, count, self.config.confidence_threshold)
        runner = session.runner
        layers = session.state["layers"]
        token, start = session.pending, runner.length
        draft: list[int] = []
        probs: list[torch.Tensor | None] = []
        for index in range(count):
            logits = runner.step_layers(token, layers, start + index)
            drafted = draft_token(logits, session, self.config.confidence_threshold)
            if drafted is None:
                break
            token, q = drafted
            draft.append(token)
            probs.append(q)
        return TokenTree.chain(session.pending, draft, probs)


class SelfSpeculative(Technique):
    name = "self_speculative"
    node = "system.inference_engine.speculative_decoding"
    paper = Paper(title="Draft & Verify: Lossless Large Language Model Acceleration via Self-Speculative "
                        "Decoding", year=2023, arxiv="2309.08168")
    summary = ("Drafts with the target itself, skipping some of its layers, and verifies with all of "
               "them; the draft shares the target's KV cache. No extra model, no training, lossless.")
    lossless = True
    bench_config = {"skip_ratio": 0.4, "num_draft_tokens": 4}
    #: benched with its family (`effinfer bench --node system.inference_engine.speculative_decoding`)
    bench_compositions = ("smoothquant+self_speculative",)

    class Config(BaseModel):
        model_config = ConfigDict(extra="forbid")

        skip_layers: list[int] | None = Field(None, description="layer indices the draft skips; None = "
                                                                "choose from skip_ratio")
        skip_ratio: float = Field(0.4, ge=0.0, le=0.9, description="fraction of the layers the draft skips, "
                                                                   "spread over the middle of the stack")
        num_draft_tokens: int = Field(4, ge=1, le=32, description="most tokens drafted per step")
        confidence_threshold: float = Field(
            0.0, ge=0.0, lt=1.0, description="stop drafting when the draft's probability of its token "
                                             "falls below this")

    def check_model_config(self, config: Any) -> list[str]:
        layers = getattr(config, "num_hidden_layers", None)
        try:
            if layers is not None:
                draft_layers(layers, self.config.skip_layers, self.config.skip_ratio)
        except ValueError as error:
            return [f"{error}; choose skip_layers between 0 and {layers - 1}, or use skip_ratio"]
        return []

    @hookimpl
    def effinfer_decoding_strategy(self, stage: SystemStage) -> SelfSpeculativeDecoding:
        layers = draft_layers(stage.model.config.num_hidden_layers, self.config.skip_layers, self.config.skip_ratio)
        self.note(f"draft runs {len(layers)} of {stage.model.config.num_hidden_layers} layers; up to "
                  f"{self.config.num_draft_tokens} drafted tokens per step")
        return SelfSpeculativeDecoding(self.config, stage.engine)


@hookimpl
def effinfer_register_techniques(register):
    register(SelfSpeculative)
