"""Logging for the entry points (`app.py`, `python -m hybrid`, `python -m hybrid.demo`, bench
workers): one format on stderr, and the chatty libraries held at warnings."""

from __future__ import annotations

import logging
import sys

FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"
NOISY = ("httpx", "urllib3", "huggingface_hub", "transformers")


def setup_logging(level: int = logging.INFO) -> None:
    logging.basicConfig(level=level, format=FORMAT, stream=sys.stderr)
    for name in NOISY:
        logging.getLogger(name).setLevel(logging.WARNING)
