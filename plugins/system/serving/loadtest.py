"""Load generation and serving metrics: Poisson arrivals, TTFT/TPOT percentiles, goodput under an SLO.

A *trace* is a list of requests with arrival offsets drawn from a Poisson process
(exponential inter-arrival gaps at ``rate`` requests/s, seeded) and prompts / output
lengths from effinfer's prompt set (:func:`effinfer.data.prompts.load_prompts`; each
category's ``max_new_tokens`` scaled by ``output_scale``). It is replayed either

- against any OpenAI-compatible endpoint (:func:`replay_http`, streaming ``/v1/completions``
  with ``ignore_eos`` so every request produces its planned length), or
- in process against an engine (:func:`replay_engine`, what ``benchmarks/serving.py`` uses
  to compare engines on one CPU without HTTP in the way).

Metrics per run (:func:`summarize`): throughput (output tokens/s over the makespan),
request rate, TTFT (arrival → first token) and TPOT ((finish − first token) / (tokens − 1))
p50/p99, queueing delay (arrival → admitted, in process only), and goodput: completed
requests per second meeting both SLOs (DistServe's definition, arXiv:2401.09670).
"""

from __future__ import annotations

import asyncio
import json
import random
import time
from dataclasses import asdict, dataclass, field
from typing import Any

from effinfer.plugins.system.serving.engine import BaseEngine, ServeRequest


@dataclass
class TraceItem:
    arrival: float
    prompt: str
    max_tokens: int
    category: str = ""
    priority: int = 0


@dataclass
class Outcome:
    """What one replayed request measured (seconds, relative to its arrival)."""

    arrival: float
    prompt_tokens: int
    output_tokens: int
    ttft: float | None
    latency: float | None
    queueing: float | None = None
    error: str | None = None
    priority: int = 0
    category: str = ""

    @property
    def tpot(self) -> float | None:
        if self.ttft is None or self.latency is None or self.output_tokens < 2:
            return None
        return (self.latency - self.ttft) / (self.output_tokens - 1)


def make_trace(rate: float, requests: int, seed: int = 0, output_scale: float = 1.0, max_chars: int = 1600,
               n_per_category: int = 8, max_output: int | None = None, priorities: int = 1) -> list[TraceItem]:
    """``requests`` Poisson arrivals at ``rate``/s cycling through the prompt set (shuffled, seeded)."""
    from effinfer.data.prompts import load_prompts

    if rate <= 0 or requests < 1:
        raise ValueError(f"rate must be > 0 and requests ≥ 1 (got {rate}, {requests})")
    prompts = load_prompts(n_per_category=n_per_category, max_chars=max_chars)
    rng = random.Random(seed)
    rng.shuffle(prompts)
    clock, trace = 0.0, []
    for i in range(requests):
        prompt = prompts[i % len(prompts)]
        tokens = max(1, round(prompt.max_new_tokens * output_scale))
        if max_output is not None:
            tokens = min(tokens, max_output)
        trace.append(TraceItem(clock, prompt.text, tokens, prompt.category, rng.randrange(priorities)))
        clock += rng.expovariate(rate)
    return trace


def percentile(values: list[float], q: float) -> float | None:
    values = sorted(v for v in values if v is not None)
    if not values:
        return None
    position = (len(values) - 1) * q / 100
    low = int(position)
    high = min(low + 1, len(values) - 1)
    return values[low] + (values[high] - values[low]) * (position - low)


