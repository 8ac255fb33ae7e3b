"""The stateful streaming loader: source -> tokenizer -> packer -> shuffle buffer -> micro-batches, prepared by a
background thread so a training step never waits on tokenization.

Resume guarantee: `state_dict()` describes the stream just after the last micro-batch handed out by `__next__`
(source position, tokens held by the packer, rows in the shuffle buffer and its RNG, bad-record counts). A loader
built with the same config, tokenizer, seed, rank and world size, given that state through `load_state_dict()`,
yields exactly the micro-batches the uninterrupted loader would have yielded next. The state is per data-parallel
rank and is not portable to another world size.
"""

from __future__ import annotations

import platform
import queue
import threading
from collections import deque
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from itertools import islice
from typing import Any

import numpy as np
import torch

from .chat import encode_conversations, messages_extractor
from .config import DataConfig
from .packing import ConcatPacker, ConversationPacker, ShuffleBuffer
from .sources import (BadRecords, DataError, FileSource, HubSource, Position, StdlibSource, expand_globs,
                      text_extractor, what_to_fix)
from .tokenizer import TextTokenizer, cached_bpe, load_tokenizer


def build_tokenizer(cfg: DataConfig) -> TextTokenizer:
    """`data.tokenizer` if given, else the built-in byte-level BPE trained on the built-in corpus (cached)."""
    if cfg.tokenizer:
        return load_tokenizer(cfg.tokenizer)
    corpus = StdlibSource("train", cfg.holdout_every, seed=0, rank=0, world=1)
    fingerprint = f"python-{platform.python_version()}|{corpus.fingerprint()}"
    return cached_bpe(corpus.texts, fingerprint, cfg.vocab_size, cfg.cache_dir)


def build_source(cfg: DataConfig, split: str, seed: int, rank: int, world: int):
    """The record source of a split, or None when there is no validation data."""
    shuffle = split == "train"
    sft = cfg.kind == "sft"
    extract = messages_extractor(cfg.messages_field) if sft else text_extractor(cfg.text_field)
    field_name = cfg.messages_field if sft else cfg.text_field
    if split == "val" and cfg.val_paths:
        return FileSource(expand_globs(cfg.val_paths, "data.val_paths"), extract, field_name, seed, rank, world,
                          shuffle_files=False)
    if cfg.source == "stdlib":
        return StdlibSource(split, cfg.holdout_every, seed, rank, world, shuffle=shuffle)
    if split == "val":
        return None
    if cfg.source == "files":
        return FileSource(expand_globs(cfg.paths), extract, field_name, seed, rank, world)
    return HubSource(cfg.hub_path, cfg.hub_name, cfg.hub_split, list(cfg.hub_data_files), extract, seed, rank, world)


def epoch_rows(cfg: DataConfig, tokenizer: TextTokenizer, seed: int, rank: int = 0, world: int = 1) -> int:
    """Rows (packed sequences) that one pass over this rank's training records makes: what `trainer.epochs`
    counts. Reads and tokenizes the pass once, a chunk at a time, without keeping it."""
    source = build_source(cfg, "train", seed, rank, world)
    pipeline = Pipeline(cfg, tokenizer, source, 1, seed, rank, world)
    rows, chunk = 0, []

    def flush() -> int:
        for example in pipeline._examples(chunk):
            pipeline.packer.add(example)
        chunk.clear()
        return sum(1 for _ in pipeline.packer.rows())

    for record in source.records(Position()):
        if record.position.epoch > 0:  # the first record of the second pass
            break
        chunk.append(record.payload)
        if len(chunk) == cfg.docs_per_chunk:
            rows += flush()
    return rows + flush()


