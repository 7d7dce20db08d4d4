"""LLMLingua-2: prompt compression as token classification by a small bidirectional encoder.

Pan et al., "LLMLingua-2: Data Distillation for Efficient and Faithful Task-Agnostic Prompt
Compression", Findings of ACL 2024, arXiv:2403.12968. A Transformer encoder sees the whole
context (both directions) and a linear head gives each word the probability of being kept;
the words with the highest probability are kept, in order, up to the budget.

The paper distils its labels from GPT-4 compressions of MeetingBank; no such labels (and no
released classifier) are reachable here, so the labels are derived from the experiment's LM
instead: on passages of the Wikipedia *calibration* split, a word is labelled "keep" when its
self-information under the LM (sum over its tokens) is in the passage's top ``label_rate``.
The encoder is all-MiniLM-L6-v2 (:mod:`effinfer.plugins.data.encoder`, frozen); the head
(a linear layer on its last hidden state at each word's first word piece) is trained here with
binary cross-entropy on the CPU (about a minute the first time) and cached per LM under
``~/.cache/effinfer/llmlingua2/``.
"""

from __future__ import annotations

import hashlib
import re
from typing import Any

import torch
from pydantic import Field
from rich.progress import track

from effinfer.core import Paper, Technique, hookimpl
from effinfer.core.stages import DataStage, Request
from effinfer.data import load_corpus
from effinfer.data.cache import cache_dir
from effinfer.plugins.data.prompt_compression.common import (BudgetConfig, budget_of, context_texts, count_tokens,
                                                             fit_to_budget, token_information, unchanged, write_back)

WORD = re.compile(r"\S+\s*")
WINDOW_WORDS = 160  # MiniLM reads 256 word pieces at most


def words_of(text: str) -> list[tuple[int, int]]:
    return [m.span() for m in WORD.finditer(text)]


@torch.inference_mode()
def word_features(text: str, spans: list[tuple[int, int]]) -> torch.Tensor:
    """MiniLM's last hidden state at each word's first word piece (``words × 384``), windowed."""
    from effinfer.plugins.data.encoder import load_minilm

    encoder, tokenizer = load_minilm()
    out = torch.zeros(len(spans), encoder.config.hidden_size)
    for start in range(0, len(spans), WINDOW_WORDS):
        window = spans[start:start + WINDOW_WORDS]
        base = window[0][0]
        piece = text[base:window[-1][1]]
        encoded = tokenizer(piece, return_offsets_mapping=True, truncation=True, max_length=512, return_tensors="pt")
        offsets = encoded.pop("offset_mapping")[0].tolist()
        hidden = encoder(**encoded).last_hidden_state[0]
        position = 0
        for j, (w_start, w_end) in enumerate(window):
            while position < len(offsets) and (offsets[position][1] <= w_start - base or offsets[position] == [0, 0]):
                position += 1
            if position < len(offsets):
                out[start + j] = hidden[position]
    return out


def word_information(model: Any, tokenizer: Any, text: str, spans: list[tuple[int, int]]) -> torch.Tensor:
    """Each word's self-information under the LM: the sum over the tokens starting inside it."""
    encoded = tokenizer(text, return_offsets_mapping=True, add_special_tokens=False)
    ids = encoded["input_ids"][:1024]
    info = token_information(model, ids).nan_to_num(posinf=50.0)
    starts = torch.tensor([s for s, _ in encoded["offset_mapping"][:len(ids)]])
    values = torch.zeros(len(spans))
    for j, (start, end) in enumerate(spans):
        inside = ((starts >= start) & (starts < end)).nonzero().flatten()
        values[j] = info[inside].sum() if len(inside) else 0.0
    return values


def model_key(model: Any) -> str:
    config = model.config
    name = f"{getattr(config, '_name_or_path', '')}|{config.model_type}|{config.vocab_size}|{config.hidden_size}|" \
           f"{config.num_hidden_layers}"
    return hashlib.sha256(name.encode()).hexdigest()[:16]


