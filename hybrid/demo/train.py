"""Trains the demo Qwen3-VL from scratch on synthetic scenes, on the CPU, reproducibly from a seed.

`train(out_dir, TrainConfig(...))` builds the model of `demo_spec()`, teaches it the language of
`hybrid.demo.scenes` with a teacher-forced loss on the answer tokens only, and writes a normal
checkpoint folder (weights, tokenizer, processor) with `hybrid.tiny.build_checkpoint`.
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

from hybrid.demo import scenes
from hybrid.demo.chat import END, chat_prompt
from hybrid.tiny import TinySpec, build_checkpoint, build_config, build_processor, build_tokenizer

log = logging.getLogger(__name__)

TRAINING_RECORD = "training.json"


class InvalidConfig(ValueError):
    """A training setting out of range."""


@dataclass(frozen=True)
class TrainConfig:
    """Optimisation and data-mixture settings; `threads` is torch's intra-op thread count."""

    steps: int = 2500
    batch_size: int = 32
    lr: float = 2e-3
    min_lr_ratio: float = 0.05
    warmup: int = 100
    weight_decay: float = 0.05
    grad_clip: float = 1.0
    text_fraction: float = 0.25  # share of examples that are text exchanges
    kind_weights: tuple[float, ...] = (0.3, 0.15, 0.25, 0.3)  # image kinds, in `scenes.IMAGE_KINDS` order
    fixed_text_fraction: float = 0.15  # share of text exchanges that are not sums
    text_with_image: float = 0.3  # share of text exchanges asked beside an unrelated picture
    probe_weight: float = 0.5  # weight of the training-only vision read-out loss (0: off)
    seed: int = 0
    threads: int = 2
    log_every: int = 50

    def __post_init__(self) -> None:
        if self.steps < 1 or self.batch_size < 1 or self.threads < 1:
            raise InvalidConfig("--steps, --batch-size and --threads must be positive")
        if len(self.kind_weights) != len(scenes.IMAGE_KINDS) or min(self.kind_weights) < 0:
            raise InvalidConfig(f"kind_weights needs {len(scenes.IMAGE_KINDS)} non-negative weights")
        for name in ("text_fraction", "fixed_text_fraction", "text_with_image", "min_lr_ratio"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise InvalidConfig(f"{name} must be in [0, 1]")


@dataclass(frozen=True)
class Example:
    """One training example: an exchange and the scene pictured with it (None: no picture)."""

    exchange: scenes.Exchange
    scene: scenes.Scene | None


def demo_spec() -> TinySpec:
    """The demo model's shapes: a 96x96 picture is 6x6 patches, i.e. 9 image tokens."""
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
        rope_theta=1000.0,  # the 3x3 image grid needs M-RoPE frequencies that turn within 3 positions
        num_position_embeddings=36,
        deepstack_visual_indexes=(1, 2),
        min_pixels=64 * 64,
        max_pixels=scenes.IMAGE_SIZE * scenes.IMAGE_SIZE,
        initializer_range=0.02,
        bpe_vocab_size=512,
        corpus=scenes.corpus(),
    )


def new_model(spec: TinySpec):
    """A randomly initialised `Qwen3VLForConditionalGeneration` and its processor (seed torch first)."""
    from transformers import Qwen3VLForConditionalGeneration

    tokenizer = build_tokenizer(spec.corpus, spec.bpe_vocab_size)
    processor = build_processor(tokenizer, spec)
    model = Qwen3VLForConditionalGeneration(build_config(spec, tokenizer))
    return model, processor


def parameter_count(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def sample_example(rng: np.random.Generator, cfg: TrainConfig) -> Example:
    """An image question of a kind drawn by `cfg.kind_weights`, or (`cfg.text_fraction`) a text exchange."""
    if rng.random() >= cfg.text_fraction:
        scene = scenes.random_scene(rng)
        weights = np.asarray(cfg.kind_weights) / sum(cfg.kind_weights)
        kind = str(rng.choice(scenes.IMAGE_KINDS, p=weights))
        return Example(scenes.image_exchange(kind, scene, rng), scene)
    if rng.random() < cfg.fixed_text_fraction:
        question = str(rng.choice(list(scenes.FIXED_EXCHANGES)))
        exchange = scenes.Exchange("text", question, scenes.FIXED_EXCHANGES[question])
    else:
        a, b, phrasing = rng.integers(0, 10), rng.integers(0, 10), rng.integers(0, len(scenes.SUM_QUESTIONS))
        exchange = scenes.sum_exchange(int(a), int(b), int(phrasing))
    scene = scenes.random_scene(rng) if rng.random() < cfg.text_with_image else None
    return Example(exchange, scene)


def collate(processor, examples: list[Example]) -> dict[str, torch.Tensor]:
    """Tokenise prompt + answer + `END` (right-padded) and label only the answer tokens."""
    texts = [chat_prompt(processor, e.exchange.question, e.scene is not None) + e.exchange.answer + END for e in examples]
    images = [e.scene.render() for e in examples if e.scene is not None]
    batch = processor(text=texts, images=images or None, padding=True, padding_side="right", return_tensors="pt")
    batch = dict(batch)
    batch["labels"] = answer_labels(processor.tokenizer, batch, [e.exchange.answer + END for e in examples])
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


def lr_factor(step: int, cfg: TrainConfig) -> float:
    """Linear warm-up, then cosine decay to `cfg.min_lr_ratio`."""
    if step < cfg.warmup:
        return (step + 1) / cfg.warmup
    progress = (step - cfg.warmup) / max(1, cfg.steps - cfg.warmup)
    return cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))


