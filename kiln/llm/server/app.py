"""The FastAPI app: OpenAI's /v1/completions, /v1/chat/completions and /v1/models, plus /health and /metrics.

Every route is ``async``: tokenising, admission and response shaping run on the event loop, model steps run in
the AsyncEngine's thread. A client that goes away (streaming or not) aborts its engine requests at once.
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import json
import logging
import time
import uuid
from dataclasses import dataclass
from typing import AsyncIterator

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST
from starlette.exceptions import HTTPException as StarletteHTTPException

from kiln.llm.engine import LLMEngine
from kiln.llm.outputs import RequestOutput

from .async_engine import AsyncEngine, EngineDeadError
from .metrics import ServerMetrics, count_loop_tasks
from .protocol import (APIError, ParsedRequest, bad, chat_logprobs, completion_logprobs, parse_chat,
                       parse_completion, usage)

logger = logging.getLogger(__name__)

DEFAULT_MAX_BODY_BYTES = 4 * 2**20
_LONG_PROMPT_CHARS = 4096  # tokenise longer prompts off the event loop


@dataclass
class ServerConfig:
    model_name: str
    api_key: str | None = None
    max_queue: int | None = 512          # requests allowed to wait beyond the engine's max_num_seqs; None: no limit
    max_body_bytes: int = DEFAULT_MAX_BODY_BYTES
    retry_after_s: int = 1

    def __post_init__(self):
        if self.max_queue is not None and self.max_queue < 0:
            raise ValueError(f"max_queue must be >= 0, got {self.max_queue}")
        if self.max_body_bytes < 1:
            raise ValueError(f"max_body_bytes must be >= 1, got {self.max_body_bytes}")


class ServerState:
    def __init__(self, engine: LLMEngine, config: ServerConfig):
        self.engine = engine
        self.config = config
        self.async_engine = AsyncEngine(engine)
        self.in_flight = 0  # engine requests admitted and not yet closed (event loop only)
        self.capacity = None if config.max_queue is None else engine.config.max_num_seqs + config.max_queue
        self.metrics = ServerMetrics(lambda: self.async_engine.stats, self._server_state)
        self.created = int(time.time())
        self.loop: asyncio.AbstractEventLoop | None = None

    def _server_state(self) -> dict:
        try:
            tasks = count_loop_tasks()
        except RuntimeError:  # scraped from outside the loop
            tasks = -1
        return {"in_flight": self.in_flight, "tasks": tasks, "steps": self.async_engine.steps}


# ------------------------------------------------------------------------------------------------ sessions
class _Session:
    """The engine requests behind one HTTP request: admission, output routing, metrics and cleanup."""

    def __init__(self, state: ServerState, base_id: str, arrival: float):
        self.state, self.base_id, self.arrival = state, base_id, arrival
        self.queue: asyncio.Queue = asyncio.Queue()
        self.request_ids: list[str] = []
        self.unfinished: set[str] = set()
        self.prompt_lens: list[int] = []
        self.tokens_seen: dict[tuple[str, int], int] = {}
        self.first_token: set[str] = set()
        self.admitted = 0
        self.n = 1
        self.closed = False

    async def start(self, prompts: list[tuple[str | None, list[int]]], params) -> None:
        st = self.state
        if not st.async_engine.alive:
            raise APIError(503, f"server unavailable: {st.async_engine._dead_reason()}", code="engine_unavailable",
                           headers={"Retry-After": str(st.config.retry_after_s)})
        k = len(prompts)
        if st.capacity is not None and st.in_flight + k > st.capacity:
            raise APIError(503, f"the request queue is full ({st.in_flight} requests in flight, limit "
                                f"{st.capacity} = max_num_seqs {st.engine.config.max_num_seqs} + max_queue "
                                f"{st.config.max_queue}); retry later", code="queue_full",
                           headers={"Retry-After": str(st.config.retry_after_s)})
        st.in_flight += k
        self.admitted, self.n = k, params.n
        try:
            for i, (text, ids) in enumerate(prompts):
                rid = self.base_id if k == 1 else f"{self.base_id}-{i}"
                self.request_ids.append(rid)
                self.unfinished.add(rid)
                self.prompt_lens.append(len(ids))
                await st.async_engine.add(rid, {"prompt_token_ids": ids, "prompt": text}, params, self.queue,
                                          self.arrival)
                st.metrics.prompt_tokens.inc(len(ids))
        except (ValueError, TypeError) as exc:
            param = "prompt" if "prompt" in str(exc) or "token" in str(exc) else None
            raise bad(str(exc), param=param) from None
        except EngineDeadError as exc:
            raise APIError(503, f"server unavailable: {exc}", code="engine_unavailable",
                           headers={"Retry-After": str(st.config.retry_after_s)}) from None

    async def outputs(self) -> AsyncIterator[RequestOutput]:
        while self.unfinished:
            out = await self.queue.get()
            if isinstance(out, BaseException):
                raise out
            self._observe(out)
            if out.finished:
                self.unfinished.discard(out.request_id)
            yield out

    def _observe(self, out: RequestOutput) -> None:
        m = self.state.metrics
        for c in out.outputs:
            key = (out.request_id, c.index)
            new = len(c.token_ids) - self.tokens_seen.get(key, 0)
            if new > 0:
                m.generation_tokens.inc(new)
                self.tokens_seen[key] = len(c.token_ids)
        met = out.metrics
        if met is not None and met.first_token_time is not None and out.request_id not in self.first_token:
            self.first_token.add(out.request_id)
            m.ttft.observe(max(0.0, met.first_token_time - met.arrival_time))
        if out.finished:
            end = met.finished_time if met is not None and met.finished_time else time.time()
            if met is not None:
                m.e2e.observe(max(0.0, end - met.arrival_time))
            for c in out.outputs:
                m.finished.labels(c.finish_reason or "unknown").inc()
                if met is not None and met.first_token_time is not None and len(c.token_ids) > 1:
                    m.tpot.observe(max(0.0, end - met.first_token_time) / (len(c.token_ids) - 1))

    def close(self, client_gone: bool = False) -> None:
        """Abort whatever is unfinished (freeing its KV blocks before the next step) and release admission."""
        if self.closed:
            return
        self.closed = True
        for rid in self.request_ids:
            if rid in self.unfinished:
                self.state.async_engine.abort(rid)
                self.state.metrics.finished.labels("abort").inc(self.n)
        if client_gone and self.unfinished:
            self.state.metrics.client_aborts.inc()
        self.state.in_flight -= self.admitted
        self.admitted = 0


# ------------------------------------------------------------------------------------------------ SSE
async def _wait_disconnect(receive) -> None:
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            return


class SSEResponse(Response):
    """Server-sent events that stop (and run the generator's cleanup) the moment the client disconnects.

    Starlette's StreamingResponse only notices a disconnect this way for ASGI spec < 2.4; this does it always.
    """

    media_type = "text/event-stream"

    def __init__(self, events: AsyncIterator[str], on_disconnect=None):
        self.status_code = 200
        self.background = None
        self.raw_headers = [(b"content-type", b"text/event-stream; charset=utf-8"), (b"cache-control", b"no-cache"),
                            (b"x-accel-buffering", b"no")]
        self.events, self.on_disconnect = events, on_disconnect

    async def __call__(self, scope, receive, send) -> None:
        await send({"type": "http.response.start", "status": self.status_code, "headers": self.raw_headers})

        async def pump():
            async for event in self.events:
                await send({"type": "http.response.body", "body": event.encode("utf-8"), "more_body": True})
            await send({"type": "http.response.body", "body": b"", "more_body": False})

        pump_task = asyncio.ensure_future(pump())
        watch_task = asyncio.ensure_future(_wait_disconnect(receive))
        try:
            await asyncio.wait({pump_task, watch_task}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            gone = watch_task.done() and not pump_task.done()
            for t in (pump_task, watch_task):
                if not t.done():
                    t.cancel()
            for t in (pump_task, watch_task):
                with contextlib.suppress(asyncio.CancelledError, OSError):
                    await t
            with contextlib.suppress(Exception):
                await self.events.aclose()
            if gone and self.on_disconnect is not None:
                self.on_disconnect()


def _sse(payload: dict) -> str:
    return f"data: {json.dumps(payload, ensure_ascii=False)}\n\n"


# ------------------------------------------------------------------------------------------------ app
_KNOWN_PATHS = {"/v1/completions", "/v1/chat/completions", "/v1/models", "/health", "/metrics"}


class _CountRequests:
    """Pure ASGI middleware counting answers by endpoint and status (BaseHTTPMiddleware would wrap streaming
    bodies and the disconnect signal)."""

    def __init__(self, app, state: ServerState):
        self.app, self.state = app, state

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        path = scope["path"]
        endpoint = (path if path in _KNOWN_PATHS
                    else "/v1/models/{model}" if path.startswith("/v1/models/") else "other")
        started = False

        async def counting_send(message):
            nonlocal started
            if message["type"] == "http.response.start" and not started:
                started = True
                self.state.metrics.requests.labels(endpoint, str(message["status"])).inc()
            await send(message)

        try:
            await self.app(scope, receive, counting_send)
        except Exception:
            if not started:
                self.state.metrics.requests.labels(endpoint, "500").inc()
            raise


def build_app(engine: LLMEngine, config: ServerConfig) -> FastAPI:
    state = ServerState(engine, config)

    @contextlib.asynccontextmanager
    async def lifespan(app):
        state.loop = asyncio.get_running_loop()
        state.async_engine.start()
        try:
            yield
        finally:
            await asyncio.to_thread(state.async_engine.shutdown)

    app = FastAPI(title="kiln", lifespan=lifespan)
    app.state.kiln = state

    # ---------------------------------------------------------------------------- errors
    app.add_middleware(_CountRequests, state=state)

    @app.exception_handler(APIError)
    async def _api_error(request: Request, exc: APIError):
        return JSONResponse(exc.body(), status_code=exc.status, headers=exc.headers)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, exc: StarletteHTTPException):
        message = (f"no route {request.method} {request.url.path}" if exc.status_code in (404, 405)
                   else str(exc.detail))
        return JSONResponse(APIError(exc.status_code, message).body(), status_code=exc.status_code)

    @app.exception_handler(Exception)
    async def _internal(request: Request, exc: Exception):
        logger.exception("internal error on %s", request.url.path)
        return JSONResponse(APIError(500, f"internal error: {type(exc).__name__}: {exc}").body(), status_code=500)

    # ---------------------------------------------------------------------------- helpers
    def check_auth(request: Request) -> None:
        key = config.api_key
        if key is None:
            return
        header = request.headers.get("authorization")
        if header is None:
            raise APIError(401, "missing API key: send 'Authorization: Bearer <key>'", code="invalid_api_key")
        scheme, _, token = header.partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(token.strip().encode(), key.encode()):
            raise APIError(401, "incorrect API key provided", code="invalid_api_key")

    async def read_json(request: Request):
        limit = config.max_body_bytes
        length = request.headers.get("content-length")
        if length is not None and length.isdigit() and int(length) > limit:
            raise APIError(413, f"request body of {int(length)} bytes exceeds the limit of {limit} bytes",
                           code="request_too_large")
        chunks, size = [], 0
        async for chunk in request.stream():
            size += len(chunk)
            if size > limit:
                raise APIError(413, f"request body exceeds the limit of {limit} bytes", code="request_too_large")
            chunks.append(chunk)
        raw = b"".join(chunks)
        if not raw:
            raise bad("the request body is empty; send a JSON object")
        try:
            return json.loads(raw)
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise bad(f"the request body is not valid JSON: {exc}") from None

    def check_model(body) -> None:
        if not isinstance(body, dict):
            return  # the parser names the problem
        model = body.get("model")
        if model is None:
            raise bad("model is required", param="model")
        if model != config.model_name:
            raise APIError(404, f"the model {model!r} does not exist; this server serves {config.model_name!r}",
                           param="model", code="model_not_found")

    async def tokenize(text: str) -> list[int]:
        tok = engine.tokenizer
        if tok is None:
            raise bad("this model has no tokenizer; send the prompt as token ids", param="prompt")
        if len(text) > _LONG_PROMPT_CHARS:
            return await asyncio.to_thread(tok.encode, text)
        return tok.encode(text)

    def check_length(ids: list[int], params, param: str) -> None:
        limit = engine.max_model_len
        if len(ids) >= limit:
            raise bad(f"this model's maximum context length is {limit} tokens, but the prompt has {len(ids)} "
                      "tokens, leaving no room to generate", param=param, code="context_length_exceeded")
        if params.max_tokens is not None and len(ids) + params.max_tokens > limit:
            raise bad(f"this model's maximum context length is {limit} tokens, but {len(ids) + params.max_tokens}"
                      f" were requested ({len(ids)} in the prompt, {params.max_tokens} in max_tokens); lower "
                      "max_tokens or shorten the prompt", param="max_tokens", code="context_length_exceeded")

    async def run(request: Request, session: _Session, collect):
        """Run ``collect()`` to completion unless the client disconnects first (then abort everything)."""
        task = asyncio.ensure_future(collect())
        watcher = asyncio.ensure_future(_wait_disconnect(request.receive))
        try:
            await asyncio.wait({task, watcher}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            watcher.cancel()
            if not task.done():
                task.cancel()
            await asyncio.gather(task, watcher, return_exceptions=True)
        if task.cancelled():
            session.close(client_gone=True)
            return JSONResponse(APIError(499, "client closed the request").body(), status_code=499)
        session.close()
        try:
            return task.result()
        except EngineDeadError as exc:
            raise APIError(503, f"server unavailable: {exc}", code="engine_unavailable",
                           headers={"Retry-After": str(config.retry_after_s)}) from None

    # ---------------------------------------------------------------------------- routes
    @app.get("/health")
    async def health():
        ae = state.async_engine
        if not ae.alive:
            return JSONResponse({"status": "unavailable", "reason": ae._dead_reason()}, status_code=503,
                                headers={"Retry-After": str(config.retry_after_s)})
        return {"status": "ok"}

    @app.get("/metrics")
    async def metrics():
        return Response(state.metrics.render(), media_type=CONTENT_TYPE_LATEST)

    def model_card() -> dict:
        return {"id": config.model_name, "object": "model", "created": state.created, "owned_by": "kiln",
                "root": str(engine.model_path), "max_model_len": engine.max_model_len}

    @app.get("/v1/models")
    async def models(request: Request):
        check_auth(request)
        return {"object": "list", "data": [model_card()]}

    @app.get("/v1/models/{model:path}")
    async def model(request: Request, model: str):
        check_auth(request)
        if model != config.model_name:
            raise APIError(404, f"the model {model!r} does not exist; this server serves {config.model_name!r}",
                           param="model", code="model_not_found")
        return model_card()

    async def respond(request, request_id, arrival, prompts, parsed, events, body):
        """Admit the prompts as one session, then stream SSE events or wait for the whole body."""
        session = _Session(state, request_id, arrival)
        try:
            await session.start(prompts, parsed.params)
        except BaseException:
            session.close()
            raise
        if parsed.stream:
            return SSEResponse(events(session, parsed, config.model_name),
                               on_disconnect=lambda: session.close(client_gone=True))
        return await run(request, session, lambda: body(session, parsed, config.model_name))

    @app.post("/v1/completions")
    async def completions(request: Request):
        arrival = time.time()
        check_auth(request)
        body = await read_json(request)
        check_model(body)
        parsed = parse_completion(body)
        prompts = []
        for text, ids in parsed.prompts:
            ids = ids if ids is not None else await tokenize(text)
            check_length(ids, parsed.params, "prompt")
            prompts.append((text, ids))
        return await respond(request, f"cmpl-{uuid.uuid4().hex}", arrival, prompts, parsed,
                             _completion_events, _completion_body)

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request):
        arrival = time.time()
        check_auth(request)
        body = await read_json(request)
        check_model(body)
        parsed, messages = parse_chat(body)
        tok = engine.tokenizer
        if tok is None:
            raise bad("this model has no tokenizer, so it cannot render a chat template", param="messages")
        try:
            text = tok.apply_chat_template(messages, add_generation_prompt=True)
        except ValueError as exc:
            raise bad(str(exc), param="messages") from None
        ids = tok.encode(text, add_special_tokens=False)
        if not ids:
            raise bad("the rendered chat prompt is empty", param="messages")
        check_length(ids, parsed.params, "messages")
        return await respond(request, f"chatcmpl-{uuid.uuid4().hex}", arrival, [(text, ids)], parsed,
                             _chat_events, _chat_body)

    return app


# ------------------------------------------------------------------------------------------------ shaping
def _choice_index(session: _Session, out: RequestOutput, index: int, n: int) -> int:
    return session.request_ids.index(out.request_id) * n + index


def _total_usage(session: _Session, finals: dict[str, RequestOutput]) -> dict:
    completion = sum(len(c.token_ids) for out in finals.values() for c in out.outputs)
    return usage(sum(session.prompt_lens), completion)


async def _completion_body(session: _Session, parsed: ParsedRequest, model: str) -> dict:
    finals: dict[str, RequestOutput] = {}
    async for out in session.outputs():
        if out.finished:
            finals[out.request_id] = out
    n, choices = parsed.params.n, []
    for rid in session.request_ids:
        out = finals[rid]
        for c in out.outputs:
            choices.append({"index": _choice_index(session, out, c.index, n), "text": c.text,
                            "logprobs": (completion_logprobs(c, 0, parsed.logprobs, 0)
                                         if parsed.logprobs is not None else None),
                            "finish_reason": c.finish_reason, "stop_reason": c.stop_reason})
    choices.sort(key=lambda ch: ch["index"])
    return {"id": session.base_id, "object": "text_completion", "created": int(session.arrival), "model": model,
            "choices": choices, "usage": _total_usage(session, finals)}


async def _chat_body(session: _Session, parsed: ParsedRequest, model: str) -> dict:
    final = None
    async for out in session.outputs():
        if out.finished:
            final = out
    choices = [{"index": c.index, "message": {"role": "assistant", "content": c.text},
                "logprobs": chat_logprobs(c, 0, parsed.logprobs) if parsed.logprobs is not None else None,
                "finish_reason": c.finish_reason, "stop_reason": c.stop_reason} for c in final.outputs]
    return {"id": session.base_id, "object": "chat.completion", "created": int(session.arrival), "model": model,
            "choices": choices, "usage": _total_usage(session, {final.request_id: final})}


class _StreamTracker:
    """Per choice: how many tokens were sent (for logprobs) and whether its finish was sent."""

    def __init__(self):
        self.sent_tokens: dict[int, int] = {}
        self.text_offset: dict[int, int] = {}
        self.done: set[int] = set()


async def _completion_events(session: _Session, parsed: ParsedRequest, model: str) -> AsyncIterator[str]:
    n, tr = parsed.params.n, _StreamTracker()
    finals: dict[str, RequestOutput] = {}
    base = {"id": session.base_id, "object": "text_completion", "created": int(session.arrival), "model": model}
    try:
        async for out in session.outputs():
            if out.finished:
                finals[out.request_id] = out
            for c in out.outputs:
                idx = _choice_index(session, out, c.index, n)
                if idx in tr.done:
                    continue
                start = tr.sent_tokens.get(idx, 0)
                if not c.delta_text and c.finish_reason is None and (parsed.logprobs is None or
                                                                     len(c.token_ids) == start):
                    continue
                choice = {"index": idx, "text": c.delta_text, "logprobs": None,
                          "finish_reason": c.finish_reason, "stop_reason": c.stop_reason}
                if parsed.logprobs is not None:
                    choice["logprobs"] = completion_logprobs(c, start, parsed.logprobs, tr.text_offset.get(idx, 0))
                    tr.text_offset[idx] = tr.text_offset.get(idx, 0) + len(c.delta_text)
                tr.sent_tokens[idx] = len(c.token_ids)
                if c.finish_reason is not None:
                    tr.done.add(idx)
                chunk = dict(base, choices=[choice])
                if parsed.include_usage:
                    chunk["usage"] = None
                yield _sse(chunk)
        if parsed.include_usage:
            yield _sse(dict(base, choices=[], usage=_total_usage(session, finals)))
        yield "data: [DONE]\n\n"
    except EngineDeadError as exc:
        yield _sse(APIError(503, f"server unavailable: {exc}", code="engine_unavailable").body())
        yield "data: [DONE]\n\n"
    finally:
        session.close(client_gone=bool(session.unfinished))


async def _chat_events(session: _Session, parsed: ParsedRequest, model: str) -> AsyncIterator[str]:
    n, tr = parsed.params.n, _StreamTracker()
    final = None
    base = {"id": session.base_id, "object": "chat.completion.chunk", "created": int(session.arrival),
            "model": model}
    extra = {"usage": None} if parsed.include_usage else {}
    try:
        for i in range(n):
            yield _sse(dict(base, choices=[{"index": i, "delta": {"role": "assistant", "content": ""},
                                            "logprobs": None, "finish_reason": None}], **extra))
        async for out in session.outputs():
            if out.finished:
                final = out
            for c in out.outputs:
                idx = c.index
                if idx in tr.done:
                    continue
                start = tr.sent_tokens.get(idx, 0)
                if not c.delta_text and c.finish_reason is None and (parsed.logprobs is None or
                                                                     len(c.token_ids) == start):
                    continue
                choice = {"index": idx, "delta": {"content": c.delta_text} if c.delta_text else {},
                          "logprobs": chat_logprobs(c, start, parsed.logprobs) if parsed.logprobs is not None
                          else None, "finish_reason": c.finish_reason, "stop_reason": c.stop_reason}
                tr.sent_tokens[idx] = len(c.token_ids)
                if c.finish_reason is not None:
                    tr.done.add(idx)
                yield _sse(dict(base, choices=[choice], **extra))
        if parsed.include_usage:
            yield _sse(dict(base, choices=[], usage=_total_usage(session, {final.request_id: final})))
        yield "data: [DONE]\n\n"
    except EngineDeadError as exc:
        yield _sse(APIError(503, f"server unavailable: {exc}", code="engine_unavailable").body())
        yield "data: [DONE]\n\n"
    finally:
        session.close(client_gone=bool(session.unfinished))
