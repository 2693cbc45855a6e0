"""Measures how well a demo model answers: accuracy per question kind on fresh scenes from a seed.

The route is a parameter: `evaluate` takes any `Answerer`, a callable `(image or None, question) ->
reply text`, so every inference route is graded on the same exchanges by the same grader.
`pipeline_answerer` asks one route of a loaded bundle, exactly as the app does;
`zero_image_features` is the ablation that blanks the vision tower's output, to show the answers
really come from the picture.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from hybrid.config import RuntimeConfig, SamplingConfig
from hybrid.demo import scenes
from hybrid.errors import UserError
from hybrid.launch import ensure_bundle
from hybrid.pipeline import Pipeline
from hybrid.types import Message, Request
from hybrid.vision import VisionFeatures

log = logging.getLogger(__name__)

Answerer = Callable[[Image.Image | None, str], str]
ROUTES = ("pytorch", "hybrid", "genai")


@dataclass(frozen=True)
class KindScore:
    """`correct`: the grader accepts the reply; `exact`: the reply is the expected answer verbatim."""

    total: int = 0
    correct: int = 0
    exact: int = 0

    def add(self, correct: bool, exact: bool) -> KindScore:
        return KindScore(self.total + 1, self.correct + int(correct), self.exact + int(exact))

    @property
    def accuracy(self) -> float:
        return self.correct / self.total if self.total else 0.0


@dataclass(frozen=True)
class Sample:
    kind: str
    question: str
    expected: str
    reply: str
    correct: bool


@dataclass(frozen=True)
class EvalReport:
    scores: dict[str, KindScore]
    samples: list[Sample] = field(default_factory=list)  # the first few exchanges and every failure
    seconds: float = 0.0

    def to_json(self) -> dict:
        return {
            "accuracy": {k: round(s.accuracy, 4) for k, s in self.asked.items()},
            "counts": {k: {"total": s.total, "correct": s.correct, "exact": s.exact} for k, s in self.asked.items()},
            "seconds": round(self.seconds, 1),
            "examples": [vars(s) for s in self.samples[:12]],
            "failures": [vars(s) for s in self.samples if not s.correct][:20],
        }

    @property
    def asked(self) -> dict[str, KindScore]:
        """The kinds that had at least one question."""
        return {k: s for k, s in self.scores.items() if s.total}

    def table(self) -> str:
        rows = [f"{'kind':<10} {'accuracy':>8} {'exact':>6} {'n':>5}"]
        rows += [f"{k:<10} {s.accuracy:>8.3f} {s.exact / s.total:>6.3f} {s.total:>5}" for k, s in self.asked.items()]
        return "\n".join(rows)


def eval_exchanges(n: int, seed: int) -> list[scenes.Exchange]:
    """One question of each image kind about each of `n` scenes, then every text exchange once.

    Text exchanges: each fixed one, and each of the 100 digit sums in a phrasing drawn from `seed`.
    """
    rng = np.random.default_rng(seed)
    exchanges = []
    for _ in range(n):
        scene = scenes.random_scene(rng)
        exchanges += [scenes.image_exchange(kind, scene, rng) for kind in scenes.IMAGE_KINDS]
    exchanges += [scenes.Exchange("text", q, a) for q, a in scenes.FIXED_EXCHANGES.items()]
    phrasings = rng.integers(0, len(scenes.SUM_QUESTIONS), 100)
    exchanges += [scenes.sum_exchange(a, b, int(phrasings[10 * a + b])) for a in range(10) for b in range(10)]
    return exchanges


def evaluate(answer: Answerer, exchanges: list[scenes.Exchange], keep: int = 8) -> EvalReport:
    """Ask every exchange (with its scene's picture, if any), grade the replies, tally per kind."""
    scores = {kind: KindScore() for kind in scenes.KINDS}
    samples: list[Sample] = []
    start = time.perf_counter()
    for i, exchange in enumerate(exchanges):
        image = exchange.scene.render() if exchange.scene is not None else None
        reply = answer(image, exchange.question)
        correct = scenes.grade(exchange, reply)
        scores[exchange.kind] = scores[exchange.kind].add(correct, reply.strip() == exchange.answer)
        if i < keep or not correct:
            samples.append(Sample(exchange.kind, exchange.question, exchange.answer, reply, correct))
        if (i + 1) % 200 == 0:
            log.info("asked %d/%d", i + 1, len(exchanges))
    return EvalReport(scores, samples, time.perf_counter() - start)


def load_pipeline(model_dir: str | Path, route: str, precision: str = "fp32", threads: int = 0) -> Pipeline:
    """The checkpoint's bundle (exported on first use, reused after, as the app does) with only
    `route` loaded."""
    if route not in ROUTES:
        raise UserError(f"unknown route {route!r}; choose one of {', '.join(ROUTES)}")
    bundle = ensure_bundle(model_dir, None, precision)
    return Pipeline.load(bundle, RuntimeConfig(threads=threads), verify=False, only=(route,))


def pipeline_answerer(pipeline: Pipeline, route: str, max_new_tokens: int = 24) -> Answerer:
    """Greedy answer of `route` to one (picture, question) turn, through the same `Request` and
    stream as the app and the CLI."""
    sampling = SamplingConfig(max_new_tokens=max_new_tokens)

    def answer(image: Image.Image | None, question: str) -> str:
        images = (image,) if image is not None else ()
        request = Request((Message("user", question, images),), sampling)
        return "".join(chunk.text for chunk in pipeline.stream(request, route))

    return answer


def zero_image_features(pipeline: Pipeline, route: str) -> None:
    """Ablation: the vision tower of `route` returns zeros (merged features and every DeepStack
    map). The image pads and their positions stay, so only the picture's content is removed."""
    if route == "hybrid":
        _blank_tower(pipeline.routes["hybrid"].vision)
    elif route == "pytorch":
        pipeline.routes["pytorch"].model.model.visual.register_forward_hook(_blank_output)
    else:
        raise UserError(f"the {route} route has no image input to blank")


def _blank_tower(tower) -> None:
    encode = tower.encode

    def blank(pixel_values: torch.Tensor, image_grid_thw: torch.Tensor) -> VisionFeatures:
        real = encode(pixel_values, image_grid_thw)
        return VisionFeatures(np.zeros_like(real.image_embeds), np.zeros_like(real.deepstack_embeds))

    tower.encode = blank


def _blank_output(module, args, output):
    output.pooler_output = torch.zeros_like(output.pooler_output)
    output.deepstack_features = [torch.zeros_like(f) for f in output.deepstack_features]
    return output


def route_exchanges(route: str, n: int, seed: int) -> list[scenes.Exchange]:
    """`eval_exchanges`, less the picture questions on the text-only GenAI route."""
    exchanges = eval_exchanges(n, seed)
    return [e for e in exchanges if e.scene is None] if route == "genai" else exchanges
