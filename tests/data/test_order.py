"""The data order does not depend on the layout: the same global batches at 1, 2 and 4 data-parallel ranks, every
record used exactly once across resumes at other process counts (by sample ids), per-rank figures that sum to the
single-process ones, and clear refusals of a data state that cannot be continued."""

from __future__ import annotations

from collections import Counter

import numpy as np
import pytest
import torch

from data.config import DataConfig
from data.loader import build_loader, epoch_rows, merge_data_states
from data.sources import DataError
from data.tokenizer import load_tokenizer
from tests.data.conftest import write_jsonl
from trainer.checkpoint import load_state, save_state

GLOBAL_BATCH, MICRO = 8, 2


def _cfg(tmp_path, paths, **kw) -> DataConfig:
    return DataConfig(**{"source": "files", "paths": [str(p) for p in paths], "seq_len": 16, "shuffle_buffer": 4,
                         "docs_per_chunk": 3, "prefetch": 2, "cache_dir": str(tmp_path / "cache"), **kw})


def _rows(batch: dict) -> np.ndarray:
    """(B, seq_len + 1) token rows of a pretraining micro-batch."""
    return torch.cat((batch["input_ids"], batch["labels"][:, -1:]), dim=1).numpy()


def _loaders(cfg, tokenizer, world: int, seed: int = 3, state: dict | None = None) -> list:
    loaders = [build_loader(cfg, tokenizer, MICRO, seed, rank, world) for rank in range(world)]
    if state is not None:
        for loader in loaders:
            loader.load_state_dict(state)
    return loaders


def _steps(loaders: list, steps: int) -> list[np.ndarray]:
    """The global rows of `steps` optimizer steps, in global order: rank r's k-th row is global row r + world * k."""
    world, accumulation = len(loaders), GLOBAL_BATCH // (MICRO * len(loaders))
    out = []
    for _ in range(steps):
        per_rank = [np.concatenate([_rows(next(loader)) for _ in range(accumulation)]) for loader in loaders]
        step = np.empty((GLOBAL_BATCH, per_rank[0].shape[1]), per_rank[0].dtype)
        for rank, rows in enumerate(per_rank):
            step[rank::world] = rows
        out.append(step)
    return out


def _merged(loaders: list, directory=None) -> dict:
    """All ranks' states merged; with `directory`, through checkpoint files as the trainer writes them."""
    if directory is None:
        return merge_data_states([loader.state_dict() for loader in loaders])
    directory.mkdir(exist_ok=True)
    for rank, loader in enumerate(loaders):
        save_state(directory, f"data_rank{rank:05d}", loader.state_dict())
    names = [f"data_rank{rank:05d}" for rank in range(len(loaders))]
    return merge_data_states([load_state(directory, name) for name in names], names)


def _close(loaders: list) -> None:
    for loader in loaders:
        loader.close()


@pytest.mark.parametrize("shards", [8, 3])  # a multiple of every world size, and one that none divides but 1
def test_global_batches_are_the_same_at_1_2_and_4_ranks(tmp_path, bpe, shards):
    corpus = write_jsonl(tmp_path / "corpus.jsonl", [{"text": f"document {i}: " + "word " * (i % 9 + 1)}
                                                     for i in range(150)])
    cfg = _cfg(tmp_path, [corpus], shards=shards)
    runs = {}
    for world in (1, 2, 4):
        loaders = _loaders(cfg, bpe, world)
        runs[world] = _steps(loaders, 6)
        _close(loaders)
    for world in (2, 4):
        for s, (one, other) in enumerate(zip(runs[1], runs[world])):
            assert sorted(r.tobytes() for r in one) == sorted(r.tobytes() for r in other), (world, s)
        np.testing.assert_array_equal(np.stack(runs[world]), np.stack(runs[1]))  # and in the same global order
    assert len({r.tobytes() for step in runs[1] for r in step}) > 6 * GLOBAL_BATCH / 2  # real, varied rows


def test_validation_rows_follow_the_same_order_unshuffled(tmp_path, bpe):
    """Validation reads its held-out records in file order, as one shard whatever data.shards is, and each rank
    keeps its rows of the same global order."""
    docs = [{"text": f"held out {i}: " + "word " * (i % 5 + 1)} for i in range(40)]
    val = write_jsonl(tmp_path / "val.jsonl", docs)
    cfg = _cfg(tmp_path, [val], val_paths=[str(val)], shards=64)  # more shards than held-out records

    def global_rows(world):
        loaders = [build_loader(cfg, bpe, MICRO, 3, rank, world, split="val") for rank in range(world)]
        rows = _steps(loaders, 2)
        _close(loaders)
        return np.concatenate(rows)

    one = global_rows(1)
    np.testing.assert_array_equal(global_rows(2), one)
    expected = np.concatenate([np.append(x, bpe.eos_id) for x in bpe.encode_batch([d["text"] for d in docs])])
    np.testing.assert_array_equal(global_rows(2).ravel(), expected[:2 * GLOBAL_BATCH * 17])


