"""Thread settings of the ONNX runtimes: `threads = 0` (`RuntimeConfig.threads`) means one intra-op
thread per physical core, for our onnxruntime sessions and GenAI's model alike."""

from __future__ import annotations

import os

import onnxruntime as ort


def physical_cores() -> int:
    try:
        import psutil

        return psutil.cpu_count(logical=False) or os.cpu_count() or 1
    except ImportError:
        return os.cpu_count() or 1


def intra_op_threads(threads: int) -> int:
    """The threads a runtime should use for `RuntimeConfig.threads` (0: one per physical core)."""
    return threads or physical_cores()


def session_options(threads: int) -> ort.SessionOptions:
    options = ort.SessionOptions()
    options.intra_op_num_threads = intra_op_threads(threads)
    options.inter_op_num_threads = 1
    options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    return options
