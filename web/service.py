"""The page's handlers over one loaded pipeline: chat (streamed), retry, edit, undo, stop, clear,
the conversation's download, and `/generate`. Every handler that generates reads one `Settings`
(the route, the sampling, the image-token budget) instead of a control each.
"""

from __future__ import annotations

import hashlib
import json
import logging
import shutil
import tempfile
import threading
import time
import weakref
from collections.abc import Iterator, Mapping
from contextlib import closing
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

import gradio as gr

from hybrid.config import DEFAULT_IMAGE_DETAIL, DEFAULT_MAX_IMAGE_TOKENS, IMAGE_DETAIL, SamplingConfig
from hybrid.errors import HybridError
from hybrid.media import IMAGE, VIDEO
from hybrid.pipeline import Pipeline
from hybrid.router import AUTO
from hybrid.types import Request, RouteName
from hybrid.videos import is_video_file
from web.admission import Admission
from web.view import (
    Question,
    RouteRun,
    Turn,
    as_message,
    box_figure,
    conversation_record,
    history_entries,
    history_rows,
    latency_rows,
    message_files,
    question_of,
    settle,
    stage_rows,
    to_chatbot,
    to_request,
    turn_of_bubble,
)

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Settings:
    """What the controls ask of one request."""

    route: str = AUTO
    sampling: SamplingConfig = SamplingConfig()
    max_image_tokens: int = DEFAULT_MAX_IMAGE_TOKENS

    @classmethod
    def read(cls, values: Mapping[str, Any]) -> Settings:
        """From the controls' values by name (`route`, `max_new_tokens`, `temperature`, `top_p`,
        `top_k`, `repetition_penalty`, `seed`, `speculative`, `image_detail`, `greedy`; sliders send floats), or a
        `gr.Error` that says which value is wrong."""
        greedy = bool(values.get("greedy", False))
        sampling = sampling_of(
            max_new_tokens=values["max_new_tokens"],
            temperature=0.0 if greedy else values["temperature"],
            top_p=values.get("top_p", 1.0),
            top_k=values.get("top_k", 0),
            repetition_penalty=values.get("repetition_penalty", 1.0),
            seed=values.get("seed", 0),
            speculative=values.get("speculative", SamplingConfig.speculative),
        )
        detail = values.get("image_detail", DEFAULT_IMAGE_DETAIL)
        if detail not in IMAGE_DETAIL:
            raise gr.Error(f"image detail must be one of {', '.join(IMAGE_DETAIL)}, got {detail!r}")
        return cls(str(values.get("route", AUTO)), sampling, IMAGE_DETAIL[detail])


def as_int(value: Any) -> Any:
    """Sliders and number boxes send floats: 12.0 becomes 12; anything else is left for
    `SamplingConfig` to accept or reject with a clear message."""
    return int(value) if isinstance(value, float) and value.is_integer() else value


