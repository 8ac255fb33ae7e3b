"""Megatron-Core indexed datasets: a `.bin` of token ids and an `.idx` describing them, read and written here,
byte-compatible with Megatron-Core's `IndexedDataset` / `IndexedDatasetBuilder` (docs/data.md).

The `.bin` is the token ids of every sequence, back to back, in the dataset's dtype, little-endian, nothing else.
The `.idx` is, all little-endian and unpadded:

    magic            9 bytes   b"MMIDIDX\\x00\\x00"
    version          uint64    1
    dtype code       uint8     1 uint8, 2 int8, 3 int16, 4 int32, 5 int64, 6 float64, 7 float32, 8 uint16
    sequence count   uint64    n
    doc-index count  uint64    d (= documents + 1)
    lengths          int32[n]  tokens per sequence
    pointers         int64[n]  byte offset of each sequence in the .bin (0, then each the previous + length*itemsize)
    document indices int64[d]  0, then for each finished document the index of the first sequence of the next one

A document is one or more consecutive sequences (document k = sequences indices[k] .. indices[k+1]-1); here
"document k" means its sequences concatenated. Multimodal datasets append an int8 mode per sequence after the
document indices; nothing in the header says so, so such an `.idx` is recognised by its size (exactly n bytes
more than the header implies) and refused, like any other trailing bytes: its sequences are not all text tokens.

The reader validates eagerly (header, index arrays and file sizes; never the tokens) and raises `DataError`
naming the file. The writer streams tokens to a temporary `.bin`, keeps only the lengths in memory, and renames
the `.bin` into place before the `.idx`, so an `.idx` under its final name always has its complete `.bin`.
"""

from __future__ import annotations

import array
import os
import secrets
import struct
from pathlib import Path

import numpy as np

from .errors import DataError

BIN_SUFFIX, IDX_SUFFIX = ".bin", ".idx"
MAGIC = b"MMIDIDX\x00\x00"
VERSION = 1
HEADER = struct.Struct("<9sQBQQ")  # magic, version, dtype code, sequence count, document-index count: 34 bytes
CODES = {1: np.uint8, 2: np.int8, 3: np.int16, 4: np.int32, 5: np.int64, 6: np.float64, 7: np.float32,
         8: np.uint16}
CODE_OF = {np.dtype(t): code for code, t in CODES.items()}
UINT16_BELOW = 65500  # Megatron's builder stores ids as uint16 when the vocabulary is smaller than this
CHUNK = 1 << 20  # index entries checked or written per step, to bound temporary memory


def pair_paths(path: str | os.PathLike) -> tuple[Path, Path]:
    """(bin, idx) for a `.bin` path, an `.idx` path or their common prefix (a prefix keeps any dots it has)."""
    text = os.fspath(path)
    if text.endswith((BIN_SUFFIX, IDX_SUFFIX)):
        text = text[: -len(BIN_SUFFIX)]
    return Path(text + BIN_SUFFIX), Path(text + IDX_SUFFIX)


def dtype_for_vocab(vocab_size: int) -> np.dtype:
    """The token dtype Megatron's builder picks: uint16 for a vocabulary below 65500, else int32."""
    return np.dtype(np.uint16 if vocab_size < UINT16_BELOW else np.int32)


def token_dtype(dtype, where: str) -> np.dtype:
    """`dtype` as a numpy dtype if the format can store token ids in it, else a DataError."""
    try:
        dt = np.dtype(dtype)
    except TypeError as e:
        raise DataError(f"{where}: {dtype!r} is not a dtype") from e
    if dt.newbyteorder("=") not in CODE_OF or dt.kind not in "iu":
        names = ", ".join(np.dtype(t).name for t in CODES.values() if np.dtype(t).kind in "iu")
        raise DataError(f"{where}: token dtype {dt} cannot be stored; use one of {names}")
    return dt.newbyteorder("=")


