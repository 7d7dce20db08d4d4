"""Tasks on which compressing, retrieving or reorganising the input can hurt or help the answer.

Three tasks, all built offline from the project's corpora and packages (:mod:`effinfer.data`):

- ``long_context_qa`` — several real Wikipedia passages (test split) in the request's
  ``documents``; the question quotes the words just before a name or number in one of them (the
  gold passage) and asks for the next word; the others are distractors from other articles.
  The answer is a short span copied from the gold passage, so even a 135M model answers
  most questions from the uncompressed context, and a compressor that drops the gold
  passage's wording loses the answer. Scored by exact match and token F1 (SQuAD-style
  normalisation) of the first words of the generated answer.
- ``multi_doc_summary`` — passages from several articles, "summarise"; the summary is scored
  with ROUGE (Google's ``rouge-score`` package) against the uncompressed source passages
  (ROUGE-1 precision: how much of the summary comes from the sources; ROUGE-L F).
- ``fewshot_bigbench`` — a BIG-bench multiple-choice task with many demonstrations as the
  documents (what a compressor shortens) and the question as the message; scored by the
  log-likelihood of each choice after the (compressed) prompt.

Each example runs through the composed model's own path: the data stage (compression,
retrieval) then decoding, timed together, so the end-to-end latency includes the compression
time. The phase records accuracy, the compression ratio (rendered prompt tokens of the
uncompressed request ÷ those of the transformed one) and the latency, and for a stack, the
latency of the uncompressed prompt on the baseline model measured right next to it (pairs of
adjacent runs, order alternating) and their ratio.
"""

from __future__ import annotations

import math
import re
import string
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import lru_cache
from typing import Any

import torch
from pydantic import BaseModel, ConfigDict, Field, field_validator

from effinfer.core.generation import GenerationConfig, encode_prompts
from effinfer.core.stages import Request
from effinfer.data import load_corpus
from effinfer.data.bigbench import task_examples
from effinfer.data.bigbench import unavailable_reason as bigbench_unavailable_reason

TASKS = ("long_context_qa", "multi_doc_summary", "fewshot_bigbench")


class DataTasksSpec(BaseModel):
    """The data-level tasks of a suite (:mod:`effinfer.evaluation.tasks_data_level`)."""

    model_config = ConfigDict(extra="forbid")

    names: list[str] = Field(default_factory=lambda: list(TASKS), description=f"tasks out of {TASKS}")
    n_examples: int = Field(12, ge=1, le=500, description="examples per task")
    passages: int = Field(5, ge=2, le=32, description="passages per long-context QA / summary example "
                                                       "(one gold, the rest distractors)")
    passage_chars: int = Field(600, ge=200, le=4000, description="cap on each passage's length in characters")
    demonstrations: int = Field(16, ge=1, le=128, description="few-shot BIG-bench demonstrations")
    fewshot_task: str = Field("general_knowledge", description="BIG-bench task of the few-shot test")
    max_new_tokens: int = Field(8, ge=1, le=512, description="answer length of the QA task")
    summary_tokens: int = Field(48, ge=4, le=1024, description="summary length")
    paired_baseline: bool = Field(True, description="time the uncompressed prompt on the baseline next to "
                                                    "each stack's example (latency ratio)")

    @field_validator("names")
    @classmethod
    def _known(cls, names: list[str]) -> list[str]:
        unknown = [n for n in names if n not in TASKS]
        if unknown:
            raise ValueError(f"unknown data-level task(s) {unknown}; available: {', '.join(TASKS)}")
        if not names:
            raise ValueError(f"no data-level task named; list some of {', '.join(TASKS)} (or set data_tasks to null)")
        return names


# --------------------------------------------------------------------------- examples


@dataclass
class Example:
    task: str
    request: Request
    answers: list[str] = field(default_factory=list)
    choices: list[str] = field(default_factory=list)
    gold: int = -1
    gold_document: int = -1
    references: list[str] = field(default_factory=list)


WORD = re.compile(r"\S+")
SENTENCE = re.compile(r"[^.!?]+[.!?]+(?=\s|$)")