def sampling_of(**values: Any) -> SamplingConfig:
    """The sampling settings as the controls send them (floats from sliders), or a `gr.Error`."""
    for name in ("max_new_tokens", "top_k", "seed"):
        if name in values:
            values[name] = as_int(values[name])
    try:
        return SamplingConfig(**values)
    except HybridError as exc:
        raise gr.Error(str(exc)) from exc


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
    session that pressed it, through that request's cancel event. `admission` is shared with the
    API: a client address may send only so many requests per minute, and one request runs at a time."""

    def __init__(
        self, pipeline: Pipeline, page: Page, stream_interval: float = 0.05, admission: Admission | None = None
    ) -> None:
        self.pipeline = pipeline
        self.page = page
        self.stream_interval = stream_interval  # at most one chat update per interval while streaming
        self.admission = admission or Admission()
        self._cancels: dict[str, threading.Event] = {}
        self._lock = threading.Lock()
        self._exports: Path | None = None  # a folder per session holds its conversation.json
        self._warmed: dict[str, tuple] = {}  # session -> what its last warm-up was for

    def chat(
        self, message: dict | None, turns: list[Turn], settings: Settings, history: list[dict], request: gr.Request
    ) -> Iterator[dict]:
        """Streams updates of the `Page`: the conversation as it grows, then the latency panel
        and the run history. The session is the conversation: the routes keep its KV caches until
        Clear or its end."""
        self._admit(request)
        question, full, routes = self._prepare(message, turns, settings, _session(request) or None)
        turns = [*turns, question]
        page = self.page
        cancel = self._begin(_session(request))
        runs: list[RouteRun] = []
        shown = [turns]  # the conversation as last shown: the producing thread appends, this one reads

        def answers(cancel: threading.Event) -> Iterator[dict]:
            for name in routes:
                if cancel.is_set():
                    break
                run, before = RouteRun(name), shown[-1]
                for current in self._answer(full, run, before, cancel):
                    shown.append(current)
                    yield page.conversation(current)
                runs.append(run)
                yield {page.latency: latency_rows(runs), page.stages: stage_rows(runs)}

        try:
            yield {page.prompt: None, **page.conversation(turns)}
            yield from self.admission.on_cpu(answers, cancel)
        except HybridError as exc:
            yield page.conversation(settle(shown[-1], "failed"))
            raise gr.Error(str(exc)) from exc
        finally:
            self._end(_session(request), cancel)
        turns = shown[-1]
        figure = box_figure(runs, turns)
        done = [*turns, figure] if figure is not None else turns
        if figure is not None:
            yield page.conversation(done)
        history = [*history, *history_entries(len(history), question, runs)]
        yield {
            page.history: history,
            page.history_table: history_rows(history),
            page.download: self.export(done, request),
        }

    def _prepare(
        self, message: dict | None, turns: list[Turn], settings: Settings, conversation_id: str | None = None
    ) -> tuple[Question, Request, tuple[RouteName, ...]]:
        """Everything that can be refused, checked before the conversation changes."""
        runtime = self.pipeline.runtime
        try:
            files = message_files(message)
            videos = sum(map(is_video_file, files))
            questions = [t for t in turns if isinstance(t, Question)]
            runtime.check_count(IMAGE, sum(len(t.images) for t in questions) + len(files) - videos)
            runtime.check_count(VIDEO, sum(len(t.videos) for t in questions) + videos)
            question = question_of(message, runtime.max_image_pixels, self.pipeline.open_video)
            request = to_request([*turns, question], settings.sampling, conversation_id, settings.max_image_tokens)
            return question, request, self.pipeline.plan(request, settings.route)
        except HybridError as exc:
            raise gr.Error(str(exc)) from exc

    def _answer(
        self, request: Request, run: RouteRun, turns: list[Turn], cancel: threading.Event
    ) -> Iterator[list[Turn]]:
        """The conversation with `run`'s reply so far (it gathers the route's chunks), at most once
        per `stream_interval`."""
        yield [*turns, run.turn(self.pipeline.opens_thinking)]
        shown = time.perf_counter()
        with closing(self.pipeline.stream(request, run.route, cancel)) as chunks:
            for chunk in chunks:
                run.add(chunk)
                if chunk.finish_reason is not None or time.perf_counter() - shown >= self.stream_interval:
                    shown = time.perf_counter()
                    yield [*turns, run.turn(self.pipeline.opens_thinking)]

    def retry(
        self, data: gr.RetryData, turns: list[Turn], settings: Settings, history: list[dict], request: gr.Request
    ) -> Iterator[dict]:
        """Answer a question again (on the route chosen now): what followed it is dropped."""
        index = self._question(turns, data.index)
        message = as_message(turns[index], turns[index].text)
        yield from self.chat(message, turns[:index], settings, history, request)

    def edit(
        self, data: gr.EditData, turns: list[Turn], settings: Settings, history: list[dict], request: gr.Request
    ) -> Iterator[dict]:
        """Ask an edited question (same pictures) in place of the original: what followed it is dropped."""
        index = self._question(turns, data.index)
        message = as_message(turns[index], data.value if isinstance(data.value, str) else _text_of(data.value))
        yield from self.chat(message, turns[:index], settings, history, request)

    def undo(self, data: gr.UndoData, turns: list[Turn], request: gr.Request) -> dict:
        """Take the last question back: it returns to the textbox, and its replies leave the chat."""
        index = self._question(turns, data.index)
        kept = turns[:index]
        return {
            self.page.prompt: as_message(turns[index], turns[index].text),
            **self.page.conversation(kept),
            self.page.download: self.export(kept, request),
        }

    @staticmethod
    def _question(turns: list[Turn], bubble: int | tuple[int, int]) -> int:
        index = turn_of_bubble(turns, bubble if isinstance(bubble, int) else bubble[0])
        if not isinstance(turns[index], Question):
            raise gr.Error("Pick a question (one of your messages) to retry, edit or undo.")
        return index

    def warm(self, message: dict | None, turns: list[Turn], settings: Settings, request: gr.Request) -> None:
        """Pictures or a video added to the textbox are encoded and prefilled on Hybrid ONNX at once
        (`Pipeline.warm`), kept for the question about them, so that the wait after Enter is the
        question's own (its answer counts them as reused tokens). Only where Hybrid ONNX would
        answer, once per set of files; it waits for the CPU like a request, and a question sent
        meanwhile waits for it. Nothing is shown: a file that cannot be read is reported when the
        question is sent. It counts against the client's rate like a request (a refused one is
        skipped), so that adding pictures cannot keep the CPU busy beyond what asking could."""
        session, files = _session(request), message_files(message)
        key = (files, len(turns), settings.route, settings.max_image_tokens)
        if not session or not files or self._warmed.get(session) == key:
            return
        self._warmed[session] = key
        runtime = self.pipeline.runtime
        try:
            question = question_of({"files": list(files)}, runtime.max_image_pixels, self.pipeline.open_video)
            ahead = to_request([*turns, question], settings.sampling, session, settings.max_image_tokens)
            if "hybrid" not in self.pipeline.plan(ahead, settings.route):
                return
            self._count(request)
            started = time.perf_counter()
            with self.admission.cpu():
                tokens = self.pipeline.warm(ahead)
        except HybridError as exc:
            log.info("no warm-up of the added files: %s", exc)
            return
        log.info("warmed %d prompt tokens of the added files in %.2f s", tokens, time.perf_counter() - started)

    def stop(self, turns: list[Turn], request: gr.Request) -> dict:
        """Cancel this session's running request; an unfinished reply is marked as stopped."""
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
            self._warmed.pop(session, None)
        if self._exports is not None:
            shutil.rmtree(self._export_folder(request), ignore_errors=True)

    def export(self, turns: list[Turn], request: gr.Request | None) -> str | None:
        """Write the conversation (`conversation_record`) to this session's `conversation.json` for
        the page's download button; None when there is nothing to download."""
        if not turns:
            return None
        if self._exports is None:
            self._exports = Path(tempfile.mkdtemp(prefix="hybrid-conversations-"))  # Gradio serves the temp folder
            weakref.finalize(self, shutil.rmtree, self._exports, True)  # gone with the service (at exit at the latest)
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
        sampling = sampling_of(max_new_tokens=max_new_tokens, temperature=temperature, seed=seed)
        message = {"text": prompt, "files": [image] if image else []}
        _, asked, routes = self._prepare(message, [], Settings(route, sampling))

        def answers(cancel: threading.Event) -> Iterator[dict[str, Any]]:
            for name in routes:
                run = RouteRun(name)
                for chunk in self.pipeline.stream(asked, name, cancel):
                    run.add(chunk)
                yield run.to_dict()

        try:
            results = list(self.admission.on_cpu(answers, threading.Event()))
        except HybridError as exc:
            raise gr.Error(str(exc)) from exc
        return results[0]["text"], results

    def _admit(self, request: gr.Request | None) -> None:
        """Count the request against its client address's rate (the same limit as the API's)."""
        try:
            self._count(request)
        except HybridError as exc:
            raise gr.Error(str(exc)) from exc

    def _count(self, request: gr.Request | None) -> None:
        """Count one request of the client's address; `Busy` when it is over its rate."""
        client = getattr(request, "client", None)
        self.admission.check(self.admission.client(getattr(client, "host", None), getattr(request, "headers", None)))

    def _begin(self, session: str) -> threading.Event:
        cancel = threading.Event()
        with self._lock:
            self._cancels[session] = cancel
        return cancel

    def _end(self, session: str, cancel: threading.Event) -> None:
        with self._lock:
            if self._cancels.get(session) is cancel:
                del self._cancels[session]


def _text_of(content: Any) -> str:
    """The text of an edited Chatbot message (a string, or a list of parts)."""
    parts = content if isinstance(content, list) else [content]
    return " ".join(
        p if isinstance(p, str) else str(p.get("text", "")) for p in parts if isinstance(p, (str, dict))
    ).strip()


def _session(request: gr.Request | None) -> str:
    return (request.session_hash if request is not None else None) or ""
