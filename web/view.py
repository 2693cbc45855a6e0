"""The conversation as the page holds it: one explicit type per kind of bubble (`Question`,
`Reply`, `Figure`), and what each becomes on the page (Chatbot messages, the latency tables, the
picture with boxes, the download) or for the engine (`to_request`).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, ClassVar

import gradio as gr
import pandas as pd
from PIL import Image

from hybrid.boxes import Box, draw_boxes, parse_boxes
from hybrid.config import DEFAULT_MAX_IMAGE_TOKENS, SamplingConfig
from hybrid.images import open_image
from hybrid.metrics import Timings
from hybrid.thinking import split_thinking
from hybrid.types import Answer, Message, Request, RouteName, Video
from hybrid.videos import is_video_file

ROUTE_LABELS: dict[RouteName, str] = {
    "hybrid": "Hybrid ONNX",
    "genai": "GenAI",
    "pytorch": "PyTorch reference",
    "remote": "Remote server",
}
# each route's colour when its boxes are drawn on the picture (Compare all draws them together)
ROUTE_COLOURS: dict[RouteName, tuple[int, int, int]] = {
    "hybrid": (79, 70, 229),
    "genai": (22, 163, 74),
    "pytorch": (234, 88, 12),
    "remote": (219, 39, 119),
}
FIGURE_SIDE = 768  # longest side of a picture with boxes, as shown in the chat
LATENCY_COLUMNS = (
    "route",
    "finish",
    "preprocess ms",
    "vision ms",
    "prefill ms",
    "TTFT ms",
    "decode tok/s",
    "prompt tokens",
    "reused tokens",
    "image tokens",
    "video tokens",
    "new tokens",
    "accepted/drafted",
    "total ms",
    "peak RSS MB",
)
RUN_COLUMNS = ("#", "route", "prompt", "tokens", "tok/s", "total ms", "finish")
PROMPT_CHARS = 40  # of each prompt, in the run history
STAGE_COLUMNS = ("route", "stage", "ms")


@dataclass(frozen=True)
class Question:
    """A person's message: its text and the pictures and videos sent with it (sent again with
    every later request), and the uploaded files' paths for the chat display."""

    text: str
    images: tuple[Image.Image, ...] = ()
    paths: tuple[str, ...] = ()
    videos: tuple[Video, ...] = ()
    role: ClassVar[str] = "user"


@dataclass(frozen=True)
class Reply:
    """One route's answer: its text, the mark under it, whether it has ended (how, and its
    timings), and a Thinking model's reasoning (shown collapsed, never sent back)."""

    text: str
    route: str = ""
    status: str = ""
    done: bool = True
    thinking: str | None = None
    finish_reason: str | None = None
    timings: Timings | None = None
    role: ClassVar[str] = "assistant"


@dataclass(frozen=True)
class Figure:
    """The picture with the boxes the replies above it gave, and its legend: the page's own, never
    sent to the model."""

    text: str
    picture: Image.Image
    role: ClassVar[str] = "assistant"


Turn = Question | Reply | Figure


@dataclass
class RouteRun(Answer):
    """One route's answer as the page shows it: a reply, and the mark under it."""

    def turn(self, opens_thinking: bool = False) -> Reply:
        thinking, answer = split_thinking(self.text, opens_thinking)
        return Reply(
            answer,
            route=self.route,
            status=self.status(),
            done=self.timings is not None,
            thinking=thinking,
            finish_reason=self.finish_reason,
            timings=self.timings,
        )

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
    under `conversation_id`). After "Compare all" a question has one reply per route: the first
    one stands for the conversation."""
    messages: list[Message] = []
    for turn in turns:
        if isinstance(turn, Question):
            messages.append(Message("user", turn.text, turn.images, turn.videos))
        elif isinstance(turn, Reply) and turn.text and messages and messages[-1].role == "user":
            messages.append(Message("assistant", turn.text))
    return Request(tuple(messages), sampling, conversation_id, max_image_tokens)


def question_of(message: dict | str | None, max_pixels: int, open_video: Callable[[str], Video]) -> Question:
    """The textbox value (`{"text", "files"}`) as a question: video files (by their suffix) through
    `open_video`, the other files as images; unreadable ones raise UserError."""
    paths = message_files(message)
    images = tuple(open_image(p, max_pixels) for p in paths if not is_video_file(p))
    videos = tuple(open_video(p) for p in paths if is_video_file(p))
    text = (message.get("text") if isinstance(message, dict) else message) or ""
    return Question(text.strip(), images=images, paths=paths, videos=videos)


def message_files(message: dict | str | None) -> tuple[str, ...]:
    """The paths of the files a textbox value holds."""
    files = message.get("files") if isinstance(message, dict) else None
    return tuple(item["path"] if isinstance(item, dict) else str(item) for item in files or ())


def as_message(question: Question, text: str) -> dict[str, Any]:
    """A question as the textbox sends it: its text and its pictures' files."""
    return {"text": text, "files": list(question.paths)}


