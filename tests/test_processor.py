"""Our tokenization equals the HF processor's, except that typed special tokens stay plain text."""

from __future__ import annotations

import numpy as np
import pytest

from hybrid.processor import Processor, pixel_digest
from hybrid.recent import Recent
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
        np.testing.assert_array_equal(ours.image_grid_thw.numpy(), theirs["image_grid_thw"])


def test_a_picture_shown_again_is_not_processed_again(processor):
    """The next turn's copy of a picture (a new object, the same pixels) comes from the cache; the
    same picture at another budget, or other pixels, do not; each digest is its own pixels'."""

    def prepare(*images, budget=1024):
        return processor.prepare((Message("user", "?", images),), max_image_tokens=budget)

    first = prepare(RED, BLUE)
    hits = processor.pictures.hits
    again = prepare(RED.copy(), BLUE.copy())
    assert processor.pictures.hits == hits + 2
    assert again.image_digests == first.image_digests
    np.testing.assert_array_equal(again.pixel_values.numpy(), first.pixel_values.numpy())
    sizes = first.image_grid_thw.prod(-1).tolist()
    for i, digest in enumerate(first.image_digests):
        rows = first.pixel_values[sum(sizes[:i]) : sum(sizes[: i + 1])]
        assert digest == pixel_digest(rows, first.image_grid_thw[i : i + 1])
    hits = processor.pictures.hits
    smaller = prepare(RED, budget=4)
    changed = RED.copy()
    changed.putpixel((0, 0), (1, 2, 3))
    other = prepare(changed)
    assert processor.pictures.hits == hits
    assert len({first.image_digests[0], smaller.image_digests[0], other.image_digests[0]}) == 3


def test_recent_keeps_the_latest_within_its_bounds():
    kept = Recent(capacity=3, max_bytes=10, nbytes=len)
    for key in "abc":
        kept.put(key, "xx")
    assert kept.get("a") == "xx"  # now the most recent
    kept.put("d", "xx")
    assert list(kept.entries) == ["c", "a", "d"]
    kept.put("e", "xxxxxx")  # 12 bytes in all: the oldest goes
    assert list(kept.entries) == ["a", "d", "e"]
    kept.put("big", "x" * 11)
    assert "big" not in kept.entries and list(kept.entries) == ["a", "d", "e"]


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
