"""The Gradio page over one loaded `Pipeline`: a chat with images and videos, the routes side by side,
the latency breakdown of every answer, and the conversation to download as JSON.

`build_demo(pipeline, description)` builds the page without launching it (tests use it);
`python app.py [--model SRC] ...` exports or reuses a bundle, loads it once and serves the page.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import os
import shutil
import sys
import tempfile
import threading
import time
from contextlib import closing
from dataclasses import dataclass, fields, replace
from pathlib import Path
from typing import Any, Callable, Iterator

import gradio as gr
import pandas as pd
from PIL import Image

from hybrid.boxes import Box, draw_boxes, parse_boxes
from hybrid.config import (
    DEFAULT_IMAGE_DETAIL, DEFAULT_MAX_IMAGE_TOKENS, IMAGE_DETAIL, PRECISIONS, RuntimeConfig, SamplingConfig,
    add_vision_argument, vision_backend,
)  # fmt: skip
from hybrid.errors import HybridError
from hybrid.images import open_image
from hybrid.launch import AUTO_PRECISION, describe_model, load_pipeline
from hybrid.limits import RateLimiter
from hybrid.logs import setup_logging
from hybrid.metrics import Timings
from hybrid.pipeline import Pipeline
from hybrid.router import AUTO, COMPARE, COMPARE_ORDER, ROUTE_CHOICES
from hybrid.routes.hybrid import HybridRoute
from hybrid.thinking import split_thinking
from hybrid.types import ROUTE_NAMES, Answer, Message, Request, RouteName, Video
from hybrid.videos import VIDEO_SUFFIXES, is_video_file

log = logging.getLogger("app")

EXAMPLES_DIR = Path(__file__).resolve().parent / "assets" / "examples"
EXAMPLES = (
    ("photo_shapes.jpg", "Locate every shape."),
    ("two_shapes.jpg", "How many shapes are there?"),
    ("orange_star.jpg", "Where is the shape?"),
    ("orange_star.jpg", "What colour is the shape?"),
)
ROUTE_LABELS: dict[RouteName, str] = {"hybrid": "Hybrid ONNX", "genai": "GenAI", "pytorch": "PyTorch reference"}
CHOICE_LABELS = {AUTO: "Auto", **ROUTE_LABELS, COMPARE: "Compare all"}  # the Route control
UNAVAILABLE = " (unavailable)"  # after the label of a route that did not load; CSS greys it out
# each route's colour when its boxes are drawn on the picture (Compare all draws them together)
ROUTE_COLOURS: dict[RouteName, tuple[int, int, int]] = {
    "hybrid": (79, 70, 229), "genai": (22, 163, 74), "pytorch": (234, 88, 12),
}  # fmt: skip
FIGURE_SIDE = 768  # longest side of a picture with boxes, as shown in the chat
CPU = "cpu"  # the concurrency group of every event that generates: one generation at a time
QUEUE_SIZE = 16  # requests waiting for the CPU; more are refused with Gradio's "queue is full"
MAX_FILE_SIZE = "20mb"  # per uploaded file
RATE_LIMIT = 20  # requests per minute and session
AUTH_ENV = "HYBRID_AUTH"  # USER:PASSWORD, read when --auth is not given
LATENCY_COLUMNS = (
    "route", "finish", "preprocess ms", "vision ms", "prefill ms", "TTFT ms",
    "decode tok/s", "prompt tokens", "reused tokens", "image tokens", "video tokens", "new tokens", "total ms",
    "peak RSS MB",
)  # fmt: skip
RUN_COLUMNS = ("#", "route", "prompt", "tokens", "tok/s", "total ms", "finish")
PROMPT_CHARS = 40  # of each prompt, in the run history
STAGE_COLUMNS = ("route", "stage", "ms")
CSS = """
.route-mark { display: block; margin-top: 0.4em; font-size: 0.8em; font-style: italic; opacity: 0.7; }
#chatbot img, #chatbot video { max-height: 160px; width: auto; }
#header h1 { margin-bottom: 0.2em; }
#route label[data-testid$="(unavailable)-radio-label"] { opacity: 0.45; pointer-events: none; }
"""


@dataclass(frozen=True)
class Turn:
    """One bubble of the conversation. A user turn keeps its images and videos (they are sent again
    with every later request); an answer remembers its route and, once finished, how it ended and
    its timings."""

    role: str  # "user" or "assistant"
    text: str
    images: tuple[Image.Image, ...] = ()
    paths: tuple[str, ...] = ()  # the uploaded files, for the chat display
    route: str = ""
    status: str = ""  # the mark under an answer
    done: bool = True
    figure: Image.Image | None = None  # the picture with the boxes the answers above gave, not sent to the model
    thinking: str | None = None  # a Thinking model's reasoning, shown collapsed, never sent back
    videos: tuple[Video, ...] = ()
    finish_reason: str | None = None
    timings: Timings | None = None


@dataclass
class RouteRun(Answer):
    """One route's answer as the page shows it: a bubble, and the mark under it."""

    def turn(self, opens_thinking: bool = False) -> Turn:
        thinking, answer = split_thinking(self.text, opens_thinking)
        done = self.timings is not None
        return Turn(
            "assistant", answer, route=self.route, status=self.status(), done=done, thinking=thinking,
            finish_reason=self.finish_reason, timings=self.timings,
        )  # fmt: skip

    def status(self) -> str:
        if self.timings is None:
            return f"{self.route} · generating…"
        speed = f"{self.timings.decode_tok_s:.1f} tok/s · {self.timings.decode_tokens} tokens"
        if self.timings.thinking_tokens:
            speed += f" ({self.timings.thinking_tokens} thinking)"
        if self.timings.decode_tokens and not self.text.strip():
            speed += " that spell no text"  # ids the tokenizer has no text for (a random-weight model's)
        endings = {"cancelled": "stopped", "length": "cut at max new tokens", "stop": "stop string"}
        ending = endings.get(self.finish_reason or "")
        return f"{self.route} · {speed}" + (f" · {ending}" if ending else "")


