"""The page's handlers without a browser: streaming, the latency panel, compare, Stop, errors."""

from __future__ import annotations

import json
import logging
import shutil
from dataclasses import replace

import gradio as gr
import numpy as np
import pytest
from PIL import Image

from app import main as app_main
from hybrid.config import SamplingConfig
from hybrid.errors import RouteError, UserError
from hybrid.launch import DEMO_MODEL, TINY_MODEL, auto_precision, describe, ensure_bundle, model_facts, stale_reason
from hybrid.limits import RateLimiter
from hybrid.manifest import BUNDLE_FORMAT, checkpoint_fingerprint
from hybrid.metrics import Timings
from hybrid.pipeline import Pipeline
from hybrid.router import ROUTE_CHOICES
from hybrid.routes import hybrid as hybrid_route
from hybrid.types import ROUTE_NAMES
from tests.helpers import VerifyAll
from tests.page import chat_updates, last, make_service, named, session, settings
from web.admission import Admission
from web.page import CHOICE_LABELS, EXAMPLES, EXAMPLES_DIR, build_demo, describe_model
from web.service import ChatService, Settings
from web.view import (
    LATENCY_COLUMNS,
    ROUTE_COLOURS,
    ROUTE_LABELS,
    Figure,
    Question,
    Reply,
    RouteRun,
    Turn,
    box_figure,
    to_chatbot,
    to_request,
)

# max_new_tokens, temperature, top_p, top_k, repetition_penalty, seed (as the sliders send them)
GREEDY = (24.0, 0.0, 1.0, 0.0, 1.0, 0.0)


@pytest.fixture(scope="module")
def service(pipeline) -> ChatService:
    return make_service(pipeline("base"))


def run_chat(service: ChatService, message, turns=(), route="auto", sampling=GREEDY, history=(), name="s1"):
    """All the updates of one chat request, each a dict of the `Page` fields it set."""
    return chat_updates(service, message, turns, route, sampling, history, name)


def answer_texts(turns: list[Turn]) -> list[str]:
    return [t.text for t in turns if t.role == "assistant"]


def test_text_prompt_streams_and_fills_the_latency_table(service):
    updates = run_chat(service, {"text": "Hello! What is 3 plus 4?", "files": []})
    partial = [u["turns"][-1].text for u in updates if "turns" in u and u["turns"][-1].role == "assistant"]
    assert len(partial) >= 3 and partial[-1], "the answer streams in several updates"
    assert all(partial[-1].startswith(p) for p in partial)
    turns = last(updates, "turns")
    assert [t.role for t in turns] == ["user", "assistant"]
    assert turns[-1].route == "genai" and turns[-1].done
    assert "tok/s" in turns[-1].status
    table = last(updates, "latency")
    assert list(table.columns) == list(LATENCY_COLUMNS)
    assert table["route"].tolist() == ["genai"] and table["new tokens"][0] > 0
    assert set(last(updates, "stages")["stage"]) >= {"prefill", "decode"}
    assert len(last(updates, "history")) == 1
    assert updates[0]["prompt"] is None, "the textbox is cleared as soon as the request starts"
    bubble = last(updates, "chatbot")[-1]
    assert bubble["role"] == "assistant" and "genai" in bubble["content"]


def test_image_prompt_goes_to_the_hybrid_route_and_keeps_images_for_follow_ups(service):
    image = str(EXAMPLES_DIR / EXAMPLES[0][0])
    first = run_chat(service, {"text": "What shape is this?", "files": [image]})
    turns = last(first, "turns")
    assert turns[0].paths == (image,) and len(turns[0].images) == 1
    assert turns[-1].route == "hybrid"
    assert last(first, "latency")["vision ms"][0] > 0
    assert {"path": image} in last(first, "chatbot")[0]["content"]

    follow = run_chat(service, {"text": "And what colour is it?", "files": []}, turns=turns)
    turns = last(follow, "turns")
    assert turns[-1].route == "hybrid", "an image earlier in the conversation still needs the hybrid route"
    request = to_request(turns[:-1], SamplingConfig())
    assert [m.role for m in request.messages] == ["user", "assistant", "user"]
    assert len(request.images) == 1


