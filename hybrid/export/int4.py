"""INT4 weights in onnxruntime's `MatMulNBits` layout, made one weight at a time: for the hybrid
decoder as it is written, and for an fp32 ONNX file already on disk (the GenAI model), rewritten
MatMul by MatMul.

An `Int4Setting` is a block size (32, 64 or 128 weights share a scale) and a quantizer:
- `rtn`: round to nearest, symmetric (zero point 8), onnxruntime's own kernel (what its
  `MatMulNBitsQuantizer` runs by default, and what GenAI's builder writes);
- `rtn-zp`: round to nearest with a uint8 zero point per block (asymmetric), the same kernel;
- `hqq`: Half-Quadratic Quantization (onnxruntime's `HQQWeightOnlyQuantizer`), which fits each
  block's float zero point to minimise the error of the dequantized weight. More faithful, but slow
  to quantize (minutes for a 2B model) and to run (see `_hqq`).
Every node asks for accuracy level 4 (int8 activations: the fastest CPU kernels).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper

from hybrid.errors import UserError
from hybrid.export.tensors import ExternalData

log = logging.getLogger(__name__)

ACCURACY_LEVEL = 4  # int8 activations: the fastest CPU kernels
BLOCK_SIZES = (32, 64, 128)
QUANTIZERS = ("rtn", "rtn-zp", "hqq")
ROW_BLOCK = 1024  # output rows quantized at a time
CONTRIB = "com.microsoft"


@dataclass(frozen=True)
class Int4Setting:
    """How one group of weights is quantized: `quantizer` over blocks of `block_size` weights."""

    block_size: int = 32
    quantizer: str = "rtn"

    def __post_init__(self) -> None:
        if self.block_size not in BLOCK_SIZES:
            raise UserError(f"INT4 block size must be one of {', '.join(map(str, BLOCK_SIZES))}, got {self.block_size}")
        if self.quantizer not in QUANTIZERS:
            raise UserError(f"INT4 quantizer must be one of {', '.join(QUANTIZERS)}, got {self.quantizer!r}")

    @property
    def name(self) -> str:
        return f"{self.quantizer}-b{self.block_size}"

    @property
    def zero_points(self) -> bool:
        """Whether a block has its own zero point (symmetric round-to-nearest has none)."""
        return self.quantizer != "rtn"

    @classmethod
    def parse(cls, name: str) -> "Int4Setting":
        """The setting named `QUANTIZER-bBLOCK`, as `name` writes it (for example `rtn-b32`)."""
        quantizer, _, block = name.rpartition("-b")
        if not quantizer or not block.isdigit():
            raise UserError(f"an INT4 setting reads QUANTIZER-bBLOCK (for example rtn-b32), got {name!r}")
        return cls(int(block), quantizer)


@dataclass(frozen=True)
class Int4Scheme:
    """The settings of the decoder's linear layers and of its LM head."""

    layers: Int4Setting = Int4Setting()
    head: Int4Setting = Int4Setting()

    @property
    def name(self) -> str:
        return self.layers.name if self.head == self.layers else f"{self.layers.name}+head-{self.head.name}"


@dataclass(frozen=True)
class Int4Weight:
    """A weight `(N, K)` in `MatMulNBits`' inputs: packed `(N, K/block, block/2)` uint8, scales
    `(N, K/block)` float32 and zero points (None: symmetric; packed uint8 or float32 per block)."""

    packed: np.ndarray
    scales: np.ndarray
    zero_points: np.ndarray | None
    setting: Int4Setting


def quantize_int4(weight: np.ndarray, setting: Int4Setting = Int4Setting()) -> Int4Weight:
    """INT4 of an `nn.Linear` weight `(N, K)` by `setting`."""
    if setting.quantizer == "hqq":
        return _hqq(weight, setting)
    return _rtn(weight, setting)


