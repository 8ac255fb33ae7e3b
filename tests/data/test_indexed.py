"""Megatron indexed datasets: our reader and writer against an independent struct-level writer and parser, every
bad-file case, interrupted writes, and (where megatron.core is installed) Megatron's own builder and reader."""

from __future__ import annotations

import struct

import numpy as np
import pytest

from data.indexed import IndexedDataset, IndexedWriter, dtype_for_vocab, pair_paths
from data.sources import DataError

MAGIC = b"MMIDIDX\x00\x00"
CODE = {np.dtype(np.uint16): 8, np.dtype(np.int32): 4, np.dtype(np.uint8): 1, np.dtype(np.int64): 5}
# documents as lists of sequences: a 2-sequence document, a 1-token one, a long one
DOCS = [[[5, 6, 7], [8, 9]], [[42]], [list(range(100, 160))]]


def write_pair(prefix, docs, dtype, extra=b"") -> tuple:
    """An independent writer, from the format description alone: (bin path, idx path)."""
    dtype = np.dtype(dtype)
    lengths, pointers, doc_index, data, at = [], [], [0], b"", 0
    for doc in docs:
        for seq in doc:
            lengths.append(len(seq))
            pointers.append(at)
            raw = b"".join(struct.pack("<" + dtype.char, t) for t in seq)
            data += raw
            at += len(raw)
        doc_index.append(len(lengths))
    idx = MAGIC + struct.pack("<QBQQ", 1, CODE[dtype], len(lengths), len(doc_index))
    idx += struct.pack(f"<{len(lengths)}i", *lengths) + struct.pack(f"<{len(pointers)}q", *pointers)
    idx += struct.pack(f"<{len(doc_index)}q", *doc_index) + extra
    bin_path, idx_path = prefix.with_name(prefix.name + ".bin"), prefix.with_name(prefix.name + ".idx")
    bin_path.write_bytes(data)
    idx_path.write_bytes(idx)
    return bin_path, idx_path


def parse_pair(prefix) -> dict:
    """An independent parser: the header fields, index arrays and tokens of a pair."""
    idx = prefix.with_name(prefix.name + ".idx").read_bytes()
    magic, version, code, n, d = struct.unpack_from("<9sQBQQ", idx, 0)
    at = 34
    lengths = list(struct.unpack_from(f"<{n}i", idx, at))
    pointers = list(struct.unpack_from(f"<{n}q", idx, at + 4 * n))
    doc_index = list(struct.unpack_from(f"<{d}q", idx, at + 12 * n))
    assert len(idx) == at + 12 * n + 8 * d
    char = {8: "H", 4: "i", 1: "B", 5: "q"}[code]
    data = prefix.with_name(prefix.name + ".bin").read_bytes()
    tokens = list(struct.unpack(f"<{len(data) // struct.calcsize(char)}{char}", data))
    return dict(magic=magic, version=version, code=code, n=n, d=d, lengths=lengths, pointers=pointers,
                doc_index=doc_index, tokens=tokens)


def flat(doc) -> list:
    return [t for seq in doc for t in seq]


@pytest.mark.parametrize("dtype", [np.uint16, np.int32])
def test_reads_a_pair_written_from_the_format_description(tmp_path, dtype):
    write_pair(tmp_path / "corpus", DOCS, dtype)
    for path in ("corpus", "corpus.bin", "corpus.idx"):
        ds = IndexedDataset(tmp_path / path)
        assert ds.dtype == np.dtype(dtype) and len(ds) == 3 and ds.num_tokens == 66
        assert [ds.document(k).tolist() for k in range(3)] == [flat(doc) for doc in DOCS]
        assert ds.document(-1).tolist() == flat(DOCS[-1])
        assert ds.document_lengths().tolist() == [5, 1, 60] and ds.document_lengths().dtype == np.int64
        assert not ds.document(0).flags.writeable
    with pytest.raises(IndexError):
        ds.document(3)


def test_our_writer_matches_the_format_byte_for_byte(tmp_path):
    docs = [[3, 1, 4], [1], [], list(range(65535 - 5, 65536))]
    with IndexedWriter(tmp_path / "out", np.uint16) as w:
        for doc in docs:
            w.add_document(np.array(doc, dtype=np.int64))
    with pytest.raises(RuntimeError, match="already finalized"):
        w.add_document([1])
    got = parse_pair(tmp_path / "out")
    assert got == dict(magic=MAGIC, version=1, code=8, n=4, d=5, lengths=[3, 1, 0, 6], pointers=[0, 6, 8, 8],
                       doc_index=[0, 1, 2, 3, 4], tokens=[t for doc in docs for t in doc])
    ds = IndexedDataset(tmp_path / "out.idx")
    assert [ds.document(k).tolist() for k in range(len(ds))] == docs
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out.bin", "out.idx"]  # no temporaries left


