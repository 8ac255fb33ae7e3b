"""The packed, shuffled, prefetched loader: packing, exact resume (twice, through checkpoint files), SFT masks and
packing without cross-conversation attention, and the bad-fraction stop."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from data.chat import encode_conversations, render_text
from data.config import DataConfig
from data.loader import build_loader
from data.packing import ConcatPacker, ConversationPacker, ShuffleBuffer
from data.sources import DataError
from model import CausalLM, ModelConfig
from model.loss import IGNORE_INDEX
from tests.conftest import tiny_hf_config
from tests.data.conftest import write_jsonl
from trainer.checkpoint import load_state, save_state


def test_concat_packer_cuts_rows_without_losing_or_repeating_tokens_and_resumes_from_a_small_state():
    docs = [np.arange(n, dtype=np.int32) + 100 * i for i, n in enumerate([3, 11, 1, 6, 9, 40, 2])]
    packer, rows, states = ConcatPacker(seq_len=7), [], []  # rows of 8; each document its own chunk
    for i, doc in enumerate(docs):
        packer.mark()
        packer.add(doc)
        for row in packer.rows():
            rows.append(row["tokens"])
            states.append((i, ConcatPacker.state_from(packer.snapshot())))
    stream = np.concatenate(docs)
    assert all(len(r) == 8 for r in rows) and len(rows) == len(stream) // 8
    np.testing.assert_array_equal(np.concatenate(rows), stream[:len(rows) * 8])
    for k, (chunk, state) in enumerate(states):  # resumed after row k, re-reading from the chunk it was cut from
        assert len(state["carry"]) < 8  # never the chunk's tokens: less than a row
        again, more = ConcatPacker(seq_len=7), []
        again.load_state(state)
        for doc in docs[chunk:]:
            again.mark()
            again.add(doc)
            more += [r["tokens"] for r in again.rows()]
        assert len(more) == len(rows) - k - 1
        for a, b in zip(more, rows[k + 1:]):
            np.testing.assert_array_equal(a, b)


def test_conversation_packer_keeps_conversations_whole_and_labels_only_trained_tokens():
    packer = ConversationPacker(seq_len=10, pad_id=99)
    a = (np.array([1, 2, 3, 4], np.int32), np.array([0, 0, 1, 1], bool))
    b = (np.array([5, 6, 7], np.int32), np.array([0, 1, 1], bool))
    c = (np.array([8, 9, 10, 11, 12], np.int32), np.array([0, 0, 0, 1, 1], bool))
    long = (np.arange(30, 45, dtype=np.int32), np.ones(15, bool))
    for conv in (a, b, c, long):
        packer.add(conv)
    first, second = list(packer.rows())
    np.testing.assert_array_equal(first["input_ids"], [1, 2, 3, 4, 5, 6, 7, 99, 99, 99])
    # labels[t] is the next token where that token is trained, never across a conversation boundary
    np.testing.assert_array_equal(first["labels"], [-100, 3, 4, -100, 6, 7, -100, -100, -100, -100])
    np.testing.assert_array_equal(first["position_ids"], [0, 1, 2, 3, 0, 1, 2, 0, 0, 0])
    assert list(first["document_ids"][:7]) == [0, 0, 0, 0, 1, 1, 1] and len(set(first["document_ids"][7:])) == 1
    np.testing.assert_array_equal(second["input_ids"][:5], [8, 9, 10, 11, 12])
    assert packer.truncated == 1  # the 15-token conversation was cut to 10


def test_shuffle_buffer_is_a_seeded_permutation():
    def run(seed):
        buf, out = ShuffleBuffer(4, seed), []
        for i in range(20):
            row = buf.push({"x": np.array([i])})
            if row is not None:
                out.append(int(row["x"][0]))
        return out + sorted(int(r["x"][0]) for r in buf.rows)

    assert run(1) == run(1) and run(1) != run(2)
    assert sorted(run(1)) == list(range(20))


def _cfg(tmp_path, **kw) -> DataConfig:
    return DataConfig(**{"source": "files", "seq_len": 16, "shuffle_buffer": 4, "docs_per_chunk": 3,
                         "prefetch": 2, "cache_dir": str(tmp_path / "cache"), **kw})


def _corpus(tmp_path, n=60):
    return write_jsonl(tmp_path / "corpus.jsonl", [{"text": f"document {i}: " + "word " * (i % 9 + 1)}
                                                   for i in range(n)])


def _take(loader, n):
    return [loader.__next__() for _ in range(n)]


def _same(a, b):
    return len(a) == len(b) and all(torch.equal(x[k], y[k]) for x, y in zip(a, b) for k in x)


@pytest.mark.parametrize("source", ["files", "stdlib"])
def test_resume_twice_through_checkpoint_files_gives_the_uninterrupted_batches(tmp_path, bpe, source):
    path = _corpus(tmp_path)
    cfg = _cfg(tmp_path, source=source, paths=[str(path)] if source == "files" else [])
    straight = _take(build_loader(cfg, bpe, 3, seed=7, rank=1, world=2), 24)

    loader = build_loader(cfg, bpe, 3, seed=7, rank=1, world=2)
    got = _take(loader, 8)
    for i in range(2):  # save, rebuild, restore: twice
        save_state(tmp_path, f"state{i}", loader.state_dict())
        loader.close()
        loader = build_loader(cfg, bpe, 3, seed=7, rank=1, world=2)
        loader.load_state_dict(load_state(tmp_path, f"state{i}"))
        got += _take(loader, 8)
    loader.close()
    assert _same(got, straight)


def test_resuming_under_other_data_settings_is_refused(tmp_path, bpe):
    cfg = _cfg(tmp_path, paths=[str(_corpus(tmp_path))])
    loader = build_loader(cfg, bpe, 2, seed=0)
    _take(loader, 2)
    state = loader.state_dict()
    cfg.seq_len = 24
    with pytest.raises(DataError, match=r"saved with other settings; changed: seq_len: 16 -> 24"):
        build_loader(cfg, bpe, 2, seed=0).load_state_dict(state)
    cfg.seq_len = 16
    with pytest.raises(DataError, match=r"changed: seed: 0 -> 1"):
        build_loader(cfg, bpe, 2, seed=1).load_state_dict(state)


def test_batches_are_next_token_windows_with_bos_and_eos(tmp_path, bpe):
    cfg = _cfg(tmp_path, paths=[str(_corpus(tmp_path))], shuffle_buffer=1)
    batch = next(build_loader(cfg, bpe, 2, seed=0))
    assert batch["input_ids"].shape == batch["labels"].shape == (2, 16)
    torch.testing.assert_close(batch["input_ids"][:, 1:], batch["labels"][:, :-1])
    flat = torch.cat([batch["input_ids"][0], batch["labels"][0, -1:]]).tolist()
    assert flat[0] == bpe.bos_id and bpe.eos_id in flat  # documents are framed as the tokenizer defines


def test_seed_decides_the_order(tmp_path, bpe):
    cfg = _cfg(tmp_path, paths=[str(_corpus(tmp_path))], shuffle_buffer=32)  # 4 rows in each shard's buffer
    a, b = (_take(build_loader(cfg, bpe, 2, seed=s), 6) for s in (1, 2))
    assert _same(a, _take(build_loader(cfg, bpe, 2, seed=1), 6)) and not _same(a, b)


def test_too_many_bad_records_stop_the_run_with_counts(tmp_path, bpe):
    rows = [{"text": "fine"} if i % 3 else "{broken" for i in range(60)]
    cfg = _cfg(tmp_path, paths=[str(write_jsonl(tmp_path / "bad.jsonl", rows))], max_bad_fraction=0.1,
               bad_check_after=20)
    loader = build_loader(cfg, bpe, 2, seed=0)
    with pytest.raises(DataError, match=r"unusable \(3\d\.\d%, above data\.max_bad_fraction=0\.1\).*malformed JSON"):
        _take(loader, 50)
    cfg.max_bad_fraction = 0.5  # the same data within budget: trains, and the skips are reported
    loader = build_loader(cfg, bpe, 2, seed=0)
    _take(loader, 3)
    assert sum(loader.bad_records["counts"].values()) > 0


# ------------------------------------------------------------------------------------------------- SFT
def test_sft_from_parquet_reads_the_messages_column(tmp_path, bpe):
    import pyarrow as pa
    import pyarrow.parquet as pq

    conversations = [[{"role": "user", "content": f"q{i}"}, {"role": "assistant", "content": f"a{i}"}]
                     for i in range(12)]
    pq.write_table(pa.table({"messages": conversations}), tmp_path / "sft.parquet")
    cfg = _cfg(tmp_path, kind="sft", paths=[str(tmp_path / "sft.parquet")], seq_len=32)
    batch = next(build_loader(cfg, bpe, 2, seed=0))
    assert (batch["labels"] != IGNORE_INDEX).sum() > 0


def test_chat_template_renders_as_published():
    messages = [{"role": "system", "content": "S"}, {"role": "user", "content": "u1"},
                {"role": "assistant", "content": "a1"}, {"role": "user", "content": "u2"}]
    bos, eos = "<｜begin▁of▁sentence｜>", "<｜end▁of▁sentence｜>"
    assert render_text(messages, bos, eos, add_generation_prompt=True) == (
        f"{bos}S\n\nUser: u1\n\nAssistant: a1{eos}User: u2\n\nAssistant:")


def test_sft_trains_only_the_assistant_answers(bpe):
    conv = [{"role": "user", "content": "hello"}, {"role": "assistant", "content": "hi there"},
            {"role": "user", "content": "how"}, {"role": "assistant", "content": "fine"}]
    ids, mask = encode_conversations(bpe, [conv])[0]
    decode = lambda x: bpe.tokenizer.decode(x.tolist(), skip_special_tokens=False)  # noqa: E731
    eos = "<｜end▁of▁sentence｜>"
    assert decode(ids[mask]) == f" hi there{eos} fine{eos}"
    assert decode(ids[~mask]) == "<｜begin▁of▁sentence｜>User: hello\n\nAssistant:User: how\n\nAssistant:"
    assert decode(ids) == f"<｜begin▁of▁sentence｜>User: hello\n\nAssistant: hi there{eos}User: how\n\nAssistant: fine{eos}"


def test_sft_loader_batches_have_masks_and_document_ids(tmp_path, bpe):
    rows = [{"messages": [{"role": "user", "content": f"q{i}"}, {"role": "assistant", "content": f"answer {i}"}]}
            for i in range(20)]
    rows.insert(3, {"messages": [{"role": "user", "content": "no answer"}]})
    rows.insert(5, {"messages": [{"role": "robot", "content": "x"}]})
    cfg = _cfg(tmp_path, kind="sft", paths=[str(write_jsonl(tmp_path / "sft.jsonl", rows))], seq_len=32,
               shards=1)  # one shard reads records 3 and 5 before its first batch
    loader = build_loader(cfg, bpe, 2, seed=0)
    batch = next(loader)
    assert set(batch) == {"input_ids", "labels", "position_ids", "document_ids"}
    labels = batch["labels"]
    assert (labels == IGNORE_INDEX).any() and (labels != IGNORE_INDEX).any()
    assert (batch["position_ids"][:, 0] == 0).all()
    counts = loader.bad_records["counts"]
    assert counts.get("no non-empty assistant message to train on") == 1
    assert any("role 'robot'" in k for k in counts)
    # exact resume holds for SFT packing too
    state = loader.state_dict()
    following = _take(loader, 3)
    loader.close()
    again = build_loader(cfg, bpe, 2, seed=0)
    again.load_state_dict(state)
    assert _same(_take(again, 3), following)


def test_a_packed_conversation_cannot_see_its_neighbour():
    """Changing the first conversation of a packed row leaves the second one's logits untouched, and they equal the
    second conversation run alone (document mask + positions restarting at 0)."""
    torch.manual_seed(0)
    model = CausalLM(ModelConfig.from_hf_config(tiny_hf_config())).eval()
    second = np.array([11, 12, 13, 14], np.int32)
    rows = []
    for first in ([5, 6, 7, 8, 9, 10], [40, 41, 42, 43, 44, 45]):
        packer = ConversationPacker(seq_len=20, pad_id=0)
        packer.add((np.array(first, np.int32), np.ones(6, bool)))
        packer.add((second, np.ones(4, bool)))
        packer.add((np.ones(20, np.int32), np.ones(20, bool)))  # flushes the row
        rows.append(next(packer.rows()))
    logits = []
    with torch.no_grad():
        for row in rows:
            batch = {k: torch.from_numpy(v.astype(np.int64))[None] for k, v in row.items() if k != "labels"}
            logits.append(model(**batch).logits[0])
        alone = model(torch.from_numpy(second.astype(np.int64))[None]).logits[0]
    assert (logits[0][:6] - logits[1][:6]).abs().max() > 1e-3  # the first conversation did change
    torch.testing.assert_close(logits[0][6:10], logits[1][6:10])  # the second one: identical
    torch.testing.assert_close(logits[0][6:10], alone, rtol=1e-4, atol=1e-5)  # as if it were alone
