"""The streamed export: the same decoder as the traced one, parts equal to the checkpoint widened to
float32, and a peak memory that grows with the largest tensor rather than with the model."""

from __future__ import annotations

import json
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from safetensors.torch import load_file
from transformers import Qwen3VLForConditionalGeneration

from hybrid.decoder import open_session
from hybrid.export.bundle import export_bundle
from hybrid.export.int4 import ACCURACY_LEVEL
from hybrid.layout import DECODER_DIR, DECODER_FILE, DECODER_NUM_LOGITS, EMBED_FILE, GENAI_DIR
from hybrid.tiny import TinySpec, build_checkpoint
from tests.conftest import RTN_B32, SPECS
from tests.traced_export import export_decoder, quantize_int4

pytestmark = pytest.mark.slow  # traces reference exports and runs the GenAI builder

ROOT = Path(__file__).resolve().parents[1]


def decoder_feeds(session: ort.InferenceSession, seed: int = 0, past: int = 2, seq: int = 5) -> dict[str, np.ndarray]:
    """A prefill of `seq` tokens after `past` cached ones, distinct t/h/w positions and DeepStack maps."""
    rng = np.random.default_rng(seed)
    inputs = {i.name: i.shape for i in session.get_inputs()}
    hidden, kv_heads, head_dim = (
        inputs["inputs_embeds"][2],
        inputs["past_key_values.0.key"][1],
        inputs["past_key_values.0.key"][3],
    )
    steps = np.arange(past, past + seq)
    feeds = {
        "inputs_embeds": rng.standard_normal((1, seq, hidden), dtype=np.float32),
        "attention_mask": np.ones((1, past + seq), dtype=np.int64),
        "position_ids": np.stack([steps, steps * 2 % 7, steps * 3 % 5])[:, None].astype(np.int64),
        "deepstack_embeds": rng.standard_normal((inputs["deepstack_embeds"][0], 1, seq, hidden), dtype=np.float32),
    }
    for name in inputs:
        if name.startswith("past_key_values."):
            buffer = np.zeros((1, kv_heads, past + seq + 3, head_dim), dtype=np.float32)
            buffer[:, :, :past] = rng.standard_normal((1, kv_heads, past, head_dim))
            feeds[name] = buffer
    return feeds