def train_head(model: Any, tokenizer: Any, passages: int, label_rate: float, epochs: int, seed: int = 0
               ) -> tuple[torch.nn.Linear, dict[str, float]]:
    """A keep/drop head on frozen MiniLM features, labels from the LM's self-information."""
    torch.manual_seed(seed)
    texts = []
    for row in load_corpus("wikipedia", "calibration"):
        for paragraph in row["text"].split("\n\n"):
            paragraph = " ".join(paragraph.split())
            if len(paragraph) > 300:
                texts.append(paragraph[:1500])
    texts = texts[:passages]
    features, labels = [], []
    for text in track(texts, description="llmlingua2: labelling passages with the LM"):
        spans = words_of(text)
        info = word_information(model, tokenizer, text, spans)
        keep = torch.zeros(len(spans))
        keep[torch.topk(info, max(1, int(label_rate * len(spans)))).indices] = 1.0
        features.append(word_features(text, spans))
        labels.append(keep)
    with torch.inference_mode(False), torch.enable_grad():  # the data stage may run under inference mode
        x, y = torch.cat(features).clone(), torch.cat(labels).clone()
        head = torch.nn.Linear(x.shape[1], 1)
        optimizer = torch.optim.Adam(head.parameters(), lr=3e-3)
        for _ in range(epochs):
            for batch in torch.randperm(len(x)).split(512):
                loss = torch.nn.functional.binary_cross_entropy_with_logits(head(x[batch])[:, 0], y[batch])
                optimizer.zero_grad()
                loss.backward()
                optimizer.step()
    with torch.no_grad():
        accuracy = float(((head(x)[:, 0] > 0).float() == y).float().mean())
    return head, {"words": float(len(x)), "train_accuracy": accuracy, "passages": float(len(texts))}


class LLMLingua2(Technique):
    name = "llmlingua2"
    node = "data.input_compression.prompt_pruning"
    paper = Paper(title="LLMLingua-2: Data Distillation for Efficient and Faithful Task-Agnostic Prompt Compression",
                  year=2024, arxiv="2403.12968")
    summary = ("Token classification: a MiniLM encoder reads the whole context and a linear head (trained here on "
               "keep/drop labels derived from the LM's self-information) keeps the most likely words to the budget.")
    lossless = False
    bench_config = {"rate": 0.33}

    class Config(BudgetConfig):
        train_passages: int = Field(200, ge=8, le=5000, description="calibration passages the head is trained on")
        label_rate: float = Field(0.5, gt=0.0, lt=1.0, description="fraction of words labelled keep")
        epochs: int = Field(20, ge=1, le=500, description="training epochs of the head")

    def __init__(self, config: Any = None) -> None:
        super().__init__(config)
        self._head: torch.nn.Linear | None = None

    def head(self, model: Any, tokenizer: Any) -> torch.nn.Linear:
        if self._head is None:
            c = self.config
            path = cache_dir() / "llmlingua2" / f"{model_key(model)}-{c.train_passages}-{c.label_rate}-{c.epochs}.pt"
            head = torch.nn.Linear(384, 1)
            if path.exists():
                head.load_state_dict(torch.load(path, weights_only=True))
            else:
                head, stats = train_head(model, tokenizer, c.train_passages, c.label_rate, c.epochs)
                path.parent.mkdir(parents=True, exist_ok=True)
                torch.save(head.state_dict(), path)
                self.note(f"trained the keep/drop head on {int(stats['words'])} words of {int(stats['passages'])} "
                          f"passages (train accuracy {stats['train_accuracy']:.2f}); cached at {path}")
            self._head = head.eval()
        return self._head

    def keep_probabilities(self, model: Any, tokenizer: Any, text: str, spans: list[tuple[int, int]]) -> torch.Tensor:
        head = self.head(model, tokenizer)
        with torch.inference_mode():
            return torch.sigmoid(head(word_features(text, spans))[:, 0])

    @hookimpl
    def effinfer_transform_request(self, request: Request, stage: DataStage) -> None:
        texts, documents = context_texts(request)
        tokenizer = stage.tokenizer
        total = sum(count_tokens(tokenizer, t) for t in texts)
        if unchanged(self.config, total):
            self.note(f"left a {total}-token context alone (rate {self.config.rate})")
            return
        budget = budget_of(self.config, total)
        items = []  # (probability, document, word index, tokens)
        per_doc = []
        for number, text in enumerate(texts):
            spans = words_of(text)
            per_doc.append(spans)
            if not spans:
                continue
            probs = self.keep_probabilities(stage.model, tokenizer, text, spans)
            for j, (start, end) in enumerate(spans):
                items.append((float(probs[j]), number, j, count_tokens(tokenizer, text[start:end])))
        chosen: set[tuple[int, int]] = set()
        used = 0
        for prob, number, j, n in sorted(items, key=lambda item: -item[0]):
            if used + n <= budget:
                chosen.add((number, j))
                used += n
        compressed = ["".join(text[s:e] for j, (s, e) in enumerate(spans) if (number, j) in chosen).strip()
                      for number, (text, spans) in enumerate(zip(texts, per_doc))]
        compressed = fit_to_budget(tokenizer, compressed, budget)
        write_back(request, compressed, documents)
        self.note(f"compressed {total} context tokens to {sum(count_tokens(tokenizer, t) for t in compressed)} "
                  f"(budget {budget}) by the MiniLM keep/drop classifier")
