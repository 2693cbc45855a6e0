"""The remote route: any OpenAI-compatible server (vLLM, llama.cpp's server, Ollama, another instance
of this app) streamed through `/chat/completions`, pictures sent as PNG data URLs, timed as this
client sees it: time to first token from the request's start, decode speed from the chunks' arrival,
the token counts from the server's `usage`.

A server that cannot be reached when the pipeline loads leaves the route unavailable with the reason;
one that fails or breaks its stream mid-answer ends that answer with a `RouteError`.
"""

from __future__ import annotations

import base64
import io
import json
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import httpx
from PIL import Image

from hybrid.errors import RouteError
from hybrid.metrics import Stopwatch
from hybrid.types import Chunk, FinishReason, Message, Request, RouteName

FINISH: dict[str, FinishReason] = {"stop": "eos", "length": "length"}


@dataclass(frozen=True)
class RemoteConfig:
    """Where the remote server is: its base URL (up to `/v1`), the model to ask for (None: the first
    it lists), its API key, and how long to wait for a connection and for each piece of the answer."""

    url: str
    model: str | None = None
    key: str | None = None
    connect_timeout_s: float = 5.0
    read_timeout_s: float = 120.0

    def __post_init__(self) -> None:
        if not self.url.startswith(("http://", "https://")):
            raise RouteError(f"--remote takes an http(s) URL such as http://host:8000/v1, got {self.url!r}")


class RemoteRoute:
    name: RouteName = "remote"

    def __init__(self, config: RemoteConfig) -> None:
        self.config = config
        self.base = config.url.rstrip("/")
        self.timeout = httpx.Timeout(config.read_timeout_s, connect=config.connect_timeout_s)
        self.headers = {"Authorization": f"Bearer {config.key}"} if config.key else {}
        self.model = self._model()

    def _model(self) -> str:
        """The model to ask for, checked against what the server lists (`GET /models`)."""
        try:
            listed = httpx.get(f"{self.base}/models", headers=self.headers, timeout=self.timeout)
        except httpx.HTTPError as exc:
            raise RouteError(f"cannot reach {self.base}: {type(exc).__name__}: {exc}") from exc
        if listed.status_code != 200:
            raise RouteError(f"{self.base}/models answered HTTP {listed.status_code}: {_message(listed)}")
        try:
            names = [entry["id"] for entry in listed.json()["data"]]
        except (ValueError, KeyError, TypeError) as exc:
            raise RouteError(f"{self.base}/models did not answer with a model list") from exc
        if self.config.model is None:
            if not names:
                raise RouteError(f"{self.base} lists no model")
            return names[0]
        if self.config.model not in names:
            raise RouteError(f"{self.base} serves {', '.join(names) or 'no model'}, not {self.config.model}")
        return self.config.model

    def stream(self, request: Request, cancel: threading.Event | None = None) -> Iterator[Chunk]:
        if request.has_videos:
            raise RouteError("the remote route sends pictures and text, not videos")
        watch = Stopwatch()
        started = time.perf_counter()
        body = self._body(request)
        watch.add("preprocess", time.perf_counter() - started)
        finish: FinishReason | None = None
        try:
            with httpx.stream(
                "POST", f"{self.base}/chat/completions", json=body, headers=self.headers, timeout=self.timeout
            ) as response:
                if response.status_code != 200:
                    response.read()
                    raise RouteError(f"the remote answered HTTP {response.status_code}: {_message(response)}")
                for event in _events(response):
                    if cancel is not None and cancel.is_set():
                        finish = "cancelled"
                        break
                    text, ended = _read(event, watch)
                    if text:
                        watch.token()
                        yield Chunk(self.name, text, ())
                    finish = ended or finish
        except httpx.HTTPError as exc:
            raise RouteError(f"the remote stream broke: {type(exc).__name__}: {exc}") from exc
        if finish is None:
            raise RouteError("the remote stream ended before the answer did")
        yield Chunk(self.name, "", (), finish, watch.timings())

    def _body(self, request: Request) -> dict[str, Any]:
        s = request.sampling
        body: dict[str, Any] = {
            "model": self.model,
            "messages": [_message_body(m) for m in request.messages],
            "stream": True,
            "stream_options": {"include_usage": True},
            "max_tokens": s.max_new_tokens,
            "temperature": s.temperature,
            "top_p": s.top_p,
            "seed": s.seed,
        }
        if s.stop:
            body["stop"] = list(s.stop)
        if s.top_k:  # extensions that vLLM, llama.cpp and this app take; sent only when asked for
            body["top_k"] = s.top_k
        if s.repetition_penalty != 1.0:
            body["repetition_penalty"] = s.repetition_penalty
        return body


def _message_body(message: Message) -> dict[str, Any]:
    if not message.images:
        return {"role": message.role, "content": message.text}
    parts: list[dict[str, Any]] = [
        {"type": "image_url", "image_url": {"url": _data_url(image)}} for image in message.images
    ]
    if message.text:
        parts.append({"type": "text", "text": message.text})
    return {"role": message.role, "content": parts}


def _data_url(image: Image.Image) -> str:
    buffer = io.BytesIO()
    image.save(buffer, "PNG")
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()


def _events(response: httpx.Response) -> Iterator[dict[str, Any]]:
    """The JSON objects of a server-sent event stream, up to `[DONE]`."""
    for line in response.iter_lines():
        if not line.startswith("data:"):
            continue  # blank separators, comments, event names
        data = line[5:].strip()
        if data == "[DONE]":
            return
        try:
            event = json.loads(data)
        except json.JSONDecodeError as exc:
            raise RouteError(f"the remote stream is malformed: {data[:80]!r}") from exc
        if not isinstance(event, dict):
            raise RouteError(f"the remote stream is malformed: {data[:80]!r}")
        if "error" in event:
            error = event["error"]
            raise RouteError(
                f"the remote failed mid-answer: {error.get('message', error) if isinstance(error, dict) else error}"
            )
        yield event


def _read(event: dict[str, Any], watch: Stopwatch) -> tuple[str, FinishReason | None]:
    """The text an event adds and the finish it announces; its usage goes into `watch`."""
    usage = event.get("usage")
    if isinstance(usage, dict):
        watch.prompt_tokens = int(usage.get("prompt_tokens") or 0)
        watch.reused_tokens = int((usage.get("prompt_tokens_details") or {}).get("cached_tokens") or 0)
        if usage.get("completion_tokens"):
            watch.tokens = int(usage["completion_tokens"])
    choices = event.get("choices") or []
    if not choices:
        return "", None
    choice = choices[0]
    text = (choice.get("delta") or {}).get("content") or ""
    reason = choice.get("finish_reason")
    return text, (FINISH.get(reason, "eos") if reason else None)


def _message(response: httpx.Response) -> str:
    try:
        error = response.json().get("error")
        return str(error.get("message") if isinstance(error, dict) else error or response.text[:200])
    except ValueError:
        return response.text[:200]
