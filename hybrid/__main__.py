"""`python -m hybrid export | generate | bench`: the command-line entry point.

Errors a user can cause print one line on stderr and exit with status 2.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from typing import NoReturn

from hybrid.config import DEFAULT_MAX_IMAGE_TOKENS, RuntimeConfig
from hybrid.errors import HybridError
from hybrid.router import ROUTE_CHOICES


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:
        self.exit(2, f"error: {message} (see --help)\n")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="python -m hybrid", description="Qwen3-VL hybrid inference on the CPU")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)

    export = sub.add_parser("export", help="turn a Qwen3-VL checkpoint into a bundle")
    export.add_argument("--model", required=True, help="checkpoint folder or hub id")
    export.add_argument("--out", required=True, help="bundle folder to write")
    export.add_argument("--precision", choices=("fp32", "int4"), default="fp32")
    export.add_argument("--no-genai", action="store_true", help="skip the onnxruntime-genai text model")

    gen = sub.add_parser("generate", help="answer one prompt")
    gen.add_argument("--bundle", required=True)
    gen.add_argument("--prompt", required=True)
    gen.add_argument("--image", action="append", default=[], help="image file (repeatable, in order)")
    gen.add_argument("--system", default="", help="optional system message")
    gen.add_argument("--route", choices=ROUTE_CHOICES, default="auto")
    gen.add_argument("--max-new-tokens", type=int, default=128)
    gen.add_argument("--temperature", type=float, default=0.0)
    gen.add_argument("--top-k", type=int, default=0)
    gen.add_argument("--top-p", type=float, default=1.0)
    gen.add_argument("--repetition-penalty", type=float, default=1.0)
    gen.add_argument("--seed", type=int, default=0)
    gen.add_argument("--stop", action="append", default=[], help="stop string (repeatable)")
    gen.add_argument("--threads", type=int, default=0, help="0: one per physical core")
    gen.add_argument("--max-images", type=int, default=RuntimeConfig.max_images, help="refuse more images than this")
    gen.add_argument("--max-image-tokens", type=int, default=DEFAULT_MAX_IMAGE_TOKENS,
                     help="image tokens per picture at most: larger pictures are scaled down")  # fmt: skip
    gen.add_argument("--json", action="store_true", help="one JSON object per route instead of streamed text")

    from hybrid.bench import add_bench_arguments

    add_bench_arguments(sub.add_parser("bench", help="benchmark the routes side by side"))
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    quiet = args.command == "generate"  # its stderr is for the one-line error only
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.WARNING if quiet else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    for noisy in ("httpx", "urllib3", "huggingface_hub", "transformers"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    try:
        return _COMMANDS[args.command](args)
    except HybridError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("error: interrupted", file=sys.stderr)
        return 130


def _export(args: argparse.Namespace) -> int:
    from hybrid.export.bundle import export_bundle

    export_bundle(args.model, args.out, precision=args.precision, genai=not args.no_genai)
    return 0


def _generate(args: argparse.Namespace) -> int:
    from hybrid.config import SamplingConfig
    from hybrid.images import open_image
    from hybrid.pipeline import Pipeline
    from hybrid.types import Message, Request

    sampling = SamplingConfig(
        max_new_tokens=args.max_new_tokens,
        temperature=args.temperature,
        top_k=args.top_k,
        top_p=args.top_p,
        repetition_penalty=args.repetition_penalty,
        seed=args.seed,
        stop=tuple(args.stop),
    )
    runtime = RuntimeConfig(threads=args.threads, max_images=args.max_images)
    runtime.check_image_count(len(args.image))
    images = tuple(open_image(path, runtime.max_image_pixels) for path in args.image)
    messages = (Message("system", args.system),) if args.system else ()
    request = Request(
        messages + (Message("user", args.prompt, images),), sampling, max_image_tokens=args.max_image_tokens
    )
    pipeline = Pipeline.load(args.bundle, runtime)
    for route in pipeline.plan(request, args.route):
        result = collect(pipeline.stream(request, route), echo=None if args.json else sys.stdout)
        if args.json:
            print(json.dumps(result, ensure_ascii=False), flush=True)
        else:
            print(file=sys.stdout, flush=True)
            logging.getLogger("hybrid").debug("%s: %s", route, json.dumps(result["timings"]))
    return 0


def collect(chunks, echo=None) -> dict:
    """Drain a chunk stream into the CLI's JSON shape, echoing text as it arrives."""
    text, token_ids, last = [], [], None
    for chunk in chunks:
        text.append(chunk.text)
        token_ids.extend(chunk.token_ids)
        if echo is not None and chunk.text:
            echo.write(chunk.text)
            echo.flush()
        last = chunk
    return {
        "route": last.route,
        "text": "".join(text),
        "token_ids": token_ids,
        "finish_reason": last.finish_reason,
        "timings": last.timings.to_dict(),
    }


def _bench(args: argparse.Namespace) -> int:
    from hybrid.bench import run_bench

    return run_bench(args)


_COMMANDS = {"export": _export, "generate": _generate, "bench": _bench}

if __name__ == "__main__":
    sys.exit(main())
