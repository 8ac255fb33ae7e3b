"""Weighted mixtures (docs/data.md#mixtures): each global row from one source, per-source counts within one of weight
x rows and exactly the blend's, the same global batches at 1, 2 and 4 ranks, exact resume mid-epoch of every source
at the same and at other process counts, capped epochs, a one-source mixture equal to data.paths, and bad records
counted once."""

from __future__ import annotations

import random

import numpy as np
import pytest

from data.config import DataConfig, MixtureSource
from data.indexed import IndexedWriter
from data.loader import Blend, build_loader, check_bad_fraction
from data.sources import BadRecords, DataError, SourceExhausted
from tests.data.conftest import write_jsonl
from tests.data.test_order import GLOBAL_BATCH, MICRO, _close, _loaders, _merged, _rows, _steps

# Token-id ranges that tell a row's source: the JSON Lines source's BPE ids are below 400, the indexed ones above.
BIN_RANGES = {"code": (400, 500), "math": (500, 600)}
VOCAB = 600


def test_blend_counts_stay_within_one_of_weight_times_rows():
    rng = random.Random(0)
    for trial in range(30):
        weights = [rng.uniform(0.01, 5) for _ in range(rng.randint(2, 6))]
        blend, total = Blend(weights), sum(weights)
        for n in range(1, 3001):
            blend.next()
            assert all(abs(c - w / total * n) < 1 for c, w in zip(blend.counts, weights)), (trial, n, weights)


def _bin(path, low: int, high: int, docs: int, seed: int):
    rng = np.random.default_rng(seed)
    with IndexedWriter(path, np.uint16) as writer:
        for _ in range(docs):
            writer.add_document(rng.integers(low, high, rng.integers(3, 30)).astype(np.int32))
    return path.parent / (path.name + ".bin")


@pytest.fixture
def mixture_cfg(tmp_path):
    web = write_jsonl(tmp_path / "web.jsonl", [{"text": f"document {i}: " + "word " * (i % 9 + 1)}
                                               for i in range(120)])
    code = [_bin(tmp_path / f"code{i}", *BIN_RANGES["code"], 40, i) for i in range(2)]
    math = _bin(tmp_path / "math", *BIN_RANGES["math"], 15, 9)  # small: several epochs in a test
    mixture = [MixtureSource("web", [str(web)], 0.5), MixtureSource("code", [str(p) for p in code], 0.3),
               MixtureSource("math", [str(math)], 0.2)]
    return DataConfig(source="files", mixture=mixture, seq_len=16, shuffle_buffer=16, docs_per_chunk=3, prefetch=2,
                      shards=4, cache_dir=str(tmp_path / "cache"))


def _source_of(row: np.ndarray) -> str:
    for name, (low, high) in BIN_RANGES.items():
        if ((row >= low) & (row < high)).all():
            return name
    assert (row < 400).all(), row  # a row never mixes sources
    return "web"


def _mixture_loaders(cfg, tokenizer, world, state=None):
    loaders = [build_loader(cfg, tokenizer, MICRO, 3, rank, world, vocab_limit=VOCAB) for rank in range(world)]
    for loader in loaders:
        if state is not None:
            loader.load_state_dict(state)
    return loaders


def test_three_sources_at_1_2_and_4_ranks_follow_the_weights_exactly(mixture_cfg, bpe):
    runs = {}
    for world in (1, 2, 4):
        loaders = _mixture_loaders(mixture_cfg, bpe, world)
        runs[world] = np.concatenate(_steps(loaders, 12))
        assert all(loader.rows_by_source == loaders[0].rows_by_source for loader in loaders)
        reported = loaders[0].rows_by_source
        _close(loaders)
        counted = {name: 0 for name in ("web", "code", "math")}
        blend = Blend([0.5, 0.3, 0.2])
        for n, row in enumerate(runs[world]):
            expected = ("web", "code", "math")[blend.next()]
            assert _source_of(row) == expected, (world, n)  # row by row, the blend's choice
            counted[expected] += 1
            assert all(abs(counted[s] - w * (n + 1)) < 1 for s, w in (("web", .5), ("code", .3), ("math", .2)))
        assert counted == reported == {"web": 48, "code": 29, "math": 19}  # 96 rows
    np.testing.assert_array_equal(runs[2], runs[1])
    np.testing.assert_array_equal(runs[4], runs[1])


