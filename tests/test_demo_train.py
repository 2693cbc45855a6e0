"""The demo training step: one vision pass shared by every row that shows a picture gives each row
exactly the loss of the ordinary per-row forward (the processor's own images path), conversations
are the chat template's own text, and a training resumed from its state goes on as if never stopped."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from hybrid.demo import train
from hybrid.demo.chat import conversation_prompt


def small_config(**changes) -> train.TrainConfig:
    return train.TrainConfig(pictures=3, questions=4, text_rows=1, **changes)


def test_shared_vision_rows_equal_the_standard_forward():
    torch.manual_seed(0)
    cfg = small_config(shape_weight=3.0, box_weight=2.0)
    model, processor = train.new_model(train.demo_spec())
    model.eval()
    pictures, rows = train.sample_step(np.random.default_rng(5), cfg)
    assert max(len(row.exchanges) for row in rows) > 1  # some rows are conversations
    batch = train.collate(processor, pictures, rows, train.LossWeights.of(processor.tokenizer, cfg))
    grids, spans = batch.pop("picture_grid_thw"), batch.pop("spans")
    weights = batch.pop("weights")
    with torch.no_grad():
        vision = model.model.visual(batch.pop("pixel_values"), grid_thw=grids, return_dict=True)
        per_picture = train._per_picture(vision, grids, processor.image_processor.merge_size)
        losses = train.Trainer(model, processor, cfg).row_losses(batch, rows, per_picture, grids)
        assert {row.picture for row in rows} == {0, 1, 2, None}
        for i, row in enumerate(rows):
            questions, answers = [e.question for e in row.exchanges], [e.answer for e in row.exchanges]
            text = "".join(train.row_segments(processor, row, [1, 1, 1])).replace(
                processor.image_token * 1, processor.image_token
            )
            # the whole conversation is the template's prompt for one more question, less that question
            assert conversation_prompt(processor, [*questions, "?"], answers, row.picture is not None).startswith(text)
            images = [pictures[row.picture].render()] if row.picture is not None else None
            alone = dict(processor(text=[text], images=images, return_tensors="pt"))
            length = int(alone["input_ids"].shape[1])
            assert torch.equal(alone["input_ids"][0], batch["input_ids"][i, :length])
            expected = train.token_losses(model(**alone).logits, batch["labels"][i : i + 1, :length])
            torch.testing.assert_close(losses[i, :length], expected[0], rtol=1e-5, atol=1e-4)
    row_spans = [s for s in spans if s.row == 0]
    assert [s.kind for s in row_spans] == [e.kind for e in rows[0].exchanges]
    assert [s.follow_up for s in row_spans] == [False] + [True] * (len(row_spans) - 1)
    shape_ids = train.shape_token_ids(processor.tokenizer)
    digit_ids = train.digit_token_ids(processor.tokenizer)
    labels = batch["labels"]
    assert torch.all(weights[labels == -100] == 0)
    on_shapes = torch.tensor([[t in shape_ids for t in r] for r in labels.tolist()]) & (labels != -100)
    assert on_shapes.any() and torch.all(weights[on_shapes] == 3.0)
    on_boxes = torch.zeros_like(on_shapes)
    for span in spans:
        if span.kind in train.scenes.GROUNDING_KINDS:
            answer = labels[span.row, span.start : span.end].tolist()
            on_boxes[span.row, span.start : span.end] = torch.tensor([t in digit_ids for t in answer])
    assert on_boxes.any() and torch.all(weights[on_boxes] == 2.0)
    # a sum's digits are not a box's: only grounding answers weigh their digits
    assert torch.all(weights[(labels != -100) & ~on_shapes & ~on_boxes] == 1.0)


def test_a_tower_step_trains_the_tower_and_the_probe_only():
    torch.manual_seed(0)
    cfg = small_config(tower_steps=5)
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


def test_a_resumed_training_ends_where_an_unbroken_one_does(tmp_path):
    spec = train.demo_spec(patch_size=16, max_pixels=128 * 128)
    cfg = small_config(steps=2, tower_steps=1, warmup=1)
    whole = train.start(tmp_path / "whole", tmp_path / "whole.state", cfg, spec)
    train.fit(whole)
    broken = train.start(tmp_path / "broken", tmp_path / "broken.state", cfg, spec)
    train.fit(broken, max_steps=2)  # the tower step and one joint step, then saved, as if killed after it
    resumed = train.resume(tmp_path / "broken.state")
    assert (resumed.phase, resumed.step) == ("joint", 1)
    train.fit(resumed)
    assert (resumed.phase, resumed.step) == ("joint", 2)
    for (name, a), b in zip(whole.trainer.model.state_dict().items(), resumed.trainer.model.state_dict().values()):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6, msg=name)
    assert not torch.equal(
        whole.trainer.model.lm_head.weight,
        train.start(tmp_path / "x", tmp_path / "x.state", cfg, spec).trainer.model.lm_head.weight,
    )


def test_a_tower_phase_resumed_with_an_end_it_has_passed_goes_on_to_the_joint_phase(tmp_path):
    spec = train.demo_spec(patch_size=16, max_pixels=128 * 128)
    run = train.start(tmp_path / "m", tmp_path / "m.state", small_config(steps=1, tower_steps=5, warmup=1), spec)
    train.fit(run, max_steps=3)
    resumed = train.resume(tmp_path / "m.state", tower_steps=2)
    assert (resumed.phase, resumed.step, resumed.trainer.cfg.tower_steps) == ("tower", 3, 2)
    train.fit(resumed)
    assert (resumed.phase, resumed.step) == ("joint", 1)


def test_bad_training_settings_are_refused_with_what_is_wrong():
    with pytest.raises(train.InvalidConfig, match="--tower-steps must not be negative"):
        train.TrainConfig(tower_steps=-1)
    with pytest.raises(train.InvalidConfig, match="must be positive"):
        train.TrainConfig(steps=0)
    with pytest.raises(train.InvalidConfig, match="image tokens"):
        train.demo_spec(patch_size=4, max_pixels=256 * 256)


def test_a_warm_start_begins_from_the_trained_model_and_keeps_its_record(tmp_path):
    spec = train.demo_spec(patch_size=16, max_pixels=128 * 128)
    first = train.start(tmp_path / "first", tmp_path / "first.state", small_config(steps=1, tower_steps=0), spec)
    out = train.finish(first)
    assert train.init_spec(out) == spec
    warm = train.start(
        tmp_path / "warm", tmp_path / "warm.state", small_config(steps=1, tower_steps=0, seed=3), spec, out
    )
    for (name, a), b in zip(first.trainer.model.state_dict().items(), warm.trainer.model.state_dict().values()):
        assert torch.equal(a, b), name
    assert warm.warm_start["model"] == str(out) and warm.warm_start["config"]["steps"] == 1
    record = json.loads((train.finish(warm) / train.TRAINING_RECORD).read_text())
    assert record["warm_start"]["model"] == str(out)
    other = train.demo_spec(patch_size=8, max_pixels=128 * 128)
    with pytest.raises(train.InvalidConfig, match="patch_size"):
        train.start(tmp_path / "x", tmp_path / "x.state", small_config(), other, out)
    with pytest.raises(train.InvalidConfig, match="not a trained demo model"):
        train.init_spec(tmp_path)