def test_the_speculation_control_reaches_the_route_and_the_latency_table_shows_its_drafts(service, monkeypatch):
    monkeypatch.setattr(hybrid_route, "DraftPolicy", VerifyAll)
    assert (
        Settings.read({"max_new_tokens": 8.0, "temperature": 0.0, "speculative": "off"}).sampling.speculative == "off"
    )
    with pytest.raises(gr.Error, match="speculative must be one of ngram, off"):
        Settings.read({"max_new_tokens": 8.0, "temperature": 0.0, "speculative": "eagle"})
    image = str(EXAMPLES_DIR / EXAMPLES[0][0])
    table = last(run_chat(service, {"text": "Repeat: red red red red red red.", "files": [image]}), "latency")
    kept, drafted = (int(n) for n in table["accepted/drafted"][0].split("/"))
    assert table["route"][0] == "hybrid" and 0 <= kept <= drafted > 0


def test_compare_fills_one_row_per_route(service, pipeline):
    updates = run_chat(service, {"text": "Who are you?", "files": []}, route="compare")
    table = last(updates, "latency")
    assert table["route"].tolist() == ["pytorch", "hybrid", "genai"]
    answers = answer_texts(last(updates, "turns"))
    assert len(answers) == 3
    assert answers[0] == answers[1] == answers[2], "fp32 greedy: every route gives the same answer"
    assert len(last(updates, "history")) == 3


def test_stop_ends_a_generation_early(service):
    message = {"text": "Describe the image in one sentence.", "files": [str(EXAMPLES_DIR / EXAMPLES[1][0])]}
    updates, stopped = [], None
    for update in service.chat(message, [], settings("hybrid", (400.0, *GREEDY[1:])), [], session("stopper")):
        updates.append(named(service, update))
        turns = updates[-1].get("turns")
        if stopped is None and turns and turns[-1].role == "assistant" and turns[-1].text:
            stopped = named(service, service.stop(turns, session("stopper")))["chatbot"]
    assert stopped is not None and "stopped" in stopped[-1]["content"]
    history = last(updates, "history")
    assert history[-1]["finish"] == "cancelled"
    assert 0 < history[-1]["tokens"] < 400
    assert "stopped" in last(updates, "chatbot")[-1]["content"], "the streamed answer ends with the stopped mark"


def test_bad_input_raises_gr_error_and_the_next_request_works(service):
    with pytest.raises(gr.Error, match="temperature"):
        run_chat(service, {"text": "Hello!", "files": []}, sampling=(24.0, -1.0, 1.0, 0.0, 1.0, 0.0))
    with pytest.raises(gr.Error, match="prompt is empty"):
        run_chat(service, {"text": "  ", "files": []})
    with pytest.raises(gr.Error, match="GenAI route serves text only"):
        run_chat(service, {"text": "Hi", "files": [str(EXAMPLES_DIR / EXAMPLES[2][0])]}, route="genai")
    with pytest.raises(gr.Error, match="not a readable image"):
        run_chat(service, {"text": "Hi", "files": [__file__]})
    updates = run_chat(service, {"text": "Hello!", "files": []})
    assert last(updates, "latency")["route"].tolist() == ["genai"]


def test_generate_endpoint_returns_the_answer_and_per_route_results(service):
    image = str(EXAMPLES_DIR / EXAMPLES[0][0])
    text, results = service.generate("What shape is this?", image, "compare", 12, 0.0, 0, session())
    assert [r["route"] for r in results] == ["pytorch", "hybrid"]
    assert text == results[0]["text"] == results[1]["text"]
    assert results[1]["timings"]["vision_ms"] > 0 and results[1]["token_ids"]


CAT = '[{"bbox_2d": [100, 100, 500, 900], "label": "cat"}]'


