"""Skeleton-of-Thought: a short skeleton first, then every point expanded in parallel as one batch.

Ning et al., "Skeleton-of-Thought: Prompting LLMs for Efficient Parallel Generation", ICLR 2024,
arXiv:2307.15337. The model first writes a skeleton (a numbered list of 3-5-word points, the
paper's skeleton prompt); the points are then expanded **as one batch** through the engine's
batched decode (left-padded, one prompt per point, the paper's point-expanding prompt), so the
answer's tokens come ``points`` at a time. The answer is the points with their expansions.

A router decides which questions suit it (SoT-R in the paper, where a prompted LLM or a trained
RoBERTa decides): here a rule on the question's form — list- and explanation-style questions
("what are", "tips", "ways", "how can", "explain", "describe", "advantages", …) are accepted;
questions with documents, code, math or short factual questions fall back to normal decoding, as
does a skeleton with fewer than ``min_points`` points. The question comes from the data stage
(this technique's ``effinfer_transform_request`` records it); a prompt the data stage did not see
is decoded normally.
"""

from __future__ import annotations

import re
from collections import OrderedDict
from typing import Any

import torch
from pydantic import BaseModel, ConfigDict, Field

from effinfer.core import Paper, Technique, hookimpl
from effinfer.core.generation import GenerationConfig, GenerationResult, encode_prompts
from effinfer.core.stages import DataStage, Request, SystemStage

SKELETON_PROMPT = (
    "You're an organizer responsible for only giving the skeleton (not the full content) for answering the "
    "question. Provide the skeleton in a list of points (numbered 1., 2., 3., etc.) to answer the question. "
    "Instead of writing a full sentence, each skeleton point should be very short with only 3~5 words. "
    "Generally, the skeleton should have 3~10 points.\n\nQuestion:\n{question}\n\nSkeleton:\n1.")
POINT_PROMPT = (
    "You're responsible for continuing the writing of one and only one point in the overall answer to the "
    "following question.\n\n{question}\n\nThe skeleton of the answer is\n\n{skeleton}\n\nContinue and only "
    "continue the writing of point {index}. Write it very shortly in 1~2 sentences and do not continue with "
    "other points!")
ACCEPT = re.compile(r"\b(what are|tips?|ways?|how (can|do|to|should)|explain|describe|advantages?|benefits?|"
                    r"reasons?|steps?|ideas?|strategies|suggest|list|compare|pros|factors)\b", re.I)
REFUSE = re.compile(r"(```|\bdef |\bcode\b|\bfunction\b|\bcalculate\b|\bsolve\b|\d+\s*[-+*/^=]\s*\d+|"
                    r"\bprove\b|\bwho (is|was)\b|\bwhen (is|was|did)\b)", re.I)
POINT = re.compile(r"^\s*(\d+)[.)]\s*(.+?)\s*$")


def route(question: str, has_documents: bool = False) -> bool:
    """Whether a question suits Skeleton-of-Thought (independent points)."""
    return not has_documents and bool(ACCEPT.search(question)) and not REFUSE.search(question)


def parse_skeleton(text: str, max_points: int) -> list[str]:
    """The points of a numbered skeleton (the "1." that starts it is part of the prompt)."""
    points = []
    for number, line in enumerate(("1." + text).splitlines()):
        match = POINT.match(line)
        if match and int(match.group(1)) == len(points) + 1:
            point = match.group(2).strip(" *-")
            if point:
                points.append(point[:120])
        elif points and number and line.strip() and not match:
            break  # prose after the list ends the skeleton
    return points[:max_points]


