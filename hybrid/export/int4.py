"""INT4 weights in onnxruntime's `MatMulNBits` layout (block 32, symmetric, accuracy level 4), made one
weight at a time: for the hybrid decoder as it is written, and for an fp32 ONNX file already on
disk (the GenAI model), rewritten MatMul by MatMul.
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper

from hybrid.export.tensors import ExternalData

log = logging.getLogger(__name__)

BLOCK_SIZE = 32
ACCURACY_LEVEL = 4  # int8 activations: the fastest CPU kernels
ROW_BLOCK = 1024  # output rows quantized at a time
CONTRIB = "com.microsoft"


def quantize_int4(weight: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Symmetric INT4 of an `nn.Linear` weight `(N, K)` in `MatMulNBits`' layout, by onnxruntime's own
    kernel (what its `MatMulNBitsQuantizer` runs): packed `(N, K/32, 16)` uint8 and scales `(N, K/32)`."""
    from onnxruntime.capi._pybind_state import quantize_matmul_4bits

    n, k = weight.shape
    blocks = -(-k // BLOCK_SIZE)
    packed = np.zeros((n, blocks, BLOCK_SIZE // 2), dtype=np.uint8)
    scales = np.zeros((n, blocks), dtype=np.float32)
    for first in range(0, n, ROW_BLOCK):
        rows = slice(first, min(first + ROW_BLOCK, n))
        width = rows.stop - rows.start
        columns = np.ascontiguousarray(weight[rows].T)  # (K, width): MatMul's B
        zero_points = np.zeros((width, -(-blocks // 2)), dtype=np.uint8)  # unused when symmetric
        part_packed = np.zeros((width, blocks, BLOCK_SIZE // 2), dtype=np.uint8)
        part_scales = np.zeros((width, blocks), dtype=np.float32)
        quantize_matmul_4bits(part_packed, columns, part_scales, zero_points, BLOCK_SIZE, width, k, True)
        packed[rows], scales[rows] = part_packed, part_scales
    return packed, scales


def quantize_onnx_file(path: Path, accuracy_level: int = ACCURACY_LEVEL) -> int:
    """Rewrite the ONNX model `path` (weights in `path.data`) so that every MatMul with a 2-D float
    weight runs as INT4 `MatMulNBits`, as onnxruntime's `MatMulNBitsQuantizer` would; the other weights
    are copied. Holds one weight at a time. Returns how many MatMuls were quantized."""
    model = onnx.load(str(path), load_external_data=False)
    graph = model.graph
    weights = {t.name: t for t in graph.initializer}
    targets = {
        node.input[1] for node in graph.node
        if node.op_type == "MatMul" and node.input[1] in weights
        and len(weights[node.input[1]].dims) == 2 and weights[node.input[1]].data_type == TensorProto.FLOAT
    }  # fmt: skip
    location = path.name + ".data"
    staged = path.with_name(location + ".int4")
    with open(staged, "wb") as file:
        data = ExternalData(file, location)
        initializers = []
        for tensor in graph.initializer:
            if tensor.data_location != TensorProto.EXTERNAL:
                initializers.append(tensor)
                continue
            array = _read_external(tensor, path.parent)
            if tensor.name in targets:
                packed, scales = quantize_int4(array.T)  # a MatMul weight (K, N) is an nn.Linear's (N, K)
                initializers += [data.add(tensor.name + "_Q4", packed), data.add(tensor.name + "_scales", scales)]
            else:
                initializers.append(data.add(tensor.name, array))
    nodes = [_matmul_nbits(node, weights, accuracy_level) if node.input[1:2] and node.input[1] in targets
             and node.op_type == "MatMul" else node for node in graph.node]  # fmt: skip
    graph.ClearField("initializer")
    graph.initializer.extend(initializers)
    graph.ClearField("node")
    graph.node.extend(nodes)
    staged.replace(path.with_name(location))
    path.write_bytes(model.SerializeToString())
    log.debug("quantized %d MatMuls of %s to INT4", len(targets), path)
    return len(targets)


def _read_external(tensor: TensorProto, folder: Path) -> np.ndarray:
    info = {entry.key: entry.value for entry in tensor.external_data}
    dtype = helper.tensor_dtype_to_np_dtype(tensor.data_type)
    count = int(np.prod(tensor.dims))
    array = np.fromfile(folder / info["location"], dtype=dtype, count=count, offset=int(info.get("offset", 0)))
    return array.reshape(tuple(tensor.dims))


def _matmul_nbits(node: onnx.NodeProto, weights: dict[str, TensorProto], accuracy_level: int) -> onnx.NodeProto:
    k, n = weights[node.input[1]].dims
    return helper.make_node(
        "MatMulNBits", [node.input[0], node.input[1] + "_Q4", node.input[1] + "_scales"], list(node.output),
        name=node.name + "_Q4", domain=CONTRIB, K=k, N=n, bits=4, block_size=BLOCK_SIZE, accuracy_level=accuracy_level,
    )  # fmt: skip