def test_every_routes_boxes_are_drawn_on_the_latest_picture_in_its_colour():
    old, picture = Image.new("RGB", (50, 50), "black"), Image.new("RGB", (400, 200), "white")
    turns = [Question("Hi", images=(old,)), Reply("Hello"), Question("Find the cat.", images=(picture,))]
    runs = [RouteRun("pytorch", CAT), RouteRun("hybrid", CAT), RouteRun("genai", "No boxes here.")]
    figure = box_figure(runs, turns)
    drawn = np.asarray(figure.picture)
    assert drawn.shape == (200, 400, 3)
    assert tuple(drawn[100, 40]) == ROUTE_COLOURS["pytorch"]  # the left edge of the box, x = 100/1000 * 400
    assert (drawn == ROUTE_COLOURS["hybrid"]).all(axis=-1).any()
    assert not (drawn == ROUTE_COLOURS["genai"]).all(axis=-1).any()
    assert (
        "PyTorch reference: 1 box (cat)" in figure.text and "Hybrid ONNX" in figure.text and "GenAI" not in figure.text
    )
    answered = [*turns, Reply(CAT, route="pytorch"), figure]
    messages = to_request([*answered, Question("And the dog?")], SamplingConfig()).messages
    assert [m.text for m in messages[-2:]] == [CAT, "And the dog?"], "the picture with boxes is not part of the prompt"
    bubbles = to_chatbot(answered)
    assert isinstance(bubbles[-2]["content"], gr.Image) and "Where the model looked" in bubbles[-1]["content"]


@pytest.mark.parametrize("answer", ["A cat in the top left.", '[{"bbox_2d": [1, 2, 3', '{"bbox_2d": "x", "label": 1}'])
def test_answers_without_well_formed_boxes_stay_text(answer):
    assert box_figure([RouteRun("hybrid", answer)], [Question("Find it.", images=(Image.new("RGB", (9, 9)),))]) is None
    assert box_figure([RouteRun("hybrid", CAT)], [Question("Find it.")]) is None, "no picture to draw on"


@pytest.mark.slow
def test_the_demo_models_grounding_answer_is_drawn_under_it(demo_bundle):
    service = make_service(Pipeline.load(demo_bundle("fp32"), only=("hybrid",)))
    name, question = EXAMPLES[0]
    sampling = (160.0, *GREEDY[1:])  # room for three boxes
    turns = last(run_chat(service, {"text": question, "files": [str(EXAMPLES_DIR / name)]}, sampling=sampling), "turns")
    assert [t.role for t in turns] == ["user", "assistant", "assistant"]
    assert isinstance(turns[-1], Figure) and "Hybrid ONNX: 3 boxes" in turns[-1].text, turns[-2].text


def test_build_demo_names_the_endpoints_and_describes_the_model(pipeline):
    loaded = pipeline("base")
    demo = build_demo(loaded, describe(loaded))
    names = {fn.api_name for fn in demo.fns.values()}
    assert {"chat", "generate", "stop", "clear"} <= names
    chat = next(fn for fn in demo.fns.values() if fn.api_name == "chat")
    assert chat.concurrency_id == "cpu" and chat.concurrency_limit == 1


class FailingPipeline:
    """The test pipeline, except that each stream breaks after its first chunk."""

    def __init__(self, pipeline) -> None:
        self.inner, self.runtime, self.routes = pipeline, pipeline.runtime, pipeline.routes
        self.unavailable, self.sampling = pipeline.unavailable, pipeline.sampling
        self.opens_thinking, self.processor = pipeline.opens_thinking, pipeline.processor
        self.open_video, self.manifest = pipeline.open_video, pipeline.manifest

    def plan(self, request, route):
        return self.inner.plan(request, route)

    def stream(self, request, route, cancel=None):
        stream = self.inner.stream(request, route, cancel)
        yield next(stream)
        raise RouteError(f"the {route} route failed: RuntimeError: boom")


def test_a_route_failing_mid_answer_is_reported_and_marked(pipeline):
    service = make_service(FailingPipeline(pipeline("base")))
    updates = []
    with pytest.raises(gr.Error, match="boom"):
        for update in service.chat({"text": "Hello!", "files": []}, [], settings("hybrid", GREEDY), [], session("f")):
            updates.append(named(service, update))
    turns = last(updates, "turns")
    assert turns[-1].status == "hybrid · failed" and turns[-1].done


