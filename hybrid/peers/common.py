"""What every benchmark peer shares: its error, the checkpoint fingerprint an export is keyed by,
the peak memory of a child process tree, and the clean-up of exports killed half-way."""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import subprocess
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

import psutil

from hybrid.errors import UserError

log = logging.getLogger(__name__)

Made = TypeVar("Made")


class PeerUnavailable(UserError):
    """A peer's environment or build could not be made, or its export failed (the message says why)."""


def checkpoint_digest(checkpoint: Path) -> str:
    """Names, sizes and modification times of the checkpoint's files: an export of other files is redone."""
    parts = sorted((f.name, f.stat().st_size, f.stat().st_mtime_ns) for f in checkpoint.iterdir() if f.is_file())
    return hashlib.sha256(json.dumps(parts).encode()).hexdigest()


def wait_with_peak(process: subprocess.Popen, every_s: float = 0.2) -> float:
    """Wait for `process`, sampling the resident memory of it and its children; returns the peak in MB."""
    root = psutil.Process(process.pid)
    peak = 0.0
    while process.poll() is None:
        try:
            tree = [root, *root.children(recursive=True)]
            peak = max(peak, sum(p.memory_info().rss for p in tree if p.is_running()) / 2**20)
        except psutil.Error:
            pass
        time.sleep(every_s)
    return peak


def run_with_peak(command: list[str], what: str, env: dict[str, str] | None = None) -> float:
    """Run `command` to its end; returns its process tree's peak memory in MB, or raises
    PeerUnavailable with the end of its output when it fails."""
    with tempfile.TemporaryFile("w+") as output:
        process = subprocess.Popen(command, stdout=output, stderr=subprocess.STDOUT, env=env)
        peak = wait_with_peak(process)
        if process.returncode != 0:
            output.seek(0)
            raise PeerUnavailable(f"{what} failed: {output.read().strip()[-1500:]}")
    return peak


def remove_stale_exports(out: Path) -> None:
    """Remove `.NAME.partial-PID` folders of exports whose process is gone."""
    for folder in out.parent.glob(f".{out.name}.partial-*"):
        pid = folder.name.rsplit("-", 1)[-1]
        if pid.isdigit() and psutil.pid_exists(int(pid)) and int(pid) != os.getpid():
            continue
        log.info("removing %s, left by an export that did not finish", folder)
        shutil.rmtree(folder, ignore_errors=True)


def write_export(out: Path, make: Callable[[Path], Made]) -> Made:
    """`make(work)` writes an export into `work`, a partial folder beside `out` that then replaces
    `out`; partial folders of exports that did not finish are removed first, and this one if `make`
    fails, so a killed export never passes for a whole one."""
    out.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_exports(out)
    work = out.parent / f".{out.name}.partial-{os.getpid()}"
    shutil.rmtree(work, ignore_errors=True)
    try:
        made = make(work)
        shutil.rmtree(out, ignore_errors=True)
        work.rename(out)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return made


def folder_mb(folder: Path) -> float:
    return sum(f.stat().st_size for f in folder.rglob("*") if f.is_file()) / 2**20
