"""INT4 weights in onnxruntime's `MatMulNBits` layout, made one weight at a time as the hybrid
decoder is written (the GenAI model then runs the same ones: `hybrid.export.shared`).

An `Int4Setting` is a block size (32, 64 or 128 weights share a scale) and a quantizer:
- `rtn`: round to nearest, symmetric (zero point 8), onnxruntime's own kernel (what its
  `MatMulNBitsQuantizer` runs by default, and what GenAI's builder writes);
- `rtn-zp`: round to nearest with a uint8 zero point per block (asymmetric), the same kernel;
- `mse`: symmetric like `rtn` (the same bytes, the same kernel), but each block's scale is the one
  that minimises the block's squared error, searched over clipped ranges and refined by least
  squares, instead of the one that maps the largest weight to -8;
- `mse-zp`: the same search with a zero point per block, as `rtn-zp`'s bytes;
- `hqq`: Half-Quadratic Quantization (onnxruntime's `HQQWeightOnlyQuantizer`), which fits each
  block's float zero point to minimise the error of the dequantized weight. More faithful, but slow
  to quantize (minutes for a 2B model) and to run (see `_hqq`).
Every node asks for accuracy level 4 (int8 activations: the fastest CPU kernels).
"""

from __future__ import annotations

import logging
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np

from hybrid.errors import UserError
from hybrid.threads import physical_cores

log = logging.getLogger(__name__)

ACCURACY_LEVEL = 4  # int8 activations: the fastest CPU kernels
BLOCK_SIZES = (32, 64, 128)
QUANTIZERS = ("rtn", "rtn-zp", "mse", "mse-zp", "hqq")
SYMMETRIC = ("rtn", "mse")  # zero point 8, not stored
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
        """Whether a block has its own zero point (the symmetric quantizers have none)."""
        return self.quantizer not in SYMMETRIC

    @classmethod
    def parse(cls, name: str) -> Int4Setting:
        """The setting named `QUANTIZER-bBLOCK`, as `name` writes it (for example `rtn-b32`)."""
        quantizer, _, block = name.rpartition("-b")
        if not quantizer or not block.isdigit():
            raise UserError(f"an INT4 setting reads QUANTIZER-bBLOCK (for example rtn-b32), got {name!r}")
        return cls(int(block), quantizer)


# What GenAI's model builder writes for INT4 (block 32, round to nearest): a bundle exported with this
# setting for layers and head holds the builder's own INT4 weights.
GENAI_SETTING = Int4Setting(32, "rtn")


@dataclass(frozen=True)
class Int4Scheme:
    """The settings of the decoder's linear layers and of its LM head.

    The default, chosen by `python -m hybrid quality` (README, "INT4 settings"): blocks of 64 with
    searched scales and zero points for the layers, 32 for the head. On the 2B shapes and the demo
    model its KL divergence to fp32 is at most that of `rtn-b32` (GenAI's), and a decode step reads
    7% fewer bytes and dequantizes half as many scales."""

    layers: Int4Setting = Int4Setting(64, "mse-zp")
    head: Int4Setting = Int4Setting(32, "mse-zp")

    @property
    def name(self) -> str:
        return self.layers.name if self.head == self.layers else f"{self.layers.name}{HEAD_MARK}{self.head.name}"

    @classmethod
    def parse(cls, name: str) -> Int4Scheme:
        """The scheme `name` writes: `LAYERS` (the head alike) or `LAYERS+head-HEAD`."""
        layers, _, head = name.partition(HEAD_MARK)
        setting = Int4Setting.parse(layers)
        return cls(setting, Int4Setting.parse(head) if head else setting)


HEAD_MARK = "+head-"


@dataclass(frozen=True)
class Int4Weight:
    """A weight `(N, K)` in `MatMulNBits`' inputs: packed `(N, K/block, block/2)` uint8, scales
    `(N, K/block)` float32 and zero points (None: symmetric; packed uint8 or float32 per block)."""

    packed: np.ndarray
    scales: np.ndarray
    zero_points: np.ndarray | None
    setting: Int4Setting


def quantize_int4(weight: np.ndarray, setting: Int4Setting) -> Int4Weight:
    """INT4 of an `nn.Linear` weight `(N, K)` by `setting`."""
    if setting.quantizer == "hqq":
        return _hqq(weight, setting)
    if setting.quantizer.startswith("mse"):
        return _searched(weight, setting)
    return _rtn(weight, setting)


def _rtn(weight: np.ndarray, setting: Int4Setting) -> Int4Weight:
    """Round to nearest by onnxruntime's kernel, `ROW_BLOCK` output rows at a time."""
    from onnxruntime.capi._pybind_state import quantize_matmul_4bits

    n, k = weight.shape
    block, symmetric = setting.block_size, not setting.zero_points
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


# The clipping ratios `_searched` tries: a block's range is the full one times each. With the
# refits after the search, 7 ratios from 0.7 give the error that 16 from 0.55 give (to 0.1%, on
# Gaussian and heavy-tailed weights), at half the time.
CLIP_RATIOS = np.linspace(0.7, 1.0, 7, dtype=np.float32)
REFINE_ROUNDS = 2  # least-squares refits of the scale (and zero point) after the search
SEARCH_ROWS = 256  # output rows searched at a time by one thread


