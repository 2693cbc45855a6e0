"""OpenVINO GenAI as a benchmark peer: its own environment, an optimum-intel export of the bench's
checkpoint, and a `VLMPipeline` in a worker process that answers the bench's requests.

The environment is a virtualenv under `.cache/peers` built once from the pinned
`openvino-requirements.txt` (optimum-intel exports Qwen3-VL only with transformers <= 5.0, so it
cannot share the project's). An export is reused while its record names the same checkpoint and
scheme; one killed half-way leaves a `.NAME.partial-PID` folder that the next export removes.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import subprocess
import tempfile
import time
import venv
from dataclasses import asdict, dataclass
from pathlib import Path

from hybrid.errors import UserError
from hybrid.peers.common import PeerUnavailable, checkpoint_digest, folder_mb, run_with_peak, write_export
from hybrid.types import Request

log = logging.getLogger(__name__)

HERE = Path(__file__).resolve().parent
REQUIREMENTS = HERE / "openvino-requirements.txt"
WORKER = HERE / "openvino_worker.py"
ENV_DIR = HERE.parents[1] / ".cache" / "peers" / "openvino-env"
STAMP = "hybrid-requirements.sha256"  # in the environment: the requirements it was built from
EXPORT_RECORD = "hybrid-export.json"  # in an export: what it was made from, how long it took, its peak


@dataclass(frozen=True)
class OpenVinoScheme:
    """How optimum-intel compresses the weights: `int4` (asymmetric unless `sym`, `group_size`
    columns per scale, `ratio` of the layers in INT4; NNCF keeps the embeddings and the head in
    INT8) or `fp32` (no compression: the parity check)."""

    weight_format: str = "int4"
    group_size: int = 64
    ratio: float = 1.0
    sym: bool = False

    @property
    def name(self) -> str:
        if self.weight_format != "int4":
            return self.weight_format
        return f"int4-{'sym' if self.sym else 'asym'}-g{self.group_size}-r{self.ratio:g}"

    def arguments(self) -> list[str]:
        if self.weight_format != "int4":
            return ["--weight-format", self.weight_format]
        extra = ["--sym"] if self.sym else []
        return ["--weight-format", "int4", "--group-size", str(self.group_size), "--ratio", str(self.ratio), *extra]


@dataclass(frozen=True)
class ExportRecord:
    checkpoint: str
    fingerprint: str
    scheme: str
    seconds: float
    peak_rss_mb: float
    disk_mb: float


def requirements_digest() -> str:
    return hashlib.sha256(REQUIREMENTS.read_bytes()).hexdigest()


def env_python(root: Path = ENV_DIR) -> Path:
    return root / "bin" / "python"


def ensure_env(root: Path = ENV_DIR) -> Path:
    """The peer environment's Python, building the environment first if it is missing or was built
    from other requirements (several GB: torch comes with optimum-intel's exporter)."""
    stamp = root / STAMP
    if stamp.is_file() and stamp.read_text().strip() == requirements_digest() and env_python(root).is_file():
        return env_python(root)
    log.info("building the OpenVINO peer environment in %s (once; a few minutes)", root)
    shutil.rmtree(root, ignore_errors=True)
    venv.EnvBuilder(with_pip=True, clear=True).create(root)
    command = [str(env_python(root)), "-m", "pip", "install", "-q", "-r", str(REQUIREMENTS)]
    done = subprocess.run(command, capture_output=True, text=True)
    if done.returncode != 0:
        shutil.rmtree(root, ignore_errors=True)
        raise PeerUnavailable(f"could not build the OpenVINO environment: pip said {done.stderr.strip()[-1500:]}")
    stamp.write_text(requirements_digest() + "\n")
    return env_python(root)


def read_record(out: Path) -> ExportRecord | None:
    try:
        return ExportRecord(**json.loads((out / EXPORT_RECORD).read_text()))
    except (OSError, ValueError, TypeError):
        return None


def ensure_export(python: Path, checkpoint: Path, out: Path, scheme: OpenVinoScheme) -> ExportRecord:
    """`checkpoint` exported by `optimum-cli export openvino` into `out` with `scheme`, unless `out`
    already holds that export; records the export's time, its peak memory (the whole process tree)
    and the folder's size."""
    checkpoint = checkpoint.resolve()
    fingerprint = checkpoint_digest(checkpoint)
    record = read_record(out)
    if record and (record.checkpoint, record.fingerprint, record.scheme) == (str(checkpoint), fingerprint, scheme.name):
        return record
    cli = python.parent / "optimum-cli"
    log.info("exporting %s for OpenVINO (%s) into %s", checkpoint, scheme.name, out)

    def make(work: Path) -> ExportRecord:
        command = [str(cli), "export", "openvino", "--model", str(checkpoint), "--task", "image-text-to-text"]
        start = time.perf_counter()
        peak = run_with_peak([*command, *scheme.arguments(), str(work)], "optimum-cli export openvino")
        seconds, disk = time.perf_counter() - start, folder_mb(work)
        record = ExportRecord(
            str(checkpoint), fingerprint, scheme.name, round(seconds, 1), round(peak, 1), round(disk, 1)
        )
        (work / EXPORT_RECORD).write_text(json.dumps(asdict(record), indent=2) + "\n")
        return record

    record = write_export(out, make)
    log.info(
        "OpenVINO export done in %.0f s, peak %.0f MB, %.0f MB on disk",
        record.seconds,
        record.peak_rss_mb,
        record.disk_mb,
    )
    return record


class OpenVinoWorker:
    """`VLMPipeline` on one export in the peer environment's Python, asked like a bench route's
    worker: `ask(request)` gives {"tokens", "timings"} with the routes' timing fields. It runs with
    the CPU plugin's defaults, as a user of OpenVINO gets them, unless `exact` asks for fp32
    compute and an fp32 KV cache (the parity check)."""

    def __init__(self, python: Path, model: Path, threads: int, log_file: Path, exact: bool = False) -> None:
        read, write = os.pipe()
        self.log = open(log_file, "a")
        env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
        env |= {"HYBRID_PEER_FD": str(write), "PYTHONUNBUFFERED": "1"}
        # -P: the worker's folder is not put on sys.path (this module's name would shadow openvino)
        command = [str(python), "-P", str(WORKER), str(model), "--threads", str(threads), *(["--exact"] * exact)]
        self.process = subprocess.Popen(
            command, stdin=subprocess.PIPE, stdout=self.log, stderr=self.log, pass_fds=(write,), env=env, text=True
        )
        os.close(write)
        self.answers = os.fdopen(read)
        self.images = Path(tempfile.mkdtemp(prefix="hybrid-peer-"))
        ready = self._receive()
        self.loaded_mb, self.baseline_rss_mb = ready["loaded_mb"], ready["baseline_rss_mb"]
        self.settings: dict[str, str] = ready["settings"]  # the CPU plugin's precision and thread settings

    def _receive(self) -> dict:
        line = self.answers.readline()
        if not line:
            raise PeerUnavailable(f"the OpenVINO worker exited (its log: {self.log.name})")
        answer = json.loads(line)
        if "error" in answer:
            raise PeerUnavailable(f"OpenVINO worker: {answer['error']} (its log: {self.log.name})")
        return answer

    def ask(self, request: Request) -> dict:
        if len(request.messages) != 1:
            raise UserError("the OpenVINO peer is asked one-message requests only")
        message = request.messages[0]
        if len(message.images) > 1 or message.videos:
            raise UserError("the OpenVINO peer is asked with at most one picture")
        image = None
        if message.images:
            image = str(self.images / "picture.png")
            message.images[0].save(image)
        sampling = request.sampling
        line = {
            "prompt": message.text,
            "image": image,
            "max_new_tokens": sampling.max_new_tokens,
            "min_new_tokens": sampling.min_new_tokens,
        }
        self.process.stdin.write(json.dumps(line) + "\n")
        self.process.stdin.flush()
        return self._receive() | {"settings": self.settings}

    def close(self) -> None:
        if self.process.stdin and not self.process.stdin.closed:
            self.process.stdin.close()
        try:
            self.process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.process.kill()
        self.answers.close()
        self.log.close()
        shutil.rmtree(self.images, ignore_errors=True)
