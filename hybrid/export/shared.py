"""One copy of an INT4 bundle's text weights: the GenAI model is given the hybrid decoder's.

An INT4 bundle holds two text models of one checkpoint: the hybrid decoder (`hybrid.export.decoder`:
q, k and v fused into one matmul, gate and up into another) and GenAI's (its builder's graph, one
MatMul a projection). Both run `MatMulNBits`, and `MatMulNBits` quantizes each output row on its
own, so a fused weight's rows are its parts' rows. So GenAI's model is not quantized again: each of
the decoder's INT4 tensors is written once into GenAI's data file, GenAI's projections are row
ranges of them, and the decoder's graphs then point at those bytes (`BORROWED_LOCATION`). For the
2B that is 1.07 GB fewer on disk, and text prompts and image prompts are answered by the same
weights. onnxruntime refuses external data outside a graph's folder, so the hybrid route maps the
borrowed tensors itself (`hybrid.decoder.borrowed_initializers`).
"""

from __future__ import annotations

import json
import logging
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper

from hybrid.errors import BundleError
from hybrid.export.int4 import CONTRIB
from hybrid.export.prefill import ROW_BLOCK, NBitsWeight
from hybrid.export.tensors import ExternalData, external_info, external_tensor, map_initializer, read_initializer
from hybrid.layout import BORROWED_FILE, BORROWED_LOCATION, GENAI_DATA

log = logging.getLogger(__name__)

# The decoder's fused weights and the GenAI builder's MatMul weights they are made of, in row order
# (hybrid.export.decoder writes q|k|v and gate|up)
_PARTS = {
    "qkv": ("attn.q_proj", "attn.k_proj", "attn.v_proj"),
    "o_proj": ("attn.o_proj",),
    "gate_up": ("mlp.gate_proj", "mlp.up_proj"),
    "down_proj": ("mlp.down_proj",),
}
_LAYER = re.compile(r"layers\.(\d+)\.(\w+)\.weight")
# A part's INT4 rows against its fp32 weight: INT4's own error is about 0.1 of the weight's norm; a
# part mapped to the wrong rows is off by about 1.4
MAX_RELATIVE_ERROR = 0.3


@dataclass(frozen=True)
class Part:
    """GenAI's MatMul weight `name` is rows `rows` of the decoder's INT4 weight `stem`."""

    name: str
    stem: str
    rows: slice


def genai_weight_names(stem: str) -> tuple[str, ...]:
    """The GenAI builder's MatMul weights that the decoder's weight `stem` fuses, in row order."""
    if stem == "lm_head.weight":
        return ("lm_head.MatMul.weight",)
    match = _LAYER.fullmatch(stem)
    if match is None or match.group(2) not in _PARTS:
        raise BundleError(f"the decoder's INT4 weight {stem} has no counterpart in the GenAI model")
    layer, kind = match.groups()
    return tuple(f"model.layers.{layer}.{part}.MatMul.weight" for part in _PARTS[kind])


def lend_int4_weights(genai_model: Path, decoder_model: Path, half_tables: bool) -> dict[str, int]:
    """Rewrite GenAI's fp32 model `genai_model` (weights in its `.data`) so that every MatMul runs
    as `MatMulNBits` on the rows of the INT4 decoder `decoder_model`'s weights, each written once
    (the fused tensor whole); with `half_tables` its embedding table is stored in fp16 and cast
    back. Returns where each of the decoder's INT4 initializers now lies in GenAI's data file."""
    decoder = onnx.load(str(decoder_model), load_external_data=False).graph
    genai = onnx.load(str(genai_model), load_external_data=False)
    graph = genai.graph
    weights = {t.name: t for t in graph.initializer}
    nodes = {node.input[1].removesuffix("_Q4"): node for node in decoder.node if node.op_type == "MatMulNBits"}
    parts = _parts(nodes, weights)
    matmuls = {n.input[1] for n in graph.node if n.op_type == "MatMul" and n.input[1] in weights}
    if matmuls != set(parts):
        missing = sorted(matmuls - set(parts))[:3] or sorted(set(parts) - matmuls)[:3]
        raise BundleError(f"the GenAI model's MatMuls and the decoder's INT4 weights do not match (e.g. {missing})")
    tables = _tables(graph, weights) if half_tables else set()
    stored = {t.name: t for t in decoder.initializer}
    location = genai_model.name + ".data"
    staged = genai_model.with_name(location + ".int4")
    lent: dict[str, int] = {}
    initializers = []
    with open(staged, "wb") as file:
        data = ExternalData(file, location)
        for tensor in graph.initializer:
            if tensor.name in parts:
                part = parts[tensor.name]
                node = nodes[part.stem]
                if node.input[1] not in lent:
                    for name in node.input[1:]:
                        lent[name] = _offset(data.add(name, read_initializer(stored[name], decoder_model.parent)))
                _check(part, node, stored, decoder_model.parent, map_initializer(tensor, genai_model.parent))
                initializers += _row_views(part, node, stored, lent, location)
            elif tensor.data_location != TensorProto.EXTERNAL:
                initializers.append(tensor)
            else:  # copied (a table in fp16), a block of rows at a time: the 2B's table is 1.2 GB in fp32
                array = map_initializer(tensor, genai_model.parent)
                dtype = np.float16 if tensor.name in tables else array.dtype
                initializers.append(data.add_blocks(tensor.name, dtype, array.shape, _row_blocks(array)))
    graph.ClearField("initializer")
    graph.initializer.extend(initializers)
    rewritten = [_node(node, parts, nodes, tables) for node in graph.node]
    graph.ClearField("node")
    graph.node.extend(n for group in rewritten for n in group)
    staged.replace(genai_model.with_name(location))
    genai_model.write_bytes(genai.SerializeToString())
    log.debug("GenAI model: %d MatMuls on the decoder's INT4 weights", len(parts))
    return lent


