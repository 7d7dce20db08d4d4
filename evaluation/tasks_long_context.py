"""Long-context evaluation: perplexity of a long document, needle in a haystack, KV bytes and decode speed.

One pass per (context, needle depth) measures everything, through the stack's KV cache
(``cache_factory``; ``None`` = the full dynamic cache) so that a KV-cache policy (eviction,
quantization) acts as it would in a long generation:

- the haystack is one long real document (a Shakespeare play from the offline corpus,
  :mod:`effinfer.data.corpora`) with a fact — a random 6-digit passcode — inserted at ``depth``
  (a sentence boundary), then a question about it;
- the prompt is fed in chunks of :data:`CHUNK` tokens, except at each *mark* (2k, 4k, 8k):
  there the next :data:`TIMED` tokens are fed one at a time (exactly the work of a decode
  step, on the same text) and timed → decode tokens per second at that context; the bytes the
  cache really holds are read there too (packed codes, scales, kept entries: every distinct
  tensor storage reachable from the cache object) → KV bytes per token;
- the log-probabilities of every position give the token perplexity of the document's first
  2k, 4k, 8k tokens (a causal model scores a prefix the same inside a longer pass);
- at the end the greedy answer is checked exactly: the passcode must be the first number generated;
- then a long-document QA task on the same pass: :data:`QA_QUESTIONS` questions that quote six
  words of the document (at several depths, just before a name or number; the cloze questions of
  :mod:`effinfer.evaluation.tasks_data_level`, built here on the long document) and ask for the
  next word, asked one after the other (each after the previous answer, as in a conversation
  about the document), scored by exact match and token F1 of the first words of the answer.

A policy that compresses once the prompt is complete (SnapKV's ``after_prompt`` mode: attribute
``paused``) is held while the haystack comes in, including the timed single-token steps, and
released before the answer. ``answer_tok_s`` times the answer's decode steps after the first
(at the full context, after any such compression).

:func:`long_context` aggregates passes over several depths into flat metrics
(``long.ppl.c8192``, ``long.needle.c8192``, ``long.qa_em.c8192``, ``long.kv_bytes_per_token.c8192``,
``long.decode_tok_s.c8192`` …).
"""

from __future__ import annotations

import random
import re
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from effinfer.core.generation import new_cache
from effinfer.evaluation.metrics.memory import cache_tensors, unique_tensor_bytes

CacheFactory = Callable[[nn.Module], Any] | None
#: tokens per forward while filling the cache (memory stays bounded at 8k context)
CHUNK = 512
#: single-token forwards timed at each mark
TIMED = 16
NEEDLE = "The secret passcode of the blue lighthouse is {code}."
QUESTION = ("\n\nQuestion: What is the secret passcode of the blue lighthouse?\n"
            "Answer: The secret passcode of the blue lighthouse is")
#: long-document QA: questions per pass, the depths they quote from, answer tokens each
QA_DEPTHS = (0.15, 0.45, 0.8)
QA_QUESTIONS = len(QA_DEPTHS)
QA_TOKENS = 8
#: characters kept between a QA quote and the needle sentence
QA_MARGIN = 400


def long_document(tokenizer: Any, tokens: int, corpus: str = "shakespeare") -> list[int]:
    """Token ids of the first document of the corpus with at least ``tokens`` tokens."""
    from effinfer.data.corpora import load_corpus

    for doc in load_corpus(corpus, "test"):
        ids = tokenizer(doc["text"], add_special_tokens=False).input_ids
        if len(ids) >= tokens:
            return ids
    raise ValueError(f"no {corpus} document has {tokens} tokens; use a shorter context")


def haystack(tokenizer: Any, document: list[int], context: int, depth: float, code: str) -> tuple[list[int], int]:
    """``context`` tokens: the document's start with the needle sentence at ``depth`` (a sentence
    boundary), then the question; also the needle's first token index."""
    encode = lambda text: tokenizer(text, add_special_tokens=False).input_ids  # noqa: E731
    needle, question = encode(" " + NEEDLE.format(code=code)), encode(QUESTION)
    room = context - len(needle) - len(question)
    cut = int(room * depth)
    before = tokenizer.decode(document[:cut])
    boundary = max(before.rfind(". "), before.rfind(".\n"))
    if boundary > 0:
        cut = len(encode(before[:boundary + 1]))
    ids = document[:cut] + needle + document[cut:room]
    return ids + question, cut


