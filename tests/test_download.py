"""The conversation download: the page's button gets a JSON file of the messages, the route and
timings of each answer, kept current by chat, undo, stop and Clear."""

from __future__ import annotations

import json
from pathlib import Path

import gradio as gr
import pytest

from tests.page import chat_updates, last, make_service, named, session
from web.page import EXAMPLES, EXAMPLES_DIR
from web.view import Figure, Question, Reply, Turn, conversation_record

# max_new_tokens, temperature, top_p, top_k, repetition_penalty, seed (as the sliders send them)
GREEDY = (8.0, 0.0, 1.0, 0.0, 1.0, 0.0)


@pytest.fixture(scope="module")
def service(pipeline):
    return make_service(pipeline("base"))


def converse(service, name: str, route: str = "auto") -> tuple[list[Turn], str]:
    """A question about an example picture, then a text follow-up: the turns and the download."""
    picture = str(EXAMPLES_DIR / EXAMPLES[0][0])
    turns: list[Turn] = []
    for message in ({"text": "What shape is this?", "files": [picture]}, {"text": "And its colour?", "files": []}):
        updates = chat_updates(service, message, turns, route, GREEDY, name=name)
        turns = last(updates, "turns")
    return turns, last(updates, "download")


def test_the_download_holds_messages_routes_and_timings(service):
    turns, path = converse(service, "dl")
    record = json.loads(Path(path).read_text())
    assert Path(path).name == "conversation.json"
    assert record["model"] == "ckpt-base" and record["precision"] == "fp32"
    roles = [m["role"] for m in record["messages"]]
    assert roles == ["user", "assistant", "user", "assistant"]
    first, answer = record["messages"][:2]
    assert first == {"role": "user", "text": "What shape is this?", "files": [EXAMPLES[0][0]]}, "names, no folders"
    assert (
        answer["route"] == "hybrid" and answer["text"] == turns[1].text and answer["finish_reason"] in ("eos", "length")
    )
    assert answer["timings"]["ttft_ms"] > 0 and answer["timings"]["decode_tokens"] > 0
    assert record["messages"][3]["route"] == "hybrid", "the conversation has a picture: the follow-up too"


def test_compare_keeps_every_routes_answer(service):
    updates = chat_updates(service, {"text": "Hello!", "files": []}, [], "compare", GREEDY, name="dl-compare")
    record = json.loads(Path(last(updates, "download")).read_text())
    assert [m.get("route") for m in record["messages"]] == [None, "pytorch", "hybrid", "genai"]


def test_undo_stop_and_clear_keep_the_download_current(service):
    turns, path = converse(service, "dl-edit")
    undone = named(service, service.undo(gr.UndoData(None, {"index": 2, "value": ""}), turns, session("dl-edit")))
    assert len(json.loads(Path(undone["download"]).read_text())["messages"]) == 2
    unfinished = [*turns[:2], Reply("Half an ans", route="hybrid", done=False)]
    stopped = named(service, service.stop(unfinished, session("dl-edit")))
    assert json.loads(Path(stopped["download"]).read_text())["messages"][-1]["text"] == "Half an ans"
    cleared = named(service, service.clear(session("dl-edit")))
    assert cleared["download"] is None and not Path(path).exists(), "Clear drops the file"


def test_the_record_leaves_out_the_pictures_with_boxes():
    figure = Figure("Where the model looked: ...", picture=object())
    turns = [Question("Find it.", paths=("/srv/uploads/a/cat.png",)), Reply("[]", route="genai"), figure]
    record = conversation_record(turns, "m")
    assert record["messages"] == [
        {"role": "user", "text": "Find it.", "files": ["cat.png"]},
        {"role": "assistant", "route": "genai", "text": "[]", "thinking": None, "finish_reason": None, "timings": None},
    ]
