"""The benchmark runs on a tiny preset and its report is complete and consistent (no timing limits)."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from hybrid.bench import DEFAULT_ROUTES, DEMO_KINDS, REUSING, ROUTES, _prepare_bundles, preset_spec, round_order
from hybrid.config import IMAGE_DETAIL
from hybrid.export.int4 import Int4Scheme
from hybrid.layout import BORROWED_FILE, DECODER_DIR
from hybrid.manifest import MANIFEST_NAME, Manifest

ROUTE_FIELDS = ("vision_ms", "prefill_tok_s", "ttft_ms", "decode_tok_s", "peak_rss_mb")


def test_presets_have_the_real_shapes():
    spec = preset_spec("2b", None)
    assert (spec.hidden_size, spec.num_hidden_layers, spec.num_attention_heads, spec.num_key_value_heads) == (
        2048,
        28,
        16,
        8,
    )
    assert spec.vocab_size == 151936 and spec.tie_word_embeddings
    assert preset_spec("4b", 6).num_hidden_layers == 6 and preset_spec("4b", None).hidden_size == 2560


def test_route_keys_name_their_route_precision_speculation_and_prefill():
    assert [r.key for r in DEFAULT_ROUTES] == ["pytorch_fp32", "hybrid_fp32", "hybrid_int4", "genai_int4"]
    assert list(ROUTES) == [r.key for r in DEFAULT_ROUTES] + [
        "hybrid_fp32_plain",
        "hybrid_int4_plain",
        "hybrid_int4_int4prefill",
    ]
    assert {key for key, r in ROUTES.items() if r.prefill == "decoder"} == {"hybrid_int4_int4prefill"}
    assert all(key.startswith(f"{r.route}_{r.precision}") for key, r in ROUTES.items())
    assert {key for key, r in ROUTES.items() if r.speculative == "off"} == {"hybrid_fp32_plain", "hybrid_int4_plain"}


@pytest.mark.slow
def test_the_routes_take_turns_going_first():
    keys = ["hybrid_int4", "genai_int4", "pytorch_fp32"]
    orders = [round_order(keys, run) for run in range(4)]
    assert orders[0] == orders[2] == keys and orders[1] == orders[3] == keys[::-1]


def test_tiny_bench_report(tmp_path):
    command = [
        sys.executable,
        "-m",
        "hybrid",
        "bench",
        "--preset",
        "tiny",
        "--image",
        "64x64",
        "--new-tokens",
        "6",
        "--runs",
        "1",
        "--prompt-tokens",
        "8",
        "--cache",
        str(tmp_path),
        "--json",
        "--follow-up",
        "--prefill-ahead",
        "--detail",
        "--speculation",
        "--routes",
        ",".join(key for key, r in ROUTES.items() if r.speculative != "off"),  # the plain ones come with --speculation
    ]
    result = subprocess.run(command, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-2000:]
    report = json.loads(result.stdout.strip().splitlines()[-1])
    assert set(report["routes"]) == set(ROUTES)
    for key, row in report["routes"].items():
        for field in ROUTE_FIELDS:
            assert row[field] >= 0, (key, field)
        assert row["decode_tok_s"] > 0 and row["ttft_ms"] > 0 and row["peak_rss_mb"] > row["baseline_rss_mb"] > 0
        assert row["decode_tokens"] == 6
    image_rows = [report["routes"][k] for k in ("pytorch_fp32", "hybrid_fp32", "hybrid_int4")]
    assert all(r["vision_ms"] > 0 for r in image_rows) and report["routes"]["genai_int4"]["vision_ms"] == 0
    assert len({r["prompt_tokens"] for r in image_rows}) == 1
    assert report["bandwidth_gb_s"] > 0
    # a decode step reads every decoder weight once: about the size of the INT4 decoder on disk (its
    # own file and the INT4 weights it reads from the GenAI model's)
    int4 = tmp_path / "bundle-tiny-L3-int4"
    on_disk = sum(f.stat().st_size for f in (int4 / DECODER_DIR).glob("model.onnx*"))
    on_disk += json.loads((int4 / BORROWED_FILE).read_text())["bytes"]
    assert 0.5 * on_disk < report["int4_bytes_per_token"] <= on_disk
    hybrid = report["routes"]["hybrid_int4"]
    assert hybrid["decode_tok_s"] < report["ceiling_tok_s"], "no route decodes faster than memory allows"
    assert 0 < hybrid["ceiling_share"] < 1
    for key, r in [(k, r) for k, r in ROUTES.items() if r.route in REUSING]:
        row = report["routes"][key]
        assert row["follow_up_ttft_ms"] > 0 and row["follow_up_ttft_ms_no_reuse"] > 0 and row["first_turn_ttft_ms"] > 0
        assert 0 < row["follow_up_reused_tokens"] < row["follow_up_prompt_tokens"]
        # reuse gives a fresh request's tokens where the prompt pass is the decoder's own graph; with
        # the int8 one, the kept answer's keys came from INT4 steps and a fresh prefill writes them in int8
        exact = r.route == "genai" or r.precision == "fp32" or r.prefill == "decoder"
        assert row["follow_up_same_tokens"] or not exact, key
    assert "follow_up_ttft_ms" not in report["routes"]["pytorch_fp32"]
    for key, r in [(k, r) for k, r in ROUTES.items() if r.route == "hybrid"]:
        row = report["routes"][key]
        assert 0 < row["ahead_tokens"] < row["prompt_tokens"] and row["ahead_ms"] > 0, key
        assert row["ahead_ttft_ms"] > 0, key
        assert row["ahead_same_tokens"] or not (r.precision == "fp32" or r.prefill == "decoder"), key
    assert "ahead_ttft_ms" not in report["routes"]["genai_int4"]
    assert report["cpu"] and "hybrid_int4/hybrid_int4_plain decode_tok_s" in report["ratios"]
    assert report["ratios"]["hybrid_int4/hybrid_int4_int4prefill prefill_tok_s"] > 0
    assert report["routes"]["hybrid_int4_plain"]["decode_tokens"] == 6
    for key in ("hybrid_fp32", "hybrid_int4"):
        passes = report["verify_cost"][key]
        assert [row["drafts"] for row in passes.values()] == [0, 1, 2, 4, 8] and passes["1"]["vs_step"] == 1.0
        assert all(row["ms"] > 0 for row in passes.values())
    for key in ("hybrid_fp32", "hybrid_int4"):
        levels = report["vision_by_detail"][key]
        assert list(levels) == list(IMAGE_DETAIL) and all(v["vision_ms"] > 0 for v in levels.values())
        assert all(0 < v["image_tokens"] <= v["max_image_tokens"] for v in levels.values())


@pytest.mark.slow
def test_the_demo_preset_reports_speculation_per_question_kind(tmp_path):
    command = [sys.executable, "-m", "hybrid", "bench", "--preset", "demo", "--speculation", "--routes", "hybrid_fp32"]
    command += ["--runs", "1", "--new-tokens", "64", "--cache", str(tmp_path), "--json"]
    result = subprocess.run(command, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-2000:]
    report = json.loads(result.stdout.strip().splitlines()[-1])
    assert set(report["routes"]) == {"hybrid_fp32", "hybrid_fp32_plain"} and report["same_tokens"] == {
        "hybrid_fp32": True
    }
    kinds = report["by_kind"]["hybrid_fp32"]
    assert list(kinds) == list(DEMO_KINDS) and all(row["decode_tok_s"] > 0 for row in kinds.values())
    assert all(0 <= row["accepted_tokens"] <= row["draft_tokens"] for row in kinds.values())
    assert all(row["draft_tokens"] == 0 for row in report["by_kind"]["hybrid_fp32_plain"].values())
    assert list(report["verify_cost"]) == ["hybrid_fp32"]


def test_a_cached_bundle_is_reused_only_while_current(tmp_path):
    """The bench keeps its exports between runs, but one made by an older export (here: another INT4
    quantization) is exported again, as the app would, instead of being measured as if current."""
    spec = preset_spec("tiny", None)
    bundle = _prepare_bundles(tmp_path, "tiny", spec, {"int4"})["int4"]
    manifest = bundle / MANIFEST_NAME
    assert Manifest.load(bundle).quantization == Int4Scheme().name
    written = manifest.stat().st_mtime_ns
    assert _prepare_bundles(tmp_path, "tiny", spec, {"int4"})["int4"] == bundle
    assert manifest.stat().st_mtime_ns == written
    record = json.loads(manifest.read_text())
    manifest.write_text(json.dumps(record | {"quantization": "rtn-b32"}))
    assert _prepare_bundles(tmp_path, "tiny", spec, {"int4"})["int4"] == bundle
    assert Manifest.load(bundle).quantization == Int4Scheme().name
