"""Disaggregated prefill and decode: separate workers, the prompt's KV cache handed from one to the other.

DistServe (Zhong et al., "DistServe: Disaggregating Prefill and Decoding for Goodput-optimized
Large Language Model Serving", arXiv:2401.09670) and Splitwise (Patel et al., "Splitwise:
Efficient Generative LLM Inference Using Phase Splitting", arXiv:2311.18677) run the
compute-bound prefill and the memory-bound decode of each request on different instances: a
long prompt's prefill then never stalls the running decodes (no prefill–decode interference,
so time per output token stays flat under load), and each phase gets the parallelism and batch
that suit it. The price is moving every request's KV cache from the prefill instance to the
decode instance once.

Here both workers are the serving engine itself
(:class:`~effinfer.plugins.system.serving.engine.ContinuousBatchingEngine`, paged KV,
continuous batching), each with its own copy of the model and its own block pool:

- :class:`PrefillWorker` runs each request with ``max_tokens=1`` (prompts batched and chunked
  by the engine); when the first token is sampled it copies the prompt's K/V out of its pool
  (``layers × prompt tokens × kv_heads × head_dim`` keys and values, CPU tensors: the
  *handoff*) and sends them, with the first token, to the decode worker; a request that ends
  at its first token (EOS, a stop id, ``max_tokens=1``) is finished there.
- :class:`DecodeWorker` writes each handoff into blocks of its own pool
  (:meth:`ContinuousBatchingEngine.admit_prefilled`) and decodes the requests with continuous
  batching; a handoff that does not fit waits (in order) until blocks are freed.
- :class:`DisaggregatedServer` runs the two workers as Ray actors (``ray.remote``, one CPU
  each, local Ray unless ``address`` is given) when Ray is installed (``pip install -e '.[ray]'``),
  else as objects in this process with the same interface and code path (each call runs at
  once; nothing overlaps). The KV goes straight from the prefill actor to the decode actor
  (Ray's object store), not through the coordinator, which only steps the workers, feeds
  arrivals (:meth:`DisaggregatedServer.replay`: the Poisson traces of
  :mod:`~effinfer.plugins.system.serving.loadtest`) and collects finished requests with their
  TTFT/TPOT, KV bytes handed over and handoff time.

Greedy tokens are exactly those of the co-located engine (tests/test_serving_disaggregated.py).
Sampled requests (``temperature > 0``) get a generator seeded with their ``seed`` on each
worker, so their tokens after the first differ from a co-located run with the same seed.

This is an entry point of its own (``benchmarks/serving_disaggregated.py`` uses it), not a
technique of a stack: ``effinfer serve`` runs one in-process engine, while this places the
phases on separate worker processes.
"""

from __future__ import annotations

import os
import threading
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Literal

import torch
from pydantic import BaseModel, ConfigDict, Field
from torch import nn

from effinfer.plugins.system.serving.engine import ContinuousBatchingEngine, EngineConfig, ServeRequest
from effinfer.plugins.system.serving.scheduling import FCFS
from effinfer.plugins.system.serving.sweep import ray_available

ModelSource = nn.Module | Callable[[], Any]


class DisaggregatedConfig(BaseModel):
    """The two workers' engines and where they run."""

    model_config = ConfigDict(extra="forbid")

    prefill: EngineConfig = Field(default_factory=lambda: EngineConfig(max_num_seqs=8, max_batched_tokens=512,
                                                                       kv_cache_mb=128),
                                  description="engine of the prefill worker (its pool holds prompts in flight)")
    decode: EngineConfig = Field(default_factory=lambda: EngineConfig(max_num_seqs=32, max_batched_tokens=256,
                                                                      kv_cache_mb=512),
                                 description="engine of the decode worker (its pool holds every running request)")
    runner: Literal["auto", "ray", "local"] = Field(
        "auto", description="'ray': workers are Ray actors; 'local': objects in this process; 'auto': Ray if installed")
    threads: int = Field(1, ge=1, le=1024, description="torch threads of each Ray worker (its num_cpus)")
    address: str | None = Field(None, description="Ray cluster address (None: start or join local Ray)")
    start_timeout_s: float = Field(300.0, gt=0, le=3600,
                                   description="seconds the Ray workers may take to start (placed, model loaded)")


