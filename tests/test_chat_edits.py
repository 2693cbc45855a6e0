"""Retry, undo and edit in the chat: each acts on a question and drops what followed it."""

from __future__ import annotations

import gradio as gr
import pytest

from tests.page import last, make_service, named, session, settings
from web.page import EXAMPLES, EXAMPLES_DIR
from web.view import to_chatbot, turn_of_bubble

# the route, and max_new_tokens, temperature, top_p, top_k, repetition_penalty, seed (as the controls send them)
CONTROLS = ("hybrid", (12.0, 0.0, 1.0, 0.0, 1.0, 0.0))


@pytest.fixture(scope="module")
def service(pipeline):
    return make_service(pipeline("base"))


def converse(service, name: str) -> list:
    """Two questions about an example picture, answered greedily: the conversation's turns."""
    picture = str(EXAMPLES_DIR / EXAMPLES[0][0])
    turns: list = []
    for message in ({"text": "What shape is this?", "files": [picture]}, {"text": "And its colour?", "files": []}):
        updates = [named(service, u) for u in service.chat(message, turns, settings(*CONTROLS), [], session(name))]
        turns = last(updates, "turns")
    return turns


def bubble_of(turns: list, turn: int) -> int:
    return next(i for i in range(len(to_chatbot(turns))) if turn_of_bubble(turns, i) == turn)


def handler_updates(service, handler, data, turns, name: str) -> list:
    return [named(service, u) for u in handler(data, turns, settings(*CONTROLS), [], session(name))]


def test_retry_answers_the_question_again_and_drops_what_followed(service):
    turns = converse(service, "retry")
    first_question = bubble_of(turns, 0)
    updates = handler_updates(
        service, service.retry, gr.RetryData(None, {"index": first_question, "value": ""}), turns, "retry"
    )
    again = last(updates, "turns")
    assert [t.role for t in again] == ["user", "assistant"]
    assert again[0] == turns[0] and again[1].text == turns[1].text  # greedy: the same answer
    last_question = bubble_of(turns, 2)
    updates = handler_updates(
        service, service.retry, gr.RetryData(None, {"index": last_question, "value": ""}), turns, "retry"
    )
    assert [t.text for t in last(updates, "turns")[:3]] == [t.text for t in turns[:3]]


def test_edit_asks_the_new_question_with_the_same_pictures(service):
    turns = converse(service, "edit")
    data = gr.EditData(
        None, {"index": bubble_of(turns, 0), "value": "How many shapes are there?", "previous_value": ""}
    )
    edited = last(handler_updates(service, service.edit, data, turns, "edit"), "turns")
    assert [t.role for t in edited] == ["user", "assistant"]
    assert edited[0].text == "How many shapes are there?" and edited[0].paths == turns[0].paths
    assert edited[1].done and edited[1].text


def test_undo_takes_the_question_back_into_the_textbox(service):
    turns = converse(service, "undo")
    update = named(
        service, service.undo(gr.UndoData(None, {"index": bubble_of(turns, 2), "value": ""}), turns, session("undo"))
    )
    assert update["turns"] == turns[:2]
    assert update["prompt"] == {"text": "And its colour?", "files": []}


def test_an_answer_is_not_a_question(service):
    turns = converse(service, "answer")
    with pytest.raises(gr.Error, match="Pick a question"):
        service.undo(gr.UndoData(None, {"index": bubble_of(turns, 1), "value": ""}), turns, session("answer"))
    with pytest.raises(gr.Error, match="no longer"):
        service.undo(gr.UndoData(None, {"index": 99, "value": ""}), turns, session("answer"))