class IndexedDataset:
    """A read-only Megatron indexed dataset: documents as token arrays, the `.bin` memory-mapped."""

    def __init__(self, path: str | os.PathLike):
        """`path`: the `.bin`, the `.idx` or their prefix. Checks the pair before anything is read from it."""
        self.bin_path, self.idx_path = pair_paths(path)
        self._check_both_exist()
        self.dtype, n, d = self._read_header()
        index = np.memmap(self.idx_path, dtype=np.uint8, mode="r")
        lengths_at = HEADER.size
        pointers_at = lengths_at + 4 * n
        docs_at = pointers_at + 8 * n
        self._lengths = np.frombuffer(index, dtype="<i4", count=n, offset=lengths_at)
        self._pointers = np.frombuffer(index, dtype="<i8", count=n, offset=pointers_at)
        self._docs = np.frombuffer(index, dtype="<i8", count=d, offset=docs_at)
        self.num_tokens = self._check_index()
        self._check_bin_size()
        if self.num_tokens:
            # a plain array over the mapping: slices of a memmap subclass cost more than reading a short document
            self._tokens = np.asarray(np.memmap(self.bin_path, dtype=self.dtype.newbyteorder("<"), mode="r"))
        else:  # an empty file cannot be memory-mapped
            self._tokens = np.empty(0, dtype=self.dtype)
            self._tokens.flags.writeable = False

    def __len__(self) -> int:
        """Number of documents."""
        return len(self._docs) - 1

    def document(self, k: int) -> np.ndarray:
        """Document k's tokens (its sequences concatenated), a read-only view of the `.bin`."""
        count = len(self._docs) - 1
        if not -count <= k < count:
            raise IndexError(f"{self.idx_path}: document {k} out of range ({count} documents)")
        k %= count
        first, end = int(self._docs[k]), int(self._docs[k + 1])
        if first == end:
            return self._tokens[:0]
        # the sequences of a document are adjacent in the .bin: the index check proved the pointers contiguous
        start = int(self._pointers[first]) // self.dtype.itemsize
        length = int(self._lengths[first]) if end == first + 1 else int(self._lengths[first:end].sum(dtype=np.int64))
        return self._tokens[start: start + length]

    def document_lengths(self) -> np.ndarray:
        """Tokens per document, int64."""
        cumulative = np.zeros(len(self._lengths) + 1, dtype=np.int64)
        np.cumsum(self._lengths, out=cumulative[1:])
        return np.diff(cumulative[self._docs])

    def __getstate__(self) -> dict:
        """Pickled (e.g. for a worker process) as its path; the copy maps the files again."""
        return {"path": str(self.idx_path)}

    def __setstate__(self, state: dict) -> None:
        self.__init__(state["path"])

    def __repr__(self) -> str:
        return f"IndexedDataset({str(self.idx_path)!r}, {len(self)} documents, {self.num_tokens} tokens, {self.dtype})"

    def _check_both_exist(self) -> None:
        has_bin, has_idx = self.bin_path.is_file(), self.idx_path.is_file()
        if not has_bin and not has_idx:
            raise DataError(f"{self.idx_path}: no indexed dataset here: neither {self.idx_path.name} nor "
                            f"{self.bin_path.name} exists")
        if not has_bin:
            raise DataError(f"{self.idx_path}: its data file {self.bin_path} is missing; a .bin and its .idx "
                            f"must stay side by side under the same prefix")
        if not has_idx:
            raise DataError(f"{self.bin_path}: its index {self.idx_path} is missing: the dataset was not finished "
                            f"(the .idx is written last) or was moved without it; rebuild it")

    def _read_header(self) -> tuple[np.dtype, int, int]:
        """(dtype, sequence count, document-index count), after checking the header and the `.idx` size."""
        with open(self.idx_path, "rb") as f:
            head = f.read(HEADER.size)
        if head[: len(MAGIC)] != MAGIC[: len(head)]:
            raise DataError(f"{self.idx_path}: not a Megatron MMIDIDX index (starts with {head[:len(MAGIC)]!r}, "
                            f"not {MAGIC!r})")
        if len(head) < HEADER.size:
            raise DataError(f"{self.idx_path}: truncated: {len(head)} bytes, shorter than the {HEADER.size}-byte "
                            f"header; rebuild the dataset")
        _, version, code, n, d = HEADER.unpack(head)
        if version != VERSION:
            raise DataError(f"{self.idx_path}: unsupported index version {version} (only version {VERSION} exists)")
        if code not in CODES:
            raise DataError(f"{self.idx_path}: unknown dtype code {code} (known: "
                            f"{', '.join(f'{c} {np.dtype(t).name}' for c, t in CODES.items())})")
        dtype = np.dtype(CODES[code])
        if dtype.kind == "f":
            raise DataError(f"{self.idx_path}: dtype {dtype.name} (code {code}): token ids must be integers; "
                            f"this is not a tokenized text dataset")
        expected, size = HEADER.size + 12 * n + 8 * d, self.idx_path.stat().st_size
        if size < expected:
            raise DataError(f"{self.idx_path}: truncated: its header says {n} sequences and {d} document indices, "
                            f"which take {expected} bytes, but the file has {size}; rebuild the dataset")
        if size == expected + n and n:
            raise DataError(f"{self.idx_path}: holds a per-sequence modes array (a multimodal dataset); only "
                            f"token datasets are supported, so build it without multimodal")
        if size > expected:
            raise DataError(f"{self.idx_path}: {size - expected} unexpected bytes after the index arrays "
                            f"({expected} expected, {size} found); rebuild the dataset")
        return dtype, n, d

    def _check_index(self) -> int:
        """Checks lengths, pointers and document indices against each other; returns the total tokens."""
        n, docs, itemsize = len(self._lengths), self._docs, self.dtype.itemsize
        if len(docs) == 0 or docs[0] != 0:
            first = "none" if len(docs) == 0 else int(docs[0])
            raise DataError(f"{self.idx_path}: corrupt index: document indices must start at 0 (first: {first})")
        expected_at, total = 0, 0  # byte offset the next sequence must start at; tokens so far
        for lo in range(0, n, CHUNK):
            lengths = self._lengths[lo: lo + CHUNK].astype(np.int64)
            if (lengths < 0).any():
                at = lo + int(np.argmax(lengths < 0))
                raise DataError(f"{self.idx_path}: corrupt index: sequence {at} has negative length {lengths[at - lo]}")
            ends = expected_at + np.cumsum(lengths * itemsize)
            starts = np.concatenate(([expected_at], ends[:-1]))
            bad = np.flatnonzero(self._pointers[lo: lo + CHUNK] != starts)
            if len(bad):
                at = lo + int(bad[0])
                raise DataError(f"{self.idx_path}: corrupt index: sequence {at} starts at byte "
                                f"{int(self._pointers[at])} of the .bin, but the lengths before it put it at "
                                f"{int(starts[bad[0]])}")
            expected_at, total = int(ends[-1]), total + int(lengths.sum())
        for lo in range(0, len(docs), CHUNK):
            part = docs[max(lo - 1, 0): lo + CHUNK]  # overlap one entry so every step is compared
            steps = np.diff(part)
            if (steps < 0).any():
                at = max(lo - 1, 0) + int(np.argmax(steps < 0)) + 1
                raise DataError(f"{self.idx_path}: corrupt index: document indices decrease at entry {at} "
                                f"({int(docs[at - 1])} then {int(docs[at])})")
        if docs[-1] != n:
            where = "past" if docs[-1] > n else "short of"
            raise DataError(f"{self.idx_path}: corrupt index: the last document index {int(docs[-1])} is {where} "
                            f"the sequence count {n}; every sequence must belong to one document")
        return total

    def _check_bin_size(self) -> None:
        expected, size = self.num_tokens * self.dtype.itemsize, self.bin_path.stat().st_size
        if size != expected:
            raise DataError(f"{self.bin_path}: {size} bytes, but its index {self.idx_path.name} describes "
                            f"{self.num_tokens} {self.dtype.name} tokens = {expected} bytes; the pair does not "
                            f"belong together or the .bin is truncated; rebuild the dataset")