def conversation_record(turns: list[Turn], model: str) -> dict[str, Any]:
    """The conversation as the page's download holds it: each question with its files' names, each
    reply with its route, how it ended and its timings (the pictures with boxes are the page's own)."""
    messages = []
    for turn in turns:
        if isinstance(turn, Question):
            messages.append({"role": "user", "text": turn.text, "files": [Path(p).name for p in turn.paths]})
        elif isinstance(turn, Reply):
            messages.append(
                {
                    "role": "assistant",
                    "route": turn.route,
                    "text": turn.text,
                    "thinking": turn.thinking,
                    "finish_reason": turn.finish_reason,
                    "timings": turn.timings.to_dict() if turn.timings else None,
                }
            )
    return {"model": model, "messages": messages}


def settle(turns: list[Turn], ending: str) -> list[Turn]:
    """The conversation with an unfinished last reply marked as ended (stopped, failed)."""
    last = turns[-1] if turns else None
    if not isinstance(last, Reply) or last.done:
        return turns
    return [*turns[:-1], replace(last, status=f"{last.route} · {ending}", done=True)]


def to_chatbot(turns: list[Turn]) -> list[dict[str, Any]]:
    """The Chatbot's messages: images then text for a question, the route mark under a reply."""
    return [bubble for turn in turns for bubble in _bubbles(turn)]


def turn_of_bubble(turns: list[Turn], index: int) -> int:
    """The index in `turns` of the turn the Chatbot shows as message `index`."""
    owners = [i for i, turn in enumerate(turns) for _ in _bubbles(turn)]
    if not 0 <= index < len(owners):
        raise gr.Error("That message is no longer in the conversation.")
    return owners[index]


def _bubbles(turn: Turn) -> list[dict[str, Any]]:
    if isinstance(turn, Question):
        content: list[Any] = [{"path": p} for p in turn.paths] + ([turn.text] if turn.text else [])
        return [{"role": "user", "content": content}]
    if isinstance(turn, Figure):
        picture = gr.Image(turn.picture, show_label=False, buttons=["download", "fullscreen"])
        return [{"role": "assistant", "content": picture}, {"role": "assistant", "content": turn.text}]
    thought = []
    if turn.thinking is not None:
        state = "done" if turn.done or turn.text else "pending"
        thought = [{"role": "assistant", "content": turn.thinking, "metadata": {"title": "Thinking", "status": state}}]
    mark = f'<span class="route-mark">{turn.status}</span>'
    return [*thought, {"role": "assistant", "content": f"{turn.text}\n\n{mark}" if turn.text else mark}]


def box_figure(runs: list[RouteRun], turns: list[Turn]) -> Figure | None:
    """The conversation's latest picture with every route's boxes (Qwen3-VL `bbox_2d` / `point_2d`)
    drawn in the route's colour, and a legend; None when no reply holds a box or there is no picture."""
    pictures = [image for turn in turns if isinstance(turn, Question) for image in turn.images]
    found = [(run.route, parse_boxes(split_thinking(run.text, False)[1])) for run in runs]
    found = [(route, boxes) for route, boxes in found if boxes]
    if not pictures or not found:
        return None
    picture = pictures[-1].copy()
    picture.thumbnail((FIGURE_SIDE, FIGURE_SIDE))
    figure = draw_boxes(picture, [(boxes, ROUTE_COLOURS[route]) for route, boxes in found])
    legend = " · ".join(f"{_swatch(route)} {ROUTE_LABELS[route]}: {_box_summary(boxes)}" for route, boxes in found)
    return Figure(f"Where the model looked: {legend}", figure)


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
        rows.append(
            (
                run.route,
                run.finish_reason,
                round(t.preprocess_ms, 1),
                round(t.vision_ms, 1),
                round(t.prefill_ms, 1),
                round(t.ttft_ms, 1),
                round(t.decode_tok_s, 1),
                t.prompt_tokens,
                t.reused_tokens,
                ", ".join(map(str, t.image_tokens)),
                ", ".join(map(str, t.video_tokens)),
                t.decode_tokens,
                f"{t.accepted_tokens}/{t.draft_tokens}" if t.draft_tokens else "",
                round(t.total_ms, 1),
                round(t.peak_rss_mb),
            )
        )
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


def history_entries(start: int, question: Question, runs: list[RouteRun]) -> list[dict[str, Any]]:
    prompt = question.text if len(question.text) <= PROMPT_CHARS else question.text[: PROMPT_CHARS - 1] + "…"
    return [
        {
            "#": start + i + 1,
            "route": run.route,
            "prompt": prompt,
            "tokens": run.timings.decode_tokens,
            "tok/s": round(run.timings.decode_tok_s, 1),
            "total ms": round(run.timings.total_ms, 1),
            "finish": run.finish_reason,
        }
        for i, run in enumerate(runs)
    ]
