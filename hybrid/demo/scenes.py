"""Synthetic photo-like pictures and the small language the demo model is trained and graded on.

A `Scene` is one to three shapes (never two alike) on a background of one of several kinds, at any
aspect ratio from 9:16 to 16:9 and 256 to 1024 pixels on the long side, saved through JPEG; it
renders deterministically from its fields. A shape's place is the region its centre falls in.
`ask` phrases a question of one kind about a scene with its one right answer, and `grade` checks a
reply. The held-out style `EDGE` draws through another path (PIL's own primitives, aliased), at the
edges of the size and aspect ranges, on a background kind training never draws: the eval uses it to
show the model learnt shapes, not one rendering.
"""

from __future__ import annotations

import io
import json
import math
import re
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageDraw

from hybrid.boxes import SCALE, Box, iou, parse_boxes

SHAPES = ("circle", "square", "triangle", "star")
COLOURS = {
    "red": (220, 30, 30),
    "green": (30, 170, 50),
    "blue": (30, 70, 220),
    "yellow": (240, 210, 20),
    "purple": (140, 40, 180),
    "orange": (250, 130, 10),
}
POSITIONS = ("top left", "top right", "bottom left", "bottom right", "centre")
CENTRE_HALF = 0.2  # the centre is the box |x - 0.5| < 0.2, |y - 0.5| < 0.2 (fractions of width, height)
BOUNDARY_MARGIN = 0.03  # no shape's centre this close to a region border: every place has one answer
TRAIN, EDGE = "train", "edge"
STYLES = (TRAIN, EDGE)
BACKGROUNDS = ("light", "dark", "grey", "tinted", "gradient", "noise", "texture")
EDGE_BACKGROUNDS = ("radial",)
MIN_SIZE, MAX_SIZE = 0.15, 0.45  # diameter of a shape's circumcircle, fraction of the short side
EDGE_SIZES = ((0.15, 0.17), (0.40, 0.46))  # the ends of the sizes the demo model knows
MIN_LONG, MAX_LONG = 256, 1024
MAX_ASPECT = 16 / 9
FILL_JITTER = 20  # per RGB channel
MIN_CONTRAST = 100.0  # Euclidean RGB distance between a fill and every colour of its background
MAX_SHAPES = 3
NUMBERS = ("zero", "one", "two", "three", "four", "five")

IMAGE_KINDS = ("shape", "colour", "position", "count", "colour_of", "position_of", "describe", "find", "locate_all")
SINGLE_KINDS = ("shape", "colour", "position")  # asked only of pictures with one shape
GROUNDING_KINDS = ("find", "locate_all")
BOX_KEY = "bbox_2d"  # of a grounding answer's objects (Qwen3-VL's format)
KINDS = (*IMAGE_KINDS, "text")
QUESTIONS = {
    "shape": ("What shape is this?", "What shape do you see?", "Which shape is in the picture?", "What is the shape?"),
    "colour": ("What colour is the shape?", "What color is it?", "Which colour is the shape?", "What is its colour?"),
    "position": (
        "Where is the shape?",
        "Where is it?",
        "Where is the shape in the picture?",
        "In which part of the picture is the shape?",
    ),
    "count": (
        "How many shapes are there?",
        "How many shapes do you see?",
        "Count the shapes.",
        "How many shapes are in the picture?",
    ),
    "colour_of": ("What colour is the {shape}?", "What color is the {shape}?", "Which colour is the {shape}?"),
    "position_of": (
        "Where is the {label}?",
        "Where is the {label} in the picture?",
        "In which part of the picture is the {label}?",
    ),
    "describe": (
        "Describe the picture.",
        "What is in this picture?",
        "Describe the image in a few words.",
        "What do you see?",
    ),
    "find": ("Find the {label}.", "Locate the {label}.", "Show me the {label}.", "Draw a box around the {label}."),
    "locate_all": (
        "Locate every shape.",
        "Find all the shapes.",
        "Detect every shape.",
        "Draw boxes around all the shapes.",
    ),
}
FIXED_EXCHANGES = {
    "Hello!": "Hello! Show me a picture and ask about it.",
    "Hi!": "Hello! Show me a picture and ask about it.",
    "Hello, who are you?": "I am a tiny Qwen3-VL model trained on simple pictures.",
    "Who are you?": "I am a tiny Qwen3-VL model trained on simple pictures.",
    "What are you?": "I am a tiny Qwen3-VL model trained on simple pictures.",
    "What can you do?": "I can name, count and find the shapes in a picture, and add small numbers.",
}
SUM_QUESTIONS = ("What is {a} plus {b}?", "What is {a} + {b}?", "How much is {a} plus {b}?", "Add {a} and {b}.")