def to_request(
    turns: list[Turn],
    sampling: SamplingConfig,
    conversation_id: str | None = None,
    max_image_tokens: int = DEFAULT_MAX_IMAGE_TOKENS,
) -> Request:
    """The whole conversation, earlier images included (the routes reuse what they kept of it
    under `conversation_id`). After "Compare all" a question has one answer per route: the first
    one stands for the conversation."""
    messages: list[Message] = []
    for turn in turns:
        if turn.role == "user":
            messages.append(Message("user", turn.text, turn.images, turn.videos))
        elif turn.figure is None and turn.text and messages and messages[-1].role == "user":
            messages.append(Message("assistant", turn.text))
    return Request(tuple(messages), sampling, conversation_id, max_image_tokens)


def user_turn(message: dict | str | None, max_pixels: int, open_video: Callable[[str], Video]) -> Turn:
    """The textbox value (`{"text", "files"}`) as a user turn: video files (by their suffix) through
    `open_video`, the other files as images; unreadable ones raise UserError."""
    paths = message_files(message)
    images = tuple(open_image(p, max_pixels) for p in paths if not is_video_file(p))
    videos = tuple(open_video(p) for p in paths if is_video_file(p))
    text = (message.get("text") if isinstance(message, dict) else message) or ""
    return Turn("user", text.strip(), images=images, paths=paths, videos=videos)


def message_files(message: dict | str | None) -> tuple[str, ...]:
    """The paths of the files a textbox value holds."""
    files = message.get("files") if isinstance(message, dict) else None
    return tuple(item["path"] if isinstance(item, dict) else str(item) for item in files or ())


def conversation_record(turns: list[Turn], model: str) -> dict[str, Any]:
    """The conversation as the page's download holds it: each question with its files' names, each
    answer with its route, how it ended and its timings (the pictures with boxes are the page's own)."""
    messages = []
    for turn in turns:
        if turn.role == "user":
            messages.append({"role": "user", "text": turn.text, "files": [Path(p).name for p in turn.paths]})
        elif turn.figure is None:
            messages.append({
                "role": "assistant", "route": turn.route, "text": turn.text, "thinking": turn.thinking,
                "finish_reason": turn.finish_reason, "timings": turn.timings.to_dict() if turn.timings else None,
            })  # fmt: skip
    return {"model": model, "messages": messages}


def settle(turns: list[Turn], ending: str) -> list[Turn]:
    """The conversation with an unfinished last answer marked as ended (stopped, failed)."""
    if not turns or turns[-1].done:
        return turns
    last = turns[-1]
    return [*turns[:-1], replace(last, status=f"{last.route} · {ending}", done=True)]


def to_chatbot(turns: list[Turn]) -> list[dict[str, Any]]:
    """The Chatbot's messages: images then text for a question, the route mark under an answer."""
    return [bubble for turn in turns for bubble in _bubbles(turn)]


def turn_of_bubble(turns: list[Turn], index: int) -> int:
    """The index in `turns` of the turn the Chatbot shows as message `index`."""
    owners = [i for i, turn in enumerate(turns) for _ in _bubbles(turn)]
    if not 0 <= index < len(owners):
        raise gr.Error("That message is no longer in the conversation.")
    return owners[index]


def _bubbles(turn: Turn) -> list[dict[str, Any]]:
    if turn.role == "user":
        content: list[Any] = [{"path": p} for p in turn.paths] + ([turn.text] if turn.text else [])
        return [{"role": "user", "content": content}]
    if turn.figure is not None:
        picture = gr.Image(turn.figure, show_label=False, buttons=["download", "fullscreen"])
        return [{"role": "assistant", "content": picture}, {"role": "assistant", "content": turn.text}]
    thought = []
    if turn.thinking is not None:
        state = "done" if turn.done or turn.text else "pending"
        thought = [{"role": "assistant", "content": turn.thinking, "metadata": {"title": "Thinking", "status": state}}]
    mark = f'<span class="route-mark">{turn.status}</span>'
    return [*thought, {"role": "assistant", "content": f"{turn.text}\n\n{mark}" if turn.text else mark}]


