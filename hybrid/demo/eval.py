"""Measures how well a demo model answers: accuracy per question kind on fresh scenes from a seed.

The route is a parameter: `evaluate` takes any `Answerer`, a callable `(image or None, question,
history) -> reply text`, so every inference route is graded on the same exchanges by the same grader.
`evaluate_conversations` asks the questions in conversations of one to four about one picture, each
reply in the history of the next as a person's chat would have it, and scores first questions and
follow-ups apart. Besides
accuracy per kind it tallies accuracy per background kind and per number of shapes, and for the
grounding questions the share of boxes with IoU >= 0.5 and their mean IoU (matched by label).
`pipeline_answerer` asks one route of a loaded bundle, exactly as the app does; the ablations
blank the vision features (`zero_image_features`) or only the DeepStack maps (`zero_deepstack`).
"""

from __future__ import annotations

import json
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
from hybrid.launch import TRAINING_RECORD, ensure_bundle
from hybrid.pipeline import Pipeline
from hybrid.types import ROUTE_NAMES, Message, Request, RouteName
from hybrid.vision import VisionFeatures

log = logging.getLogger(__name__)

History = tuple[tuple[str, str], ...]  # earlier (question, reply) turns of a conversation
Answerer = Callable[[Image.Image | None, str, History], str]
MAX_QUESTIONS = 4  # the most questions of one conversation, as in training
MAX_NEW_TOKENS = 160  # three boxes in Qwen3-VL's JSON take about 100 tokens
HIT_IOU = 0.5


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


def _tally(scores: dict[str, KindScore], key: str, correct: bool, exact: bool) -> None:
    scores[key] = scores.get(key, KindScore()).add(correct, exact)


@dataclass
class EvalReport:
    """Scores per question kind, per background kind and per number of shapes (image questions),
    and the IoU of every box a grounding question asked for."""

    scores: dict[str, KindScore] = field(default_factory=dict)
    by_background: dict[str, KindScore] = field(default_factory=dict)
    by_shapes: dict[str, KindScore] = field(default_factory=dict)
    ious: list[float] = field(default_factory=list)
    ious_any_label: list[float] = field(default_factory=list)  # localisation alone: the best box whatever its label
    samples: list[Sample] = field(default_factory=list)  # the first few exchanges and every failure
    first: dict[str, KindScore] = field(default_factory=dict)  # conversations: the opening questions
    follow_up: dict[str, KindScore] = field(default_factory=dict)  # conversations: the 2nd to 4th questions
    seconds: float = 0.0

    @property
    def asked(self) -> dict[str, KindScore]:
        """The kinds that had at least one question, in `scenes.KINDS` order."""
        return {k: self.scores[k] for k in scenes.KINDS if self.scores.get(k, KindScore()).total}

    @property
    def box_hit_rate(self) -> float:
        """Share of asked-for boxes found with the right label and IoU >= 0.5."""
        return sum(v >= HIT_IOU for v in self.ious) / len(self.ious) if self.ious else 0.0

    @property
    def mean_iou(self) -> float:
        return float(np.mean(self.ious)) if self.ious else 0.0

    @property
    def any_label_hit_rate(self) -> float:
        """Share of asked-for boxes some box of the reply overlaps with IoU >= 0.5, whatever its label."""
        hits = self.ious_any_label
        return sum(v >= HIT_IOU for v in hits) / len(hits) if hits else 0.0

    def record(self, exchange: scenes.Exchange, reply: str, keep: bool, turn: int | None = None) -> None:
        """Grade `reply`; `turn` is its place in a conversation (0: the first question)."""
        correct = scenes.grade(exchange, reply)
        exact = reply.strip() == exchange.answer
        _tally(self.scores, exchange.kind, correct, exact)
        if turn is not None:
            _tally(self.follow_up if turn else self.first, exchange.kind, correct, exact)
        if exchange.scene is not None:
            _tally(self.by_background, exchange.scene.background.kind, correct, exact)
            _tally(self.by_shapes, str(len(exchange.scene.items)), correct, exact)
        if exchange.kind in scenes.GROUNDING_KINDS:
            self.ious += scenes.box_ious(exchange, reply)
            self.ious_any_label += scenes.box_ious(exchange, reply, by_label=False)
        if keep or not correct:
            self.samples.append(Sample(exchange.kind, exchange.question, exchange.answer, reply, correct))

    def to_json(self) -> dict:
        def accuracies(scores: dict[str, KindScore]) -> dict[str, float]:
            return {k: round(s.accuracy, 4) for k, s in sorted(scores.items()) if s.total}

        return {
            "accuracy": {k: round(s.accuracy, 4) for k, s in self.asked.items()},
            "counts": {k: {"total": s.total, "correct": s.correct, "exact": s.exact} for k, s in self.asked.items()},
            "boxes": {
                "n": len(self.ious),
                "hit_rate": round(self.box_hit_rate, 4),
                "mean_iou": round(self.mean_iou, 4),
                "any_label_hit_rate": round(self.any_label_hit_rate, 4),
            },
            "by_background": accuracies(self.by_background),
            "by_shapes": accuracies(self.by_shapes),
            **({"first": accuracies(self.first), "follow_up": accuracies(self.follow_up)} if self.follow_up else {}),
            "seconds": round(self.seconds, 1),
            "examples": [vars(s) for s in self.samples[:12]],
            "failures": [vars(s) for s in self.samples if not s.correct][:20],
        }

    def table(self) -> str:
        rows = [f"{'kind':<12} {'accuracy':>8} {'exact':>6} {'n':>5}"]
        rows += [f"{k:<12} {s.accuracy:>8.3f} {s.exact / s.total:>6.3f} {s.total:>5}" for k, s in self.asked.items()]
        if self.ious:
            rows.append(
                f"boxes: {len(self.ious)}, IoU >= {HIT_IOU}: {self.box_hit_rate:.3f}, mean IoU {self.mean_iou:.3f}, "
                f"IoU >= {HIT_IOU} whatever the label: {self.any_label_hit_rate:.3f}"
            )
        for title, scores in (
            ("background", self.by_background),
            ("shapes", self.by_shapes),
            ("first question", self.first),
            ("follow-up", self.follow_up),
        ):
            if scores:
                rows.append(f"by {title}: " + ", ".join(f"{k} {s.accuracy:.3f}" for k, s in sorted(scores.items())))
        return "\n".join(rows)