def place_of(x: float, y: float) -> str:
    """The region of a point given as fractions of the width and height."""
    if abs(x - 0.5) < CENTRE_HALF and abs(y - 0.5) < CENTRE_HALF:
        return "centre"
    return f"{'top' if y < 0.5 else 'bottom'} {'left' if x < 0.5 else 'right'}"


def clear_of_borders(x: float, y: float, margin: float = BOUNDARY_MARGIN) -> bool:
    """Whether the point is at least `margin` from every border between two regions."""
    dx, dy = abs(x - 0.5), abs(y - 0.5)
    if place_of(x, y) != "centre" and min(dx, dy) < margin:
        return False
    near_side = abs(dx - CENTRE_HALF) < margin and dy < CENTRE_HALF + margin
    near_top = abs(dy - CENTRE_HALF) < margin and dx < CENTRE_HALF + margin
    return not (near_side or near_top)


@dataclass(frozen=True)
class Item:
    """One shape: centre `x`, `y` (fractions of width and height), `size` (circumcircle diameter,
    fraction of the short side), `angle` in degrees."""

    shape: str
    colour: str
    fill: tuple[int, int, int]
    x: float
    y: float
    size: float
    angle: float = 0.0

    def __post_init__(self) -> None:
        if self.shape not in SHAPES or self.colour not in COLOURS:
            raise ValueError(f"unknown shape/colour: {self.shape!r}, {self.colour!r}")
        if not 0.05 <= self.size <= 0.5:
            raise ValueError(f"size {self.size} must be a fraction of the short side in [0.05, 0.5]")

    @property
    def position(self) -> str:
        return place_of(self.x, self.y)

    @property
    def label(self) -> str:
        return f"{self.colour} {self.shape}"

    def radius(self, width: int, height: int) -> float:
        return self.size * min(width, height) / 2

    def outline(self, width: int, height: int) -> list[tuple[float, float]]:
        return shape_outline(self.shape, (self.x * width, self.y * height), self.radius(width, height), self.angle)

    def box(self, width: int, height: int) -> tuple[float, float, float, float]:
        """The tight box of the drawn outline, in pixels."""
        xs, ys = zip(*self.outline(width, height))
        return min(xs), min(ys), max(xs), max(ys)


@dataclass(frozen=True)
class Background:
    """A background of `kind` drawn from two colours (the second: gradient end, texture, noise level)."""

    kind: str
    first: tuple[int, int, int]
    second: tuple[int, int, int]
    seed: int = 0
    angle: float = 0.0  # gradient direction / stripe orientation, degrees
    period: int = 16  # texture period in pixels
    noise: float = 0.0  # noise standard deviation per channel

    def colours(self) -> tuple[tuple[int, int, int], ...]:
        """Every colour a shape must stand out from."""
        return (self.first,) if self.kind in ("light", "dark", "grey", "tinted", "noise") else (self.first, self.second)

    def render(self, width: int, height: int) -> Image.Image:
        first, second = np.array(self.first, np.float32), np.array(self.second, np.float32)
        if self.kind in ("gradient", "radial"):
            yy, xx = np.mgrid[0:height, 0:width].astype(np.float32)
            if self.kind == "gradient":
                turn = math.radians(self.angle)
                t = (xx / width - 0.5) * math.cos(turn) + (yy / height - 0.5) * math.sin(turn) + 0.5
            else:
                t = np.hypot(xx / width - 0.5, yy / height - 0.5) / math.hypot(0.5, 0.5)
            t = np.clip(t, 0, 1)[..., None]
            pixels = first * (1 - t) + second * t
        elif self.kind == "texture":
            yy, xx = np.mgrid[0:height, 0:width]
            turn = math.radians(self.angle)
            u = (xx * math.cos(turn) + yy * math.sin(turn)) // self.period
            v = (-xx * math.sin(turn) + yy * math.cos(turn)) // self.period
            pattern = (u % 2) if self.seed % 2 == 0 else ((u + v) % 2)  # stripes or checks
            pixels = np.where(pattern[..., None] == 0, first, second)
        else:
            pixels = np.broadcast_to(first, (height, width, 3)).copy()
        if self.noise > 0:
            rng = np.random.default_rng(self.seed)
            small = rng.normal(0, self.noise, ((height + 1) // 2, (width + 1) // 2, 3)).astype(np.float32)
            pixels = pixels + small.repeat(2, 0).repeat(2, 1)[:height, :width]
        return Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8), "RGB")


