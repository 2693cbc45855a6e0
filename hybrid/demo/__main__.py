"""CLI for the demo model: `train` it from scratch, or `eval` a checkpoint's accuracy per question kind.

    python -m hybrid.demo train --out assets/demo-model [--state DIR] [--steps N] [--tower-steps N] [--lr LR]
                                [--shape-weight W] [--box-weight W] [--patch-size P] [--max-pixels N]
                                [--device cpu|cuda] [--seed S] [--threads T]
    python -m hybrid.demo train --out DIR --init MODEL [--tower-steps 0] [...]   (a warm start from MODEL's weights)
    python -m hybrid.demo train --resume DIR [--steps N] [--tower-steps N] [--box-weight W] [--device D] [--threads T]
    python -m hybrid.demo eval --model assets/demo-model [--n N] [--seed S] [--route hybrid|pytorch|genai]
                               [--style train|edge] [--precision fp32|int4] [--zero-image | --zero-deepstack]
                               [--json]

`eval` exports the checkpoint's bundle on first use (under .cache/bundles, as the app does) and asks
every question through the chosen route; the GenAI route gets the text-only questions.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

import torch

from hybrid.config import PRECISIONS, logical_cpus
from hybrid.demo import scenes
from hybrid.demo.eval import (
    MAX_NEW_TOKENS,
    conversation_exchanges,
    evaluate,
    evaluate_conversations,
    load_pipeline,
    pipeline_answerer,
    record_eval,
    route_exchanges,
    zero_deepstack,
    zero_image_features,
)
from hybrid.demo.train import InvalidConfig, TrainConfig, demo_spec, finish, init_spec, resume, start
from hybrid.errors import HybridError
from hybrid.launch import TRAINING_RECORD
from hybrid.logs import FORMAT, setup_logging
from hybrid.types import ROUTE_NAMES


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m hybrid.demo", description=__doc__.splitlines()[0])
    commands = parser.add_subparsers(dest="command", required=True)
    fit = commands.add_parser("train", help="train the demo model from scratch (or go on with --resume)")
    where = fit.add_mutually_exclusive_group(required=True)
    where.add_argument("--out", help="checkpoint folder to write")
    where.add_argument("--resume", metavar="DIR", help="go on with the training whose state is in DIR")
    fit.add_argument(
        "--init",
        metavar="MODEL",
        help="with --out: begin from the weights of this trained demo model (fresh optimisers; its patch size "
        "and pixels; give --tower-steps 0 to skip the tower phase)",
    )
    fit.add_argument("--state", help="folder of the training state and its checkpoints (default: OUT.state)")
    fit.add_argument(
        "--steps",
        type=int,
        default=None,
        help=f"steps of the whole model ({TrainConfig.steps}); with --resume: a new end for its schedule",
    )
    fit.add_argument(
        "--tower-steps",
        type=int,
        default=None,
        help=f"steps that train the vision tower alone first ({TrainConfig.tower_steps}); with --resume: a new end "
        "for that phase (one it has passed ends it now)",
    )
    fit.add_argument("--pictures", type=int, default=TrainConfig.pictures, help="pictures (conversations) per step")
    fit.add_argument(
        "--questions", type=int, default=TrainConfig.questions, help="the most questions of one conversation"
    )
    fit.add_argument("--lr", type=float, default=TrainConfig.lr)
    fit.add_argument("--warmup", type=int, default=TrainConfig.warmup, help="warm-up steps of each phase")
    fit.add_argument(
        "--shape-weight",
        type=float,
        default=TrainConfig.shape_weight,
        help="weight of the shape words in the answer loss",
    )
    fit.add_argument(
        "--box-weight",
        type=float,
        default=None,
        help=f"weight of a box's digits in the answer loss ({TrainConfig.box_weight}); with --resume: from then on",
    )
    fit.add_argument("--patch-size", type=int, default=4, help="pixels per patch side")
    fit.add_argument("--max-pixels", type=int, default=128 * 128, help="pixels a picture is scaled to at most")
    fit.add_argument("--device", default=None, help="torch device: cpu (default) or cuda")
    fit.add_argument("--checkpoint-minutes", type=float, default=None, help="minutes between saved states (10)")
    fit.add_argument("--log-every", type=int, default=None, help="steps between log lines (25)")
    fit.add_argument("--seed", type=int, default=TrainConfig.seed)
    fit.add_argument("--threads", type=int, default=None, help="torch threads (2)")
    check = commands.add_parser("eval", help="grade a checkpoint on fresh scenes")
    check.add_argument("--model", required=True, help="checkpoint folder")
    check.add_argument("--n", type=int, default=300, help="number of scenes (6 to 9 questions each)")
    check.add_argument(
        "--style",
        default=scenes.TRAIN,
        choices=scenes.STYLES,
        help="edge: the held-out drawing path and ranges training never drew",
    )
    check.add_argument("--seed", type=int, default=1234, help="scene seed; use one training did not")
    check.add_argument("--route", default="hybrid", choices=ROUTE_NAMES)
    check.add_argument("--precision", default="fp32", choices=PRECISIONS, help="of the ONNX decoders")
    blank = check.add_mutually_exclusive_group()
    blank.add_argument("--zero-image", action="store_true", help="ablation: blank the vision features")
    blank.add_argument("--zero-deepstack", action="store_true", help="ablation: blank the DeepStack maps only")
    check.add_argument(
        "--conversation",
        action="store_true",
        help="ask in conversations of 1 to 4 questions; first questions and follow-ups scored apart",
    )
    check.add_argument(
        "--record",
        action="store_true",
        help=f"also keep the figures in the model's {TRAINING_RECORD} (the app's header reads them)",
    )
    check.add_argument("--max-new-tokens", type=int, default=MAX_NEW_TOKENS)
    check.add_argument("--threads", type=int, default=min(2, logical_cpus()), help="(2, or fewer on a smaller machine)")
    check.add_argument("--json", action="store_true", help="print one JSON object")
    return parser.parse_args(argv)


def run_eval(args: argparse.Namespace) -> None:
    torch.set_num_threads(args.threads)
    pipeline = load_pipeline(args.model, args.route, args.precision, args.threads)
    if args.zero_image:
        zero_image_features(pipeline, args.route)
    if args.zero_deepstack:
        zero_deepstack(pipeline, args.route)
    answer = pipeline_answerer(pipeline, args.route, args.max_new_tokens)
    if args.conversation:
        report = evaluate_conversations(answer, conversation_exchanges(args.n, args.seed, args.style))
    else:
        report = evaluate(answer, route_exchanges(args.route, args.n, args.seed, args.style))
    result = {
        "route": args.route,
        "precision": args.precision,
        "model": args.model,
        "n": args.n,
        "seed": args.seed,
        "style": args.style,
        "conversation": args.conversation,
        "zero_image": args.zero_image,
        "zero_deepstack": args.zero_deepstack,
    } | report.to_json()
    if args.record:
        record_eval(Path(args.model), result)
    if args.json:
        sys.stdout.write(json.dumps(result) + "\n")
    else:
        sys.stdout.write(report.table() + "\n")


def run_train(args: argparse.Namespace) -> None:
    runtime = {
        "device": args.device,
        "threads": args.threads,
        "checkpoint_minutes": args.checkpoint_minutes,
        "log_every": args.log_every,
    }
    runtime = {k: v for k, v in runtime.items() if v is not None}
    if args.resume:
        if args.init:
            raise InvalidConfig("--init begins a new training (--out); a resumed one has its weights")
        changes = {"steps": args.steps, "tower_steps": args.tower_steps, "box_weight": args.box_weight}
        run = resume(args.resume, **runtime, **{k: v for k, v in changes.items() if v is not None})
    else:
        cfg = TrainConfig(
            steps=args.steps or TrainConfig.steps,
            tower_steps=TrainConfig.tower_steps if args.tower_steps is None else args.tower_steps,
            pictures=args.pictures,
            questions=args.questions,
            lr=args.lr,
            warmup=args.warmup,
            shape_weight=args.shape_weight,
            box_weight=TrainConfig.box_weight if args.box_weight is None else args.box_weight,
            seed=args.seed,
            **runtime,
        )
        state = args.state or args.out.rstrip("/") + ".state"
        spec = init_spec(args.init) if args.init else demo_spec(args.patch_size, args.max_pixels)
        run = start(args.out, state, cfg, spec, init=args.init)
    log_to_file(run.state_dir / "train.log")
    finish(run)


def log_to_file(path: Path) -> None:
    """The training log beside its state as well as on stderr (a background run is read there)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    handler = logging.FileHandler(path)
    handler.setFormatter(logging.Formatter(FORMAT))
    logging.getLogger().addHandler(handler)


def main(argv: list[str] | None = None) -> int:
    setup_logging(logging.INFO)
    args = parse_args(argv)
    try:
        if args.command == "train":
            run_train(args)
        else:
            run_eval(args)
    except (HybridError, InvalidConfig) as error:
        sys.stderr.write(f"error: {error}\n")
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
