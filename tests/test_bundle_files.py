"""What a bundle holds on disk: an INT4 bundle's embedding tables in fp16 (read back as float32, the
rows the decoder takes; the GenAI model's alike), its INT4 weights once, and the folders a killed
export left behind removed by the next one."""

from __future__ import annotations

import json
import os
import shutil
import time

import numpy as np
import onnx
import pytest
from onnx import TensorProto
from safetensors.torch import load_file

from hybrid.decoder import OnnxDecoder
from hybrid.errors import BundleError
from hybrid.export.bundle import LOCK_FILE, STALE_UNLOCKED_S, _hold, export_bundle, remove_stale_work
from hybrid.export.tensors import write_npy
from hybrid.injection import EmbeddingTable
from hybrid.layout import (
    BORROWED_FILE,
    BORROWED_LOCATION,
    DECODER_DIR,
    DECODER_FILE,
    EMBED_FILE,
    EMBED_SHARED,
    GENAI_DATA,
    GENAI_DIR,
    route_parts,
)
from hybrid.manifest import Manifest


def test_an_embedding_table_round_trips_through_fp16(tmp_path):
    table = np.random.default_rng(0).standard_normal((37, 16)).astype(np.float32)
    path = tmp_path / "embed.npy"
    write_npy(path, table.shape, lambda rows: table[rows], block=8, dtype=np.float16)
    assert np.load(path).dtype == np.float16
    rows = EmbeddingTable(path)(np.array([[0, 5, 36]]))
    assert rows.dtype == np.float32 and rows.shape == (1, 3, 16)
    np.testing.assert_array_equal(rows[0], table[[0, 5, 36]].astype(np.float16).astype(np.float32))
    np.testing.assert_allclose(rows[0], table[[0, 5, 36]], rtol=1e-3, atol=1e-3)


def test_an_int4_bundle_keeps_its_embeddings_in_fp16_and_fp32_stays_fp32(bundle, checkpoint):
    reference = load_file(str(checkpoint("base") / "model.safetensors"))["model.language_model.embed_tokens.weight"]
    for precision, dtype in (("int4", np.float16), ("fp32", np.float32)):
        folder = bundle("base", precision)
        table = EmbeddingTable.of_bundle(folder).weight
        assert table.dtype == dtype and table.shape == tuple(reference.shape)
        np.testing.assert_array_equal(np.asarray(table), reference.numpy().astype(dtype))
        part = EMBED_SHARED if precision == "int4" else EMBED_FILE
        assert Manifest.load(folder).parts[part].precision == np.dtype(dtype).name.replace("float", "fp")
        assert not (folder / LOCK_FILE).exists()


def test_an_int4_bundle_reads_its_embedding_table_from_the_genai_model(bundle, tmp_path):
    """One copy on disk: the pointer names the GenAI model's data, where the table lies bit for bit;
    a pointer past the file's end, or a missing GenAI model, is a clear bundle error."""
    folder = bundle("base", "int4")
    assert not (folder / EMBED_FILE).exists()
    where = json.loads((folder / EMBED_SHARED).read_text())
    assert where["file"] == GENAI_DATA and where["dtype"] == "float16"
    assert GENAI_DATA in route_parts("hybrid", folder) and GENAI_DATA not in route_parts("hybrid", bundle("base"))
    copy = tmp_path / "copy"
    shutil.copytree(folder, copy)
    (copy / EMBED_SHARED).write_text(json.dumps(where | {"offset": (copy / GENAI_DATA).stat().st_size}))
    with pytest.raises(BundleError, match="embedding table"):
        EmbeddingTable.of_bundle(copy)
    (copy / GENAI_DATA).unlink()
    with pytest.raises(BundleError, match="embedding table"):
        EmbeddingTable.of_bundle(copy)


def test_without_a_genai_model_an_int4_bundle_keeps_its_own_table(checkpoint, tmp_path):
    out = export_bundle(str(checkpoint("base")), tmp_path / "b", "int4", genai=False)
    assert np.load(out / EMBED_FILE, mmap_mode="r").dtype == np.float16 and not (out / EMBED_SHARED).exists()


