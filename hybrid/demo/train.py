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
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image

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

    steps: int = 3000
    batch_size: int = 32
    lr: float = 2e-3
    min_lr_ratio: float = 0.05
    warmup: int = 100
    weight_decay: float = 0.05
    grad_clip: float = 1.0
    text_fraction: float = 0.15  # share of examples that are text exchanges
    fixed_text_fraction: float = 0.3  # share of text exchanges that are not sums
    text_with_image: float = 0.3  # share of text exchanges asked beside an unrelated picture
    seed: int = 0
    threads: int = 2
    log_every: int = 50

    def __post_init__(self) -> None:
        if self.steps < 1 or self.batch_size < 1 or self.threads < 1:
            raise InvalidConfig("--steps, --batch-size and --threads must be positive")
        for name in ("text_fraction", "fixed_text_fraction", "text_with_image", "min_lr_ratio"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise InvalidConfig(f"{name} must be in [0, 1]")


@dataclass(frozen=True)
class Example:
    """One training example: an exchange and the picture shown with it (None for no picture)."""

    exchange: scenes.Exchange
    image: Image.Image | None


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
        vision_intermediate_size=256,
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
    """An image question of a uniform kind, or (with `cfg.text_fraction`) a text exchange."""
    if rng.random() >= cfg.text_fraction:
        scene = scenes.random_scene(rng)
        kind = str(rng.choice(scenes.IMAGE_KINDS))
        return Example(scenes.image_exchange(kind, scene, rng), scene.render())
    if rng.random() < cfg.fixed_text_fraction:
        question = str(rng.choice(list(scenes.FIXED_EXCHANGES)))
        exchange = scenes.Exchange("text", question, scenes.FIXED_EXCHANGES[question])
    else:
        a, b, phrasing = rng.integers(0, 10), rng.integers(0, 10), rng.integers(0, len(scenes.SUM_QUESTIONS))
        exchange = scenes.sum_exchange(int(a), int(b), int(phrasing))
    image = scenes.random_scene(rng).render() if rng.random() < cfg.text_with_image else None
    return Example(exchange, image)


def collate(processor, examples: list[Example]) -> dict[str, torch.Tensor]:
    """Tokenise prompt + answer + `END` (right-padded) and label only the answer tokens."""
    texts = [chat_prompt(processor, e.exchange.question, e.image is not None) + e.exchange.answer + END for e in examples]
    images = [e.image for e in examples if e.image is not None]
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


def fit(model, processor, cfg: TrainConfig) -> float:
    """Run `cfg.steps` optimiser steps in place; returns the seconds spent."""
    rng = np.random.default_rng(cfg.seed)
    optimizer = torch.optim.AdamW(model.parameters(), lr=cfg.lr, betas=(0.9, 0.98), weight_decay=cfg.weight_decay)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: lr_factor(step, cfg))
    model.train()
    start, window = time.perf_counter(), []
    for step in range(1, cfg.steps + 1):
        batch = collate(processor, [sample_example(rng, cfg) for _ in range(cfg.batch_size)])
        loss = model(**batch).loss
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
        optimizer.step()
        schedule.step()
        window.append(loss.item())
        if step % cfg.log_every == 0 or step == cfg.steps:
            elapsed = time.perf_counter() - start
            log.info("step %d/%d loss %.4f lr %.2e elapsed %.0fs", step, cfg.steps, np.mean(window), schedule.get_last_lr()[0], elapsed)
            window = []
    model.eval()
    return time.perf_counter() - start


def train(out_dir: str | Path, cfg: TrainConfig = TrainConfig(), spec: TinySpec | None = None) -> Path:
    """Train from scratch and write the checkpoint (plus `training.json`) to `out_dir`."""
    spec = spec or demo_spec()
    torch.set_num_threads(cfg.threads)
    torch.manual_seed(cfg.seed)
    model, processor = new_model(spec)
    log.info("model: %d parameters, spec %s", parameter_count(model), {k: v for k, v in asdict(spec).items() if k != "corpus"})
    seconds = fit(model, processor, cfg)
    out = build_checkpoint(out_dir, spec, model=model)
    check_saved_tokenizer(out, processor.tokenizer)
    record = {"config": asdict(cfg), "parameters": parameter_count(model), "train_seconds": round(seconds, 1)}
    (out / TRAINING_RECORD).write_text(json.dumps(record, indent=2) + "\n")
    log.info("trained %d steps in %.0fs; wrote %s", cfg.steps, seconds, out)
    return out


def check_saved_tokenizer(out: Path, tokenizer) -> None:
    """`build_checkpoint` rebuilds the tokenizer from the corpus: it must be the one we trained with."""
    from transformers import AutoTokenizer

    if AutoTokenizer.from_pretrained(out).get_vocab() != tokenizer.get_vocab():
        raise RuntimeError(f"the tokenizer saved in {out} differs from the training one")
