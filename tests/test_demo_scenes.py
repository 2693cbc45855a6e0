"""Unit tests of the demo's synthetic scenes, its question language and the grader (no model)."""

from __future__ import annotations

import numpy as np
import pytest

from hybrid.demo import scenes
from hybrid.demo.eval import eval_exchanges


def draw(seed: int, n: int) -> list[scenes.Scene]:
    rng = np.random.default_rng(seed)
    return [scenes.random_scene(rng) for _ in range(n)]


def test_same_seed_same_scenes_and_pixels():
    first, second = draw(7, 20), draw(7, 20)
    assert first == second
    assert first[0].render().tobytes() == second[0].render().tobytes()
    assert draw(8, 20) != first


def test_render_is_a_square_rgb_picture_with_the_shape_colour_where_it_belongs():
    scene = scenes.Scene("square", "red", "top left", 0.4, (255, 255, 255))
    image = scene.render()
    assert image.size == (scenes.IMAGE_SIZE, scenes.IMAGE_SIZE) and image.mode == "RGB"
    side = scenes.IMAGE_SIZE
    assert image.getpixel((int(0.27 * side), int(0.27 * side))) == scenes.COLOURS["red"]
    assert image.getpixel((int(0.73 * side), int(0.73 * side))) == (255, 255, 255)


def test_random_scenes_cover_every_value_and_keep_the_background_apart():
    drawn = draw(0, 600)
    assert {s.shape for s in drawn} == set(scenes.SHAPES)
    assert {s.colour for s in drawn} == set(scenes.COLOURS)
    assert {s.position for s in drawn} == set(scenes.POSITIONS)
    assert len({s.background for s in drawn}) > 100
    for s in drawn:
        assert np.linalg.norm(np.subtract(s.fill, s.background)) >= scenes.MIN_CONTRAST
        assert scenes.MIN_SIZE <= s.size <= scenes.MAX_SIZE


def test_bad_scene_values_are_rejected():
    with pytest.raises(ValueError):
        scenes.Scene("hexagon", "red", "centre", 0.3, (0, 0, 0))
    with pytest.raises(ValueError):
        scenes.Scene("circle", "red", "centre", 0.9, (0, 0, 0))


def test_eval_exchanges_are_deterministic_and_cover_all_kinds():
    exchanges = eval_exchanges(5, seed=3)
    assert exchanges == eval_exchanges(5, seed=3)
    assert {e.kind for e in exchanges} == set(scenes.KINDS)
    assert sum(e.kind == "shape" for e in exchanges) == 5
    assert sum(e.kind == "text" for e in exchanges) == len(scenes.FIXED_EXCHANGES) + 100


def test_every_phrasing_is_in_the_tokenizer_corpus():
    text = "\n".join(scenes.corpus())
    for questions in scenes.QUESTIONS.values():
        assert all(q in text for q in questions)
    assert all(e.question in text and e.answer in text for e in scenes.text_exchanges())


def test_answers_are_short_and_name_the_scene():
    scene = scenes.Scene("star", "purple", "bottom right", 0.3, (0, 0, 0))
    assert scenes.answer("shape", scene) == "A star."
    assert scenes.answer("colour", scene) == "Purple."
    assert scenes.answer("position", scene) == "In the bottom right."
    assert scenes.answer("describe", scene) == "A purple star in the bottom right."
    orange = scenes.Scene("circle", "orange", "centre", 0.3, (255, 255, 255))
    assert scenes.answer("describe", orange) == "An orange circle in the centre."


@pytest.mark.parametrize("kind", scenes.IMAGE_KINDS)
def test_grader_accepts_the_expected_answer_for_every_kind(kind):
    for scene in draw(1, 30):
        exchange = scenes.image_exchange(kind, scene, np.random.default_rng(0))
        assert scenes.grade(exchange, exchange.answer)


@pytest.mark.parametrize(
    ("kind", "reply", "ok"),
    [
        ("shape", "A circle.", True),
        ("shape", "It is a circle!", True),
        ("shape", "A square.", False),
        ("shape", "A circle or a square.", False),
        ("colour", "Red.", True),
        ("colour", "red", True),
        ("colour", "Orange.", False),
        ("colour", "Red and blue.", False),
        ("position", "In the top left.", True),
        ("position", "top-left", True),
        ("position", "In the top right.", False),
        ("position", "In the centre.", False),
        ("describe", "A red circle in the top left.", True),
        ("describe", "A red square in the top left.", False),
        ("describe", "A blue circle in the top left.", False),
        ("describe", "A red circle in the centre.", False),
        ("describe", "A red circle.", False),
    ],
)
def test_grader_checks_the_right_word_and_no_rival(kind, reply, ok):
    scene = scenes.Scene("circle", "red", "top left", 0.3, (255, 255, 255))
    exchange = scenes.Exchange(kind, "?", scenes.answer(kind, scene), scene)
    assert scenes.grade(exchange, reply) is ok


def test_centre_accepts_american_spelling():
    scene = scenes.Scene("circle", "red", "centre", 0.3, (255, 255, 255))
    assert scenes.grade(scenes.Exchange("position", "?", scenes.answer("position", scene), scene), "In the center.")


def test_text_grading_sums_and_fixed_replies():
    total = scenes.sum_exchange(3, 4)
    assert total.question == "What is 3 plus 4?" and total.answer == "7"
    assert scenes.grade(total, "7") and scenes.grade(total, "It is 7.")
    assert not scenes.grade(total, "8") and not scenes.grade(total, "7 or 17")
    greeting = scenes.Exchange("text", "Hello!", scenes.FIXED_EXCHANGES["Hello!"])
    assert scenes.grade(greeting, scenes.FIXED_EXCHANGES["Hello!"])
    assert not scenes.grade(greeting, "Hello!")


def test_image_question_without_scene_is_an_error():
    with pytest.raises(ValueError):
        scenes.grade(scenes.Exchange("shape", "What shape is this?", "A star."), "A star.")
