"""Iteration-level continuous batching with chunked prefill over the paged KV cache.

Orca (Yu et al., OSDI 2022) schedules at the granularity of one iteration: after every
forward, finished requests leave the batch and waiting ones join, instead of the whole
batch waiting for its longest member (static batching). Sarathi-Serve (Agrawal et al.,
arXiv:2403.02310) splits long prefills into chunks that ride along with the decodes of
the running requests under a per-iteration token budget, so a long prompt does not stall
every decode for a whole prefill.

One :meth:`ContinuousBatchingEngine.step`:

1. preemptive schedulers may evict running requests for a more urgent waiting one;
2. every running request in decode gets one slot (out of blocks → the scheduler picks a
   victim, preempted by recompute);
3. running requests still in prefill get their next chunk, then waiting requests are
   admitted in the scheduler's order while sequence slots, token budget and blocks allow
   (the prefix cache may already hold the start of their prompt);
4. one packed forward (:class:`~effinfer.plugins.system.serving.forward.PagedForward`);
   requests whose prompt is complete sample a token; finished ones free their blocks.

:class:`StaticBatchingEngine` is the peer: Hugging Face's forward over a ``DynamicCache``,
left-padded batches formed when the previous batch has completely finished.
"""

from __future__ import annotations

import itertools
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Literal

import torch
from pydantic import BaseModel, ConfigDict, Field
from torch import nn

from effinfer.plugins.system.serving.forward import PagedForward, Segment, StepBatch
from effinfer.plugins.system.serving.paged import OutOfBlocks
from effinfer.plugins.system.serving.scheduling import FCFS, Scheduler

_serials = itertools.count()


@dataclass
class ServeRequest:
    """One generation request and its state in an engine."""

    id: str
    prompt: list[int]
    max_tokens: int = 16
    temperature: float = 0.0
    top_p: float = 1.0
    seed: int | None = None
    stop_ids: frozenset[int] = frozenset()
    ignore_eos: bool = False
    priority: int = 0
    arrival: float = field(default_factory=time.perf_counter)
    #: called with (request, new token or None when finished) from the engine's thread
    on_token: Callable[[ServeRequest, int | None], None] | None = None
    output: list[int] = field(default_factory=list)
    computed: int = 0
    status: str = "waiting"
    finish_reason: str | None = None
    admitted: float | None = None
    first_token: float | None = None
    finished: float | None = None
    token_times: list[float] = field(default_factory=list)
    preemptions: int = 0
    predicted_tokens: float | None = None
    serial: int = field(default_factory=lambda: next(_serials))
    generator: torch.Generator | None = None

    @property
    def tokens(self) -> list[int]:
        return self.prompt + self.output


class EngineConfig(BaseModel):
    """Memory and batching settings of the serving engines."""

    model_config = ConfigDict(extra="forbid")

    block_size: int = Field(16, ge=1, le=256, description="tokens per KV block")
    num_blocks: int | None = Field(None, ge=2, description="KV blocks in the pool (None: from kv_cache_mb)")
    kv_cache_mb: float = Field(256.0, gt=0, le=1 << 20, description="KV pool size when num_blocks is None")
    prefix_caching: bool = Field(True, description="share identical prompt prefixes (copy-on-write)")
    attention_kernel: Literal["auto", "torch", "reference", "cpu", "triton"] = Field(
        "auto", description="decode attention over the pool: plain torch, or effinfer.kernels' "
                            "paged_decode_attention on a backend (auto: Triton on CUDA, plain torch elsewhere)")
    max_num_seqs: int = Field(32, ge=1, le=4096, description="running requests at most")
    max_batched_tokens: int = Field(256, ge=1, le=65536, description="new tokens per iteration (chunk budget)")
    chunked_prefill: bool = Field(True, description="split prefills into chunks mixed with decodes")
    static_batch_size: int = Field(8, ge=1, le=1024, description="batch size of the static-batching peer")