def test_an_int4_bundle_keeps_its_int4_weights_once_in_the_genai_model(bundle, checkpoint, tmp_path):
    """Every `MatMulNBits` input of the decoder's graphs lies in GenAI's data file, where the GenAI
    model reads the same bytes (its projections are row ranges of the fused tensors); the decoder's
    own data file holds none of them, and a bundle without GenAI keeps its own."""
    folder = bundle("base", "int4")
    genai = onnx.load(str(folder / GENAI_DIR / "model.onnx"), load_external_data=False).graph
    theirs = {_where(t)[1] for t in genai.initializer if t.data_location == TensorProto.EXTERNAL}
    for graph_file in ("model.onnx", "prefill-int8.onnx"):
        graph = onnx.load(str(folder / DECODER_DIR / graph_file), load_external_data=False).graph
        int4 = {name for node in graph.node if node.op_type == "MatMulNBits" for name in node.input[1:]}
        located = {t.name: _where(t) for t in graph.initializer if t.name in int4}
        assert located and {location for location, _ in located.values()} == {BORROWED_LOCATION}
        assert {offset for _, offset in located.values()} <= theirs  # each begins where a GenAI tensor does
    record = json.loads((folder / BORROWED_FILE).read_text())
    assert record["file"] == GENAI_DATA and record["bytes"] > (folder / DECODER_DIR / "model.onnx.data").stat().st_size
    alone = export_bundle(str(checkpoint("base")), tmp_path / "alone", "int4", genai=False)
    assert not (alone / BORROWED_FILE).exists()
    graph = onnx.load(str(alone / DECODER_FILE), load_external_data=False).graph
    assert {_where(t)[0] for t in graph.initializer if t.data_location == TensorProto.EXTERNAL} == {"model.onnx.data"}


def test_a_decoder_that_names_weights_outside_its_bundle_is_refused(bundle, tmp_path):
    copy = tmp_path / "copy"
    shutil.copytree(bundle("base", "int4"), copy)
    model = onnx.load(str(copy / DECODER_FILE), load_external_data=False)
    tensor = next(t for t in model.graph.initializer if _where(t)[0] == BORROWED_LOCATION)
    next(e for e in tensor.external_data if e.key == "location").value = "../../elsewhere.data"
    (copy / DECODER_FILE).write_bytes(model.SerializeToString())
    with pytest.raises(BundleError, match="outside its bundle"):
        OnnxDecoder(copy / DECODER_FILE)


def _where(tensor: onnx.TensorProto) -> tuple[str, int]:
    info = {e.key: e.value for e in tensor.external_data}
    return info.get("location", ""), int(info.get("offset", 0))


def test_the_genai_model_of_an_int4_bundle_keeps_its_embedding_table_in_fp16(bundle):
    """As the hybrid route's table: a Gather of fp16 rows cast back to float32 (fp32 bundles: fp32)."""
    for precision, dtype in (("int4", TensorProto.FLOAT16), ("fp32", TensorProto.FLOAT)):
        model = onnx.load(str(bundle("base", precision) / GENAI_DIR / "model.onnx"), load_external_data=False)
        weights = {t.name: t for t in model.graph.initializer}
        gathers = [n for n in model.graph.node if n.op_type == "Gather" and n.input[0] in weights]
        assert gathers and {weights[n.input[0]].data_type for n in gathers} == {dtype}
        if dtype == TensorProto.FLOAT16:
            casts = {n.input[0]: n for n in model.graph.node if n.op_type == "Cast"}
            assert all(casts[n.output[0]].attribute[0].i == TensorProto.FLOAT for n in gathers)


def test_the_next_export_removes_what_a_killed_one_left_but_not_a_live_ones_folder(tmp_path):
    out = tmp_path / "model-int4"
    killed = tmp_path / ".model-int4.partial-killed"
    killed.mkdir()
    (killed / LOCK_FILE).write_text("")  # its lock died with its process
    (killed / "decoder.onnx.data").write_bytes(b"\0" * 1024)
    old_unlocked = tmp_path / ".model-int4.partial-older"
    old_unlocked.mkdir()
    os.utime(old_unlocked, (time.time() - 2 * STALE_UNLOCKED_S,) * 2)
    fresh = tmp_path / ".model-int4.partial-fresh"
    fresh.mkdir()  # an instant old, its lock not taken yet
    live = tmp_path / ".model-int4.partial-live"
    live.mkdir()
    lock = _hold(live)
    gone = tmp_path / ".model-int4.old-4194303"  # a pid above the kernel's limit: no such process
    gone.mkdir()
    other = tmp_path / ".other.partial-killed"
    other.mkdir()
    try:
        remove_stale_work(out)
    finally:
        lock.close()
    assert not killed.exists() and not old_unlocked.exists() and not gone.exists()
    assert fresh.exists() and live.exists() and other.exists()