class Pipeline:
    """One rank's deterministic stream of micro-batches, each paired with a snapshot of the state after it."""

    def __init__(self, cfg: DataConfig, tokenizer: TextTokenizer, source, micro_batch_size: int, seed: int,
                 rank: int, world: int = 1, shuffle: bool = True):
        self.cfg, self.tokenizer, self.source, self.batch_size = cfg, tokenizer, source, micro_batch_size
        # What a saved position means: resuming under other settings would silently read another stream.
        self.fingerprint = {
            "kind": cfg.kind, "input": source.identity(), "seed": seed, "rank": rank, "world": world,
            "seq_len": cfg.seq_len, "micro_batch_size": micro_batch_size, "shuffle_buffer": cfg.shuffle_buffer,
            "docs_per_chunk": cfg.docs_per_chunk, "tokenizer_vocab": tokenizer.vocab_size,
            "eos": tokenizer.eos_id, "bos": tokenizer.bos_id}
        self.sft = cfg.kind == "sft"
        self.packer = ConversationPacker(cfg.seq_len, tokenizer.pad_id) if self.sft else ConcatPacker(cfg.seq_len)
        self.buffer = ShuffleBuffer(cfg.shuffle_buffer if shuffle else 1, seed=[seed, rank, 1])
        self.position = Position()
        self.bad = BadRecords().state()  # skipped records up to `position`

    # ---------------------------------------------------------------------------------------- state
    def load_state(self, state: dict) -> None:
        saved = state.get("fingerprint", {})
        changed = sorted(k for k in self.fingerprint if saved.get(k) != self.fingerprint[k])
        if changed:
            raise DataError("data: the checkpoint's data position was saved with other settings; changed: " + "; ".join(
                f"{k}: {saved.get(k)!r} -> {self.fingerprint[k]!r}" for k in changed) +
                " (resume with the original data settings, or start from the weights alone: launch/convert.py)")
        self.position = Position.from_state(state["position"])
        self.packer.load_state(state["packer"])
        self.buffer.load_state(state["buffer"])
        self.bad = state["bad"]
        self.source.bad = BadRecords.from_state(state["bad"])

    def snapshot(self) -> tuple:
        """Cheap to take per batch: rows and token arrays are immutable, so references suffice."""
        return self.position.state(), self.packer.snapshot(), self.buffer.snapshot(), self.bad

    def state_from(self, snapshot: tuple) -> dict:
        position, packer, buffer, bad = snapshot
        return {"position": position, "packer": self.packer.state_from(packer), "buffer": self.buffer.state_from(buffer),
                "bad": bad, "fingerprint": self.fingerprint}

    # ---------------------------------------------------------------------------------------- stream
    def _examples(self, payloads: list) -> list:
        if self.sft:
            return encode_conversations(self.tokenizer, payloads)
        ids = self.tokenizer.encode_batch(payloads)
        if self.tokenizer.eos_id is not None:
            eos = np.array([self.tokenizer.eos_id], np.int32)
            ids = [np.concatenate((x, eos)) for x in ids]
        return ids

    def _collate(self, rows: list[dict]) -> dict[str, torch.Tensor]:
        if self.sft:
            return {key: torch.from_numpy(np.stack([r[key] for r in rows]).astype(np.int64)) for key in rows[0]}
        tokens = torch.from_numpy(np.stack([r["tokens"] for r in rows]).astype(np.int64))  # (B, seq_len + 1)
        return {"input_ids": tokens[:, :-1].contiguous(), "labels": tokens[:, 1:].contiguous()}

    def batches(self) -> Iterator[tuple[dict[str, torch.Tensor], tuple]]:
        """Micro-batches with their state snapshots. The next chunk of records is read and tokenized in a worker
        thread while the current one is waited on (tokenizers releases the GIL), so the tokenizer's threads never
        idle at the tail of a chunk. Position and bad-record counts advance only when a chunk's tokens reach the
        packer, so a snapshot never covers records that were read ahead."""
        records = self.source.records(self.position)
        pool = ThreadPoolExecutor(max_workers=2, thread_name_prefix="tokenize")
        in_flight: deque = deque()

        def read_ahead() -> None:
            chunk = list(islice(records, self.cfg.docs_per_chunk))
            in_flight.append((chunk, self.source.bad.state(), pool.submit(self._examples, [r.payload for r in chunk])))

        rows: list[dict] = []
        try:
            read_ahead()
            while True:
                for row in self.packer.rows():
                    out = self.buffer.push(row)
                    if out is None:
                        continue
                    rows.append(out)
                    if len(rows) == self.batch_size:
                        yield self._collate(rows), self.snapshot()
                        rows = []
                read_ahead()
                chunk, bad, examples = in_flight.popleft()
                for example in examples.result():
                    self.packer.add(example)
                self.position, self.bad = chunk[-1].position, bad
                self._check_bad_fraction()
        finally:
            pool.shutdown(wait=False, cancel_futures=True)

    def _check_bad_fraction(self) -> None:
        bad = BadRecords.from_state(self.bad)
        if bad.good + bad.bad >= self.cfg.bad_check_after and bad.fraction() > self.cfg.max_bad_fraction:
            raise DataError(
                f"data: {bad.bad} of {bad.good + bad.bad} records read were unusable ({bad.fraction():.1%}, above "
                f"data.max_bad_fraction={self.cfg.max_bad_fraction}); by reason: {dict(bad.counts)}; first: "
                f"{bad.examples[:5]}{what_to_fix(bad.counts)}")