def box_figure(runs: list[RouteRun], turns: list[Turn]) -> Turn | None:
    """The conversation's latest picture with every route's boxes (Qwen3-VL `bbox_2d` / `point_2d`)
    drawn in the route's colour, and a legend; None when no answer holds a box or there is no picture."""
    pictures = [image for turn in turns if turn.role == "user" for image in turn.images]
    found = [(run.route, parse_boxes(split_thinking(run.text, False)[1])) for run in runs]
    found = [(route, boxes) for route, boxes in found if boxes]
    if not pictures or not found:
        return None
    picture = pictures[-1].copy()
    picture.thumbnail((FIGURE_SIDE, FIGURE_SIDE))
    figure = draw_boxes(picture, [(boxes, ROUTE_COLOURS[route]) for route, boxes in found])
    legend = " · ".join(f"{_swatch(route)} {ROUTE_LABELS[route]}: {_box_summary(boxes)}" for route, boxes in found)
    return Turn("assistant", f"Where the model looked: {legend}", figure=figure)


def _swatch(route: str) -> str:
    r, g, b = ROUTE_COLOURS[route]
    return f'<span style="color: rgb({r}, {g}, {b})">■</span>'


def _box_summary(boxes: list[Box]) -> str:
    labels = ", ".join(box.label or "unlabelled" for box in boxes)
    return f"{len(boxes)} {'box' if len(boxes) == 1 else 'boxes'} ({labels})"


def latency_rows(runs: list[RouteRun]) -> pd.DataFrame:
    rows = []
    for run in runs:
        t = run.timings
        rows.append((
            run.route, run.finish_reason, round(t.preprocess_ms, 1), round(t.vision_ms, 1), round(t.prefill_ms, 1),
            round(t.ttft_ms, 1), round(t.decode_tok_s, 1), t.prompt_tokens, t.reused_tokens,
            ", ".join(map(str, t.image_tokens)), ", ".join(map(str, t.video_tokens)), t.decode_tokens,
            round(t.total_ms, 1), round(t.peak_rss_mb),
        ))  # fmt: skip
    return pd.DataFrame(rows, columns=list(LATENCY_COLUMNS))


def stage_rows(runs: list[RouteRun]) -> pd.DataFrame:
    """Where each route's time went, for the stacked bar chart; decode is everything after TTFT."""
    rows = []
    for run in runs:
        t = run.timings
        stages = {"preprocess": t.preprocess_ms, "vision": t.vision_ms, "prefill": t.prefill_ms}
        stages["other"] = max(t.ttft_ms - sum(stages.values()), 0.0)
        stages["decode"] = max(t.total_ms - t.ttft_ms, 0.0)
        rows += [(run.route, stage, round(ms, 2)) for stage, ms in stages.items()]
    frame = pd.DataFrame(rows, columns=list(STAGE_COLUMNS))
    return frame.astype({"route": str, "stage": str, "ms": float})  # typed even when empty: the chart's axes


def history_rows(history: list[dict[str, Any]]) -> pd.DataFrame:
    return pd.DataFrame(list(reversed(history)), columns=list(RUN_COLUMNS))


def history_entries(start: int, user: Turn, runs: list[RouteRun]) -> list[dict[str, Any]]:
    prompt = user.text if len(user.text) <= PROMPT_CHARS else user.text[: PROMPT_CHARS - 1] + "…"
    return [
        {
            "#": start + i + 1, "route": run.route, "prompt": prompt,
            "tokens": run.timings.decode_tokens, "tok/s": round(run.timings.decode_tok_s, 1),
            "total ms": round(run.timings.total_ms, 1),
            "finish": run.finish_reason,
        }  # fmt: skip
        for i, run in enumerate(runs)
    ]


def as_int(value: Any) -> Any:
    """Sliders and number boxes send floats: 12.0 becomes 12; anything else is left for
    `SamplingConfig` to accept or reject with a clear message."""
    return int(value) if isinstance(value, float) and value.is_integer() else value


@dataclass(frozen=True)
class Page:
    """The components the chat handlers update; a handler's update is a dict keyed by them."""

    prompt: gr.MultimodalTextbox
    chatbot: gr.Chatbot
    turns: gr.State
    latency: gr.Dataframe
    stages: gr.BarPlot
    history: gr.State
    history_table: gr.Dataframe
    download: gr.DownloadButton

    @property
    def outputs(self) -> list[gr.components.Component]:
        return [getattr(self, f.name) for f in fields(self)]

    def conversation(self, turns: list[Turn]) -> dict:
        """The update that shows `turns` in the chat and keeps them in the session."""
        return {self.chatbot: to_chatbot(turns), self.turns: turns}