def _row_blocks(array: np.ndarray):
    if array.ndim == 0:
        yield np.asarray(array)
        return
    for first in range(0, len(array), ROW_BLOCK):
        yield np.asarray(array[first : first + ROW_BLOCK])


def _parts(nodes: dict[str, onnx.NodeProto], weights: dict[str, TensorProto]) -> dict[str, Part]:
    """GenAI's MatMul weight name -> the decoder rows it is, from the parts' widths (their `N`)."""
    parts = {}
    for stem, node in nodes.items():
        first = 0
        for name in genai_weight_names(stem):
            if name not in weights or len(weights[name].dims) != 2:
                raise BundleError(f"the GenAI model has no 2-D weight {name} for the decoder's {stem}")
            k, n = weights[name].dims
            if k != _attribute(node, "K"):
                raise BundleError(f"{name} takes {k} inputs, the decoder's {stem} {_attribute(node, 'K')}")
            parts[name] = Part(name, stem, slice(first, first + n))
            first += n
        if first != _attribute(node, "N"):
            raise BundleError(
                f"the GenAI weights of {stem} have {first} outputs, the decoder's {_attribute(node, 'N')}"
            )
    return parts


def _tables(graph: onnx.GraphProto, weights: dict[str, TensorProto]) -> set[str]:
    """The float tables a `Gather` reads rows of (the embedding table)."""
    return {
        node.input[0]
        for node in graph.node
        if node.op_type == "Gather"
        and node.input[0] in weights
        and weights[node.input[0]].data_type == TensorProto.FLOAT
    }


def _offset(tensor: TensorProto) -> int:
    return int(external_info(tensor)["offset"])


def _row_views(
    part: Part, node: onnx.NodeProto, stored: dict[str, TensorProto], lent: dict[str, int], location: str
) -> list[TensorProto]:
    """GenAI's initializers of `part`: each of the fused node's INT4 inputs cut to the part's rows
    (row-major, so a row range is a byte range of the tensor written once)."""
    views = []
    for name in node.input[1:]:
        tensor = stored[name]
        dims = list(tensor.dims)
        row_bytes = int(np.prod(dims[1:])) * np.dtype(helper.tensor_dtype_to_np_dtype(tensor.data_type)).itemsize
        rows = part.rows.stop - part.rows.start
        suffix = name[len(node.input[1].removesuffix("_Q4")) :]  # _Q4, _scales, _zero_points
        views.append(
            external_tensor(
                part.name + suffix,
                tensor.data_type,
                [rows, *dims[1:]],
                location,
                lent[name] + part.rows.start * row_bytes,
                rows * row_bytes,
            )
        )
    return views


