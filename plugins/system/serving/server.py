"""An OpenAI-compatible HTTP server (FastAPI + uvicorn) over a serving engine.

Endpoints: ``GET /v1/models``, ``GET /health``, ``POST /v1/completions`` and
``POST /v1/chat/completions`` (``stream: true`` answers with server-sent events ending in
``data: [DONE]``, like the OpenAI API). Extra request fields understood besides the OpenAI
ones: ``ignore_eos`` (keep generating past EOS, for load tests), ``priority`` (lower is more
urgent; the ``priority`` scheduler uses it). A malformed or unsupported request gets a 400
with an OpenAI-style ``{"error": {"message": ...}}`` naming the field; a client that
disconnects has its request aborted and its KV blocks freed at the next iteration; shutdown
(SIGINT/SIGTERM) stops accepting requests, lets running ones finish (up to
``drain_seconds``) and stops the engine thread.

The engine runs in its own thread (one :meth:`step` per iteration); each request's tokens
cross to the event loop through an :class:`asyncio.Queue`.
"""

from __future__ import annotations

import asyncio
import itertools
import json
import threading
import time
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any, Literal

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, StreamingResponse
from pydantic import BaseModel, ConfigDict, Field, field_validator

from effinfer.plugins.system.serving.engine import BaseEngine, ServeRequest
from effinfer.plugins.system.serving.stack import encode_chat, encode_text

_ids = itertools.count()


class SamplingFields(BaseModel):
    model_config = ConfigDict(extra="ignore")

    model: str | None = None
    max_tokens: int | None = Field(None, ge=1, le=32768)
    max_completion_tokens: int | None = Field(None, ge=1, le=32768)
    temperature: float = Field(1.0, ge=0.0, le=2.0)
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    n: int = Field(1, ge=1, le=1)
    stream: bool = False
    stop: str | list[str] | None = None
    seed: int | None = Field(None, ge=0)
    ignore_eos: bool = False
    priority: int = Field(0, ge=-1000, le=1000)
    logprobs: Any = None
    echo: bool = False

    @field_validator("logprobs")
    @classmethod
    def _no_logprobs(cls, value: Any) -> Any:
        if value not in (None, False, 0):
            raise ValueError("logprobs are not supported by this server; leave the field out")
        return value

    @field_validator("echo")
    @classmethod
    def _no_echo(cls, value: bool) -> bool:
        if value:
            raise ValueError("echo is not supported by this server; leave it out")
        return value

    def stops(self) -> list[str]:
        return [self.stop] if isinstance(self.stop, str) else list(self.stop or [])


class CompletionBody(SamplingFields):
    prompt: str | list[int]

    @field_validator("prompt")
    @classmethod
    def _not_empty(cls, value: str | list[int]) -> str | list[int]:
        if not value:
            raise ValueError("prompt is empty; give some text (or token ids)")
        return value


class Message(BaseModel):
    model_config = ConfigDict(extra="ignore")
    role: Literal["system", "user", "assistant", "developer", "tool"]
    content: str


class ChatBody(SamplingFields):
    messages: list[Message] = Field(min_length=1)


class BadRequest(Exception):
    def __init__(self, message: str, param: str | None = None, status: int = 400) -> None:
        super().__init__(message)
        self.message, self.param, self.status = message, param, status


