"""The int8 prompt pass of INT4 bundles: its weights are the INT4 ones to within int8's step, it
writes the keys and values the INT4 decoder would to within quantization error, decode steps after
it run the INT4 graph, and the app's answers do not change for it."""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from hybrid.config import RuntimeConfig, UserError
from hybrid.decoder import OnnxDecoder
from hybrid.demo.eval import eval_exchanges, evaluate, pipeline_answerer
from hybrid.export import prefill
from hybrid.export.bundle import export_bundle
from hybrid.export.int4 import Int4Setting, int4_arrays, matmul_nbits_attributes, quantize_int4
from hybrid.export.int8 import LEVELS, int8_columns
from hybrid.export.prefill import NBitsWeight
from hybrid.layout import DECODER_DIR, DECODER_FILE, PREFILL_FILE
from hybrid.manifest import Manifest
from hybrid.pipeline import Pipeline


def nbits_product(weight, setting: Int4Setting, x: np.ndarray) -> np.ndarray:
    """What onnxruntime's `MatMulNBits` computes for `x @ W.T` of this INT4 weight (fp32 compute)."""
    n, k = weight.packed.shape[0], x.shape[1]
    arrays = int4_arrays("w", weight)
    attributes = {**matmul_nbits_attributes(setting, k, n), "accuracy_level": 0}
    node = helper.make_node(
        "MatMulNBits", ["x", *(name for name, _ in arrays)], ["y"], domain="com.microsoft", **attributes
    )
    graph = helper.make_graph(
        [node],
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, list(x.shape))],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [x.shape[0], n])],
        [numpy_helper.from_array(array, name) for name, array in arrays],
    )
    model = helper.make_model(
        graph, opset_imports=[helper.make_opsetid("", 18), helper.make_opsetid("com.microsoft", 1)]
    )
    return ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]


@pytest.mark.parametrize("setting", [Int4Setting(64, "rtn-zp"), Int4Setting(32, "rtn"), Int4Setting(128, "mse-zp")])
def test_the_int4_weight_expands_to_what_matmulnbits_multiplies_by(setting, monkeypatch):
    monkeypatch.setattr(prefill, "ROW_BLOCK", 20)  # 48 rows: three blocks, the last one short
    rng = np.random.default_rng(0)
    weight = rng.standard_normal((48, 320)).astype(np.float32)  # 320: not a multiple of 128
    quantized = quantize_int4(weight, setting)
    expanded = NBitsWeight(quantized.packed, quantized.scales, quantized.zero_points, 320, setting.block_size)
    eye = np.eye(320, dtype=np.float32)
    np.testing.assert_allclose(expanded.dequantized(), nbits_product(quantized, setting, eye).T, rtol=1e-6, atol=1e-6)
    np.testing.assert_array_equal(expanded.dequantized(slice(5, 9)), expanded.dequantized()[5:9])
    whole, scales = int8_columns(expanded.dequantized())
    by_rows = expanded.int8()  # a block of output rows at a time: the same codes
    np.testing.assert_array_equal(by_rows[0], whole)
    np.testing.assert_array_equal(by_rows[1], scales)
    assert np.abs(expanded.dequantized() - weight).mean() < 0.15  # and it is near the weight it quantized


def test_int8_columns_round_to_within_half_a_step():
    rng = np.random.default_rng(1)
    weight = rng.standard_normal((40, 96)).astype(np.float32) * rng.uniform(0.01, 3.0, (40, 1)).astype(np.float32)
    weight[3] = 0.0  # a column of zeros keeps a finite scale
    codes, scales = int8_columns(weight)
    assert codes.shape == (96, 40) and codes.dtype == np.int8 and np.isfinite(scales).all()
    back = codes.T.astype(np.float32) * scales[:, None]
    assert np.all(np.abs(back - weight) <= scales[:, None] / 2 + 1e-7)
    assert np.abs(codes).max() == LEVELS == 63  # 7 bits: no saturation in MLAS's AVX2 kernel


def test_an_int4_bundle_has_the_int8_graph_without_its_weights_and_an_fp32_one_does_not(bundle):
    """The int8 weights take no disk: the graph names them at `DERIVED_LOCATION`, one pair for each
    INT4 layer of the decoder, and the route makes them from the INT4 weights as it loads."""
    folder = bundle("base", "int4")
    manifest = Manifest.load(folder)
    assert manifest.parts[PREFILL_FILE].precision == "int8"
    assert [part for part in manifest.parts if part.startswith(PREFILL_FILE)] == [PREFILL_FILE]
    decoder = onnx.load(str(folder / DECODER_FILE), load_external_data=False).graph
    layers = {
        n.input[1].removesuffix("_Q4"): n
        for n in decoder.node
        if n.op_type == "MatMulNBits" and not n.input[1].startswith(prefill.HEAD_PREFIX)
    }
    graph = onnx.load(str(folder / PREFILL_FILE), load_external_data=False).graph
    derived = {
        t.name
        for t in graph.initializer
        if t.external_data[0:1] and t.external_data[0].value == prefill.DERIVED_LOCATION
    }
    assert derived == {stem + suffix for stem in layers for suffix in (prefill.CODES, prefill.SCALES)}
    made = prefill.DerivedInt8(folder / PREFILL_FILE, folder / DECODER_FILE)
    stored = {t.name: t for t in decoder.initializer}
    for stem in ("layers.0.qkv.weight", "layers.1.down_proj.weight"):
        codes, scales = prefill._nbits_weight(layers[stem], stored, folder / DECODER_DIR).int8()
        np.testing.assert_array_equal(made.arrays[stem + prefill.CODES], codes)
        np.testing.assert_array_equal(made.arrays[stem + prefill.SCALES], scales)
    assert PREFILL_FILE not in Manifest.load(bundle("base")).parts
    assert not (bundle("base") / PREFILL_FILE).exists()