def _searched(weight: np.ndarray, setting: Int4Setting) -> Int4Weight:
    """Round to nearest with each block's scale (and zero point) chosen to minimise the block's
    squared error: tried for every ratio of `CLIP_RATIOS` of the block's range, then refit by least
    squares on the chosen codes while that lowers the error. The bytes are those of `rtn`/`rtn-zp`
    (a float32 scale, 4-bit codes and zero points), so the kernel and its speed are the same.
    `SEARCH_ROWS` output rows at a time, one group per physical core (numpy lets go of the GIL)."""
    n, k = weight.shape
    block, symmetric = setting.block_size, not setting.zero_points
    blocks = -(-k // block)
    packed = np.zeros((n, blocks, block // 2), dtype=np.uint8)
    scales = np.zeros((n, blocks), dtype=np.float32)
    zeros = np.zeros((n, blocks), dtype=np.uint8)

    def search(first: int) -> None:
        rows = slice(first, min(first + SEARCH_ROWS, n))
        part = np.zeros((rows.stop - rows.start, blocks * block), dtype=np.float32)
        part[:, :k] = weight[rows]  # a last partial block is padded with zeros, as onnxruntime does
        part = part.reshape(-1, blocks, block)
        scale, zero = _search_symmetric(part) if symmetric else _search_asymmetric(part)
        codes = _codes(part, scale, zero)
        packed[rows] = _nibbles(codes)
        scales[rows], zeros[rows] = scale, zero

    with ThreadPoolExecutor(physical_cores()) as pool:
        list(pool.map(search, range(0, n, SEARCH_ROWS)))
    if symmetric:
        return Int4Weight(packed, scales, None, setting)
    if blocks % 2:
        zeros = np.concatenate([zeros, np.zeros((n, 1), np.uint8)], axis=1)
    return Int4Weight(packed, scales, _nibbles(zeros), setting)


def _nibbles(values: np.ndarray) -> np.ndarray:
    """4-bit `values` (uint8, an even count on the last axis) two a byte, as `MatMulNBits` reads
    them: element 2i in the low nibble, 2i + 1 in the high one."""
    return values[..., 0::2] | (values[..., 1::2] << 4)


def _codes(blocks: np.ndarray, scale: np.ndarray, zero: np.ndarray) -> np.ndarray:
    """The 4-bit codes `(q - zero) * scale ~ w` of `blocks` `(R, B, block)`, as uint8."""
    q = np.rint(blocks / scale[..., None])
    q += zero[..., None]
    return np.clip(q, 0, 15, out=q).astype(np.uint8)


def _error(blocks: np.ndarray, scale: np.ndarray, zero: np.ndarray) -> np.ndarray:
    """Each block's squared error `(R, B)` with `scale` and `zero` (`_codes`' rounding, in float)."""
    scale, low = scale[..., None], -zero[..., None].astype(np.float32)
    restored = np.rint(blocks / scale)
    np.clip(restored, low, low + 15, out=restored)
    restored *= scale
    restored -= blocks
    return np.einsum("rbk,rbk->rb", restored, restored)


def _search_symmetric(blocks: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Scales for zero point 8: the block's largest weight (by magnitude) maps to -8 times a ratio."""
    largest = np.take_along_axis(blocks, np.abs(blocks).argmax(-1)[..., None], -1)[..., 0]
    zero = np.full(largest.shape, 8, dtype=np.uint8)

    def fit(ratio: np.float32) -> np.ndarray:
        scale = largest * (ratio / -8)
        return np.where(scale == 0, 1, scale).astype(np.float32)

    scale = _best([fit(r) for r in CLIP_RATIOS], blocks, zero)
    for _ in range(REFINE_ROUNDS):
        centred = _codes(blocks, scale, zero).astype(np.float32) - 8
        norm = np.einsum("rbk,rbk->rb", centred, centred)
        refit = np.einsum("rbk,rbk->rb", centred, blocks) / np.where(norm == 0, 1, norm)
        refit = np.where(refit == 0, scale, refit).astype(np.float32)
        scale = _best([scale, refit], blocks, zero)
    return scale, zero


def _search_asymmetric(blocks: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Scales and zero points: the block's range (widened to hold 0) shrunk by a ratio, mapped to 0..15."""
    low, high = np.minimum(blocks.min(-1), 0), np.maximum(blocks.max(-1), 0)
    candidates = []
    for ratio in CLIP_RATIOS:
        scale = (high - low) * (ratio / 15)
        scale = np.where(scale == 0, 1, scale).astype(np.float32)
        candidates.append((scale, np.clip(np.rint(-low * ratio / scale), 0, 15).astype(np.uint8)))
    scale, zero = _best_pair(candidates, blocks)
    for _ in range(REFINE_ROUNDS):
        codes = _codes(blocks, scale, zero).astype(np.float32)
        mean_code, mean_weight = codes.mean(-1), blocks.mean(-1)
        codes -= mean_code[..., None]
        spread = np.einsum("rbk,rbk->rb", codes, codes)
        slope = np.einsum("rbk,rbk->rb", codes, blocks) / np.where(spread == 0, 1, spread)
        slope = np.where(slope == 0, scale, slope).astype(np.float32)
        offset = np.clip(np.rint((slope * mean_code - mean_weight) / slope), 0, 15).astype(np.uint8)
        scale, zero = _best_pair([(scale, zero), (slope, offset)], blocks)
    return scale, zero


def _best(scales: list[np.ndarray], blocks: np.ndarray, zero: np.ndarray) -> np.ndarray:
    return _best_pair([(scale, zero) for scale in scales], blocks)[0]


def _best_pair(candidates: list[tuple[np.ndarray, np.ndarray]], blocks: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per block, the (scale, zero) of `candidates` with the least squared error (the first on ties)."""
    best_scale, best_zero = candidates[0]
    best_error = _error(blocks, best_scale, best_zero)
    for scale, zero in candidates[1:]:
        error = _error(blocks, scale, zero)
        better = error < best_error
        best_error = np.where(better, error, best_error)
        best_scale, best_zero = np.where(better, scale, best_scale), np.where(better, zero, best_zero)
    return best_scale, best_zero


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
        packed[rows] = _nibbles(q)
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
