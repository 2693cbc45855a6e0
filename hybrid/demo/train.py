"""Trains the demo Qwen3-VL from scratch on synthetic scenes, reproducibly from a seed, on the CPU
or a GPU, resumable from its checkpoints.

`train(out_dir, TrainConfig(...), demo_spec(...))` builds the model, teaches it the language of
`hybrid.demo.scenes` with a teacher-forced loss on the answer tokens only (the shape words weighed
`shape_weight` times, a box's digits `box_weight` times), and writes a normal checkpoint folder
with `hybrid.tiny.build_checkpoint`.

Each row is a conversation: one to `questions` questions about one picture, each answer in the
history of the next, rendered by the chat template exactly as the app sends a follow-up. The vision
tower runs once per picture and its features are handed to the row that shows it
(`mm_encoder_outputs`). A training-only dense probe reads shape, colour and box from every image
token, alone first (`tower_steps`: the tower learns to see before the decoder learns to talk) and
beside the answers after. Every `checkpoint_minutes` the whole state (model, probe, optimisers,
schedules, step, RNGs, curves) goes to `state_dir/state.pt`; `resume` continues from it.
"""

from __future__ import annotations

import json
import logging
import math
import time
from collections import defaultdict
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import numpy as np
import torch
from transformers import AutoTokenizer, Qwen3VLForConditionalGeneration
from transformers.models.qwen3_vl.modeling_qwen3_vl import BaseModelOutputWithDeepstackFeatures

from hybrid.demo import scenes
from hybrid.demo.chat import conversation_segments
from hybrid.launch import TRAINING_RECORD
from hybrid.tiny import TinySpec, build_checkpoint, build_config, build_processor, build_tokenizer

log = logging.getLogger(__name__)

STATE_FILE = "state.pt"
# How often each kind is asked about a picture (a kind a picture cannot answer is skipped).
KIND_WEIGHTS = {
    "shape": 2.0,
    "colour": 1.2,
    "position": 1.2,
    "count": 1.0,
    "colour_of": 1.0,
    "position_of": 1.2,
    "describe": 1.4,
    "find": 1.6,
    "locate_all": 1.4,
}


class InvalidConfig(ValueError):
    """A training setting out of range."""