class BaseEngine:
    """add / abort / step, thread-safe submission; the engine's thread calls :meth:`step`."""

    def __init__(self, model: nn.Module, config: EngineConfig, scheduler: Scheduler | None = None,
                 eos_ids: set[int] | None = None) -> None:
        self.model = model
        self.config = config
        self.scheduler = scheduler or FCFS()
        self.eos_ids = set(eos_ids or ())
        self.waiting: list[ServeRequest] = []
        self.running: list[ServeRequest] = []
        self.finished: list[ServeRequest] = []
        self._inbox: list[ServeRequest] = []
        self._aborts: set[str] = set()
        self._lock = threading.Lock()
        self.steps = 0
        self.device = next(model.parameters()).device

    # --------------------------------------------------------------- submission (any thread)
    def add(self, request: ServeRequest) -> None:
        if not request.prompt:
            raise ValueError("empty prompt: give at least one token")
        if request.max_tokens < 1:
            raise ValueError(f"max_tokens must be ≥ 1 (got {request.max_tokens})")
        if request.seed is not None or request.temperature > 0:
            request.generator = torch.Generator(device=self.device).manual_seed(request.seed or 0)
        with self._lock:
            self._inbox.append(request)

    def abort(self, request_id: str) -> None:
        with self._lock:
            self._aborts.add(request_id)

    def has_work(self) -> bool:
        with self._lock:
            return bool(self._inbox or self._aborts or self.waiting or self.running)

    def _drain(self) -> None:
        with self._lock:
            inbox, self._inbox = self._inbox, []
            aborts, self._aborts = self._aborts, set()
        self.waiting += inbox
        for request in [r for r in self.waiting + self.running if r.id in aborts]:
            self._finish(request, "abort")

    # --------------------------------------------------------------- shared helpers
    def _select(self, request: ServeRequest, logits: torch.Tensor) -> int:
        if request.temperature <= 0:
            return int(logits.argmax())
        probs = torch.softmax(logits / request.temperature, dim=-1)
        if request.top_p < 1.0:
            sorted_probs, order = probs.sort(descending=True)
            keep = sorted_probs.cumsum(-1) - sorted_probs < request.top_p
            probs = torch.zeros_like(probs).scatter_(0, order[keep], sorted_probs[keep])
        return int(torch.multinomial(probs, 1, generator=request.generator))

    def _emit(self, request: ServeRequest, token: int, now: float) -> None:
        request.output.append(token)
        request.token_times.append(now)
        if request.first_token is None:
            request.first_token = now
        if request.on_token is not None:
            request.on_token(request, token)
        if token in request.stop_ids or (token in self.eos_ids and not request.ignore_eos):
            self._finish(request, "stop")
        elif len(request.output) >= request.max_tokens:
            self._finish(request, "length")

    def _finish(self, request: ServeRequest, reason: str) -> None:
        request.status, request.finish_reason, request.finished = "finished", reason, time.perf_counter()
        if request in self.running:
            self.running.remove(request)
        if request in self.waiting:
            self.waiting.remove(request)
        self._release(request)
        self.finished.append(request)
        self.scheduler.observe(request)
        if request.on_token is not None:
            request.on_token(request, None)

    def _release(self, request: ServeRequest) -> None:
        """Free what the request holds in the engine."""

    def step(self) -> int:
        raise NotImplementedError

    def run_until_done(self) -> list[ServeRequest]:
        while self.has_work():
            self.step()
        return self.finished


