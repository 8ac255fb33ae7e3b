"""Mixtures and pre-tokenized corpora through launch/pretrain.py, as a user runs them (docs/data.md#mixtures): a
3-source mixture (JSON Lines and two indexed datasets) at 1, 2 and 4 processes with the same losses and per-source
counts exactly the blend's, a 2-process checkpoint resumed at 4 processes, JSON Lines -> launch/tokenize.py ->
training with bitwise the losses of training on the JSON Lines, and bad input stopped with one line before any
process group starts."""

from __future__ import annotations

import json
import re
import subprocess
import sys

import numpy as np
import pytest

from data.indexed import IndexedWriter
from data.loader import Blend
from tests.data.test_indexed import write_pair
from tests.trainer.test_pretrain_e2e import ROOT, _ok, metrics, run_pretrain

WEIGHTS = {"web": 0.5, "code": 0.3, "math": 0.2}
STEPS, GLOBAL_BATCH, SEQ = 6, 4, 64  # the smoke experiment's


def _write_bin(prefix, low: int, high: int, docs: int, seed: int):
    """An indexed dataset of random documents, by the project's writer."""
    rng = np.random.default_rng(seed)
    with IndexedWriter(prefix, np.uint16) as writer:
        for _ in range(docs):
            writer.add_document(rng.integers(low, high, rng.integers(10, 200)))
    return prefix.with_suffix(".bin")


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    """A JSON Lines source and two indexed ones (token ids of their own ranges; math is small: it wraps around).
    math is written by the test's own writer, from the format's description alone, its documents of two sequences
    each (tests/data/test_indexed.py)."""
    root = tmp_path_factory.mktemp("mixture")
    with open(root / "web.jsonl", "w") as f:
        for i in range(300):
            f.write(json.dumps({"text": f"web page {i}: " + "lorem ipsum dolor " * (i % 13 + 1)}) + "\n")
    rng = np.random.default_rng(1)
    math = [[rng.integers(1000, 2000, rng.integers(5, 15)).tolist() for _ in range(2)] for _ in range(12)]
    return {"web": root / "web.jsonl", "code": _write_bin(root / "code", 300, 1000, 200, 0),
            "math": write_pair(root / "math", math, np.uint16)[0]}


def mixture(paths: dict) -> str:
    return "data.mixture=[" + ",".join(f"{{name:{name},paths:[{paths[name]}],weight:{WEIGHTS[name]}}}"
                                       for name in WEIGHTS) + "]"


def train(run, cache_dir, paths: dict, nproc: int = 1, *extra: str) -> tuple[dict[int, dict], str]:
    """metrics.jsonl by step, and the log."""
    proc = _ok(run_pretrain(run, cache_dir, "data=files", mixture(paths), "trainer.micro_batch_size=1", *extra,
                            nproc=nproc))
    return metrics(run), proc.stdout


@pytest.fixture(scope="module")
def one_process(tmp_path_factory, cache_dir, corpus):
    run = tmp_path_factory.mktemp("one") / "run"
    return (run, *train(run, cache_dir, corpus))


def test_a_mixture_trains_the_same_at_1_2_and_4_processes_with_the_blend_counts(tmp_path, cache_dir, corpus,
                                                                                 one_process):
    _, one, log = one_process
    blend = Blend(list(WEIGHTS.values()))
    for step in range(1, STEPS + 1):  # metrics.jsonl: tokens of each source so far, each within one row of its share
        for _ in range(GLOBAL_BATCH):
            blend.next()
        assert one[step]["tokens_by_source"] == {name: count * SEQ for name, count in zip(WEIGHTS, blend.counts)}
    assert one[STEPS]["tokens_by_source"] == {"web": 12 * SEQ, "code": 7 * SEQ, "math": 5 * SEQ}
    assert re.search(r"data: source math starts its epoch \d+ at step 1 ", log)  # a document or two per shard
    two, _ = train(tmp_path / "two", cache_dir, corpus, 2)
    four, _ = train(tmp_path / "four", cache_dir, corpus, 4)
    for step in range(1, STEPS + 1):
        assert one[step]["tokens_by_source"] == two[step]["tokens_by_source"] == four[step]["tokens_by_source"]
        for other in (two, four):  # the same rows; sums over other process counts round differently
            assert other[step]["loss"] == pytest.approx(one[step]["loss"], rel=1e-5, abs=0), step

    resumed = tmp_path / "resumed"  # the 2-process step-3 checkpoint, mid-epoch of every source, at 4 processes
    out = _ok(run_pretrain(resumed, cache_dir, "data=files", mixture(corpus), "trainer.micro_batch_size=1",
                           f"checkpoint.resume={tmp_path / 'two' / 'checkpoints' / 'step_00000003'}", nproc=4)).stdout
    assert "resumed from" in out
    after = metrics(resumed)
    assert sorted(after) == [4, 5, 6]
    for step in (4, 5, 6):
        assert after[step]["tokens_by_source"] == one[step]["tokens_by_source"]
        assert after[step]["loss"] == pytest.approx(one[step]["loss"], rel=1e-5, abs=0), step


