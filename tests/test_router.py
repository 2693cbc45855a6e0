"""The router's choices, and conversations that mix image and text turns."""

from __future__ import annotations

import pytest

from hybrid.errors import RouteError, UserError
from hybrid.router import choose_routes
from hybrid.types import Message
from tests.conftest import draw_scene
from tests.helpers import ask, run

ALL = ("hybrid", "pytorch", "genai")
IMAGE = draw_scene((96, 96), (200, 30, 30))


@pytest.mark.parametrize(
    "route, images, expected",
    [
        ("auto", [IMAGE], ("hybrid",)),
        ("auto", [], ("genai",)),
        ("hybrid", [], ("hybrid",)),
        ("pytorch", [IMAGE], ("pytorch",)),
        ("compare", [IMAGE], ("pytorch", "hybrid")),
        ("compare", [], ("pytorch", "hybrid", "genai")),
    ],
)
def test_choices(route, images, expected):
    assert choose_routes(ask("hi", images), route, ALL) == expected


def test_genai_refuses_images():
    with pytest.raises(RouteError, match="text only"):
        choose_routes(ask("hi", [IMAGE]), "genai", ALL)


def test_unknown_route_and_missing_genai():
    with pytest.raises(UserError):
        choose_routes(ask("hi"), "fastest", ALL)
    assert choose_routes(ask("hi"), "auto", ("hybrid", "pytorch")) == ("hybrid",)
    with pytest.raises(RouteError):
        choose_routes(ask("hi"), "genai", ("hybrid", "pytorch"))


def test_follow_up_after_an_image_stays_on_hybrid_and_the_image_still_counts(pipeline):
    pipe = pipeline("base")
    history = (Message("user", "What is this?", (IMAGE,)), Message("assistant", "A red circle."))
    request = ask("And where is it?", history=history)
    assert pipe.plan(request, "auto") == ("hybrid",)
    with_image = run(pipe, request, "hybrid")
    assert with_image["token_ids"] == run(pipe, request, "pytorch")["token_ids"]
    other_image = (Message("user", "What is this?", (draw_scene((96, 96), (30, 30, 200)),)), history[1])
    assert run(pipe, ask("And where is it?", history=other_image), "hybrid")["token_ids"] != with_image["token_ids"]


def test_compare_runs_every_route_that_can_serve(pipeline):
    pipe = pipeline("base")
    request = ask("Hello!")
    results = {r: run(pipe, request, r) for r in pipe.plan(request, "compare")}
    assert set(results) == {"pytorch", "hybrid", "genai"}
    assert len({tuple(r["token_ids"]) for r in results.values()}) == 1
