"""The hybrid route gives exactly the PyTorch route's greedy tokens, and the test has teeth."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest

from hybrid.vision import VisionFeatures
from tests.conftest import draw_scene
from tests.helpers import NEW_TOKENS, ask, hybrid_logits, reference_logits, run

LONG_TEXT = " ".join(["Describe the picture in detail, every shape and colour, then count to ten."] * 12)

CASES = {
    "one image": ("base", lambda: ask("What is in this picture?", [draw_scene((96, 96), (200, 30, 30))])),
    "two images": (
        "base",
        lambda: ask(
            "Compare these two pictures.",
            [draw_scene((96, 96), (200, 30, 30)), draw_scene((64, 128), (30, 30, 200), (0.2, 0.5, 0.9, 0.9))],
        ),
    ),
    "non-square, 3 DeepStack layers": (
        "wide",
        lambda: ask("Where is the shape?", [draw_scene((192, 64), (30, 160, 30), (0.6, 0.1, 0.9, 0.9))]),
    ),
    "long text after the image": ("base", lambda: ask(LONG_TEXT, [draw_scene((96, 64), (200, 200, 30))])),
    "text only": ("base", lambda: ask("Hello! What is 3 plus 4?")),
    "text only, wide": ("wide", lambda: ask("The quick brown fox jumps over the lazy dog.")),
}


@pytest.mark.parametrize("case", list(CASES))
def test_hybrid_tokens_equal_pytorch(pipeline, case):
    model_name, make_request = CASES[case]
    pipe = pipeline(model_name)
    request = make_request()
    ours = run(pipe, request, "hybrid")
    reference = run(pipe, request, "pytorch")
    assert len(set(reference["token_ids"])) > NEW_TOKENS // 3, "greedy output should be varied"
    assert ours["token_ids"] == reference["token_ids"]
    assert ours["text"] == reference["text"]
    assert ours["finish_reason"] == reference["finish_reason"]


@pytest.mark.parametrize("case", ["one image", "two images", "non-square, 3 DeepStack layers", "text only"])
def test_per_step_logits_agree(pipeline, case):
    model_name, make_request = CASES[case]
    pipe = pipeline(model_name)
    request = make_request()
    generated = run(pipe, request, "pytorch")["token_ids"]
    route = pipe.routes["hybrid"]
    inputs = route.processor.prepare(request.messages)
    ours = hybrid_logits(route, inputs, generated)
    reference = reference_logits(pipe.routes["pytorch"].model, inputs, generated)
    assert ours.shape == reference.shape == (len(generated), reference.shape[1])
    np.testing.assert_allclose(ours, reference, atol=1e-3, rtol=0)


def _tokens_with_features(pipe, request, transform) -> list[int]:
    route = pipe.routes["hybrid"]
    original = route.encode

    def encode(inputs, kind):  # each kind's features, transformed where the prompt has some
        features = original(inputs, kind)
        return None if features is None else transform(features)

    route.encode = encode
    try:
        return run(pipe, request, "hybrid")["token_ids"]
    finally:
        route.encode = original


def test_dropping_deepstack_changes_tokens(pipeline):
    pipe = pipeline("base")
    request = CASES["one image"][1]()
    reference = run(pipe, request, "pytorch")["token_ids"]
    no_deepstack = _tokens_with_features(
        pipe, request, lambda f: dataclasses.replace(f, deepstack_embeds=np.zeros_like(f.deepstack_embeds))
    )
    assert no_deepstack != reference


def test_image_features_in_wrong_order_change_tokens(pipeline):
    pipe = pipeline("base")
    request = CASES["two images"][1]()
    reference = run(pipe, request, "pytorch")["token_ids"]

    def swap(f: VisionFeatures) -> VisionFeatures:
        n = f.image_embeds.shape[0]
        order = np.roll(np.arange(n), n // 2)  # the second image's features first
        return VisionFeatures(f.image_embeds[order], f.deepstack_embeds[:, order])

    assert _tokens_with_features(pipe, request, swap) != reference
