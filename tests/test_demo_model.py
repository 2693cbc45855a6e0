"""The shipped demo model really sees: graded on 300 scenes from a seed training never used, through
every route and precision, and blind once its image features are blanked."""

from __future__ import annotations

import numpy as np
import pytest
from transformers import AutoProcessor

from hybrid.demo import scenes
from hybrid.demo.chat import chat_prompt
from hybrid.demo.eval import evaluate, pipeline_answerer, route_exchanges, zero_image_features
from hybrid.launch import DEMO_MODEL
from hybrid.pipeline import Pipeline
from hybrid.types import Message, Request

EVAL_SEED = 1234  # training draws its scenes from seed 0
SCENES = 300
FLOOR = {"shape": 0.95, "colour": 0.95, "position": 0.90}
CHANCE_CEILING = {"shape": 0.45, "colour": 0.35}  # chance: 1/4 shapes, 1/6 colours


def grade(bundle, route: str, n: int = SCENES, blind: bool = False):
    pipeline = Pipeline.load(bundle, verify=False, only=(route,))
    if blind:
        zero_image_features(pipeline, route)
    return evaluate(pipeline_answerer(pipeline, route), route_exchanges(route, n, EVAL_SEED))


def accuracy(report) -> dict[str, float]:
    return {kind: score.accuracy for kind, score in report.asked.items()}


@pytest.mark.parametrize("route,precision", [("hybrid", "fp32"), ("pytorch", "fp32"), ("hybrid", "int4")])
def test_image_questions_are_answered_through_the_route(demo_bundle, route, precision):
    report = grade(demo_bundle(precision), route)
    scores = accuracy(report)
    print(route, precision, report.table(), sep="\n")
    assert all(scores[kind] >= floor for kind, floor in FLOOR.items()), scores
    assert scores["text"] == 1.0, report.to_json()["failures"]


@pytest.mark.parametrize("precision", ["fp32", "int4"])
def test_text_exchanges_are_answered_through_genai(demo_bundle, precision):
    report = grade(demo_bundle(precision), "genai")
    assert set(report.asked) == {"text"}
    assert report.asked["text"].total == len(scenes.FIXED_EXCHANGES) + 100
    assert accuracy(report)["text"] == 1.0, report.to_json()["failures"]


@pytest.mark.parametrize("route,n", [("hybrid", SCENES), ("pytorch", 60)])
def test_blanked_image_features_leave_the_model_guessing(demo_bundle, route, n):
    scores = accuracy(grade(demo_bundle("fp32"), route, n, blind=True))
    assert all(scores[kind] <= ceiling for kind, ceiling in CHANCE_CEILING.items()), scores
    assert scores["text"] == 1.0  # the text-only exchanges do not depend on the picture


def test_served_prompts_are_the_training_prompts(demo_bundle):
    """The app's processor renders a question exactly as training did, with and without a picture."""
    pipeline = Pipeline.load(demo_bundle("fp32"), verify=False, only=("hybrid",))
    processor = AutoProcessor.from_pretrained(DEMO_MODEL)
    image = scenes.random_scene(np.random.default_rng(5)).render()
    for question, images in (("What shape is this?", [image]), ("What is 3 plus 4?", [])):
        served = pipeline.routes["hybrid"].processor.prepare((Message("user", question, tuple(images)),))
        trained = processor(text=[chat_prompt(processor, question, bool(images))], images=images or None)
        assert served.input_ids[0].tolist() == trained["input_ids"][0]


@pytest.mark.parametrize("route", ["hybrid", "genai", "pytorch"])
def test_a_finished_answer_ends_on_eos_on_every_route(demo_bundle, route):
    pipeline = Pipeline.load(demo_bundle("fp32"), verify=False, only=(route,))
    chunks = list(pipeline.stream(Request((Message("user", "What is 3 plus 4?"),)), route))
    assert "".join(c.text for c in chunks) == "7"
    assert chunks[-1].finish_reason == "eos"
