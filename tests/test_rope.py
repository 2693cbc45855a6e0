"""Our numpy M-RoPE positions equal transformers' `get_rope_index`."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from transformers import Qwen3VLForConditionalGeneration

from hybrid.processor import Processor
from hybrid.rope import decode_position, get_rope_index
from hybrid.types import Message
from tests.conftest import draw_scene

SHAPES = {
    "text": [],
    "square": [(64, 64)],
    "wide": [(128, 32)],
    "tall": [(32, 128)],
    "two": [(96, 64), (64, 96)],
}


@pytest.fixture(scope="module")
def model_and_processor(checkpoint):
    path = checkpoint("base")
    return Qwen3VLForConditionalGeneration.from_pretrained(str(path)).eval(), Processor(path, max_context=4096)


@pytest.mark.parametrize("shape", list(SHAPES))
def test_positions_match_transformers(model_and_processor, shape):
    model, processor = model_and_processor
    images = tuple(draw_scene(size, (200, 0, 0)) for size in SHAPES[shape])
    inputs = processor.prepare((Message("user", "Look here and then answer.", images),))
    grid = None if inputs.image_grid_thw is None else inputs.image_grid_thw.numpy()
    ours, delta = get_rope_index(inputs.mm_token_type_ids, grid, spatial_merge_size=2)
    if grid is None:
        expected = np.broadcast_to(np.arange(inputs.num_tokens), (3, 1, inputs.num_tokens))
        expected_delta = 0
    else:
        ref, ref_delta = model.model.get_rope_index(
            torch.from_numpy(inputs.input_ids),
            mm_token_type_ids=torch.from_numpy(inputs.mm_token_type_ids),
            image_grid_thw=inputs.image_grid_thw,
        )
        expected, expected_delta = ref.numpy(), int(ref_delta[0, 0])
        assert delta <= 0, "an image never takes more positions than tokens"
    np.testing.assert_array_equal(ours, expected)
    assert delta == expected_delta
    assert decode_position(inputs.num_tokens, delta).ravel().tolist() == [inputs.num_tokens + delta] * 3
