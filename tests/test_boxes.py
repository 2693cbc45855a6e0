"""Qwen3-VL grounding answers: the box parser on good, partial and malformed replies, and drawing."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from hybrid.boxes import Box, draw_boxes, iou, parse_boxes

QWEN_STYLE = """```json
[
	{"bbox_2d": [120, 40, 480, 610], "label": "red circle"},
	{"bbox_2d": [600, 500, 900, 950], "label": "blue star"}
]
```"""


def test_a_qwen3_vl_answer_in_a_json_fence_gives_every_box_in_order():
    assert parse_boxes(QWEN_STYLE) == [
        Box("red circle", (120.0, 40.0, 480.0, 610.0)),
        Box("blue star", (600.0, 500.0, 900.0, 950.0)),
    ]


def test_points_prose_around_the_list_and_swapped_corners_are_accepted():
    reply = 'Here: [{"point_2d": [500, 250], "label": "cat"}, {"bbox_2d": [700, 800, 100, 200], "label": 7}] done.'
    assert parse_boxes(reply) == [Box("cat", None, (500.0, 250.0)), Box("7", (100.0, 200.0, 700.0, 800.0))]


@pytest.mark.parametrize(
    "reply",
    [
        "",
        "A red circle in the top left.",
        "[]",
        '[{"bbox_2d": [1, 2, 3], "label": "short"}]',
        '[{"bbox_2d": ["a", 2, 3, 4], "label": "text"}]',
        '[{"bbox_2d": [1, 2, 3, true], "label": "bool"}]',
        '[{"label": "no coordinates"}]',
        '[{"bbox_2d": [1, 2, 3, 4], "label": "cut',
        '{"bbox_2d": [1, 2, 3, 4] "label": "no comma"}',
        '[{"bbox_2d": [1e400, 2, 3, 4], "label": "huge"}]',
        "{{{{[[[[",
    ],
)
def test_malformed_or_partial_answers_give_no_box_and_no_error(reply):
    assert parse_boxes(reply) == []


def test_a_list_cut_short_keeps_its_complete_objects():
    reply = '[{"bbox_2d": [10, 20, 30, 40], "label": "red square"}, {"bbox_2d": [50, 60, 7'
    assert parse_boxes(reply) == [Box("red square", (10.0, 20.0, 30.0, 40.0))]


def test_coordinates_are_clipped_to_the_0_1000_scale():
    assert parse_boxes('{"bbox_2d": [-50, 10, 1200, 990], "label": "x"}')[0].bbox == (0.0, 10.0, 1000.0, 990.0)


def test_iou():
    assert iou((0, 0, 10, 10), (0, 0, 10, 10)) == 1.0
    assert iou((0, 0, 10, 10), (20, 20, 30, 30)) == 0.0
    assert iou((0, 0, 10, 10), (5, 0, 15, 10)) == pytest.approx(50 / 150)


def test_boxes_are_drawn_where_the_scale_says_in_each_groups_colour():
    image = Image.new("RGB", (400, 200), (255, 255, 255))
    boxes = [Box("", (250, 250, 750, 750))]  # pixels 100..300 x 50..150
    drawn = np.asarray(draw_boxes(image, [(boxes, (255, 0, 0)), (boxes, (0, 0, 255))]))
    assert tuple(drawn[100, 100]) == (255, 0, 0)  # the first group on the box's left edge
    red = np.all(drawn == (255, 0, 0), axis=-1)
    blue = np.all(drawn == (0, 0, 255), axis=-1)
    assert blue.any() and not blue[:, :100].any(), "the second group is drawn just inside the first"
    assert not red[:, 310:].any() and not red[:40].any(), "nothing drawn outside the box"
    assert tuple(drawn[100, 200]) == (255, 255, 255), "boxes are outlines"
    assert image.getpixel((100, 100)) == (255, 255, 255), "the original picture is left alone"


def test_labels_and_points_are_drawn():
    image = Image.new("RGB", (300, 300), (255, 255, 255))
    drawn = np.asarray(
        draw_boxes(image, [([Box("dog", None, (500, 500)), Box("cat", (100, 500, 300, 900))], (0, 128, 0))])
    )
    assert tuple(drawn[150, 150]) == (0, 128, 0), "a point is a filled dot"
    assert np.all(drawn[130:148, 30:60] == (255, 255, 255), axis=-1).sum() < 18 * 30, "a label sits above the box"
