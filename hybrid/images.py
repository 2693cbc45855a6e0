"""Opening and normalising user images: upright, RGB, within a pixel budget, or a clear error."""

from __future__ import annotations

import io
from pathlib import Path

from PIL import Image, ImageOps, UnidentifiedImageError

from hybrid.config import MAX_IMAGE_PIXELS
from hybrid.errors import UserError


def open_image(source: str | Path | bytes, max_pixels: int = MAX_IMAGE_PIXELS) -> Image.Image:
    """Open a file path or raw bytes as an upright RGB image, refusing anything that is not one."""
    name = "image" if isinstance(source, bytes) else Path(source).name  # never the server's folders
    try:
        fp = io.BytesIO(source) if isinstance(source, bytes) else open(source, "rb")
    except OSError as exc:
        raise UserError(f"cannot open {name}: {exc.strerror or exc}") from exc
    with fp:
        try:
            with Image.open(fp) as img:
                _check_size(img, name, max_pixels)
                img.seek(0)  # first frame of an animation
                img.load()
                return to_rgb(img)
        except Image.DecompressionBombError as exc:
            raise UserError(f"{name} has more than the limit of {max_pixels:,} pixels: scale it down first") from exc
        except UnidentifiedImageError as exc:
            raise UserError(f"{name} is not a readable image (PNG, JPEG, GIF, WebP, BMP, TIFF ...)") from exc
        except (OSError, SyntaxError, ValueError) as exc:
            raise UserError(f"{name} is truncated or corrupt: {exc}") from exc


def to_rgb(img: Image.Image) -> Image.Image:
    """EXIF-rotated upright, alpha composited on white, any mode (palette, CMYK, 16-bit) to RGB."""
    img = ImageOps.exif_transpose(img)
    if img.mode in ("I;16", "I;16B", "I;16L", "I"):
        img = img.point(lambda v: v / 256).convert("L")
    if img.mode in ("RGBA", "LA", "PA") or (img.mode == "P" and "transparency" in img.info):
        rgba = img.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        img = Image.alpha_composite(background, rgba)
    return img.convert("RGB") if img.mode != "RGB" else img


def _check_size(img: Image.Image, name: str, max_pixels: int) -> None:
    width, height = img.size
    if width < 1 or height < 1:
        raise UserError(f"{name} has no pixels")
    if width * height > max_pixels:
        raise UserError(
            f"{name} is {width}x{height} = {width * height:,} pixels, more than the limit of {max_pixels:,}: "
            "scale it down first"
        )
