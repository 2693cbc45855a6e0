"""Request and response types shared by every route: a conversation in, a stream of `Chunk`s out.

A route is anything with a `name` (a `RouteName`) and a `stream` method (the `Route` protocol);
`Answer` gathers a route's chunks into the result the CLI prints and the app shows.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any, Literal, Protocol, get_args

import numpy as np
from PIL import Image

from hybrid.config import DEFAULT_MAX_IMAGE_TOKENS, SamplingConfig, check_max_image_tokens
from hybrid.errors import UserError
from hybrid.metrics import Timings

Role = Literal["system", "user", "assistant"]
FinishReason = Literal["eos", "length", "stop", "cancelled"]
RouteName = Literal["hybrid", "genai", "pytorch", "remote"]
ROUTE_NAMES: tuple[RouteName, ...] = get_args(RouteName)
LOCAL_ROUTES: tuple[RouteName, ...] = ("hybrid", "genai", "pytorch")  # those of a bundle; "remote" is a server


@dataclass(frozen=True, eq=False)
class Video:
    """The frames sampled from a video file, and where in the file they were taken (what Qwen3-VL's
    per-frame timestamps are computed from)."""

    frames: np.ndarray  # (F, H, W, 3) uint8 RGB
    fps: float  # of the file
    frames_indices: tuple[int, ...]  # which frames of the file, in order; F of them
    total_num_frames: int  # in the file
    name: str = "video"

    def __post_init__(self) -> None:
        if self.frames.ndim != 4 or self.frames.shape[-1] != 3 or len(self.frames) != len(self.frames_indices):
            raise ValueError(f"frames {self.frames.shape} do not match {len(self.frames_indices)} frame indices")


@dataclass(frozen=True)
class Message:
    """One turn. Images, then videos, go before the text in the rendered turn, in the order given."""

    role: Role
    text: str = ""
    images: tuple[Image.Image, ...] = ()
    videos: tuple[Video, ...] = ()

    def __post_init__(self) -> None:
        if self.role not in ("system", "user", "assistant"):
            raise UserError(f"role must be system, user or assistant, got {self.role!r}")
        if not isinstance(self.text, str):
            raise UserError("message text must be a string")


@dataclass(frozen=True)
class Request:
    """A conversation ending with a user turn, and how to sample the answer.

    `conversation_id` names the conversation across requests: a route may keep its KV cache under
    it and prefill only what follows the longest common prefix next time (None: nothing is kept).
    `max_image_tokens` caps the image tokens of each picture (larger pictures are scaled down)."""

    messages: tuple[Message, ...]
    sampling: SamplingConfig = field(default_factory=SamplingConfig)
    conversation_id: str | None = None
    max_image_tokens: int = DEFAULT_MAX_IMAGE_TOKENS

    def __post_init__(self) -> None:
        if not self.messages or self.messages[-1].role != "user":
            raise UserError("a request must end with a user message")
        check_max_image_tokens(self.max_image_tokens)
        if self.conversation_id is not None and not (isinstance(self.conversation_id, str) and self.conversation_id):
            raise UserError("conversation_id must be a non-empty string or None")
        last = self.messages[-1]
        if not last.text.strip() and not last.images and not last.videos:
            raise UserError("the prompt is empty: type a question or add an image")

    @property
    def images(self) -> tuple[Image.Image, ...]:
        return tuple(img for m in self.messages for img in m.images)

    @property
    def videos(self) -> tuple[Video, ...]:
        return tuple(video for m in self.messages for video in m.videos)

    @property
    def has_images(self) -> bool:
        return any(m.images for m in self.messages)

    @property
    def has_videos(self) -> bool:
        return any(m.videos for m in self.messages)


@dataclass(frozen=True)
class Chunk:
    """A piece of streamed output. The last chunk of a stream has `finish_reason` and `timings`."""

    route: RouteName
    text: str
    token_ids: tuple[int, ...]
    finish_reason: FinishReason | None = None
    timings: Timings | None = None


class Route(Protocol):
    """What the pipeline asks of a route: its name, and a stream of chunks for one request that
    ends with a chunk carrying `finish_reason` and `timings` (early if `cancel` is set)."""

    name: RouteName

    def stream(self, request: Request, cancel: threading.Event | None = None) -> Iterator[Chunk]: ...


@dataclass
class Answer:
    """One route's chunks gathered: the text and token ids so far and, once the stream has ended,
    how it ended and its timings."""

    route: RouteName
    text: str = ""
    token_ids: list[int] = field(default_factory=list)
    finish_reason: FinishReason | None = None
    timings: Timings | None = None

    def add(self, chunk: Chunk) -> None:
        self.text += chunk.text
        self.token_ids.extend(chunk.token_ids)
        if chunk.finish_reason is not None:
            self.finish_reason, self.timings = chunk.finish_reason, chunk.timings

    def to_dict(self) -> dict[str, Any]:
        """The shape `python -m hybrid generate --json` prints: route, text, token_ids,
        finish_reason, timings."""
        return {
            "route": self.route,
            "text": self.text,
            "token_ids": list(self.token_ids),
            "finish_reason": self.finish_reason,
            "timings": self.timings.to_dict() if self.timings else {},
        }


def collect(route: RouteName, chunks: Iterable[Chunk], on_text: Callable[[str], None] | None = None) -> dict[str, Any]:
    """Drain one route's chunk stream into `Answer.to_dict()`'s shape, handing each piece of text
    to `on_text` as it arrives."""
    answer = Answer(route)
    for chunk in chunks:
        answer.add(chunk)
        if on_text is not None and chunk.text:
            on_text(chunk.text)
    return answer.to_dict()
