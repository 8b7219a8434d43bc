"""Tensors plus JSON in one file, in the safetensors layout; reading runs no code.

The layout (https://huggingface.co/docs/safetensors) is an 8-byte
little-endian header length, a JSON header that gives each tensor's dtype,
shape and byte range, and the raw little-endian bytes of the tensors, back to
back. Files written here open with the ``safetensors`` library too. skinfl
keeps its own metadata as a JSON string under ``__metadata__["skinfl"]`` and
a SHA-256 digest of the tensor table, that metadata and every tensor byte
under ``__metadata__["sha256"]``, so that a modified or truncated file is
refused with a clear error instead of being read.

Writing streams: a tensor source may be a numpy memmap, written in row
chunks, never loaded whole. Files are written to a temporary name and
renamed, so a reader never sees a partial file.
"""

from __future__ import annotations

import hashlib
import json
import os
import struct
import sys
import tempfile
from pathlib import Path

import numpy as np
import torch

# safetensors dtype names, with their numpy and torch equivalents.
_DTYPES = {
    "BOOL": (np.dtype(np.bool_), torch.bool),
    "U8": (np.dtype(np.uint8), torch.uint8),
    "I8": (np.dtype(np.int8), torch.int8),
    "I16": (np.dtype(np.int16), torch.int16),
    "U16": (np.dtype(np.uint16), torch.uint16),
    "I32": (np.dtype(np.int32), torch.int32),
    "U32": (np.dtype(np.uint32), torch.uint32),
    "I64": (np.dtype(np.int64), torch.int64),
    "U64": (np.dtype(np.uint64), torch.uint64),
    "F16": (np.dtype(np.float16), torch.float16),
    "F32": (np.dtype(np.float32), torch.float32),
    "F64": (np.dtype(np.float64), torch.float64),
    "BF16": (None, torch.bfloat16),  # numpy has no bfloat16: read through torch
}
_NAME_OF_TORCH = {torch_dtype: name for name, (_, torch_dtype) in _DTYPES.items()}
_NAME_OF_NUMPY = {np_dtype: name for name, (np_dtype, _) in _DTYPES.items() if np_dtype is not None}
_ITEMSIZE = {name: torch.tensor([], dtype=torch_dtype).element_size() for name, (_, torch_dtype) in _DTYPES.items()}

_MAX_HEADER_BYTES = 100 * 2**20
_DIGEST_PLACEHOLDER = "0" * 64
# Bytes written or hashed at a time when streaming large tensors.
_STREAM_BYTES = 64 * 2**20

if sys.byteorder != "little":  # pragma: no cover - every platform torch supports today
    raise ImportError("skinfl's file format is little-endian; this machine is big-endian.")


class TensorFileError(ValueError):
    """A file that is not a readable skinfl tensor file, or that has been modified."""


# ------------------------------------------------------------------ writing
def _dtype_name(value):
    if isinstance(value, torch.Tensor):
        if value.dtype not in _NAME_OF_TORCH:
            raise TypeError(f"Tensors of dtype {value.dtype} cannot be saved.")
        return _NAME_OF_TORCH[value.dtype]
    dtype = np.dtype(value.dtype)
    if dtype.newbyteorder("=") in _NAME_OF_NUMPY:
        return _NAME_OF_NUMPY[dtype.newbyteorder("=")]
    raise TypeError(f"Arrays of dtype {dtype} cannot be saved; convert them to a numeric dtype.")