class ChatService:
    """The page's handlers, over one loaded pipeline. Stop reaches the running request of the
    session that pressed it, through that request's cancel event. With a `limiter`, each session
    may send only so many requests per minute."""

    def __init__(
        self, pipeline: Pipeline, page: Page, stream_interval: float = 0.05, limiter: RateLimiter | None = None
    ) -> None:
        self.pipeline = pipeline
        self.page = page
        self.stream_interval = stream_interval  # at most one chat update per interval while streaming
        self.limiter = limiter
        self._cancels: dict[str, threading.Event] = {}
        self._lock = threading.Lock()
        self._exports: Path | None = None  # a folder per session holds its conversation.json

    def chat(
        self,
        message: dict | None,
        turns: list[Turn],
        route: str,
        max_new_tokens: float,
        temperature: float,
        top_p: float,
        top_k: float,
        repetition_penalty: float,
        seed: float,
        history: list[dict[str, Any]],
        request: gr.Request,
        image_detail: str = DEFAULT_IMAGE_DETAIL,
        greedy: bool = False,
    ) -> Iterator[dict]:
        """Streams updates of the `Page`: the conversation as it grows, then the latency panel
        and the run history. The session is the conversation: the routes keep its KV caches until
        Clear or its end."""
        self._admit(request)
        sampling = _sampling(
            max_new_tokens=max_new_tokens, temperature=0.0 if greedy else temperature, top_p=top_p, top_k=top_k,
            repetition_penalty=repetition_penalty, seed=seed,
        )  # fmt: skip
        conversation = _session(request) or None
        user, full, routes = self._prepare(message, turns, sampling, route, conversation, _image_tokens(image_detail))
        turns = [*turns, user]
        page = self.page
        cancel = self._begin(_session(request))
        runs: list[RouteRun] = []
        try:
            yield {page.prompt: None, **page.conversation(turns)}
            for name in routes:
                if cancel.is_set():
                    break
                for turns, run in self._answer(full, name, turns, cancel):
                    yield page.conversation(turns)
                runs.append(run)
                yield {page.latency: latency_rows(runs), page.stages: stage_rows(runs)}
        except HybridError as exc:
            yield page.conversation(settle(turns, "failed"))
            raise gr.Error(str(exc)) from exc
        finally:
            self._end(_session(request), cancel)
        figure = box_figure(runs, turns)
        if figure is not None:
            yield page.conversation([*turns, figure])
        history = [*history, *history_entries(len(history), user, runs)]
        done = [*turns, figure] if figure is not None else turns
        download = self.export(done, request)
        yield {page.history: history, page.history_table: history_rows(history), page.download: download}

    def _prepare(
        self,
        message: dict | None,
        turns: list[Turn],
        sampling: SamplingConfig,
        route: str,
        conversation_id: str | None = None,
        max_image_tokens: int = DEFAULT_MAX_IMAGE_TOKENS,
    ) -> tuple[Turn, Request, tuple[RouteName, ...]]:
        """Everything that can be refused, checked before the conversation changes."""
        runtime = self.pipeline.runtime
        try:
            files = message_files(message)
            videos = sum(map(is_video_file, files))
            runtime.check_image_count(sum(len(t.images) for t in turns) + len(files) - videos)
            runtime.check_video_count(sum(len(t.videos) for t in turns) + videos)
            user = user_turn(message, runtime.max_image_pixels, self.pipeline.open_video)
            request = to_request([*turns, user], sampling, conversation_id, max_image_tokens)
            return user, request, self.pipeline.plan(request, route)
        except HybridError as exc:
            raise gr.Error(str(exc)) from exc

    def _answer(
        self, request: Request, route: RouteName, turns: list[Turn], cancel: threading.Event
    ) -> Iterator[tuple[list[Turn], RouteRun]]:
        """The conversation with the route's answer so far, at most once per `stream_interval`."""
        run = RouteRun(route)
        yield [*turns, run.turn(self.pipeline.opens_thinking)], run
        shown = time.perf_counter()
        with closing(self.pipeline.stream(request, route, cancel)) as chunks:
            for chunk in chunks:
                run.add(chunk)
                if chunk.finish_reason is not None or time.perf_counter() - shown >= self.stream_interval:
                    shown = time.perf_counter()
                    yield [*turns, run.turn(self.pipeline.opens_thinking)], run

    def retry(
        self, data: gr.RetryData, turns: list[Turn], route: str, max_new_tokens: float, temperature: float,
        top_p: float, top_k: float, repetition_penalty: float, seed: float, history: list[dict[str, Any]],
        request: gr.Request, image_detail: str = DEFAULT_IMAGE_DETAIL, greedy: bool = False,
    ) -> Iterator[dict]:  # fmt: skip
        """Answer a question again (on the route chosen now): what followed it is dropped."""
        index = self._question(turns, data.index)
        message = _as_message(turns[index], turns[index].text)
        yield from self.chat(message, turns[:index], route, max_new_tokens, temperature, top_p, top_k,
                             repetition_penalty, seed, history, request, image_detail, greedy)  # fmt: skip

    def edit(
        self, data: gr.EditData, turns: list[Turn], route: str, max_new_tokens: float, temperature: float,
        top_p: float, top_k: float, repetition_penalty: float, seed: float, history: list[dict[str, Any]],
        request: gr.Request, image_detail: str = DEFAULT_IMAGE_DETAIL, greedy: bool = False,
    ) -> Iterator[dict]:  # fmt: skip
        """Ask an edited question (same pictures) in place of the original: what followed it is dropped."""
        index = self._question(turns, data.index)
        message = _as_message(turns[index], data.value if isinstance(data.value, str) else _text_of(data.value))
        yield from self.chat(message, turns[:index], route, max_new_tokens, temperature, top_p, top_k,
                             repetition_penalty, seed, history, request, image_detail, greedy)  # fmt: skip

    def undo(self, data: gr.UndoData, turns: list[Turn], request: gr.Request) -> dict:
        """Take the last question back: it returns to the textbox, and its answers leave the chat."""
        index = self._question(turns, data.index)
        kept = turns[:index]
        return {
            self.page.prompt: _as_message(turns[index], turns[index].text), **self.page.conversation(kept),
            self.page.download: self.export(kept, request),
        }  # fmt: skip

    @staticmethod
    def _question(turns: list[Turn], bubble: int | tuple[int, int]) -> int:
        index = turn_of_bubble(turns, bubble if isinstance(bubble, int) else bubble[0])
        if turns[index].role != "user" or not turns[index].done:
            raise gr.Error("Pick a question (one of your messages) to retry, edit or undo.")
        return index

    def stop(self, turns: list[Turn], request: gr.Request) -> dict:
        """Cancel this session's running request; an unfinished answer is marked as stopped."""
        with self._lock:
            cancel = self._cancels.get(_session(request))
        if cancel is not None:
            cancel.set()
        settled = settle(turns, "stopped")
        return {**self.page.conversation(settled), self.page.download: self.export(settled, request)}

    def clear(self, request: gr.Request) -> dict:
        """Stop anything running and start a new conversation (the run history stays); the KV
        caches kept for the old one and its download are dropped."""
        self.stop([], request)
        self.end_session(request)
        return {self.page.prompt: None, **self.page.conversation([]), self.page.download: None}

    def end_session(self, request: gr.Request) -> None:
        """Drop the KV caches kept for this session's conversation and its download (Clear, or the
        tab closed)."""
        session = _session(request)
        if session:
            self.pipeline.forget(session)
        if self._exports is not None:
            shutil.rmtree(self._export_folder(request), ignore_errors=True)

    def export(self, turns: list[Turn], request: gr.Request | None) -> str | None:
        """Write the conversation (`conversation_record`) to this session's `conversation.json` for
        the page's download button; None when there is nothing to download."""
        if not turns:
            return None
        if self._exports is None:
            self._exports = Path(tempfile.mkdtemp(prefix="hybrid-conversations-"))  # Gradio serves the temp folder
        folder = self._export_folder(request)
        folder.mkdir(exist_ok=True)
        model = Path(self.pipeline.manifest.source).name or self.pipeline.manifest.source  # never a server folder
        record = {**conversation_record(turns, model), "precision": self.pipeline.manifest.precision}
        path = folder / "conversation.json"
        path.write_text(json.dumps(record, ensure_ascii=False, indent=2))
        return str(path)

    def _export_folder(self, request: gr.Request | None) -> Path:
        """The session's folder of downloads, named by a digest: the session id comes from the browser."""
        return self._exports / hashlib.sha256(_session(request).encode()).hexdigest()[:24]

    def generate(
        self,
        prompt: str,
        image: str | None,
        route: str,
        max_new_tokens: float,
        temperature: float,
        seed: float,
        request: gr.Request,
    ) -> tuple[str, list[dict[str, Any]]]:
        """One prompt (and at most one image) answered in full: the answer of the first route, and
        one CLI-shaped result per route (`route`, `text`, `token_ids`, `finish_reason`, `timings`)."""
        self._admit(request)
        sampling = _sampling(max_new_tokens=max_new_tokens, temperature=temperature, seed=seed)
        message = {"text": prompt, "files": [image] if image else []}
        _, asked, routes = self._prepare(message, [], sampling, route)
        results = []
        try:
            for name in routes:
                run = RouteRun(name)
                for chunk in self.pipeline.stream(asked, name):
                    run.add(chunk)
                results.append(run.to_dict())
        except HybridError as exc:
            raise gr.Error(str(exc)) from exc
        return results[0]["text"], results

    def _admit(self, request: gr.Request | None) -> None:
        if self.limiter is None:
            return
        try:
            self.limiter.check(_session(request))
        except HybridError as exc:
            raise gr.Error(str(exc)) from exc

    def _begin(self, session: str) -> threading.Event:
        cancel = threading.Event()
        with self._lock:
            self._cancels[session] = cancel
        return cancel

    def _end(self, session: str, cancel: threading.Event) -> None:
        with self._lock:
            if self._cancels.get(session) is cancel:
                del self._cancels[session]