def test_resume_mid_epoch_of_every_source_is_exact_at_the_same_and_other_process_counts(mixture_cfg, bpe, tmp_path):
    straight = _mixture_loaders(mixture_cfg, bpe, 1)
    expected = np.concatenate(_steps(straight, 16))
    epochs, smallest = straight[0].source_epochs, straight[0].epoch
    _close(straight)
    assert epochs["math"] >= 1 and epochs["web"] == 0 and smallest == 0  # math wrapped around, web is mid-pass

    loaders = _mixture_loaders(mixture_cfg, bpe, 2)
    stream = _steps(loaders, 5)
    state = _merged(loaders, tmp_path / "step5")
    assert set(state["shards"]) == {f"{c}/{name}" for c in range(4) for name in ("web", "code", "math")}
    _close(loaders)
    for world in (2, 4, 1):  # the same layout, then others; each continues from step 5
        loaders = _mixture_loaders(mixture_cfg, bpe, world, state)
        assert loaders[0].rows_by_source == {"web": 20, "code": 12, "math": 8}
        np.testing.assert_array_equal(np.concatenate(stream + _steps(loaders, 11)), expected, err_msg=str(world))
        _close(loaders)


def test_a_capped_source_stops_the_run_when_used_up(mixture_cfg, bpe):
    mixture_cfg.mixture[2].epochs = 1
    loader = build_loader(mixture_cfg, bpe, MICRO, 3, vocab_limit=VOCAB)
    with pytest.raises(SourceExhausted, match=r"data.mixture\[math\]: all 1 epoch\(s\) of this source are used up"):
        for _ in range(200):
            next(loader)
    loader.close()


def test_a_one_source_mixture_reads_exactly_as_data_paths(tmp_path, bpe):
    corpus = write_jsonl(tmp_path / "c.jsonl", [{"text": f"doc {i}: " + "word " * (i % 7)} for i in range(80)])
    common = dict(source="files", seq_len=16, shuffle_buffer=16, docs_per_chunk=3, cache_dir=str(tmp_path / "c"))
    plain = DataConfig(paths=[str(corpus)], **common)
    mixed = DataConfig(mixture=[MixtureSource("all", [str(corpus)], 2.0)], **common)
    a, b = (build_loader(cfg, bpe, MICRO, 7) for cfg in (plain, mixed))
    for _ in range(10):
        np.testing.assert_array_equal(_rows(next(a)), _rows(next(b)))
    a.close(), b.close()


def test_token_ids_past_the_vocabulary_stop_naming_the_file(mixture_cfg, bpe):
    loader = build_loader(mixture_cfg, bpe, MICRO, 3, vocab_limit=550)
    with pytest.raises(DataError, match=r"math.bin: document \d+ holds token id 5\d\d, outside the model's "
                                        r"vocabulary of 550 ids"):
        for _ in range(20):
            next(loader)
    loader.close()


@pytest.mark.parametrize("world", [1, 2])
def test_one_bad_line_in_200_records_counts_once_and_every_good_record_trains(tmp_path, bpe, world):
    """The reported case: 200 records, one truncated line, 8 shards, many epochs: counted once, no stop."""
    rows = [{"text": f"record {i} " + "word " * (i % 5)} for i in range(199)] + ['{"text": "trunc']
    cfg = DataConfig(source="files", paths=[str(write_jsonl(tmp_path / "small.jsonl", rows))], seq_len=16,
                     shuffle_buffer=8, docs_per_chunk=4, cache_dir=str(tmp_path / "c"), bad_check_after=20)
    loaders = _loaders(cfg, bpe, world)
    for _ in range(60):  # about 6 passes over the file (80 rows each)
        _steps(loaders, 1)
    assert min(loader.epoch for loader in loaders) >= 2
    bad = [loader.bad_records for loader in loaders]
    assert sum(sum(b["counts"].values()) for b in bad) == 1
    assert [e.split(" (")[0] for b in bad for e in b["examples"]] == [f"{tmp_path / 'small.jsonl'}:200: malformed JSON"]
    assert sum(b["good"] for b in bad) == 199
    _close(loaders)
    with pytest.raises(DataError, match=r"1 of 50 records read were unusable \(2.0%.*this rank's share"):
        check_bad_fraction(cfg, BadRecords.from_state(bad[0]), 1, 49)  # what the trainer does with the sums: 2%
    check_bad_fraction(cfg, BadRecords.from_state(bad[0]), 1, 199)  # 0.5%: trains on


