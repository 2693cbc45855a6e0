"""Trains the demo Qwen3-VL from scratch on synthetic scenes, on the CPU, reproducibly from a seed.

`train(out_dir, TrainConfig(...))` builds the model of `demo_spec()`, teaches it the language of
`hybrid.demo.scenes` with a teacher-forced loss on the answer tokens only, and writes a normal
checkpoint folder (weights, tokenizer, processor) with `hybrid.tiny.build_checkpoint`.

Each step draws a few pictures and asks several questions about each: the vision tower runs once
per picture and its features are handed to every row that shows it (`mm_encoder_outputs`), which
is where most of the CPU time would otherwise go. A training-only dense probe reads shape, colour
and box from every image token, so the tower learns to see before the decoder learns to talk.
"""

from __future__ import annotations

import json
import logging
import math
import time
from collections import defaultdict
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
from transformers import AutoTokenizer, Qwen3VLForConditionalGeneration
from transformers.models.qwen3_vl.modeling_qwen3_vl import BaseModelOutputWithDeepstackFeatures

from hybrid.demo import scenes
from hybrid.demo.chat import END, chat_prompt
from hybrid.tiny import TinySpec, build_checkpoint, build_config, build_processor, build_tokenizer

log = logging.getLogger(__name__)

TRAINING_RECORD = "training.json"
# How often each kind is asked about a picture (a kind a picture cannot answer is skipped).
KIND_WEIGHTS = {
    "shape": 1.5, "colour": 1.5, "position": 1.5, "count": 1.0, "colour_of": 1.0, "position_of": 1.2,
    "describe": 1.2, "find": 1.6, "locate_all": 1.2,
}  # fmt: skip


class InvalidConfig(ValueError):
    """A training setting out of range."""


