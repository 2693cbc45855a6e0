"""A bundle's precision word says what each of its parts runs in."""

from __future__ import annotations

import pytest

from hybrid.config import Precisions
from hybrid.errors import UserError


def test_one_word_names_each_parts_precision():
    assert Precisions.of("fp32") == Precisions("fp32", "fp32", "fp32", "fp32") and not Precisions.of("fp32").vision_int8
    fast = Precisions.of("int4")
    assert (fast.vision, fast.decoder, fast.genai, fast.embeddings, fast.prompt) == (
        "int8",
        "int4",
        "int4",
        "fp16",
        "int8",
    ) and fast.vision_int8
    assert Precisions.of("fp32").prompt == "fp32"


def test_an_unknown_precision_is_refused_with_the_choices():
    with pytest.raises(UserError, match="fp32, int4"):
        Precisions.of("int8")