def _as_message(question: Turn, text: str) -> dict[str, Any]:
    """A question as the textbox sends it: its text and its pictures' files."""
    return {"text": text, "files": list(question.paths)}


def _text_of(content: Any) -> str:
    """The text of an edited Chatbot message (a string, or a list of parts)."""
    parts = content if isinstance(content, list) else [content]
    return " ".join(p if isinstance(p, str) else str(p.get("text", "")) for p in parts if isinstance(p, (str, dict))).strip()


def _sampling(
    *, max_new_tokens: Any, temperature: Any, seed: Any, top_p: Any = 1.0, top_k: Any = 0, repetition_penalty: Any = 1.0
) -> SamplingConfig:
    """The sampling settings as the controls send them (floats from sliders), or a `gr.Error`."""
    try:
        return SamplingConfig(
            max_new_tokens=as_int(max_new_tokens),
            temperature=temperature,
            top_p=top_p,
            top_k=as_int(top_k),
            repetition_penalty=repetition_penalty,
            seed=as_int(seed),
        )
    except HybridError as exc:
        raise gr.Error(str(exc)) from exc


def _image_tokens(detail: str) -> int:
    """The image token budget of an "Image detail" choice."""
    if detail not in IMAGE_DETAIL:
        raise gr.Error(f"image detail must be one of {', '.join(IMAGE_DETAIL)}, got {detail!r}")
    return IMAGE_DETAIL[detail]


