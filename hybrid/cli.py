"""Command-line pieces both entry points use (`app.py` and `python -m hybrid`)."""

from __future__ import annotations

import os

from hybrid.config import PREFILLS, VISION_BACKENDS, VisionBackend
from hybrid.routes.remote import RemoteConfig

AUTO_VISION = "auto"  # the command-line word for "ONNX where the bundle has it"
REMOTE_KEY_ENV = "HYBRID_REMOTE_KEY"  # the remote server's key, read when --remote-key is not given


def add_vision_argument(parser) -> None:
    """The `--vision` option of `app.py` and `generate` (`vision_backend` reads its value)."""
    parser.add_argument(
        "--vision",
        choices=(AUTO_VISION, *VISION_BACKENDS),
        default=AUTO_VISION,
        help="the hybrid route's vision tower: onnx (onnxruntime) or torch (PyTorch); "
        "auto: onnx where the bundle has it",
    )


def add_prefill_argument(parser) -> None:
    """The `--prefill` option of `app.py` and `generate` (`RuntimeConfig.prefill`)."""
    parser.add_argument(
        "--prefill",
        choices=PREFILLS,
        default=PREFILLS[0],
        help="an INT4 bundle's prompt pass: int8 (its int8 graph, about twice as fast on long prompts) "
        "or decoder (the INT4 decoder's own graph); fp32 bundles prefill in fp32",
    )


def vision_backend(choice: str) -> VisionBackend | None:
    """The backend a `--vision` choice names; None for `auto`."""
    return None if choice == AUTO_VISION else choice  # type: ignore[return-value]


def add_remote_arguments(parser) -> None:
    """`--remote URL`, `--remote-model`, `--remote-key` of `app.py` and `generate` (`remote_config` reads them)."""
    parser.add_argument(
        "--remote",
        metavar="URL",
        help="add a route to an OpenAI-compatible server (vLLM, llama.cpp, "
        "Ollama, another instance of this app), e.g. http://gpu-box:8000/v1",
    )
    parser.add_argument(
        "--remote-model", metavar="NAME", help="the model to ask the remote server for (default: the first it lists)"
    )
    parser.add_argument(
        "--remote-key",
        metavar="KEY",
        default=os.environ.get(REMOTE_KEY_ENV),
        help=f"the remote server's API key (default: ${REMOTE_KEY_ENV}, if set)",
    )


def remote_config(args) -> RemoteConfig | None:
    """The remote route the flags ask for, or None."""
    return RemoteConfig(args.remote, args.remote_model, args.remote_key) if args.remote else None
