"""Safetensors files written and read in one pass each: a checkpoint's tensor file is hashed (SHA-256) and scanned for
NaN/Inf while its bytes go to disk, and verified the same way in one read (docs/checkpoints.md, "Verification").

`safetensors.torch.save_file` serialises a file in one call, so hashing it means reading it back and the finiteness
check is another pass over every tensor; these functions stream the same format (an 8-byte little-endian header
length, the JSON header padded to 8 bytes, then each tensor's bytes at its `data_offsets`) in chunks, and do all three
on each chunk while it is in cache. The files read back with `safetensors.safe_open` like any other.
"""

from __future__ import annotations

import hashlib
import json
import os
import struct
from dataclasses import dataclass
from pathlib import Path

import torch

CHUNK = 4 << 20
"""Bytes hashed, checked and written at a time."""

DTYPES = {torch.float64: "F64", torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16",
          torch.int64: "I64", torch.int32: "I32", torch.int16: "I16", torch.int8: "I8", torch.uint8: "U8",
          torch.bool: "BOOL", torch.float8_e4m3fn: "F8_E4M3", torch.float8_e5m2: "F8_E5M2"}
_BY_NAME = {name: dtype for dtype, name in DTYPES.items()}


@dataclass
class Written:
    """What `write_tensors` / `scan` found: the file's digest and size, and the first non-finite tensor, if any."""

    sha256: str
    bytes: int
    non_finite: str | None = None

    def entry(self) -> dict:
        return {"sha256": self.sha256, "bytes": self.bytes}


def _header(tensors: dict[str, torch.Tensor], metadata: dict[str, str] | None) -> tuple[bytes, list[str]]:
    header, offset = {}, 0
    if metadata:
        header["__metadata__"] = metadata
    names = sorted(tensors)
    for name in names:
        t = tensors[name]
        if t.dtype not in DTYPES:
            raise TypeError(f"{name}: dtype {t.dtype} has no safetensors name")
        size = t.numel() * t.element_size()
        header[name] = {"dtype": DTYPES[t.dtype], "shape": list(t.shape), "data_offsets": [offset, offset + size]}
        offset += size
    text = json.dumps(header, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)
    return struct.pack("<Q", len(text)) + text, names


def _finite(flat: torch.Tensor) -> bool:
    """Whether a flat floating-point piece holds only finite values: its sum is NaN/Inf whenever one value is, and
    costs a tenth of `isfinite(...).all()`; only a non-finite sum (or one overflowing) is checked value by value."""
    if not flat.is_floating_point() or bool(torch.isfinite(flat.sum())):
        return True
    return bool(torch.isfinite(flat).all())


def _chunks(t: torch.Tensor):
    """(typed flat view, its bytes as a memoryview) of `t` in CHUNK-sized pieces, without copying a CPU tensor."""
    flat = t.detach().reshape(-1)
    if not flat.is_contiguous():
        flat = flat.contiguous()
    step = max(1, CHUNK // max(1, flat.element_size()))
    for start in range(0, flat.numel(), step):
        piece = flat[start:start + step]
        yield piece, memoryview(piece.view(torch.uint8).numpy())


def write_tensors(tensors: dict[str, torch.Tensor], path: str | os.PathLike, metadata: dict[str, str] | None = None,
                  check_finite: bool = True, mode: int | None = None) -> Written:
    """Write `tensors` (CPU) as a safetensors file, hashing its bytes and (with `check_finite`) finding the first
    floating-point tensor holding NaN/Inf as they are written; fsynced before it returns. The caller decides what a
    non-finite tensor means (a checkpoint is then not committed). `mode`: the file's permissions (default 0666 minus
    the umask, like any created file)."""
    head, names = _header(tensors, metadata)
    digest, bad = hashlib.sha256(head), None
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o666 if mode is None else mode)
    with os.fdopen(fd, "wb") as f:
        f.write(head)
        for name in names:
            for piece, raw in _chunks(tensors[name]):
                if check_finite and bad is None and not _finite(piece):
                    bad = f"{path}: tensor {name} holds non-finite value(s)"
                digest.update(raw)
                f.write(raw)
        f.flush()
        os.fsync(f.fileno())
    return Written(digest.hexdigest(), len(head) + sum(t.numel() * t.element_size() for t in tensors.values()), bad)


def scan(path: str | os.PathLike, check_finite: bool) -> Written:
    """One read of a file: its SHA-256 and size, and (with `check_finite`, for a safetensors file) the first tensor
    holding NaN/Inf. A file whose header does not parse is hashed all the same (its digest then differs)."""
    digest, size, bad = hashlib.sha256(), 0, None
    buffer = bytearray(CHUNK)
    with open(path, "rb", buffering=0) as f:
        spans = _tensor_spans(f, digest) if check_finite else []
        size = f.tell()
        for name, dtype, end in spans:
            item = torch.empty((), dtype=dtype).element_size()
            while size < end:
                want = min(CHUNK - CHUNK % item, end - size)
                got = f.readinto(memoryview(buffer)[:want])
                if not got:
                    break
                digest.update(memoryview(buffer)[:got])
                size += got
                if bad is None and got % item == 0 and dtype.is_floating_point:
                    if not _finite(torch.frombuffer(buffer, dtype=dtype, count=got // item)):
                        bad = f"{path}: tensor {name} holds non-finite value(s)"
        while got := f.readinto(buffer):  # the rest (all of a file that is not safetensors)
            digest.update(memoryview(buffer)[:got])
            size += got
    return Written(digest.hexdigest(), size, bad)


def _tensor_spans(f, digest) -> list[tuple[str, torch.dtype, int]]:
    """Read and hash a safetensors header; (name, dtype, absolute end offset) of each tensor in file order, with
    any gap between tensors given to the one after it. [] when the header is not one (hashed as plain bytes)."""
    first = f.read(8)
    digest.update(first)
    if len(first) < 8:
        return []
    (length,) = struct.unpack("<Q", first)
    if length > 100 << 20:
        return []
    text = f.read(length)
    digest.update(text)
    try:
        header = json.loads(text)
        entries = sorted((v["data_offsets"][1], k, _BY_NAME[v["dtype"]]) for k, v in header.items()
                         if k != "__metadata__")
    except (ValueError, KeyError, TypeError, UnicodeDecodeError):
        return []
    return [(name, dtype, 8 + length + end) for end, name, dtype in entries]


def sha256(path: Path) -> tuple[str, int]:
    """(hex digest, size in bytes) of a file, read once."""
    found = scan(path, check_finite=False)
    return found.sha256, found.bytes