def _passages(max_chars: int) -> list[tuple[str, str]]:
    """(article title, passage) pairs: prose paragraphs of the Wikipedia test split, cut at a sentence."""
    return list(_passages_cached(max_chars))


@lru_cache(maxsize=4)
def _passages_cached(max_chars: int) -> tuple[tuple[str, str], ...]:
    found = []
    for row in load_corpus("wikipedia", "test"):
        for paragraph in row["text"].split("\n\n"):
            paragraph = " ".join(paragraph.split())
            if len(paragraph) < 250 or paragraph.count(". ") < 2:
                continue
            sentences = SENTENCE.findall(paragraph)
            text = ""
            for sentence in sentences:
                if len(text) + len(sentence) > max_chars and text:
                    break
                text += sentence
            text = text.strip()
            if len(text) >= 200:
                found.append((row["title"], text))
    return tuple(found)


def _normalise(text: str) -> str:
    text = text.lower().translate(str.maketrans("", "", string.punctuation))
    return " ".join(w for w in text.split() if w not in {"a", "an", "the"})


def _cloze(passage: str, rng: torch.Generator) -> tuple[str, str] | None:
    """A quoted prefix of 6 words ending right before a name or number of ``passage``, and that word."""
    words = WORD.findall(passage)
    candidates = []
    for i in range(6, len(words)):
        word = words[i].strip(string.punctuation + "“”‘’")
        if len(word) >= 3 and (word[0].isupper() or word.isdigit()) and word.isalnum():
            prefix = " ".join(words[i - 6:i])
            if not any(c in prefix for c in ".!?") and passage.count(prefix) == 1:
                candidates.append((prefix, word))
    if not candidates:
        return None
    return candidates[int(torch.randint(len(candidates), (1,), generator=rng))]


def long_context_qa(spec: DataTasksSpec, seed: int = 0) -> list[Example]:
    """Questions whose answer is a word of one passage among distractors from other articles."""
    passages = _passages(spec.passage_chars)
    rng = torch.Generator().manual_seed(1000 + seed)
    order = torch.randperm(len(passages), generator=rng).tolist()
    examples: list[Example] = []
    for index in order:
        if len(examples) >= spec.n_examples:
            break
        title, gold = passages[index]
        cloze = _cloze(gold, rng)
        if cloze is None:
            continue
        others = [p for t, p in (passages[i] for i in torch.randperm(len(passages), generator=rng).tolist())
                  if t != title][:spec.passages - 1]
        position = int(torch.randint(spec.passages, (1,), generator=rng))
        documents = others[:position] + [gold] + others[position:]
        prefix, answer = cloze
        question = f'Quote from the text above: "{prefix}'  # the model continues the quote
        request = Request.from_text(question, documents)
        request.metadata["question"] = f'"{prefix}"'
        examples.append(Example("long_context_qa", request, answers=[answer], gold_document=position))
    return examples


def multi_doc_summary(spec: DataTasksSpec, seed: int = 0) -> list[Example]:
    """Summarise passages of different articles; references are the (uncompressed) passages."""
    passages = _passages(spec.passage_chars)
    rng = torch.Generator().manual_seed(2000 + seed)
    order = torch.randperm(len(passages), generator=rng).tolist()
    per = max(2, min(spec.passages, 3))
    examples = []
    for start in range(0, min(len(order), per * spec.n_examples), per):
        documents = [passages[i][1] for i in order[start:start + per]]
        request = Request.from_text("Summarise the passages above in two sentences.", documents)
        request.metadata["question"] = "summary of the passages"
        examples.append(Example("multi_doc_summary", request, references=documents))
    return examples


