"""A fast reader for the GGUF container: metadata, tensor directory and raw tensor bytes.

`gguf.GGUFReader` builds a numpy object per vocabulary string and takes tens of seconds on a 262k-token
vocabulary (Gemma 3); this reader parses the header with `struct` over a memory map in a fraction of a second.
The math stays with the `gguf` package: `tensor()` hands the raw blocks to `gguf.quants.dequantize`.
"""

from __future__ import annotations

import mmap
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from cumulo.errors import InvalidModel

MAGIC = b"GGUF"
DEFAULT_ALIGNMENT = 32
# GGUF value types -> struct format (STRING = 8 and ARRAY = 9 are handled apart)
_SCALARS = {0: "B", 1: "b", 2: "H", 3: "h", 4: "I", 5: "i", 6: "f", 7: "?", 10: "Q", 11: "q", 12: "d"}
_NUMPY = {
    0: np.uint8,
    1: np.int8,
    2: np.uint16,
    3: np.int16,
    4: np.uint32,
    5: np.int32,
    6: np.float32,
    7: np.bool_,
    10: np.uint64,
    11: np.int64,
    12: np.float64,
}
# ggml types stored as plain numbers rather than blocks
_PLAIN = {0: np.float32, 1: np.float16, 24: np.int8, 25: np.int16, 26: np.int32, 27: np.int64, 28: np.float64}


@dataclass(frozen=True, slots=True)
class TensorInfo:
    name: str
    dims: tuple[int, ...]  # GGUF order: fastest-varying first, i.e. reversed numpy/torch shape
    ggml_type: int
    offset: int  # from the start of the data section

    @property
    def shape(self) -> tuple[int, ...]:
        """Numpy/torch shape (slowest-varying first)."""
        return tuple(reversed(self.dims))

    @property
    def type_name(self) -> str:
        from gguf import GGMLQuantizationType

        try:
            return GGMLQuantizationType(self.ggml_type).name
        except ValueError:
            return f"type{self.ggml_type}"


class _Cursor:
    def __init__(self, buf: mmap.mmap) -> None:
        self.buf = buf
        self.pos = 0

    def scalar(self, fmt: str) -> Any:
        (value,) = struct.unpack_from("<" + fmt, self.buf, self.pos)
        self.pos += struct.calcsize(fmt)
        return value

    def string(self) -> str:
        length = self.scalar("Q")
        end = self.pos + length
        if end > len(self.buf):
            raise ValueError("string runs past the end of the file")
        text = self.buf[self.pos : end].decode("utf-8", errors="replace")
        self.pos = end
        return text

    def value(self, vtype: int) -> Any:
        if vtype == 8:
            return self.string()
        if vtype == 9:
            item_type, count = self.scalar("I"), self.scalar("Q")
            if item_type == 8:
                return [self.string() for _ in range(count)]
            if item_type in _NUMPY:
                array = np.frombuffer(self.buf, dtype=_NUMPY[item_type], count=count, offset=self.pos)
                self.pos += array.nbytes
                return array.tolist()
            return [self.value(item_type) for _ in range(count)]  # arrays of arrays
        if vtype in _SCALARS:
            return self.scalar(_SCALARS[vtype])
        raise ValueError(f"unknown GGUF value type {vtype}")


class GGUFFile:
    """An open GGUF file: `metadata` (plain Python values), `tensors` (in file order), `tensor(name)`."""

    def __init__(self, path: Path) -> None:
        self.path = path
        try:
            with open(path, "rb") as handle:
                self._buf = mmap.mmap(handle.fileno(), 0, access=mmap.ACCESS_READ)
        except (OSError, ValueError) as exc:  # ValueError: empty file
            raise InvalidModel(f"{path.name}: cannot read as a GGUF file ({exc})") from exc
        try:
            self._parse()
        except (struct.error, ValueError, OverflowError, MemoryError) as exc:
            raise InvalidModel(f"{path.name}: damaged or truncated GGUF file ({exc})") from exc

    def _parse(self) -> None:
        cur = _Cursor(self._buf)
        if self._buf[:4] != MAGIC:
            raise ValueError("no GGUF magic")
        cur.pos = 4
        version = cur.scalar("I")
        if version not in (2, 3):
            raise ValueError(f"GGUF version {version} (big-endian or unknown) is not supported")
        tensor_count, kv_count = cur.scalar("Q"), cur.scalar("Q")
        self.metadata: dict[str, Any] = {}
        for _ in range(kv_count):
            key = cur.string()
            self.metadata[key] = cur.value(cur.scalar("I"))
        self.tensors: dict[str, TensorInfo] = {}
        for _ in range(tensor_count):
            name = cur.string()
            n_dims = cur.scalar("I")
            dims = tuple(cur.scalar("Q") for _ in range(n_dims))
            self.tensors[name] = TensorInfo(name, dims, cur.scalar("I"), cur.scalar("Q"))
        alignment = int(self.metadata.get("general.alignment", DEFAULT_ALIGNMENT))
        self.data_offset = -(-cur.pos // alignment) * alignment
        for info in self.tensors.values():
            end = self.data_offset + info.offset + self._nbytes(info)
            if end > len(self._buf):
                raise ValueError(f"tensor {info.name} runs past the end of the file")

    @staticmethod
    def _nbytes(info: TensorInfo) -> int:
        from gguf import GGML_QUANT_SIZES, GGMLQuantizationType

        count = int(np.prod(info.dims, dtype=np.int64)) if info.dims else 1
        if info.ggml_type in _PLAIN:
            return count * np.dtype(_PLAIN[info.ggml_type]).itemsize
        try:
            block, size = GGML_QUANT_SIZES[GGMLQuantizationType(info.ggml_type)]
        except (ValueError, KeyError):
            raise ValueError(f"tensor {info.name} has unknown ggml type {info.ggml_type}") from None
        return count // block * size

    def raw(self, name: str) -> np.ndarray:
        """The stored bytes of a tensor as the `gguf` package expects them (blocks as uint8 rows)."""
        info = self.tensors[name]
        start = self.data_offset + info.offset
        if info.ggml_type in _PLAIN:
            dtype = np.dtype(_PLAIN[info.ggml_type])
            count = self._nbytes(info) // dtype.itemsize
            return np.frombuffer(self._buf, dtype=dtype, count=count, offset=start).reshape(info.shape)
        nbytes = self._nbytes(info)
        rows = int(np.prod(info.shape[:-1], dtype=np.int64)) if len(info.shape) > 1 else 1
        array = np.frombuffer(self._buf, dtype=np.uint8, count=nbytes, offset=start)
        return array.reshape(*info.shape[:-1], nbytes // rows)

    def tensor(self, name: str) -> np.ndarray:
        """A tensor dequantized to a new float32 array in numpy shape."""
        from gguf import GGMLQuantizationType
        from gguf.quants import dequantize

        info = self.tensors[name]
        raw = self.raw(name)
        if info.ggml_type in _PLAIN:
            return raw.astype(np.float32)  # always a copy: never hand out views of the mapped file
        try:
            values = dequantize(raw, GGMLQuantizationType(info.ggml_type))
        except NotImplementedError as exc:
            raise InvalidModel(f"{self.path.name}: cannot dequantize {info.type_name} ({name})") from exc
        return np.asarray(values, dtype=np.float32).reshape(info.shape)

    def close(self) -> None:
        self._buf.close()
