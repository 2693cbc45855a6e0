"""The OpenAI-compatible API on the page's own server: `GET /v1/models` and `POST
/v1/chat/completions` (streamed as server-sent events, or whole), over the same pipeline and the same
`Admission` as the page.

Clients resend the whole conversation every time: requests share one pool of kept KV caches
(`hybrid.conversation.POOL`), so a follow-up prefills only what is new. Every refusal is OpenAI's
error object with a 4xx status; only a fault of the server itself is a 500.
"""

from __future__ import annotations

import hmac
import json
import logging
import threading
import time
import uuid
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from typing import Any

from starlette.concurrency import run_in_threadpool
from starlette.requests import Request as HttpRequest
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route

from hybrid.conversation import POOL
from hybrid.errors import Busy, HybridError
from hybrid.pipeline import Pipeline
from hybrid.router import AUTO
from hybrid.types import ROUTE_NAMES, Answer, Chunk, RouteName
from web.admission import Admission
from web.openai_request import ApiError, ChatCall, Context, read_call

log = logging.getLogger(__name__)

MAX_BODY_BYTES = 64 * 2**20  # a request with a few pictures as data URLs
API_POOL = POOL + "api"
FINISH = {"eos": "stop", "stop": "stop", "length": "length", "cancelled": "stop"}


@dataclass(frozen=True)
class ApiConfig:
    """`key`: the Bearer token `/v1` asks for (None: none); `enabled` False answers every `/v1`
    request with why it is off; `allow_url_images`: fetch http(s) pictures from public addresses."""

    key: str | None = None
    enabled: bool = True
    allow_url_images: bool = False
    off_reason: str = ""


class ChatApi:
    """The `/v1` endpoints over one pipeline; `routes()` gives them to the ASGI app."""

    def __init__(self, pipeline: Pipeline, admission: Admission, config: ApiConfig = ApiConfig()) -> None:
        self.pipeline, self.admission, self.config = pipeline, admission, config
        self.created = int(time.time())
        sampling = pipeline.sampling
        self.context = Context(
            defaults=sampling.settings(greedy=not sampling.do_sample),
            max_pixels=pipeline.runtime.max_image_pixels,
            open_video=pipeline.open_video if pipeline.processor.takes_videos else None,
            allow_urls=config.allow_url_images,
            max_new_tokens=pipeline.runtime.max_new_tokens_limit,
        )

    def routes(self) -> list[Route]:
        return [
            Route("/v1/models", self._guarded(self.models), methods=["GET"]),
            Route("/v1/chat/completions", self._guarded(self.completions), methods=["POST"]),
        ]

    def _guarded(self, endpoint):
        """`endpoint` behind the switch and the key, every refusal as OpenAI's error object."""

        async def guarded(request: HttpRequest) -> Response:
            try:
                if not self.config.enabled:
                    raise ApiError(404, f"the API is off: {self.config.off_reason}", code="api_off")
                self._authorise(request)
                return await endpoint(request)
            except ApiError as exc:
                return error_response(exc)
            except Exception:  # a fault of the server, never of the request: logged, reported plainly
                log.exception("the API failed on %s", request.url.path)
                return error_response(ApiError(500, "internal error (see the server's log)", kind="server_error"))

        return guarded

    def _authorise(self, request: HttpRequest) -> None:
        if self.config.key is None:
            return
        given = request.headers.get("authorization", "")
        token = given[7:] if given.lower().startswith("bearer ") else ""
        if not hmac.compare_digest(token.encode(), self.config.key.encode()):
            raise ApiError(
                401,
                "a valid API key is required: Authorization: Bearer KEY",
                kind="authentication_error",
                code="invalid_api_key",
            )

    async def models(self, request: HttpRequest) -> Response:
        created = self.created
        names = [AUTO, *(name for name in ROUTE_NAMES if name in self.pipeline.routes)]
        data = [{"id": name, "object": "model", "created": created, "owned_by": "hybrid"} for name in names]
        return JSONResponse({"object": "list", "data": data})

    async def completions(self, request: HttpRequest) -> Response:
        self._admit(request)
        call = read_call(await _json_body(request), self.context, API_POOL)
        route = self._route(call)
        if call.stream:
            refusal = self.admission.refusal()
            if refusal is not None:  # the stream's headers go out before its turn: refuse a full queue now
                raise _busy(refusal)
            return StreamingResponse(
                self._stream(call, route), media_type="text/event-stream", headers={"Cache-Control": "no-cache"}
            )
        answer = await run_in_threadpool(self._answer, call, route)
        return JSONResponse(completion(answer, _new_id()))

    def _admit(self, request: HttpRequest) -> None:
        client = self.admission.client(request.client.host if request.client else None, request.headers)
        try:
            self.admission.check(client)
        except Busy as exc:
            raise _busy(exc) from exc

    def _route(self, call: ChatCall) -> RouteName:
        """The one route that serves the call (`auto` picks as the page does); 404 for a name that is
        no route, 503 with the reason for one that could not load."""
        if call.model in self.pipeline.unavailable:
            raise ApiError(
                503,
                f"{call.model} is unavailable: {self.pipeline.unavailable[call.model]}",
                "model",
                "model_unavailable",
                kind="server_error",
            )
        if call.model != AUTO and call.model not in self.pipeline.routes:
            names = ", ".join([AUTO, *self.pipeline.routes])
            raise ApiError(404, f"no model {call.model!r}: this server has {names}", "model", "model_not_found")
        try:
            return self.pipeline.plan(call.request, call.model)[0]
        except HybridError as exc:
            raise ApiError(400, str(exc), "messages") from exc

    def _answer(self, call: ChatCall, route: RouteName) -> Answer:
        answer = Answer(route)
        try:
            for chunk in self.admission.on_cpu(
                lambda cancel: self.pipeline.stream(call.request, route, cancel), threading.Event()
            ):
                answer.add(chunk)
        except Busy as exc:
            raise _busy(exc) from exc
        except HybridError as exc:
            raise ApiError(400, str(exc), "messages") from exc
        return answer

    async def _stream(self, call: ChatCall, route: RouteName) -> AsyncIterator[str]:
        """`_events` read a piece at a time in the thread pool; a client that goes away sets the
        cancel event, and the route stops at its next token."""
        cancel = threading.Event()
        events = self._events(call, route, cancel)
        try:
            while (event := await run_in_threadpool(next, events, None)) is not None:
                yield event
        finally:
            cancel.set()

    def _events(self, call: ChatCall, route: RouteName, cancel: threading.Event) -> Iterator[str]:
        """The answer as `chat.completion.chunk` events: the role, the text as it comes, the finish,
        the usage (if asked), `[DONE]`. A failure after the first byte is an error event."""
        ident, created = _new_id(), int(time.time())
        yield _event(chunk_body(ident, created, route, {"role": "assistant", "content": ""}))
        try:
            for chunk in self.admission.on_cpu(lambda c: self.pipeline.stream(call.request, route, c), cancel):
                yield from _chunk_events(ident, created, route, chunk, call.include_usage)
        except HybridError as exc:
            status = 429 if isinstance(exc, Busy) else 400
            yield _event(ApiError(status, str(exc), "messages").body())
        yield "data: [DONE]\n\n"