def test_jsonl_through_the_tokenize_job_trains_bitwise_as_the_jsonl(tmp_path, cache_dir, corpus, one_process):
    out = tmp_path / "tokenized"
    job = subprocess.run([sys.executable, str(ROOT / "launch" / "tokenize.py"), str(corpus["web"]), "--out", str(out),
                          "--cache-dir", str(cache_dir), "--workers", "1"], capture_output=True, text=True,
                         timeout=300)
    assert job.returncode == 0, job.stderr[-3000:]
    shards = sorted(out.glob("*.bin"))
    assert len(shards) == 1 and shards[0].name.endswith("web.jsonl.bin")
    _, one, _ = one_process
    pretokenized, _ = train(tmp_path / "bin", cache_dir, {**corpus, "web": out / "*"})  # manifest.json is no input
    for step in range(1, STEPS + 1):
        assert pretokenized[step]["loss"] == one[step]["loss"], step  # bitwise
        assert pretokenized[step]["grad_norm"] == one[step]["grad_norm"], step


def test_bad_input_stops_with_one_line_before_anything_starts(tmp_path, cache_dir, corpus):
    broken = tmp_path / "broken.bin"
    broken.write_bytes(corpus["code"].read_bytes()[:-10])  # a .bin shorter than its .idx says
    (tmp_path / "broken.idx").write_bytes(corpus["code"].with_suffix(".idx").read_bytes())
    (tmp_path / "lonely.idx").write_bytes(corpus["code"].with_suffix(".idx").read_bytes())
    cases = [({**corpus, "code": broken}, [], r"data error: .*broken\.bin: \d+ bytes, but its index"),
             ({**corpus, "code": tmp_path / "lonely.idx"}, [], r"data error: .*lonely\.idx has no lonely\.bin beside"),
             ({**corpus, "math": tmp_path / "none*.bin"}, [], r"data error: data\.mixture\[math\]\.paths: .* matches "
                                                              r"no file"),
             (corpus, ["data.paths=[x.jsonl]"], r"config error: data.paths and data.mixture are exclusive")]
    for i, (paths, extra, message) in enumerate(cases):
        run = tmp_path / f"bad{i}"
        proc = run_pretrain(run, cache_dir, "data=files", mixture(paths), *extra, timeout=120)
        assert proc.returncode == 2 and len(proc.stderr.strip().splitlines()) == 1, (i, proc.stderr[-2000:])
        assert re.search(message, proc.stderr), (i, proc.stderr)
        assert not (run / "checkpoints").exists()


def test_bad_records_are_judged_on_the_whole_jobs_counts(tmp_path, cache_dir):
    """Two processes: one truncated line among 200 records is counted once and the run trains on; a file with one
    record in five broken stops with the job's count, summed over the ranks with the step's statistics."""
    rows = [json.dumps({"text": f"record {i}: " + "word " * (i % 7 + 1)}) for i in range(200)]
    one_bad = tmp_path / "one_bad.jsonl"
    one_bad.write_text("\n".join(rows[:2] + ['{"text": "trunc'] + rows[3:]) + "\n")
    run = tmp_path / "ok"
    _ok(run_pretrain(run, cache_dir, "data=files", f"data.paths=[{one_bad}]", "data.bad_check_after=20",
                     "data.max_bad_fraction=0.05", "trainer.micro_batch_size=1", nproc=2))
    assert metrics(run)[STEPS]["bad_records"] == 1
    many_bad = tmp_path / "many_bad.jsonl"
    many_bad.write_text("\n".join("{broken" if i % 5 == 0 else row for i, row in enumerate(rows)) + "\n")
    proc = run_pretrain(tmp_path / "stop", cache_dir, "data=files", f"data.paths=[{many_bad}]",
                        "data.bad_check_after=20", "trainer.micro_batch_size=1", nproc=2)
    assert proc.returncode != 0
    assert re.search(r"data error: data: \d+ of \d+ records read were unusable \(2\d\.\d%, above "
                     r"data.max_bad_fraction=0.01\); by reason \(this rank's share\)", proc.stderr), proc.stderr[-3000:]
