"""Record sources: rank sharding without overlap, positions that resume exactly, and every bad-input case."""

from __future__ import annotations

import itertools
import json

import pytest

from data.sources import DataError, FileSource, HubSource, Position, StdlibSource, expand_globs, text_extractor
from tests.data.conftest import write_jsonl


def _epoch(source, start=None) -> list:
    """The records of one epoch from `start`."""
    return list(itertools.takewhile(lambda r: r.position.epoch == 0, source.records(start or Position())))


def _files(tmp_path, n_files=3, lines=7):
    paths = []
    for f in range(n_files):
        paths.append(write_jsonl(tmp_path / f"part{f}.jsonl", [{"text": f"doc {f}-{i}"} for i in range(lines)]))
    return paths


@pytest.mark.parametrize("world", [1, 2, 3])
def test_ranks_share_out_every_record_exactly_once(tmp_path, world):
    files = _files(tmp_path)
    seen = []
    for rank in range(world):
        source = FileSource(files, text_extractor("text"), "text", seed=5, rank=rank, world=world)
        seen.append([r.payload for r in _epoch(source)])
    flat = [t for per_rank in seen for t in per_rank]
    assert len(flat) == len(set(flat)) == 21  # no record read by two ranks, none missed
    assert all(abs(len(s) - 21 / world) <= 1 for s in seen)


def test_builtin_corpus_is_sharded_and_its_val_split_is_held_out():
    train = [StdlibSource("train", 50, seed=0, rank=r, world=2) for r in range(2)]
    names = [[r.where for r in _epoch(s)] for s in train]
    assert not set(names[0]) & set(names[1])
    val = {r.where for r in _epoch(StdlibSource("val", 50, seed=0, rank=0, world=1, shuffle=False))}
    assert val and not val & (set(names[0]) | set(names[1]))  # validation never comes from the training stream
    assert any(n.startswith("pydoc_data/") for n in names[0] + names[1])


def test_file_order_is_reshuffled_per_epoch_from_the_seed(tmp_path):
    files = _files(tmp_path, n_files=6, lines=1)
    source = FileSource(files, text_extractor("text"), "text", seed=1, rank=0, world=1)
    assert source.file_order(0) == FileSource(files, text_extractor("text"), "text", 1, 0, 1).file_order(0)
    assert source.file_order(0) != source.file_order(1)
    assert source.file_order(0) != FileSource(files, text_extractor("text"), "text", 2, 0, 1).file_order(0)


@pytest.mark.parametrize("kind", ["jsonl", "stdlib"])
def test_positions_resume_with_the_very_next_record(tmp_path, kind):
    def make():
        if kind == "stdlib":
            return StdlibSource("val", 50, seed=3, rank=1, world=2)
        return FileSource(_files(tmp_path), text_extractor("text"), "text", seed=3, rank=1, world=2)

    straight = [r.payload for r in itertools.islice(make().records(Position()), 25)]
    records = make().records(Position())
    first = list(itertools.islice(records, 9))
    state = json.loads(json.dumps(first[-1].position.state()))  # through JSON, as in a checkpoint
    rest = [r.payload for r in itertools.islice(make().records(Position.from_state(state)), 16)]
    assert [r.payload for r in first] + rest == straight  # across the epoch boundary too


def test_bad_records_are_skipped_and_counted_with_file_and_line(tmp_path):
    good = [{"text": f"good {i}"} for i in range(5)]
    path = write_jsonl(tmp_path / "mixed.jsonl", [
        "\ufeff" + json.dumps(good[0]),                 # 1: a UTF-8 BOM on the first line is fine
        '{"text": "truncated',                           # 2
        {"text": 42},                                    # 3
        {"body": "no text field"},                       # 4
        json.dumps(good[1]) + "\r",                      # 5: CRLF line ending is fine
        '{"text": NaN}',                                 # 6: NaN literal: not a string
        '{"text": "lone \\ud83d surrogate"}',            # 7
        b'{"text": "bad \xff\xfe bytes"}',               # 8
        "",                                              # 9: blank line
        {"text": "   "},                                 # 10: whitespace-only document
        {"text": ["a", "list"]},                         # 11
        '[1, 2, 3]',                                     # 12: JSON, but not an object
        good[2], {"text": "x" * 2_000_000}, good[3], good[4],   # 13-16: a 2 MB line is a valid document
    ])
    source = FileSource([path], text_extractor("text"), "text", seed=0, rank=0, world=1, shuffle_files=False)
    payloads = [r.payload for r in _epoch(source)]
    assert payloads == ["good 0", "good 1", "good 2", "x" * 2_000_000, "good 3", "good 4"]
    bad = source.bad
    assert bad.bad == 10
    expected_lines = {2: "malformed JSON", 3: "int, not a string", 4: "missing field 'text'",
                      6: "float, not a string", 7: "lone surrogate", 8: "invalid UTF-8", 9: "empty line",
                      10: "empty document", 11: "list, not a string", 12: "not an object"}
    for line, reason in expected_lines.items():
        assert any(e.startswith(f"{path}:{line}: ") and reason in e for e in bad.examples), (line, bad.examples)


