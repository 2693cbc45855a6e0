"""INT4 settings: each one exports, loads and answers close to fp32; the fidelity measures are consistent."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
from transformers import AutoConfig

from hybrid.decoder import OnnxDecoder
from hybrid.errors import UserError
from hybrid.export import decoder as export
from hybrid.export.bundle import export_bundle
from hybrid.export.int4 import BLOCK_SIZES, QUANTIZERS, Int4Scheme, Int4Setting, quantize_int4
from hybrid.export.prefill import write_int8_prefill
from hybrid.export.tensors import CheckpointTensors, write_npy
from hybrid.manifest import Manifest
from hybrid.quality import FP32, Candidate, measure

SETTINGS = [Int4Setting(block, quantizer) for quantizer, block in itertools.product(QUANTIZERS, BLOCK_SIZES)]


def dequantize(packed: np.ndarray, scales: np.ndarray, zero_points: np.ndarray | None, k: int) -> np.ndarray:
    """`MatMulNBits`' reading of its inputs, written out: `(q - zero) * scale` per block."""
    n, blocks, half = packed.shape
    q = np.stack([packed & 0x0F, packed >> 4], axis=-1).reshape(n, blocks, 2 * half).astype(np.float32)
    if zero_points is None:
        zero = np.full((n, blocks), 8.0, np.float32)
    elif zero_points.dtype == np.uint8:
        zero = np.stack([zero_points & 0x0F, zero_points >> 4], axis=-1).reshape(n, -1)[:, :blocks].astype(np.float32)
    else:
        zero = zero_points.astype(np.float32)
    return ((q - zero[..., None]) * scales[..., None]).reshape(n, -1)[:, :k]


@pytest.mark.parametrize("setting", SETTINGS, ids=lambda s: s.name)
def test_each_setting_reconstructs_the_weight(setting):
    rng = np.random.default_rng(0)
    weight = rng.standard_normal((96, 256)).astype(np.float32)
    weight[0, 5] = 12.0  # an outlier: only its own block should suffer
    quantized = quantize_int4(weight, setting)
    restored = dequantize(quantized.packed, quantized.scales, quantized.zero_points, weight.shape[1])
    error = np.linalg.norm(restored - weight) / np.linalg.norm(weight)
    assert error < {32: 0.13, 64: 0.15, 128: 0.2}[setting.block_size]
    assert (quantized.zero_points is None) == (not setting.zero_points)


def test_finer_blocks_and_zero_points_reconstruct_better():
    rng = np.random.default_rng(1)
    weight = rng.standard_t(3, (128, 512)).astype(np.float32)  # heavy tails, like trained weights

    def error(setting: Int4Setting) -> float:
        q = quantize_int4(weight, setting)
        return float(np.linalg.norm(dequantize(q.packed, q.scales, q.zero_points, 512) - weight))

    assert error(Int4Setting(32)) < error(Int4Setting(64)) < error(Int4Setting(128))
    assert error(Int4Setting(128, "rtn-zp")) < error(Int4Setting(128))


@pytest.mark.parametrize("block", BLOCK_SIZES)
def test_the_searched_scales_beat_round_to_nearest_in_the_same_bytes(block):
    """`mse` keeps `rtn`'s layout (no zero points) and `mse-zp` `rtn-zp`'s, and each block's error
    is at most round-to-nearest's: its scale is one of the candidates the search weighs."""
    rng = np.random.default_rng(3)
    weight = rng.standard_t(4, (64, 3 * block + 16)).astype(np.float32)  # a last partial block
    weight[5, :block] = 0.0  # an all-zero block
    k = weight.shape[1]

    def block_errors(setting: Int4Setting) -> tuple[np.ndarray, object]:
        q = quantize_int4(weight, setting)
        restored = dequantize(q.packed, q.scales, q.zero_points, k)
        padded = np.zeros((64, q.scales.shape[1] * block), np.float32)
        padded[:, :k] = (restored - weight) ** 2
        return padded.reshape(64, -1, block).sum(-1), q

    for searched, plain in (("mse", "rtn"), ("mse-zp", "rtn-zp")):
        mine, q = block_errors(Int4Setting(block, searched))
        theirs, reference = block_errors(Int4Setting(block, plain))
        assert q.packed.shape == reference.packed.shape and q.scales.shape == reference.scales.shape
        assert (q.zero_points is None) == (reference.zero_points is None)
        if q.zero_points is not None:
            assert q.zero_points.shape == reference.zero_points.shape and q.zero_points.dtype == np.uint8
        assert (mine <= theirs * (1 + 1e-5) + 1e-12).all(), searched
        assert mine.sum() < 0.95 * theirs.sum(), searched  # and clearly lower overall
        assert mine[5, 0] == 0.0