def _check(part: Part, node: onnx.NodeProto, stored: dict[str, TensorProto], folder: Path, weight: np.ndarray) -> None:
    """The part's INT4 rows are its fp32 weight `(K, N)` to within INT4's error (not another's
    rows), compared `ROW_BLOCK` rows at a time (the 2B's head is 1.2 GB in fp32)."""
    arrays = [map_initializer(stored[name], folder)[part.rows] for name in node.input[1:]]
    nbits = NBitsWeight(
        arrays[0], arrays[1], arrays[2] if len(arrays) > 2 else None, weight.shape[0], _attribute(node, "block_size")
    )
    squared_error = squared_norm = 0.0
    for first in range(0, weight.shape[1], ROW_BLOCK):
        rows = slice(first, min(first + ROW_BLOCK, weight.shape[1]))
        exact = np.asarray(weight[:, rows]).T
        squared_error += float(np.square(nbits.dequantized(rows) - exact).sum())
        squared_norm += float(np.square(exact).sum())
    error = (squared_error / max(squared_norm, 1e-30)) ** 0.5
    if error > MAX_RELATIVE_ERROR:
        raise BundleError(f"the decoder's rows for {part.name} are not its weight (relative error {error:.2f})")


def _node(
    node: onnx.NodeProto, parts: dict[str, Part], nodes: dict[str, onnx.NodeProto], tables: set[str]
) -> list[onnx.NodeProto]:
    """A GenAI MatMul on a lent weight as `MatMulNBits` with the decoder's settings, a `Gather` of
    an fp16 table followed by its cast back to float32, any other node as is."""
    if node.op_type == "Gather" and node.input[0] in tables:
        half = onnx.NodeProto()
        half.CopyFrom(node)
        half.output[0] = node.output[0] + "_fp16"
        cast = helper.make_node(
            "Cast", [half.output[0]], [node.output[0]], name=node.name + "_float", to=TensorProto.FLOAT
        )
        return [half, cast]
    if node.op_type != "MatMul" or node.input[1] not in parts:
        return [node]
    part = parts[node.input[1]]
    source = nodes[part.stem]
    suffixes = [name[len(source.input[1].removesuffix("_Q4")) :] for name in source.input[1:]]
    attributes = {a.name: helper.get_attribute_value(a) for a in source.attribute}
    attributes["N"] = part.rows.stop - part.rows.start
    inputs = [node.input[0], *(part.name + suffix for suffix in suffixes)]
    return [
        helper.make_node("MatMulNBits", inputs, list(node.output), name=node.name + "_Q4", domain=CONTRIB, **attributes)
    ]


def _attribute(node: onnx.NodeProto, name: str) -> int:
    return next(helper.get_attribute_value(a) for a in node.attribute if a.name == name)


def borrow_from_genai(bundle: Path, decoder_dir: str, lent: dict[str, int]) -> int:
    """Point every graph in `bundle/decoder_dir` at GenAI's copy of the tensors in `lent` and drop
    them from the decoder's own data file, which is rewritten with what is left. Writes
    `BORROWED_FILE` (what the hybrid route then also reads). Returns the bytes dropped."""
    folder = bundle / decoder_dir
    graphs = {path: onnx.load(str(path), load_external_data=False) for path in sorted(folder.glob("*.onnx"))}
    own = "model.onnx.data"
    kept: dict[tuple[int, int], int] = {}  # (old offset, length) -> new offset in the rewritten file
    dropped: set[tuple[int, int]] = set()
    staged = folder / (own + ".kept")
    with open(folder / own, "rb") as source, open(staged, "wb") as file:
        data = ExternalData(file, own)
        for model in graphs.values():
            for tensor in model.graph.initializer:
                info = external_info(tensor)
                if info.get("location") != own:
                    continue
                offset, length = int(info.get("offset", 0)), int(info["length"])
                if tensor.name in lent:
                    dropped.add((offset, length))
                    _point(tensor, BORROWED_LOCATION, lent[tensor.name])
                    continue
                if (offset, length) not in kept:
                    source.seek(offset)
                    kept[(offset, length)] = _offset(
                        data.add_bytes(tensor.name, tensor.data_type, list(tensor.dims), source.read(length))
                    )
                _point(tensor, own, kept[(offset, length)])
    staged.replace(folder / own)
    for path, model in graphs.items():
        path.write_bytes(model.SerializeToString())
    size = sum(length for _, length in dropped)
    record = {"file": GENAI_DATA, "tensors": len(lent), "bytes": size}
    (bundle / BORROWED_FILE).write_text(json.dumps(record) + "\n")
    log.info("the decoder reads %d INT4 tensors (%.0f MB) from %s", len(lent), size / 2**20, GENAI_DATA)
    return size


def _point(tensor: TensorProto, location: str, offset: int) -> None:
    for entry in tensor.external_data:
        if entry.key == "location":
            entry.value = location
        elif entry.key == "offset":
            entry.value = str(offset)
