"""Injection: masked_scatter order, the placeholder count check, and the dense DeepStack tensor."""

from __future__ import annotations

import numpy as np
import pytest

from hybrid.errors import UserError
from hybrid.injection import EmbeddingTable, inject
from hybrid.vision import VisionFeatures

IMAGE = 9


@pytest.fixture
def table(tmp_path) -> EmbeddingTable:
    np.save(tmp_path / "e.npy", np.arange(12 * 4, dtype=np.float32).reshape(12, 4))
    return EmbeddingTable(tmp_path / "e.npy")


def features(n: int, d: int = 2) -> VisionFeatures:
    embeds = -np.arange(n * 4, dtype=np.float32).reshape(n, 4) - 1
    return VisionFeatures(embeds, np.stack([embeds * (k + 2) for k in range(d)]))


def test_scatter_fills_placeholders_in_order(table):
    ids = np.array([[1, IMAGE, IMAGE, 2, IMAGE]])
    out = inject(ids, table, IMAGE, 2, features(3))
    f = features(3)
    np.testing.assert_array_equal(out.inputs_embeds[0, [1, 2, 4]], f.image_embeds)
    np.testing.assert_array_equal(out.inputs_embeds[0, [0, 3]], table.weight[[1, 2]])
    np.testing.assert_array_equal(out.deepstack_embeds[:, 0, [1, 2, 4]], f.deepstack_embeds)
    assert not out.deepstack_embeds[:, 0, [0, 3]].any()
    assert out.visual_pos_masks.tolist() == [[False, True, True, False, True]]


def test_count_mismatch_is_a_clear_error(table):
    ids = np.array([[1, IMAGE, IMAGE, 2]])
    with pytest.raises(UserError, match="2 <\\|image_pad\\|> tokens in the prompt, 3 image features"):
        inject(ids, table, IMAGE, 2, features(3))
    with pytest.raises(UserError, match="1 <\\|image_pad\\|> tokens"):
        inject(np.array([[IMAGE]]), table, IMAGE, 2, None)


def test_text_only_has_zero_deepstack(table):
    out = inject(np.array([[1, 2, 3]]), table, IMAGE, 3, None)
    assert out.deepstack_embeds.shape == (3, 1, 3, 4) and not out.deepstack_embeds.any()
