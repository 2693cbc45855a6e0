"""The page: its header (the engine's facts in words), the chat column, the controls, the latency
panel and `/generate`, wired to a `ChatService` over one loaded pipeline.

`build_demo(pipeline, facts)` builds the page without launching it (tests use it); `launch_demo`
queues and serves it.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

import gradio as gr
import pandas as pd

from hybrid.config import DEFAULT_IMAGE_DETAIL, IMAGE_DETAIL, SamplingConfig
from hybrid.launch import ModelFacts, PipelineFacts
from hybrid.pipeline import Pipeline
from hybrid.router import AUTO, COMPARE, COMPARE_ORDER, ROUTE_CHOICES
from hybrid.types import ROUTE_NAMES, RouteName
from hybrid.videos import VIDEO_SUFFIXES
from web.admission import Admission
from web.service import ChatService, Page, Settings
from web.view import LATENCY_COLUMNS, ROUTE_LABELS, RUN_COLUMNS

EXAMPLES_DIR = Path(__file__).resolve().parents[1] / "assets" / "examples"
EXAMPLES = (
    ("photo_shapes.jpg", "Locate every shape."),
    ("two_shapes.jpg", "How many shapes are there?"),
    ("orange_star.jpg", "Where is the shape?"),
    ("orange_star.jpg", "What colour is the shape?"),
)
CHOICE_LABELS = {AUTO: "Auto", **ROUTE_LABELS, COMPARE: "Compare all"}  # the Route control
UNAVAILABLE = " (unavailable)"  # after the label of a route that did not load; CSS greys it out
CPU = "cpu"  # the concurrency group of every event that generates: one generation at a time
QUEUE_SIZE = 16  # requests waiting for the CPU; more are refused with Gradio's "queue is full"
MAX_FILE_SIZE = "20mb"  # per uploaded file
REAL_MODEL_HINT = "`python app.py --model Qwen/Qwen3-VL-2B-Instruct` (or `--model /path/to/checkpoint`)"
# what the header reports of the demo model's own eval, in this order: (kind, words, chance)
DEMO_KINDS = (
    ("shape", "shape", 0.25),
    ("colour", "colour", 1 / 6),
    ("position", "place", 0.2),
    ("count", "count", 1 / 3),
)
CSS = """
.route-mark { display: block; margin-top: 0.4em; font-size: 0.8em; font-style: italic; opacity: 0.7; }
#chatbot img, #chatbot video { max-height: 160px; width: auto; }
#header h1 { margin-bottom: 0.2em; }
#route label[data-testid$="(unavailable)-radio-label"] { opacity: 0.45; pointer-events: none; }
"""


def describe_model(model: ModelFacts) -> str:
    """Markdown: which model is loaded and what it can be expected to do (the demo model: from the
    eval figures kept in its training record)."""
    params = f"{model.parameters / 1e9:.2f} B" if model.parameters >= 1e9 else f"{model.parameters / 1e6:.1f} M"
    size = f"{params} parameters, {model.layers if model.layers is not None else '?'} layers, {model.precision}"
    if model.kind == "demo":
        return (
            f"**Demo model** (`{_shown(model.source)}`, {size}): a tiny Qwen3-VL trained from scratch on this machine "
            f"on photo-like synthetic pictures of one to three coloured circles, squares, triangles and stars"
            f"{_sizes(model.record)}. {_demo_figures(model.record)} It knows nothing else but greetings and small "
            f"sums. For a real model start {REAL_MODEL_HINT}."
        )
    if model.kind == "tiny":
        return (
            f"**Untrained tiny model** ({size}, random weights): its answers are noise. It is here to "
            "show the pipeline and its timings. Train the demo model with `python -m hybrid.demo train "
            f"--out assets/demo-model`, or start a real one with {REAL_MODEL_HINT}."
        )
    return f"**{model.name}** (`{model.source}`, {size})."


def _shown(source: str) -> str:
    """A model folder as the user typed it: relative to the working directory where it lies below it."""
    try:
        return str(Path(source).resolve().relative_to(Path.cwd()))
    except ValueError:
        return source


def _sizes(record: dict[str, Any]) -> str:
    sizes = record.get("shape_sizes")
    if not sizes:
        return ""
    low, high = sizes
    return f", each {low:.0%} to {high:.0%} of the picture's short side (smaller ones it has not seen)"


def _demo_figures(record: dict[str, Any]) -> str:
    """The demo model's eval in a sentence: accuracy per kind on fresh pictures, first questions and
    follow-ups, and the boxes."""
    evals = record.get("eval", {})
    report = evals.get("hybrid-fp32-train-conversation") or evals.get("hybrid-fp32-train")
    if report is None:
        return (
            "Its eval figures are not recorded: `python -m hybrid.demo eval --model assets/demo-model "
            "--conversation --record` measures them."
        )
    accuracy = report["accuracy"]
    kinds = ", ".join(
        f"{words} {accuracy[kind]:.0%} (chance {chance:.0%})" for kind, words, chance in DEMO_KINDS if kind in accuracy
    )
    text = f"Graded on {report['n']} fresh pictures it never saw, its answers are right for {kinds}"
    boxes = report.get("boxes", {})
    if boxes.get("n"):
        text += f"; {boxes['hit_rate']:.0%} of the boxes it is asked for land on the right shape with the right label"
    first, follow = report.get("first"), report.get("follow_up")
    if first and follow:
        text += (
            f". Follow-up questions in one conversation: {_mean(follow):.0%} right, against {_mean(first):.0%} "
            "for first questions"
        )
    return text + "."


def _mean(scores: dict[str, float]) -> float:
    return sum(scores.values()) / len(scores)


def header(facts: PipelineFacts) -> str:
    """The page's title, the model, the routes that serve and why any other one does not."""
    tower = "onnxruntime" if facts.vision_backend == "onnx" else "PyTorch"
    lazily = " (loaded on first use)" if "pytorch" in facts.lazy else ""
    routes: dict[RouteName, str] = {
        "hybrid": f"**Hybrid ONNX**: vision tower ({tower}) → image features injected into our ONNX decoder",
        "genai": "**GenAI**: onnxruntime-genai, text only",
        "pytorch": f"**PyTorch reference**: transformers `generate`{lazily}",
        "remote": f"**Remote server**: {facts.remote}, timed as this server sees it (asked by name or in Compare all)",
    }
    listed = " · ".join(text for name, text in routes.items() if name in facts.routes)
    missing = "".join(
        f"\n\n**{ROUTE_LABELS[name]} is unavailable**: {reason}" for name, reason in facts.unavailable.items()
    )
    auto = "text to GenAI" if "genai" in facts.routes else "text to Hybrid ONNX too"
    visual = "image and video" if facts.takes_videos else "image"
    return (
        "# Qwen3-VL hybrid inference on the CPU\n\n"
        f"{describe_model(facts.model)}\n\n"
        f"Routes: {listed}. *Auto* sends {visual} prompts to Hybrid ONNX and {auto}; "
        f"one request runs at a time.{missing}"
    )