def _load(model: ModelSource) -> nn.Module:
    if isinstance(model, nn.Module):
        return model
    loaded = model()
    return loaded[0] if isinstance(loaded, tuple) else loaded


def _copy(request: ServeRequest, **changes: Any) -> ServeRequest:
    """A fresh request with the same parameters (no output, state, callback or generator)."""
    fields = {"id": request.id, "prompt": list(request.prompt), "max_tokens": request.max_tokens,
              "temperature": request.temperature, "top_p": request.top_p, "seed": request.seed,
              "stop_ids": request.stop_ids, "ignore_eos": request.ignore_eos, "priority": request.priority,
              "arrival": request.arrival}
    return ServeRequest(**(fields | changes))


@dataclass
class Handoff:
    """A prefilled request on its way to the decode worker: first token in ``request.output``, prompt KV."""

    request: ServeRequest
    keys: torch.Tensor
    values: torch.Tensor
    prefill_admitted: float
    #: when the prefill worker sent it (``time.perf_counter``: CLOCK_MONOTONIC, one clock for every process here)
    sent: float
    extract_s: float

    @property
    def kv_bytes(self) -> int:
        return self.keys.numel() * self.keys.element_size() + self.values.numel() * self.values.element_size()

    # Pickled (Ray's object store), the KV travels as flat byte arrays: NumPy arrays go out of band with
    # pickle protocol 5, zero-copy, where a torch tensor is pickled through a copy (~10x slower for 10 MB here).
    def __getstate__(self) -> dict[str, Any]:
        return self.__dict__ | {"keys": _to_wire(self.keys), "values": _to_wire(self.values)}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state | {"keys": _from_wire(state["keys"]), "values": _from_wire(state["values"])})


def _to_wire(tensor: torch.Tensor) -> tuple[str, tuple[int, ...], Any]:
    flat = tensor.detach().cpu().contiguous().view(-1)
    return str(tensor.dtype).removeprefix("torch."), tuple(tensor.shape), flat.view(torch.uint8).numpy()


def _from_wire(wire: tuple[str, tuple[int, ...], Any]) -> torch.Tensor:
    dtype, shape, data = wire
    with warnings.catch_warnings():  # a zero-copy array from the object store is read-only; the KV is only read
        warnings.filterwarnings("ignore", message="The given NumPy array is not writable")
        return torch.from_numpy(data).view(getattr(torch, dtype)).view(shape)


@dataclass
class Finished:
    """One request served (or refused / aborted), with its timings (``time.perf_counter`` seconds)."""

    id: str
    prompt_tokens: int
    output: list[int]
    finish_reason: str
    arrival: float
    prefill_admitted: float | None = None
    first_token: float | None = None
    finished: float | None = None
    kv_bytes: int = 0
    extract_s: float | None = None
    #: prefill worker sent the KV → decode worker received it (Ray's object store; the decode actor receives on
    #: a second thread while it steps, so this is the transfer alone)
    transfer_s: float | None = None
    #: prefill worker sent the KV → written into the decode pool (also waits for free blocks)
    handoff_s: float | None = None
    preemptions: int = 0
    error: str | None = None


def _finished(request: ServeRequest, reason: str, **extra: Any) -> Finished:
    return Finished(request.id, len(request.prompt), list(request.output), reason, request.arrival,
                    first_token=request.first_token, finished=request.finished or time.perf_counter(),
                    preemptions=request.preemptions, **extra)


class _Ready:
    def __init__(self, value: Any) -> None:
        self.value = value


class _Local:
    """An in-process worker behind the actor interface: ``call`` runs the method at once."""

    def __init__(self, worker: Any) -> None:
        self.worker = worker

    def call(self, method: str, *args: Any) -> _Ready:
        return _Ready(getattr(self.worker, method)(*args))


class _Actor:
    """A Ray actor: ``call`` submits the method and returns its object ref."""

    def __init__(self, actor: Any) -> None:
        self.actor = actor

    def call(self, method: str, *args: Any) -> Any:
        return getattr(self.actor, method).remote(*args)