def _chunk_events(ident: str, created: int, route: RouteName, chunk: Chunk, include_usage: bool) -> Iterator[str]:
    if chunk.text:
        yield _event(chunk_body(ident, created, route, {"content": chunk.text}))
    if chunk.finish_reason is None:
        return
    yield _event(chunk_body(ident, created, route, {}, FINISH.get(chunk.finish_reason, "stop")))
    if include_usage and chunk.timings is not None:
        yield _event(
            {
                **chunk_body(ident, created, route, None),
                "usage": usage(chunk.timings),
                "timings": _timings(route, chunk),
            }
        )


def chunk_body(ident: str, created: int, model: str, delta: dict | None, finish: str | None = None) -> dict[str, Any]:
    choices = [] if delta is None else [{"index": 0, "delta": delta, "finish_reason": finish, "logprobs": None}]
    return {"id": ident, "object": "chat.completion.chunk", "created": created, "model": model, "choices": choices}


def completion(answer: Answer, ident: str) -> dict[str, Any]:
    """An answer as OpenAI's `chat.completion`, with the route's timings as `timings`."""
    message = {"role": "assistant", "content": answer.text}
    choice = {
        "index": 0,
        "message": message,
        "finish_reason": FINISH.get(answer.finish_reason or "", "stop"),
        "logprobs": None,
    }
    body = {
        "id": ident,
        "object": "chat.completion",
        "created": int(time.time()),
        "model": answer.route,
        "choices": [choice],
    }
    if answer.timings is not None:
        body["usage"] = usage(answer.timings)
        body["timings"] = {"route": answer.route, **answer.timings.to_dict()}
    return body


def usage(timings) -> dict[str, Any]:
    prompt, completion_tokens = timings.prompt_tokens, timings.decode_tokens
    return {
        "prompt_tokens": prompt,
        "completion_tokens": completion_tokens,
        "total_tokens": prompt + completion_tokens,
        "prompt_tokens_details": {"cached_tokens": timings.reused_tokens},
    }


def _timings(route: RouteName, chunk: Chunk) -> dict[str, Any]:
    return {"route": route, **chunk.timings.to_dict()}


def _event(body: dict[str, Any]) -> str:
    return f"data: {json.dumps(body, ensure_ascii=False)}\n\n"


def _new_id() -> str:
    return f"chatcmpl-{uuid.uuid4().hex[:24]}"


def _busy(exc: Busy) -> ApiError:
    return ApiError(429, str(exc), kind="rate_limit_error", code="rate_limit_exceeded", retry_after=exc.retry_after)


async def _json_body(request: HttpRequest) -> Any:
    length = request.headers.get("content-length")
    if length is not None and length.isdigit() and int(length) > MAX_BODY_BYTES:
        raise ApiError(413, f"the request is more than {MAX_BODY_BYTES // 2**20} MB", code="request_too_large")
    body = b""
    async for part in request.stream():
        body += part
        if len(body) > MAX_BODY_BYTES:
            raise ApiError(413, f"the request is more than {MAX_BODY_BYTES // 2**20} MB", code="request_too_large")
    try:
        return json.loads(body)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ApiError(400, f"the request body is not JSON: {exc}") from exc
    except RecursionError as exc:
        raise ApiError(400, "the request body's JSON is nested too deeply to read") from exc


def error_response(exc: ApiError) -> JSONResponse:
    headers = {"Retry-After": str(max(1, round(exc.retry_after)))} if exc.retry_after is not None else None
    return JSONResponse(exc.body(), status_code=exc.status, headers=headers)