def run_decoder(path: Path, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
    """A decoder graph's outputs, by our loader where it is ours (it maps weights kept in the GenAI model's file)."""
    if path.parent.name == DECODER_DIR:
        session, _borrowed = open_session(path, threads=0)
    else:
        session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return session.run(None, {k: v.copy() for k, v in feeds.items()})


def first_tokens(feeds: dict[str, np.ndarray], count: int) -> dict[str, np.ndarray]:
    """The same prefill cut to its first `count` tokens (same cache, same capacity)."""
    past = feeds["attention_mask"].shape[1] - feeds["inputs_embeds"].shape[1]
    return {
        **feeds,
        "inputs_embeds": feeds["inputs_embeds"][:, :count],
        "attention_mask": feeds["attention_mask"][:, : past + count],
        "position_ids": feeds["position_ids"][:, :, :count],
        "deepstack_embeds": feeds["deepstack_embeds"][:, :, :count],
    }


@pytest.fixture(scope="module")
def bf16_checkpoint(workdir) -> Path:
    return build_checkpoint(workdir / "ckpt-base-bf16", SPECS["base"], seed=1, dtype="bfloat16")


@pytest.mark.parametrize("name", ["base", "wide", "base-bf16"])
@pytest.mark.parametrize("precision", ["fp32", "int4"])
def test_streamed_decoder_equals_the_traced_export(checkpoint, bundle, bf16_checkpoint, tmp_path, name, precision):
    # the reference is quantized by onnxruntime's own quantizer: so is ours here (`rtn-b32`)
    int4 = RTN_B32 if precision == "int4" else None
    if name == "base-bf16":
        source = bf16_checkpoint
        options = {"int4": int4} if int4 else {}
        streamed = export_bundle(str(source), tmp_path / "bundle", precision, genai=False, **options) / DECODER_FILE
    else:
        source, streamed = checkpoint(name), bundle(name, precision, int4) / DECODER_FILE
    model = Qwen3VLForConditionalGeneration.from_pretrained(str(source), dtype=torch.float32).eval()
    traced = tmp_path / "traced" / "model.onnx"
    export_decoder(model, traced)
    if precision == "int4":
        quantize_int4(traced)
    feeds = decoder_feeds(ort.InferenceSession(str(traced), providers=["CPUExecutionProvider"]))
    last = {**feeds, DECODER_NUM_LOGITS: np.array([1], dtype=np.int64)}
    ours, reference = run_decoder(streamed, last), run_decoder(traced, feeds)
    assert len(ours) == len(reference)
    for a, b in zip(ours, reference, strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=2e-5)
    # every position's logits (a verification pass) equal the traced prefill that ends there
    seq = feeds["inputs_embeds"].shape[1]
    every = run_decoder(streamed, {**feeds, DECODER_NUM_LOGITS: np.array([seq], dtype=np.int64)})[0]
    assert every.shape[1] == seq
    for count in range(1, seq + 1):
        np.testing.assert_allclose(
            every[:, count - 1], run_decoder(traced, first_tokens(feeds, count))[0][:, -1], rtol=1e-5, atol=2e-5
        )


def test_bundle_parts_are_the_checkpoint_widened(bf16_checkpoint, tmp_path):
    """A bfloat16 checkpoint's vision tower and embedding table come out as its exact float32 values."""
    out = export_bundle(str(bf16_checkpoint), tmp_path / "bundle", "fp32", genai=False)
    state = load_file(str(bf16_checkpoint / "model.safetensors"))
    assert state["model.language_model.embed_tokens.weight"].dtype == torch.bfloat16
    embed = np.load(out / EMBED_FILE)
    np.testing.assert_array_equal(embed, state["model.language_model.embed_tokens.weight"].float().numpy())
    vision = load_file(str(out / "vision" / "model.safetensors"))
    expected = {k.removeprefix("model.visual."): v for k, v in state.items() if k.startswith("model.visual.")}
    assert vision.keys() == expected.keys()
    assert all(vision[k].dtype == torch.float32 and torch.equal(vision[k], expected[k].float()) for k in expected)


# a text model large enough that its weights, not the imports, decide the peak (32 M parameters, the
# largest tensor an eighth of them, as in the real models)
MEMORY_SPEC = replace(
    TinySpec(),
    hidden_size=512,
    num_hidden_layers=6,
    num_attention_heads=8,
    num_key_value_heads=4,
    head_dim=64,
    mrope_section=(12, 10, 10),
    intermediate_size=2048,
    vocab_size=8000,
)

# Exports a tiny model first (every import and lazy code path), resets the peak (Linux's clear_refs),
# then exports the measured one and reports the peak it added over the resident memory before.
MEASURE = """
import json, sys
from pathlib import Path
from hybrid.export.bundle import export_bundle

def status(field):
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1024

warm, source, out, precision = sys.argv[1:]
export_bundle(warm, Path(out).with_name("warm"), precision, genai=False)
Path("/proc/self/clear_refs").write_text("5")
before = status("VmRSS")
export_bundle(source, out, precision, genai=False)
print(json.dumps({"before_mb": before, "peak_mb": status("VmHWM")}))
"""


@pytest.mark.parametrize("precision", ["fp32", "int4"])
def test_export_peak_memory_stays_below_the_weights(checkpoint, workdir, tmp_path, precision):
    source = workdir / "ckpt-memory"
    if not (source / "config.json").is_file():
        build_checkpoint(source, MEMORY_SPEC, seed=0, dtype="bfloat16")
    out = tmp_path / "bundle"
    result = subprocess.run(
        [sys.executable, "-c", MEASURE, str(checkpoint("base")), str(source), str(out), precision],
        capture_output=True,
        text=True,
        cwd=ROOT,
        check=True,
    )
    measured = json.loads(result.stdout.strip().splitlines()[-1])
    added_mb = measured["peak_mb"] - measured["before_mb"]
    fp32_mb = sum(p.stat().st_size for p in source.glob("*.safetensors")) * 2 / 2**20  # bf16 on disk
    # holding the model once in fp32 alone would add `fp32_mb`; streaming holds about one tensor
    assert added_mb < 0.5 * fp32_mb, f"export added {added_mb:.0f} MB at peak for {fp32_mb:.0f} MB of fp32 weights"


def test_fused_attention_writes_the_present_outputs(bundle):
    """Each `present.*` output comes straight from `GroupQueryAttention`: no node copies the cache after it."""
    graph = onnx.load(str(bundle("base") / DECODER_FILE), load_external_data=False).graph
    producers = {output: node.op_type for node in graph.node for output in node.output}
    presents = [o.name for o in graph.output if o.name.startswith("present.")]
    assert presents and all(producers[name] == "GroupQueryAttention" for name in presents)


def test_genai_int4_is_the_builders_own_int4(bf16_checkpoint, tmp_path):
    """A bundle exported with the builder's INT4 setting (`rtn-b32`) holds in its GenAI model exactly
    the weights and nodes of the builder's own `-p int4` (which holds the whole model in fp32 to make
    them), though its weights are the decoder's, fused q|k|v and gate|up cut back into rows, but for
    the embedding table: ours keeps it in fp16 (the builder's values rounded) and casts its rows
    back to float32."""
    ours = export_bundle(str(bf16_checkpoint), tmp_path / "bundle", "int4", int4=RTN_B32) / GENAI_DIR
    builders = tmp_path / "builder"
    subprocess.run(
        [
            sys.executable,
            "-m",
            "onnxruntime_genai.models.builder",
            "-i",
            str(bf16_checkpoint),
            "-o",
            str(builders),
            "-p",
            "int4",
            "-e",
            "cpu",
            "-c",
            str(tmp_path / "cache"),
            "--extra_options",
            "exclude_embeds=false",
            "shared_embeddings=false",
            f"int4_accuracy_level={ACCURACY_LEVEL}",
        ],
        capture_output=True,
        check=True,
    )
    a, b = (onnx.load(str(folder / "model.onnx")) for folder in (ours, builders))
    weights = {t.name: onnx.numpy_helper.to_array(t) for t in b.graph.initializer}
    tables = {n.input[0] for n in b.graph.node if n.op_type == "Gather" and n.input[0] in weights}
    expected = []
    for node in b.graph.node:
        if node.op_type == "Gather" and node.input[0] in tables:
            half = onnx.NodeProto()
            half.CopyFrom(node)
            half.output[0] = node.output[0] + "_fp16"
            cast = onnx.helper.make_node(
                "Cast", [half.output[0]], [node.output[0]], name=node.name + "_float", to=onnx.TensorProto.FLOAT
            )
            expected += [half, cast]
        else:
            expected.append(node)
    assert tables and [n.SerializeToString() for n in a.graph.node] == [n.SerializeToString() for n in expected]
    assert any(n.op_type == "MatMulNBits" for n in a.graph.node)
    assert {t.name for t in a.graph.initializer} == weights.keys()
    for tensor in a.graph.initializer:
        want = weights[tensor.name].astype(np.float16) if tensor.name in tables else weights[tensor.name]
        assert np.array_equal(onnx.numpy_helper.to_array(tensor), want), tensor.name