class _Worker:
    """A serving engine of its own (own model reference, own block pool)."""

    def __init__(self, model: ModelSource, config: EngineConfig | None = None, eos_ids: set[int] | None = None,
                 threads: int | None = None) -> None:
        if threads is not None:
            torch.set_num_threads(threads)
        self.engine = ContinuousBatchingEngine(_load(model), config or EngineConfig(), FCFS(), eos_ids)

    def blocks(self, clear_prefix_cache: bool = False) -> dict[str, int]:
        """Pool state: free / total blocks and live block tables (after dropping the prefix cache if asked)."""
        engine = self.engine
        if clear_prefix_cache:
            engine.cache.clear_prefix_cache()
        engine.cache.allocator.check()
        return {"free": engine.cache.allocator.num_free, "total": engine.cache.num_blocks,
                "tables": len(engine.cache.tables)}


class PrefillWorker(_Worker):
    """Prefills requests (``max_tokens=1`` on its own engine) and hands their KV to a decode worker."""

    def __init__(self, model: ModelSource, config: EngineConfig | None = None, eos_ids: set[int] | None = None,
                 threads: int | None = None) -> None:
        super().__init__(model, config, eos_ids, threads)
        self.sink: Any = None
        self._specs: dict[str, ServeRequest] = {}
        self._ready: list[Handoff] = []
        self._done: list[Finished] = []

    def connect(self, sink: Any) -> None:
        """Where handoffs go: a handle whose ``call("admit", handoffs)`` reaches the decode worker."""
        self.sink = sink

    def submit(self, requests: list[ServeRequest]) -> None:
        for spec in requests:
            self._specs[spec.id] = spec
            try:
                self.engine.add(_copy(spec, max_tokens=1, on_token=self._capture))
            except ValueError as error:
                self._specs.pop(spec.id)
                self._done.append(_finished(spec, "error", error=str(error)))

    def abort(self, ids: list[str]) -> None:
        for request_id in ids:
            self.engine.abort(request_id)

    def _capture(self, request: ServeRequest, token: int | None) -> None:
        """The engine's token callback: at the first token the prompt's KV is still in the pool; copy it out."""
        if token is None:
            return
        spec = self._specs.pop(request.id)
        stop = token in spec.stop_ids or (token in self.engine.eos_ids and not spec.ignore_eos)
        if stop or spec.max_tokens <= 1:
            self._done.append(_finished(request, "stop" if stop else "length", prefill_admitted=request.admitted))
            return
        started = time.perf_counter()
        cache = self.engine.cache
        slots = cache.slots_of(request.id, 0, len(request.prompt))
        keys, values = cache.keys[:, slots].cpu(), cache.values[:, slots].cpu()
        moving = _copy(spec, first_token=request.first_token, token_times=[request.first_token])
        moving.output.append(token)
        now = time.perf_counter()
        self._ready.append(Handoff(moving, keys, values, request.admitted, now, now - started))

    def step(self) -> tuple[list[str], list[Finished]]:
        """One engine iteration; sends the new handoffs. Returns (ids handed off, requests finished here)."""
        if self.engine.has_work():
            self.engine.step()
        for request in self.engine.finished:
            if request.finish_reason not in ("stop", "length"):  # aborted before its first token
                self._specs.pop(request.id, None)
                self._done.append(_finished(request, request.finish_reason or "abort",
                                            prefill_admitted=request.admitted))
        self.engine.finished.clear()
        ready, self._ready = self._ready, []
        for handoff in ready:
            handoff.sent = time.perf_counter()
        if ready:
            self.sink.call("admit", ready)
        done, self._done = self._done, []
        return [h.request.id for h in ready], done


