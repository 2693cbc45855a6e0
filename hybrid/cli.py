"""Command-line pieces both entry points use (`app.py` and `python -m hybrid`)."""

from __future__ import annotations

from hybrid.config import VISION_BACKENDS, VisionBackend

AUTO_VISION = "auto"  # the command-line word for "ONNX where the bundle has it"


def add_vision_argument(parser) -> None:
    """The `--vision` option of `app.py` and `generate` (`vision_backend` reads its value)."""
    parser.add_argument(
        "--vision",
        choices=(AUTO_VISION, *VISION_BACKENDS),
        default=AUTO_VISION,
        help="the hybrid route's vision tower: onnx (onnxruntime) or torch (PyTorch); "
        "auto: onnx where the bundle has it",
    )


def vision_backend(choice: str) -> VisionBackend | None:
    """The backend a `--vision` choice names; None for `auto`."""
    return None if choice == AUTO_VISION else choice  # type: ignore[return-value]