def summarize(outcomes: list[Outcome], makespan: float, slo_ttft: float, slo_tpot: float) -> dict[str, Any]:
    done = [o for o in outcomes if o.error is None and o.latency is not None]
    tokens = sum(o.output_tokens for o in done)
    good = [o for o in done if o.ttft is not None and o.ttft <= slo_ttft and (o.tpot is None or o.tpot <= slo_tpot)]
    ttft = [o.ttft for o in done]
    tpot = [o.tpot for o in done if o.tpot is not None]
    queue = [o.queueing for o in done if o.queueing is not None]
    row = {"requests": len(outcomes), "completed": len(done), "errors": len(outcomes) - len(done),
           "makespan_s": makespan, "throughput_tok_s": tokens / makespan if makespan > 0 else 0.0,
           "request_rate": len(done) / makespan if makespan > 0 else 0.0,
           "ttft_p50_s": percentile(ttft, 50), "ttft_p99_s": percentile(ttft, 99),
           "tpot_p50_s": percentile(tpot, 50), "tpot_p99_s": percentile(tpot, 99),
           "queueing_p50_s": percentile(queue, 50), "queueing_p99_s": percentile(queue, 99),
           "goodput_req_s": len(good) / makespan if makespan > 0 else 0.0, "slo_ttft_s": slo_ttft,
           "slo_tpot_s": slo_tpot}
    priorities = sorted({o.priority for o in done})
    if len(priorities) > 1:
        for p in priorities:
            row[f"ttft_p99_prio{p}_s"] = percentile([o.ttft for o in done if o.priority == p], 99)
    return row


# ------------------------------------------------------------------------- in process
def replay_engine(engine: BaseEngine, trace: list[TraceItem], tokenizer: Any, time_limit: float | None = None
                  ) -> tuple[list[Outcome], float]:
    """Replay ``trace`` in real time on ``engine`` (this thread steps it); ``(outcomes, makespan)``."""
    from effinfer.plugins.system.serving.stack import encode_text

    encoded = [encode_text(tokenizer, item.prompt) for item in trace]
    requests: list[ServeRequest] = []
    start = time.perf_counter()
    pending = list(range(len(trace)))
    while pending or engine.has_work():
        now = time.perf_counter() - start
        while pending and trace[pending[0]].arrival <= now:
            i = pending.pop(0)
            request = ServeRequest(f"t{i}", encoded[i], max_tokens=trace[i].max_tokens, ignore_eos=True,
                                   priority=trace[i].priority, arrival=start + trace[i].arrival)
            engine.add(request)
            requests.append(request)
        if time_limit is not None and now > time_limit:
            for request in requests:
                engine.abort(request.id)
            pending = []
        if engine.has_work():
            if engine.step() == 0:
                time.sleep(0.001)
        elif pending:
            time.sleep(max(0.0, min(0.01, trace[pending[0]].arrival - now)))
    makespan = time.perf_counter() - start
    outcomes = []
    for request, item in zip(requests, trace):
        ok = request.finish_reason in ("stop", "length")
        outcomes.append(Outcome(
            item.arrival, len(request.prompt), len(request.output),
            request.first_token - request.arrival if request.first_token else None,
            request.finished - request.arrival if ok and request.finished else None,
            request.admitted - request.arrival if request.admitted else None,
            None if ok else (request.finish_reason or "unfinished"), item.priority, item.category))
    return outcomes, makespan


# ------------------------------------------------------------------------- over HTTP
async def _one(client: Any, url: str, model: str, item: TraceItem, start: float, timeout: float,
               extra: dict[str, Any] | None = None) -> Outcome:
    await asyncio.sleep(max(0.0, start + item.arrival - time.perf_counter()))
    sent = time.perf_counter()
    body = {"model": model, "prompt": item.prompt, "max_tokens": item.max_tokens, "temperature": 0.0,
            "stream": True, "ignore_eos": True, "priority": item.priority,
            "stream_options": {"include_usage": True}}
    body |= extra or {}
    first, tokens, prompt_tokens, chunks = None, 0, 0, 0
    try:
        async with client.stream("POST", f"{url}/v1/completions", json=body, timeout=timeout) as response:
            if response.status_code != 200:
                text = (await response.aread()).decode(errors="replace")[:200]
                return Outcome(item.arrival, 0, 0, None, None, error=f"HTTP {response.status_code}: {text}",
                               priority=item.priority, category=item.category)
            async for line in response.aiter_lines():
                if not line.startswith("data: ") or line == "data: [DONE]":
                    continue
                chunk = json.loads(line[6:])
                choices = chunk.get("choices") or []
                if choices and (choices[0].get("text") or choices[0].get("delta", {}).get("content")):
                    chunks += 1
                    if first is None:
                        first = time.perf_counter()
                usage = chunk.get("usage")
                if usage:
                    tokens, prompt_tokens = usage.get("completion_tokens", tokens), usage.get("prompt_tokens", 0)
    except Exception as error:  # a failed request is an outcome, not the end of the run
        return Outcome(item.arrival, 0, 0, None, None, error=f"{type(error).__name__}: {error}",
                       priority=item.priority, category=item.category)
    end = time.perf_counter()
    # servers without usage in the stream (llama-cpp-python): one token per streamed chunk
    return Outcome(item.arrival, prompt_tokens, tokens or chunks, (first or end) - sent, end - sent,
                   priority=item.priority, category=item.category)


