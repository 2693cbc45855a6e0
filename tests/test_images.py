"""Bad images get a clear error; odd but valid images work; huge ones never exhaust memory."""

from __future__ import annotations

import io
import struct
import zlib

import numpy as np
import pytest
from PIL import Image

from hybrid.errors import UserError
from hybrid.images import open_image
from tests.helpers import ask, run


def png_bytes(img: Image.Image, **kwargs) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format=kwargs.pop("format", "PNG"), **kwargs)
    return buf.getvalue()


def huge_png(width: int, height: int) -> bytes:
    """A valid PNG header claiming width x height, with a tiny (truncated) body: small on disk."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(b"\0" * 1000))


@pytest.mark.parametrize(
    "data, message",
    [
        (b"", "not a readable image"),
        (b"%PDF-1.4 definitely not an image", "not a readable image"),
        (png_bytes(Image.new("RGB", (64, 64), "red"))[:80], "truncated or corrupt"),
        (huge_png(20000, 20000), "more than the limit"),
    ],
)
def test_bad_images_are_refused_clearly(data, message):
    with pytest.raises(UserError, match=message):
        open_image(data, max_pixels=50_000_000)


def test_missing_file(tmp_path):
    with pytest.raises(UserError, match="cannot open"):
        open_image(tmp_path / "nope.png")


def odd_images() -> dict[str, bytes]:
    rgba = Image.new("RGBA", (40, 30), (255, 0, 0, 128))
    exif_img = Image.new("RGB", (60, 20), "blue")
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees: upright it is 20 wide, 60 tall
    frames = [Image.new("P", (16, 16), i) for i in range(3)]
    gif = io.BytesIO()
    frames[0].save(gif, format="GIF", save_all=True, append_images=frames[1:])
    sixteen = Image.fromarray(np.arange(64 * 64, dtype=np.uint16).reshape(64, 64) * 16, mode="I;16")
    return {
        "1x1": png_bytes(Image.new("RGB", (1, 1), "white")),
        "wide": png_bytes(Image.new("RGB", (2000, 10), "white")),
        "tall": png_bytes(Image.new("RGB", (10, 2000), "white")),
        "RGBA": png_bytes(rgba),
        "LA": png_bytes(Image.new("LA", (20, 20), (100, 50))),
        "palette": png_bytes(Image.new("P", (20, 20), 3)),
        "CMYK": png_bytes(Image.new("CMYK", (20, 20), (0, 255, 0, 0)), format="JPEG"),
        "16-bit": png_bytes(sixteen),
        "animated GIF": gif.getvalue(),
        "EXIF-rotated": png_bytes(exif_img, exif=exif.tobytes()),
    }


@pytest.mark.parametrize("name", list(odd_images()))
def test_odd_images_open_as_rgb(name):
    img = open_image(odd_images()[name])
    assert img.mode == "RGB" and img.width >= 1 and img.height >= 1
    if name == "EXIF-rotated":
        assert img.size == (20, 60)
    if name == "RGBA":
        assert img.getpixel((0, 0)) == (255, 127, 127)  # composited on white


@pytest.mark.parametrize("name", ["1x1", "wide", "tall", "16-bit", "EXIF-rotated"])
def test_odd_images_get_answers(pipeline, name):
    pipe = pipeline("base")
    result = run(pipe, ask("What is this?", [open_image(odd_images()[name])], max_new_tokens=4), "hybrid")
    assert result["timings"]["vision_ms"] > 0 and len(result["timings"]["image_tokens"]) == 1
    assert result["timings"]["image_tokens"][0] >= 1, "the picture reached the model as image tokens"


@pytest.mark.parametrize("size", [(3000, 6), (2, 3000)])
def test_a_picture_too_thin_for_the_processor_is_a_user_error_on_every_route(pipeline, size):
    """Qwen-VL's processors refuse a side over 200 times the other: said as the user's error, not a
    route's fault, and the route serves the next picture."""
    pipe = pipeline("base")
    thin = ask("What is this?", [Image.new("RGB", size, "white")], max_new_tokens=2)
    for route in ("hybrid", "pytorch"):
        with pytest.raises(UserError, match=f"is {size[0]}x{size[1]} pixels.*at most 200 times"):
            run(pipe, thin, route)
    assert run(pipe, ask("What is this?", [Image.new("RGB", (2000, 10), "white")], max_new_tokens=2), "hybrid")