_DONE = object()


class StatefulLoader:
    """Iterator of micro-batches from a `Pipeline`, produced `prefetch` ahead by a background thread."""

    def __init__(self, pipeline: Pipeline, prefetch: int):
        self.pipeline, self.prefetch = pipeline, prefetch
        self._snapshot: tuple | None = None
        self._thread: threading.Thread | None = None
        self._queue: queue.Queue = queue.Queue(maxsize=max(1, prefetch))
        self._stop = threading.Event()

    def load_state_dict(self, state: dict) -> None:
        if self._thread is not None:
            raise RuntimeError("load_state_dict() must come before the first batch is drawn")
        self.pipeline.load_state(state)
        self._snapshot = None

    def state_dict(self) -> dict:
        if self._snapshot is None:  # nothing drawn yet: the state we start from
            return self.pipeline.state_from(self.pipeline.snapshot())
        return self.pipeline.state_from(self._snapshot)

    @property
    def epoch(self) -> int:
        """The epoch the source was reading when the last batch handed out was made (0 before the first pass ends)."""
        snapshot = self._snapshot or self.pipeline.snapshot()
        return int(snapshot[0]["epoch"])

    @property
    def bad_records(self) -> dict[str, Any]:
        """Skipped records (by reason) up to the last batch handed out."""
        snapshot = self._snapshot or self.pipeline.snapshot()
        return snapshot[3]

    def _produce(self) -> None:
        batches = self.pipeline.batches()
        try:
            for item in batches:
                while not self._stop.is_set():
                    try:
                        self._queue.put(item, timeout=0.1)
                        break
                    except queue.Full:
                        continue
                if self._stop.is_set():
                    return
        except BaseException as e:  # handed to the consumer, which re-raises it in the training thread
            self._queue.put((_DONE, e))
        finally:
            batches.close()

    def __iter__(self) -> StatefulLoader:
        return self

    def __next__(self) -> dict[str, torch.Tensor]:
        if self._thread is None:
            self._thread = threading.Thread(target=self._produce, name="data-prefetch", daemon=True)
            self._thread.start()
        batch, snapshot = self._queue.get()
        if batch is _DONE:
            raise snapshot
        self._snapshot = snapshot
        return batch

    def close(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)


def build_loader(cfg: DataConfig, tokenizer: TextTokenizer, micro_batch_size: int, seed: int, rank: int = 0,
                 world: int = 1, split: str = "train") -> StatefulLoader | None:
    """The loader of one data-parallel rank for `split` ("train" or "val"); None when there is no val data."""
    cfg.validate()
    source = build_source(cfg, split, seed, rank, world)
    if source is None:
        return None
    pipeline = Pipeline(cfg, tokenizer, source, micro_batch_size, seed, rank, world, shuffle=split == "train")
    return StatefulLoader(pipeline, cfg.prefetch)


__all__ = ["DataError", "StatefulLoader", "build_loader", "build_tokenizer"]