# ------------------------------------------------------------------------------------- exactly once, by sample ids
N_DOCS = 300


@pytest.fixture(scope="module")
def id_tokenizer(tmp_path_factory):
    """A word-level tokenizer in which document i's id word `d<i>` is token 3 + i: every row shows which documents
    it holds (EOS `</s>` follows each document; no BOS)."""
    from tokenizers import Tokenizer
    from tokenizers.models import WordLevel
    from tokenizers.pre_tokenizers import WhitespaceSplit

    vocab = {"<unk>": 0, "</s>": 1, "<pad>": 2, **{f"d{i}": 3 + i for i in range(N_DOCS)}, "w": 3 + N_DOCS}
    tokenizer = Tokenizer(WordLevel(vocab, unk_token="<unk>"))
    tokenizer.pre_tokenizer = WhitespaceSplit()
    path = tmp_path_factory.mktemp("ids") / "tokenizer.json"
    tokenizer.save(str(path))
    return load_tokenizer(path)


def _ids(tokens: np.ndarray) -> list[int]:
    tokens = np.asarray(tokens).ravel()
    return [int(t) - 3 for t in tokens if 3 <= t < 3 + N_DOCS]


@pytest.mark.parametrize("shards,shuffle_buffer", [(4, 4), (3, 1)])
def test_every_record_once_per_epoch_across_resumes_at_other_process_counts(tmp_path, id_tokenizer, shards,
                                                                           shuffle_buffer):
    """2 ranks for 3 steps, then 1 rank for 3 steps, then 4 ranks past the end of the first epoch, each resume from
    the merged states of all ranks (through checkpoint files, as the trainer writes them): the rows equal those of one
    uninterrupted process, row for row, and every document is used once per pass (ids, counted per shard: what was
    handed out plus what the packer and the shuffle buffer still hold is the shard's records once per pass read up
    to the chunk being cut, plus the part of that chunk already cut)."""
    rows = [{"id": i, "text": f"d{i}" + " w" * (i % 5)} for i in range(N_DOCS)]
    corpus = write_jsonl(tmp_path / "ids.jsonl", rows)
    cfg = _cfg(tmp_path, [corpus], shards=shards, shuffle_buffer=shuffle_buffer)

    loaders = _loaders(cfg, id_tokenizer, 2)
    stream = _steps(loaders, 3)
    state = _merged(loaders, tmp_path / "step3")
    _close(loaders)
    loaders = _loaders(cfg, id_tokenizer, 1, state=state)
    stream += _steps(loaders, 3)
    state = _merged(loaders, tmp_path / "step6")
    _close(loaders)
    loaders = _loaders(cfg, id_tokenizer, 4, state=state)
    for _ in range(50):  # until every document was handed out (the first epoch is over)
        if set(_ids(np.concatenate(stream))) == set(range(N_DOCS)):
            break
        stream += _steps(loaders, 1)
    state = _merged(loaders)
    _close(loaders)
    stream = np.concatenate(stream)
    assert state["global_rows"] == len(stream) and set(_ids(stream)) == set(range(N_DOCS))

    straight = _loaders(cfg, id_tokenizer, 1)
    np.testing.assert_array_equal(np.concatenate(_steps(straight, len(stream) // GLOBAL_BATCH)), stream)
    _close(straight)

    first_pass = Counter()
    for c in range(shards):
        shard = state["shards"][str(c)]
        emitted = _ids(stream[c::shards])  # global row n is the next row of shard n mod C
        packer = shard["packer"]  # the chunk being cut starts at `position`: held, the carry not yet cut
        held = _ids(packer["carry"][packer["consumed"]:]) + (_ids(shard["buffer"]["rows"]["tokens"])
                                                             if shard["buffer"]["count"] else [])
        position = shard["position"]  # reading pass `epoch`, `line` records of which are read
        mine = [i for i in range(N_DOCS) if i % shards == c]
        read = mine * position["epoch"] + [i for i in mine if i < position["line"]]
        seen = Counter(emitted + held)
        assert not Counter(read) - seen, c  # every record read before the chunk: handed out or still held
        assert set(seen - Counter(read)) <= set(mine), c  # the rest: records of the chunk, which are the shard's
        if shuffle_buffer == 1:  # rows in record order: the shard's first pass is a prefix of what it handed out
            assert emitted[:len(mine)] == mine
        first_pass.update(mine)
    assert first_pass == Counter(range(N_DOCS))  # the shards' first passes: every document once, none missing


def test_rows_per_epoch_and_bad_records_sum_over_ranks_to_the_one_process_figures(tmp_path, bpe):
    docs = [{"text": f"document {i}: " + "word " * (i % 7 + 1)} if i % 10 else "{broken" for i in range(120)]
    cfg = _cfg(tmp_path, [write_jsonl(tmp_path / "c.jsonl", docs)], shards=4, docs_per_chunk=1,
               max_bad_fraction=0.5)
    figures = {}
    for world in (1, 2, 3):
        rows = sum(epoch_rows(cfg, bpe, 3, rank, world) for rank in range(world))
        loaders = _loaders(cfg, bpe, world)
        for _ in range(48 // (MICRO * world)):  # 48 global rows: micro-batches of 2, each rank in turn
            for loader in loaders:
                next(loader)
        bad = [loader.bad_records for loader in loaders]
        figures[world] = (rows, sum(sum(b["counts"].values()) for b in bad), sum(b["good"] for b in bad))
        _close(loaders)
    assert figures[1][1] > 0 and figures[1] == figures[2] == figures[3]
    assert figures[1][0] > 20


# ------------------------------------------------------------------------------------------------- refusals
def test_a_data_state_that_cannot_continue_is_refused_naming_why(tmp_path, bpe):
    corpus = write_jsonl(tmp_path / "corpus.jsonl", [{"text": f"document {i}: " + "word " * (i % 9 + 1)}
                                                     for i in range(60)])
    cfg = _cfg(tmp_path, [corpus], shards=4)
    loaders = _loaders(cfg, bpe, 2)
    for loader in loaders:
        next(loader)
    states = [loader.state_dict() for loader in loaders]  # 2 micro-batches of 2 on each of 2 ranks: 4 rows
    assert sorted(states[0]["shards"]) == ["0", "2"] and sorted(states[1]["shards"]) == ["1", "3"]
    for loader in loaders:
        next(loader)
    later = loaders[1].state_dict()
    _close(loaders)

    with pytest.raises(DataError, match=r"lacks shard\(s\) 1, 3 of data.shards=4 .*data_rank file missing"):
        build_loader(cfg, bpe, MICRO, 3).load_state_dict(states[0])
    merged = merge_data_states(states)
    with pytest.raises(DataError, match=r"after 4 global rows, which 3 data-parallel ranks cannot share out evenly: "
                                        r"resume with a process count dividing 4"):
        build_loader(cfg, bpe, MICRO, 3, rank=1, world=3).load_state_dict(merged)
    cfg.shards = 2
    with pytest.raises(DataError, match=r"saved with other settings; changed: shards: 4 -> 2"):
        build_loader(cfg, bpe, MICRO, 3).load_state_dict(merged)
    cfg.shards = 4
    with pytest.raises(DataError, match=r"disagree on the position: data state 0 is after 4 global rows, data state 1 "
                                        r"after 8"):
        merge_data_states([states[0], later])
    assert merge_data_states([states[0], states[0], states[1]])["shards"].keys() == merged["shards"].keys()  # stages
    other = loaders[0].state_dict()  # rank 0 after its second micro-batch: another position of shards 0 and 2
    other["global_rows"] = 4
    with pytest.raises(DataError, match=r"shard 0 differs between data state 0 and data state 1"):
        merge_data_states([states[0], other])
    with pytest.raises(DataError, match=r"r0\.json has the per-rank data position of an older version.*"
                                        r"data_resume=reset"):
        merge_data_states([{"position": {}, "fingerprint": {}}], names=["r0.json"])
    # the merged state, at a process count dividing 4, continues
    resumed = build_loader(cfg, bpe, MICRO, 3, rank=1, world=4)
    resumed.load_state_dict(merged)
    assert resumed.global_rows == 4 and next(resumed)["input_ids"].shape == (MICRO, 16)
    resumed.close()


def test_a_shard_without_records_names_data_shards(tmp_path, bpe):
    cfg = _cfg(tmp_path, [write_jsonl(tmp_path / "few.jsonl", [{"text": f"doc {i}"} for i in range(3)])])
    loader = build_loader(cfg, bpe, MICRO, 0)
    with pytest.raises(DataError, match=r"data shard \d of data.shards=8: .*no usable record.*lower data.shards"):
        next(loader)
    loader.close()
