"""launch/tokenize.py and data/manifest.py: shards that hold exactly what training would tokenize, in the input
order; bad records counted once with file:line; resuming keeps finished shards; the manifest names the tokenizer
and training refuses shards of another one."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from data.indexed import IndexedDataset, IndexedWriter, pair_paths
from data.manifest import MANIFEST, check_shard_tokenizer, read_manifest, shard_max_id
from data.sources import DataError, FileSource, Position, expand_globs, text_extractor
from data.tokenizer import load_tokenizer, train_bpe
from data import pretokenize as job

from .conftest import write_jsonl

ROOT = Path(__file__).resolve().parents[2]


def make_inputs(root: Path) -> dict[str, list[str]]:
    """JSON Lines (its first line malformed, a missing field, an empty line), a text file in a subfolder and a
    Parquet file with a null row; returns the usable texts of each file, in file order."""
    a = [f"document {i}: the quick brown fox {i * 7}" for i in range(12)]
    write_jsonl(root / "a.jsonl", ["{not json", *[{"text": t} for t in a[:5]], {"title": "no text"}, "",
                                   *[{"text": t, "id": i} for i, t in enumerate(a[5:])]])
    (root / "sub").mkdir()
    b = "a whole text file:\nthe lazy dog sleeps.\n"
    (root / "sub" / "b.txt").write_text(b)
    c = ["parquet row one over the lazy dog", None, "parquet row three"]
    pq.write_table(pa.table({"text": c}), root / "c.parquet")
    return {"a.jsonl": a, "sub/b.txt": [b], "c.parquet": [c[0], c[2]]}


@pytest.fixture
def tok(tmp_path, bpe):
    path = tmp_path / "tokenizer.json"
    bpe.save(path)
    return load_tokenizer(path)


def run_job(capsys, *argv) -> tuple[int, str, str]:
    code = job.main([str(a) for a in argv])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def documents(bin_path: Path) -> list[np.ndarray]:
    ds = IndexedDataset(bin_path)
    return [np.asarray(ds.document(k)) for k in range(len(ds))]


def test_shards_hold_what_training_tokenizes_in_the_input_order(tmp_path, tok, capsys):
    inputs, out = tmp_path / "in", tmp_path / "out"
    inputs.mkdir()
    texts = make_inputs(inputs)
    code, stdout, _ = run_job(capsys, inputs, "--out", out, "--tokenizer", tok.source, "--workers", 2)
    assert code == 0, stdout
    shards = sorted(out.glob("*.bin"))
    assert [p.name for p in shards] == ["00000-a.jsonl.bin", "00001-c.parquet.bin", "00002-sub__b.txt.bin"]
    for shard, name in zip(shards, ["a.jsonl", "c.parquet", "sub/b.txt"]):  # the input order: expand_globs'
        expected = tok.encode_documents(texts[name])
        got = documents(shard)
        assert len(got) == len(expected) and all(np.array_equal(g, e) for g, e in zip(got, expected)), name
        assert IndexedDataset(shard).dtype == np.uint16

    # Training on the shards reads the documents training on the inputs tokenizes, in the same (shuffled) order.
    def stream(paths: list[Path]) -> list:
        source = FileSource(paths, text_extractor("text"), "text", seed=3, rank=0, world=1)
        out = []
        for record in source.records(Position()):
            if record.position.epoch > 1:
                return out
            out.append(record.payload)
    from_text = tok.encode_documents(stream(expand_globs([str(inputs)])))
    from_shards = stream(expand_globs([str(out / "*.bin")]))
    assert len(from_text) == len(from_shards) == 2 * (12 + 1 + 2)
    assert all(np.array_equal(a, b) for a, b in zip(from_text, from_shards))

    # Bad records: counted once each, reported by file:line; the usable ones are all stored.
    for where in ("a.jsonl:1: malformed JSON", "a.jsonl:7: missing field 'text'", "a.jsonl:8: empty line",
                  "c.parquet:row 1: missing field 'text'"):
        assert stdout.count(where) == 1, (where, stdout)
    assert "bad records: 4 skipped" in stdout and "  2  missing field 'text'" in stdout
    assert "15 documents" in stdout and "'data.paths=[" in stdout and f"data.tokenizer={tok.source}" in stdout

    manifest = read_manifest(out)
    assert manifest["tokenizer"] == tok.identity() and manifest["settings"]["text_field"] == "text"
    entry = manifest["shards"]["00000-a.jsonl.bin"]
    a_docs = documents(out / "00000-a.jsonl.bin")
    assert entry["source"] == str((inputs / "a.jsonl").resolve())
    assert entry["source_size"] == (inputs / "a.jsonl").stat().st_size
    assert (entry["documents"], entry["tokens"], entry["bad_records"]) == (12, sum(map(len, a_docs)), 3)
    assert entry["max_token_id"] == max(int(d.max()) for d in a_docs) == shard_max_id(out / "00000-a.jsonl.bin")


def test_rerun_keeps_finished_shards_and_redoes_changed_and_unfinished_ones(tmp_path, tok, capsys):
    inputs, out = tmp_path / "in", tmp_path / "out"
    inputs.mkdir()
    texts = make_inputs(inputs)
    assert run_job(capsys, inputs, "--out", out, "--tokenizer", tok.source, "--workers", 1)[0] == 0
    past = 1_000_000_000_000_000_000
    for path in out.glob("*.[bi][id]*"):
        os.utime(path, ns=(past, past))  # a shard rewritten by the rerun gets a new mtime
    with open(inputs / "a.jsonl", "a") as f:  # an input changed since its shard was made
        f.write(json.dumps({"text": "one more fox"}) + "\n")
    (out / "00001-c.parquet.idx").unlink()  # a shard an interrupted run did not finish: .bin without .idx
    stale = out / ".00001-c.parquet.bin.12345-deadbeef.tmp"  # and that run's temporary file
    stale.write_bytes(b"partial")

    code, stdout, _ = run_job(capsys, inputs, "--out", out, "--tokenizer", tok.source, "--workers", 1)
    assert code == 0, stdout
    assert "1 shard(s) kept from an earlier run, 2 to tokenize" in stdout and "removed 1 temporary" in stdout
    assert not stale.exists()
    for suffix in (".bin", ".idx"):
        assert (out / f"00002-sub__b.txt{suffix}").stat().st_mtime_ns == past  # kept, not rewritten
        assert (out / f"00000-a.jsonl{suffix}").stat().st_mtime_ns != past
    assert [len(documents(p)) for p in sorted(out.glob("*.bin"))] == [13, 2, 1]
    assert np.array_equal(documents(out / "00001-c.parquet.bin")[1], tok.encode_documents(texts["c.parquet"])[1])
    assert read_manifest(out)["shards"]["00000-a.jsonl.bin"]["documents"] == 13

    # Another tokenizer on the same --out is refused, naming both; --overwrite re-tokenizes everything.
    other_path = tmp_path / "other.json"
    train_bpe([f"other corpus line {i}" for i in range(50)], 300).save(str(other_path))
    other = load_tokenizer(other_path)
    code, stdout, stderr = run_job(capsys, inputs, "--out", out, "--tokenizer", other_path, "--workers", 1)
    assert code == 2 and stderr.count("\n") == 1 and stderr.startswith("tokenize error:")
    assert tok.identity()["sha256"][:12] in stderr and other.identity()["sha256"][:12] in stderr
    assert "--overwrite" in stderr
    code, stdout, _ = run_job(capsys, inputs, "--out", out, "--tokenizer", other_path, "--workers", 1,
                              "--overwrite")
    assert code == 0 and "0 shard(s) kept" in stdout
    assert read_manifest(out)["tokenizer"]["sha256"] == other.identity()["sha256"]

    # Shards that are not outputs of these inputs would be read by training on DIR/*.bin: refused.
    (inputs / "c.parquet").unlink()
    code, _, stderr = run_job(capsys, inputs, "--out", out, "--tokenizer", other_path, "--workers", 1)
    assert code == 2 and "not outputs of these inputs" in stderr and "00002-sub__b.txt.bin" in stderr


def test_an_input_without_usable_records_fails_alone(tmp_path, tok, capsys):
    inputs, out = tmp_path / "in", tmp_path / "out"
    inputs.mkdir()
    write_jsonl(inputs / "a.jsonl", [{"text": "the quick brown fox"}])
    write_jsonl(inputs / "b.jsonl", [{"body": "x"}, {"body": "y"}])
    code, stdout, stderr = run_job(capsys, inputs, "--out", out, "--tokenizer", tok.source, "--workers", 1)
    assert code == 2 and stderr.count("\n") == 1
    assert "b.jsonl: no usable record" in stderr and "--text-field" in stderr
    assert [p.name for p in out.glob("*.bin")] == ["00000-a.jsonl.bin"]
    code, stdout, _ = run_job(capsys, inputs / "b.jsonl", "--out", tmp_path / "out2", "--tokenizer", tok.source,
                              "--text-field", "body", "--workers", 1)
    assert code == 0 and "2 documents" in stdout


def test_shard_names_are_unique_and_sort_in_the_input_order():
    files = [Path(p) for p in ("/d/z/b.jsonl", "/d/a.x/c.jsonl", "/d/a/b__c.jsonl", "/d/a__b/c.jsonl", "/d/a.txt")]
    names = job.shard_names(files)
    assert sorted(names) == names and len(set(names)) == len(names)
    assert names[2] == "00002-a__b__c.jsonl"
    assert all(len(n) < 255 for n in job.shard_names([Path("/d/" + "x" * 240 + "/" + "y" * 200 + ".txt")]))


def test_check_shard_tokenizer(tmp_path, tok, capsys):
    inputs, out = tmp_path / "in", tmp_path / "out"
    inputs.mkdir()
    write_jsonl(inputs / "a.jsonl", [{"text": "the quick brown fox"}])
    assert run_job(capsys, inputs, "--out", out, "--tokenizer", tok.source, "--workers", 1)[0] == 0
    shard = out / "00000-a.jsonl.bin"
    check_shard_tokenizer(shard, tok)  # the same tokenizer: accepted
    other_path = tmp_path / "other.json"
    train_bpe([f"other corpus line {i}" for i in range(50)], 300).save(str(other_path))
    other = load_tokenizer(other_path)
    with pytest.raises(DataError) as e:
        check_shard_tokenizer(shard, other)
    for text in (tok.source, tok.identity()["sha256"][:12], other.source, other.identity()["sha256"][:12],
                 "vocab 400", "vocab 300", "data.tokenizer"):
        assert text in str(e.value)
    with pytest.raises(DataError):
        check_shard_tokenizer(shard.with_suffix(".idx"), other)  # the pair named by its index

    # No manifest (a corpus made by Megatron's tools): nothing to check.
    bare = tmp_path / "bare"
    with IndexedWriter(bare / "x", np.uint16) as w:
        w.add_document(np.array([5, 6, 7]))
    check_shard_tokenizer(pair_paths(bare / "x")[0], other)
    assert read_manifest(bare) is None and shard_max_id(pair_paths(bare / "x")[0]) is None
    (bare / MANIFEST).write_text("{broken")
    with pytest.raises(DataError, match=str(bare / MANIFEST)):
        read_manifest(bare)


def test_cli_reports_a_glob_matching_nothing_in_one_line(tmp_path):
    proc = subprocess.run([sys.executable, str(ROOT / "launch" / "tokenize.py"), str(tmp_path / "none" / "*.jsonl"),
                           "--out", str(tmp_path / "out"), "--tokenizer", str(tmp_path / "tok.json")],
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.startswith("tokenize error: INPUT:") and "matches no file" in proc.stderr
    assert proc.stderr.count("\n") == 1 and "Traceback" not in proc.stderr


def test_help_describes_the_options(capsys):
    with pytest.raises(SystemExit) as e:
        job.main(["--help"])
    assert e.value.code == 0
    text = capsys.readouterr().out
    for option in ("--out", "--tokenizer", "--text-field", "--workers", "--overwrite", "--cache-dir", "--vocab-size",
                   "manifest.json", "tokenize error"):
        assert option in text