@dataclass(frozen=True)
class TrainConfig:
    """Optimisation and data-mixture settings; `threads` is torch's intra-op thread count."""

    steps: int = 1400
    tower_steps: int = 540  # first, steps that train only the vision tower and the probe (no decoder: cheap)
    pictures: int = 16  # distinct pictures per step, one conversation each
    questions: int = 4  # the most questions of one conversation (each has 1 to this many)
    text_rows: int = 3  # text-only conversations per step, no picture
    lr: float = 2e-3
    min_lr_ratio: float = 0.05
    warmup: int = 100
    weight_decay: float = 0.05
    grad_clip: float = 1.0
    text_with_image: float = 0.1  # share of a picture's questions that are unrelated text exchanges
    fixed_text_fraction: float = 0.2  # share of text exchanges that are not sums
    probe_weight: float = 0.5  # weight of the training-only dense vision probe (0: off)
    shape_weight: float = 3.0  # weight of a shape word's tokens in the answer loss
    box_weight: float = 1.0  # weight of the digit tokens of a grounding answer's boxes
    seed: int = 0
    threads: int = 2
    device: str = "cpu"
    log_every: int = 25
    checkpoint_minutes: float = 10.0

    def __post_init__(self) -> None:
        if min(self.steps, self.pictures, self.questions, self.threads) < 1:
            raise InvalidConfig("--steps, --pictures, --questions and --threads must be positive")
        if min(self.text_rows, self.tower_steps) < 0:
            raise InvalidConfig("text_rows and --tower-steps must not be negative")
        if not self.lr > 0 or min(self.shape_weight, self.box_weight) < 1 or self.checkpoint_minutes <= 0:
            raise InvalidConfig(
                "--lr and --checkpoint-minutes must be positive, --shape-weight and --box-weight at least 1"
            )
        for name in ("text_with_image", "fixed_text_fraction", "min_lr_ratio"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise InvalidConfig(f"{name} must be in [0, 1]")


@dataclass(frozen=True)
class Example:
    """One training row: a conversation and the index of the picture it shows (None: no picture)."""

    exchanges: tuple[scenes.Exchange, ...]
    picture: int | None


@dataclass(frozen=True)
class Span:
    """Where one answer's label tokens lie in its row (`start` to `end` in the labels), and its kind."""

    row: int
    start: int
    end: int
    kind: str
    follow_up: bool


def demo_spec(patch_size: int = 4, max_pixels: int = 128 * 128) -> TinySpec:
    """The demo model's shapes. A picture is scaled to at most `max_pixels` and cut into patches of
    `patch_size` pixels, four to an image token: 4 and 128x128 give 1,024 patches, 256 tokens. A
    patch a 32nd of the picture is what let shapes be learnt at all (docs/demo-model.md)."""
    tokens = max_pixels // (2 * patch_size) ** 2
    if not 4 <= patch_size <= 16 or not 16 <= tokens <= 256:
        raise InvalidConfig(
            f"--patch-size {patch_size} and --max-pixels {max_pixels} give {tokens} image tokens; "
            "allowed: patch 4 to 16 pixels, 16 to 256 tokens"
        )
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
        patch_size=patch_size,
        rope_theta=1000.0,  # the image grids are at most 32 positions wide: frequencies must turn within them
        num_position_embeddings=1024,
        deepstack_visual_indexes=(1, 2),
        min_pixels=max_pixels // 4,
        max_pixels=max_pixels,
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


def picture_exchanges(scene: scenes.Scene, rng: np.random.Generator, cfg: TrainConfig) -> tuple[scenes.Exchange, ...]:
    """A conversation about `scene`: 1 to `cfg.questions` questions of distinct kinds in a random
    order (now and then an unrelated text one)."""
    kinds = [k for k in scenes.IMAGE_KINDS if scenes.askable(k, scene)]
    weights = np.array([KIND_WEIGHTS[k] for k in kinds])
    size = min(int(rng.integers(1, cfg.questions + 1)), len(kinds))
    chosen = rng.choice(kinds, size=size, replace=False, p=weights / weights.sum())
    return tuple(
        text_exchange(rng, cfg) if rng.random() < cfg.text_with_image else scenes.ask(str(k), scene, rng)
        for k in chosen
    )


def sample_step(rng: np.random.Generator, cfg: TrainConfig) -> tuple[list[scenes.Scene], list[Example]]:
    """The pictures of one step and its rows: a conversation about each picture, then text-only ones."""
    pictures = [scenes.random_scene(rng) for _ in range(cfg.pictures)]
    rows = [Example(picture_exchanges(scene, rng, cfg), i) for i, scene in enumerate(pictures)]
    for _ in range(cfg.text_rows):
        rows.append(Example(tuple(text_exchange(rng, cfg) for _ in range(int(rng.integers(1, 3)))), None))
    return pictures, rows


def row_segments(processor, example: Example, image_tokens: list[int]) -> list[str]:
    """Prompt, answer, prompt, answer ... of one row, the picture's pads expanded to its token count."""
    questions = [e.question for e in example.exchanges]
    answers = [e.answer for e in example.exchanges]
    segments = conversation_segments(processor, questions, answers, example.picture is not None)
    if example.picture is not None:
        segments[0] = segments[0].replace(processor.image_token, processor.image_token * image_tokens[example.picture])
    return segments


def shape_token_ids(tokenizer) -> frozenset[int]:
    """The token ids of the shape words; answers always have them after a space ("A star.", "red star")."""
    ids: set[int] = set()
    for shape in scenes.SHAPES:
        ids.update(tokenizer(f" {shape}", add_special_tokens=False)["input_ids"])
    return frozenset(ids)


def digit_token_ids(tokenizer) -> frozenset[int]:
    """The ids of the tokens that are digits alone (a box's coordinates are spelt with them)."""
    return frozenset(i for token, i in tokenizer.get_vocab().items() if token.strip().isdigit())


@dataclass(frozen=True)
class LossWeights:
    """Which answer tokens weigh more than 1 in the loss: shape words, and the digits of boxes."""

    shape_ids: frozenset[int]
    digit_ids: frozenset[int]
    shape: float = 1.0
    box: float = 1.0

    @classmethod
    def of(cls, tokenizer, cfg: TrainConfig) -> LossWeights:
        return cls(shape_token_ids(tokenizer), digit_token_ids(tokenizer), cfg.shape_weight, cfg.box_weight)

    def answer(self, text: str, piece: list[int]) -> list[float]:
        boxes = scenes.BOX_KEY in text
        return [
            self.shape if t in self.shape_ids else self.box if boxes and t in self.digit_ids else 1.0 for t in piece
        ]


def tokenize_row(
    tokenizer, segments: list[str], weighing: LossWeights
) -> tuple[list[int], list[int], list[float], list[tuple[int, int]]]:
    """Token ids of the whole row, its labels (-100 outside answers), the answer tokens' loss
    weights and each answer's `(start, end)`; every piece must tokenise as it does in the whole."""
    ids, labels, weights, spans = [], [], [], []
    for i, text in enumerate(segments):
        piece = tokenizer(text, add_special_tokens=False)["input_ids"]
        if i % 2:
            spans.append((len(ids), len(ids) + len(piece)))
            labels += piece
            weights += weighing.answer(text, piece)
        else:
            labels += [-100] * len(piece)
            weights += [0.0] * len(piece)
        ids += piece
    if tokenizer("".join(segments), add_special_tokens=False)["input_ids"] != ids:
        raise ValueError(
            f"the conversation {segments[1::2]!r} does not tokenise the same in pieces; change its wording"
        )
    return ids, labels, weights, spans


def collate(processor, pictures: list[scenes.Scene], rows: list[Example], weighing: LossWeights | None = None) -> dict:
    """Pixels of each distinct picture once; token ids, labels, loss weights and answer spans per
    row (right-padded)."""
    images = processor.image_processor(images=[p.render() for p in pictures], return_tensors="pt")
    merge = processor.image_processor.merge_size
    tokens = (images["image_grid_thw"].prod(-1) // merge**2).tolist()
    tokenizer = processor.tokenizer
    weighing = weighing or LossWeights(frozenset(), frozenset())
    encoded = [tokenize_row(tokenizer, row_segments(processor, row, tokens), weighing) for row in rows]
    width = max(len(ids) for ids, *_ in encoded)
    pad = tokenizer.pad_token_id
    batch = {
        "input_ids": torch.tensor([ids + [pad] * (width - len(ids)) for ids, *_ in encoded]),
        "attention_mask": torch.tensor([[1] * len(ids) + [0] * (width - len(ids)) for ids, *_ in encoded]),
        "labels": torch.tensor([labels + [-100] * (width - len(labels)) for _, labels, _, _ in encoded]),
        "weights": torch.tensor([w + [0.0] * (width - len(w)) for _, _, w, _ in encoded]),
    }
    batch["mm_token_type_ids"] = (batch["input_ids"] == processor.image_token_id).int()
    batch["spans"] = [
        Span(r, start, end, exchange.kind, k > 0)
        for r, (row, (_, _, _, spans)) in enumerate(zip(rows, encoded))
        for k, (exchange, (start, end)) in enumerate(zip(row.exchanges, spans))
    ]
    batch["pixel_values"], batch["picture_grid_thw"] = images["pixel_values"], images["image_grid_thw"]
    return batch


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
        Returns the loss and the share of shapes the probe names from the maximum over their tokens."""
        targets = [probe_targets(p, h // merge, w // merge) for p, (_, h, w) in zip(pictures, grids.tolist())]
        offsets = np.cumsum([0] + [len(p.items) for p in pictures])
        for (*_, items), offset in zip(targets, offsets):
            items[items >= 0] += int(offset)  # one id per shape across the pictures
        device = image_embeds.device
        shapes, colours, boxes, covered, items = (torch.cat(t).to(device) for t in zip(*targets))
        out = self.head(image_embeds)  # (tokens, 5 + 7 + 4)
        n_shape = 1 + len(scenes.SHAPES)
        loss = torch.nn.functional.cross_entropy(out[:, :n_shape], shapes)
        loss = loss + torch.nn.functional.cross_entropy(out[:, n_shape:-4], colours)
        if covered.any():
            # the shape under a covered token among the four alone: background tokens outnumber
            # them, and without this term the probe's shape signal is mostly "not background"
            loss = loss + torch.nn.functional.cross_entropy(out[covered, 1:n_shape], shapes[covered] - 1)
            loss = loss + 5 * torch.nn.functional.l1_loss(out[covered, -4:].sigmoid(), boxes[covered])
        # each shape named from the maximum of its tokens' scores: a corner or a point shows on a
        # few tokens only, and a maximum lets the tower learn to mark them (a mean drowns them)
        inside = items >= 0
        ids, which = torch.unique(items[inside], return_inverse=True)
        scores = out[inside, 1:n_shape]
        pooled = torch.full((len(ids), scores.shape[1]), -torch.inf, device=device)
        pooled = pooled.scatter_reduce(0, which[:, None].expand_as(scores), scores, "amax", include_self=False)
        every = torch.tensor([scenes.SHAPES.index(i.shape) for p in pictures for i in p.items], device=device)
        truth = every[ids]
        loss = loss + torch.nn.functional.cross_entropy(pooled, truth)
        return loss, (pooled.argmax(-1) == truth).float().mean().item()


def probe_targets(scene: scenes.Scene, rows: int, cols: int) -> tuple[torch.Tensor, ...]:
    """Per merged token (row-major, `rows` x `cols`): shape id, colour id (0: background), the box
    `(x1, y1, x2, y2)` in [0, 1] of the shape under it, whether one is (near its centre), and the
    index in `scene.items` of the shape whose circle holds the token (-1: none)."""
    ys, xs = np.meshgrid((np.arange(rows) + 0.5) / rows, (np.arange(cols) + 0.5) / cols, indexing="ij")
    ys, xs = ys.ravel(), xs.ravel()
    shape_ids, colour_ids = np.zeros(rows * cols, np.int64), np.zeros(rows * cols, np.int64)
    boxes = np.zeros((rows * cols, 4), np.float32)
    items = np.full(rows * cols, -1, np.int64)
    for index, item in enumerate(scene.items):
        r = item.radius(scene.width, scene.height)
        distance = np.hypot((xs - item.x) * scene.width, (ys - item.y) * scene.height)
        centre = min(int(item.y * rows), rows - 1) * cols + min(int(item.x * cols), cols - 1)
        near, within = distance <= 0.7 * r, distance <= r
        near[centre] = within[centre] = True
        shape_ids[near] = 1 + scenes.SHAPES.index(item.shape)
        colour_ids[near] = 1 + list(scenes.COLOURS).index(item.colour)
        boxes[near] = np.array(scene.box_2d(item), np.float32) / scenes.SCALE
        items[within] = index
    return (
        torch.from_numpy(shape_ids),
        torch.from_numpy(colour_ids),
        torch.from_numpy(boxes),
        torch.from_numpy(shape_ids > 0),
        torch.from_numpy(items),
    )


def token_losses(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Next-token cross-entropy `(B, S)`: entry t is the loss of predicting token t from t-1 (0 at
    the first position and wherever the label is -100)."""
    losses = torch.nn.functional.cross_entropy(
        logits[:, :-1].transpose(1, 2), labels[:, 1:], ignore_index=-100, reduction="none"
    )
    return torch.nn.functional.pad(losses, (1, 0))


@dataclass
class Curves:
    """What the log shows, kept for `training.json`: per logged step, the phase, the probe's shape
    accuracy and the answer loss per kind (first questions and follow-ups apart)."""

    points: list[dict] = field(default_factory=list)
    seconds: float = 0.0  # training time over every run of a resumed training


class Trainer:
    """The model, its processor, the optimisers and the vision probe, stepped one batch at a time:
    `tower_step` trains the tower and the probe alone, `step` everything."""

    def __init__(self, model, processor, cfg: TrainConfig) -> None:
        self.model, self.processor, self.cfg = model, processor, cfg
        self.device = torch.device(cfg.device)
        self.merge = processor.image_processor.merge_size
        self.weighing = LossWeights.of(processor.tokenizer, cfg)
        self.probe = VisionProbe(model.config.vision_config.out_hidden_size)
        model.to(self.device)
        self.probe.to(self.device)
        self.tower_trainable = [*model.model.visual.parameters(), *self.probe.parameters()]
        self.tower_optimizer, self.tower_schedule = self._optimiser(self.tower_trainable, cfg.tower_steps)
        self.trainable = [*model.parameters(), *self.probe.parameters()]
        self.optimizer, self.schedule = self._optimiser(self.trainable, cfg.steps)

    def _optimiser(self, params: list[torch.nn.Parameter], steps: int):
        optimizer = torch.optim.AdamW(params, lr=self.cfg.lr, betas=(0.9, 0.98), weight_decay=self.cfg.weight_decay)
        return optimizer, torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: lr_factor(step, steps, self.cfg))

    def state_dict(self) -> dict:
        parts = ("model", "probe", "tower_optimizer", "tower_schedule", "optimizer", "schedule")
        return {name: getattr(self, name).state_dict() for name in parts}

    def load_state_dict(self, state: dict) -> None:
        for name, value in state.items():
            getattr(self, name).load_state_dict(value)

    def vision(self, pixel_values: torch.Tensor, grids: torch.Tensor):
        return self.model.model.visual(pixel_values.to(self.device), grid_thw=grids.to(self.device), return_dict=True)

    def tower_step(self, pictures: list[scenes.Scene]) -> tuple[float, float]:
        """One optimiser step of the tower and the probe on the probe's loss; returns that loss and
        the share of shape tokens the probe names right."""
        images = self.processor.image_processor(images=[p.render() for p in pictures], return_tensors="pt")
        grids = images["image_grid_thw"]
        vision = self.vision(images["pixel_values"], grids)
        loss, shape_accuracy = self.probe.loss(vision.pooler_output, pictures, grids, self.merge)
        self._update(loss, self.tower_optimizer, self.tower_schedule, self.tower_trainable)
        return loss.item(), shape_accuracy

    def _update(self, loss: torch.Tensor, optimizer, schedule, params: list[torch.nn.Parameter]) -> None:
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, self.cfg.grad_clip)
        optimizer.step()
        schedule.step()

    def step(
        self, pictures: list[scenes.Scene], rows: list[Example]
    ) -> tuple[dict[tuple[str, bool], list[float]], float, float]:
        """One optimiser step on the answer tokens' weighted mean loss (+ probe); returns each
        answer's mean token loss by (kind, follow-up), the probe's loss and its shape accuracy."""
        batch = collate(self.processor, pictures, rows, self.weighing)
        grids, spans = batch.pop("picture_grid_thw"), batch.pop("spans")
        vision = self.vision(batch.pop("pixel_values"), grids)
        per_picture = _per_picture(vision, grids, self.merge)
        weights = batch.pop("weights").to(self.device)
        losses = self.row_losses(batch, rows, per_picture, grids)
        loss = (losses * weights).sum() / weights.sum()
        probe, shape_accuracy = self.probe.loss(vision.pooler_output, pictures, grids, self.merge)
        self._update(loss + self.cfg.probe_weight * probe, self.optimizer, self.schedule, self.trainable)
        by_kind: dict[tuple[str, bool], list[float]] = defaultdict(list)
        detached = losses.detach().cpu()
        for span in spans:
            by_kind[span.kind, span.follow_up].append(float(detached[span.row, span.start : span.end].mean()))
        return by_kind, probe.item(), shape_accuracy

    def row_losses(self, batch: dict[str, torch.Tensor], rows: list[Example], per_picture, grids) -> torch.Tensor:
        """The decoder's token losses `(B, S)` (see `token_losses`), short rows and long rows in two
        passes (less padding); `per_picture`: the tower's output split per picture, handed to the
        rows that show it."""
        lengths = batch["attention_mask"].sum(dim=1)
        order = torch.argsort(lengths)
        losses = torch.zeros(batch["input_ids"].shape, device=self.device)
        for part in (order[: len(rows) // 2], order[len(rows) // 2 :]):
            part = part.sort().values  # keep the rows' order: the image features follow it
            width = int(lengths[part].max())
            sub = {k: v[part, :width].to(self.device) for k, v in batch.items()}
            labels = sub.pop("labels")
            shown = [rows[i].picture for i in part.tolist() if rows[i].picture is not None]
            extra = {}
            if shown:
                extra = {
                    "image_grid_thw": grids[shown].to(self.device),
                    "mm_encoder_outputs": {
                        "image": BaseModelOutputWithDeepstackFeatures(
                            pooler_output=tuple(per_picture[0][i] for i in shown),
                            deepstack_features=[tuple(level[i] for i in shown) for level in per_picture[1]],
                        )
                    },
                }
            rows_losses = token_losses(self.model(**sub, **extra).logits, labels)
            losses = losses.index_put(
                (part.to(self.device),), torch.nn.functional.pad(rows_losses, (0, losses.shape[1] - width))
            )
        return losses


def _per_picture(
    vision, grids: torch.Tensor, merge: int
) -> tuple[tuple[torch.Tensor, ...], list[tuple[torch.Tensor, ...]]]:
    """The tower's merged tokens and DeepStack maps split per picture."""
    sizes = (grids.prod(-1) // merge**2).tolist()
    return torch.split(vision.pooler_output, sizes), [torch.split(f, sizes) for f in vision.deepstack_features]


@dataclass
class Run:
    """One training in progress: where it stands and where its state is kept."""

    trainer: Trainer
    rng: np.random.Generator
    spec: TinySpec
    out: Path
    state_dir: Path
    phase: str = "tower"
    step: int = 0  # steps done in `phase`
    curves: Curves = field(default_factory=Curves)
    warm_start: dict | None = None  # the record of the model this training began from (None: random)

    def save(self) -> None:
        """The whole state to `state_dir/state.pt`, atomically (a kill mid-write keeps the old one)."""
        self.state_dir.mkdir(parents=True, exist_ok=True)
        state = {
            "trainer": self.trainer.state_dict(),
            "numpy_rng": self.rng.bit_generator.state,
            "torch_rng": torch.get_rng_state(),
            "config": asdict(self.trainer.cfg),
            "spec": asdict(self.spec),
            "out": str(self.out),
            "phase": self.phase,
            "step": self.step,
            "curves": asdict(self.curves),
            "warm_start": self.warm_start,
        }
        partial = self.state_dir / (STATE_FILE + ".partial")
        torch.save(state, partial)
        partial.replace(self.state_dir / STATE_FILE)
        log.info("saved the training state at %s step %d to %s", self.phase, self.step, self.state_dir)


def _phases(cfg: TrainConfig) -> tuple[tuple[str, int], ...]:
    return (("tower", cfg.tower_steps), ("joint", cfg.steps))


def total_of(cfg: TrainConfig, phase: str) -> int:
    return dict(_phases(cfg))[phase]


def fit(run: Run, max_steps: int | None = None) -> None:
    """Step `run` through what is left of its tower phase and its joint phase (at most `max_steps`
    steps in this call), in place, logging the losses and saving the state every
    `checkpoint_minutes` and at the end."""
    cfg, trainer = run.trainer.cfg, run.trainer
    trainer.model.train()
    saved = started = time.perf_counter()
    elapsed = run.curves.seconds
    window: dict[tuple[str, bool], list[float]] = defaultdict(list)
    probes: list[tuple[float, float]] = []
    names = [name for name, _ in _phases(cfg)]
    left = math.inf if max_steps is None else max_steps
    for phase, total in _phases(cfg):
        if names.index(phase) < names.index(run.phase) or left <= 0:
            continue
        if phase != run.phase and run.step >= total_of(cfg, run.phase):
            run.phase, run.step = phase, 0
        while run.step < total and left > 0:
            left -= 1
            if phase == "tower":
                probes.append(trainer.tower_step([scenes.random_scene(run.rng) for _ in range(cfg.pictures)]))
            else:
                by_kind, *probe = trainer.step(*sample_step(run.rng, cfg))
                probes.append(tuple(probe))
                for key, values in by_kind.items():
                    window[key] += values
            run.step += 1
            run.curves.seconds = elapsed + time.perf_counter() - started
            if run.step % cfg.log_every == 0 or run.step == total:
                _log_point(run, total, window, probes)
            if time.perf_counter() - saved >= 60 * cfg.checkpoint_minutes:
                run.save()
                saved = time.perf_counter()
    run.save()
    trainer.model.eval()


def _log_point(run: Run, total: int, window: dict[tuple[str, bool], list[float]], probes: list) -> None:
    loss, accuracy = np.mean(probes, axis=0)
    point = {
        "phase": run.phase,
        "step": run.step,
        "seconds": round(run.curves.seconds),
        "probe_loss": round(float(loss), 4),
        "probe_shape_accuracy": round(float(accuracy), 4),
    }
    if window:
        point["first"] = {k: round(float(np.mean(v)), 4) for (k, follow), v in sorted(window.items()) if not follow}
        point["follow_up"] = {k: round(float(np.mean(v)), 4) for (k, follow), v in sorted(window.items()) if follow}
    run.curves.points.append(point)
    per_kind = " ".join(f"{k} {v:.3f}" for k, v in point.get("first", {}).items())
    follow = " ".join(f"{k} {v:.3f}" for k, v in point.get("follow_up", {}).items())
    schedule = run.trainer.tower_schedule if run.phase == "tower" else run.trainer.schedule
    log.info(
        "%s step %d/%d loss %s | follow-ups %s | probe %.3f shape accuracy %.2f lr %.2e elapsed %.0fs",
        run.phase,
        run.step,
        total,
        per_kind or "-",
        follow or "-",
        loss,
        accuracy,
        schedule.get_last_lr()[0],
        run.curves.seconds,
    )
    window.clear()
    probes.clear()


def start(
    out_dir: str | Path, state_dir: str | Path, cfg: TrainConfig, spec: TinySpec, init: str | Path | None = None
) -> Run:
    """A new training of a randomly initialised model of `spec`, or, with `init`, of the weights of
    that trained demo model (its `training.json` must name the same shapes; the optimisers and the
    probe start afresh, and the earlier record is kept under `warm_start`)."""
    torch.set_num_threads(cfg.threads)
    torch.manual_seed(cfg.seed)
    model, processor = new_model(spec)
    warm_start = None
    if init is not None:
        warm_start = load_weights(model, spec, Path(init))
    log.info("model: %d parameters, spec %s", parameter_count(model), _shapes(spec))
    trainer = Trainer(model, processor, cfg)
    return Run(trainer, np.random.default_rng(cfg.seed), spec, Path(out_dir), Path(state_dir), warm_start=warm_start)


def init_spec(init: str | Path) -> TinySpec:
    """The demo spec of the trained model in `init`, from the patch size and pixels its record names."""
    record = _record_of(Path(init))
    return demo_spec(record["spec"]["patch_size"], record["spec"]["max_pixels"])


def _record_of(folder: Path) -> dict:
    path = folder / TRAINING_RECORD
    if not path.is_file():
        raise InvalidConfig(f"--init {folder}: not a trained demo model (no {TRAINING_RECORD} in it)")
    return json.loads(path.read_text())


def load_weights(model, spec: TinySpec, folder: Path) -> dict:
    """Copy the weights of the trained demo model in `folder` into `model` (same shapes, or an
    `InvalidConfig` that says which differ); returns what the warm start keeps of its record."""
    record = _record_of(folder)
    expected = json.loads(json.dumps(_shapes(spec)))
    differ = sorted(k for k in expected if record["spec"].get(k) != expected[k])
    if differ:
        raise InvalidConfig(f"--init {folder}: its model differs from the spec to train in {', '.join(differ)}")
    trained = Qwen3VLForConditionalGeneration.from_pretrained(folder, dtype=torch.float32)
    model.load_state_dict(trained.state_dict())
    log.info("warm start from %s (%.0f s trained there)", folder, record.get("train_seconds", 0.0))
    kept = ("config", "train_seconds", "runs", "note", "curves")
    return {"model": str(folder)} | {k: record[k] for k in kept if k in record}


def resume(state_dir: str | Path, **overrides) -> Run:
    """The training saved in `state_dir`, ready to go on; `overrides` change its settings: those of
    the machine (`device`, `threads`, `checkpoint_minutes`, `log_every`), or `steps` and
    `tower_steps`, new ends for the joint and the tower phase (a cosine schedule then decays to
    that step from where it stands; a tower phase past its new end goes on to the joint phase), or
    `box_weight` from then on."""
    path = Path(state_dir) / STATE_FILE
    if not path.is_file():
        raise InvalidConfig(f"no training state in {state_dir} (expected {path})")
    state = torch.load(path, map_location="cpu", weights_only=False)
    cfg = replace(TrainConfig(**state["config"]), **overrides)
    spec_fields = state["spec"]
    spec = TinySpec(**{k: tuple(v) if isinstance(v, list) else v for k, v in spec_fields.items()})
    torch.set_num_threads(cfg.threads)
    model, processor = new_model(spec)
    trainer = Trainer(model, processor, cfg)
    trainer.load_state_dict(state["trainer"])
    rng = np.random.default_rng()
    rng.bit_generator.state = state["numpy_rng"]
    torch.set_rng_state(state["torch_rng"])
    curves = Curves(**state["curves"])
    log.info(
        "resuming %s at %s step %d (%.0f s trained so far)", state_dir, state["phase"], state["step"], curves.seconds
    )
    where = (Path(state["out"]), Path(state_dir), state["phase"], state["step"], curves, state.get("warm_start"))
    return Run(trainer, rng, spec, *where)


def _shapes(spec: TinySpec) -> dict:
    return {k: v for k, v in asdict(spec).items() if k != "corpus"}


def finish(run: Run) -> Path:
    """Train what is left of `run`, then write the checkpoint and `training.json` to its `out`."""
    fit(run)
    model = run.trainer.model.to("cpu")
    out = build_checkpoint(run.out, run.spec, model=model)
    check_saved_tokenizer(out, run.trainer.processor.tokenizer)
    record = {
        "spec": _shapes(run.spec),
        "config": asdict(run.trainer.cfg),
        "parameters": parameter_count(model),
        "train_seconds": round(run.curves.seconds, 1),
        "curves": run.curves.points,
        "shape_sizes": [scenes.MIN_SIZE, scenes.MAX_SIZE],  # of the short side: what the model has seen
    }
    if run.warm_start is not None:
        record["warm_start"] = run.warm_start
    (out / TRAINING_RECORD).write_text(json.dumps(record, indent=2) + "\n")
    log.info("trained in %.0fs; wrote %s", run.curves.seconds, out)
    return out


def train(
    out_dir: str | Path,
    cfg: TrainConfig = TrainConfig(),
    spec: TinySpec | None = None,
    state_dir: str | Path | None = None,
) -> Path:
    """Train from scratch and write the checkpoint (plus `training.json`) to `out_dir`; the state is
    kept in `state_dir` (default: `out_dir` + `.state`) for `resume`."""
    state_dir = state_dir or Path(str(out_dir).rstrip("/") + ".state")
    return finish(start(out_dir, state_dir, cfg, spec or demo_spec()))


def check_saved_tokenizer(out: Path, tokenizer) -> None:
    """`build_checkpoint` rebuilds the tokenizer from the corpus: it must be the one we trained with."""
    if AutoTokenizer.from_pretrained(out).get_vocab() != tokenizer.get_vocab():
        raise RuntimeError(f"the tokenizer saved in {out} differs from the training one")