@pytest.mark.parametrize("change,message", [
    (lambda m: m.__setitem__(1, MixtureSource("web", ["x"], 1.0)), r"the name 'web' is used by 2 sources"),
    (lambda m: setattr(m[0], "weight", -0.1), r"data.mixture\[web\].weight=-0.1: must be > 0"),
    (lambda m: [setattr(s, "weight", 0.0) for s in m], r"the weights \[0.0, 0.0, 0.0\] sum to 0"),
    (lambda m: setattr(m[1], "weight", None), r"data.mixture\[code\].weight: missing"),
    (lambda m: setattr(m[2], "paths", []), r"data.mixture\[math\].paths: empty"),
    (lambda m: setattr(m[2], "epochs", 0), r"data.mixture\[math\].epochs=0: must be >= 1"),
])
def test_bad_mixtures_are_refused_naming_the_source(mixture_cfg, change, message):
    change(mixture_cfg.mixture)
    with pytest.raises(ValueError, match=message):
        mixture_cfg.validate()


def test_paths_and_mixture_are_exclusive(mixture_cfg):
    mixture_cfg.paths = ["a.jsonl"]
    with pytest.raises(ValueError, match="data.paths and data.mixture are exclusive"):
        mixture_cfg.validate()


def test_a_huge_document_is_tokenized_in_pieces_and_never_held_in_the_state(tmp_path, bpe, monkeypatch):
    """A document far longer than a piece (here 60,000 characters against pieces of 2,000, as a 50 MB line against
    the default 256 Ki): its ids are one call's, every checkpointed state holds less than a row of them, and a
    resume from any of those states continues row for row."""
    import data.tokenizer

    monkeypatch.setattr(data.tokenizer, "PIECE_CHARS", 2000)
    monkeypatch.setattr(data.tokenizer, "BATCH_CHARS", 8000)
    huge = "".join(f"line {i} of the huge document:\n    with words, indented\n\n" for i in range(1100))
    assert len(huge) > 60_000 and len(data.tokenizer.document_pieces(huge)) > 30
    tokens = bpe.encode_documents([huge])[0]
    whole = np.append(bpe.encode_batch([huge])[0], bpe.eos_id)
    np.testing.assert_array_equal(tokens, whole)  # cut where the pre-tokenizer cuts: one call's ids exactly
    rows = [{"text": "small one"}, {"text": huge}, {"text": "small two"}]
    cfg = DataConfig(source="files", paths=[str(write_jsonl(tmp_path / "huge.jsonl", rows))], seq_len=16,
                     shuffle_buffer=1, shards=1, docs_per_chunk=2, cache_dir=str(tmp_path / "c"))
    loader = build_loader(cfg, bpe, 4, 0)
    states, batches = [], []
    for _ in range(40):
        batches.append(_rows(next(loader)))
        states.append(loader.state_dict())
    loader.close()
    for k in (0, 17, 39):
        packer = states[k]["shards"]["0"]["packer"]
        assert len(packer["carry"]) <= 16 and packer["consumed"] >= 16 * (k + 1)  # cutting the huge document
        resumed = build_loader(cfg, bpe, 4, 0)
        resumed.load_state_dict(states[k])
        for expected in batches[k + 1:k + 4]:
            np.testing.assert_array_equal(_rows(next(resumed)), expected)
        resumed.close()


def test_shards_made_with_another_tokenizer_or_past_the_vocabulary_are_refused_before_training(tmp_path, bpe):
    from data.loader import check_inputs
    from data.manifest import write_manifest

    (tmp_path / "tok").mkdir()
    shard = _bin(tmp_path / "tok" / "00000-a.jsonl", 3, 390, 10, 0)
    cfg = DataConfig(source="files", paths=[str(tmp_path / "tok" / "*")], cache_dir=str(tmp_path / "c"))

    def manifest(identity, max_id):
        write_manifest(shard.parent, identity, {shard.name: {"documents": 10, "max_token_id": max_id}}, {})

    manifest(bpe.identity(), 389)
    assert check_inputs(cfg, bpe, 400) == {"data": [shard]}  # manifest.json is no input; all is well
    with pytest.raises(DataError, match=r"holds token ids up to 389 \(its manifest\), at or past the model's "
                                        r"vocabulary of 300 ids"):
        check_inputs(cfg, bpe, 300)
    manifest({**bpe.identity(), "sha256": "0" * 64, "source": "/elsewhere/tokenizer.json"}, 389)
    with pytest.raises(DataError, match=r"/elsewhere/tokenizer.json.*" + bpe.source.replace("/", ".")):
        check_inputs(cfg, bpe, 400)