class ServingApp:
    """Owns the engine thread and bridges requests to it."""

    def __init__(self, engine: BaseEngine, tokenizer: Any, model_name: str, default_max_tokens: int = 16,
                 drain_seconds: float = 30.0) -> None:
        self.engine, self.tokenizer, self.model_name = engine, tokenizer, model_name
        self.default_max_tokens = default_max_tokens
        self.drain_seconds = drain_seconds
        self.accepting = True
        self._stop = threading.Event()
        self._wake = threading.Event()
        self._thread: threading.Thread | None = None
        self.error: BaseException | None = None

    # ---------------------------------------------------------------- engine thread
    def start(self) -> None:
        self._thread = threading.Thread(target=self._loop, name="effinfer-engine", daemon=True)
        self._thread.start()

    def _loop(self) -> None:
        while not self._stop.is_set():
            if self.engine.has_work():
                try:
                    if self.engine.step() == 0:
                        time.sleep(0.002)  # nothing could run this iteration (e.g. waiting for blocks)
                except BaseException as error:  # keep serving: fail the running requests, report
                    self.error = error
                    for request in list(self.engine.running):
                        self.engine._finish(request, "error")
            else:
                self._wake.wait(0.05)
                self._wake.clear()

    def shutdown(self) -> None:
        """Refuse new requests, let running ones finish (up to ``drain_seconds``), stop the thread."""
        self.accepting = False
        deadline = time.monotonic() + self.drain_seconds
        while self.engine.has_work() and time.monotonic() < deadline:
            time.sleep(0.02)
        for request in list(self.engine.running) + list(self.engine.waiting):
            self.engine.abort(request.id)
        self._stop.set()
        self._wake.set()
        if self._thread is not None:
            self._thread.join(timeout=10)

    # ---------------------------------------------------------------- requests
    def submit(self, prompt: list[int], body: SamplingFields) -> tuple[ServeRequest, asyncio.Queue]:
        if not self.accepting:
            raise BadRequest("the server is shutting down; retry on another instance", status=503)
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue = asyncio.Queue()

        def on_token(request: ServeRequest, token: int | None) -> None:
            loop.call_soon_threadsafe(queue.put_nowait, token)

        max_tokens = body.max_tokens or body.max_completion_tokens or self.default_max_tokens
        request = ServeRequest(f"req-{next(_ids)}-{uuid.uuid4().hex[:8]}", prompt, max_tokens=max_tokens,
                               temperature=body.temperature, top_p=body.top_p, seed=body.seed,
                               ignore_eos=body.ignore_eos, priority=body.priority, on_token=on_token)
        try:
            self.engine.add(request)
        except ValueError as error:
            raise BadRequest(str(error), "max_tokens") from None
        self._wake.set()
        return request, queue

    async def tokens(self, request: ServeRequest, queue: asyncio.Queue, stops: list[str]
                     ) -> AsyncIterator[tuple[str, str | None]]:
        """``(text delta, finish reason or None)``; stop strings are cut here (the request is aborted)."""
        sent, output = "", []
        try:
            while True:
                token = await queue.get()
                if token is None:
                    reason = request.finish_reason or "stop"
                    text = self.tokenizer.decode(output, skip_special_tokens=True)
                    yield text[len(sent):], ("stop" if reason in ("stop", "abort") else reason)
                    return
                output.append(token)
                text = self.tokenizer.decode(output, skip_special_tokens=True)
                hit = min((text.find(s) for s in stops if s and s in text), default=-1)
                if hit >= 0:
                    self.engine.abort(request.id)
                    yield text[len(sent):hit], "stop"
                    return
                if text.endswith("\ufffd"):  # an incomplete multi-byte character: wait for the rest
                    continue
                held = max((len(s) - 1 for s in stops), default=0)  # a stop string may be starting
                safe = text[:len(text) - held] if held else text
                if len(safe) > len(sent):
                    yield safe[len(sent):], None
                    sent = safe
        finally:
            if request.status != "finished":
                self.engine.abort(request.id)  # the client went away: free its blocks
                self._wake.set()