@dataclass(frozen=True)
class TrainConfig:
    """Optimisation and data-mixture settings; `threads` is torch's intra-op thread count."""

    steps: int = 3200
    tower_steps: int = 0  # first, steps that train only the vision tower and the probe (no decoder: cheap)
    pictures: int = 24  # distinct pictures per step
    questions: int = 2  # questions asked about each picture per step
    text_rows: int = 3  # text-only exchanges per step, no picture
    lr: float = 2e-3
    min_lr_ratio: float = 0.05
    warmup: int = 100
    weight_decay: float = 0.05
    grad_clip: float = 1.0
    text_with_image: float = 0.1  # share of a picture's questions that are unrelated text exchanges
    fixed_text_fraction: float = 0.2  # share of text exchanges that are not sums
    probe_weight: float = 0.5  # weight of the training-only dense vision probe (0: off)
    seed: int = 0
    threads: int = 2
    log_every: int = 25

    def __post_init__(self) -> None:
        if min(self.steps, self.pictures, self.questions, self.threads) < 1:
            raise InvalidConfig("--steps, --pictures, --questions and --threads must be positive")
        if min(self.text_rows, self.tower_steps) < 0:
            raise InvalidConfig("text_rows and --tower-steps must not be negative")
        for name in ("text_with_image", "fixed_text_fraction", "min_lr_ratio"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise InvalidConfig(f"{name} must be in [0, 1]")


@dataclass(frozen=True)
class Example:
    """One training row: an exchange and the index of the picture it shows (None: no picture)."""

    exchange: scenes.Exchange
    picture: int | None


def demo_spec() -> TinySpec:
    """The demo model's shapes. A picture is scaled to at most 256x256 pixels (64 image tokens)."""
    return TinySpec(
        hidden_size=128,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=32,
        intermediate_size=384,
        mrope_section=(8, 4, 4),
        vision_depth=4,
        vision_hidden_size=128,
        vision_heads=4,
        vision_intermediate_size=512,
        rope_theta=1000.0,  # the image grids are at most 16 positions wide: frequencies must turn within them
        num_position_embeddings=256,
        deepstack_visual_indexes=(1, 2),
        min_pixels=128 * 128,
        max_pixels=256 * 256,
        initializer_range=0.02,
        bpe_vocab_size=640,
        corpus=scenes.corpus(),
    )


def new_model(spec: TinySpec):
    """A randomly initialised `Qwen3VLForConditionalGeneration` and its processor (seed torch first)."""
    tokenizer = build_tokenizer(spec.corpus, spec.bpe_vocab_size)
    processor = build_processor(tokenizer, spec)
    model = Qwen3VLForConditionalGeneration(build_config(spec, tokenizer))
    return model, processor


def parameter_count(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def text_exchange(rng: np.random.Generator, cfg: TrainConfig) -> scenes.Exchange:
    if rng.random() < cfg.fixed_text_fraction:
        question = str(rng.choice(list(scenes.FIXED_EXCHANGES)))
        return scenes.Exchange("text", question, scenes.FIXED_EXCHANGES[question])
    a, b, phrasing = rng.integers(0, 10), rng.integers(0, 10), rng.integers(0, len(scenes.SUM_QUESTIONS))
    return scenes.sum_exchange(int(a), int(b), int(phrasing))


def picture_exchanges(scene: scenes.Scene, rng: np.random.Generator, cfg: TrainConfig) -> list[scenes.Exchange]:
    """`cfg.questions` questions of distinct kinds about `scene` (now and then an unrelated text one)."""
    kinds = [k for k in scenes.IMAGE_KINDS if scenes.askable(k, scene)]
    weights = np.array([KIND_WEIGHTS[k] for k in kinds])
    chosen = rng.choice(kinds, size=min(cfg.questions, len(kinds)), replace=False, p=weights / weights.sum())
    return [text_exchange(rng, cfg) if rng.random() < cfg.text_with_image else scenes.ask(str(k), scene, rng) for k in chosen]


def sample_step(rng: np.random.Generator, cfg: TrainConfig) -> tuple[list[scenes.Scene], list[Example]]:
    """The pictures of one step and its rows: questions about each picture, then text-only rows."""
    pictures = [scenes.random_scene(rng) for _ in range(cfg.pictures)]
    rows = [Example(e, i) for i, scene in enumerate(pictures) for e in picture_exchanges(scene, rng, cfg)]
    rows += [Example(text_exchange(rng, cfg), None) for _ in range(cfg.text_rows)]
    return pictures, rows


def row_text(processor, example: Example, image_tokens: list[int]) -> str:
    """Prompt + answer + `END`, with the picture's pads already expanded to its token count."""
    pictured = example.picture is not None
    prompt = chat_prompt(processor, example.exchange.question, pictured)
    if pictured:
        prompt = prompt.replace(processor.image_token, processor.image_token * image_tokens[example.picture])
    return prompt + example.exchange.answer + END


def collate(processor, pictures: list[scenes.Scene], rows: list[Example]) -> dict[str, torch.Tensor]:
    """Pixels of each distinct picture once; token ids, labels and grids per row (right-padded)."""
    images = processor.image_processor(images=[p.render() for p in pictures], return_tensors="pt")
    merge = processor.image_processor.merge_size
    tokens = (images["image_grid_thw"].prod(-1) // merge**2).tolist()
    texts = [row_text(processor, row, tokens) for row in rows]
    batch = dict(processor.tokenizer(texts, padding=True, padding_side="right", return_tensors="pt"))
    batch["mm_token_type_ids"] = (batch["input_ids"] == processor.image_token_id).int()
    batch["labels"] = answer_labels(processor.tokenizer, batch, [r.exchange.answer + END for r in rows])
    batch["pixel_values"], batch["picture_grid_thw"] = images["pixel_values"], images["image_grid_thw"]
    return batch


def answer_labels(tokenizer, batch: dict[str, torch.Tensor], answers: list[str]) -> torch.Tensor:
    """Labels `(B, S)`: the answer's token ids at the end of each row, -100 on prompt and padding."""
    input_ids, lengths = batch["input_ids"], batch["attention_mask"].sum(dim=1)
    labels = torch.full_like(input_ids, -100)
    for row, (text, length) in enumerate(zip(answers, lengths.tolist())):
        ids = torch.tensor(tokenizer(text, add_special_tokens=False)["input_ids"])
        start = length - len(ids)
        if not torch.equal(input_ids[row, start:length], ids):
            raise ValueError(f"answer {text!r} does not tokenise the same inside the prompt; change its wording")
        labels[row, start:length] = ids
    return labels


def lr_factor(step: int, total: int, cfg: TrainConfig) -> float:
    """Linear warm-up, then cosine decay to `cfg.min_lr_ratio` at step `total`."""
    if step < cfg.warmup:
        return (step + 1) / cfg.warmup
    progress = (step - cfg.warmup) / max(1, total - cfg.warmup)
    return cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))


class VisionProbe(torch.nn.Module):
    """Training-only dense read-out of the vision tower's merged tokens: for each token, the shape
    and colour under it (or background) and the box of that shape.

    Otherwise the tower learns only through the decoder's answers, which is slow on a CPU budget;
    the probe gives every token a direct signal. It is dropped after training and never saved.
    """

    def __init__(self, hidden_size: int) -> None:
        super().__init__()
        self.head = torch.nn.Linear(hidden_size, 1 + len(scenes.SHAPES) + 1 + len(scenes.COLOURS) + 4)

    def loss(
        self, image_embeds: torch.Tensor, pictures: list[scenes.Scene], grids: torch.Tensor, merge: int
    ) -> tuple[torch.Tensor, float]:
        """`image_embeds` `(tokens, H)` of `pictures` in order; `grids` `(N, 3)` their patch grids.
        Returns the loss and the share of shape tokens whose shape the probe names."""
        shapes, colours, boxes, covered = zip(*(probe_targets(p, h // merge, w // merge) for p, (_, h, w) in zip(pictures, grids.tolist())))
        shapes, colours, boxes, covered = torch.cat(shapes), torch.cat(colours), torch.cat(boxes), torch.cat(covered)
        out = self.head(image_embeds)  # (tokens, 5 + 7 + 4)
        n_shape = 1 + len(scenes.SHAPES)
        loss = torch.nn.functional.cross_entropy(out[:, :n_shape], shapes)
        loss = loss + torch.nn.functional.cross_entropy(out[:, n_shape:-4], colours)
        if covered.any():
            loss = loss + 5 * torch.nn.functional.l1_loss(out[covered, -4:].sigmoid(), boxes[covered])
        return loss, (out[covered, 1:n_shape].argmax(-1) + 1 == shapes[covered]).float().mean().item()


def probe_targets(scene: scenes.Scene, rows: int, cols: int) -> tuple[torch.Tensor, ...]:
    """Per merged token (row-major, `rows` x `cols`): shape id, colour id (0: background), the box
    `(x1, y1, x2, y2)` in [0, 1] of the shape under it, and whether one is."""
    ys, xs = np.meshgrid((np.arange(rows) + 0.5) / rows, (np.arange(cols) + 0.5) / cols, indexing="ij")
    ys, xs = ys.ravel(), xs.ravel()
    shape_ids, colour_ids = np.zeros(rows * cols, np.int64), np.zeros(rows * cols, np.int64)
    boxes = np.zeros((rows * cols, 4), np.float32)
    for item in scene.items:
        r = 0.7 * item.radius(scene.width, scene.height)
        near = np.hypot((xs - item.x) * scene.width, (ys - item.y) * scene.height) <= r
        near[min(int(item.y * rows), rows - 1) * cols + min(int(item.x * cols), cols - 1)] = True
        shape_ids[near] = 1 + scenes.SHAPES.index(item.shape)
        colour_ids[near] = 1 + list(scenes.COLOURS).index(item.colour)
        boxes[near] = np.array(scene.box_2d(item), np.float32) / scenes.SCALE
    return torch.from_numpy(shape_ids), torch.from_numpy(colour_ids), torch.from_numpy(boxes), torch.from_numpy(shape_ids > 0)


def answer_losses(logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Next-token cross-entropy summed per row `(B,)`, and the answer tokens per row `(B,)`."""
    targets = labels[:, 1:]  # (B, S-1): position t predicts token t+1
    losses = torch.nn.functional.cross_entropy(logits[:, :-1].transpose(1, 2), targets, ignore_index=-100, reduction="none")
    return losses.sum(dim=1), (targets != -100).sum(dim=1)


class Trainer:
    """The model, its processor, the optimiser and the vision probe, stepped one batch at a time:
    `tower_step` trains the tower and the probe alone, `step` everything."""

    def __init__(self, model, processor, cfg: TrainConfig) -> None:
        self.model, self.processor, self.cfg = model, processor, cfg
        self.merge = processor.image_processor.merge_size
        self.probe = VisionProbe(model.config.vision_config.out_hidden_size)
        self.tower_trainable = [*model.model.visual.parameters(), *self.probe.parameters()]
        self.tower_optimizer, self.tower_schedule = self._optimiser(self.tower_trainable, cfg.tower_steps)
        self.trainable = [*model.parameters(), *self.probe.parameters()]
        self.optimizer, self.schedule = self._optimiser(self.trainable, cfg.steps)

    def _optimiser(self, params: list[torch.nn.Parameter], steps: int):
        optimizer = torch.optim.AdamW(params, lr=self.cfg.lr, betas=(0.9, 0.98), weight_decay=self.cfg.weight_decay)
        return optimizer, torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: lr_factor(step, steps, self.cfg))

    def tower_step(self, pictures: list[scenes.Scene]) -> tuple[float, float]:
        """One optimiser step of the tower and the probe on the probe's loss; returns that loss and
        the share of shape tokens the probe names right."""
        images = self.processor.image_processor(images=[p.render() for p in pictures], return_tensors="pt")
        grids = images["image_grid_thw"]
        vision = self.model.model.visual(images["pixel_values"], grid_thw=grids, return_dict=True)
        loss, shape_accuracy = self.probe.loss(vision.pooler_output, pictures, grids, self.merge)
        self._update(loss, self.tower_optimizer, self.tower_schedule, self.tower_trainable)
        return loss.item(), shape_accuracy

    def _update(self, loss: torch.Tensor, optimizer, schedule, params: list[torch.nn.Parameter]) -> None:
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, self.cfg.grad_clip)
        optimizer.step()
        schedule.step()

    def step(self, pictures: list[scenes.Scene], rows: list[Example]) -> tuple[torch.Tensor, float, float]:
        """One optimiser step on the answer tokens' mean loss (+ probe); returns per-row losses `(B,)`,
        the probe's loss and its shape accuracy."""
        batch = collate(self.processor, pictures, rows)
        grids = batch.pop("picture_grid_thw")
        vision = self.model.model.visual(batch.pop("pixel_values"), grid_thw=grids, return_dict=True)
        per_picture = _per_picture(vision, grids, self.merge)
        sums, counts = self.row_losses(batch, rows, per_picture, grids)
        loss = sums.sum() / counts.sum()
        probe, shape_accuracy = self.probe.loss(vision.pooler_output, pictures, grids, self.merge)
        self._update(loss + self.cfg.probe_weight * probe, self.optimizer, self.schedule, self.trainable)
        return (sums / counts).detach(), probe.item(), shape_accuracy

    def row_losses(self, batch, rows: list[Example], per_picture, grids) -> tuple[torch.Tensor, torch.Tensor]:
        """The decoder's per-row losses, short rows and long rows in two passes (less padding);
        `per_picture`: the tower's output split per picture, handed to the rows that show it."""
        lengths = batch["attention_mask"].sum(dim=1)
        order = torch.argsort(lengths)
        sums, counts = torch.zeros(len(rows)), torch.zeros(len(rows), dtype=torch.long)
        for part in (order[: len(rows) // 2], order[len(rows) // 2 :]):
            part = part.sort().values  # keep the rows' order: the image features follow it
            width = int(lengths[part].max())
            sub = {k: v[part, :width] for k, v in batch.items()}
            labels = sub.pop("labels")
            shown = [rows[i].picture for i in part.tolist() if rows[i].picture is not None]
            extra = {}
            if shown:
                extra = {
                    "image_grid_thw": grids[shown],
                    "mm_encoder_outputs": {"image": BaseModelOutputWithDeepstackFeatures(
                        pooler_output=tuple(per_picture[0][i] for i in shown),
                        deepstack_features=[tuple(level[i] for i in shown) for level in per_picture[1]],
                    )},
                }  # fmt: skip
            part_sums, part_counts = answer_losses(self.model(**sub, **extra).logits, labels)
            sums = sums.index_put((part,), part_sums)
            counts[part] = part_counts
        return sums, counts


def _per_picture(vision, grids: torch.Tensor, merge: int) -> tuple[tuple[torch.Tensor, ...], list[tuple[torch.Tensor, ...]]]:
    """The tower's merged tokens and DeepStack maps split per picture."""
    sizes = (grids.prod(-1) // merge**2).tolist()
    return torch.split(vision.pooler_output, sizes), [torch.split(f, sizes) for f in vision.deepstack_features]


def fit(model, processor, cfg: TrainConfig) -> float:
    """Run `cfg.tower_steps` steps of the tower alone, then `cfg.steps` of the whole model, in place,
    logging the losses; returns the seconds spent."""
    rng = np.random.default_rng(cfg.seed)
    trainer = Trainer(model, processor, cfg)
    model.train()
    start, window, probes = time.perf_counter(), defaultdict(list), []
    for step in range(1, cfg.tower_steps + 1):
        probes.append(trainer.tower_step([scenes.random_scene(rng) for _ in range(cfg.pictures)]))
        if step % cfg.log_every == 0 or step == cfg.tower_steps:
            loss, accuracy = np.mean(probes, axis=0)
            log.info("tower step %d/%d probe %.3f shape accuracy %.2f lr %.2e elapsed %.0fs", step, cfg.tower_steps,
                     loss, accuracy, trainer.tower_schedule.get_last_lr()[0], time.perf_counter() - start)  # fmt: skip
            probes.clear()
    for step in range(1, cfg.steps + 1):
        pictures, rows = sample_step(rng, cfg)
        losses, *probe = trainer.step(pictures, rows)
        probes.append(probe)
        for row, loss in zip(rows, losses.tolist()):
            window[row.exchange.kind].append(loss)
        if step % cfg.log_every == 0 or step == cfg.steps:
            per_kind = " ".join(f"{k} {np.mean(v):.3f}" for k, v in sorted(window.items()))
            loss, accuracy = np.mean(probes, axis=0)
            log.info("step %d/%d loss %s probe %.3f shape accuracy %.2f lr %.2e elapsed %.0fs", step, cfg.steps,
                     per_kind, loss, accuracy, trainer.schedule.get_last_lr()[0], time.perf_counter() - start)  # fmt: skip
            window.clear()
            probes.clear()
    model.eval()
    return time.perf_counter() - start


def train(out_dir: str | Path, cfg: TrainConfig = TrainConfig(), spec: TinySpec | None = None) -> Path:
    """Train from scratch and write the checkpoint (plus `training.json`) to `out_dir`."""
    spec = spec or demo_spec()
    torch.set_num_threads(cfg.threads)
    torch.manual_seed(cfg.seed)
    model, processor = new_model(spec)
    shapes = {k: v for k, v in asdict(spec).items() if k != "corpus"}
    log.info("model: %d parameters, spec %s", parameter_count(model), shapes)
    seconds = fit(model, processor, cfg)
    out = build_checkpoint(out_dir, spec, model=model)
    check_saved_tokenizer(out, processor.tokenizer)
    record = {"spec": shapes, "config": asdict(cfg), "parameters": parameter_count(model), "train_seconds": round(seconds, 1)}
    (out / TRAINING_RECORD).write_text(json.dumps(record, indent=2) + "\n")
    log.info("trained %d steps in %.0fs; wrote %s", cfg.steps, seconds, out)
    return out


def check_saved_tokenizer(out: Path, tokenizer) -> None:
    """`build_checkpoint` rebuilds the tokenizer from the corpus: it must be the one we trained with."""
    if AutoTokenizer.from_pretrained(out).get_vocab() != tokenizer.get_vocab():
        raise RuntimeError(f"the tokenizer saved in {out} differs from the training one")
