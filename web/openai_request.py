"""An OpenAI chat-completions request body read into the engine's `Request`, or an `ApiError` that
names the field at fault.

What is read: `model`, `messages` (system / developer / user / assistant; content a string or parts
of `text`, `image_url` and `video_url`, pictures and videos as data URLs, or as http(s) URLs when
allowed), `max_tokens` / `max_completion_tokens`, `temperature`, `top_p`, `seed`, `stop`, `stream`,
`stream_options`, and the extensions `top_k`, `repetition_penalty` and `speculative` ("ngram" or
"off": the hybrid route's speculative decoding, which never changes the tokens). A field of a feature this
server does not have is refused unless it asks for nothing (`n: 1`, `tools: []`, ...).
"""

from __future__ import annotations

import base64
import binascii
import ipaddress
import re
import socket
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit

import httpx
from PIL import Image

from hybrid.config import DEFAULT_IMAGE_DETAIL, IMAGE_DETAIL, RuntimeConfig, SamplingConfig
from hybrid.errors import HybridError
from hybrid.images import open_image
from hybrid.types import Message, Request, Video

MAX_FILE_BYTES = 20 * 2**20  # one picture or video, decoded: the page's upload limit
URL_TIMEOUT = httpx.Timeout(10.0, connect=5.0)
DETAIL = {"low": "low", "high": "high", "auto": DEFAULT_IMAGE_DETAIL}
ROLES = {"system": "system", "developer": "system", "user": "user", "assistant": "assistant"}
# fields of features this server lacks, each with the values that ask for nothing
NEUTRAL: dict[str, tuple[Any, ...]] = {
    "n": (1, None),
    "tools": ([], None),
    "tool_choice": ("none", None),
    "functions": ([], None),
    "function_call": ("none", None),
    "logprobs": (False, None),
    "top_logprobs": (0, None),
    "response_format": ({"type": "text"}, None),
    "logit_bias": ({}, None),
    "presence_penalty": (0, 0.0, None),
    "frequency_penalty": (0, 0.0, None),
    "modalities": (["text"], None),
    "audio": (None,),
    "prediction": (None,),
    "parallel_tool_calls": (True, False, None),
    "reasoning_effort": (None,),
    "web_search_options": (None,),
}
IGNORED = {"user", "metadata", "store", "service_tier", "safety_identifier", "prompt_cache_key"}  # no effect here
READ = {
    "model",
    "messages",
    "max_tokens",
    "max_completion_tokens",
    "temperature",
    "top_p",
    "seed",
    "stop",
    "stream",
    "stream_options",
    "top_k",
    "repetition_penalty",
    "speculative",
}
DATA_URL = re.compile(r"data:(?P<mime>[\w.+-]+/[\w.+-]+)?(?P<params>(;[^,;]*)*?);base64,(?P<data>.*)", re.DOTALL)


class ApiError(Exception):
    """A request the API refuses: the HTTP status and OpenAI's error object."""

    def __init__(
        self,
        status: int,
        message: str,
        param: str | None = None,
        code: str | None = None,
        kind: str = "invalid_request_error",
        retry_after: float | None = None,
    ) -> None:
        super().__init__(message)
        self.status, self.message, self.param, self.code, self.kind = status, message, param, code, kind
        self.retry_after = retry_after

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.kind, "param": self.param, "code": self.code}}


@dataclass(frozen=True)
class ChatCall:
    """One chat-completions request as the engine takes it."""

    model: str
    request: Request
    stream: bool
    include_usage: bool


@dataclass(frozen=True)
class Context:
    """What reading a request depends on: the sampling a request leaves out (the checkpoint's own),
    the pixel limit of a picture, the video opener (None: the model's template has no place for
    videos), whether http(s) URLs may be fetched and the most tokens an answer may be asked for."""

    defaults: dict[str, Any]
    max_pixels: int
    open_video: Callable[[bytes], Video] | None
    allow_urls: bool = False
    max_new_tokens: int = RuntimeConfig.max_new_tokens_limit


def read_call(body: Any, context: Context, conversation_id: str | None) -> ChatCall:
    """The request `body` (parsed JSON) as a `ChatCall`, or an `ApiError` (400, 413) naming the field."""
    if not isinstance(body, dict):
        raise ApiError(400, "the request body must be a JSON object")
    _refuse_unsupported(body)
    model = body.get("model")
    if not isinstance(model, str) or not model:
        raise ApiError(400, "model is required: one of the names GET /v1/models lists", "model")
    messages, detail = _messages(body.get("messages"), context)
    stream = _flag(body, "stream")
    options = body.get("stream_options")
    if options is not None and not (isinstance(options, dict) and stream):
        raise ApiError(400, "stream_options must be an object, and only with stream: true", "stream_options")
    try:
        request = Request(messages, _sampling(body, context), conversation_id, IMAGE_DETAIL[detail])
    except HybridError as exc:
        raise ApiError(400, str(exc), "messages") from exc
    return ChatCall(model, request, stream, bool((options or {}).get("include_usage", False)))


