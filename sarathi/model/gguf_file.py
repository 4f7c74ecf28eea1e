"""A fast reader of a GGUF file's header: metadata, tensor table, and zero-copy views of tensor bytes.

Why not ``gguf.GGUFReader``: it builds a numpy view per array element, so the 100k-entry tokenizer
arrays of a small model take 2-3 s to parse (twice at engine start: config and weights), most of the
default model's start time. This reads the same header with ``struct`` in ~0.1 s. Dequantization still
uses the ``gguf`` package (``gguf.quants.dequantize`` on the raw bytes given here).

Format (GGUF v2/v3, little-endian): magic ``GGUF``, version u32, tensor count u64, metadata count u64;
each metadata entry is a string key, a u32 value type and the value (arrays: element type u32, count
u64, elements); then per tensor: name, n_dims u32, dims u64 x n (innermost first), ggml type u32, data
offset u64 (relative to the data section, which starts at the next multiple of ``general.alignment``).
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from typing import Any

import numpy as np

# GGUF metadata value types -> struct format (8: string, 9: array are handled apart)
_SCALAR = {0: "<B", 1: "<b", 2: "<H", 3: "<h", 4: "<I", 5: "<i", 6: "<f", 7: "<?", 10: "<Q", 11: "<q",
           12: "<d"}
_NUMPY = {0: np.uint8, 1: np.int8, 2: np.uint16, 3: np.int16, 4: np.uint32, 5: np.int32, 6: np.float32,
          7: np.bool_, 10: np.uint64, 11: np.int64, 12: np.float64}
# ggml tensor types stored as plain elements (F32, F16, I8, I16, I32, I64, F64); others are blocks.
_PLAIN = {0: np.float32, 1: np.float16, 24: np.int8, 25: np.int16, 26: np.int32, 27: np.int64,
          28: np.float64}


@dataclass
class GGUFTensor:
    """One tensor's table entry; ``data`` is a read-only view of its bytes in the mapped file, shaped
    as ``gguf.quants.dequantize`` expects (elements for plain types, [rows, row bytes] for blocks)."""

    name: str
    tensor_type: int
    shape: tuple[int, ...]  # numpy order (outermost first)
    data: np.ndarray


class GGUFFile:
    """``fields``: metadata key -> Python value (strings decoded, arrays as lists); ``tensors``: the
    tensor table in file order. Raises ValueError on anything that is not a well-formed GGUF file."""

    def __init__(self, path: str) -> None:
        self.path = path
        try:
            self._map = np.memmap(path, dtype=np.uint8, mode="r")
        except (OSError, ValueError) as e:
            raise ValueError(f"cannot map {path}: {e}") from None
        self._buf = memoryview(self._map)  # type: ignore[arg-type]
        self._pos = 0
        try:
            self._parse()
        except (struct.error, UnicodeDecodeError, IndexError, KeyError) as e:
            raise ValueError(f"{path} is not a well-formed GGUF file ({type(e).__name__}: {e})") from None

    def _parse(self) -> None:
        if bytes(self._buf[:4]) != b"GGUF":
            raise ValueError(f"{self.path} is not a GGUF file (bad magic)")
        self._pos = 4
        version = self._u32()
        if version not in (2, 3):
            raise ValueError(f"{self.path}: unsupported GGUF version {version}")
        n_tensors, n_kv = self._u64(), self._u64()
        self.fields: dict[str, Any] = {}
        for _ in range(n_kv):
            key = self._str()
            self.fields[key] = self._value(self._u32())
        infos = []
        for _ in range(n_tensors):
            name = self._str()
            dims = [self._u64() for _ in range(self._u32())]
            infos.append((name, dims, self._u32(), self._u64()))
        align = int(self.fields.get("general.alignment", 32))
        base = -(-self._pos // align) * align
        self.tensors = [self._tensor(name, dims, ttype, base + off) for name, dims, ttype, off in infos]

    def _tensor(self, name: str, dims: list[int], ttype: int, start: int) -> GGUFTensor:
        shape = tuple(reversed(dims)) or (1,)
        n = int(np.prod(shape))
        if ttype in _PLAIN:
            dt = np.dtype(_PLAIN[ttype])
            data = self._map[start:start + n * dt.itemsize].view(dt).reshape(shape)
        else:
            from gguf import GGML_QUANT_SIZES, GGMLQuantizationType

            block, size = GGML_QUANT_SIZES[GGMLQuantizationType(ttype)]
            row = shape[-1] // block * size
            data = self._map[start:start + n // block * size].reshape(*shape[:-1], row)
        return GGUFTensor(name, ttype, shape, data)

    # ---- primitive readers ------------------------------------------------------------------
    def _unpack(self, fmt: str) -> Any:
        v = struct.unpack_from(fmt, self._buf, self._pos)[0]
        self._pos += struct.calcsize(fmt)
        return v

    def _u32(self) -> int:
        return self._unpack("<I")

    def _u64(self) -> int:
        return self._unpack("<Q")

    def _str(self) -> str:
        n = self._u64()
        s = bytes(self._buf[self._pos:self._pos + n]).decode("utf-8")
        self._pos += n
        return s

    def _value(self, vtype: int) -> Any:
        if vtype == 8:
            return self._str()
        if vtype == 9:
            etype, count = self._u32(), self._u64()
            if etype in _NUMPY:  # numbers: one vectorised read
                dt = np.dtype(_NUMPY[etype]).newbyteorder("<")
                arr = np.frombuffer(self._buf, dtype=dt, count=count, offset=self._pos)
                self._pos += count * dt.itemsize
                return arr.tolist()
            if etype == 8:  # strings (a tokenizer's vocabulary and merges): the hot loop, inlined
                out, buf, pos, unpack = [], self._buf, self._pos, struct.unpack_from
                for _ in range(count):
                    n = unpack("<Q", buf, pos)[0]
                    out.append(bytes(buf[pos + 8:pos + 8 + n]).decode("utf-8"))
                    pos += 8 + n
                self._pos = pos
                return out
            return [self._value(etype) for _ in range(count)]
        return self._unpack(_SCALAR[vtype])
