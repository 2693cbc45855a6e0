"""An int8 prompt pass beside an INT4 decoder: the same graph with each INT4 layer as an int8 GEMM.

onnxruntime's `MatMulNBits` runs many rows at about a third of what the cores can do (int8
activations, but block-wise sums), while its int8 GEMM (`DynamicQuantizeMatMul`, MLAS's QGEMM)
runs near their peak: measured on a Zen 4 core pair with AVX-512 VNNI, 2048 x 6144 at 192 rows,
293 against 832 GOP/s (docs/benchmarks.md). A decode step of one row reads the weights once and is
bound by memory, where INT4's half of the bytes wins; a prompt pass of hundreds of rows is bound by
compute. So a bundle's INT4 decoder keeps its graph for decode steps, and the prompt pass runs a
second session of the same graph whose layers (every `MatMulNBits` but the head's, which the prompt
pass runs for one row) are int8 weights derived at export from the INT4 ones:

- the INT4 weight is expanded to its float values (scales and zero points per block) and each
  output column is quantized to 7 bits in int8 by its own largest value (per-column symmetric,
  `hybrid.export.int8`: the INT4 grid's step is about 8 times this one's at equal range, so the derived weight
  is the INT4 one to within a small fraction of INT4's own error; prompt pass and decode steps use
  the same weights, to that fraction);
- the activations go in per row: each row is divided by its own largest magnitude before the
  GEMM's per-tensor 8-bit quantization and the product multiplied back, so a row of small values
  keeps its 8 bits beside a row of large ones.

Decode steps, and the passes that verify drafted tokens (`hybrid.speculative`: their tokens must
equal the plain loop's), run the INT4 graph: the int8 pass only writes the prompt's keys and values
and gives the first token's logits. The int8 weights cost memory (one byte a weight: 1.3 GB for the
2B's layers) but no disk: the bundle holds the graph alone, its int8 weights named at
`DERIVED_LOCATION`, and `DerivedInt8` makes them when the route loads (a few seconds for the 2B)
in memory that is given back once onnxruntime has packed them into its own.
"""

from __future__ import annotations

import ctypes
import logging
import mmap
import time
from concurrent.futures import ThreadPoolExecutor
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from hybrid.errors import BundleError
from hybrid.export.int4 import CONTRIB
from hybrid.export.int8 import int8_columns
from hybrid.export.tensors import ExternalData, external_info, external_tensor, read_initializer
from hybrid.threads import physical_cores

log = logging.getLogger(__name__)

HEAD_PREFIX = "lm_head."
AXES, FLOOR = "int8_prefill_axes", "int8_prefill_floor"  # the graph's two new constants
ROW_BLOCK = 512  # output rows of a weight expanded to float at a time
# Where the prompt graph's int8 weights are said to lie: no file, `DerivedInt8` makes them at load
DERIVED_LOCATION = "derived-at-load:int8-of-the-decoder's-int4"
CODES, SCALES = "_int8", "_int8_scales"  # a derived weight's names: its INT4 weight's stem and these