def http_client_module() -> Any:
    """``httpx2`` (what the ``openai`` client installs), else ``httpx``: the same API."""
    try:
        import httpx2 as httpx
    except ImportError:
        import httpx
    return httpx


async def _replay_http(url: str, model: str, trace: list[TraceItem], timeout: float,
                       extra: dict[str, Any] | None = None) -> tuple[list[Outcome], float]:
    httpx = http_client_module()

    limits = httpx.Limits(max_connections=len(trace) + 1, max_keepalive_connections=len(trace) + 1)
    async with httpx.AsyncClient(limits=limits) as client:
        start = time.perf_counter() + 0.05
        outcomes = await asyncio.gather(*(_one(client, url, model, item, start, timeout, extra) for item in trace))
    return list(outcomes), time.perf_counter() - start


def replay_http(url: str, model: str, trace: list[TraceItem], timeout: float = 600.0,
                extra: dict[str, Any] | None = None) -> tuple[list[Outcome], float]:
    """Replay ``trace`` against an OpenAI-compatible ``url`` (e.g. ``http://127.0.0.1:8000``); ``extra``
    fields go into every request body (a server's own spelling of an option, e.g. ``logit_bias``)."""
    return asyncio.run(_replay_http(url.rstrip("/"), model, trace, timeout, extra))


@dataclass
class LoadTestResult:
    rows: list[dict[str, Any]] = field(default_factory=list)

    def to_json(self) -> str:
        return json.dumps(self.rows, indent=2)


def outcome_dicts(outcomes: list[Outcome]) -> list[dict[str, Any]]:
    return [asdict(o) | {"tpot": o.tpot} for o in outcomes]


def markdown_table(rows: list[dict[str, Any]], columns: list[tuple[str, str, str]]) -> str:
    """``columns``: (key, header, format)."""
    lines = ["| " + " | ".join(h for _, h, _ in columns) + " |", "|" + "---|" * len(columns)]
    for row in rows:
        cells = []
        for key, _, fmt in columns:
            value = row.get(key)
            cells.append("–" if value is None else format(value, fmt) if fmt else str(value))
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


LOADTEST_COLUMNS = [("system", "system", ""), ("rate", "rate (req/s)", ".2f"), ("completed", "done", ""),
                    ("throughput_tok_s", "throughput (tok/s)", ".1f"), ("ttft_p50_s", "TTFT p50 (s)", ".2f"),
                    ("ttft_p99_s", "TTFT p99 (s)", ".2f"), ("tpot_p50_s", "TPOT p50 (ms)", ""),
                    ("tpot_p99_s", "TPOT p99 (ms)", ""), ("queueing_p99_s", "queue p99 (s)", ".2f"),
                    ("goodput_req_s", "goodput (req/s)", ".2f")]


def display_rows(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """TPOT in milliseconds for the tables."""
    out = []
    for row in rows:
        row = dict(row)
        for key in ("tpot_p50_s", "tpot_p99_s"):
            if row.get(key) is not None:
                row[key] = f"{row[key] * 1000:.0f}"
        out.append(row)
    return out