class DecodeWorker(_Worker):
    """Writes handed-off KV into its pool and decodes those requests with continuous batching."""

    def __init__(self, model: ModelSource, config: EngineConfig | None = None, eos_ids: set[int] | None = None,
                 threads: int | None = None) -> None:
        super().__init__(model, config, eos_ids, threads)
        self._pending: list[tuple[Handoff, float]] = []
        self._lock = threading.Lock()  # admit / abort may run on another thread than step (a Ray actor's)
        self._meta: dict[str, dict[str, Any]] = {}
        self._done: list[Finished] = []
        self._aborted: set[str] = set()

    def admit(self, handoffs: list[Handoff]) -> None:
        received = time.perf_counter()
        with self._lock:
            self._pending += [(h, received) for h in handoffs]

    def abort(self, ids: list[str]) -> None:
        with self._lock:
            self._aborted |= set(ids)
        for request_id in ids:
            self.engine.abort(request_id)

    def _admit_pending(self) -> None:
        with self._lock:
            self._admit_pending_locked()

    def _admit_pending_locked(self) -> None:
        while self._pending:
            handoff, received = self._pending[0]
            request = handoff.request
            meta = {"prefill_admitted": handoff.prefill_admitted, "kv_bytes": handoff.kv_bytes,
                    "extract_s": handoff.extract_s, "transfer_s": received - handoff.sent}
            if request.id in self._aborted:
                self._pending.pop(0)
                self._done.append(_finished(request, "abort", **meta))
                continue
            try:
                admitted = self.engine.admit_prefilled(request, handoff.keys, handoff.values)
            except ValueError as error:  # can never fit this pool
                self._pending.pop(0)
                self._done.append(_finished(request, "error", error=str(error), **meta))
                continue
            if not admitted:
                return
            self._pending.pop(0)
            self._meta[request.id] = meta | {"handoff_s": time.perf_counter() - handoff.sent}

    def step(self) -> list[Finished]:
        """Admit what fits, one engine iteration; the requests finished since the last call."""
        self._admit_pending()
        if self.engine.has_work():
            self.engine.step()
        for request in self.engine.finished:
            self._done.append(_finished(request, request.finish_reason or "abort", **self._meta.pop(request.id, {})))
        self.engine.finished.clear()
        done, self._done = self._done, []
        return done


