"""Int8 weights for onnxruntime's int8 GEMM (`DynamicQuantizeMatMul`, MLAS's QGEMM), shared by the
vision tower of INT4 bundles and the decoder's int8 prompt pass.

7-bit codes (`LEVELS`): without VNNI (AVX2, AVX-512F), MLAS's u8 x s8 kernel adds pairs of
products in 16 bits (vpmaddubsw), which saturates for 255 x 127 + 255 x 127; 255 x 63 twice fits.
The kernel's speed is the same, and on an INT4 bundle's weights the 7-bit grid is still 8 times
finer than INT4's.
"""

from __future__ import annotations

import numpy as np

LEVELS = 63


def int8_columns(weight: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """A weight `(N, K)` as `DynamicQuantizeMatMul`'s B `(K, N)` int8 and its per-column scales `(N,)`
    (symmetric: the largest magnitude of each output column maps to `LEVELS`)."""
    peak = np.abs(weight).max(axis=1)
    scale = np.where(peak > 0, peak / LEVELS, 1.0).astype(np.float32)
    codes = np.rint(weight / scale[:, None])
    return np.clip(codes, -LEVELS, LEVELS, out=codes).astype(np.int8).T, scale