@dataclass(frozen=True)
class Scene:
    """A picture: its size, background, shapes (never two alike) and the JPEG quality it is saved at."""

    width: int
    height: int
    background: Background
    items: tuple[Item, ...]
    quality: int = 90
    style: str = TRAIN

    def __post_init__(self) -> None:
        if not 1 <= len(self.items) <= MAX_SHAPES:
            raise ValueError(f"a scene holds 1 to {MAX_SHAPES} shapes, not {len(self.items)}")
        if len({item.label for item in self.items}) != len(self.items):
            raise ValueError("two shapes of a scene have the same shape and colour")
        if self.style not in STYLES:
            raise ValueError(f"unknown style {self.style!r}")

    @property
    def ordered(self) -> tuple[Item, ...]:
        """The shapes left to right, the order answers list them in."""
        return tuple(sorted(self.items, key=lambda item: item.x))

    def render(self) -> Image.Image:
        """The picture as an upload would arrive: RGB, after a JPEG round trip at `quality`."""
        image = self.background.render(self.width, self.height)
        for item in self.items:
            (_draw_smooth if self.style == TRAIN else _draw_aliased)(image, item)
        buffer = io.BytesIO()
        image.save(buffer, "JPEG", quality=self.quality)
        return Image.open(io.BytesIO(buffer.getvalue())).convert("RGB")

    def box_2d(self, item: Item) -> list[int]:
        """`item`'s box on Qwen3-VL's 0-1000 scale, as the grounding answer gives it."""
        x1, y1, x2, y2 = item.box(self.width, self.height)
        w, h = self.width, self.height
        return [round(x1 / w * SCALE), round(y1 / h * SCALE), round(x2 / w * SCALE), round(y2 / h * SCALE)]


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


def _draw_smooth(image: Image.Image, item: Item) -> None:
    """The training path: the outline drawn at 4x on a mask of its box, downsampled for soft edges."""
    x1, y1, x2, y2 = item.box(*image.size)
    left, top = math.floor(x1) - 1, math.floor(y1) - 1
    w, h = math.ceil(x2) + 2 - left, math.ceil(y2) + 2 - top
    mask = Image.new("L", (4 * w, 4 * h), 0)
    ImageDraw.Draw(mask).polygon([(4 * (px - left), 4 * (py - top)) for px, py in item.outline(*image.size)], fill=255)
    mask = mask.resize((w, h), Image.Resampling.BOX)
    image.paste(Image.new("RGB", (w, h), item.fill), (left, top), mask)


def _draw_aliased(image: Image.Image, item: Item) -> None:
    """The held-out path: PIL's own primitives at 1x, hard edges (the outline's box stays exact)."""
    draw = ImageDraw.Draw(image)
    if item.shape == "circle":
        cx, cy, r = item.x * image.width, item.y * image.height, item.radius(*image.size)
        draw.ellipse((cx - r, cy - r, cx + r, cy + r), fill=item.fill)
    else:
        draw.polygon(item.outline(*image.size), fill=item.fill)


# --- drawing random scenes ---------------------------------------------------------------------