@dataclass(frozen=True)
class NBitsWeight:
    """A `MatMulNBits` weight as stored: packed `(N, blocks, block / 2)`, scales `(N, blocks)`,
    packed zero points `(N, ceil(blocks / 2))` (None: symmetric, 8)."""

    packed: np.ndarray
    scales: np.ndarray
    zero_points: np.ndarray | None
    k: int
    block: int

    def dequantized(self, rows: slice = slice(None)) -> np.ndarray:
        """The float weight `(N, K)` (or its output rows `rows`) that `MatMulNBits` multiplies by:
        `(q - zero) * scale`."""
        packed = self.packed[rows]
        n, blocks, _ = packed.shape
        values = _unpacked(packed)  # (n, blocks, block)
        values -= 8.0 if self.zero_points is None else _unpacked(self.zero_points[rows])[:, :blocks, None]
        values *= self.scales[rows].reshape(n, blocks)[..., None]
        return values.reshape(n, blocks * self.block)[:, : self.k]

    def int8(self, codes: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
        """`int8_columns` of the float weight (into `codes` `(K, N)` where given), `ROW_BLOCK`
        output rows expanded at a time."""
        n = self.packed.shape[0]
        codes = np.empty((self.k, n), dtype=np.int8) if codes is None else codes
        scales = np.empty(n, dtype=np.float32)
        for first in range(0, n, ROW_BLOCK):
            rows = slice(first, min(first + ROW_BLOCK, n))
            codes[:, rows], scales[rows] = int8_columns(self.dequantized(rows))
        return codes, scales


def _unpacked(packed: np.ndarray) -> np.ndarray:
    """4-bit values two a byte (element 2i in the low nibble, as `int4._nibbles` packs them) as float32."""
    values = np.empty((*packed.shape[:-1], 2 * packed.shape[-1]), dtype=np.float32)
    values[..., 0::2] = packed & 0x0F
    values[..., 1::2] = packed >> 4
    return values


def write_int8_prefill(decoder_path: str | Path, out_path: str | Path, store: bool = False) -> int:
    """Write the int8 prompt-pass graph of the INT4 decoder at `decoder_path` to `out_path`, in the
    same folder (it reads the decoder's own weights where they are), its int8 weights named at
    `DERIVED_LOCATION`, or with `store` made now and written to `out_path`.data (one weight held
    at a time). Returns the bytes they take."""
    decoder_path, out_path = Path(decoder_path), Path(out_path)
    if decoder_path.parent != out_path.parent:
        raise ValueError("the int8 prompt pass reads the decoder's data file: write it in the decoder's folder")
    model = onnx.load(str(decoder_path), load_external_data=False)
    graph = model.graph
    stored = {t.name: t for t in graph.initializer}
    location = out_path.name + ".data"
    nodes, derived = [], []
    with open(out_path.parent / location, "wb") if store else nullcontext() as file:
        data = ExternalData(file, location) if store else None
        for node in graph.node:
            if node.op_type != "MatMulNBits" or node.input[1].startswith(HEAD_PREFIX):
                nodes.append(node)
                continue
            stem = node.input[1].removesuffix("_Q4")
            if store:
                codes, scales = _nbits_weight(node, stored, decoder_path.parent).int8()
                derived += [data.add(stem + CODES, codes), data.add(stem + SCALES, scales)]
            else:
                k, n = (helper.get_attribute_value(a) for a in node.attribute if a.name in ("K", "N"))
                derived += [
                    external_tensor(stem + CODES, TensorProto.INT8, [k, n], DERIVED_LOCATION, 0, k * n),
                    external_tensor(stem + SCALES, TensorProto.FLOAT, [n], DERIVED_LOCATION, 0, 4 * n),
                ]
            nodes += _int8_nodes(node, stem)
    if not derived:
        raise ValueError(f"{decoder_path} has no INT4 layers to run in int8")
    used = {name for node in nodes for name in node.input}
    constants = [
        numpy_helper.from_array(np.array([-1], dtype=np.int64), AXES),
        numpy_helper.from_array(np.array(1e-30, dtype=np.float32), FLOOR),
    ]
    graph.ClearField("node")
    graph.node.extend(nodes)
    kept = [t for t in stored.values() if t.name in used]
    graph.ClearField("initializer")
    graph.initializer.extend(kept + constants + derived)
    out_path.write_bytes(model.SerializeToString())
    size = sum(int(np.prod(t.dims)) * (1 if t.data_type == TensorProto.INT8 else 4) for t in derived)
    where = "in the bundle" if store else "made at load"
    log.info("int8 prompt pass: %d layers, %.0f MB %s", len(derived) // 2, size / 2**20, where)
    return size


def derived_initializers(prompt_path: Path) -> list[TensorProto]:
    """The initializers of the prompt graph at `prompt_path` that are made at load (`DERIVED_LOCATION`)."""
    graph = onnx.load(str(prompt_path), load_external_data=False).graph
    return [t for t in graph.initializer if external_info(t).get("location") == DERIVED_LOCATION]


def derived_bytes(prompt_path: Path) -> int:
    """The bytes of the int8 weights the prompt graph at `prompt_path` has made at load."""
    return sum(int(external_info(t)["length"]) for t in derived_initializers(prompt_path))


class DerivedInt8:
    """The int8 weights of the prompt graph at `prompt_path` (those named at `DERIVED_LOCATION`),
    made from the INT4 weights of the decoder at `decoder_path`, one weight a thread. The codes lie
    in anonymous maps that `release` gives back to the system once onnxruntime has packed them into
    its own buffers: the addresses stay valid (a read after it finds zeros, which the prompt pass's
    tests would see), so memory holds the weights once."""

    def __init__(self, prompt_path: Path, decoder_path: Path) -> None:
        start = time.perf_counter()
        wanted = [t.name for t in derived_initializers(prompt_path)]
        graph = onnx.load(str(decoder_path), load_external_data=False).graph
        self._nodes = {n.input[1].removesuffix("_Q4"): n for n in graph.node if n.op_type == "MatMulNBits"}
        self._stored = {t.name: t for t in graph.initializer}
        self._folder = decoder_path.parent
        stems = sorted({name.removesuffix(SCALES).removesuffix(CODES) for name in wanted})
        missing = [stem for stem in stems if stem not in self._nodes]
        if missing:
            raise BundleError(f"{prompt_path} asks for int8 weights of {missing[0]}, which {decoder_path} lacks")
        self._maps: list[mmap.mmap] = []
        with ThreadPoolExecutor(physical_cores()) as pool:
            made = {}
            for stem, (codes, scales) in zip(stems, pool.map(self._derive, stems)):
                made[stem + CODES], made[stem + SCALES] = codes, scales
        self.arrays = {name: made[name] for name in wanted}  # in the graph's order
        log.info(
            "int8 prompt pass: %d weights made from the INT4 ones in %.1f s", len(stems), time.perf_counter() - start
        )

    def _derive(self, stem: str) -> tuple[np.ndarray, np.ndarray]:
        weight = _nbits_weight(self._nodes[stem], self._stored, self._folder)
        codes = mmap.mmap(-1, weight.k * weight.packed.shape[0])
        self._maps.append(codes)
        return weight.int8(np.frombuffer(codes, dtype=np.int8).reshape(weight.k, weight.packed.shape[0]))

    def release(self) -> None:
        """Give the codes' pages back (onnxruntime holds its packed copy)."""
        for codes in self._maps:
            codes.madvise(mmap.MADV_DONTNEED)
        _trim_heap()


def _trim_heap() -> None:
    """Hand back the heap the derivation's float temporaries grew (glibc keeps freed blocks)."""
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except OSError:  # not glibc: nothing to trim this way
        pass


def _nbits_weight(node: onnx.NodeProto, stored: dict[str, TensorProto], folder: Path) -> NBitsWeight:
    attributes = {a.name: helper.get_attribute_value(a) for a in node.attribute}
    if attributes.get("bits", 4) != 4:
        raise ValueError(f"{node.name}: only 4-bit MatMulNBits can run in int8, not {attributes['bits']}-bit")
    arrays = [read_initializer(stored[name], folder) for name in node.input[1:]]
    zero_points = arrays[2] if len(arrays) > 2 else None
    return NBitsWeight(arrays[0], arrays[1], zero_points, attributes["K"], attributes["block_size"])


def _int8_nodes(node: onnx.NodeProto, stem: str) -> list[onnx.NodeProto]:
    """`node`'s product as an int8 GEMM of each row divided by its largest magnitude, multiplied back."""
    x, (y,) = node.input[0], node.output
    magnitude, peak, rows, scaled, product = (f"{y}_int8_{part}" for part in ("abs", "peak", "rows", "scaled", "mm"))
    return [
        helper.make_node("Abs", [x], [magnitude]),
        helper.make_node("ReduceMax", [magnitude, AXES], [peak], keepdims=1),
        helper.make_node("Max", [peak, FLOOR], [rows]),
        helper.make_node("Div", [x, rows], [scaled]),
        helper.make_node(
            "DynamicQuantizeMatMul",
            [scaled, stem + "_int8", stem + "_int8_scales"],
            [product],
            name=node.name + "_int8",
            domain=CONTRIB,
        ),
        helper.make_node("Mul", [product, rows], [y]),
    ]