def test_int8_weights_stored_in_the_bundle_give_what_the_ones_made_at_load_give(bundle, checkpoint, tmp_path):
    stored = export_bundle(str(checkpoint("base")), tmp_path / "stored", "int4", store_int8=True)
    assert (stored / (PREFILL_FILE + ".data")).stat().st_size > 0
    made = bundle("base", "int4")
    decoders = [OnnxDecoder(b / DECODER_FILE, prompt=b / PREFILL_FILE) for b in (stored, made)]
    inputs = prompt(decoders[0], 20)
    logits = [d.forward(d.new_cache(24), *inputs) for d in decoders]
    np.testing.assert_array_equal(logits[0], logits[1])


def prompt(decoder: OnnxDecoder, seq: int, seed: int = 3):
    rng = np.random.default_rng(seed)
    embeds = rng.standard_normal((1, seq, decoder.hidden_size)).astype(np.float32)
    positions = np.broadcast_to(np.arange(seq)[None, None], (3, 1, seq)).copy()
    deepstack = rng.standard_normal((decoder.num_deepstack, 1, seq, decoder.hidden_size)).astype(np.float32) * 0.1
    return embeds, positions, deepstack


def cosine(a: np.ndarray, b: np.ndarray) -> float:
    a, b = a.ravel().astype(np.float64), b.ravel().astype(np.float64)
    return float(a @ b / (np.linalg.norm(a) * np.linalg.norm(b)))


@pytest.mark.parametrize("name", ["base", "wide"])
def test_the_int8_prompt_pass_writes_what_the_int4_decoder_would(bundle, name):
    folder = bundle(name, "int4")
    plain = OnnxDecoder(folder / DECODER_FILE)
    fast = OnnxDecoder(folder / DECODER_FILE, prompt=folder / PREFILL_FILE)
    inputs = prompt(plain, 40)
    slow_cache, fast_cache = plain.new_cache(48), fast.new_cache(48)
    slow_logits, fast_logits = plain.forward(slow_cache, *inputs), fast.forward(fast_cache, *inputs)
    assert fast_cache.length == slow_cache.length == 40
    assert cosine(fast_logits, slow_logits) > 0.995  # an unscaled row or a transposed weight gives far less
    for ours, theirs in zip(fast_cache.buffers, slow_cache.buffers):
        assert cosine(ours[:, :, :40], theirs[:, :, :40]) > 0.995
    # the steps after it run the INT4 graph: on equal caches, the two decoders' steps are equal
    for ours, theirs in zip(fast_cache.buffers, slow_cache.buffers):
        ours[:, :, :40] = theirs[:, :, :40]
    row = inputs[0][0, -1]
    np.testing.assert_array_equal(fast.step(fast_cache, row, 40), plain.step(slow_cache, row, 40))
    two = [row, row * 0.5]
    np.testing.assert_array_equal(fast.run_text(fast_cache, two, 41), plain.run_text(slow_cache, two, 41))


def test_a_follow_up_prefill_after_steps_binds_the_step_inputs_again(bundle):
    """The prompt graph has a binding of its own: a decode step after a second prefill still reads
    its own inputs (a prefill through the decoder's binding must rebind them)."""
    folder = bundle("base", "int4")
    for decoder in (
        OnnxDecoder(folder / DECODER_FILE),
        OnnxDecoder(folder / DECODER_FILE, prompt=folder / PREFILL_FILE),
    ):
        cache = decoder.new_cache(64)
        inputs = prompt(decoder, 12)
        decoder.forward(cache, *inputs)
        first = decoder.step(cache, inputs[0][0, 0], 12).copy()
        more = prompt(decoder, 6, seed=4)
        decoder.forward(cache, more[0], more[1] + 13, more[2])
        again = decoder.step(cache, inputs[0][0, 0], 19).copy()
        assert np.isfinite(again).all() and not np.array_equal(first, again)
        assert cache.length == 20


def test_the_route_prefills_in_int8_unless_asked_and_answers_alike(bundle, demo_bundle):
    """On the trained demo model (the random tiny models have logit margins below what 8-bit
    activations move): most replies are the same word for word; what differs is within the accuracy
    that test_demo_model's INT4 test holds to fp32's."""
    fp32 = Pipeline.load(bundle("base"), verify=False, only=("hybrid",))
    assert fp32.routes["hybrid"].decoder.prompt_session is None  # fp32 bundles prefill in fp32
    folder = demo_bundle("int4")
    fast = Pipeline.load(folder, verify=False, only=("hybrid",))
    slow = Pipeline.load(folder, RuntimeConfig(prefill="decoder"), verify=False, only=("hybrid",))
    assert fast.routes["hybrid"].decoder.prompt_session is not None
    assert slow.routes["hybrid"].decoder.prompt_session is None
    exchanges = eval_exchanges(12, seed=99, text=False)
    ours, theirs = (evaluate(pipeline_answerer(p, "hybrid"), exchanges, keep=len(exchanges)) for p in (fast, slow))
    same = [a.reply == b.reply for a, b in zip(ours.samples, theirs.samples, strict=True)]
    assert len(same) == len(exchanges) and sum(same) >= 0.75 * len(same), f"{sum(same)} of {len(same)} alike"
    assert abs(ours.any_label_hit_rate - theirs.any_label_hit_rate) <= 0.15


def test_an_unknown_prefill_is_refused():
    with pytest.raises(UserError, match="int8, decoder"):
        RuntimeConfig(prefill="int4")