def _refuse_unsupported(body: dict[str, Any]) -> None:
    for name, value in body.items():
        if name in NEUTRAL:
            if value not in NEUTRAL[name]:
                raise ApiError(
                    400,
                    f"{name} is not supported by this server (only {NEUTRAL[name][0]!r})",
                    name,
                    "unsupported_parameter",
                )
        elif name not in READ and name not in IGNORED:
            raise ApiError(400, f"unrecognised request field {name!r}", name, "unknown_parameter")


def _flag(body: dict[str, Any], name: str) -> bool:
    value = body.get(name, False)
    if not isinstance(value, bool):
        raise ApiError(400, f"{name} must be true or false", name)
    return value


def _number(body: dict[str, Any], name: str, default: Any, kind: type) -> Any:
    value = body.get(name)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, (int, float)) or (kind is int and value != int(value)):
        raise ApiError(400, f"{name} must be {'an integer' if kind is int else 'a number'}", name)
    return kind(value)


def _text(body: dict[str, Any], name: str, default: str) -> str:
    value = body.get(name)
    if value is None:
        return default
    if not isinstance(value, str):
        raise ApiError(400, f"{name} must be a string", name)
    return value


def _sampling(body: dict[str, Any], context: Context) -> SamplingConfig:
    defaults = context.defaults
    if body.get("max_tokens") is not None and body.get("max_completion_tokens") is not None:
        raise ApiError(400, "give max_tokens or max_completion_tokens, not both", "max_tokens")
    name = "max_completion_tokens" if body.get("max_completion_tokens") is not None else "max_tokens"
    stop = body.get("stop")
    if isinstance(stop, str):
        stop = [stop]
    if stop is not None and not (
        isinstance(stop, list) and len(stop) <= 4 and all(isinstance(s, str) and s for s in stop)
    ):
        raise ApiError(400, "stop must be a non-empty string or a list of up to 4 of them", "stop")
    values = {
        "max_new_tokens": (name, _number(body, name, SamplingConfig.max_new_tokens, int)),
        "temperature": ("temperature", _number(body, "temperature", defaults["temperature"], float)),
        "top_p": ("top_p", _number(body, "top_p", defaults["top_p"], float)),
        "top_k": ("top_k", _number(body, "top_k", defaults["top_k"], int)),
        "repetition_penalty": (
            "repetition_penalty",
            _number(body, "repetition_penalty", defaults["repetition_penalty"], float),
        ),
        "seed": ("seed", _number(body, "seed", 0, int)),
        "speculative": ("speculative", _text(body, "speculative", SamplingConfig.speculative)),
    }
    try:
        sampling = SamplingConfig(**{key: value for key, (_, value) in values.items()}, stop=tuple(stop or ()))
    except HybridError as exc:
        field = next((name for key, (name, _) in values.items() if key in str(exc)), None)
        raise ApiError(400, str(exc), field) from exc
    if sampling.max_new_tokens > context.max_new_tokens:
        raise ApiError(
            400, f"{name} is {sampling.max_new_tokens}, this server's limit is {context.max_new_tokens}", name
        )
    return sampling


def _messages(raw: Any, media: Context) -> tuple[tuple[Message, ...], str]:
    """The messages and the highest image detail any picture asks for."""
    if not isinstance(raw, list) or not raw:
        raise ApiError(400, "messages must be a non-empty list", "messages")
    messages, details = [], []
    for i, message in enumerate(raw):
        where = f"messages[{i}]"
        if not isinstance(message, dict) or message.get("role") not in ROLES:
            raise ApiError(400, f"{where} must be an object with a role of {', '.join(ROLES)}", where)
        role = ROLES[message["role"]]
        text, images, videos = _content(message.get("content"), where, role, media, details)
        messages.append(Message(role, text, images, videos))
    return tuple(messages), max(details or [DEFAULT_IMAGE_DETAIL], key=lambda level: IMAGE_DETAIL[level])


def _content(content: Any, where: str, role: str, media: Context, details: list[str]) -> tuple[str, tuple, tuple]:
    if isinstance(content, str):
        return content, (), ()
    if content is None and role == "assistant":
        return "", (), ()
    if not isinstance(content, list):
        raise ApiError(400, f"{where}.content must be a string or a list of parts", f"{where}.content")
    texts, images, videos = [], [], []
    for j, part in enumerate(content):
        at = f"{where}.content[{j}]"
        kind = part.get("type") if isinstance(part, dict) else None
        if kind == "text" and isinstance(part.get("text"), str):
            texts.append(part["text"])
        elif kind in ("image_url", "video_url") and role == "user":
            url, detail = _url_of(part.get(kind), at, kind)
            data = _fetch(url, at, media.allow_urls)
            if kind == "image_url":
                details.append(detail)
                images.append(_picture(data, at, media.max_pixels))
            else:
                videos.append(_video(data, at, media.open_video))
        elif kind in ("image_url", "video_url"):
            raise ApiError(400, f"{at}: pictures and videos go in user messages only", at)
        else:
            raise ApiError(400, f"{at}: a part is {{type: text|image_url|video_url, ...}}, got {kind!r}", at)
    return "\n".join(texts), tuple(images), tuple(videos)


