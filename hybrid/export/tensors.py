"""Checkpoint tensors read one at a time, and files written one tensor at a time.

`CheckpointTensors` reads a safetensors checkpoint (one file or an indexed set of shards) with plain
file reads, never a memory map, so a tensor's bytes stay in memory only while the caller holds the
array; bfloat16 and float16 are widened to float32 exactly. `write_safetensors` and `write_npy`
write float32 files from such reads without ever holding more than one tensor (or row block).
"""

from __future__ import annotations

import json
import struct
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from onnx import TensorProto, helper, numpy_helper

from hybrid.errors import BundleError

INDEX_NAME = "model.safetensors.index.json"
SINGLE_NAME = "model.safetensors"
ALIGN = 4096  # external ONNX tensors start on a page: onnxruntime can map them as they are
_NUMPY_DTYPES = {"F32": np.float32, "F16": np.float16, "BF16": np.uint16}  # BF16 widened by hand below


@dataclass(frozen=True)
class TensorEntry:
    """Where one tensor lies: its file, dtype name, shape and byte range in that file."""

    path: Path
    dtype: str
    shape: tuple[int, ...]
    start: int  # absolute offset of the first byte
    end: int

    @property
    def row_bytes(self) -> int:
        return (self.end - self.start) // max(self.shape[0], 1)


class CheckpointTensors:
    """The tensors of a checkpoint folder by name, read as float32 `np.ndarray`s on demand."""

    def __init__(self, folder: Path) -> None:
        folder = Path(folder)
        if (folder / INDEX_NAME).is_file():
            weight_map = json.loads((folder / INDEX_NAME).read_text())["weight_map"]
            files = sorted({folder / name for name in weight_map.values()})
        elif (folder / SINGLE_NAME).is_file():
            files = [folder / SINGLE_NAME]
        else:
            raise BundleError(f"{folder} has no {SINGLE_NAME} or {INDEX_NAME}: only safetensors checkpoints export")
        self.entries: dict[str, TensorEntry] = {}
        for path in files:
            self.entries.update(_read_header(path))

    def __contains__(self, name: str) -> bool:
        return name in self.entries

    def shape(self, name: str) -> tuple[int, ...]:
        return self._entry(name).shape

    def numel(self) -> int:
        return sum(int(np.prod(e.shape)) for e in self.entries.values())

    def read(self, name: str, rows: slice | None = None) -> np.ndarray:
        """The tensor (or the row block `rows` of it) as a fresh float32 array."""
        entry = self._entry(name)
        start, end, shape = entry.start, entry.end, entry.shape
        if rows is not None:
            first, stop, _ = rows.indices(shape[0])
            start, end = entry.start + first * entry.row_bytes, entry.start + stop * entry.row_bytes
            shape = (stop - first, *shape[1:])
        raw = np.empty(end - start, dtype=np.uint8)
        with open(entry.path, "rb") as f:
            f.seek(start)
            if f.readinto(memoryview(raw)) != raw.size:
                raise BundleError(f"{entry.path} is truncated: cannot read {name}")
        return _to_float32(raw, entry.dtype).reshape(shape)

    def _entry(self, name: str) -> TensorEntry:
        try:
            return self.entries[name]
        except KeyError:
            raise BundleError(f"the checkpoint has no tensor {name!r}: not a Qwen3-VL checkpoint?") from None


def _read_header(path: Path) -> dict[str, TensorEntry]:
    with open(path, "rb") as f:
        (size,) = struct.unpack("<Q", f.read(8))
        header = json.loads(f.read(size))
    header.pop("__metadata__", None)
    entries = {}
    for name, info in header.items():
        if info["dtype"] not in _NUMPY_DTYPES:
            raise BundleError(f"{path}: tensor {name} is {info['dtype']}; export reads F32, F16 and BF16 only")
        begin, end = info["data_offsets"]
        entries[name] = TensorEntry(path, info["dtype"], tuple(info["shape"]), 8 + size + begin, 8 + size + end)
    return entries


def _to_float32(raw: np.ndarray, dtype: str) -> np.ndarray:
    if dtype == "BF16":  # bfloat16 is the top half of a float32: widening is exact
        wide = raw.view(np.uint16).astype(np.uint32)
        wide <<= 16  # in place: one float32 copy at a time
        return wide.view(np.float32)
    return raw.view(_NUMPY_DTYPES[dtype]).astype(np.float32, copy=dtype != "F32")