def eval_exchanges(n: int, seed: int, style: str = scenes.TRAIN, text: bool = True) -> list[scenes.Exchange]:
    """Every kind a scene can answer, asked once about each of `n` scenes (one, two and three shapes
    in turn), then (`text`) every text exchange once: each fixed one, and each of the 100 digit sums
    in a phrasing drawn from `seed`."""
    rng = np.random.default_rng(seed)
    exchanges = []
    for i in range(n):
        scene = scenes.random_scene(rng, style, shapes=1 + i % scenes.MAX_SHAPES)
        exchanges += [scenes.ask(kind, scene, rng) for kind in scenes.IMAGE_KINDS if scenes.askable(kind, scene)]
    if text:
        exchanges += [scenes.Exchange("text", q, a) for q, a in scenes.FIXED_EXCHANGES.items()]
        phrasings = rng.integers(0, len(scenes.SUM_QUESTIONS), 100)
        exchanges += [scenes.sum_exchange(a, b, int(phrasings[10 * a + b])) for a in range(10) for b in range(10)]
    return exchanges


def evaluate(answer: Answerer, exchanges: list[scenes.Exchange], keep: int = 8) -> EvalReport:
    """Ask every exchange alone (with its scene's picture, if any), grade the replies, tally them."""
    return evaluate_conversations(answer, [[exchange] for exchange in exchanges], keep, turns=False)


def evaluate_conversations(
    answer: Answerer, conversations: list[list[scenes.Exchange]], keep: int = 8, turns: bool = True
) -> EvalReport:
    """Ask each conversation's questions in order, every reply in the history of the next (the
    picture, if any, in the first turn), grade each reply; `turns`: score first questions and
    follow-ups apart as well."""
    report = EvalReport()
    start = time.perf_counter()
    asked = 0
    pictures: dict[int, Image.Image] = {}  # a scene's questions are consecutive: render it once
    for conversation in conversations:
        scene = conversation[0].scene
        image = None
        if scene is not None:
            if id(scene) not in pictures:
                pictures = {id(scene): scene.render()}
            image = pictures[id(scene)]
        history: History = ()
        for turn, exchange in enumerate(conversation):
            reply = answer(image, exchange.question, history)
            report.record(exchange, reply, keep=asked < keep, turn=turn if turns else None)
            history += ((exchange.question, reply),)
            asked += 1
            if asked % 200 == 0:
                log.info("asked %d", asked)
    report.seconds = time.perf_counter() - start
    return report


