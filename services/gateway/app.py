"""``dpbus gateway``: OpenAI's HTTP API in front of the bus.

It is one more client of dpbus (NATS user ``gateway``): each HTTP request becomes one
request on ``dpbus.generate`` whose answers come back to this gateway's private inbox and
are turned into OpenAI's responses, streamed as server-sent events or returned whole.
Run as many replicas as you like; they share nothing.

Endpoints: ``GET /v1/models``, ``POST /v1/completions``, ``POST /v1/chat/completions``,
``GET /health`` (liveness), ``GET /ready`` (``/health/ready``: 200 once a group can serve),
``GET /metrics`` (Prometheus). A client that goes away, or a request
with no answer in time (504), aborts the request on the bus.

What reaches an HTTP user comes only from its own call: each call answers on its own reply
subject, the gateway's private inbox plus a random token nobody can guess, and an answer
there whose ``rid`` is not the call's is dropped and counted
(``dpbus_gateway_dropped_answers_total``), never passed on.
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import json
import socket
import time
import uuid
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse

from dpbus.schemas import Chunk, Done, Error, ErrorCode, Subjects
from dpbus.services import bus
from dpbus.services.client import NoResponders, Stream, Streams
from dpbus.services.gateway import openai as oa
from dpbus.services.gateway.chat import TemplateError, load_chat_template
from dpbus.services.metrics import GatewayMetrics
from dpbus.services.model_config import model_config_for
from dpbus.services.settings import GatewaySettings
from dpbus.services.tokenizer import load_tokenizer


class BusClient:
    """The gateway's NATS side: one connection, and one ``Streams`` for every call (whose
    drops and aborts it counts)."""

    def __init__(self, s: GatewaySettings, log: Any, metrics: GatewayMetrics) -> None:
        self.s, self.log, self.metrics = s, log, metrics
        self.warned: dict[str, float] = {}  # reason -> when a dropped answer was last logged

    async def start(self) -> None:
        self.nc = await bus.connect(self.s.nats_url, "dpbus-gateway", self.log, auth=bus.auth_from(self.s, "gateway"))
        self.streams = await Streams(self.nc, Subjects(self.s.prefix), self.s.request_timeout, self.drop,
                                     self.aborted).start()

    @property
    def tasks(self) -> set[asyncio.Task]:
        """The aborts under way."""
        return self.streams.tasks

    def drop(self, reason: str, subject: str, rid: str | None = None, **kw: Any) -> None:
        """Count an answer no HTTP client gets; log it at most once a second per reason."""
        self.metrics.dropped.labels(reason).inc()
        if reason == "no_call":
            return  # expected after aborts and time-outs: counted only
        now = time.monotonic()
        if now - self.warned.get(reason, float("-inf")) >= 1.0:
            self.warned[reason] = now
            self.log.warning("answer_dropped", reason=reason, subject=subject, rid=rid, **kw)

    def aborted(self, call: Stream, reason: str, found: bool | None, error: Exception | None) -> None:
        if found is None:
            self.metrics.aborts.labels(reason, "failed").inc()
            self.log.warning("abort_failed", rid=call.rid, reason=reason, error=repr(error))
            return
        self.metrics.aborts.labels(reason, "found" if found else "not_found").inc()
        self.log.info("request_aborted", rid=call.rid, reason=reason, found=found)

    async def call(self, request: dict) -> Stream:
        try:
            return await self.streams.send(request, ack_timeout=self.s.ack_timeout or None)
        except Exception as e:  # noqa: BLE001 - NATS is down or closing
            raise oa.ApiError(503, f"cannot reach NATS: {e!r}", "service_unavailable") from None

    def abort(self, call: Stream, reason: str) -> None:
        """Cancel ``call`` on the bus (``reason``: its client went away, or it timed out)."""
        self.streams.abort(call, reason)

    async def ingest_ping(self, wait: float = 0.5) -> dict | None:
        """The discovery answer of an ingest of this gateway's prefix (its metadata says
        how many groups are ready), or None when none answers in ``wait`` seconds."""
        inbox = self.nc.new_inbox()
        sub = await self.nc.subscribe(inbox)
        try:
            await self.nc.publish("$SRV.PING.dpbus-ingest", b"", reply=inbox)
            deadline = asyncio.get_running_loop().time() + wait
            while (left := deadline - asyncio.get_running_loop().time()) > 0:
                try:
                    doc = json.loads((await sub.next_msg(timeout=left)).data or b"{}")
                except Exception:  # noqa: BLE001 - time is up, or a stray message
                    return None
                if doc.get("metadata", {}).get("prefix") == self.s.prefix:
                    return doc
            return None
        finally:
            await sub.unsubscribe()


async def next_answer(call: Stream) -> Chunk | Done | Error:
    """The call's next answer; no answer in time (the call is aborted) is a 504, no ingest a 503."""
    try:
        return await call.next()
    except NoResponders:
        raise oa.ApiError(503, "no dpbus ingest is running", "service_unavailable",
                          ErrorCode.UNAVAILABLE.value) from None
    except TimeoutError as e:
        raise oa.ApiError(504, str(e), "timeout") from None