class ContinuousBatchingEngine(BaseEngine):
    """Continuous batching + chunked prefill + paged KV (see the module docstring)."""

    name = "continuous"

    def __init__(self, model: nn.Module, config: EngineConfig | None = None, scheduler: Scheduler | None = None,
                 eos_ids: set[int] | None = None) -> None:
        config = config or EngineConfig()
        super().__init__(model, config, scheduler, eos_ids)
        self.forward = PagedForward(model, config.attention_kernel)
        layout = self.forward.layout
        per_block = 2 * layout.num_layers * layout.num_kv_heads * layout.head_dim * config.block_size * \
            next(model.parameters()).element_size()
        blocks = config.num_blocks or max(2, int(config.kv_cache_mb * 2**20 // per_block))
        self.cache = self.forward.new_cache(blocks, config.block_size, config.prefix_caching)
        self.max_context = getattr(model.config, "max_position_embeddings", None)
        self.peak_waste: dict[str, int] = {"allocated_tokens": 0, "used_tokens": 0, "waste_tokens": 0,
                                           "contiguous_reserved_tokens": 0}

    def check(self, request: ServeRequest) -> None:
        """Refuse a request that can never fit (context or the whole pool)."""
        total = len(request.prompt) + request.max_tokens
        if self.max_context and total > self.max_context:
            raise ValueError(f"prompt ({len(request.prompt)} tokens) + max_tokens ({request.max_tokens}) = {total} "
                             f"exceeds the model's context of {self.max_context} tokens; shorten the prompt or "
                             "lower max_tokens")
        if self.cache.blocks_needed(total) > self.cache.num_blocks:
            raise ValueError(f"prompt + max_tokens = {total} tokens need {self.cache.blocks_needed(total)} KV blocks; "
                             f"the pool has {self.cache.num_blocks} (raise kv_cache_mb)")

    def add(self, request: ServeRequest) -> None:
        self.check(request)
        super().add(request)

    def _release(self, request: ServeRequest) -> None:
        self.cache.free_sequence(request.id)

    def admit_prefilled(self, request: ServeRequest, keys: torch.Tensor, values: torch.Tensor) -> bool:
        """Admit a request whose prompt was prefilled elsewhere (disaggregated serving:
        :mod:`~effinfer.plugins.system.serving.disaggregated`).

        ``request.output`` holds its first token; ``keys`` / ``values`` (``layers × prompt tokens × kv_heads ×
        head_dim``) are its prompt's KV. They are written into blocks of this pool and the request joins the
        running ones, so its next step is a decode. Call it from the thread that steps the engine; returns
        False, with nothing changed, while no sequence slot or not enough blocks are free.
        """
        self.check(request)
        n = len(request.prompt)
        needed = self.cache.blocks_needed(n + 1)
        if len(self.running) >= self.config.max_num_seqs or not self.cache.can_allocate(needed):
            return False
        cached = self.cache.add_sequence(request.id, request.prompt)
        try:
            slots = self.cache.reserve(request.id, n - cached)
        except OutOfBlocks:
            self.cache.free_sequence(request.id)
            return False
        self.cache.keys[:, slots] = keys[:, cached:n].to(self.cache.keys)
        self.cache.values[:, slots] = values[:, cached:n].to(self.cache.values)
        self.cache.register_prefix(request.id, request.prompt, n)
        if request.generator is None and (request.seed is not None or request.temperature > 0):
            request.generator = torch.Generator(device=self.device).manual_seed(request.seed or 0)
        request.computed, request.status = n, "running"
        request.admitted = request.admitted or time.perf_counter()
        self.running.append(request)
        return True

    def _preempt(self, request: ServeRequest) -> None:
        self.cache.free_sequence(request.id)
        self.running.remove(request)
        request.computed, request.status = 0, "waiting"
        request.preemptions += 1
        self.waiting.append(request)

    def _room_for(self, request: ServeRequest) -> bool:
        """Preempt lower-ranked running requests until ``request`` could be admitted; whether it can."""
        needed = self.cache.blocks_needed(min(len(request.tokens), self.config.max_batched_tokens) + 1)
        while len(self.running) >= self.config.max_num_seqs or not self.cache.can_allocate(needed):
            victim = self.scheduler.victim(self.running, request)
            if victim is None:
                return False
            self._preempt(victim)
        return True

    def step(self) -> int:
        """One iteration; returns the number of tokens computed."""
        self._drain()
        now = time.perf_counter()
        if self.scheduler.preemptive:
            for request in self.scheduler.order(self.waiting, now)[:1]:
                self._room_for(request)
        budget = self.config.max_batched_tokens
        plan: list[tuple[ServeRequest, int, torch.Tensor]] = []
        # 1. decodes of the running requests (oldest admitted first)
        for request in sorted(self.running, key=lambda r: (r.admitted, r.serial)):
            if request not in self.running or len(request.tokens) - request.computed != 1:
                continue
            while True:
                try:
                    plan.append((request, 1, self.cache.reserve(request.id, 1)))
                    budget -= 1
                    break
                except OutOfBlocks:
                    victim = self.scheduler.victim([r for r in self.running if r not in [p[0] for p in plan]])
                    if victim is None:
                        break
                    self._preempt(victim)
                    if victim is request:
                        break
        # 2. chunks of running prefills, then admissions
        planned = {p[0].id for p in plan}
        for request in sorted(self.running, key=lambda r: (r.admitted, r.serial)):
            if budget <= 0:
                break
            if request.id in planned:
                continue
            chunk = self._chunk(request, budget, bool(plan))
            if chunk and self._try_reserve(plan, request, chunk):
                budget -= chunk
        for request in self.scheduler.order(self.waiting, now):
            if budget <= 0 or len(self.running) >= self.config.max_num_seqs:
                break
            request.computed = self.cache.add_sequence(request.id, request.tokens)
            chunk = self._chunk(request, budget, bool(plan))
            if not chunk or not self._try_reserve(plan, request, chunk):
                self.cache.free_sequence(request.id)
                request.computed = 0
                break
            budget -= chunk
            self.waiting.remove(request)
            self.running.append(request)
            request.status = "running"
            if request.admitted is None:
                request.admitted = now
        if not plan:
            if self.running:  # every running request waits for blocks: free the scheduler's victim's
                victim = self.scheduler.victim(self.running)
                if victim is not None and len(self.running) > 1:
                    self._preempt(victim)
            return 0
        self._run(plan)
        self.steps += 1
        return sum(p[1] for p in plan)

    def _chunk(self, request: ServeRequest, budget: int, busy: bool) -> int:
        remaining = len(request.tokens) - request.computed
        if self.config.chunked_prefill:
            return min(remaining, budget)
        return remaining if remaining <= budget or not busy else 0

    def _try_reserve(self, plan: list, request: ServeRequest, chunk: int) -> bool:
        try:
            plan.append((request, chunk, self.cache.reserve(request.id, chunk)))
            return True
        except OutOfBlocks:
            return False

    def _run(self, plan: list[tuple[ServeRequest, int, torch.Tensor]]) -> None:
        tokens: list[int] = []
        segments, rows, sampled = [], [], []
        for request, chunk, _ in plan:
            segments.append(Segment(request.id, len(tokens), chunk, request.computed))
            tokens += request.tokens[request.computed:request.computed + chunk]
            if request.computed + chunk == len(request.tokens):
                rows.append(len(tokens) - 1)
                sampled.append(request)
        slots = torch.cat([p[2] for p in plan])
        logits = self.forward(self.cache, StepBatch(tokens, segments), slots, rows)
        self._track_waste()
        for request, chunk, _ in plan:
            request.computed += chunk
            self.cache.register_prefix(request.id, request.tokens, request.computed)
        now = time.perf_counter()
        for row, request in zip(logits, sampled):
            if request.status == "running":
                self._emit(request, self._select(request, row), now)

    def _track_waste(self) -> None:
        waste = self.cache.waste()
        if waste["allocated_tokens"] >= self.peak_waste["allocated_tokens"]:
            reserved = sum(len(r.prompt) + r.max_tokens for r in self.running)
            self.peak_waste = waste | {"contiguous_reserved_tokens": reserved}


class StaticBatchingEngine(BaseEngine):
    """The peer: HF forward over a ``DynamicCache``, one left-padded batch at a time, run to completion."""

    name = "static"

    def __init__(self, model: nn.Module, config: EngineConfig | None = None, scheduler: Scheduler | None = None,
                 eos_ids: set[int] | None = None, pad_id: int = 0) -> None:
        super().__init__(model, config or EngineConfig(), scheduler, eos_ids)
        self.pad_id = pad_id
        self.batch: list[ServeRequest] = []
        self._cache = None
        self._mask: torch.Tensor | None = None
        self._next: torch.Tensor | None = None

    def check(self, request: ServeRequest) -> None:
        limit = getattr(self.model.config, "max_position_embeddings", None)
        if limit and len(request.prompt) + request.max_tokens > limit:
            raise ValueError(f"prompt + max_tokens exceeds the model's context of {limit} tokens")

    def add(self, request: ServeRequest) -> None:
        self.check(request)
        super().add(request)

    @torch.inference_mode()
    def step(self) -> int:
        from transformers import DynamicCache

        self._drain()
        now = time.perf_counter()
        if not any(r.status == "running" for r in self.batch):
            self.batch = []
            if not self.waiting:
                return 0
            self.batch = self.scheduler.order(self.waiting, now)[:self.config.static_batch_size]
            for request in self.batch:
                self.waiting.remove(request)
                self.running.append(request)
                request.status, request.admitted = "running", now
            longest = max(len(r.prompt) for r in self.batch)
            ids = torch.full((len(self.batch), longest), self.pad_id, dtype=torch.long)
            mask = torch.zeros(len(self.batch), longest, dtype=torch.long)
            for i, request in enumerate(self.batch):
                ids[i, longest - len(request.prompt):] = torch.tensor(request.prompt)
                mask[i, longest - len(request.prompt):] = 1
            self._cache, self._mask = DynamicCache(), mask.to(self.device)
            inputs = ids.to(self.device)
            positions = (self._mask.cumsum(-1) - 1).clamp(min=0)
            computed = int(mask.sum())
        else:
            inputs = self._next[:, None]
            self._mask = torch.cat([self._mask, torch.ones_like(self._mask[:, :1])], dim=1)
            positions = self._mask.sum(-1, keepdim=True) - 1
            computed = len(self.batch)
        out = self.model(input_ids=inputs, attention_mask=self._mask, position_ids=positions,
                         past_key_values=self._cache, use_cache=True)
        logits = out.logits[:, -1].float()
        now = time.perf_counter()
        chosen = []
        for row, request in zip(logits, self.batch):
            token = self._select(request, row) if request.status == "running" else self.pad_id
            chosen.append(token)
            if request.status == "running":
                self._emit(request, token, now)
        self._next = torch.tensor(chosen, device=self.device)
        self.steps += 1
        return computed


def build_engine(kind: str, model: nn.Module, config: EngineConfig | None = None, scheduler: Scheduler | None = None,
                 eos_ids: set[int] | None = None, pad_id: int = 0) -> BaseEngine:
    """``"continuous"`` (paged KV + continuous batching) or ``"static"`` (the HF static-batching peer)."""
    if kind == "continuous":
        return ContinuousBatchingEngine(model, config, scheduler, eos_ids)
    if kind == "static":
        return StaticBatchingEngine(model, config, scheduler, eos_ids, pad_id)
    raise ValueError(f"unknown serving engine {kind!r}; use 'continuous' or 'static'")