def test_a_glob_that_matches_nothing_is_named(tmp_path):
    with pytest.raises(DataError, match=r"data\.paths: '.*nothing-\*\.jsonl' matches no file"):
        expand_globs([str(tmp_path / "nothing-*.jsonl")])
    (tmp_path / "weird.xyz").write_text("x")
    with pytest.raises(DataError, match="unsupported format"):
        expand_globs([str(tmp_path / "*.xyz")])


def test_a_directory_stands_for_the_supported_files_under_it(tmp_path):
    (tmp_path / "data" / "more").mkdir(parents=True)
    a = write_jsonl(tmp_path / "data" / "a.jsonl", [{"text": "x"}])
    b = write_jsonl(tmp_path / "data" / "more" / "b.jsonl", [{"text": "y"}])
    (tmp_path / "data" / "notes.yaml").write_text("not data")
    assert expand_globs([str(tmp_path / "data")]) == [a, b]
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match=r"data\.paths: '.*empty' is a directory without \.jsonl"):
        expand_globs([str(tmp_path / "empty")])


def test_a_source_with_no_usable_record_stops_instead_of_spinning(tmp_path):
    path = write_jsonl(tmp_path / "bad.jsonl", ["{oops", {"text": ""}])
    source = FileSource([path], text_extractor("text"), "text", seed=0, rank=0, world=1)
    with pytest.raises(DataError, match="no usable record"):
        next(source.records(Position()))
    path = write_jsonl(tmp_path / "other.jsonl", [{"content": "a document under another name"}] * 3)
    source = FileSource([path], text_extractor("text"), "text", seed=0, rank=0, world=1)
    with pytest.raises(DataError, match=r"lack the configured field: set data\.text_field=<field>"):
        next(source.records(Position()))


def test_parquet_rows_and_text_files(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.table({"text": [f"row {i}" for i in range(10)] + [None]}), tmp_path / "a.parquet",
                   row_group_size=3)
    (tmp_path / "b.txt").write_text("a whole text file\nwith two lines")
    (tmp_path / "c.txt").write_bytes(b"\xff\xfe not utf-8")
    files = expand_globs([str(tmp_path / "*.parquet"), str(tmp_path / "*.txt")])
    source = FileSource(files, text_extractor("text"), "text", seed=0, rank=0, world=1, shuffle_files=False)
    records = _epoch(source)
    assert [r.payload for r in records] == [f"row {i}" for i in range(10)] + ["a whole text file\nwith two lines"]
    assert source.bad.counts["missing field 'text'"] == 1 and any("c.txt" in e for e in source.bad.examples)
    resumed = FileSource(files, text_extractor("text"), "text", 0, 0, 1, shuffle_files=False)
    assert [r.payload for r in _epoch(resumed, records[4].position)] == [r.payload for r in records[5:]]


def test_hub_source_through_datasets_streaming_resumes_exactly(tmp_path):
    """The hub path, exercised offline with the `json` builder on local files."""
    files = [str(p) for p in _files(tmp_path, n_files=2, lines=6)]

    def make(rank):
        return HubSource("json", None, "train", files, text_extractor("text"), seed=0, rank=rank, world=2)

    straight = [r.payload for r in itertools.islice(make(0).records(Position()), 8)]
    other = [r.payload for r in itertools.islice(make(1).records(Position()), 6)]
    assert not set(straight[:6]) & set(other)
    records = make(0).records(Position())
    first = list(itertools.islice(records, 3))
    state = json.loads(json.dumps(first[-1].position.state()))
    rest = [r.payload for r in itertools.islice(make(0).records(Position.from_state(state)), 5)]
    assert [r.payload for r in first] + rest == straight


def test_hub_source_with_no_usable_record_stops(tmp_path):
    path = write_jsonl(tmp_path / "bad.jsonl", [{"body": f"no text {i}"} for i in range(30)])
    source = HubSource("json", None, "train", [str(path)], text_extractor("text"), seed=0, rank=0, world=1)
    with pytest.raises(DataError, match=r"whole pass over the hub dataset gave rank 0 no usable record"):
        next(source.records(Position()))
