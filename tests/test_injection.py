"""Injection: masked_scatter order, the placeholder count check, and the dense DeepStack tensor."""

from __future__ import annotations

import numpy as np
import pytest

from hybrid import media
from hybrid.errors import UserError
from hybrid.injection import EmbeddingTable, inject
from hybrid.vision import VisionFeatures

IMAGE = 9
TOKEN_IDS = {media.IMAGE: IMAGE}


@pytest.fixture
def table(tmp_path) -> EmbeddingTable:
    np.save(tmp_path / "e.npy", np.arange(12 * 4, dtype=np.float32).reshape(12, 4))
    return EmbeddingTable(tmp_path / "e.npy")


def features(n: int, d: int = 2) -> VisionFeatures:
    embeds = -np.arange(n * 4, dtype=np.float32).reshape(n, 4) - 1
    return VisionFeatures(embeds, np.stack([embeds * (k + 2) for k in range(d)]))


def test_scatter_fills_placeholders_in_order(table):
    ids = np.array([[1, IMAGE, IMAGE, 2, IMAGE]])
    out = inject(ids, table, TOKEN_IDS, 2, {media.IMAGE: features(3)})
    f = features(3)
    np.testing.assert_array_equal(out.inputs_embeds[0, [1, 2, 4]], f.image_embeds)
    np.testing.assert_array_equal(out.inputs_embeds[0, [0, 3]], table.weight[[1, 2]])
    np.testing.assert_array_equal(out.deepstack_embeds[:, 0, [1, 2, 4]], f.deepstack_embeds)
    assert not out.deepstack_embeds[:, 0, [0, 3]].any()
    assert out.visual_pos_masks.tolist() == [[False, True, True, False, True]]


def test_count_mismatch_is_a_clear_error(table):
    ids = np.array([[1, IMAGE, IMAGE, 2]])
    with pytest.raises(UserError, match="2 <\\|image_pad\\|> tokens in the prompt, 3 image features"):
        inject(ids, table, TOKEN_IDS, 2, {media.IMAGE: features(3)})
    with pytest.raises(UserError, match="1 <\\|image_pad\\|> tokens"):
        inject(np.array([[IMAGE]]), table, TOKEN_IDS, 2, {})


def test_text_only_has_zero_deepstack(table):
    out = inject(np.array([[1, 2, 3]]), table, TOKEN_IDS, 3, {})
    assert out.deepstack_embeds.shape == (3, 1, 3, 4) and not out.deepstack_embeds.any()


def test_each_kind_fills_its_own_pads(table):
    video = 10
    ids = np.array([[IMAGE, 1, video, video]])
    images, videos = features(1), features(2)
    out = inject(ids, table, {**TOKEN_IDS, media.VIDEO: video}, 2, {media.IMAGE: images, media.VIDEO: videos})
    np.testing.assert_array_equal(out.inputs_embeds[0, [0]], images.image_embeds)
    np.testing.assert_array_equal(out.inputs_embeds[0, [2, 3]], videos.image_embeds)
    np.testing.assert_array_equal(out.deepstack_embeds[:, 0, [2, 3]], videos.deepstack_embeds)
    assert out.visual_pos_masks.tolist() == [[True, False, True, True]]
    with pytest.raises(UserError, match="2 <\\|video_pad\\|> tokens in the prompt, 0 video features"):
        inject(ids, table, {**TOKEN_IDS, media.VIDEO: video}, 2, {media.IMAGE: images})