def _session(request: gr.Request | None) -> str:
    return (request.session_hash if request is not None else None) or ""


def header(pipeline: Pipeline, description: str) -> str:
    """The page's title, the model, the routes that serve and why any other one does not."""
    lazily = " (loaded on first use)" if "pytorch" in pipeline.routes else ""
    hybrid = pipeline.routes.get("hybrid")
    tower = "onnxruntime" if isinstance(hybrid, HybridRoute) and hybrid.vision.backend == "onnx" else "PyTorch"
    routes: dict[RouteName, str] = {
        "hybrid": f"**Hybrid ONNX**: vision tower ({tower}) → image features injected into our ONNX decoder",
        "genai": "**GenAI**: onnxruntime-genai, text only",
        "pytorch": f"**PyTorch reference**: transformers `generate`{lazily}",
    }
    listed = " · ".join(text for name, text in routes.items() if name in pipeline.routes)
    missing = "".join(
        f"\n\n**{ROUTE_LABELS[name]} is unavailable**: {reason}" for name, reason in pipeline.unavailable.items()
    )
    auto = "text to GenAI" if "genai" in pipeline.routes else "text to Hybrid ONNX too"
    visual = "image and video" if pipeline.processor.takes_videos else "image"
    return (
        "# Qwen3-VL hybrid inference on the CPU\n\n"
        f"{description}\n\n"
        f"Routes: {listed}. *Auto* sends {visual} prompts to Hybrid ONNX and {auto}; "
        f"one request runs at a time.{missing}"
    )


def build_demo(
    pipeline: Pipeline, description: str, stream_interval: float = 0.05, limiter: RateLimiter | None = None
) -> gr.Blocks:
    """The page, wired to `pipeline`; launch it with `launch_demo`."""
    demo, _ = build_page(pipeline, description, stream_interval, limiter)
    return demo


def build_page(
    pipeline: Pipeline, description: str, stream_interval: float = 0.05, limiter: RateLimiter | None = None
) -> tuple[gr.Blocks, ChatService]:
    """The page and the service whose handlers it calls (tests drive the handlers directly)."""
    with gr.Blocks(title="Qwen3-VL hybrid inference", delete_cache=(3600, 86400), analytics_enabled=False) as demo:
        gr.Markdown(header(pipeline, description), elem_id="header")
        turns, history = gr.State([]), gr.State([])
        with gr.Row(equal_height=False):
            with gr.Column(scale=3):
                chatbot, prompt, stop, clear, download = _chat_column(pipeline.processor.takes_videos)
            with gr.Column(scale=2, min_width=300):
                controls, detail, greedy = _controls(pipeline)
                _examples(prompt)
        latency, stages, history_table = _latency_panel()
        page = Page(prompt, chatbot, turns, latency, stages, history, history_table, download)
        service = ChatService(pipeline, page, stream_interval, limiter)
        _api_only(service)

        chat_event = prompt.submit(
            service.chat, [prompt, turns, *controls, history, detail, greedy], page.outputs,
            api_name="chat", concurrency_id=CPU, concurrency_limit=1, show_progress="minimal",
        )  # fmt: skip
        answer_inputs = [turns, *controls, history, detail, greedy]
        for event, handler in ((chatbot.retry, service.retry), (chatbot.edit, service.edit)):
            event(handler, answer_inputs, page.outputs, concurrency_id=CPU, concurrency_limit=1,
                  show_progress="minimal", api_visibility="private")  # fmt: skip
        chatbot.undo(service.undo, [turns], [prompt, chatbot, turns, download], queue=False, api_visibility="private")
        stop.click(service.stop, [turns], [chatbot, turns, download], cancels=[chat_event], queue=False,
                   api_name="stop")  # fmt: skip
        clear.click(service.clear, None, [prompt, chatbot, turns, download], cancels=[chat_event], queue=False,
                    api_name="clear")  # fmt: skip
        demo.unload(service.end_session)
    return demo, service