class VisionProbe(torch.nn.Module):
    """Training-only linear read-out of shape, colour and place from the vision tower's merged tokens.

    Otherwise the vision tower learns only through the decoder's answers, which is slow on a CPU
    budget; the probe gives it a direct signal. It is dropped after training and never saved.
    """

    def __init__(self, tokens_per_image: int, hidden_size: int) -> None:
        super().__init__()
        self.classes = (scenes.SHAPES, tuple(scenes.COLOURS), tuple(scenes.POSITIONS))
        self.head = torch.nn.Linear(tokens_per_image * hidden_size, sum(len(c) for c in self.classes))

    def loss(self, image_embeds: torch.Tensor, pictured: list[scenes.Scene]) -> torch.Tensor:
        """Summed cross-entropy of the three read-outs; `image_embeds` `(N * tokens, H)`, N pictures."""
        logits = self.head(image_embeds.reshape(len(pictured), -1))  # (N, classes)
        total, offset = image_embeds.new_zeros(()), 0
        for names, values in zip(self.classes, zip(*((s.shape, s.colour, s.position) for s in pictured))):
            target = torch.tensor([names.index(v) for v in values])
            total = total + torch.nn.functional.cross_entropy(logits[:, offset : offset + len(names)], target)
            offset += len(names)
        return total


def example_losses(logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Next-token cross-entropy summed per example `(B,)`, and the answer tokens per example `(B,)`."""
    targets = labels[:, 1:]  # (B, S-1): position t predicts token t+1
    losses = torch.nn.functional.cross_entropy(logits[:, :-1].transpose(1, 2), targets, ignore_index=-100, reduction="none")
    return losses.sum(dim=1), (targets != -100).sum(dim=1)


class Trainer:
    """The model, its processor, the optimiser and the vision probe, stepped one batch at a time."""

    def __init__(self, model, processor, cfg: TrainConfig) -> None:
        self.model, self.processor, self.cfg = model, processor, cfg
        spec = model.config.vision_config
        tokens = (scenes.IMAGE_SIZE // spec.patch_size // spec.spatial_merge_size) ** 2
        self.probe = VisionProbe(tokens, spec.out_hidden_size)
        self.trainable = [*model.parameters(), *self.probe.parameters()]
        self.optimizer = torch.optim.AdamW(self.trainable, lr=cfg.lr, betas=(0.9, 0.98), weight_decay=cfg.weight_decay)
        self.schedule = torch.optim.lr_scheduler.LambdaLR(self.optimizer, lambda step: lr_factor(step, cfg))
        self.vision_output: list[torch.Tensor] = []
        self.hook = model.model.visual.register_forward_hook(
            lambda module, args, out: self.vision_output.append(out.pooler_output)
        )

    def close(self) -> None:
        """Detach the probe's hook so the trained model is a plain `Qwen3VLForConditionalGeneration`."""
        self.hook.remove()

    def step(self, examples: list[Example]) -> torch.Tensor:
        """One optimiser step on the answer tokens' mean loss (+ probe); returns per-example losses `(B,)`."""
        batch = collate(self.processor, examples)
        labels = batch.pop("labels")
        self.vision_output.clear()
        sums, counts = example_losses(self.model(**batch).logits, labels)
        loss = sums.sum() / counts.sum()
        pictured = [e.scene for e in examples if e.scene is not None]
        if pictured and self.cfg.probe_weight > 0:
            loss = loss + self.cfg.probe_weight * self.probe.loss(self.vision_output[0], pictured)
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(self.trainable, self.cfg.grad_clip)
        self.optimizer.step()
        self.schedule.step()
        return (sums / counts).detach()


def fit(model, processor, cfg: TrainConfig) -> float:
    """Run `cfg.steps` optimiser steps in place, logging the loss per kind; returns the seconds spent."""
    rng = np.random.default_rng(cfg.seed)
    trainer = Trainer(model, processor, cfg)
    model.train()
    start, window = time.perf_counter(), defaultdict(list)
    for step in range(1, cfg.steps + 1):
        examples = [sample_example(rng, cfg) for _ in range(cfg.batch_size)]
        for example, loss in zip(examples, trainer.step(examples).tolist()):
            window[example.exchange.kind].append(loss)
        if step % cfg.log_every == 0 or step == cfg.steps:
            per_kind = " ".join(f"{k} {np.mean(v):.3f}" for k, v in sorted(window.items()))
            lr = trainer.schedule.get_last_lr()[0]
            log.info("step %d/%d loss %s lr %.2e elapsed %.0fs", step, cfg.steps, per_kind, lr, time.perf_counter() - start)
            window.clear()
    trainer.close()
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
    from transformers import AutoTokenizer

    if AutoTokenizer.from_pretrained(out).get_vocab() != tokenizer.get_vocab():
        raise RuntimeError(f"the tokenizer saved in {out} differs from the training one")
