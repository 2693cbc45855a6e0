"""The image-detail budget: each picture becomes at most `max_image_tokens` image tokens (never
more than the checkpoint allows), large pictures are scaled down rather than refused, and the
CLI, the routes' timings and the page all carry it."""

from __future__ import annotations

import json
from dataclasses import replace

import gradio as gr
import numpy as np
import pytest
from PIL import Image

from hybrid.__main__ import main as cli_main
from hybrid.config import IMAGE_DETAIL
from hybrid.errors import UserError
from hybrid.images import open_image
from hybrid.processor import Processor
from hybrid.types import Message
from tests.conftest import draw_scene
from tests.helpers import ask, run
from tests.page import chat_updates, last, make_service

WIDE_MAX_TOKENS = 36  # the "wide" test checkpoint's own limit: 192 * 192 pixels / (16 * 2)^2


@pytest.fixture(scope="module")
def wide_processor(checkpoint) -> Processor:
    return Processor(checkpoint("wide"), max_context=4096)


@pytest.fixture(scope="module")
def large_picture(tmp_path_factory) -> str:
    """A 24-megapixel photo-like JPEG: under the 50 MP decompression limit, far over any budget."""
    rng = np.random.default_rng(0)
    path = tmp_path_factory.mktemp("large") / "large.jpg"
    small = rng.integers(0, 255, (40, 60, 3), dtype=np.uint8)
    Image.fromarray(small).resize((6000, 4000)).save(path, quality=80)
    return str(path)


@pytest.mark.parametrize("budget", [4, 9, 20])
def test_the_budget_caps_each_pictures_tokens(wide_processor, budget):
    messages = (Message("user", "Compare.", (draw_scene((400, 300), (200, 0, 0)), draw_scene((90, 300), (0, 0, 200)))),)
    full = wide_processor.prepare(messages, max_image_tokens=1024)
    capped = wide_processor.prepare(messages, max_image_tokens=budget)
    assert all(WIDE_MAX_TOKENS // 2 < n <= WIDE_MAX_TOKENS for n in full.image_tokens[:1]), full.image_tokens
    assert all(n <= budget for n in capped.image_tokens) and capped.image_tokens[0] < full.image_tokens[0]
    assert capped.image_tokens[0] >= budget // 4, "scaled to the budget, not far below it"
    merged = capped.image_grid_thw.prod(-1) // 4
    assert capped.image_tokens == tuple(merged.tolist())
    assert sum(capped.image_tokens) == int((capped.input_ids == wide_processor.image_token_id).sum())


def test_detail_levels_as_pixel_limits(wide_processor):
    per_token = (16 * 2) ** 2
    assert wide_processor.image_size(2) == {"shortest_edge": per_token, "longest_edge": 2 * per_token}
    assert wide_processor.image_size(IMAGE_DETAIL["low"])["longest_edge"] == WIDE_MAX_TOKENS * per_token
    assert list(IMAGE_DETAIL.values()) == sorted(IMAGE_DETAIL.values())
    with pytest.raises(UserError, match="max_image_tokens"):
        replace(ask("Hi"), max_image_tokens=0)


def test_a_large_picture_is_scaled_not_refused(pipeline, large_picture):
    pipe = pipeline("base")
    image = open_image(large_picture)
    assert image.size == (6000, 4000)
    request = replace(ask("What is this?", [image], max_new_tokens=4), max_image_tokens=6)
    result = run(pipe, request, "hybrid")
    assert result["finish_reason"] == "length"
    assert 0 < result["timings"]["image_tokens"][0] <= 6
    assert result["token_ids"] == run(pipe, request, "pytorch")["token_ids"]


def test_cli_takes_max_image_tokens(bundle, large_picture, capsys):
    argv = [
        "generate",
        "--bundle",
        str(bundle("base")),
        "--prompt",
        "What is this?",
        "--image",
        large_picture,
        "--route",
        "hybrid",
        "--max-new-tokens",
        "3",
        "--json",
    ]
    assert cli_main([*argv, "--max-image-tokens", "2"]) == 0
    assert cli_main(argv) == 0
    low, default = (json.loads(line) for line in capsys.readouterr().out.strip().splitlines())
    assert low["timings"]["image_tokens"][0] <= 2 < default["timings"]["image_tokens"][0]
    assert cli_main([*argv, "--max-image-tokens", "0"]) == 2
    assert "max_image_tokens must be >= 1" in capsys.readouterr().err


def test_page_shows_each_pictures_tokens_and_refuses_an_unknown_detail(pipeline, large_picture):
    service = make_service(pipeline("base"))
    message = {"text": "What is this?", "files": [large_picture, large_picture]}
    greedy = (4.0, 0.0, 1.0, 0.0, 1.0, 0.0)
    updates = chat_updates(service, message, route="hybrid", sampling=greedy, name="detail", detail="low")
    tokens = last(updates, "latency")["image tokens"].iloc[0].split(", ")
    assert len(tokens) == 2 and tokens[0] == tokens[1] and int(tokens[0]) > 0
    with pytest.raises(gr.Error, match="image detail"):
        chat_updates(service, message, route="hybrid", sampling=greedy, name="detail", detail="extreme")
