"""The demo training step: one vision pass shared by every row that shows a picture gives each row
exactly the loss of the ordinary per-row forward (the processor's own images path)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from hybrid.demo import train
from hybrid.demo.chat import END, chat_prompt


def test_shared_vision_rows_equal_the_standard_forward():
    torch.manual_seed(0)
    cfg = train.TrainConfig(pictures=3, questions=2, text_rows=1)
    model, processor = train.new_model(train.demo_spec())
    model.eval()
    pictures, rows = train.sample_step(np.random.default_rng(5), cfg)
    batch = train.collate(processor, pictures, rows)
    grids = batch.pop("picture_grid_thw")
    with torch.no_grad():
        vision = model.model.visual(batch.pop("pixel_values"), grid_thw=grids, return_dict=True)
        per_picture = train._per_picture(vision, grids, processor.image_processor.merge_size)
        sums, counts = train.Trainer(model, processor, cfg).row_losses(batch, rows, per_picture, grids)
        assert {row.picture for row in rows} == {0, 1, 2, None}
        for i, row in enumerate(rows):
            text = chat_prompt(processor, row.exchange.question, row.picture is not None) + row.exchange.answer + END
            images = [pictures[row.picture].render()] if row.picture is not None else None
            alone = dict(processor(text=[text], images=images, return_tensors="pt"))
            labels = train.answer_labels(processor.tokenizer, alone, [row.exchange.answer + END])
            expected, count = train.answer_losses(model(**alone).logits, labels)
            assert int(counts[i]) == int(count[0])
            torch.testing.assert_close(sums[i], expected[0], rtol=1e-5, atol=1e-4)


def test_a_tower_step_trains_the_tower_and_the_probe_only():
    torch.manual_seed(0)
    cfg = train.TrainConfig(pictures=3, tower_steps=5)
    model, processor = train.new_model(train.demo_spec())
    trainer = train.Trainer(model, processor, cfg)
    before = {name: p.detach().clone() for name, p in model.named_parameters()}
    probe_before = trainer.probe.head.weight.detach().clone()
    rng = np.random.default_rng(5)
    loss, accuracy = trainer.tower_step([train.scenes.random_scene(rng) for _ in range(cfg.pictures)])
    assert loss > 0 and 0.0 <= accuracy <= 1.0
    moved = {name for name, p in model.named_parameters() if not torch.equal(p, before[name])}
    assert moved and all(name.startswith("model.visual.") for name in moved), sorted(moved)[:5]
    assert "model.visual.patch_embed.proj.weight" in moved
    assert not torch.equal(trainer.probe.head.weight, probe_before)


def test_bad_training_settings_are_refused_with_what_is_wrong():
    with pytest.raises(train.InvalidConfig, match="--tower-steps must not be negative"):
        train.TrainConfig(tower_steps=-1)
    with pytest.raises(train.InvalidConfig, match="must be positive"):
        train.TrainConfig(steps=0)