def test_finalize_returns_counts_and_int32_round_trips(tmp_path):
    w = IndexedWriter(tmp_path / "v.big", dtype_for_vocab(100_000))
    w.add_document(np.array([0, 99_999, 70_000]))
    w.add_document([5])
    assert w.finalize() == (2, 4)
    assert parse_pair(tmp_path / "v.big")["code"] == 4  # the dot in the prefix is kept: v.big.idx
    ds = IndexedDataset(tmp_path / "v.big")
    assert ds.dtype == np.int32 and ds.document(0).tolist() == [0, 99_999, 70_000]


def test_paths_and_dtype_choice(tmp_path):
    assert pair_paths(tmp_path / "a.b") == (tmp_path / "a.b.bin", tmp_path / "a.b.idx")
    assert pair_paths(str(tmp_path / "a.idx")) == pair_paths(tmp_path / "a.bin") == (tmp_path / "a.bin",
                                                                                       tmp_path / "a.idx")
    assert dtype_for_vocab(65499) == np.uint16 and dtype_for_vocab(65500) == np.int32


def test_writer_refuses_ids_that_do_not_fit_and_bad_dtypes(tmp_path):
    with IndexedWriter(tmp_path / "w", np.uint16) as w:
        with pytest.raises(DataError, match=r"w\.bin: document 0: token id 65536 does not fit uint16"):
            w.add_document(np.array([1, 65536]))
        with pytest.raises(DataError, match="token id -1 does not fit"):
            w.add_document(np.array([-1]))
        with pytest.raises(DataError, match="must be integers"):
            w.add_document(np.array([1.5]))
        w.add_document(np.array([7]))
    assert IndexedDataset(tmp_path / "w").document(0).tolist() == [7]
    for bad in (np.float32, np.uint32):
        with pytest.raises(DataError, match=r"w2\.idx: token dtype .* cannot be stored"):
            IndexedWriter(tmp_path / "w2", bad)


def test_an_interrupted_write_leaves_no_index(tmp_path):
    with pytest.raises(KeyboardInterrupt):
        with IndexedWriter(tmp_path / "cut", np.int32) as w:
            w.add_document(np.arange(10))
            raise KeyboardInterrupt
    assert list(tmp_path.iterdir()) == []  # no final name, no temporaries
    w = IndexedWriter(tmp_path / "mid", np.int32)
    w.add_document(np.arange(10))
    assert not (tmp_path / "mid.idx").exists() and not (tmp_path / "mid.bin").exists()  # temporaries only
    w.abort()
    assert list(tmp_path.iterdir()) == []


def test_rewriting_a_pair_replaces_it_whole(tmp_path):
    write_pair(tmp_path / "re", DOCS, np.uint16)
    with pytest.raises(RuntimeError):
        with IndexedWriter(tmp_path / "re", np.uint16) as w:
            w.add_document([1])
            raise RuntimeError("interrupted")
    assert IndexedDataset(tmp_path / "re").document(1).tolist() == [42]  # the old pair is untouched
    with IndexedWriter(tmp_path / "re", np.uint16) as w:
        w.add_document([1, 2])
    assert len(IndexedDataset(tmp_path / "re")) == 1


def test_missing_halves(tmp_path):
    bin_path, idx_path = write_pair(tmp_path / "p", DOCS, np.uint16)
    bin_path.unlink()
    with pytest.raises(DataError, match=r"p\.idx: its data file .*p\.bin is missing"):
        IndexedDataset(idx_path)
    bin_path, idx_path = write_pair(tmp_path / "q", DOCS, np.uint16)
    idx_path.unlink()
    with pytest.raises(DataError, match=r"q\.bin: its index .*q\.idx is missing: the dataset was not finished"):
        IndexedDataset(tmp_path / "q")
    with pytest.raises(DataError, match=r"nothing\.idx: no indexed dataset here"):
        IndexedDataset(tmp_path / "nothing")


def _corrupt_index(tmp_path, at: int, data: bytes):
    _, idx_path = write_pair(tmp_path / "c", DOCS, np.uint16)
    raw = bytearray(idx_path.read_bytes())
    raw[at: at + len(data)] = data
    idx_path.write_bytes(bytes(raw))
    return idx_path


N, D = 4, 4  # sequences and document indices of DOCS
LENGTHS_AT, POINTERS_AT, DOCS_AT = 34, 34 + 4 * N, 34 + 12 * N


@pytest.mark.parametrize("at, data, message", [
    (0, b"NOTMEGAT\x00", r"c\.idx: not a Megatron MMIDIDX index"),
    (9, struct.pack("<Q", 2), r"c\.idx: unsupported index version 2"),
    (17, b"\x09", r"c\.idx: unknown dtype code 9"),
    (17, b"\x07", r"c\.idx: dtype float32 \(code 7\): token ids must be integers"),
    (17, b"\x06", r"c\.idx: dtype float64 .*must be integers"),
    (18, struct.pack("<Q", 5), r"c\.idx: truncated: its header says 5 sequences and 4 document indices"),
    (LENGTHS_AT, struct.pack("<i", -3), r"c\.idx: corrupt index: sequence 0 has negative length -3"),
    (POINTERS_AT + 8, struct.pack("<q", 4), r"c\.idx: corrupt index: sequence 1 starts at byte 4 .* put it at 6"),
    (DOCS_AT, struct.pack("<q", 1), r"c\.idx: corrupt index: document indices must start at 0 \(first: 1\)"),
    (DOCS_AT + 16, struct.pack("<q", 1), r"c\.idx: corrupt index: document indices decrease at entry 2 \(2 then 1\)"),
    (DOCS_AT + 24, struct.pack("<q", 5), r"c\.idx: corrupt index: the last document index 5 is past the sequence"),
    (DOCS_AT + 24, struct.pack("<q", 3), r"the last document index 3 is short of the sequence count 4"),
])
def test_corrupt_index_names_the_file_and_the_problem(tmp_path, at, data, message):
    with pytest.raises(DataError, match=message):
        IndexedDataset(_corrupt_index(tmp_path, at, data))