class IndexedWriter:
    """Writes `<prefix>.bin` and `<prefix>.idx`, one sequence per document, streaming tokens to disk.

    Use as `with IndexedWriter(prefix, dtype) as w: w.add_document(ids)`: it finalizes on success and aborts (no
    file under a final name is touched) on an exception."""

    def __init__(self, prefix: str | os.PathLike, dtype):
        self.bin_path, self.idx_path = pair_paths(prefix)
        self.dtype = token_dtype(dtype, str(self.idx_path))
        self._max = int(np.iinfo(self.dtype).max)
        self._lengths = array.array("q")  # tokens per document: all that is kept in memory
        self._tokens = 0
        self._state = "open"  # then "finalized" or "aborted"
        self.bin_path.parent.mkdir(parents=True, exist_ok=True)
        self._bin_tmp, self._idx_tmp = self._temporary(self.bin_path), self._temporary(self.idx_path)
        self._bin = open(self._bin_tmp, "xb")

    def __enter__(self) -> IndexedWriter:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is not None:
            self.abort()
        elif self._state == "open":
            self.finalize()

    def add_document(self, tokens: np.ndarray) -> None:
        """Appends one document (one sequence) of token ids; ids must fit the dtype."""
        self._check_open()
        ids = np.asarray(tokens)
        where = f"{self.bin_path}: document {len(self._lengths)}"
        if ids.ndim != 1:
            raise DataError(f"{where}: tokens must be a 1-D array, got shape {ids.shape}")
        if ids.size and ids.dtype.kind not in "iu":
            raise DataError(f"{where}: token ids must be integers, got {ids.dtype}")
        if ids.size:
            low, high = int(ids.min()), int(ids.max())
            if low < 0 or high > self._max:
                value = low if low < 0 else high
                raise DataError(f"{where}: token id {value} does not fit {self.dtype.name} (ids must be in "
                                f"[0, {self._max}]); write with a wider dtype (dtype_for_vocab(vocab size))")
        if ids.size > np.iinfo(np.int32).max:
            raise DataError(f"{where}: {ids.size} tokens, more than an int32 sequence length holds; split it")
        self._bin.write(np.ascontiguousarray(ids, dtype=self.dtype.newbyteorder("<")).tobytes())
        self._lengths.append(ids.size)
        self._tokens += ids.size

    def finalize(self) -> tuple[int, int]:
        """Writes the `.idx`, syncs both, moves the `.bin` then the `.idx` into place; returns (documents, tokens)."""
        self._check_open()
        try:
            self._bin.flush()
            os.fsync(self._bin.fileno())
            self._bin.close()
            with open(self._idx_tmp, "xb") as f:
                self._write_index(f)
                f.flush()
                os.fsync(f.fileno())
            # an old .idx must go first: between the renames it would describe the new .bin
            self.idx_path.unlink(missing_ok=True)
            os.replace(self._bin_tmp, self.bin_path)
            os.replace(self._idx_tmp, self.idx_path)
            self._sync_directory()
        except BaseException:
            self.abort()
            raise
        self._state = "finalized"
        return len(self._lengths), self._tokens

    def abort(self) -> None:
        """Stops writing and removes the temporary files; the final names are left as they were. After
        `finalize` it does nothing."""
        if self._state == "finalized":
            return
        self._state = "aborted"
        self._bin.close()
        self._bin_tmp.unlink(missing_ok=True)
        self._idx_tmp.unlink(missing_ok=True)

    def _check_open(self) -> None:
        if self._state != "open":
            raise RuntimeError(f"{self.idx_path}: the writer is already {self._state}")

    def _write_index(self, f) -> None:
        n, itemsize = len(self._lengths), self.dtype.itemsize
        f.write(HEADER.pack(MAGIC, VERSION, CODE_OF[self.dtype], n, n + 1))
        lengths = np.frombuffer(self._lengths, dtype=np.int64) if n else np.zeros(0, dtype=np.int64)
        for lo in range(0, n, CHUNK):
            f.write(lengths[lo: lo + CHUNK].astype("<i4").tobytes())
        at = 0
        for lo in range(0, n, CHUNK):
            ends = at + np.cumsum(lengths[lo: lo + CHUNK] * itemsize)
            f.write(np.concatenate(([at], ends[:-1])).astype("<i8").tobytes())
            at = int(ends[-1])
        for lo in range(0, n + 1, CHUNK):  # one sequence per document: document k starts at sequence k
            f.write(np.arange(lo, min(lo + CHUNK, n + 1), dtype="<i8").tobytes())

    @staticmethod
    def _temporary(final: Path) -> Path:
        """A fresh name beside `final` (same directory, so the rename is atomic), hidden and ending in .tmp."""
        return final.with_name(f".{final.name}.{os.getpid()}-{secrets.token_hex(4)}.tmp")

    def _sync_directory(self) -> None:
        """Makes the renames durable; skipped where a directory cannot be opened (not POSIX)."""
        try:
            fd = os.open(self.idx_path.parent, os.O_RDONLY)
        except OSError:
            return
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