@pytest.mark.parametrize("name", ["mse-b32", "rtn-zp-b64+head-mse-b32", "hqq-b128+head-rtn-b128"])
def test_a_scheme_reads_back_its_own_name(name):
    assert Int4Scheme.parse(name).name == name


@pytest.mark.parametrize("text", ["b32", "rtn-32", "rtn-b48", "gptq-b32", ""])
def test_a_bad_setting_is_refused_with_its_form(text):
    with pytest.raises(UserError, match="INT4"):
        Int4Setting.parse(text)


@pytest.mark.slow  # fifteen exports, HQQ's solver among them
def test_every_setting_exports_loads_and_answers_near_fp32(checkpoint, tmp_path):
    source = checkpoint("base")
    config = AutoConfig.from_pretrained(source)
    tensors = CheckpointTensors(source)
    rng = np.random.default_rng(2)
    hidden = config.text_config.hidden_size
    prompt = rng.standard_normal((1, 5, hidden)).astype(np.float32)
    positions = np.broadcast_to(np.arange(5)[None, None], (3, 1, 5)).copy()

    def answer(path) -> np.ndarray:
        dec = OnnxDecoder(path)
        deepstack = np.zeros((dec.num_deepstack, 1, 5, hidden), np.float32)
        return dec.forward(dec.new_cache(8), prompt, positions, deepstack)

    export.export_decoder(tensors, config, tmp_path / "fp32" / "decoder.onnx", "fp32")
    reference = answer(tmp_path / "fp32" / "decoder.onnx")
    for setting in SETTINGS:
        path = tmp_path / setting.name / "decoder.onnx"
        export.export_decoder(tensors, config, path, "int4", int4=Int4Scheme(setting, Int4Setting(128, "rtn-zp")))
        logits = answer(path)
        cosine = logits @ reference / (np.linalg.norm(logits) * np.linalg.norm(reference))
        assert np.isfinite(logits).all() and cosine > 0.8, setting.name  # a broken layout gives about 0


def test_the_bundle_names_its_quantization(checkpoint, tmp_path):
    scheme = Int4Scheme(Int4Setting(64, "rtn-zp"), Int4Setting(32))
    bundle = export_bundle(str(checkpoint("base")), tmp_path / "b", "int4", genai=False, int4=scheme)
    assert Manifest.load(bundle).quantization == "rtn-zp-b64+head-rtn-b32"


def test_the_fidelity_figures_are_consistent(checkpoint, tmp_path):
    """fp32 against itself agrees everywhere; a coarse INT4 decoder does not, and it is smaller."""
    source = checkpoint("base")
    config = AutoConfig.from_pretrained(source)
    tensors = CheckpointTensors(source)
    embed = tmp_path / "embeddings.npy"
    name = export.TEXT + "embed_tokens.weight"
    write_npy(embed, tensors.shape(name), lambda rows: tensors.read(name, rows))
    export.export_decoder(tensors, config, tmp_path / "fp32" / "decoder.onnx", "fp32")
    coarse = Int4Setting(128)
    export.export_decoder(
        tensors, config, tmp_path / "coarse" / "decoder.onnx", "int4", int4=Int4Scheme(coarse, coarse)
    )
    coarse_path = tmp_path / "coarse" / "decoder.onnx"
    write_int8_prefill(coarse_path, coarse_path.with_name("prefill-int8.onnx"))
    decoders = {
        FP32: Candidate(tmp_path / "fp32" / "decoder.onnx", embed),
        "again": Candidate(tmp_path / "fp32" / "decoder.onnx", embed),
        "coarse": Candidate(coarse_path, embed),
        "coarse+int8": Candidate(coarse_path, embed, coarse_path.with_name("prefill-int8.onnx")),
    }
    prompts = [np.array([1, 5, 9, 2], np.int64), np.array([7, 3, 3, 8, 4], np.int64)]
    results = measure(decoders, prompts, new_tokens=12, threads=1)
    again, rough = results["again"], results["coarse"]
    assert (again.top1, again.kl, again.greedy_equal, again.greedy_prefix) == (1.0, 0.0, 1.0, 1.0)
    assert rough.kl > 1e-4 and rough.kl > again.kl
    assert rough.weight_mb < results[FP32].weight_mb / 2  # a tiny model: norms and small tensors stay fp32
    assert all(r.step_ms > 0 for r in results.values())
    fast = results["coarse+int8"]  # the int8 prompt pass moves the figures a little, never far
    assert fast.kl != rough.kl and abs(fast.kl - rough.kl) < max(rough.kl, 1e-3) and fast.top1 > 0.5