@pytest.mark.parametrize("keep, message", [
    (0, r"c\.idx: truncated: 0 bytes"),
    (5, r"c\.idx: truncated: 5 bytes, shorter than the 34-byte header"),
    (30, r"c\.idx: truncated: 30 bytes"),
    (34 + 12 * N + 8 * D - 1, r"c\.idx: truncated: .* take 114 bytes, but the file has 113"),
])
def test_truncated_index(tmp_path, keep, message):
    _, idx_path = write_pair(tmp_path / "c", DOCS, np.uint16)
    idx_path.write_bytes(idx_path.read_bytes()[:keep])
    with pytest.raises(DataError, match=message):
        IndexedDataset(idx_path)


def test_trailing_bytes_and_multimodal_modes_are_refused(tmp_path):
    write_pair(tmp_path / "m", DOCS, np.uint16, extra=bytes(N))  # an int8 mode per sequence
    with pytest.raises(DataError, match=r"m\.idx: holds a per-sequence modes array \(a multimodal dataset\)"):
        IndexedDataset(tmp_path / "m")
    write_pair(tmp_path / "t", DOCS, np.uint16, extra=b"\x00")
    with pytest.raises(DataError, match=r"t\.idx: 1 unexpected bytes after the index arrays"):
        IndexedDataset(tmp_path / "t")


@pytest.mark.parametrize("change", ["truncate", "extend"])
def test_bin_size_must_match_the_index(tmp_path, change):
    bin_path, _ = write_pair(tmp_path / "s", DOCS, np.int32)
    raw = bin_path.read_bytes()
    bin_path.write_bytes(raw[:-4] if change == "truncate" else raw + b"\x00" * 4)
    size = 264 - 4 if change == "truncate" else 264 + 4
    with pytest.raises(DataError, match=rf"s\.bin: {size} bytes, but its index s\.idx describes 66 int32 tokens "
                                        r"= 264 bytes"):
        IndexedDataset(bin_path)


def test_an_empty_dataset(tmp_path):
    with IndexedWriter(tmp_path / "e", np.uint16) as w:
        pass
    ds = IndexedDataset(tmp_path / "e")
    assert len(ds) == 0 and ds.num_tokens == 0 and ds.document_lengths().tolist() == []


def test_megatron_reads_ours_and_we_read_megatrons(tmp_path):
    pytest.importorskip("torch")
    indexed = pytest.importorskip("megatron.core.datasets.indexed_dataset")
    import torch

    for dtype in (np.uint16, np.int32):
        theirs = str(tmp_path / f"theirs_{np.dtype(dtype).name}")
        builder = indexed.IndexedDatasetBuilder(theirs + ".bin", dtype=dtype)
        for doc in DOCS:
            for seq in doc:
                builder.add_item(torch.tensor(seq))
            builder.end_document()
        builder.finalize(theirs + ".idx")
        ds = IndexedDataset(theirs)
        assert [ds.document(k).tolist() for k in range(len(ds))] == [flat(doc) for doc in DOCS]
        assert ds.dtype == np.dtype(dtype)

        ours = str(tmp_path / f"ours_{np.dtype(dtype).name}")
        with IndexedWriter(ours, dtype) as w:
            for doc in DOCS:
                w.add_document(np.array(flat(doc)))
        assert (tmp_path / f"ours_{np.dtype(dtype).name}.idx").read_bytes() == _megatron_idx(indexed, torch, dtype,
                                                                                              tmp_path)
        mds = indexed.IndexedDataset(ours)
        starts = mds.document_indices
        got = [np.concatenate([mds[i] for i in range(starts[k], starts[k + 1])]).tolist() for k in range(len(DOCS))]
        assert got == [flat(doc) for doc in DOCS] and mds.index.dtype == dtype


def _megatron_idx(indexed, torch, dtype, tmp_path) -> bytes:
    """Megatron's .idx for DOCS written one sequence per document, as ours writes them."""
    prefix = str(tmp_path / f"flat_{np.dtype(dtype).name}")
    builder = indexed.IndexedDatasetBuilder(prefix + ".bin", dtype=dtype)
    for doc in DOCS:
        builder.add_item(torch.tensor(flat(doc)))
        builder.end_document()
    builder.finalize(prefix + ".idx")
    return (tmp_path / f"flat_{np.dtype(dtype).name}.idx").read_bytes()
