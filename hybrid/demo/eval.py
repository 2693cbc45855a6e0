"""Measures how well a demo model answers: accuracy per question kind on fresh scenes from a seed.

The route is a parameter: `evaluate` takes any `Answerer`, a callable `(image or None, question) ->
reply text`, so every inference route is graded on the same exchanges by the same grader.
`pytorch_answerer` is the plain-transformers reference; `zero_image_features` is the ablation that
blanks the vision tower's output to show the answers really come from the picture.
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

from hybrid.demo import scenes
from hybrid.demo.chat import chat_prompt

log = logging.getLogger(__name__)

Answerer = Callable[[Image.Image | None, str], str]
ROUTES = ("pytorch", "hybrid", "genai")


class RouteNotAvailable(RuntimeError):
    """The requested inference route is not wired into the demo eval yet."""


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
            "accuracy": {k: round(s.accuracy, 4) for k, s in self.scores.items()},
            "counts": {k: {"total": s.total, "correct": s.correct, "exact": s.exact} for k, s in self.scores.items()},
            "seconds": round(self.seconds, 1),
            "examples": [vars(s) for s in self.samples[:12]],
            "failures": [vars(s) for s in self.samples if not s.correct][:20],
        }

    def table(self) -> str:
        rows = [f"{'kind':<10} {'accuracy':>8} {'exact':>6} {'n':>5}"]
        rows += [f"{k:<10} {s.accuracy:>8.3f} {s.exact / max(1, s.total):>6.3f} {s.total:>5}" for k, s in self.scores.items()]
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


def load_pytorch(model_dir: str | Path):
    """The checkpoint as `Qwen3VLForConditionalGeneration` (fp32, eval mode) and its processor."""
    from transformers import AutoProcessor, Qwen3VLForConditionalGeneration

    model = Qwen3VLForConditionalGeneration.from_pretrained(model_dir, dtype=torch.float32).eval()
    return model, AutoProcessor.from_pretrained(model_dir)


def pytorch_answerer(model, processor, max_new_tokens: int = 24) -> Answerer:
    """Greedy `model.generate` on one (picture, question) turn; the reply without special tokens."""

    @torch.inference_mode()
    def answer(image: Image.Image | None, question: str) -> str:
        prompt = chat_prompt(processor, question, image is not None)
        inputs = processor(text=[prompt], images=[image] if image is not None else None, return_tensors="pt")
        output = model.generate(**inputs, do_sample=False, max_new_tokens=max_new_tokens)  # (1, S + new)
        new_tokens = output[0, inputs["input_ids"].shape[1] :]
        return processor.tokenizer.decode(new_tokens, skip_special_tokens=True)

    return answer


def zero_image_features(model) -> torch.utils.hooks.RemovableHandle:
    """Ablation: the vision tower returns zeros (merged features and every DeepStack map).

    The image pads and positions stay as they are, so only the picture's content is removed.
    Call `.remove()` on the returned handle to undo it.
    """

    def blank(module, args, output):
        output.pooler_output = torch.zeros_like(output.pooler_output)
        output.deepstack_features = [torch.zeros_like(f) for f in output.deepstack_features]
        return output

    return model.model.visual.register_forward_hook(blank)


def make_answerer(route: str, model_dir: str | Path, zero_image: bool = False, max_new_tokens: int = 24) -> Answerer:
    """The answering function of `route`; only the PyTorch reference is wired in so far."""
    if route not in ROUTES:
        raise RouteNotAvailable(f"unknown route {route!r}; choose one of {', '.join(ROUTES)}")
    if route != "pytorch":
        raise RouteNotAvailable(f"route {route!r} is not wired into the demo eval yet; use --route pytorch")
    model, processor = load_pytorch(model_dir)
    if zero_image:
        zero_image_features(model)
    return pytorch_answerer(model, processor, max_new_tokens)