class DisaggregatedServer:
    """A prefill worker and a decode worker (Ray actors or in process) and the loop that feeds them."""

    def __init__(self, model: ModelSource, config: DisaggregatedConfig | None = None,
                 eos_ids: set[int] | None = None) -> None:
        self.config = config = config or DisaggregatedConfig()
        runner = config.runner
        if runner == "auto":
            runner = "ray" if ray_available() else "local"
        if runner == "ray" and not ray_available():
            raise ValueError("runner='ray' needs Ray: pip install -e '.[ray]' (or use runner='local')")
        self.runner = runner
        eos = set(eos_ids or ())
        if runner == "local":
            self.prefill: Any = _Local(PrefillWorker(model, config.prefill, eos))
            self.decode: Any = _Local(DecodeWorker(model, config.decode, eos))
        else:
            import ray

            if not ray.is_initialized():
                ray.init(address=config.address, include_dashboard=False, log_to_driver=False,
                         ignore_reinit_error=True,
                         **({} if config.address else {"num_cpus": max(2 * config.threads, os.cpu_count() or 1)}))
            source = ray.put(model) if isinstance(model, nn.Module) else model
            options = {"num_cpus": config.threads, "max_restarts": 0}
            self.prefill = _Actor(ray.remote(**options)(PrefillWorker).remote(source, config.prefill, eos,
                                                                               config.threads))
            # a second thread receives handoffs while a step runs (sent → received is then the transfer alone);
            # the coordinator keeps one step in flight, so steps never overlap
            self.decode = _Actor(ray.remote(max_concurrency=2, **options)(DecodeWorker).remote(
                source, config.decode, eos, config.threads))
        self._started(self.prefill.call("connect", self.decode), self.decode.call("blocks"))

    def _started(self, *futures: Any) -> None:
        if self.runner == "local":
            return
        import ray

        try:
            ray.get(list(futures), timeout=self.config.start_timeout_s)
        except ray.exceptions.GetTimeoutError:
            cpus = ray.cluster_resources().get("CPU", 0)
            self.close()
            raise RuntimeError(f"the Ray workers did not start within start_timeout_s={self.config.start_timeout_s} s; "
                               f"they need {self.config.threads} CPU(s) each and the Ray cluster has {cpus:g} (lower "
                               "threads, or start Ray with more CPUs)") from None

    # ------------------------------------------------------------------ futures of either runner
    def _get(self, future: Any) -> Any:
        if isinstance(future, _Ready):
            return future.value
        import ray

        return ray.get(future)

    def _wait(self, futures: dict[str, Any], timeout: float | None) -> list[str]:
        ready = [role for role, f in futures.items() if isinstance(f, _Ready)]
        if ready or not futures:
            return ready
        import ray

        refs = list(futures.values())
        done, _ = ray.wait(refs, num_returns=1, timeout=timeout)
        return [role for role, f in futures.items() if f in done]

    def blocks(self, clear_prefix_cache: bool = False) -> dict[str, dict[str, int]]:
        """Both pools' free / total blocks and live tables (a leak check once everything finished)."""
        return {"prefill": self._get(self.prefill.call("blocks", clear_prefix_cache)),
                "decode": self._get(self.decode.call("blocks", clear_prefix_cache))}

    def close(self) -> None:
        if self.runner == "ray":
            import ray

            for handle in (self.prefill, self.decode):
                ray.kill(handle.actor)

    def __enter__(self) -> DisaggregatedServer:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    # ------------------------------------------------------------------ serving
    def serve(self, arrivals: list[tuple[float, ServeRequest]], time_limit: float | None = None
              ) -> tuple[list[Finished], float]:
        """Serve requests arriving at the given offsets (seconds from now; their ``arrival`` is set here).

        Returns the finished records in the order of ``arrivals`` and the makespan. After
        ``time_limit`` seconds what is left is aborted (and requests not yet arrived are dropped).
        """
        pending = sorted(arrivals, key=lambda a: a[0])
        order = [request.id for _, request in arrivals]
        if len(set(order)) != len(order):
            raise ValueError("request ids must be unique")
        results: dict[str, Finished] = {}
        at_prefill, at_decode, aborted = 0, 0, False
        inflight: dict[str, Any] = {}
        start = time.perf_counter()
        while pending or at_prefill or at_decode or inflight:
            now = time.perf_counter() - start
            batch = []
            while pending and pending[0][0] <= now:
                offset, request = pending.pop(0)
                request.arrival = start + offset
                batch.append(request)
            if batch:
                self.prefill.call("submit", batch)
                at_prefill += len(batch)
            if time_limit is not None and now > time_limit and not aborted:
                aborted = True
                for _, request in pending:
                    results[request.id] = Finished(request.id, len(request.prompt), [], "unfinished", start)
                pending = []
                left = [i for i in order if i not in results]
                self.prefill.call("abort", left)
                self.decode.call("abort", left)
            if "prefill" not in inflight and at_prefill:
                inflight["prefill"] = self.prefill.call("step")
            if "decode" not in inflight and at_decode:
                inflight["decode"] = self.decode.call("step")
            if not inflight:
                if pending:
                    time.sleep(max(0.0, min(0.01, pending[0][0] - now)))
                continue
            timeout = max(0.0, pending[0][0] - now) if pending else None
            for role in self._wait(inflight, timeout):
                value = self._get(inflight.pop(role))
                if role == "prefill":
                    handed, done = value
                    at_prefill -= len(handed) + len(done)
                    at_decode += len(handed)
                else:
                    done = value
                    at_decode -= len(done)
                for record in done:
                    results[record.id] = record
        makespan = time.perf_counter() - start
        return [results[i] for i in order], makespan

    def generate(self, requests: list[ServeRequest]) -> list[Finished]:
        """All requests at once; their records in order (tests, examples)."""
        return self.serve([(0.0, request) for request in requests])[0]

    def replay(self, trace: list, tokenizer: Any, time_limit: float | None = None
               ) -> tuple[list, float, list[Finished]]:
        """Replay a :func:`~effinfer.plugins.system.serving.loadtest.make_trace` trace in real time, as
        :func:`~effinfer.plugins.system.serving.loadtest.replay_engine` does for one engine:
        ``(outcomes, makespan, records)``."""
        from effinfer.plugins.system.serving.loadtest import Outcome
        from effinfer.plugins.system.serving.stack import encode_text

        arrivals = [(item.arrival, ServeRequest(f"t{i}", encode_text(tokenizer, item.prompt),
                                                max_tokens=item.max_tokens, ignore_eos=True, priority=item.priority))
                    for i, item in enumerate(trace)]
        records, makespan = self.serve(arrivals, time_limit)
        outcomes = []
        for record, item in zip(records, trace):
            ok = record.finish_reason in ("stop", "length")
            outcomes.append(Outcome(
                item.arrival, record.prompt_tokens, len(record.output),
                record.first_token - record.arrival if record.first_token else None,
                record.finished - record.arrival if ok and record.finished else None,
                record.prefill_admitted - record.arrival if record.prefill_admitted else None,
                None if ok else (record.error or record.finish_reason), item.priority, item.category))
        return outcomes, makespan, records
