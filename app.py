"""The web demo's entry point: flags -> export or reuse a bundle -> load the pipeline once -> serve
the page and the OpenAI-compatible API (`web/`) on one server.

    python app.py [--model SRC] [--bundle DIR] [--precision auto|fp32|int4] [--share --auth USER:PASSWORD]
                  [--api-key KEY] [--allow-url-images] [--trust-proxy] [--remote URL [--remote-model NAME]] ...
"""

from __future__ import annotations

import argparse
import logging
import os
import sys

from hybrid.cli import add_prefill_argument, add_remote_arguments, add_vision_argument, remote_config, vision_backend
from hybrid.config import PRECISIONS, RuntimeConfig
from hybrid.errors import HybridError
from hybrid.launch import AUTO_PRECISION, describe, load_pipeline
from hybrid.limits import RateLimiter
from hybrid.logs import setup_logging
from web.admission import Admission
from web.api import ApiConfig, ChatApi
from web.page import build_demo, launch_demo

log = logging.getLogger("app")

RATE_LIMIT = 20  # requests per minute and session
AUTH_ENV = "HYBRID_AUTH"  # USER:PASSWORD, read when --auth is not given
API_KEY_ENV = "HYBRID_API_KEY"  # the Bearer token of /v1, read when --api-key is not given


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description="Qwen3-VL hybrid inference on the CPU: the web demo")
    parser.add_argument("--model", help="checkpoint folder or hub id (default: the demo model in assets/demo-model)")
    parser.add_argument(
        "--bundle",
        help="bundle folder (default: .cache/bundles/<model>-<precision>); "
        "an existing bundle given without --model is served as is",
    )
    parser.add_argument(
        "--precision",
        choices=(AUTO_PRECISION, *PRECISIONS),
        default=AUTO_PRECISION,
        help="auto: INT4 decoder and GenAI model and INT8 vision for a real checkpoint, fp32 for the demo model",
    )
    parser.add_argument("--threads", type=int, default=0, help="0: one per physical core")
    add_vision_argument(parser)
    add_prefill_argument(parser)
    parser.add_argument(
        "--conversation-cache-mb",
        type=int,
        default=RuntimeConfig.conversation_cache_mb,
        metavar="MB",
        help="memory for the KV caches kept for follow-up questions, all sessions together (0: none)",
    )
    parser.add_argument("--server-name", default="127.0.0.1", help="0.0.0.0 to serve the local network")
    parser.add_argument("--port", type=int, default=7860)
    parser.add_argument("--share", action="store_true", help="make a public Gradio link (use --auth with it)")
    parser.add_argument(
        "--auth",
        metavar="USER:PASSWORD",
        default=os.environ.get(AUTH_ENV),
        help=f"ask for this login before showing the page (default: ${AUTH_ENV}, if set)",
    )
    parser.add_argument(
        "--rate-limit",
        type=int,
        default=RATE_LIMIT,
        metavar="N",
        help="requests per minute and client address, page and API together (0: no limit)",
    )
    parser.add_argument(
        "--trust-proxy",
        action="store_true",
        help="behind a reverse proxy: limit by the X-Forwarded-For address, not the peer's",
    )
    parser.add_argument(
        "--api-key",
        metavar="KEY",
        default=os.environ.get(API_KEY_ENV),
        help=f"the Bearer token /v1 asks for (default: ${API_KEY_ENV}, if set); with --share and no key the API is off",
    )
    parser.add_argument(
        "--allow-url-images",
        action="store_true",
        help="let /v1 fetch http(s) pictures (public addresses only); otherwise data URLs only",
    )
    add_remote_arguments(parser)
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    args = parser.parse_args(argv)
    if args.auth is not None and not _valid_auth(args.auth):
        parser.error(f"--auth (or ${AUTH_ENV}) takes USER:PASSWORD, both non-empty")
    if args.rate_limit < 0:
        parser.error("--rate-limit must be >= 0")
    return args


def api_config(args: argparse.Namespace) -> ApiConfig:
    """`/v1` as the flags ask: behind the key, if any; off on a public link that has none."""
    off = args.share and not args.api_key
    if off:
        log.warning("--share without --api-key: the OpenAI-compatible API (/v1) is off")
    reason = "this server shares a public link without --api-key" if off else ""
    return ApiConfig(
        key=args.api_key or None, enabled=not off, allow_url_images=args.allow_url_images, off_reason=reason
    )


def _valid_auth(text: str) -> bool:
    user, _, password = text.partition(":")
    return bool(user and password)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    setup_logging(logging.DEBUG if args.verbose else logging.INFO)
    try:
        runtime = RuntimeConfig(
            threads=args.threads,
            conversation_cache_mb=args.conversation_cache_mb,
            vision_backend=vision_backend(args.vision),
            prefill=args.prefill,
        )
        pipeline = load_pipeline(args.model, args.bundle, args.precision, runtime, remote_config(args))
    except HybridError as exc:
        log.error("%s", exc)
        return 2
    admission = Admission(RateLimiter(args.rate_limit, 60.0) if args.rate_limit else None, trust_proxy=args.trust_proxy)
    demo = build_demo(pipeline, describe(pipeline), admission=admission)
    api = ChatApi(pipeline, admission, api_config(args))
    auth = tuple(args.auth.split(":", 1)) if args.auth else None
    if args.share and auth is None:
        log.warning("--share without --auth: anyone with the link can use this machine's CPU")
    launch_demo(
        demo, routes=api.routes(), server_name=args.server_name, server_port=args.port, share=args.share, auth=auth
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