def random_scene(rng: np.random.Generator, style: str = TRAIN, shapes: int | None = None) -> Scene:
    """One random scene of `style` with `shapes` shapes (None: one to three, one most often)."""
    count = shapes or int(rng.choice((1, 2, 3), p=(0.4, 0.3, 0.3)))
    width, height = _picture_size(rng, style)
    kind = str(rng.choice(BACKGROUNDS if style == TRAIN else EDGE_BACKGROUNDS))
    background = random_background(rng, kind)
    while True:
        items = _place_items(rng, count, width, height, background, style)
        if items is not None:
            quality = int(rng.integers(40, 96) if style == TRAIN else rng.integers(25, 45))
            return Scene(width, height, background, items, quality, style)


def _picture_size(rng: np.random.Generator, style: str) -> tuple[int, int]:
    """Width and height: long side 256-1024, aspect 9:16 to 16:9 (the held-out style: the extremes)."""
    if style == TRAIN:
        long_side = int(rng.integers(MIN_LONG, MAX_LONG + 1))
        aspect = float(np.exp(rng.uniform(-math.log(MAX_ASPECT), math.log(MAX_ASPECT))))
    else:
        long_side = int(rng.choice((MIN_LONG, MAX_LONG)))
        aspect = float(rng.choice((1 / MAX_ASPECT, 1.0, MAX_ASPECT)))
    if aspect >= 1:
        return long_side, max(16, round(long_side / aspect))
    return max(16, round(long_side * aspect)), long_side


def random_background(rng: np.random.Generator, kind: str) -> Background:
    def grey(low: int, high: int, tint: int) -> tuple[int, int, int]:
        level = int(rng.integers(low, high + 1))
        return tuple(int(v) for v in np.clip(level + rng.integers(-tint, tint + 1, 3), 0, 255))

    seed, angle = int(rng.integers(1 << 31)), float(rng.uniform(0, 360))
    dark_first = rng.random() < 0.5
    if kind == "light":
        return Background(kind, grey(175, 255, 15), (0, 0, 0))
    if kind == "dark":
        return Background(kind, grey(0, 70, 12), (0, 0, 0))
    if kind == "grey":
        return Background(kind, grey(105, 150, 8), (0, 0, 0))
    if kind == "tinted":
        return Background(kind, grey(0, 60, 45) if dark_first else grey(185, 255, 45), (0, 0, 0))
    if kind == "noise":
        base = grey(0, 60, 15) if dark_first else grey(180, 255, 15)
        return Background(kind, base, (0, 0, 0), seed=seed, noise=float(rng.uniform(6, 22)))
    if kind == "texture":
        first = grey(0, 55, 12) if dark_first else grey(185, 250, 12)
        second = tuple(int(v) for v in np.clip(np.array(first) + rng.integers(15, 35), 0, 255))
        return Background(kind, first, second, seed=seed, angle=angle, period=int(rng.integers(6, 40)))
    if kind in ("gradient", "radial"):
        ends = (grey(0, 70, 20), grey(0, 70, 20)) if dark_first else (grey(175, 255, 20), grey(175, 255, 20))
        return Background(kind, *ends, angle=angle)
    raise ValueError(f"unknown background kind {kind!r}")


def _place_items(
    rng: np.random.Generator, count: int, width: int, height: int, background: Background, style: str
) -> tuple[Item, ...] | None:
    """`count` distinct shapes inside the picture, apart from each other and from region borders."""
    items: list[Item] = []
    short = min(width, height)
    for _ in range(count):
        for _attempt in range(50):
            item = _random_item(rng, background, style)
            r = item.radius(width, height)
            x = float(rng.uniform(r / width + 0.01, 1 - r / width - 0.01))
            y = float(rng.uniform(r / height + 0.01, 1 - r / height - 0.01))
            item = Item(item.shape, item.colour, item.fill, x, y, item.size, item.angle)
            apart = all(
                math.hypot((x - o.x) * width, (y - o.y) * height) > r + o.radius(width, height) + 0.03 * short
                for o in items
            )
            if apart and clear_of_borders(x, y) and item.label not in {o.label for o in items}:
                items.append(item)
                break
        else:
            return None
    return tuple(items)