@dataclass(frozen=True)
class Controls:
    """The controls every generating handler reads, as one `Settings` (field names are its keys)."""

    route: gr.Radio
    max_new_tokens: gr.Slider
    temperature: gr.Slider
    top_p: gr.Slider
    top_k: gr.Slider
    repetition_penalty: gr.Slider
    seed: gr.Number
    speculative: gr.Radio
    image_detail: gr.Radio
    greedy: gr.Checkbox

    @property
    def components(self) -> set[gr.components.Component]:
        return {getattr(self, f.name) for f in fields(self)}

    def read(self, values: dict) -> Settings:
        """The settings from a handler's inputs (a dict keyed by component)."""
        return Settings.read({f.name: values[getattr(self, f.name)] for f in fields(self)})


def build_demo(
    pipeline: Pipeline, facts: PipelineFacts, stream_interval: float = 0.05, admission: Admission | None = None
) -> gr.Blocks:
    """The page, wired to `pipeline`; launch it with `launch_demo`."""
    demo, _ = build_page(pipeline, facts, stream_interval, admission)
    return demo


def build_page(
    pipeline: Pipeline, facts: PipelineFacts, stream_interval: float = 0.05, admission: Admission | None = None
) -> tuple[gr.Blocks, ChatService]:
    """The page and the service whose handlers it calls (tests drive the handlers directly)."""
    with gr.Blocks(title="Qwen3-VL hybrid inference", delete_cache=(3600, 86400), analytics_enabled=False) as demo:
        gr.Markdown(header(facts), elem_id="header")
        turns, history = gr.State([]), gr.State([])
        with gr.Row(equal_height=False):
            with gr.Column(scale=3):
                chatbot, prompt, stop, clear, download = _chat_column(facts.takes_videos)
            with gr.Column(scale=2, min_width=300):
                controls = _controls(pipeline, facts)
                _examples(prompt)
        latency, stages, history_table = _latency_panel()
        page = Page(prompt, chatbot, turns, latency, stages, history, history_table, download)
        service = ChatService(pipeline, page, stream_interval, admission)
        _wire(service, controls, stop, clear)
        _api_only(service)
        demo.unload(service.end_session)
    return demo, service


