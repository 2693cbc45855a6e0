"""Qwen3-VL grounding answers: find the boxes and points in a reply, and draw them on the picture.

Qwen3-VL answers "find X" with a JSON list of objects holding `"bbox_2d": [x1, y1, x2, y2]` and/or
`"point_2d": [x, y]` and a `"label"`, on a 0-1000 scale relative to the picture's width and height
(top-left origin), often inside a ```json fence. `parse_boxes` accepts any such reply, also one
with prose around the list or a list cut short, and returns the well-formed objects; anything else
yields no boxes, never an error. `draw_boxes` paints them, one colour per group (a route).
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass

from PIL import Image, ImageDraw, ImageFont

SCALE = 1000  # Qwen3-VL's grounding coordinates run from 0 to 1000 on both axes
_OBJECT = re.compile(r"\{[^{}]*\}")


@dataclass(frozen=True)
class Box:
    """One grounded object: `bbox` `(x1, y1, x2, y2)` and/or `point` `(x, y)` on the 0-1000 scale."""

    label: str
    bbox: tuple[float, float, float, float] | None = None
    point: tuple[float, float] | None = None

    def pixels(self, width: int, height: int) -> tuple[float, ...]:
        """The box (or point) in pixels of a `width` x `height` picture."""
        coords = self.bbox if self.bbox is not None else self.point
        return tuple(v * (width if i % 2 == 0 else height) / SCALE for i, v in enumerate(coords))


def parse_boxes(reply: str) -> list[Box]:
    """Every well-formed grounding object in `reply`, in order; malformed or partial ones are skipped."""
    boxes = []
    for match in _OBJECT.finditer(reply):
        try:
            item = json.loads(match.group(0))
        except json.JSONDecodeError:
            continue
        box = _to_box(item) if isinstance(item, dict) else None
        if box is not None:
            boxes.append(box)
    return boxes


def _to_box(item: dict) -> Box | None:
    bbox = _numbers(item.get("bbox_2d"), 4)
    point = _numbers(item.get("point_2d"), 2)
    if bbox is None and point is None:
        return None
    if bbox is not None:
        x1, y1, x2, y2 = bbox
        bbox = (min(x1, x2), min(y1, y2), max(x1, x2), max(y1, y2))
    label = item.get("label", "")
    return Box(label if isinstance(label, str) else str(label), bbox, point)


def _numbers(value, count: int) -> tuple[float, ...] | None:
    """`value` as `count` finite coordinates clipped to the 0-1000 scale, or None."""
    if not isinstance(value, list) or len(value) != count:
        return None
    if not all(isinstance(v, (int, float)) and not isinstance(v, bool) and abs(v) < 1e9 for v in value):
        return None
    return tuple(float(min(max(v, 0), SCALE)) for v in value)


def iou(a: tuple[float, ...], b: tuple[float, ...]) -> float:
    """Intersection over union of two `(x1, y1, x2, y2)` boxes."""
    w = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    h = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = w * h
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
    return inter / union if union > 0 else 0.0


def draw_boxes(image: Image.Image, groups: list[tuple[list[Box], tuple[int, int, int]]]) -> Image.Image:
    """A copy of `image` with each group's boxes and points drawn in the group's colour, labelled."""
    canvas = image.convert("RGB")
    draw = ImageDraw.Draw(canvas)
    width, height = canvas.size
    line = max(2, round(min(width, height) / 160))
    font = ImageFont.load_default(size=max(12, round(min(width, height) / 32)))
    for offset, (boxes, colour) in enumerate(groups):
        for box in boxes:
            coords = box.pixels(width, height)
            if box.bbox is not None:
                # each group inset by its own line width, so boxes that agree stay visible side by side
                x1, y1, x2, y2 = (c + (offset * line if i < 2 else -offset * line) for i, c in enumerate(coords))
                draw.rectangle((x1, y1, max(x1, x2), max(y1, y2)), outline=colour, width=line)
                anchor = (x1, y1)
            else:
                x, y = coords
                r = 2 * line
                draw.ellipse((x - r, y - r, x + r, y + r), fill=colour, outline=(255, 255, 255))
                anchor = (x + r, y - r)
            if box.label:
                _label(draw, anchor, box.label, colour, font)
    return canvas


def _label(draw: ImageDraw.ImageDraw, at: tuple[float, float], text: str, colour, font) -> None:
    left, top, right, bottom = draw.textbbox((0, 0), text, font=font)
    x, y = at[0], max(0.0, at[1] - (bottom - top) - 4)
    draw.rectangle((x, y, x + right - left + 6, y + bottom - top + 4), fill=colour)
    draw.text((x + 3, y + 2 - top), text, fill=(255, 255, 255), font=font)
