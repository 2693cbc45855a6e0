"""INT4 weights for the hybrid decoder: onnxruntime's MatMulNBits for every MatMul with a constant
weight (attention and MLP projections, and the LM head)."""

from __future__ import annotations

import logging
from pathlib import Path

from hybrid.export.decoder import save_with_external_data

log = logging.getLogger(__name__)

BLOCK_SIZE = 32
ACCURACY_LEVEL = 4  # int8 activations: the fastest CPU kernels


def quantize_int4(path: Path, block_size: int = BLOCK_SIZE, accuracy_level: int = ACCURACY_LEVEL) -> None:
    import onnx
    from onnxruntime.quantization.matmul_nbits_quantizer import MatMulNBitsQuantizer

    model = onnx.load(str(path))
    quantizer = MatMulNBitsQuantizer(
        model, block_size=block_size, is_symmetric=True, accuracy_level=accuracy_level
    )
    quantizer.process()
    save_with_external_data(quantizer.model.model, path)