def _wire(service: ChatService, controls: Controls, stop: gr.Button, clear: gr.Button) -> None:
    """The chat's events: each generating one reads its inputs as one dict."""
    page = service.page
    asked = {page.prompt, page.turns, page.history, *controls.components}

    def chat(values: dict, request: gr.Request) -> Iterator[dict]:
        yield from service.chat(
            values[page.prompt], values[page.turns], controls.read(values), values[page.history], request
        )

    def retry(data: gr.RetryData, values: dict, request: gr.Request) -> Iterator[dict]:
        yield from service.retry(data, values[page.turns], controls.read(values), values[page.history], request)

    def edit(data: gr.EditData, values: dict, request: gr.Request) -> Iterator[dict]:
        yield from service.edit(data, values[page.turns], controls.read(values), values[page.history], request)

    def warm(values: dict, request: gr.Request) -> None:
        try:
            settings = controls.read(values)
        except gr.Error:  # reported when the question is sent
            return
        service.warm(values[page.prompt], values[page.turns], settings, request)

    generating = dict(concurrency_id=CPU, concurrency_limit=1, show_progress="minimal")
    # the page's own event (its inputs are the session's state): programs use /generate or /v1.
    # A question sent while the last answer's final updates still stream runs after it ("always_last").
    chat_event = page.prompt.submit(
        chat, asked, page.outputs, api_name="chat", api_visibility="private", trigger_mode="always_last", **generating
    )
    page.prompt.change(
        warm,
        asked,
        None,
        trigger_mode="always_last",
        concurrency_id="warm",
        concurrency_limit=1,
        show_progress="hidden",
        api_visibility="private",
    )
    page.chatbot.retry(retry, asked, page.outputs, api_visibility="private", **generating)
    page.chatbot.edit(edit, asked, page.outputs, api_visibility="private", **generating)
    conversation = [page.prompt, page.chatbot, page.turns, page.download]
    page.chatbot.undo(service.undo, [page.turns], conversation, queue=False, api_visibility="private")
    stop.click(service.stop, [page.turns], conversation[1:], cancels=[chat_event], queue=False, api_name="stop")
    clear.click(service.clear, None, conversation, cancels=[chat_event], queue=False, api_name="clear")


def _chat_column(
    takes_videos: bool,
) -> tuple[gr.Chatbot, gr.MultimodalTextbox, gr.Button, gr.Button, gr.DownloadButton]:
    """The chat, its textbox (pictures, and short videos where the checkpoint's template places them),
    Stop, Clear, and the conversation's download."""
    media = "images or a short video" if takes_videos else "images"
    chatbot = gr.Chatbot(
        label="Conversation",
        height=500,
        elem_id="chatbot",
        buttons=["copy"],
        editable="user",
        placeholder=f"Ask about a picture{' or a video' if takes_videos else ''}: add one below (upload, paste "
        "or drop) or pick an example.",
    )
    prompt = gr.MultimodalTextbox(
        file_types=["image", *sorted(VIDEO_SUFFIXES)] if takes_videos else ["image"],
        file_count="multiple",
        show_label=False,
        elem_id="prompt",
        autofocus=True,
        placeholder=f"Type a question and press Enter; add {media} with the paperclip button, by pasting or by dropping them here",
    )
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