def _chat_column(
    takes_videos: bool,
) -> tuple[gr.Chatbot, gr.MultimodalTextbox, gr.Button, gr.Button, gr.DownloadButton]:
    """The chat, its textbox (pictures, and short videos where the checkpoint's template places them),
    Stop, Clear, and the conversation's download."""
    media = "images or a short video" if takes_videos else "images"
    chatbot = gr.Chatbot(
        label="Conversation", height=500, elem_id="chatbot", buttons=["copy"], editable="user",
        placeholder=f"Ask about a picture{' or a video' if takes_videos else ''}: add one below (upload, paste "
        "or drop) or pick an example.",
    )  # fmt: skip
    prompt = gr.MultimodalTextbox(
        file_types=["image", *sorted(VIDEO_SUFFIXES)] if takes_videos else ["image"], file_count="multiple",
        show_label=False, elem_id="prompt", autofocus=True,
        placeholder=f"Type a question and press Enter; add {media} with the paperclip button, by pasting or by dropping them here",
    )  # fmt: skip
    with gr.Row():
        stop = gr.Button("Stop", variant="stop", elem_id="stop", size="sm")
        clear = gr.Button("Clear conversation", elem_id="clear", size="sm")
        download = gr.DownloadButton("Download conversation (JSON)", elem_id="download", size="sm")
    return chatbot, prompt, stop, clear, download


def _examples(prompt: gr.MultimodalTextbox) -> None:
    gr.Examples(
        examples=[[{"text": question, "files": [str(EXAMPLES_DIR / name)]}] for name, question in EXAMPLES],
        inputs=[prompt],
        label="Examples: pick one, then press Enter",
        elem_id="examples",
        examples_per_page=len(EXAMPLES),
    )


def _controls(pipeline: Pipeline) -> tuple[list[gr.components.Component], gr.Radio, gr.Checkbox]:
    """The route and sampling controls (in the chat handler's order), the image detail choice and
    the greedy toggle. Sampling starts from the checkpoint's own generation config."""
    limit = pipeline.runtime.max_new_tokens_limit
    own = pipeline.sampling
    route = gr.Radio(route_choices(pipeline), value=AUTO, label="Route", elem_id="route",
                     info="Compare all runs every route that can serve the prompt, one after the other.")  # fmt: skip
    greedy = gr.Checkbox(
        value=not own.do_sample, label="Greedy (exact route comparison)", elem_id="greedy",
        info="The most likely token every time: every route must give the same answer. Off: sampling with "
        "the settings below, which start from the checkpoint's generation config"
        + ("." if own.do_sample else " (it asks for greedy decoding)."),
    )  # fmt: skip
    max_new_tokens = gr.Slider(1, limit, value=min(128, limit), step=1, label="Max new tokens")
    temperature = gr.Slider(0.0, 2.0, value=own.temperature, step=0.05, label="Temperature", info="0 is greedy")
    detail = gr.Radio(
        [(f"{level.capitalize()} ({tokens} tokens)", level) for level, tokens in IMAGE_DETAIL.items()],
        value=DEFAULT_IMAGE_DETAIL, label="Image detail", elem_id="image-detail",
        info="Image tokens per picture at most: larger pictures are scaled down. More detail sees small "
        "things better, and takes longer before the first word.",
    )  # fmt: skip
    with gr.Accordion("More sampling settings", open=False):
        top_p = gr.Slider(0.05, 1.0, value=own.top_p, step=0.05, label="Top-p")
        top_k = gr.Slider(0, 200, value=own.top_k, step=1, label="Top-k", info="0 is off")
        repetition_penalty = gr.Slider(1.0, 2.0, value=own.repetition_penalty, step=0.05, label="Repetition penalty")
        seed = gr.Number(value=0, precision=0, minimum=0, label="Seed")
    return [route, max_new_tokens, temperature, top_p, top_k, repetition_penalty, seed], detail, greedy


def route_choices(pipeline: Pipeline) -> list[tuple[str, str]]:
    """(label, value) of the Route control: Auto, each route of the bundle (one that did not load
    marked unavailable, and greyed out by the page's CSS), Compare all."""
    shown = (AUTO, *(r for r in ROUTE_NAMES if r in pipeline.routes or r in pipeline.unavailable), COMPARE)
    return [(CHOICE_LABELS[name] + (UNAVAILABLE if name in pipeline.unavailable else ""), name) for name in shown]