class SkeletonDecoding:
    """The decoding strategy: skeleton, batched point expansion, or plain decoding when not routed."""

    name = "skeleton_of_thought"

    def __init__(self, technique: SkeletonOfThought, stage: SystemStage) -> None:
        self.technique = technique
        self.tokenizer = stage.tokenizer
        self.plain = stage.engine.decoding()

    def generate(self, model: Any, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                 config: GenerationConfig, stop_ids: set[int], cache_factory: Any = None) -> GenerationResult:
        rows = []
        for row in range(input_ids.shape[0]):
            text = self.tokenizer.decode(input_ids[row][attention_mask[row].bool()], skip_special_tokens=True)
            question = self.technique.accepted_question(text)
            if question is None:
                rows.append(self.plain.generate(model, input_ids[row:row + 1], attention_mask[row:row + 1], config,
                                                stop_ids, cache_factory))
            else:
                rows.append(self.skeleton_answer(model, question, config, stop_ids, cache_factory, input_ids[row:row + 1],
                                                 attention_mask[row:row + 1]))
        return GenerationResult([r.sequences[0] for r in rows], sum(r.prefill_seconds for r in rows),
                                sum(r.decode_seconds for r in rows), sum(r.forward_steps for r in rows))

    def skeleton_answer(self, model: Any, question: str, config: GenerationConfig, stop_ids: set[int],
                        cache_factory: Any, input_ids: torch.Tensor, mask: torch.Tensor) -> GenerationResult:
        settings = self.technique.config
        device = input_ids.device
        ids, skeleton_mask = encode_prompts(self.tokenizer, [SKELETON_PROMPT.format(question=question)], True, device)
        skeleton_config = config.model_copy(update={"max_new_tokens": settings.skeleton_tokens})
        skeleton = self.plain.generate(model, ids, skeleton_mask, skeleton_config, stop_ids, cache_factory)
        skeleton_text = self.tokenizer.decode(skeleton.sequences[0], skip_special_tokens=True)
        points = parse_skeleton(skeleton_text, settings.max_points)
        if len(points) < settings.min_points:
            self.technique.decisions.append("fallback: skeleton")
            plain = self.plain.generate(model, input_ids, mask, config, stop_ids, cache_factory)
            return _merge([skeleton, plain], plain.sequences[0])
        listing = "\n".join(f"{i + 1}. {p}" for i, p in enumerate(points))
        prompts = [[{"role": "user", "content": POINT_PROMPT.format(question=question, skeleton=listing, index=i + 1)},
                    {"role": "assistant", "content": f"{i + 1}. {p}"}] for i, p in enumerate(points)]
        texts = [self.tokenizer.apply_chat_template(m, tokenize=False, continue_final_message=True) for m in prompts]
        self.tokenizer.padding_side = "left"
        encoded = self.tokenizer(texts, return_tensors="pt", padding=True, add_special_tokens=False)
        point_config = config.model_copy(update={"max_new_tokens": min(settings.point_tokens, config.max_new_tokens)})
        expanded = self.plain.generate(model, encoded["input_ids"].to(device), encoded["attention_mask"].to(device),
                                       point_config, stop_ids, cache_factory)
        parts = []
        for i, (point, tokens) in enumerate(zip(points, expanded.sequences)):
            body = self.tokenizer.decode(tokens, skip_special_tokens=True).strip()
            parts.append(f"{i + 1}. {point} {body}".strip())
        answer = self.tokenizer("\n".join(parts), add_special_tokens=False)["input_ids"]
        self.technique.decisions.append(f"skeleton: {len(points)} points")
        return _merge([skeleton, expanded], answer)


def _merge(results: list[GenerationResult], sequence: list[int]) -> GenerationResult:
    return GenerationResult([sequence], sum(r.prefill_seconds for r in results), sum(r.decode_seconds for r in results),
                            sum(r.forward_steps for r in results))


class SkeletonOfThought(Technique):
    name = "skeleton_of_thought"
    node = "data.output_organization"
    paper = Paper(title="Skeleton-of-Thought: Prompting LLMs for Efficient Parallel Generation", year=2024,
                  arxiv="2307.15337")
    summary = ("The model writes a short numbered skeleton, then every point is expanded in parallel as one "
               "batch through the engine's batched decode; a router sends questions that do not suit it "
               "(code, math, factual, with documents) to normal decoding.")
    lossless = False

    class Config(BaseModel):
        model_config = ConfigDict(extra="forbid")

        skeleton_tokens: int = Field(48, ge=8, le=512, description="tokens of the skeleton")
        point_tokens: int = Field(32, ge=4, le=1024, description="tokens per expanded point")
        min_points: int = Field(2, ge=1, le=16, description="fewer points than this: normal decoding")
        max_points: int = Field(6, ge=1, le=32, description="points expanded at most (the batch size)")
        router: bool = Field(True, description="send questions that do not suit SoT to normal decoding")

    def __init__(self, config: Any = None) -> None:
        super().__init__(config)
        if self.config.min_points > self.config.max_points:
            raise ValueError(f"min_points ({self.config.min_points}) must be ≤ max_points ({self.config.max_points})")
        self._questions: OrderedDict[str, bool] = OrderedDict()
        self.decisions: list[str] = []

    @hookimpl
    def effinfer_transform_request(self, request: Request, stage: DataStage) -> None:
        last = max(i for i, m in enumerate(request.messages) if m["role"] == "user")
        question = request.messages[last]["content"]
        accepted = (not self.config.router) or route(question, bool(request.documents))
        self._questions[question] = accepted
        self._questions.move_to_end(question)
        while len(self._questions) > 256:
            self._questions.popitem(last=False)
        request.metadata["skeleton_of_thought"] = accepted

    def accepted_question(self, prompt_text: str) -> str | None:
        """The routed-in question this prompt carries (the longest recorded one it contains), if any."""
        found = [q for q, ok in self._questions.items() if q and q in prompt_text]
        if not found:
            return None
        question = max(found, key=len)
        if not self._questions[question]:
            self.decisions.append("router: normal decoding")
            return None
        return question

    @hookimpl
    def effinfer_decoding_strategy(self, stage: SystemStage) -> SkeletonDecoding:
        return SkeletonDecoding(self, stage)

