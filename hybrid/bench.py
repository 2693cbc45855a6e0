"""`python -m hybrid bench`: the routes side by side on a checkpoint with the real 2B/4B shapes."""

from __future__ import annotations

import argparse

from hybrid.errors import UserError


def add_bench_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--preset", default="tiny")


def run_bench(args: argparse.Namespace) -> int:
    raise UserError("bench is not built yet")
