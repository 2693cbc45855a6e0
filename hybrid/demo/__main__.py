"""CLI for the demo model: `train` it from scratch, or `eval` a checkpoint's accuracy per question kind.

    python -m hybrid.demo train --out assets/demo-model [--steps N] [--seed S] [--threads T]
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

import torch

from hybrid.config import PRECISIONS
from hybrid.demo import scenes
from hybrid.demo.eval import (
    MAX_NEW_TOKENS, evaluate, load_pipeline, pipeline_answerer, route_exchanges, zero_deepstack, zero_image_features,
)
from hybrid.demo.train import InvalidConfig, TrainConfig, train
from hybrid.errors import HybridError
from hybrid.logs import setup_logging
from hybrid.types import ROUTE_NAMES


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m hybrid.demo", description=__doc__.splitlines()[0])
    commands = parser.add_subparsers(dest="command", required=True)
    fit = commands.add_parser("train", help="train the demo model from scratch on the CPU")
    fit.add_argument("--out", required=True, help="checkpoint folder to write")
    fit.add_argument("--steps", type=int, default=TrainConfig.steps)
    fit.add_argument("--tower-steps", type=int, default=TrainConfig.tower_steps,
                     help="steps that train the vision tower alone first")
    fit.add_argument("--pictures", type=int, default=TrainConfig.pictures, help="distinct pictures per step")
    fit.add_argument("--questions", type=int, default=TrainConfig.questions, help="questions per picture per step")
    fit.add_argument("--seed", type=int, default=TrainConfig.seed)
    fit.add_argument("--threads", type=int, default=TrainConfig.threads)
    check = commands.add_parser("eval", help="grade a checkpoint on fresh scenes")
    check.add_argument("--model", required=True, help="checkpoint folder")
    check.add_argument("--n", type=int, default=300, help="number of scenes (6 to 9 questions each)")
    check.add_argument("--style", default=scenes.TRAIN, choices=scenes.STYLES,
                       help="edge: the held-out drawing path and ranges training never drew")
    check.add_argument("--seed", type=int, default=1234, help="scene seed; use one training did not")
    check.add_argument("--route", default="hybrid", choices=ROUTE_NAMES)
    check.add_argument("--precision", default="fp32", choices=PRECISIONS, help="of the ONNX decoders")
    blank = check.add_mutually_exclusive_group()
    blank.add_argument("--zero-image", action="store_true", help="ablation: blank the vision features")
    blank.add_argument("--zero-deepstack", action="store_true", help="ablation: blank the DeepStack maps only")
    check.add_argument("--max-new-tokens", type=int, default=MAX_NEW_TOKENS)
    check.add_argument("--threads", type=int, default=2)
    check.add_argument("--json", action="store_true", help="print one JSON object")
    return parser.parse_args(argv)


def run_eval(args: argparse.Namespace) -> None:
    pipeline = load_pipeline(args.model, args.route, args.precision, args.threads)
    if args.zero_image:
        zero_image_features(pipeline, args.route)
    if args.zero_deepstack:
        zero_deepstack(pipeline, args.route)
    answer = pipeline_answerer(pipeline, args.route, args.max_new_tokens)
    report = evaluate(answer, route_exchanges(args.route, args.n, args.seed, args.style))
    if args.json:
        result = {
            "route": args.route, "precision": args.precision, "model": args.model, "n": args.n,
            "seed": args.seed, "style": args.style, "zero_image": args.zero_image,
            "zero_deepstack": args.zero_deepstack,
        }  # fmt: skip
        sys.stdout.write(json.dumps(result | report.to_json()) + "\n")
    else:
        sys.stdout.write(report.table() + "\n")


def main(argv: list[str] | None = None) -> int:
    setup_logging(logging.INFO)
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    try:
        if args.command == "train":
            cfg = TrainConfig(steps=args.steps, tower_steps=args.tower_steps, pictures=args.pictures,
                              questions=args.questions, seed=args.seed, threads=args.threads)
            train(args.out, cfg)
        else:
            run_eval(args)
    except (HybridError, InvalidConfig) as error:
        sys.stderr.write(f"error: {error}\n")
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