def write_safetensors(
    path: Path, tensors: Iterable[tuple[str, tuple[int, ...]]], read: Callable[[str], np.ndarray]
) -> None:
    """A float32 safetensors file of `tensors` (name, shape), each fetched by `read(name)` as it is written."""
    tensors = list(tensors)
    header, offset = {}, 0
    for name, shape in tensors:
        size = 4 * int(np.prod(shape))
        header[name] = {"dtype": "F32", "shape": list(shape), "data_offsets": [offset, offset + size]}
        offset += size
    blob = json.dumps(header, separators=(",", ":")).encode()
    blob += b" " * (-len(blob) % 8)  # the data starts 8-byte aligned
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(blob)) + blob)
        for name, shape in tensors:
            array = np.ascontiguousarray(read(name), dtype=np.float32)
            if array.shape != tuple(shape):
                raise BundleError(f"{name} has shape {array.shape}, its header says {tuple(shape)}")
            f.write(array.data)


def write_npy(
    path: Path, shape: tuple[int, int], read_rows: Callable[[slice], np.ndarray], block: int = 4096, dtype=np.float32
) -> None:
    """A `.npy` of `shape` and `dtype` written `block` rows at a time from `read_rows(slice)`."""
    descr = np.lib.format.dtype_to_descr(np.dtype(dtype))
    with open(path, "wb") as f:
        np.lib.format.write_array_header_1_0(f, {"descr": descr, "fortran_order": False, "shape": tuple(shape)})
        for first in range(0, shape[0], block):
            f.write(np.ascontiguousarray(read_rows(slice(first, first + block)), dtype=dtype).data)


class ExternalData:
    """One weights file beside the graph: each tensor is appended page-aligned and referenced by offset."""

    def __init__(self, file, location: str) -> None:
        self.file = file
        self.location = location

    def add(self, name: str, array: np.ndarray) -> TensorProto:
        return self.add_blocks(name, array.dtype, array.shape, iter([array]))

    def add_blocks(self, name: str, dtype, shape: tuple[int, ...], blocks: Iterator[np.ndarray]) -> TensorProto:
        """A tensor of `shape` whose row-major bytes are the concatenation of `blocks`."""
        self.file.write(b"\0" * (-self.file.tell() % ALIGN))
        offset = self.file.tell()
        for block in blocks:
            self.file.write(np.ascontiguousarray(block, dtype=dtype).data)
        length = self.file.tell() - offset
        expected = int(np.prod(shape)) * np.dtype(dtype).itemsize
        if length != expected:
            raise BundleError(f"wrote {length} bytes for {name}, its shape {shape} needs {expected}")
        data_type = helper.np_dtype_to_tensor_dtype(np.dtype(dtype))
        return external_tensor(name, data_type, list(shape), self.location, offset, length)

    def add_bytes(self, name: str, data_type: int, dims: list[int], raw: bytes) -> TensorProto:
        """A tensor of ONNX type `data_type` whose bytes are `raw`, as they were in another file."""
        self.file.write(b"\0" * (-self.file.tell() % ALIGN))
        offset = self.file.tell()
        self.file.write(raw)
        return external_tensor(name, data_type, dims, self.location, offset, len(raw))


def external_tensor(name: str, data_type: int, dims: list[int], location: str, offset: int, length: int) -> TensorProto:
    """An initializer whose `length` bytes lie at `offset` in the file `location` (beside the graph)."""
    tensor = TensorProto(name=name, data_type=data_type, dims=dims)
    tensor.data_location = TensorProto.EXTERNAL
    for key, value in (("location", location), ("offset", offset), ("length", length)):
        tensor.external_data.add(key=key, value=str(value))
    return tensor


def external_info(tensor: TensorProto) -> dict[str, str]:
    """Where an external initializer's bytes lie (`location`, `offset`, `length`); {} for one in the graph."""
    if tensor.data_location != TensorProto.EXTERNAL:
        return {}
    return {entry.key: entry.value for entry in tensor.external_data}


def read_initializer(tensor: TensorProto, folder: Path) -> np.ndarray:
    """The array of an ONNX initializer, from the graph or from its external-data file in `folder`."""
    info = external_info(tensor)
    if not info:
        return numpy_helper.to_array(tensor)
    dtype = helper.tensor_dtype_to_np_dtype(tensor.data_type)
    count = int(np.prod(tensor.dims))
    array = np.fromfile(folder / info["location"], dtype=dtype, count=count, offset=int(info.get("offset", 0)))
    return array.reshape(tuple(tensor.dims))


def map_initializer(tensor: TensorProto, folder: Path) -> np.ndarray:
    """`read_initializer` without reading: an external initializer mapped read-only in place."""
    info = external_info(tensor)
    if not info:
        return numpy_helper.to_array(tensor)
    dtype = helper.tensor_dtype_to_np_dtype(tensor.data_type)
    offset = int(info.get("offset", 0))
    return np.memmap(folder / info["location"], dtype=dtype, mode="r", offset=offset, shape=tuple(tensor.dims))