def _random_item(rng: np.random.Generator, background: Background, style: str) -> Item:
    """A shape of a colour that stands out from every colour of `background` (centre set later)."""
    while True:
        colour = str(rng.choice(list(COLOURS)))
        fill = np.clip(np.array(COLOURS[colour]) + rng.integers(-FILL_JITTER, FILL_JITTER + 1, 3), 0, 255)
        if all(np.linalg.norm(fill - np.array(c)) >= MIN_CONTRAST for c in background.colours()):
            break
    if style == TRAIN:
        size = float(rng.uniform(MIN_SIZE, MAX_SIZE))
    else:
        low, high = EDGE_SIZES[int(rng.integers(len(EDGE_SIZES)))]
        size = float(rng.uniform(low, high))
    fill_rgb = (int(fill[0]), int(fill[1]), int(fill[2]))
    return Item(str(rng.choice(SHAPES)), colour, fill_rgb, 0.5, 0.5, size, float(rng.uniform(0, 360)))


# --- questions and answers ---------------------------------------------------------------------


@dataclass(frozen=True)
class Exchange:
    """One question and its expected answer; `scene` is None for text-only exchanges, `target` the
    shape a question about one shape of several is about."""

    kind: str
    question: str
    answer: str
    scene: Scene | None = None
    target: Item | None = None


def article(word: str) -> str:
    return "an" if word[0] in "aeiou" else "a"


def describe(scene: Scene) -> str:
    """'A red circle in the top left, a blue star in the centre and a green square in the bottom right.'"""
    parts = [f"{article(i.colour)} {i.label} in the {i.position}" for i in scene.ordered]
    text = parts[0] if len(parts) == 1 else ", ".join(parts[:-1]) + " and " + parts[-1]
    return text[0].upper() + text[1:] + "."


def grounding(scene: Scene, items: tuple[Item, ...]) -> str:
    """Qwen3-VL's grounding answer: a JSON list of `{"bbox_2d": [...], "label": ...}` objects."""
    return json.dumps([{BOX_KEY: scene.box_2d(item), "label": item.label} for item in items])


def askable(kind: str, scene: Scene) -> list[Item | None]:
    """The shapes a question of `kind` can be about in `scene` ([None]: the whole picture; []: none)."""
    if kind in SINGLE_KINDS:
        return [None] if len(scene.items) == 1 else []
    if kind == "colour_of":
        shapes = [item.shape for item in scene.items]
        return [item for item in scene.items if shapes.count(item.shape) == 1]
    if kind in ("position_of", "find"):
        return list(scene.items)
    return [None]


def ask(kind: str, scene: Scene, rng: np.random.Generator) -> Exchange:
    """A question of `kind` about `scene` (about one of its shapes where the kind needs one), with
    its one right answer."""
    targets = askable(kind, scene)
    if not targets:
        raise ValueError(f"a {kind!r} question has no single right answer for this scene")
    target = targets[int(rng.integers(len(targets)))]
    only = scene.items[0]
    answers = {
        "shape": lambda: f"A {only.shape}.",
        "colour": lambda: f"{only.colour.capitalize()}.",
        "position": lambda: f"In the {only.position}.",
        "count": lambda: f"{NUMBERS[len(scene.items)].capitalize()} shape{'s' if len(scene.items) > 1 else ''}.",
        "colour_of": lambda: f"{target.colour.capitalize()}.",
        "position_of": lambda: f"In the {target.position}.",
        "describe": lambda: describe(scene),
        "find": lambda: grounding(scene, (target,)),
        "locate_all": lambda: grounding(scene, scene.ordered),
    }
    fields = {"shape": target.shape, "label": target.label} if target is not None else {}
    question = str(rng.choice(QUESTIONS[kind])).format(**fields)
    return Exchange(kind, question, answers[kind](), scene, target)


def sum_exchange(a: int, b: int, phrasing: int = 0) -> Exchange:
    return Exchange("text", SUM_QUESTIONS[phrasing].format(a=a, b=b), str(a + b))


def text_exchanges() -> list[Exchange]:
    """Every text-only exchange: the fixed ones and all sums of two digits in every phrasing."""
    fixed = [Exchange("text", q, a) for q, a in FIXED_EXCHANGES.items()]
    sums = [sum_exchange(a, b, p) for a in range(10) for b in range(10) for p in range(len(SUM_QUESTIONS))]
    return fixed + sums