def fewshot_bigbench(spec: DataTasksSpec, seed: int = 0) -> list[Example]:
    """Multiple-choice questions after ``demonstrations`` solved examples of the same task."""
    pool = task_examples(spec.fewshot_task)
    rng = torch.Generator().manual_seed(3000 + seed)
    order = torch.randperm(len(pool), generator=rng).tolist()
    tests = order[:spec.n_examples]
    rest = order[spec.n_examples:]
    examples = []
    for number, index in enumerate(tests):
        shots = [pool[rest[(number * spec.demonstrations + j) % len(rest)]] for j in range(spec.demonstrations)]
        documents = [f"Q: {s['question']}\nA: {s['choices'][s['gold']]}" for s in shots]
        item = pool[index]
        request = Request.from_text(f"Q: {item['question']}\nA:", documents)
        request.metadata["question"] = item["question"]
        examples.append(Example("fewshot_bigbench", request, choices=list(item["choices"]), gold=item["gold"]))
    return examples


BUILDERS: dict[str, Callable[[DataTasksSpec, int], list[Example]]] = {
    "long_context_qa": long_context_qa, "multi_doc_summary": multi_doc_summary, "fewshot_bigbench": fewshot_bigbench,
}


def build_examples(spec: DataTasksSpec, name: str, seed: int = 0) -> list[Example]:
    return BUILDERS[name](spec, seed)


# --------------------------------------------------------------------------- scoring


def qa_scores(prediction: str, answers: list[str]) -> tuple[float, float]:
    """(exact match, token F1) of a prediction's first words against the best answer."""
    words = _normalise(prediction).split()
    best_em, best_f1 = 0.0, 0.0
    for answer in answers:
        gold = _normalise(answer).split()
        guess = words[:max(1, len(gold))]
        best_em = max(best_em, float(guess == gold))
        common = sum((Counter(guess) & Counter(gold)).values())
        if common:
            precision, recall = common / len(guess), common / len(gold)
            best_f1 = max(best_f1, 2 * precision * recall / (precision + recall))
    return best_em, best_f1


def rouge(summary: str, references: list[str]) -> dict[str, float]:
    """ROUGE-1 precision and ROUGE-L F of a summary against the joined source passages."""
    from rouge_score import rouge_scorer

    scorer = rouge_scorer.RougeScorer(["rouge1", "rougeL"], use_stemmer=True)
    scores = scorer.score(" ".join(references), summary)
    return {"rouge1_precision": scores["rouge1"].precision, "rougeL_f": scores["rougeL"].fmeasure}


#: whether a task's prompt goes through the chat template (the QA and few-shot prompts are completions)
CHAT_TEMPLATE = {"long_context_qa": False, "multi_doc_summary": True, "fewshot_bigbench": False}


def prompt_tokens(tokenizer: Any, request: Request, chat_template: bool = True) -> int:
    """Tokens of the rendered request (what the model prefills)."""
    ids, _ = encode_prompts(tokenizer, [request.render()], chat_template, "cpu", max_tokens=10**9)
    return int(ids.shape[1])


@torch.inference_mode()
def choice_logprobs(model: Any, tokenizer: Any, request: Request, choices: list[str]) -> list[float]:
    """Length-normalised log-likelihood of each choice as the continuation of the rendered request."""
    text = request.text()
    context = tokenizer(text, add_special_tokens=False)["input_ids"]
    device = next(model.parameters()).device
    scores = []
    for choice in choices:
        target = tokenizer(" " + choice.strip(), add_special_tokens=False)["input_ids"] or [tokenizer.eos_token_id]
        ids = torch.tensor([context + target], device=device)
        logits = model(input_ids=ids).logits[0, len(context) - 1:-1].float()
        logp = logits.log_softmax(-1).gather(-1, ids[0, len(context):, None]).sum()
        scores.append(float(logp) / len(target))
    return scores


# --------------------------------------------------------------------------- running one example


@dataclass
class Outcome:
    score: dict[str, float]
    seconds: float
    tokens_before: int
    tokens_after: int