def conversation_exchanges(n: int, seed: int, style: str = scenes.TRAIN) -> list[list[scenes.Exchange]]:
    """Every kind a scene can answer, asked once about each of `n` scenes (one, two and three shapes
    in turn), in a random order cut into conversations of one to `MAX_QUESTIONS` questions."""
    rng = np.random.default_rng(seed)
    conversations = []
    for i in range(n):
        scene = scenes.random_scene(rng, style, shapes=1 + i % scenes.MAX_SHAPES)
        kinds = [kind for kind in scenes.IMAGE_KINDS if scenes.askable(kind, scene)]
        exchanges = [scenes.ask(kinds[j], scene, rng) for j in rng.permutation(len(kinds))]
        while exchanges:
            size = int(rng.integers(1, MAX_QUESTIONS + 1))
            conversations.append(exchanges[:size])
            exchanges = exchanges[size:]
    return conversations


def load_pipeline(model_dir: str | Path, route: RouteName, precision: str = "fp32", threads: int = 0) -> Pipeline:
    """The checkpoint's bundle (exported on first use, reused after, as the app does) with only
    `route` loaded."""
    if route not in ROUTE_NAMES:
        raise UserError(f"unknown route {route!r}; choose one of {', '.join(ROUTE_NAMES)}")
    bundle = ensure_bundle(model_dir, None, precision)
    return Pipeline.load(bundle, RuntimeConfig(threads=threads), verify=False, only=(route,))


def pipeline_answerer(pipeline: Pipeline, route: str, max_new_tokens: int = MAX_NEW_TOKENS) -> Answerer:
    """Greedy answer of `route` to a question (after the conversation's `history`, the picture in
    its first turn), through the same `Request` and stream as the app and the CLI."""
    sampling = SamplingConfig(max_new_tokens=max_new_tokens)

    def answer(image: Image.Image | None, question: str, history: History = ()) -> str:
        images = (image,) if image is not None else ()
        messages = []
        for asked, reply in history:
            messages += [Message("user", asked, images), Message("assistant", reply)]
            images = ()
        request = Request((*messages, Message("user", question, images)), sampling)
        return "".join(chunk.text for chunk in pipeline.stream(request, route))

    return answer


def zero_image_features(pipeline: Pipeline, route: str) -> None:
    """Ablation: the vision tower of `route` returns zeros (merged features and every DeepStack
    map). The image pads and their positions stay, so only the picture's content is removed."""
    _blank(pipeline, route, features=True)


def zero_deepstack(pipeline: Pipeline, route: str) -> None:
    """Ablation: the DeepStack maps are zeros, the tower's merged features are kept: does the model
    use what DeepStack adds?"""
    _blank(pipeline, route, features=False)


def _blank(pipeline: Pipeline, route: str, features: bool) -> None:
    if route == "hybrid":
        tower = pipeline.routes["hybrid"].vision
        encode = tower.encode

        def blank(pixel_values: torch.Tensor, image_grid_thw: torch.Tensor, key: str | None = None) -> VisionFeatures:
            real = encode(pixel_values, image_grid_thw, key)
            embeds = np.zeros_like(real.image_embeds) if features else real.image_embeds
            return VisionFeatures(embeds, np.zeros_like(real.deepstack_embeds))

        tower.encode = blank
    elif route == "pytorch":

        def blank_output(module, args, output):
            if features:
                output.pooler_output = torch.zeros_like(output.pooler_output)
            output.deepstack_features = [torch.zeros_like(f) for f in output.deepstack_features]
            return output

        pipeline.routes["pytorch"].model.model.visual.register_forward_hook(blank_output)
    else:
        raise UserError(f"the {route} route has no image input to blank")


def route_exchanges(route: str, n: int, seed: int, style: str = scenes.TRAIN) -> list[scenes.Exchange]:
    """`eval_exchanges`, less the picture questions on the text-only GenAI route."""
    if route == "genai":
        return eval_exchanges(0, seed, style)
    return eval_exchanges(n, seed, style, text=style == scenes.TRAIN)


def eval_key(result: dict) -> str:
    """The name an eval's figures are kept under: route, precision, style and what was blanked."""
    parts = [result["route"], result["precision"], result["style"]]
    parts += [name for name in ("conversation", "zero_image", "zero_deepstack") if result.get(name)]
    return "-".join(parts)


def record_eval(model_dir: Path, result: dict) -> None:
    """Keep `result` (less its examples) in the model's `training.json` under `eval`, so that what
    the app says the model knows comes from the model's own figures."""
    path = model_dir / TRAINING_RECORD
    record = json.loads(path.read_text()) if path.is_file() else {}
    kept = {k: v for k, v in result.items() if k not in ("examples", "failures", "model")}
    record.setdefault("eval", {})[eval_key(result)] = kept
    path.write_text(json.dumps(record, indent=2) + "\n")