def corpus() -> tuple[str, ...]:
    """Sentences covering the language (questions, answers, grounding JSON), for the tokenizer."""
    rng = np.random.default_rng(99)
    lines = ["user\nassistant\n"]  # the chat template's role names, in every prompt
    lines += [f"{e.question} {e.answer}" for e in text_exchanges()]
    for _ in range(300):
        scene = random_scene(rng)
        lines += [f"{e.question} {e.answer}" for e in (ask(k, scene, rng) for k in IMAGE_KINDS if askable(k, scene))]
    for shape in SHAPES:
        for colour in COLOURS:
            lines += [q.format(shape=shape, label=f"{colour} {shape}") for qs in QUESTIONS.values() for q in qs]
    return tuple(lines)


# --- grading -----------------------------------------------------------------------------------


def _words(text: str) -> str:
    return " " + " ".join(re.findall(r"[a-z0-9]+", text.lower().replace("center", "centre"))) + " "


def _names_only(reply: str, right: str, alternatives: tuple[str, ...] | list[str]) -> bool:
    """`right` appears in `reply` as whole words and no other alternative does."""
    words = _words(reply)
    return f" {right} " in words and not any(f" {alt} " in words for alt in alternatives if alt != right)


_MENTION = re.compile(rf"({'|'.join(COLOURS)}) ({'|'.join(SHAPES)}) in the ({'|'.join(POSITIONS)})")


def mentions(reply: str) -> list[tuple[str, str, str]]:
    """Every '<colour> <shape> in the <place>' in a reply, as (colour, shape, place)."""
    return _MENTION.findall(_words(reply))


def count_in(reply: str) -> int | None:
    """The one number a reply names (a word or digits), or None."""
    found = [NUMBERS.index(w) for w in _words(reply).split() if w in NUMBERS]
    found += [int(d) for d in re.findall(r"\d+", reply)]
    return found[0] if len(found) == 1 else None


def box_ious(exchange: Exchange, reply: str, by_label: bool = True) -> list[float]:
    """For each box a grounding question expects: the IoU of the reply's box with the same label
    (0: none), or (`by_label=False`) the best IoU of any box in the reply, whatever its label."""
    return _ious(exchange, [box for box in parse_boxes(reply) if box.bbox is not None], by_label)


def _ious(exchange: Exchange, boxes: list[Box], by_label: bool) -> list[float]:
    scene = exchange.scene
    expected = (exchange.target,) if exchange.kind == "find" else scene.ordered
    if not by_label:
        return [max((iou(tuple(scene.box_2d(item)), b.bbox) for b in boxes), default=0.0) for item in expected]
    given = {}
    for box in boxes:
        given.setdefault(box.label.strip().lower(), box.bbox)
    return [iou(tuple(scene.box_2d(item)), given[item.label]) if item.label in given else 0.0 for item in expected]


def grade(exchange: Exchange, reply: str) -> bool:
    """Whether `reply` answers `exchange` correctly (names the right thing and nothing else)."""
    if exchange.kind == "text":
        if exchange.answer.isdigit():
            return re.findall(r"\d+", reply) == [exchange.answer]
        return _words(reply) == _words(exchange.answer)
    scene = exchange.scene
    if scene is None:
        raise ValueError(f"a {exchange.kind!r} exchange needs a scene")
    item = exchange.target or scene.items[0]
    if exchange.kind in ("shape",):
        return _names_only(reply, item.shape, SHAPES)
    if exchange.kind in ("colour", "colour_of"):
        return _names_only(reply, item.colour, tuple(COLOURS))
    if exchange.kind in ("position", "position_of"):
        return _names_only(reply, item.position, POSITIONS)
    if exchange.kind == "count":
        return count_in(reply) == len(scene.items)
    if exchange.kind == "describe":
        return sorted(mentions(reply)) == sorted((i.colour, i.shape, i.position) for i in scene.items)
    if exchange.kind in GROUNDING_KINDS:
        boxes = [b for b in parse_boxes(reply) if b.bbox is not None]
        ious = _ious(exchange, boxes, by_label=True)
        return len(boxes) == len(ious) and all(v >= 0.5 for v in ious)
    raise ValueError(f"unknown question kind {exchange.kind!r}")