def run_example(composed: Any, example: Example, spec: DataTasksSpec, clock: Callable[[], float]) -> Outcome:
    """The data stage and the answer of one example on a composed model, timed together."""
    tokenizer = composed.tokenizer
    chat = CHAT_TEMPLATE[example.task]
    before = prompt_tokens(tokenizer, example.request, chat)
    if example.task == "fewshot_bigbench":
        started = clock()
        transformed = composed.transform_request(example.request)
        scores = choice_logprobs(composed.model, tokenizer, transformed, example.choices)
        seconds = clock() - started
        best = max(range(len(scores)), key=scores.__getitem__)
        return Outcome({"accuracy": float(best == example.gold)}, seconds, before,
                       prompt_tokens(tokenizer, transformed, chat))
    length = spec.max_new_tokens if example.task == "long_context_qa" else spec.summary_tokens
    started = clock()
    completions, _ = composed.generate([example.request], GenerationConfig(max_new_tokens=length, chat_template=chat))
    seconds = clock() - started
    text = completions[0].text
    after = completions[0].prompt_tokens
    if example.task == "long_context_qa":
        em, f1 = qa_scores(text, example.answers)
        return Outcome({"accuracy": em, "f1": f1}, seconds, before, after)
    return Outcome(rouge(text, example.references), seconds, before, after)


# --------------------------------------------------------------------------- the evaluator phase


def data_tasks_phase(run: Any) -> None:
    """Accuracy, compression ratio and end-to-end latency on the suite's data-level tasks."""
    spec: DataTasksSpec | None = getattr(run.suite, "data_tasks", None)
    if spec is None:
        return
    peer = run.peer if run.side_by_side and spec.paired_baseline else None
    for name in spec.names:
        unavailable = bigbench_unavailable_reason() if name == "fewshot_bigbench" else None
        if unavailable:
            run.record.notes.append(f"{name}: {unavailable}")
            continue
        examples = build_examples(spec, name)
        outcomes, base_seconds = [], []
        for index, example in enumerate(examples):
            run.advance(f"data task {name} {index + 1}/{len(examples)}")
            if peer is not None and index % 2 == 1:
                base_seconds.append(_on_peer(peer, example, spec, run.clock))
            if run.recorder is not None:
                run.recorder.reset()  # the caches of earlier examples must not pile up
            outcomes.append(run_example(run.composed, example, spec, run.clock))
            if peer is not None and index % 2 == 0:
                base_seconds.append(_on_peer(peer, example, spec, run.clock))
        record_outcomes(run.record, name, outcomes, base_seconds)


def _on_peer(peer: Any, example: Example, spec: DataTasksSpec, clock: Callable[[], float]) -> float:
    """Seconds of the uncompressed example on the bench's baseline model (its cache recorder reset after)."""
    try:
        return run_example(peer.composed, example, spec, clock).seconds
    finally:
        if getattr(peer, "recorder", None) is not None:
            peer.recorder.reset()


def record_outcomes(record: Any, name: str, outcomes: list[Outcome], base_seconds: list[float]) -> None:
    n = len(outcomes)
    if not n:
        return
    for metric in outcomes[0].score:
        record.add(f"data.{name}.{metric}", sum(o.score[metric] for o in outcomes) / n, n=n, higher_is_better=True)
    before = sum(o.tokens_before for o in outcomes)
    after = sum(o.tokens_after for o in outcomes)
    record.add(f"data.{name}.compression_ratio", before / max(after, 1), unit="×", n=n, higher_is_better=True,
               params={"prompt_tokens_before": before / n, "prompt_tokens_after": after / n})
    seconds = sorted(o.seconds for o in outcomes)
    record.add(f"data.{name}.latency_s", seconds[n // 2], unit="s", n=n, higher_is_better=False,
               params={"includes": "data stage (compression/retrieval) + prefill + decode", "statistic": "median"})
    if base_seconds:
        ratios = sorted(o.seconds / b for o, b in zip(outcomes, base_seconds) if b > 0)
        if ratios:
            record.add(f"data.{name}.latency_ratio", ratios[len(ratios) // 2], unit="×", n=len(ratios),
                       higher_is_better=False,
                       params={"vs": "the uncompressed prompt on the baseline model, adjacent runs",
                               "geomean": math.exp(sum(math.log(r) for r in ratios) / len(ratios))})