def bearer_matches(header: str, keys: list[str]) -> bool:
    """Whether ``header`` is ``Bearer K`` for one of ``keys``, compared in constant time
    (a key is not found out byte by byte from how long a wrong one takes)."""
    given = header.encode("latin-1", "replace")  # HTTP headers arrive as latin-1
    ok = False
    for key in keys:
        ok |= hmac.compare_digest(given, f"Bearer {key}".encode())
    return ok


async def until_disconnected(request: Request) -> None:
    while not await request.is_disconnected():
        await asyncio.sleep(0.2)


class Gateway:
    def __init__(self, settings: GatewaySettings, log: Any) -> None:
        self.s, self.log = settings, log
        self.model = model_config_for(settings.model_path, settings.max_seq_len)
        self.tokenizer = load_tokenizer(settings.model_path)
        self.template = load_chat_template(settings.model_path, log)
        self.name = settings.served_model_name or (Path(settings.model_path).name if settings.model_path
                                                   else "dpbus-builtin")
        if settings.metrics_use_api_key and not settings.api_key:
            raise ValueError("--metrics-use-api-key needs --api-key (or give /metrics its own --metrics-key)")
        # the keys /metrics takes; none: it is open
        self.metrics_keys = [k for k in (settings.metrics_key, settings.metrics_use_api_key and settings.api_key) if k]
        self.metrics = GatewayMetrics()
        self.bus = BusClient(settings, log, self.metrics)
        self.app = self.make_app()

    # ---- requests -----------------------------------------------------------------------
    def check_key(self, request: Request, keys: list[str] | None = None) -> None:
        """401 unless ``Authorization: Bearer K`` names one of ``keys`` (default: the API key, if set)."""
        keys = [self.s.api_key] if keys is None and self.s.api_key else keys
        if keys and not bearer_matches(request.headers.get("authorization", ""), keys):
            raise oa.ApiError(401, "invalid or missing API key (Authorization: Bearer ...)", "authentication_error",
                              "invalid_api_key")

    async def read_body(self, request: Request) -> bytes:
        """The request body, refused with 413 once it is known to pass ``max_body_bytes``:
        from its Content-Length before reading any of it, or while it arrives."""
        limit = self.s.max_body_bytes
        too_large = oa.ApiError(413, f"the request body is larger than {limit} bytes", code="request_too_large")
        length = request.headers.get("content-length")
        if length is not None:
            if not length.isdigit():
                raise oa.ApiError(400, "bad Content-Length header")
            if int(length) > limit:
                raise too_large
        body = bytearray()
        async for part in request.stream():
            body += part
            if len(body) > limit:
                raise too_large
        return bytes(body)

    def prompt_ids(self, req: oa.Common) -> list[int]:
        try:
            if isinstance(req, oa.ChatRequest):
                if not req.messages:
                    raise oa.ApiError(400, "messages must not be empty", param="messages")
                self.template.check_roles([m.role for m in req.messages])
                messages = [{"role": self.template.role_of(m.role), "content": oa.message_text(m.content)}
                            for m in req.messages]
                text = self.template.render(messages)
                return self.tokenizer.encode(text, special=not self.template.adds_bos)
            prompt = oa.prompt_of(req)
            return prompt if isinstance(prompt, list) else self.tokenizer.encode(prompt)
        except TemplateError as e:
            raise oa.ApiError(400, str(e), param="messages") from None
        except ValueError as e:  # no tokenizer for text
            raise oa.ApiError(400, str(e)) from None

    async def handle(self, request: Request, chat: bool) -> Response:
        endpoint = "chat" if chat else "completions"
        t0 = time.perf_counter()
        try:
            self.check_key(request)
            req = oa.decode(await self.read_body(request), oa.ChatRequest if chat else oa.CompletionRequest)
            oa.refuse_unsupported(req)
            if req.model and req.model != self.name:
                raise oa.ApiError(404, f"the model `{req.model}` does not exist (this server has `{self.name}`)",
                                  code="model_not_found", param="model")
            ids = self.prompt_ids(req)
            rid = ("chatcmpl-" if chat else "cmpl-") + uuid.uuid4().hex
            wire = {"rid": rid, "input_ids": ids, "stream": True,
                    "sampling": oa.sampling_of(req, len(ids), self.model.max_seq_len)}
            if req.dp_rank is not None:
                wire["dp_rank"] = req.dp_rank
            call = await self.bus.call(wire)
            first = await self.first_answer(request, call)
            if first is None:  # the client left before anything came
                self.metrics.requests.labels(endpoint, "client_gone").inc()
                return Response(status_code=499)
            if isinstance(first, Error):
                raise oa.from_dpbus_error(first.code, first.message)
            self.metrics.ttft.observe(time.perf_counter() - t0)
            if req.stream:
                include_usage = bool(req.stream_options and req.stream_options.include_usage)
                return StreamingResponse(self.sse(call, first, chat, include_usage, t0, endpoint),
                                         media_type="text/event-stream", headers={"Cache-Control": "no-cache"})
            return await self.whole(request, call, first, chat, t0, endpoint)
        except oa.ApiError as e:
            self.metrics.requests.labels(endpoint, str(e.status)).inc()
            return JSONResponse(e.body(), status_code=e.status)

    async def first_answer(self, request: Request, call: Stream) -> Chunk | Done | Error | None:
        """The first answer, or None if the HTTP client disconnected first (then it is aborted)."""
        waiting = asyncio.create_task(next_answer(call))
        gone = asyncio.create_task(until_disconnected(request))
        try:
            await asyncio.wait({waiting, gone}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            gone.cancel()
        if waiting.done():
            return waiting.result()
        waiting.cancel()
        self.bus.abort(call, "client_gone")
        return None

    async def whole(self, request: Request, call: Stream, answer: Any, chat: bool, t0: float, endpoint: str) -> Response:
        parts: list[str] = []
        watch = asyncio.create_task(until_disconnected(request))
        try:
            while isinstance(answer, Chunk):
                parts.append(answer.text)
                nxt = asyncio.create_task(next_answer(call))
                await asyncio.wait({nxt, watch}, return_when=asyncio.FIRST_COMPLETED)
                if not nxt.done():
                    nxt.cancel()
                    self.bus.abort(call, "client_gone")
                    self.metrics.requests.labels(endpoint, "client_gone").inc()
                    return Response(status_code=499)
                answer = nxt.result()
        finally:
            watch.cancel()
        if isinstance(answer, Error):
            raise oa.from_dpbus_error(answer.code, answer.message)
        self.observe_done(answer, t0, endpoint)
        use = oa.usage(answer.prompt_tokens, answer.completion_tokens)
        build = oa.chat_body if chat else oa.completion_body
        return JSONResponse(build(call.rid, self.name, "".join(parts), answer.finish_reason.value, use, answer.dp_rank))

    async def sse(self, call: Stream, answer: Any, chat: bool, include_usage: bool, t0: float,
                  endpoint: str) -> AsyncIterator[bytes]:
        created = int(time.time())
        last = time.perf_counter()

        def event(doc: dict) -> bytes:
            return b"data: " + json.dumps(doc, ensure_ascii=False).encode() + b"\n\n"

        try:
            if chat:
                yield event(oa.chat_chunk(call.rid, self.name, created, {"role": "assistant", "content": ""}, None))
            while isinstance(answer, Chunk):
                if answer.text:
                    yield event(oa.chat_chunk(call.rid, self.name, created, {"content": answer.text}, None) if chat
                                else oa.completion_chunk(call.rid, self.name, created, answer.text, None))
                answer = await next_answer(call)
                now = time.perf_counter()
                self.metrics.itl.observe(now - last)
                last = now
            if isinstance(answer, Error):
                err = oa.from_dpbus_error(answer.code, answer.message)
                self.metrics.requests.labels(endpoint, str(err.status)).inc()
                yield event(err.body())
            else:
                self.observe_done(answer, t0, endpoint)
                reason = answer.finish_reason.value
                yield event(oa.chat_chunk(call.rid, self.name, created, {}, reason) if chat
                            else oa.completion_chunk(call.rid, self.name, created, "", reason))
                if include_usage:
                    use = oa.usage(answer.prompt_tokens, answer.completion_tokens)
                    yield event({"id": call.rid, "object": "chat.completion.chunk" if chat else "text_completion",
                                 "created": created, "model": self.name, "choices": [], "usage": use})
            yield b"data: [DONE]\n\n"
        except oa.ApiError as e:
            self.metrics.requests.labels(endpoint, str(e.status)).inc()
            yield event(e.body())
        finally:
            if not call.finished:  # the client went away mid-stream
                self.metrics.requests.labels(endpoint, "client_gone").inc()
                self.bus.abort(call, "client_gone")

    def observe_done(self, done: Done, t0: float, endpoint: str) -> None:
        self.metrics.requests.labels(endpoint, "200").inc()
        self.metrics.e2e.observe(time.perf_counter() - t0)
        self.metrics.tokens.labels("prompt").inc(done.prompt_tokens)
        self.metrics.tokens.labels("completion").inc(done.completion_tokens)

    # ---- the app --------------------------------------------------------------------------
    def make_app(self) -> FastAPI:
        app = FastAPI(title="dpbus", description="OpenAI-compatible API of dpbus", version="0.1.0")

        @app.get("/health")
        async def health() -> Response:
            """Liveness: connected to NATS, and an ingest answers."""
            ok = self.bus.nc.is_connected and await self.bus.ingest_ping() is not None
            return JSONResponse({"status": "ok" if ok else "unavailable", "nats": self.bus.nc.is_connected},
                                status_code=200 if ok else 503)

        @app.get("/ready")
        @app.get("/health/ready")
        async def ready() -> Response:
            """Readiness: at least one group can take a request now (503 during warm-up)."""
            doc = await self.bus.ingest_ping() if self.bus.nc.is_connected else None
            meta = (doc or {}).get("metadata", {})
            groups = int(meta.get("groups_ready", 0))
            body = {"status": "ready" if groups else "unavailable", "nats": self.bus.nc.is_connected,
                    "ingest": doc is not None, "groups_ready": groups, "dp_size": int(meta.get("dp_size", 0))}
            return JSONResponse(body, status_code=200 if groups else 503)

        @app.get("/v1/models")
        async def models(request: Request) -> Response:
            try:
                self.check_key(request)
            except oa.ApiError as e:
                return JSONResponse(e.body(), status_code=e.status)
            return JSONResponse({"object": "list", "data": [
                {"id": self.name, "object": "model", "created": 0, "owned_by": "dpbus",
                 "max_model_len": self.model.max_seq_len}]})

        @app.post("/v1/completions")
        async def completions(request: Request) -> Response:
            with self.metrics.inflight.track_inprogress():
                return await self.handle(request, chat=False)

        @app.post("/v1/chat/completions")
        async def chat_completions(request: Request) -> Response:
            with self.metrics.inflight.track_inprogress():
                return await self.handle(request, chat=True)

        @app.get("/metrics")
        async def metrics(request: Request) -> Response:
            try:
                if self.metrics_keys:
                    self.check_key(request, self.metrics_keys)
            except oa.ApiError as e:
                return JSONResponse(e.body(), status_code=e.status)
            body, kind = self.metrics.exposition()
            return Response(body, media_type=kind)

        return app

    async def run(self, stop: asyncio.Event) -> None:
        import uvicorn

        class Server(uvicorn.Server):
            @contextlib.contextmanager
            def capture_signals(self):  # dpbus's own handlers stop the service
                yield

        await self.bus.start()
        config = uvicorn.Config(self.app, host=self.s.http_host, port=self.s.http_port, log_level="warning",
                                lifespan="off", access_log=False)
        server = Server(config)
        # a socket `dpbus up` bound for us (the family is read from the descriptor), or our own bind
        sockets = [socket.socket(fileno=self.s.http_fd)] if self.s.http_fd >= 0 else None
        serving = asyncio.create_task(server.serve(sockets=sockets))
        while not server.started and not serving.done():
            await asyncio.sleep(0.05)
        if serving.done():  # could not bind, most often (uvicorn exits then)
            with contextlib.suppress(BaseException):
                serving.result()
            raise RuntimeError(f"the HTTP server could not listen on {self.s.http_host}:{self.s.http_port} "
                               "(in use? choose another with --http-port)")
        self.log.info("gateway_ready", url=f"http://{self.s.http_host}:{self.s.http_port}/v1", model=self.name)
        stop_task = asyncio.create_task(stop.wait())
        await asyncio.wait({serving, stop_task}, return_when=asyncio.FIRST_COMPLETED)
        server.should_exit = True
        await serving
        stop_task.cancel()
        if self.bus.tasks:
            await asyncio.wait(self.bus.tasks, timeout=5)
        await self.bus.nc.drain()