@pytest.mark.slow  # a bundle export of its own
def test_the_bundle_is_exported_once_then_reused_until_it_is_stale(checkpoint, tmp_path, caplog):
    source = tmp_path / "checkpoint"  # its own copy: the test changes it
    shutil.copytree(checkpoint("base"), source)
    bundle = tmp_path / "bundle"
    with caplog.at_level(logging.INFO, logger="hybrid"):
        assert ensure_bundle(source, bundle, "fp32") == bundle.resolve()
        assert "first start" in caplog.text and "[4/4]" in caplog.text, "the export shows its progress"
        assert "layer 3/3" in caplog.text, "a line per decoder layer"
        written = (bundle / "manifest.json").stat().st_mtime_ns
        assert ensure_bundle(source, bundle, "fp32") == bundle
    assert (bundle / "manifest.json").stat().st_mtime_ns == written
    assert stale_reason(bundle, str(source), "fp32") is None
    assert "made from" in stale_reason(bundle, "/elsewhere/model", "fp32")
    assert "not int4" in stale_reason(bundle, str(source), "int4")
    manifest = json.loads((bundle / "manifest.json").read_text())
    assert manifest["format"] == BUNDLE_FORMAT
    older = {**manifest, "format": BUNDLE_FORMAT - 1}  # made by an earlier version, with another layout
    (bundle / "manifest.json").write_text(json.dumps(older))
    assert "older layout" in stale_reason(bundle, str(source), "fp32")
    (bundle / "manifest.json").write_text(json.dumps(manifest))
    config = source / "config.json"
    config.write_text(config.read_text())  # the checkpoint changes (a new modification time)
    assert "checkpoint changed" in stale_reason(bundle, str(source), "fp32")
    (bundle / "manifest.json").write_text(json.dumps({**manifest, "fingerprint": checkpoint_fingerprint(source)}))
    assert stale_reason(bundle, str(source), "fp32") is None
    with open(bundle / "embed_tokens.npy", "ab") as f:
        f.write(b"x")
    assert "corrupted" in stale_reason(bundle, str(source), "fp32")


def test_a_folder_that_is_not_a_bundle_is_never_replaced(checkpoint, tmp_path):
    keep = tmp_path / "notes"
    keep.mkdir()
    (keep / "todo.txt").write_text("mine")
    with pytest.raises(UserError, match="not a bundle"):
        ensure_bundle(checkpoint("base"), keep, "fp32")
    assert (keep / "todo.txt").read_text() == "mine"


def test_the_header_says_plainly_what_the_model_is(pipeline):
    manifest = pipeline("base").manifest
    demo = describe_model(model_facts(replace(manifest, source=str(DEMO_MODEL))))
    assert demo.startswith("**Demo model**") and "synthetic pictures" in demo and "Qwen/Qwen3-VL-2B-Instruct" in demo
    tiny = describe_model(model_facts(replace(manifest, source=str(TINY_MODEL))))
    assert "random weights" in tiny and "python -m hybrid.demo train" in tiny
    other = describe_model(model_facts(replace(manifest, source="Qwen/Qwen3-VL-2B-Instruct")))
    assert other.startswith("**Qwen3-VL-2B-Instruct**") and "fp32" in other


def test_the_demo_models_header_words_its_own_eval_figures(pipeline):
    manifest = pipeline("base").manifest
    facts = model_facts(replace(manifest, source=str(DEMO_MODEL)))
    report = {
        "n": 300,
        "accuracy": {"shape": 0.97, "colour": 1.0, "position": 0.99, "count": 0.96},
        "boxes": {"n": 500, "hit_rate": 0.88},
        "first": {"count": 0.98, "shape": 0.98},
        "follow_up": {"count": 0.94, "shape": 0.96},
    }
    record = {"shape_sizes": [0.15, 0.45], "eval": {"hybrid-fp32-train-conversation": report}}
    text = describe_model(replace(facts, record=record))
    assert "shape 97% (chance 25%)" in text and "count 96%" in text and "300 fresh pictures" in text
    assert "88% of the boxes" in text and "Follow-up questions in one conversation: 95% right, against 98%" in text
    assert "15% to 45% of the picture's short side" in text
    assert "not recorded" in describe_model(replace(facts, record={})), "no figures: it says so, it does not guess"