def _controls(pipeline: Pipeline, facts: PipelineFacts) -> Controls:
    """The route, image detail, greedy and sampling controls. Sampling starts from the checkpoint's
    own generation config."""
    limit = pipeline.runtime.max_new_tokens_limit
    own = pipeline.sampling
    route = gr.Radio(
        route_choices(facts),
        value=AUTO,
        label="Route",
        elem_id="route",
        info="Compare all runs every route that can serve the prompt, one after the other.",
    )
    greedy = gr.Checkbox(
        value=not own.do_sample,
        label="Greedy (exact route comparison)",
        elem_id="greedy",
        info="The most likely token every time: every route must give the same answer. Off: sampling with "
        "the settings below, which start from the checkpoint's generation config"
        + ("." if own.do_sample else " (it asks for greedy decoding)."),
    )
    max_new_tokens = gr.Slider(1, limit, value=min(128, limit), step=1, label="Max new tokens")
    temperature = gr.Slider(0.0, 2.0, value=own.temperature, step=0.05, label="Temperature", info="0 is greedy")
    detail = gr.Radio(
        [(f"{level.capitalize()} ({tokens} tokens)", level) for level, tokens in IMAGE_DETAIL.items()],
        value=DEFAULT_IMAGE_DETAIL,
        label="Image detail",
        elem_id="image-detail",
        info="Image tokens per picture at most: larger pictures are scaled down. More detail sees small "
        "things better, and takes longer before the first word.",
    )
    with gr.Accordion("More sampling settings", open=False):
        top_p = gr.Slider(0.05, 1.0, value=own.top_p, step=0.05, label="Top-p")
        top_k = gr.Slider(0, 200, value=own.top_k, step=1, label="Top-k", info="0 is off")
        repetition_penalty = gr.Slider(1.0, 2.0, value=own.repetition_penalty, step=0.05, label="Repetition penalty")
        seed = gr.Number(value=0, precision=0, minimum=0, label="Seed")
        speculative = gr.Radio(
            [("Drafts from the conversation", "ngram"), ("Off", "off")],
            value=SamplingConfig.speculative,
            label="Speculative decoding (Hybrid ONNX)",
            elem_id="speculative",
            info="Guesses the next tokens from what the conversation already says and checks them in one "
            "pass: the same answer, sooner where it repeats itself (boxes, lists).",
        )
    return Controls(
        route=route,
        max_new_tokens=max_new_tokens,
        temperature=temperature,
        top_p=top_p,
        top_k=top_k,
        repetition_penalty=repetition_penalty,
        seed=seed,
        speculative=speculative,
        image_detail=detail,
        greedy=greedy,
    )


def route_choices(facts: PipelineFacts) -> list[tuple[str, str]]:
    """(label, value) of the Route control: Auto, each route of the bundle (one that did not load
    marked unavailable, and greyed out by the page's CSS), Compare all."""
    shown = (AUTO, *(r for r in ROUTE_NAMES if r in facts.routes or r in facts.unavailable), COMPARE)
    return [(CHOICE_LABELS[name] + (UNAVAILABLE if name in facts.unavailable else ""), name) for name in shown]


def _latency_panel() -> tuple[gr.Dataframe, gr.BarPlot, gr.Dataframe]:
    gr.Markdown("### Latency of the last request")
    latency = gr.Dataframe(
        pd.DataFrame(columns=list(LATENCY_COLUMNS)),
        interactive=False,
        elem_id="latency",
        show_label=False,
        wrap=True,
    )
    with gr.Row():
        stages = gr.BarPlot(  # no value until the first answer: the chart's colours come from its first data
            None,
            x="route",
            y="ms",
            color="stage",
            elem_id="stages",
            sort=list(COMPARE_ORDER),
            title="Where the time went (ms)",
            y_title="ms",
            x_title="route",
            height=260,
            scale=2,
        )
        with gr.Column(scale=3):
            history = gr.Dataframe(
                pd.DataFrame(columns=list(RUN_COLUMNS)),
                interactive=False,
                label="Runs this session",
                elem_id="history",
                max_height=260,
                wrap=True,
            )
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
        service.generate,
        [prompt, image, route, max_new_tokens, temperature, seed],
        [answer, results],
        api_name="generate",
        concurrency_id=CPU,
        concurrency_limit=1,
    )


def launch_demo(demo: gr.Blocks, queue_size: int = QUEUE_SIZE, routes: list | None = None, **kwargs: Any) -> Any:
    """Queue (bounded) and launch; `routes` (the API's) join the page's on the same ASGI app;
    `kwargs` go to `Blocks.launch` (server_name, server_port, ...). Gradio serves uploads and the
    example pictures, nothing else of this machine."""
    theme = gr.themes.Soft(primary_hue="indigo", neutral_hue="slate")
    return demo.queue(max_size=queue_size).launch(
        max_file_size=MAX_FILE_SIZE,
        allowed_paths=[str(EXAMPLES_DIR)],
        theme=theme,
        css=CSS,
        app_kwargs={"routes": list(routes or ())},
        **kwargs,
    )