def _chunks(value):
    """The little-endian bytes of ``value`` in pieces of about ``_STREAM_BYTES``."""
    if isinstance(value, torch.Tensor):
        flat = value.detach().contiguous().reshape(-1)
        step = max(1, _STREAM_BYTES // max(flat.element_size(), 1))
        for start in range(0, flat.numel(), step):
            piece = flat[start:start + step].cpu()
            if piece.dtype == torch.bfloat16:
                yield piece.view(torch.int16).numpy().tobytes()
            else:
                yield piece.numpy().tobytes()
        return
    shape = tuple(value.shape)
    if len(shape) == 0:
        yield np.ascontiguousarray(value).astype(np.dtype(value.dtype).newbyteorder("<")).tobytes()
        return
    row_bytes = max(1, int(np.prod(shape[1:], dtype=np.int64)) * np.dtype(value.dtype).itemsize)
    rows = max(1, _STREAM_BYTES // row_bytes)
    for start in range(0, shape[0], rows):
        piece = np.asarray(value[start:start + rows])
        yield np.ascontiguousarray(piece).astype(piece.dtype.newbyteorder("<"), copy=False).tobytes()


def _table(tensors):
    table, offset = {}, 0
    for name, value in tensors.items():
        dtype = _dtype_name(value)
        shape = [int(s) for s in value.shape]
        size = int(np.prod(shape, dtype=np.int64)) * _ITEMSIZE[dtype]
        table[name] = {"dtype": dtype, "shape": shape, "data_offsets": [offset, offset + size]}
        offset += size
    return table


def _digest_start(table, metadata_json):
    digest = hashlib.sha256()
    digest.update(json.dumps(table, sort_keys=True).encode())
    digest.update(metadata_json.encode())
    return digest


def _header_bytes(table, metadata_json, digest_hex):
    header = dict(table)
    header["__metadata__"] = {"format": "skinfl", "skinfl": metadata_json, "sha256": digest_hex}
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)  # pad so that tensor data starts 8-byte aligned
    return struct.pack("<Q", len(raw)) + raw


def write(path, tensors, metadata):
    """Write ``tensors`` (name -> tensor or numpy array) and JSON ``metadata`` to ``path``.

    Arrays are streamed in row chunks, so a numpy memmap is never loaded
    whole. The file appears under ``path`` only once it is complete.
    """
    path = Path(path)
    metadata_json = json.dumps(metadata, sort_keys=True)
    table = _table(tensors)
    digest = _digest_start(table, metadata_json)
    folder = path.parent if str(path.parent) else Path(".")
    folder.mkdir(parents=True, exist_ok=True)
    handle, temporary = tempfile.mkstemp(dir=folder, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(handle, "wb") as file:
            file.write(_header_bytes(table, metadata_json, _DIGEST_PLACEHOLDER))
            for name, value in tensors.items():
                written = 0
                for piece in _chunks(value):
                    digest.update(piece)
                    file.write(piece)
                    written += len(piece)
                begin, end = table[name]["data_offsets"]
                if written != end - begin:  # an indexable that returned fewer rows than its shape says
                    raise ValueError(f"{name}: wrote {written} bytes, expected {end - begin}.")
            # The digest has a fixed length, so the header keeps its size.
            file.seek(0)
            file.write(_header_bytes(table, metadata_json, digest.hexdigest()))
        os.replace(temporary, path)
    except BaseException:
        if os.path.exists(temporary):
            os.remove(temporary)
        raise


# ------------------------------------------------------------------ reading
class TensorFile:
    """A skinfl tensor file opened for reading: its metadata and tensor table.

    Opening parses and checks the header only; :meth:`verify` checks the
    digest of the whole file. Nothing is unpickled or executed.
    """

    def __init__(self, path):
        self.path = Path(path)
        try:
            size = self.path.stat().st_size
            with open(self.path, "rb") as file:
                prefix = file.read(8)
                if len(prefix) < 8:
                    raise self._error("it is shorter than a header")
                (header_length,) = struct.unpack("<Q", prefix)
                if header_length > min(_MAX_HEADER_BYTES, size - 8):
                    raise self._error("its header length is larger than the file")
                raw = file.read(header_length)
        except OSError as error:
            raise TensorFileError(f"Cannot read {self.path}: {error}.") from error
        try:
            header = json.loads(raw.decode("utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError) as error:
            raise self._error(f"its header is not valid JSON ({error})") from error
        if not isinstance(header, dict):
            raise self._error("its header is not a JSON object")
        stored = header.pop("__metadata__", None)
        if not isinstance(stored, dict) or stored.get("format") != "skinfl":
            raise self._error("it carries no skinfl metadata")
        self.data_start = 8 + header_length
        self.data_size = size - self.data_start
        self.table = self._checked_table(header)
        self._metadata_json = stored.get("skinfl")
        self._digest = stored.get("sha256")
        if not isinstance(self._metadata_json, str) or not isinstance(self._digest, str):
            raise self._error("its skinfl metadata is incomplete")
        try:
            self.metadata = json.loads(self._metadata_json)
        except json.JSONDecodeError as error:
            raise self._error(f"its skinfl metadata is not valid JSON ({error})") from error

    def _error(self, reason):
        return TensorFileError(f"{self.path} is not a valid skinfl file: {reason}.")

    def _checked_table(self, header):
        table, end_of_previous = {}, 0
        for name, entry in header.items():
            if _offsets(entry) is None:
                raise self._error(f"tensor {name!r} has no valid data_offsets")
        for name, entry in sorted(header.items(), key=lambda item: _offsets(item[1])):
            if not isinstance(entry, dict) or entry.get("dtype") not in _DTYPES:
                raise self._error(f"tensor {name!r} has an unknown dtype")
            shape = entry.get("shape")
            if not isinstance(shape, list) or not all(type(s) is int and s >= 0 for s in shape):
                raise self._error(f"tensor {name!r} has an invalid shape")
            begin, end = _offsets(entry)
            expected = int(np.prod(shape, dtype=np.int64)) * _ITEMSIZE[entry["dtype"]]
            if begin != end_of_previous or end - begin != expected:
                raise self._error(f"the byte range of tensor {name!r} does not match its shape and dtype")
            end_of_previous = end
            table[name] = {"dtype": entry["dtype"], "shape": shape, "data_offsets": [begin, end]}
        if end_of_previous != self.data_size:
            raise self._error("its size does not match its tensor table (truncated or extended)")
        return table

    def verify(self):
        """Check the SHA-256 digest over the table, the metadata and every tensor byte."""
        digest = _digest_start(self.table, self._metadata_json)
        with open(self.path, "rb") as file:
            file.seek(self.data_start)
            while piece := file.read(_STREAM_BYTES):
                digest.update(piece)
        if digest.hexdigest() != self._digest:
            raise TensorFileError(
                f"{self.path} has been modified or corrupted since it was written: its content does not "
                "match its SHA-256 digest. Save the estimator again."
            )
        return self

    def names(self):
        return list(self.table)

    def tensor(self, name, device="cpu"):
        """Tensor ``name``, read into memory and moved to ``device``."""
        entry = self.table[name]
        begin, end = entry["data_offsets"]
        buffer = bytearray(end - begin)
        with open(self.path, "rb") as file:
            file.seek(self.data_start + begin)
            file.readinto(buffer)
        torch_dtype = _DTYPES[entry["dtype"]][1]
        if not buffer:
            return torch.empty(entry["shape"], dtype=torch_dtype, device=device)
        tensor = torch.frombuffer(buffer, dtype=torch_dtype).reshape(entry["shape"])
        return tensor.to(device)

    def memmap(self, name):
        """Tensor ``name`` as a read-only numpy memmap into the file (None for bfloat16)."""
        entry = self.table[name]
        numpy_dtype = _DTYPES[entry["dtype"]][0]
        if numpy_dtype is None:
            return None
        begin, _ = entry["data_offsets"]
        if int(np.prod(entry["shape"], dtype=np.int64)) == 0:
            return np.empty(entry["shape"], dtype=numpy_dtype)
        return np.memmap(self.path, dtype=numpy_dtype, mode="r", offset=self.data_start + begin,
                         shape=tuple(entry["shape"]))


def _offsets(entry):
    """``(begin, end)`` of a header entry, or None when it has none that are valid."""
    offsets = entry.get("data_offsets") if isinstance(entry, dict) else None
    if not (isinstance(offsets, list) and len(offsets) == 2 and all(type(o) is int for o in offsets)):
        return None
    return tuple(offsets)