def create_app(serving: ServingApp) -> FastAPI:
    """The FastAPI application."""

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        serving.start()
        yield
        await asyncio.to_thread(serving.shutdown)

    app = FastAPI(title="effinfer", lifespan=lifespan)
    app.state.serving = serving

    def error(message: str, status: int = 400, param: str | None = None) -> JSONResponse:
        kind = "invalid_request_error" if status < 500 else "server_error"
        return JSONResponse({"error": {"message": message, "type": kind, "param": param, "code": None}},
                            status_code=status)

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, exc: RequestValidationError) -> JSONResponse:
        problems = []
        for item in exc.errors():
            field = ".".join(str(p) for p in item["loc"] if p != "body") or "body"
            problems.append(f"{field}: {item['msg'].removeprefix('Value error, ')}")
        return error("; ".join(problems), 400, problems and str(exc.errors()[0]["loc"][-1]))

    @app.exception_handler(BadRequest)
    async def _bad(request: Request, exc: BadRequest) -> JSONResponse:
        return error(exc.message, exc.status, exc.param)

    @app.get("/health")
    async def health() -> dict:
        return {"status": "ok" if serving.accepting else "draining",
                "running": len(serving.engine.running), "waiting": len(serving.engine.waiting)}

    @app.get("/v1/models")
    async def models() -> dict:
        return {"object": "list", "data": [{"id": serving.model_name, "object": "model", "created": 0,
                                             "owned_by": "effinfer"}]}

    def check_model(body: SamplingFields) -> None:
        if body.model not in (None, "", serving.model_name):
            raise BadRequest(f"model {body.model!r} is not served here; this server serves {serving.model_name!r}",
                             "model", 404)

    async def respond(http: Request, body: SamplingFields, prompt: list[int], chat: bool):
        check_model(body)
        request, queue = serving.submit(prompt, body)
        created, rid = int(time.time()), ("chatcmpl-" if chat else "cmpl-") + request.id
        kind = "chat.completion" if chat else "text_completion"

        def usage() -> dict:
            return {"prompt_tokens": len(prompt), "completion_tokens": len(request.output),
                    "total_tokens": len(prompt) + len(request.output)}

        if body.stream:
            async def events() -> AsyncIterator[str]:
                first = True
                async for delta, reason in serving.tokens(request, queue, body.stops()):
                    if chat:
                        payload = {"role": "assistant", "content": delta} if first else {"content": delta}
                        choice = {"index": 0, "delta": payload, "finish_reason": reason, "logprobs": None}
                    else:
                        choice = {"index": 0, "text": delta, "finish_reason": reason, "logprobs": None}
                    first = False
                    chunk = {"id": rid, "object": kind + (".chunk" if chat else ""), "created": created,
                             "model": serving.model_name, "choices": [choice]}
                    if reason is not None:
                        chunk["usage"] = usage()
                    yield f"data: {json.dumps(chunk)}\n\n"
                yield "data: [DONE]\n\n"

            return StreamingResponse(events(), media_type="text/event-stream",
                                     headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})

        async def collect() -> tuple[str, str]:
            text, reason = "", "stop"
            async for delta, finish in serving.tokens(request, queue, body.stops()):
                text += delta
                reason = finish or reason
            return text, reason

        task = asyncio.ensure_future(collect())
        while not task.done():
            done, _ = await asyncio.wait({task}, timeout=0.1)
            if not done and await http.is_disconnected():
                task.cancel()  # the generator's finally aborts the request
                return error("client disconnected", 499)
        text, reason = task.result()
        if chat:
            choice = {"index": 0, "message": {"role": "assistant", "content": text}, "finish_reason": reason,
                      "logprobs": None}
        else:
            choice = {"index": 0, "text": text, "finish_reason": reason, "logprobs": None}
        return {"id": rid, "object": kind, "created": created, "model": serving.model_name, "choices": [choice],
                "usage": usage()}

    @app.post("/v1/completions")
    async def completions(body: CompletionBody, http: Request):
        prompt = body.prompt if isinstance(body.prompt, list) else encode_text(serving.tokenizer, body.prompt)
        vocab = len(serving.tokenizer)
        if isinstance(body.prompt, list) and any(not 0 <= t < vocab for t in body.prompt):
            raise BadRequest(f"prompt token ids must lie in [0, {vocab})", "prompt")
        return await respond(http, body, prompt, chat=False)

    @app.post("/v1/chat/completions")
    async def chat_completions(body: ChatBody, http: Request):
        prompt = encode_chat(serving.tokenizer, [m.model_dump() for m in body.messages])
        return await respond(http, body, prompt, chat=True)

    return app


def serve(serving: ServingApp, host: str = "127.0.0.1", port: int = 8000, log_level: str = "info") -> None:
    """Run the server until SIGINT/SIGTERM (uvicorn's graceful shutdown, then the engine drains)."""
    import uvicorn

    uvicorn.run(create_app(serving), host=host, port=port, log_level=log_level, timeout_graceful_shutdown=30)