def _latency_panel() -> tuple[gr.Dataframe, gr.BarPlot, gr.Dataframe]:
    gr.Markdown("### Latency of the last request")
    latency = gr.Dataframe(
        pd.DataFrame(columns=list(LATENCY_COLUMNS)), interactive=False, elem_id="latency", show_label=False,
        wrap=True,
    )  # fmt: skip
    with gr.Row():
        stages = gr.BarPlot(  # no value until the first answer: the chart's colours come from its first data
            None, x="route", y="ms", color="stage", elem_id="stages", sort=list(COMPARE_ORDER),
            title="Where the time went (ms)", y_title="ms", x_title="route", height=260, scale=2,
        )  # fmt: skip
        with gr.Column(scale=3):
            history = gr.Dataframe(
                pd.DataFrame(columns=list(RUN_COLUMNS)), interactive=False, label="Runs this session",
                elem_id="history", max_height=260, wrap=True,
            )  # fmt: skip
    return latency, stages, history


def _api_only(service: ChatService) -> None:
    """`/generate`: one prompt and an optional image in, (answer, per-route results) out."""
    with gr.Row(visible=False):
        prompt = gr.Textbox(label="prompt")
        image = gr.File(label="image", file_types=["image"], type="filepath")
        route = gr.Dropdown(list(ROUTE_CHOICES), value=AUTO, label="route")
        max_new_tokens = gr.Number(128, precision=0, label="max_new_tokens")
        temperature = gr.Number(0.0, label="temperature")
        seed = gr.Number(0, precision=0, label="seed")
        answer = gr.Textbox(label="answer")
        results = gr.JSON(label="results")
        run = gr.Button("generate")
    run.click(
        service.generate, [prompt, image, route, max_new_tokens, temperature, seed], [answer, results],
        api_name="generate", concurrency_id=CPU, concurrency_limit=1,
    )  # fmt: skip


def launch_demo(demo: gr.Blocks, queue_size: int = QUEUE_SIZE, **kwargs: Any) -> Any:
    """Queue (bounded) and launch; `kwargs` go to `Blocks.launch` (server_name, server_port, ...).
    Gradio serves uploads and the example pictures, nothing else of this machine."""
    theme = gr.themes.Soft(primary_hue="indigo", neutral_hue="slate")
    return demo.queue(max_size=queue_size).launch(
        max_file_size=MAX_FILE_SIZE, allowed_paths=[str(EXAMPLES_DIR)], theme=theme, css=CSS, **kwargs
    )


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description="Qwen3-VL hybrid inference on the CPU: the web demo")
    parser.add_argument("--model", help="checkpoint folder or hub id (default: the demo model in assets/demo-model)")
    parser.add_argument("--bundle", help="bundle folder (default: .cache/bundles/<model>-<precision>); "
                        "an existing bundle given without --model is served as is")  # fmt: skip
    parser.add_argument("--precision", choices=(AUTO_PRECISION, *PRECISIONS), default=AUTO_PRECISION,
                        help="auto: INT4 decoder and GenAI model and INT8 vision for a real checkpoint, "
                        "fp32 for the demo model")  # fmt: skip
    parser.add_argument("--threads", type=int, default=0, help="0: one per physical core")
    add_vision_argument(parser)
    parser.add_argument("--conversation-cache-mb", type=int, default=RuntimeConfig.conversation_cache_mb, metavar="MB",
                        help="memory for the KV caches kept for follow-up questions, all sessions together (0: none)")  # fmt: skip
    parser.add_argument("--server-name", default="127.0.0.1", help="0.0.0.0 to serve the local network")
    parser.add_argument("--port", type=int, default=7860)
    parser.add_argument("--share", action="store_true", help="make a public Gradio link (use --auth with it)")
    parser.add_argument("--auth", metavar="USER:PASSWORD", default=os.environ.get(AUTH_ENV),
                        help=f"ask for this login before showing the page (default: ${AUTH_ENV}, if set)")
    parser.add_argument("--rate-limit", type=int, default=RATE_LIMIT, metavar="N",
                        help="requests per minute and browser session (0: no limit)")  # fmt: skip
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    args = parser.parse_args(argv)
    if args.auth is not None and not _valid_auth(args.auth):
        parser.error(f"--auth (or ${AUTH_ENV}) takes USER:PASSWORD, both non-empty")
    if args.rate_limit < 0:
        parser.error("--rate-limit must be >= 0")
    return args


def _valid_auth(text: str) -> bool:
    user, _, password = text.partition(":")
    return bool(user and password)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    setup_logging(logging.DEBUG if args.verbose else logging.INFO)
    try:
        runtime = RuntimeConfig(
            threads=args.threads, conversation_cache_mb=args.conversation_cache_mb,
            vision_backend=vision_backend(args.vision),
        )  # fmt: skip
        pipeline = load_pipeline(args.model, args.bundle, args.precision, runtime)
    except HybridError as exc:
        log.error("%s", exc)
        return 2
    limiter = RateLimiter(args.rate_limit, 60.0) if args.rate_limit else None
    demo = build_demo(pipeline, describe_model(pipeline.manifest), limiter=limiter)
    auth = tuple(args.auth.split(":", 1)) if args.auth else None
    if args.share and auth is None:
        log.warning("--share without --auth: anyone with the link can use this machine's CPU")
    launch_demo(demo, server_name=args.server_name, server_port=args.port, share=args.share, auth=auth)
    return 0


if __name__ == "__main__":
    sys.exit(main())