def test_another_trained_demo_model_is_worded_from_its_own_record(pipeline, tmp_path):
    """A checkpoint `python -m hybrid.demo train` wrote (its training.json beside it) is a demo model
    wherever it lies: served in fp32 by default, its header from its own figures and folder."""
    manifest = pipeline("base").manifest
    (tmp_path / "training.json").write_text('{"eval": {"hybrid-fp32-train": {"n": 7, "accuracy": {"shape": 0.5}}}}')
    text = describe_model(model_facts(replace(manifest, source=str(tmp_path))))
    assert text.startswith(f"**Demo model** (`{tmp_path}`") and "7 fresh pictures" in text and "shape 50%" in text
    assert auto_precision(tmp_path) == "fp32" and auto_precision("Qwen/Qwen3-VL-2B-Instruct") == "int4"


def test_each_client_address_is_rate_limited_on_its_own(pipeline):
    limited = make_service(pipeline("base"), admission=Admission(RateLimiter(2, 60.0)))
    for _ in range(2):
        run_chat(limited, {"text": "Hello!", "files": []}, name="busy")
    with pytest.raises(gr.Error, match="too many requests"):
        run_chat(limited, {"text": "Hello!", "files": []}, name="busy")
    with pytest.raises(gr.Error, match="too many requests"):
        limited.generate("Hello!", None, "auto", 4, 0.0, 0, session("busy"))
    with pytest.raises(gr.Error, match="too many requests"):  # a new session from the same address
        limited.generate("Hello!", None, "auto", 4, 0.0, 0, session("fresh"))
    calm = chat_updates(limited, {"text": "Hello!", "files": []}, sampling=GREEDY, name="calm", host="10.0.0.2")
    assert last(calm, "latency")["route"].tolist() == ["genai"]


def test_the_app_refuses_to_start_when_no_route_can_load_and_names_the_file(bundle, tmp_path, caplog):
    broken = tmp_path / "bundle"
    shutil.copytree(bundle("base"), broken)
    (broken / "processor" / "tokenizer.json").write_bytes(b"garbage")  # every route reads the processor
    with caplog.at_level(logging.ERROR, logger="app"):
        assert app_main(["--bundle", str(broken)]) == 2
    assert "processor/tokenizer.json" in caplog.text


def test_every_route_has_a_label_and_a_colour():
    assert list(ROUTE_LABELS) == list(ROUTE_COLOURS) == list(ROUTE_NAMES)
    assert list(CHOICE_LABELS) == list(ROUTE_CHOICES)


def test_no_endpoint_takes_a_model_bundle_or_server_path(pipeline):
    """What a visitor can send: prompts, uploads and sampling values, nothing that names a file
    or folder of the server (uploads are checked by Gradio, see test_client)."""
    loaded = pipeline("base")
    info = build_demo(loaded, describe(loaded)).get_api_info()
    assert not info.get("unnamed_endpoints")
    allowed = {
        "prompt",
        "message",
        "image",
        "route",
        "max_new_tokens",
        "temperature",
        "top_p",
        "top_k",
        "repetition_penalty",
        "seed",
        "image_detail",
        "greedy",
    }
    for name, endpoint in info["named_endpoints"].items():
        params = {p["parameter_name"]: p["component"] for p in endpoint["parameters"]}
        assert set(params) <= allowed, (name, params)
        files = {k for k, v in params.items() if v in ("File", "Multimodaltextbox")}
        assert files <= {"image", "message"}, (name, params)


def test_an_answer_whose_tokens_spell_nothing_says_so():
    """A random-weight checkpoint can pick ids its tokenizer has no text for: the bubble would be
    empty, so its mark says why."""
    timings = Timings(1.0, 0.0, 2.0, 3.0, 5, 10.0, 4, 20.0, 9.0, 100.0)
    silent = RouteRun("hybrid", "", finish_reason="length", timings=timings)
    assert silent.status() == "hybrid · 20.0 tok/s · 4 tokens that spell no text · cut at max new tokens"
    assert "spell" not in RouteRun("hybrid", "A star.", finish_reason="stop", timings=timings).status()
