"""OpenVINO GenAI as a benchmark peer: its environment is built from the pinned requirements, its
export of a small fp32 checkpoint answers greedy with the PyTorch route's tokens (DeepStack kept: the
same model without DeepStack answers otherwise), and `bench --peers openvino` puts it in the report.
Skipped, with pip's reason, only where the environment cannot be built."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from dataclasses import replace

import numpy as np
import pytest
from PIL import Image

from hybrid.config import SamplingConfig
from hybrid.demo.eval import zero_deepstack
from hybrid.peers import common, openvino
from hybrid.pipeline import Pipeline
from hybrid.types import Message, Request, collect


@pytest.fixture(scope="module")
def peer_python():
    try:
        return openvino.ensure_env()
    except openvino.PeerUnavailable as error:
        pytest.skip(str(error))


def picture(seed: int, size=(96, 64)) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 255, (size[1], size[0], 3), dtype=np.uint8))


def test_the_fp32_export_answers_with_the_pytorch_routes_tokens(peer_python, checkpoint, bundle, pipeline, tmp_path):
    export = tmp_path / "openvino-wide-fp32"
    record = openvino.ensure_export(peer_python, checkpoint("wide"), export, openvino.OpenVinoScheme("fp32"))
    assert record.scheme == "fp32" and record.peak_rss_mb > 0 and record.disk_mb > 0
    assert openvino.ensure_export(peer_python, checkpoint("wide"), export, openvino.OpenVinoScheme("fp32")) == record
    reference = pipeline("wide", "fp32")
    worker = openvino.OpenVinoWorker(peer_python, export, 2, tmp_path / "worker.log", exact=True)
    assert worker.settings["INFERENCE_PRECISION_HINT"] == "f32" and worker.settings["KV_CACHE_PRECISION"] == "f32"
    try:
        for seed, text in [(0, "Describe the picture."), (1, "What colour is it?")]:
            sampling = SamplingConfig(max_new_tokens=10, min_new_tokens=10)
            request = Request((Message("user", text, (picture(seed),)),), sampling)
            theirs = worker.ask(request)
            ours = collect("pytorch", reference.stream(request, "pytorch"))
            assert theirs["timings"]["prompt_tokens"] == ours["timings"]["prompt_tokens"]
            assert theirs["tokens"] == ours["token_ids"], (seed, text)
            assert theirs["timings"]["decode_tokens"] == 10 and theirs["timings"]["vision_ms"] > 0
        text_only = worker.ask(Request((Message("user", "Hello there"),), replace(sampling, min_new_tokens=0)))
        assert (
            text_only["tokens"]
            == collect(
                "pytorch",
                reference.stream(
                    Request((Message("user", "Hello there"),), replace(sampling, min_new_tokens=0)), "pytorch"
                ),
            )["token_ids"]
        )
    finally:
        worker.close()
    blind_pipeline = Pipeline.load(bundle("wide", "fp32"), verify=False, only=("pytorch",))  # not the shared one
    zero_deepstack(blind_pipeline, "pytorch")
    blind = collect("pytorch", blind_pipeline.stream(request, "pytorch"))
    assert blind["token_ids"] != theirs["tokens"]  # so the equality above could tell DeepStack was dropped


def test_an_export_killed_half_way_is_cleaned_up_by_the_next(peer_python, tmp_path):
    out = tmp_path / "openvino-x"
    dead = tmp_path / ".openvino-x.partial-999999999"
    dead.mkdir()
    (dead / "openvino_language_model.bin").write_bytes(b"\0" * 1024)
    live = tmp_path / f".openvino-x.partial-{os.getppid()}"
    live.mkdir()
    common.remove_stale_exports(out)
    assert not dead.exists() and live.exists()


def test_bench_reports_the_peer_beside_the_routes(peer_python, tmp_path):
    command = [sys.executable, "-m", "hybrid", "bench", "--preset", "tiny", "--image", "64x64", "--new-tokens", "6"]
    command += ["--runs", "1", "--prompt-tokens", "8", "--cache", str(tmp_path), "--json"]
    command += ["--routes", "hybrid_int4", "--peers", "openvino"]
    result = subprocess.run(command, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-2000:]
    report = json.loads(result.stdout.strip().splitlines()[-1])
    assert set(report["routes"]) == {"hybrid_int4", "openvino_int4"}
    peer, ours = report["routes"]["openvino_int4"], report["routes"]["hybrid_int4"]
    assert peer["prompt_tokens"] == ours["prompt_tokens"] and peer["decode_tokens"] == 6
    for field in ("vision_ms", "prefill_tok_s", "ttft_ms", "decode_tok_s", "peak_rss_mb", "disk_mb"):
        assert peer[field] > 0, field
    export = report["peers"]["openvino_int4"]["export"]
    assert export["scheme"] == "int4-asym-g64-r1" and export["peak_rss_mb"] > 0
    assert "hybrid_int4/openvino_int4 prefill_tok_s" in report["ratios"]
