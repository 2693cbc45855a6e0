"""What the node-by-node ONNX writers (the text decoder, the vision tower) share: appending nodes
and initializers with predictable names, and writing a graph beside its external-data file."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from hybrid.export.int4 import CONTRIB
from hybrid.export.tensors import ExternalData

OPSET = 18
IR_VERSION = 10


def write_graph(out_path: Path, build: Callable[[ExternalData], onnx.GraphProto]) -> None:
    """Write `out_path` (the graph `build` returns) and `out_path.data` (the weights `build` adds to
    the `ExternalData` it is given), replacing any earlier files of that name."""
    out_path.parent.mkdir(parents=True, exist_ok=True)
    for stale in out_path.parent.glob(out_path.name + "*"):
        stale.unlink()
    data_path = out_path.with_name(out_path.name + ".data")
    with open(data_path, "wb") as data_file:
        graph = build(ExternalData(data_file, data_path.name))
    model = helper.make_model(
        graph, opset_imports=[helper.make_opsetid("", OPSET), helper.make_opsetid(CONTRIB, 1)], ir_version=IR_VERSION
    )
    out_path.write_bytes(model.SerializeToString())
    for written in (out_path, data_path):
        written.chmod(0o644)


class GraphWriter:
    """Nodes and initializers of a graph being written; large weights go to `data`."""

    def __init__(self, data: ExternalData) -> None:
        self.data = data
        self.nodes: list[onnx.NodeProto] = []
        self.initializers: list[TensorProto] = []
        self.counts: dict[str, int] = {}

    def op(
        self, op_type: str, *inputs: str, outputs: int = 1, domain: str = "", output: str | list | None = None, **attrs
    ):
        """Append one node; returns its output name (or names, when `outputs > 1`). `output` names the
        outputs that are graph outputs (a list with `None` for the others)."""
        index = self.counts[op_type] = self.counts.get(op_type, -1) + 1
        name = f"/{op_type}_{index}"
        chosen = output if isinstance(output, list) else [output] * outputs
        names = [f"{name}_output_{j}" if given is None else given for j, given in enumerate(chosen)]
        self.nodes.append(helper.make_node(op_type, list(inputs), names, name=name, domain=domain, **attrs))
        return names[0] if outputs == 1 else names

    def const(self, value) -> str:
        """A small constant (int64 unless `value` is an array), kept inside the graph file."""
        array = value if isinstance(value, np.ndarray) else np.array(value, dtype=np.int64)
        name = f"/const_{len(self.initializers)}"
        self.initializers.append(numpy_helper.from_array(array, name))
        return name

    def initializer(self, name: str, array: np.ndarray) -> str:
        """A weight written to the external-data file."""
        self.initializers.append(self.data.add(name, array))
        return name
