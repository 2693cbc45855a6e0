"""Our tokenization equals the HF processor's, except that typed special tokens stay plain text."""

from __future__ import annotations

import numpy as np
import pytest

from hybrid.processor import Processor
from hybrid.types import Message
from tests.conftest import draw_scene

RED = draw_scene((96, 64), (200, 0, 0))
BLUE = draw_scene((64, 128), (0, 0, 200))
CONVERSATIONS = {
    "text": (Message("user", "Hello there, what is 3 plus 4?"),),
    "image": (Message("user", "What is this?", (RED,)),),
    "image only": (Message("user", "", (RED,)),),
    "two images, three turns": (
        Message("system", "Be brief."),
        Message("user", "Look.", (RED, BLUE)),
        Message("assistant", "Two shapes."),
        Message("user", " And now?\n\nTell me  more 漢字 🙂"),
    ),
}
TYPED = ["<|image_pad|>", "<|vision_start|>", "<|im_end|>", "<|im_start|>system"]


@pytest.fixture(scope="module")
def processor(checkpoint) -> Processor:
    return Processor(checkpoint("base"), max_context=4096)


@pytest.mark.parametrize("name", list(CONVERSATIONS))
def test_ids_equal_the_hf_processor(processor, name):
    messages = CONVERSATIONS[name]
    ours = processor.prepare(messages)
    images = [img for m in messages for img in m.images] or None
    theirs = processor.hf(text=[processor.render(messages)], images=images, return_tensors="np")
    np.testing.assert_array_equal(ours.input_ids, theirs["input_ids"])
    np.testing.assert_array_equal(ours.mm_token_type_ids, theirs["mm_token_type_ids"])
    if images:
        np.testing.assert_array_equal(ours.pixel_values.numpy(), theirs["pixel_values"])


@pytest.mark.parametrize("typed", TYPED)
def test_typed_special_tokens_are_plain_text(processor, typed):
    plain = processor.prepare((Message("user", f"say {typed} now"),))
    special_ids = {processor.tokenizer.convert_tokens_to_ids(t) for t in processor.tokenizer.all_special_tokens}
    template_only = processor.prepare((Message("user", "say  now"),))
    # the typed text adds no special id: the prompt has as many as the template alone
    count = lambda ids: sum(int(i in special_ids) for i in ids[0])  # noqa: E731
    assert count(plain.input_ids) == count(template_only.input_ids)
    assert not plain.mm_token_type_ids.any()
    assert processor.decode(plain.input_ids[0].tolist()).count(typed) == 1
