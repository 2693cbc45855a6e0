"""Unit tests of the demo's synthetic scenes, its question language and the grader (no model)."""

from __future__ import annotations

import json

import numpy as np
import pytest

from hybrid.demo import scenes
from hybrid.demo.eval import eval_exchanges

WHITE = scenes.Background("light", (255, 255, 255), (0, 0, 0))


def draw(seed: int, n: int, style: str = scenes.TRAIN) -> list[scenes.Scene]:
    rng = np.random.default_rng(seed)
    return [scenes.random_scene(rng, style) for _ in range(n)]


def item(shape="circle", colour="red", x=0.25, y=0.25, size=0.3) -> scenes.Item:
    return scenes.Item(shape, colour, scenes.COLOURS[colour], x, y, size)


def scene_of(*items: scenes.Item, width=400, height=300) -> scenes.Scene:
    return scenes.Scene(width, height, WHITE, tuple(items))


def test_same_seed_same_scenes_and_pixels():
    first, second = draw(7, 10), draw(7, 10)
    assert first == second
    assert first[0].render().tobytes() == second[0].render().tobytes()
    assert draw(8, 10) != first


def test_render_is_an_rgb_jpeg_picture_with_each_shape_where_it_belongs():
    scene = scene_of(item("square", "red", 0.25, 0.25), item("circle", "blue", 0.75, 0.75))
    image = scene.render()
    assert image.size == (400, 300) and image.mode == "RGB"
    for shape in scene.items:
        pixel = image.getpixel((int(shape.x * 400), int(shape.y * 300)))
        assert np.abs(np.subtract(pixel, shape.fill)).max() < 30, "JPEG moves a flat colour only a little"
    assert np.abs(np.subtract(image.getpixel((200, 10)), (255, 255, 255))).max() < 12


def test_the_place_is_the_region_the_centre_falls_in():
    assert scenes.place_of(0.1, 0.1) == "top left" and scenes.place_of(0.9, 0.1) == "top right"
    assert scenes.place_of(0.1, 0.9) == "bottom left" and scenes.place_of(0.9, 0.9) == "bottom right"
    assert scenes.place_of(0.5, 0.5) == scenes.place_of(0.32, 0.68) == "centre"
    assert scenes.place_of(0.25, 0.5) == "bottom left", "outside the centre box the quadrant decides"
    assert not scenes.clear_of_borders(0.5, 0.1) and not scenes.clear_of_borders(0.3, 0.5)
    assert scenes.clear_of_borders(0.2, 0.2) and scenes.clear_of_borders(0.5, 0.5)


def test_random_scenes_cover_the_ranges_of_uploads():
    drawn = draw(0, 300)
    items = [i for s in drawn for i in s.items]
    assert {i.shape for i in items} == set(scenes.SHAPES)
    assert {i.colour for i in items} == set(scenes.COLOURS)
    assert {i.position for i in items} == set(scenes.POSITIONS)
    assert {s.background.kind for s in drawn} == set(scenes.BACKGROUNDS)
    assert {len(s.items) for s in drawn} == {1, 2, 3}
    long_sides = [max(s.width, s.height) for s in drawn]
    aspects = [s.width / s.height for s in drawn]
    assert scenes.MIN_LONG <= min(long_sides) < 400 and 900 < max(long_sides) <= scenes.MAX_LONG
    assert 9 / 16 - 0.01 <= min(aspects) < 0.7 and 1.5 < max(aspects) <= 16 / 9 + 0.01
    sizes = [i.size for i in items]
    assert scenes.MIN_SIZE <= min(sizes) < scenes.MIN_SIZE + 0.02 and 0.4 < max(sizes) <= scenes.MAX_SIZE
    assert len({s.quality for s in drawn}) > 20


def test_every_scene_has_one_right_answer_per_question():
    for scene in draw(1, 200):
        assert len({i.label for i in scene.items}) == len(scene.items)
        for shape in scene.items:
            assert scenes.clear_of_borders(shape.x, shape.y)
            x1, y1, x2, y2 = shape.box(scene.width, scene.height)
            assert 0 <= x1 < x2 <= scene.width and 0 <= y1 < y2 <= scene.height
            for colour in scene.background.colours():
                assert np.linalg.norm(np.subtract(shape.fill, colour)) >= scenes.MIN_CONTRAST


def test_the_held_out_style_draws_at_the_edges_of_the_ranges():
    drawn = draw(2, 60, scenes.EDGE)
    assert {s.background.kind for s in drawn} == set(scenes.EDGE_BACKGROUNDS)
    assert not set(scenes.EDGE_BACKGROUNDS) & set(scenes.BACKGROUNDS)
    assert {round(s.width / s.height, 2) for s in drawn} <= {0.56, 1.0, 1.78}
    for shape in (i for s in drawn for i in s.items):
        assert any(low <= shape.size <= high for low, high in scenes.EDGE_SIZES)
    assert max(s.quality for s in drawn) < 45
    assert drawn[0].render().size == (drawn[0].width, drawn[0].height)


def test_bad_scene_values_are_rejected():
    with pytest.raises(ValueError):
        item("hexagon")
    with pytest.raises(ValueError):
        item(size=0.9)
    with pytest.raises(ValueError):
        scene_of(item(), item(x=0.75))  # two red circles
    with pytest.raises(ValueError):
        scene_of(*(item(s) for s in scenes.SHAPES))  # four shapes