def _url_of(value: Any, at: str, kind: str) -> tuple[str, str]:
    if isinstance(value, str):
        value = {"url": value}
    if not isinstance(value, dict) or not isinstance(value.get("url"), str):
        raise ApiError(400, f"{at}.{kind} must be an object with a url", f"{at}.{kind}")
    detail = value.get("detail", "auto")
    if detail not in DETAIL:
        raise ApiError(400, f"{at}.{kind}.detail must be low, high or auto", f"{at}.{kind}.detail")
    return value["url"], DETAIL[detail]


def _fetch(url: str, at: str, allow_urls: bool) -> bytes:
    """The bytes a data URL holds, or (when allowed) what an http(s) URL on a public address serves."""
    scheme = url.split(":", 1)[0].lower()
    if scheme == "data":
        return _data_url(url, at)
    if scheme in ("http", "https"):
        if not allow_urls:
            raise ApiError(
                400,
                f"{at}: this server takes pictures as data URLs only (start it with "
                "--allow-url-images to fetch http(s) URLs)",
                at,
                "url_not_allowed",
            )
        return _download(url, at)
    raise ApiError(400, f"{at}: a {scheme or 'relative'}: URL is not accepted; send a data URL", at, "url_not_allowed")


def _data_url(url: str, at: str) -> bytes:
    match = DATA_URL.fullmatch(url)
    if match is None:
        raise ApiError(400, f"{at}: a data URL must be data:<type>;base64,<data>", at)
    encoded = re.sub(r"\s+", "", match["data"])  # base64 wrapped in lines, as MIME writes it, is still base64
    if len(encoded) * 3 // 4 > MAX_FILE_BYTES:
        raise ApiError(413, f"{at}: more than {MAX_FILE_BYTES // 2**20} MB", at, "file_too_large")
    try:
        return base64.b64decode(encoded, validate=True)
    except (binascii.Error, ValueError) as exc:
        raise ApiError(400, f"{at}: the data URL is not valid base64", at) from exc


def _download(url: str, at: str) -> bytes:
    """GET a public URL, never one on a loopback, private, link-local or reserved address: the
    address is resolved and checked, then connected to as resolved (no second lookup), no redirects."""
    parts = urlsplit(url)
    host = parts.hostname
    if not host:
        raise ApiError(400, f"{at}: the URL has no host", at)
    try:
        infos = socket.getaddrinfo(
            host, parts.port or (443 if parts.scheme == "https" else 80), type=socket.SOCK_STREAM
        )
    except OSError as exc:
        raise ApiError(400, f"{at}: cannot resolve {host}", at) from exc
    addresses = {ipaddress.ip_address(info[4][0]) for info in infos}
    if not addresses or any(not address.is_global for address in addresses):
        raise ApiError(
            400,
            f"{at}: {host} is not a public address; this server fetches from public ones only",
            at,
            "url_not_allowed",
        )
    address = sorted(addresses, key=str)[0]
    literal = f"[{address}]" if address.version == 6 else str(address)
    pinned = parts._replace(netloc=literal + (f":{parts.port}" if parts.port else "")).geturl()
    chunks, size = [], 0
    try:
        with httpx.stream(
            "GET",
            pinned,
            headers={"Host": parts.netloc},
            timeout=URL_TIMEOUT,
            extensions={"sni_hostname": host},
            follow_redirects=False,
        ) as response:
            if response.status_code != 200:
                raise ApiError(400, f"{at}: the URL answered HTTP {response.status_code}", at)
            for chunk in response.iter_bytes():
                size += len(chunk)
                if size > MAX_FILE_BYTES:
                    raise ApiError(413, f"{at}: more than {MAX_FILE_BYTES // 2**20} MB", at, "file_too_large")
                chunks.append(chunk)
    except httpx.HTTPError as exc:
        raise ApiError(400, f"{at}: could not fetch the URL: {type(exc).__name__}", at) from exc
    return b"".join(chunks)


def _picture(data: bytes, at: str, max_pixels: int) -> Image.Image:
    try:
        return open_image(data, max_pixels)
    except HybridError as exc:
        raise ApiError(400, f"{at}: {exc}", at) from exc


def _video(data: bytes, at: str, open_video: Callable[[bytes], Video] | None) -> Video:
    if open_video is None:
        raise ApiError(400, f"{at}: this model's chat template has no place for a video", at)
    try:
        return open_video(data)
    except HybridError as exc:
        raise ApiError(400, f"{at}: {exc}", at) from exc