def cloze_questions(text: str, depths: Sequence[float], seed: int, avoid: str = "") -> list[tuple[str, str]]:
    """``(quoted six words, next word)`` near each depth of ``text``; the quote occurs once in ``text`` and
    at least :data:`QA_MARGIN` characters away from ``avoid`` (the needle sentence: a question must test the
    document, not the inserted fact)."""
    from effinfer.evaluation.tasks_data_level import _cloze

    rng = torch.Generator().manual_seed(seed)
    avoided = text.find(avoid) if avoid else -1
    found = []
    for depth in depths:
        start = int(len(text) * depth)
        for offset in range(0, 20_000, 500):
            cloze = _cloze(text[start + offset:start + offset + 800], rng)
            if cloze is None or text.count(cloze[0]) != 1 or cloze in found:
                continue
            at = text.find(cloze[0])
            if avoided >= 0 and avoided - QA_MARGIN < at < avoided + len(avoid) + QA_MARGIN:
                continue
            found.append(cloze)
            break
    return found


def set_paused(cache: Any, paused: bool) -> None:
    """Hold (or release) the policies that compress once the prompt is in (attribute ``paused``)."""
    for policy in getattr(cache, "policies", lambda: [])():
        if hasattr(policy, "paused"):
            policy.paused = paused


def plain_tensors(tensors: Any) -> Any:
    """The tensors, with tensor subclasses that wrap others (quanto's packed ``QTensor`` s) replaced by
    their inner tensors (``__tensor_flatten__``), whose storages hold the bytes."""
    for tensor in tensors:
        if type(tensor) is not torch.Tensor and hasattr(tensor, "__tensor_flatten__"):
            names, _ = tensor.__tensor_flatten__()
            yield from plain_tensors(getattr(tensor, name) for name in names)
        else:
            yield tensor


def cache_bytes(cache: Any) -> int:
    """Bytes the cache object really holds (distinct storages reachable from it)."""
    return unique_tensor_bytes(plain_tensors(cache_tensors(cache)))


@dataclass
class Pass:
    context: int
    depth: float
    correct: bool
    answer: str
    #: per mark: summed NLL and count of the positions before it, decode tok/s, KV bytes held
    nll: dict[int, float] = field(default_factory=dict)
    scored: dict[int, int] = field(default_factory=dict)
    tok_s: dict[int, float] = field(default_factory=dict)
    kv_bytes: dict[int, int] = field(default_factory=dict)
    seconds: float = 0.0
    #: decode tok/s of the answer (its steps after the first), at the full context
    answer_tok_s: float = 0.0
    #: long-document QA: (quote, expected word, answer, exact match, F1) per question
    qa: list[tuple[str, str, str, float, float]] = field(default_factory=list)

    @property
    def qa_em(self) -> float:
        return sum(q[3] for q in self.qa) / max(1, len(self.qa))

    @property
    def qa_f1(self) -> float:
        return sum(q[4] for q in self.qa) / max(1, len(self.qa))


@torch.inference_mode()
def one_pass(model: nn.Module, tokenizer: Any, context: int, depth: float, cache_factory: CacheFactory = None,
             marks: Sequence[int] = (2048, 4096, 8192), seed: int = 0, answer_tokens: int = 10,
             document: list[int] | None = None) -> Pass:
    """Feed one haystack through the cache; see the module docstring."""
    started = time.perf_counter()
    code = str(random.Random(f"{seed}-{depth}-{context}").randrange(100000, 1000000))
    document = document if document is not None else long_document(tokenizer, context)
    ids, _ = haystack(tokenizer, document, context, depth, code)
    questions = cloze_questions(tokenizer.decode(ids[:-len(tokenizer(QUESTION, add_special_tokens=False).input_ids)]),
                                QA_DEPTHS, seed, avoid=NEEDLE.format(code=code))
    device = next(model.parameters()).device
    tokens = torch.tensor(ids, device=device)
    cache = new_cache(model, cache_factory)
    set_paused(cache, True)
    marks = sorted(m for m in marks if m + TIMED <= len(ids))
    result = Pass(context, depth, False, "")
    nll = torch.zeros((), dtype=torch.float64)
    position = 0
    last = None

    def run(piece: torch.Tensor) -> torch.Tensor:
        nonlocal position, nll, last
        positions = torch.arange(position, position + len(piece), device=device)[None]
        logits = model(input_ids=piece[None], position_ids=positions, cache=cache, use_cache=True).logits[0].float()
        targets = tokens[position + 1:position + 1 + len(piece)]
        log_probs = logits[:len(targets)].log_softmax(-1)
        nll = nll - log_probs.gather(-1, targets[:, None]).sum().double().cpu()
        position += len(piece)
        last = logits[-1]
        return logits

    for mark in [*marks, len(ids)]:
        while position < mark:
            run(tokens[position:min(mark, position + CHUNK)])
        if mark == len(ids):
            break
        result.nll[mark], result.scored[mark] = float(nll), mark - 1
        began = time.perf_counter()
        for _ in range(TIMED):
            run(tokens[position:position + 1])
        result.tok_s[mark] = TIMED / (time.perf_counter() - began)
        result.kv_bytes[mark] = cache_bytes(cache)  # what decoding at this context holds
    set_paused(cache, False)

    def feed(piece: list[int]) -> torch.Tensor:
        nonlocal position
        out = model(input_ids=torch.tensor([piece], device=device),
                    position_ids=torch.arange(position, position + len(piece), device=device)[None], cache=cache,
                    use_cache=True)
        position += len(piece)
        return out.logits[0, -1].float()

    def greedy(last: torch.Tensor, count: int, timed: bool = False) -> list[int]:
        out, began = [], None
        for i in range(count):
            token = int(last.argmax())
            out.append(token)
            if i < count - 1:
                if i == 1 and timed:
                    began = time.perf_counter()
                last = feed([token])
        if began is not None:
            result.answer_tok_s = (count - 2) / (time.perf_counter() - began)
        return out

    result.answer = tokenizer.decode(greedy(last, answer_tokens, timed=True))
    found = re.search(r"\d+", result.answer)
    result.correct = bool(found and found.group() == code)
    for quote, word in questions:
        from effinfer.evaluation.tasks_data_level import qa_scores

        # the question after the previous answer (all of it but its last token stays in the cache)
        logits = feed(tokenizer(f'\n\nQuote from the text above: "{quote}', add_special_tokens=False).input_ids)
        said = tokenizer.decode(greedy(logits, QA_TOKENS))
        em, f1 = qa_scores(said, [word])
        result.qa.append((quote, word, said, em, f1))
    result.seconds = time.perf_counter() - started
    return result