def _rtn(weight: np.ndarray, setting: Int4Setting) -> Int4Weight:
    """Round to nearest by onnxruntime's kernel, `ROW_BLOCK` output rows at a time."""
    from onnxruntime.capi._pybind_state import quantize_matmul_4bits

    n, k = weight.shape
    block, symmetric = setting.block_size, setting.quantizer == "rtn"
    blocks = -(-k // block)
    packed = np.zeros((n, blocks, block // 2), dtype=np.uint8)
    scales = np.zeros((n, blocks), dtype=np.float32)
    zero_points = np.zeros((n, -(-blocks // 2)), dtype=np.uint8)  # two 4-bit zero points a byte
    for first in range(0, n, ROW_BLOCK):
        rows = slice(first, min(first + ROW_BLOCK, n))
        width = rows.stop - rows.start
        columns = np.ascontiguousarray(weight[rows].T)  # (K, width): MatMul's B
        part_packed = np.zeros((width, blocks, block // 2), dtype=np.uint8)
        part_scales = np.zeros((width, blocks), dtype=np.float32)
        part_zeros = np.zeros((width, -(-blocks // 2)), dtype=np.uint8)
        quantize_matmul_4bits(part_packed, columns, part_scales, part_zeros, block, width, k, symmetric)
        packed[rows], scales[rows], zero_points[rows] = part_packed, part_scales, part_zeros
    return Int4Weight(packed, scales, None if symmetric else zero_points, setting)


def _hqq(weight: np.ndarray, setting: Int4Setting) -> Int4Weight:
    """HQQ by onnxruntime's implementation (in torch), `ROW_BLOCK` output rows at a time.

    HQQ's solver moves only each block's zero point, away from the integers: rounded back to 4
    bits it gives exactly `rtn-zp`'s bytes. So the zero points stay float, which `MatMulNBits`
    takes, but not on its int8 (accuracy level 4) path: measured here, a decode-shaped matmul ran
    about 70x slower. A setting for measuring fidelity, not for serving."""
    import torch
    from onnxruntime.quantization.matmul_nbits_quantizer import HQQWeightOnlyQuantizer

    n, k = weight.shape
    block = setting.block_size
    blocks = -(-k // block)
    packed = np.zeros((n, blocks, block // 2), dtype=np.uint8)
    scales = np.zeros((n, blocks), dtype=np.float32)
    zero_points = np.zeros((n, blocks), dtype=np.float32)
    quantizer = HQQWeightOnlyQuantizer(None)  # `quantize_internal` reads no config
    for first in range(0, n, ROW_BLOCK):
        rows = slice(first, min(first + ROW_BLOCK, n))
        part = torch.from_numpy(np.ascontiguousarray(weight[rows], dtype=np.float32))
        q, scale, zero = quantizer.quantize_internal(part, bits=4, group_size=block)
        q = q.numpy().astype(np.uint8).reshape(part.shape[0], blocks, block)
        packed[rows] = q[..., 0::2] | (q[..., 1::2] << 4)  # element 2i in the low nibble, as MatMulNBits reads
        scales[rows], zero_points[rows] = scale.numpy(), zero.numpy()
    return Int4Weight(packed, scales, zero_points, setting)


def matmul_nbits_attributes(setting: Int4Setting, k: int, n: int) -> dict:
    """The attributes of the `MatMulNBits` node of `x @ W.T` for a weight `W` `(N, K)`."""
    return {"K": k, "N": n, "bits": 4, "block_size": setting.block_size, "accuracy_level": ACCURACY_LEVEL}


def int4_names(name: str, setting: Int4Setting) -> list[str]:
    names = [name + "_Q4", name + "_scales"]
    return [*names, name + "_zero_points"] if setting.zero_points else names


def int4_arrays(name: str, weight: Int4Weight) -> list[tuple[str, np.ndarray]]:
    """The initializers (name, array) of `weight`, in `MatMulNBits`' input order."""
    arrays = [weight.packed, weight.scales] + ([] if weight.zero_points is None else [weight.zero_points])
    return list(zip(int4_names(name, weight.setting), arrays, strict=True))


def quantize_onnx_file(path: Path, setting: Int4Setting = Int4Setting()) -> int:
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
                weight = quantize_int4(array.T, setting)  # a MatMul weight (K, N) is an nn.Linear's (N, K)
                initializers += [data.add(n, a) for n, a in int4_arrays(tensor.name, weight)]
            else:
                initializers.append(data.add(tensor.name, array))
    nodes = []
    for node in graph.node:
        if node.op_type == "MatMul" and node.input[1:2] and node.input[1] in targets:
            k, n = weights[node.input[1]].dims
            inputs = [node.input[0], *int4_names(node.input[1], setting)]
            node = helper.make_node(
                "MatMulNBits", inputs, list(node.output), name=node.name + "_Q4", domain=CONTRIB,
                **matmul_nbits_attributes(setting, k, n),
            )  # fmt: skip
        nodes.append(node)
    graph.ClearField("initializer")
    graph.initializer.extend(initializers)
    graph.ClearField("node")
    graph.node.extend(nodes)
    staged.replace(path.with_name(location))
    path.write_bytes(model.SerializeToString())
    log.debug("quantized %d MatMuls of %s to INT4 (%s)", len(targets), path, setting.name)
    return len(targets)


def _read_external(tensor: TensorProto, folder: Path) -> np.ndarray:
    info = {entry.key: entry.value for entry in tensor.external_data}
    dtype = helper.tensor_dtype_to_np_dtype(tensor.data_type)
    count = int(np.prod(tensor.dims))
    array = np.fromfile(folder / info["location"], dtype=dtype, count=count, offset=int(info.get("offset", 0)))
    return array.reshape(tuple(tensor.dims))