def test_answers_name_the_scene():
    one = scene_of(item("star", "purple", 0.8, 0.8))
    rng = np.random.default_rng(0)
    assert scenes.ask("shape", one, rng).answer == "A star."
    assert scenes.ask("colour", one, rng).answer == "Purple."
    assert scenes.ask("position", one, rng).answer == "In the bottom right."
    assert scenes.ask("count", one, rng).answer == "One shape."
    three = scene_of(
        item("star", "purple", 0.8, 0.8), item("circle", "orange", 0.5, 0.5), item("star", "red", 0.1, 0.1)
    )
    assert scenes.ask("describe", three, rng).answer == (
        "A red star in the top left, an orange circle in the centre and a purple star in the bottom right."
    )
    assert scenes.ask("count", three, rng).answer == "Three shapes."
    assert scenes.askable("colour_of", three) == [three.items[1]], "only the circle is the only one of its shape"
    assert scenes.askable("shape", three) == []
    found = json.loads(scenes.ask("locate_all", three, rng).answer)
    assert [f["label"] for f in found] == ["red star", "orange circle", "purple star"]
    assert found[1]["bbox_2d"] == [388, 350, 612, 650]  # a circle of radius 45 px at (200, 150) in 400x300


@pytest.mark.parametrize("kind", scenes.IMAGE_KINDS)
def test_grader_accepts_the_expected_answer_for_every_kind(kind):
    rng = np.random.default_rng(0)
    for scene in draw(1, 40):
        if scenes.askable(kind, scene):
            exchange = scenes.ask(kind, scene, rng)
            assert scenes.grade(exchange, exchange.answer), exchange


SINGLE = scene_of(item("circle", "red", 0.25, 0.25))
PAIR = scene_of(item("circle", "red", 0.25, 0.25), item("star", "blue", 0.75, 0.75))


@pytest.mark.parametrize(
    ("kind", "reply", "ok"),
    [
        ("shape", "A circle.", True),
        ("shape", "It is a circle!", True),
        ("shape", "A square.", False),
        ("shape", "A circle or a square.", False),
        ("colour", "Red.", True),
        ("colour", "Orange.", False),
        ("colour", "Red and blue.", False),
        ("position", "In the top left.", True),
        ("position", "top-left", True),
        ("position", "In the top right.", False),
        ("count", "One shape.", True),
        ("count", "1", True),
        ("count", "Two shapes.", False),
        ("count", "One or two.", False),
        ("describe", "A red circle in the top left.", True),
        ("describe", "A red square in the top left.", False),
        ("describe", "A red circle in the top left and a blue star in the centre.", False),
        ("describe", "A red circle.", False),
    ],
)
def test_grader_checks_the_right_word_and_no_rival(kind, reply, ok):
    exchange = scenes.Exchange(kind, "?", "", SINGLE)
    assert scenes.grade(exchange, reply) is ok


def test_grounding_is_graded_by_label_and_overlap():
    blue = PAIR.items[1]
    find = scenes.Exchange("find", "Find the blue star.", scenes.grounding(PAIR, (blue,)), PAIR, blue)
    x1, y1, x2, y2 = PAIR.box_2d(blue)
    assert scenes.grade(find, find.answer)
    shifted = json.dumps([{"bbox_2d": [x1 + 15, y1 + 15, x2 + 15, y2 + 15], "label": "blue star"}])
    assert scenes.grade(find, shifted), "a box a little off still overlaps enough"
    far = json.dumps([{"bbox_2d": [0, 0, 100, 100], "label": "blue star"}])
    assert not scenes.grade(find, far) and scenes.box_ious(find, far) == [0.0]
    relabelled = find.answer.replace("blue star", "red star")
    assert not scenes.grade(find, relabelled) and scenes.box_ious(find, relabelled) == [0.0]
    assert scenes.box_ious(find, relabelled, by_label=False) == [1.0], "the place is right, whatever the label"
    assert not scenes.grade(find, "In the bottom right.")
    every = scenes.Exchange("locate_all", "Locate every shape.", scenes.grounding(PAIR, PAIR.ordered), PAIR)
    assert scenes.grade(every, every.answer)
    assert not scenes.grade(every, find.answer), "one box of two"
    assert scenes.box_ious(every, find.answer) == [0.0, 1.0]


def test_centre_accepts_american_spelling():
    centre = scene_of(item(x=0.5, y=0.5))
    assert scenes.grade(scenes.Exchange("position", "?", "", centre), "In the center.")


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


def test_eval_exchanges_are_deterministic_and_cover_all_kinds():
    exchanges = eval_exchanges(6, seed=3)
    assert exchanges == eval_exchanges(6, seed=3)
    assert {e.kind for e in exchanges} == set(scenes.KINDS)
    assert sum(e.kind == "count" for e in exchanges) == 6
    assert sum(e.kind == "shape" for e in exchanges) == 2, "single-shape questions only for one-shape scenes"
    assert sum(e.kind == "text" for e in exchanges) == len(scenes.FIXED_EXCHANGES) + 100
    held_out = eval_exchanges(3, seed=3, style=scenes.EDGE, text=False)
    assert {e.scene.style for e in held_out} == {scenes.EDGE}


def test_every_phrasing_is_in_the_tokenizer_corpus():
    text = "\n".join(scenes.corpus())
    for kind, questions in scenes.QUESTIONS.items():
        assert all(q.format(shape="star", label="red star") in text for q in questions), kind
    assert all(e.question in text and e.answer in text for e in scenes.text_exchanges())
    assert '"bbox_2d": [' in text
