"""Synthetic pictures and the small language the demo model is trained and graded on.

A `Scene` is one coloured shape at one of five places on a plain, low-saturation background; it
renders deterministically from its fields. `image_exchange` / `text_exchanges` phrase questions and
give one short answer per scene and kind, and `grade` checks a model's reply against it.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from typing import Iterator

import numpy as np
from PIL import Image, ImageDraw

SHAPES = ("circle", "square", "triangle", "star")
COLOURS = {
    "red": (220, 30, 30),
    "green": (30, 170, 50),
    "blue": (30, 70, 220),
    "yellow": (240, 210, 20),
    "purple": (140, 40, 180),
    "orange": (250, 130, 10),
}
# Centre of each place, as fractions of the picture's width and height.
POSITIONS = {
    "top left": (0.27, 0.27),
    "top right": (0.73, 0.27),
    "bottom left": (0.27, 0.73),
    "bottom right": (0.73, 0.73),
    "centre": (0.5, 0.5),
}
IMAGE_KINDS = ("shape", "colour", "position", "describe")
KINDS = (*IMAGE_KINDS, "text")
IMAGE_SIZE = 96
MIN_SIZE, MAX_SIZE = 0.3, 0.48  # diameter of the shape's circumcircle, fraction of the side
MAX_OFFSET = 0.03  # jitter around the place's centre, fraction of the side
MAX_ANGLE = 8.0  # degrees
FILL_JITTER = 25  # per RGB channel
MIN_CONTRAST = 110.0  # Euclidean RGB distance between shape and background
MIN_BACKGROUND = 160  # darkest grey level of the background, before its tint
SUPERSAMPLE = 2

QUESTIONS = {
    "shape": ("What shape is this?", "What shape do you see?", "Which shape is in the picture?", "What is the shape?"),
    "colour": ("What colour is the shape?", "What color is it?", "Which colour is the shape?", "What is its colour?"),
    "position": ("Where is the shape?", "Where is it?", "Where is the shape in the picture?", "In which part of the picture is the shape?"),
    "describe": ("Describe the picture.", "What is in this picture?", "Describe the image in a few words.", "What do you see?"),
}
FIXED_EXCHANGES = {
    "Hello!": "Hello! Show me a picture and ask about it.",
    "Hi!": "Hello! Show me a picture and ask about it.",
    "Hello, who are you?": "I am a tiny Qwen3-VL model trained on simple pictures.",
    "Who are you?": "I am a tiny Qwen3-VL model trained on simple pictures.",
    "What are you?": "I am a tiny Qwen3-VL model trained on simple pictures.",
    "What can you do?": "I can name the shape, colour and place of a shape in a picture, and add small numbers.",
}
SUM_QUESTIONS = ("What is {a} plus {b}?", "What is {a} + {b}?", "How much is {a} plus {b}?", "Add {a} and {b}.")


@dataclass(frozen=True)
class Scene:
    """One shape on a plain background; `size` and `offset` are fractions of the picture side."""

    shape: str
    colour: str
    position: str
    size: float
    background: tuple[int, int, int]
    fill: tuple[int, int, int] | None = None  # None: the palette colour of `colour`
    offset: tuple[float, float] = (0.0, 0.0)
    angle: float = 0.0

    def __post_init__(self) -> None:
        if self.shape not in SHAPES or self.colour not in COLOURS or self.position not in POSITIONS:
            raise ValueError(f"unknown shape/colour/position: {self.shape!r}, {self.colour!r}, {self.position!r}")
        if not 0.05 <= self.size <= 0.5:
            raise ValueError(f"size {self.size} must be a fraction of the side in [0.05, 0.5]")

    def render(self, side: int = IMAGE_SIZE) -> Image.Image:
        """An RGB picture `side` pixels square, drawn large and downsampled for smooth edges."""
        big = side * SUPERSAMPLE
        image = Image.new("RGB", (big, big), self.background)
        cx, cy = POSITIONS[self.position]
        centre = ((cx + self.offset[0]) * big, (cy + self.offset[1]) * big)
        points = shape_outline(self.shape, centre, self.size * big / 2, self.angle)
        ImageDraw.Draw(image).polygon(points, fill=self.fill or COLOURS[self.colour])
        return image.resize((side, side), Image.Resampling.LANCZOS)


@dataclass(frozen=True)
class Exchange:
    """One question and its expected answer; `scene` is None for text-only exchanges."""

    kind: str
    question: str
    answer: str
    scene: Scene | None = None


def shape_outline(shape: str, centre: tuple[float, float], radius: float, angle: float) -> list[tuple[float, float]]:
    """Polygon vertices of `shape` inscribed in a circle of `radius`, rotated by `angle` degrees."""
    if shape == "circle":
        corners = [(radius, 2 * math.pi * i / 64) for i in range(64)]
    elif shape == "square":
        corners = [(radius, math.pi / 4 + math.pi / 2 * i) for i in range(4)]
    elif shape == "triangle":
        corners = [(radius, -math.pi / 2 + 2 * math.pi / 3 * i) for i in range(3)]
    else:  # a five-pointed star, inner radius 0.45 of the outer one
        corners = [(radius if i % 2 == 0 else 0.45 * radius, -math.pi / 2 + math.pi / 5 * i) for i in range(10)]
    turn = math.radians(angle)
    return [(centre[0] + r * math.cos(t + turn), centre[1] + r * math.sin(t + turn)) for r, t in corners]


def random_scene(rng: np.random.Generator) -> Scene:
    """Draw one scene: uniform shape, colour and place; random size, jitter, tilt and background."""
    colour = str(rng.choice(list(COLOURS)))
    base = np.array(COLOURS[colour])
    fill = tuple(int(v) for v in np.clip(base + rng.integers(-FILL_JITTER, FILL_JITTER + 1, 3), 0, 255))
    return Scene(
        shape=str(rng.choice(SHAPES)),
        colour=colour,
        position=str(rng.choice(list(POSITIONS))),
        size=float(rng.uniform(MIN_SIZE, MAX_SIZE)),
        background=random_background(rng, fill),
        fill=fill,
        offset=(float(rng.uniform(-MAX_OFFSET, MAX_OFFSET)), float(rng.uniform(-MAX_OFFSET, MAX_OFFSET))),
        angle=float(rng.uniform(-MAX_ANGLE, MAX_ANGLE)),
    )


def random_background(rng: np.random.Generator, fill: tuple[int, int, int]) -> tuple[int, int, int]:
    """A light grey with a faint tint, at least `MIN_CONTRAST` away from `fill`.

    Light only: with dark backgrounds too, the small vision tower needs several times the training
    to tell shapes apart (edges of both polarities), which the CPU budget does not allow.
    """
    while True:
        grey = rng.integers(MIN_BACKGROUND, 256)
        rgb = np.clip(grey + rng.integers(-25, 26, 3), 0, 255)
        if np.linalg.norm(rgb - np.array(fill)) >= MIN_CONTRAST:
            return tuple(int(v) for v in rgb)


def scenes(rng: np.random.Generator) -> Iterator[Scene]:
    """An endless stream of random scenes."""
    while True:
        yield random_scene(rng)


def article(word: str) -> str:
    return "an" if word[0] in "aeiou" else "a"


def answer(kind: str, scene: Scene) -> str:
    """The one expected answer to a question of `kind` about `scene`."""
    place = f"the {scene.position}"
    answers = {
        "shape": f"A {scene.shape}.",
        "colour": f"{scene.colour.capitalize()}.",
        "position": f"In {place}.",
        "describe": f"{article(scene.colour).capitalize()} {scene.colour} {scene.shape} in {place}.",
    }
    if kind not in answers:
        raise ValueError(f"unknown image question kind {kind!r}; expected one of {IMAGE_KINDS}")
    return answers[kind]


def image_exchange(kind: str, scene: Scene, rng: np.random.Generator) -> Exchange:
    """A question of `kind` about `scene` in a randomly chosen phrasing, with its answer."""
    return Exchange(kind, str(rng.choice(QUESTIONS[kind])), answer(kind, scene), scene)


def sum_exchange(a: int, b: int, phrasing: int = 0) -> Exchange:
    return Exchange("text", SUM_QUESTIONS[phrasing].format(a=a, b=b), str(a + b))


def text_exchanges() -> list[Exchange]:
    """Every text-only exchange: the fixed ones and all sums of two digits in every phrasing."""
    fixed = [Exchange("text", q, a) for q, a in FIXED_EXCHANGES.items()]
    sums = [sum_exchange(a, b, p) for a in range(10) for b in range(10) for p in range(len(SUM_QUESTIONS))]
    return fixed + sums


def corpus() -> tuple[str, ...]:
    """Every sentence of the language: all questions and all possible answers, for the tokenizer."""
    lines = ["user\nassistant\n"]  # the chat template's role names, in every prompt
    lines += [q for qs in QUESTIONS.values() for q in qs]
    lines += [f"{e.question} {e.answer}" for e in text_exchanges()]
    for shape in SHAPES:
        for colour in COLOURS:
            for position in POSITIONS:
                scene = Scene(shape, colour, position, 0.3, (255, 255, 255))
                lines += [answer(kind, scene) for kind in IMAGE_KINDS]
    return tuple(lines)


def _words(text: str) -> str:
    return " " + " ".join(re.findall(r"[a-z0-9]+", text.lower().replace("center", "centre"))) + " "


def _names_only(reply: str, right: str, alternatives: tuple[str, ...] | list[str]) -> bool:
    """`right` appears in `reply` as whole words and no other alternative does."""
    words = _words(reply)
    return f" {right} " in words and not any(f" {alt} " in words for alt in alternatives if alt != right)


def grade(exchange: Exchange, reply: str) -> bool:
    """Whether `reply` answers `exchange` correctly (names the right thing and nothing else)."""
    scene = exchange.scene
    if exchange.kind == "text":
        if exchange.answer.isdigit():
            return re.findall(r"\d+", reply) == [exchange.answer]
        return _words(reply) == _words(exchange.answer)
    if scene is None:
        raise ValueError(f"a {exchange.kind!r} exchange needs a scene")
    checks = {
        "shape": [(scene.shape, SHAPES)],
        "colour": [(scene.colour, tuple(COLOURS))],
        "position": [(scene.position, tuple(POSITIONS))],
    }
    checks["describe"] = checks["shape"] + checks["colour"] + checks["position"]
    return all(_names_only(reply, right, alts) for right, alts in checks[exchange.kind])