def long_context(model: nn.Module, tokenizer: Any, context: int = 8192, depths: Sequence[float] = (0.25, 0.75),
                 cache_factory: CacheFactory = None, marks: Sequence[int] = (2048, 4096, 8192),
                 progress: Callable[[str], None] | None = None) -> tuple[dict[str, float], list[Pass]]:
    """Passes at each needle depth; flat metrics (perplexity and speed averaged over the passes)."""
    document = long_document(tokenizer, context)
    passes = []
    for depth in depths:
        if progress:
            progress(f"long context {context}, needle depth {depth:.0%}")
        passes.append(one_pass(model, tokenizer, context, depth, cache_factory, marks, document=document))
    metrics: dict[str, float] = {f"long.needle.c{context}": sum(p.correct for p in passes) / len(passes),
                                 f"long.qa_em.c{context}": sum(p.qa_em for p in passes) / len(passes),
                                 f"long.qa_f1.c{context}": sum(p.qa_f1 for p in passes) / len(passes),
                                 f"long.answer_tok_s.c{context}": sum(p.answer_tok_s for p in passes) / len(passes)}
    for mark in passes[0].nll:
        nll = sum(p.nll[mark] for p in passes) / sum(p.scored[mark] for p in passes)
        metrics[f"long.ppl.c{mark}"] = float(torch.tensor(nll).exp())
        metrics[f"long.decode_tok_s.c{mark}"] = sum(p.tok_s[mark] for p in passes) / len(passes)
        metrics[f"long.kv_bytes_per_token.c{mark}"] = passes[-1].kv_bytes[mark] / (mark + TIMED)
    return metrics, passes


# --------------------------------------------------------------------------- the evaluator's section

from pydantic import BaseModel, ConfigDict, Field  # noqa: E402


class LongContextSpec(BaseModel):
    """Long-context passes (perplexity, needle, KV bytes, decode speed); off unless a suite sets it."""

    model_config = ConfigDict(extra="forbid")

    context: int = Field(8192, ge=256, le=131072, description="tokens per pass (≤ the model's context)")
    depths: list[float] = Field(default_factory=lambda: [0.25, 0.75], description="needle depths, 0 … 1")
    marks: list[int] = Field(default_factory=lambda: [2048, 4096], description="contexts where decode speed, "
                             "KV bytes and perplexity are read (the full context is always added)")


def long_context_phase(run: Any) -> None:
    """The suite's long-context section on the stack's own KV cache (``run.cache_factory``)."""
    spec: LongContextSpec | None = getattr(run.suite, "long_context", None)
    if spec is None:
        return
    marks = sorted({m for m in spec.marks if m < spec.context - 64} | {spec.context - 32})
    metrics, passes = long_context(run.model, run.tokenizer, spec.context, spec.depths, run.cache_factory, marks,
                                   progress=run.advance)
    params = {"context": spec.context, "depths": list(spec.depths)}
    for name, value in metrics.items():
        unit, better = (("ppl", False) if ".ppl." in name else ("tok/s", True) if "tok_s" in name
                        else ("bytes", False) if "bytes" in name else ("accuracy", True))
        run.record.add(name, value, unit=unit, higher_is_better=better, params=params | {"passes": len(passes)})
