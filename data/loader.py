"""The stateful streaming loader: source -> tokenizer -> packer -> shuffle buffer -> rows, in `data.shards`
canonical shards merged into one global order of rows, of which each data-parallel rank takes its share as
micro-batches, prepared by a background thread so a training step never waits on tokenization.

Data order (docs/data.md#data-order). Canonical shard c of C = `data.shards` reads the records k with k mod C == c,
and packs and shuffles them on its own (its buffer seeded from the seed and c). Global row n (counted over the whole
run) is the next row of shard n mod C, and data-parallel rank r of `world` takes the global rows n with
n mod world == r, in order. Nothing about a shard depends on the number of ranks, and a global batch is a multiple of
micro_batch_size x world rows, so global step s trains on the same rows at any process count. A mixture
(docs/data.md#mixtures) gives every shard one pipeline per source, and `Blend` names the source of each global row.

Resume guarantee: `state_dict()` describes the stream just after the last micro-batch handed out, when all ranks
together have consumed N global rows: N, each source's rows among them, the state of each shard this rank owns
(where its current chunk of records began, the few tokens the packer held then and how many it has cut since, rows
in the shuffle buffer and its draws, bad-record counts) and a fingerprint of the settings. Every shard is owned by
exactly one rank, so `merge_data_states` over all ranks' states holds every shard once. A loader of any world size
dividing N, built with the same data settings, tokenizer and seed and given the merged state through
`load_state_dict()`, yields exactly the rows the uninterrupted loader would have yielded next, in the same order.
"""

from __future__ import annotations

import math
import platform
import queue
import threading
from collections import deque
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import closing
from itertools import islice
from typing import Any

import numpy as np
import torch

from .chat import encode_conversations, messages_extractor
from .config import DataConfig, MixtureSource
from .packing import ConcatPacker, ConversationPacker, ShuffleBuffer
from .sources import (INDEXED_SUFFIXES, MAX_EXAMPLES, BadRecords, DataError, FileSource, HubSource, Position,
                      SourceExhausted, StdlibSource, content_changes, content_fingerprint, expand_globs, opened,
                      text_extractor, what_to_fix)
from .tokenizer import TextTokenizer, cached_bpe, load_tokenizer

ORDER_VERSION = 2
"""Version of the data order a checkpoint's data position belongs to. 2: the shuffle buffer split over the shards,
mixtures, first-pass bad-record counts. A position of another version is refused with what to do."""


def build_tokenizer(cfg: DataConfig) -> TextTokenizer:
    """`data.tokenizer` if given, else the built-in byte-level BPE trained on the built-in corpus (cached)."""
    if cfg.tokenizer:
        return load_tokenizer(cfg.tokenizer)
    corpus = StdlibSource("train", cfg.holdout_every, seed=0, rank=0, world=1)
    fingerprint = f"python-{platform.python_version()}|{corpus.fingerprint()}"
    return cached_bpe(corpus.texts, fingerprint, cfg.vocab_size, cfg.cache_dir)


def build_source(cfg: DataConfig, split: str, seed: int, rank: int, world: int, stream: int = 0):
    """The record source of a split, or None when there is no validation data. `rank` of `world` picks the records
    k with k mod world == rank: the loader builds canonical shard c as (rank=c, world=data.shards). `stream`: which
    training source of `cfg.sources()` (the mixture's, or the one of `data.paths`)."""
    shuffle = split == "train"
    sft = cfg.kind == "sft"
    if split == "val" and cfg.val_paths:
        extract = messages_extractor(cfg.messages_field) if sft else text_extractor(cfg.text_field)
        return FileSource(expand_globs(cfg.val_paths, "data.val_paths"), extract, cfg.messages_field if sft else
                          cfg.text_field, seed, rank, world, shuffle_files=False, cache_dir=cfg.cache_dir)
    if cfg.source == "stdlib":
        return StdlibSource(split, cfg.holdout_every, seed, rank, world, shuffle=shuffle)
    if split == "val":
        return None
    if cfg.source == "files":
        source = cfg.sources()[stream]
        field_name = source.messages_field if sft else source.text_field
        extract = messages_extractor(field_name) if sft else text_extractor(field_name)
        return FileSource(expand_globs(source.paths, cfg.paths_key(source.name)), extract, field_name, stream_seed(seed, stream), rank,
                          world, name=source.name if cfg.mixture else None, epochs=source.epochs,
                          cache_dir=cfg.cache_dir)
    extract = messages_extractor(cfg.messages_field) if sft else text_extractor(cfg.text_field)
    return HubSource(cfg.hub_path, cfg.hub_name, cfg.hub_split, list(cfg.hub_data_files), extract, seed, rank, world)


def check_inputs(cfg: DataConfig, tokenizer: TextTokenizer, vocab_limit: int) -> dict[str, list]:
    """Every training and validation glob matches files of a supported format, and every indexed dataset among
    them is sound (`data/indexed.py` checks), made with this tokenizer (its manifest, `data/manifest.py`) and within
    the model's vocabulary (the manifest's largest id). Called before any process group starts, so that bad input
    is one `data error:` line. Returns the files of each training source (by name)."""
    from .manifest import check_shard_tokenizer, shard_max_id

    listed: dict[str, list] = {}
    for key, name, patterns in cfg.inputs():
        files = expand_globs(patterns, key)
        for path in files:
            if path.suffix.lower() not in INDEXED_SUFFIXES:
                continue
            if cfg.kind == "sft":
                raise DataError(f"{key}: {path} is a pre-tokenized indexed dataset; SFT reads conversations (JSON "
                                "Lines or Parquet with data.messages_field), not token ids")
            opened(path)  # checks the pair, and keeps it open for the loader
            check_shard_tokenizer(path, tokenizer)
            top = shard_max_id(path)
            if top is not None and top >= vocab_limit:
                raise DataError(f"{key}: {path} holds token ids up to {top} (its manifest), at or past the model's "
                                f"vocabulary of {vocab_limit} ids: were these shards made with another tokenizer?")
        if name is not None:
            listed[name] = files
    return listed


def describe_sources(cfg: DataConfig, rows: int) -> list[str]:
    """Start-banner lines of a mixture: each source's name, weight, number of files, and for pre-tokenized sources
    their tokens and the passes over them that `rows` training sequences take at the weights."""
    total = sum(m.weight for m in cfg.mixture)
    lines = []
    for m in cfg.mixture:
        paths = expand_globs(m.paths, cfg.paths_key(m.name))
        line = f"  {m.name:<12} weight {m.weight / total:6.1%}  {len(paths)} file(s)"
        if all(p.suffix.lower() in INDEXED_SUFFIXES for p in paths):
            tokens = sum(opened(p).num_tokens for p in paths)
            wanted = rows * m.weight / total * (cfg.seq_len + 1)
            line += f", {tokens:,} tokens pre-tokenized: this run reads {wanted / max(tokens, 1):.2f} epoch(s)"
        if m.epochs is not None:
            line += f" (at most {m.epochs})"
        lines.append(line)
    return lines


def stream_seed(seed: int, stream: int) -> tuple[int, ...]:
    """The seed of training source `stream`: the run's seed for the first (so a one-source mixture reads exactly as
    data.paths), its own for each other."""
    return (seed,) if stream == 0 else (seed, 1_000_003, stream)


MIN_CHUNK = 16
"""Documents per chunk, at least, of a shard's pipeline (at most data.docs_per_chunk)."""
PRETOKENIZED_CHUNK = 32
"""Documents per chunk, at least, of a source made only of indexed datasets (at most data.docs_per_chunk)."""


class Blend:
    """Which source each global row comes from: row n goes to the source whose count is furthest below its share
    of n + 1 rows (largest deficit first, lowest index on ties), so after any number of rows every source's count
    is within one of weight x rows. Deterministic from the weights alone; its state is the counts."""

    def __init__(self, weights: list[float]):
        total = sum(weights)
        self.weights = [w / total for w in weights]
        self.counts = [0] * len(weights)
        self.rows = 0

    def next(self) -> int:
        if len(self.weights) == 1:
            choice = 0
        else:
            n = self.rows + 1
            deficits = [w * n - c for w, c in zip(self.weights, self.counts)]
            choice = deficits.index(max(deficits))
        self.counts[choice] += 1
        self.rows += 1
        return choice


def shard_layout(shards: int, rank: int, world: int) -> tuple[list[int], list[int]]:
    """(held, owned): the canonical shards data-parallel rank `rank` of `world` runs, and those whose state it
    writes. Rank r takes the global rows n = r (mod world), which come from the shards c = r (mod g) with
    g = gcd(shards, world); the lowest rank holding c, c mod g, owns it, so every shard is written exactly once."""
    g = math.gcd(shards, world)
    held = [c for c in range(shards) if c % g == rank % g]
    return held, [c for c in held if c % g == rank]


def epoch_rows(cfg: DataConfig, tokenizer: TextTokenizer, seed: int, rank: int = 0, world: int = 1) -> int:
    """Rows (packed sequences) that one pass over the training records of the shards this rank owns makes; summed
    over the data-parallel ranks, the rows of one epoch (what `trainer.epochs` counts). Reads and tokenizes the pass
    once, a chunk at a time, without keeping it."""
    return sum(_shard_epoch_rows(cfg, tokenizer, seed, c) for c in shard_layout(cfg.shards, rank, world)[1])


def _shard_epoch_rows(cfg: DataConfig, tokenizer: TextTokenizer, seed: int, shard: int) -> int:
    source = build_source(cfg, "train", seed, shard, cfg.shards)
    pipeline = Pipeline(cfg, tokenizer, source, 1, seed, shard, cfg.shards)
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


def check_bad_fraction(cfg: DataConfig, bad: BadRecords, total_bad: int | None = None,
                       total_good: int | None = None) -> None:
    """Stop when more than `data.max_bad_fraction` of the records read were unusable, once at least
    `data.bad_check_after` were read. Records are counted once, in their first pass, so a small file read for many
    epochs is judged on its records, not on how often it was read. `bad`: the counts by reason and examples to
    report; `total_bad` / `total_good`: the job's totals when `bad` is one rank's share (default: `bad`'s own)."""
    total_bad = bad.bad if total_bad is None else total_bad
    total_good = bad.good if total_good is None else total_good
    read = total_bad + total_good
    if read >= cfg.bad_check_after and total_bad > cfg.max_bad_fraction * read:
        share = "" if (total_bad, total_good) == (bad.bad, bad.good) else " (this rank's share)"
        raise DataError(
            f"data: {total_bad} of {read} records read were unusable ({total_bad / read:.1%}, above "
            f"data.max_bad_fraction={cfg.max_bad_fraction}); by reason{share}: {dict(bad.counts)}; first: "
            f"{bad.examples[:5]}{what_to_fix(bad.counts)}")


def collate(rows: list[dict], sft: bool) -> dict[str, torch.Tensor]:
    if sft:
        return {key: torch.from_numpy(np.stack([r[key] for r in rows]).astype(np.int64)) for key in rows[0]}
    tokens = torch.from_numpy(np.stack([r["tokens"] for r in rows]).astype(np.int64))  # (B, seq_len + 1)
    return {"input_ids": tokens[:, :-1].contiguous(), "labels": tokens[:, 1:].contiguous()}


class Pipeline:
    """One canonical shard's deterministic stream of rows (`rank` of `world` picks its records and seeds its shuffle
    buffer), whose state can be snapshot between any two rows. `pool`: the tokenizing threads, shared by the shards
    of one loader (default: its own)."""

    def __init__(self, cfg: DataConfig, tokenizer: TextTokenizer, source, micro_batch_size: int, seed: int,
                 rank: int, world: int = 1, shuffle: bool = True, pool: ThreadPoolExecutor | None = None,
                 stream: int = 0):
        self.cfg, self.tokenizer, self.source, self.batch_size = cfg, tokenizer, source, micro_batch_size
        self.sft = cfg.kind == "sft"
        self.packer = ConversationPacker(cfg.seq_len, tokenizer.pad_id) if self.sft else ConcatPacker(cfg.seq_len)
        # The shards' rows interleave in the global order, so buffers of shuffle_buffer / shards rows each mix the
        # global order over about shuffle_buffer rows, as one buffer of that size would.
        size = -(-cfg.shuffle_buffer // world) if shuffle else 1
        self.buffer = ShuffleBuffer(size, seed=[seed, rank, 1] + ([stream] if stream else []))
        self.position = Position()
        self.bad = BadRecords().state()  # skipped records up to `position`
        # Where the chunk the packer is cutting began (position, bad records): a pretraining state is that and the
        # packer's few held tokens, not the chunk's tokens (ConcatPacker), so it stays small whatever the documents.
        self.chunk_start = (self.position.state(), self.bad)
        self.pool = pool
        # Records per encode_batch call. The rows do not depend on it (the packer concatenates documents whatever
        # their chunk), so the loader may split data.docs_per_chunk between the shards it drives.
        self.docs_per_chunk = cfg.docs_per_chunk

    # ---------------------------------------------------------------------------------------- state
    def load_state(self, state: dict) -> None:
        self.position = Position.from_state(state["position"])
        self.packer.load_state(state["packer"])
        self.buffer.load_state(state["buffer"])
        self.bad = state["bad"]
        self.source.bad = BadRecords.from_state(state["bad"])
        self.chunk_start = (self.position.state(), self.bad)

    def snapshot(self) -> tuple:
        """Cheap to take per batch: rows, token arrays and positions are never changed once made, so references
        suffice. (The position and bad records after the last chunk read, for the figures; the packer, the buffer;
        where the state resumes.)"""
        start = self.chunk_start if not self.sft else (self.position.state(), self.bad)
        return self.position, self.packer.snapshot(), self.buffer.snapshot(), self.bad, start

    def state_from(self, snapshot: tuple) -> dict:
        _, packer, buffer, _, (position, bad) = snapshot
        return {"position": position, "packer": self.packer.state_from(packer), "buffer": self.buffer.state_from(buffer),
                "bad": bad}

    # ---------------------------------------------------------------------------------------- stream
    def _examples(self, payloads: list) -> list:
        """What the packer gets: conversations rendered for SFT; for pretraining each text's
        `TextTokenizer.encode_documents` ids, and an indexed dataset's documents as they are stored."""
        if self.sft:
            return encode_conversations(self.tokenizer, payloads)
        texts = [p for p in payloads if isinstance(p, str)]
        encoded = iter(self.tokenizer.encode_documents(texts) if texts else ())
        # Stored documents stay views of the memory-mapped file, in its dtype, until a row copies them out.
        return [next(encoded) if isinstance(p, str) else p for p in payloads]

    def rows(self) -> Iterator[dict]:
        """Rows out of the shuffle buffer; while the generator waits at a row, `snapshot()` is the state just after
        it. The next chunk of records is read and tokenized in a worker thread while the current one is waited on
        (tokenizers releases the GIL), so the tokenizer's threads never idle at the tail of a chunk (indexed datasets,
        with nothing to tokenize, read a chunk only when it is needed). Position and
        bad-record counts advance only when a chunk's tokens reach the packer, so a snapshot never covers records
        that were read ahead."""
        records = self.source.records(self.position)
        pool = self.pool or ThreadPoolExecutor(max_workers=2, thread_name_prefix="tokenize")
        in_flight: deque = deque()

        def read_ahead() -> None:
            chunk, ended = [], None
            try:
                chunk.extend(islice(records, self.docs_per_chunk))
            except SourceExhausted as e:  # raised once the rows of the records before it are used
                ended = e
            payloads = [r.payload for r in chunk]
            if self.sft or any(isinstance(p, str) for p in payloads):
                examples = pool.submit(self._examples, payloads)
            else:  # token ids already: nothing to hand the tokenizing threads
                examples = Future()
                examples.set_result(self._examples(payloads))
            in_flight.append((chunk, self.source.bad.state(), examples, ended))

        try:
            if not getattr(self.source, "pretokenized", False):  # token ids need no head start: read when needed
                read_ahead()
            ended = None
            while True:
                for row in self.packer.rows():
                    out = self.buffer.push(row)
                    if out is not None:
                        yield out
                if ended is not None:
                    raise ended
                read_ahead()
                chunk, bad, examples, ended = in_flight.popleft()
                if not self.sft:
                    self.chunk_start = (self.position.state(), self.bad)
                    self.packer.mark()
                for example in examples.result():
                    self.packer.add(example)
                if chunk:
                    self.position = chunk[-1].position
                self.bad = bad
        finally:
            for _, _, future, _ in in_flight:
                future.cancel()
            if pool is not self.pool:
                pool.shutdown(wait=False, cancel_futures=True)

    def batches(self) -> Iterator[tuple[dict[str, torch.Tensor], tuple]]:
        """This shard alone as micro-batches, each with the state snapshot after it."""
        rows: list[dict] = []
        with closing(self.rows()) as stream:
            for row in stream:
                rows.append(row)
                if len(rows) == self.batch_size:
                    yield collate(rows, self.sft), self.snapshot()
                    rows = []


class RankRows:
    """Data-parallel rank `rank`'s share of the global row order over `shards` canonical shards (see the module
    docstring), and the position in that order: `global_rows`, the rows all ranks together have consumed. With a
    mixture, every canonical shard has one pipeline per source (`pipelines[(shard, source)]`) and global row n is
    the next row of shard n mod `shards`'s pipeline of source `blend`(n) (docs/data.md#mixtures)."""

    def __init__(self, pipelines: dict[tuple[int, int], Pipeline], shards: int, rank: int, world: int,
                 names: list[str]):
        self.pipelines, self.shards, self.rank, self.world, self.names = pipelines, shards, rank, world, names
        self.held, self.owned = shard_layout(shards, rank, world)
        self.global_rows = 0
        self.blend = Blend([1.0] * len(names))  # replaced by the mixture's weights in build_loader
        # A pipeline's state changes only inside its own next(): snapshots are retaken for those pulled since.
        self._snapshots: dict[tuple[int, int], tuple] = {}
        self.stale = set(pipelines)
        self.counted = False

    def key(self, shard: int, stream: int) -> str:
        """The name of a pipeline's state in a checkpoint: the shard, and with a mixture the source's name."""
        return str(shard) if len(self.names) == 1 else f"{shard}/{self.names[stream]}"

    def rows(self) -> Iterator[dict]:
        """This rank's rows in order. Works a block of `world` consecutive global rows at a time: it pulls the
        block's rows of the shards it holds (only row block + rank is its own; when data.shards is not a multiple of
        the world size, the others belong to other ranks and are dropped), so between blocks each held pipeline
        stands exactly after its rows n < global_rows. Every rank follows the blend over all rows."""
        g = math.gcd(self.shards, self.world)
        streams = {key: pipeline.rows() for key, pipeline in self.pipelines.items()}
        try:
            while True:
                start, kept = self.global_rows, None
                sources = [self.blend.next() for _ in range(self.world)]
                for n in range(start + self.rank % g, start + self.world, g):
                    row = self._pull(streams, n % self.shards, sources[n - start])
                    if n == start + self.rank:
                        kept = row
                self.global_rows = start + self.world
                yield kept
        finally:
            for stream in streams.values():
                stream.close()

    def _pull(self, streams: dict, shard: int, stream: int) -> dict:
        self.stale.add((shard, stream))
        try:
            return next(streams[(shard, stream)])
        except SourceExhausted:
            raise
        except DataError as e:
            if self.shards == 1:
                raise
            hint = ""
            if "no usable record" in str(e):
                hint = (f"; shard {shard} holds the records k with k mod {self.shards} == {shard}: with this few "
                        "usable records, lower data.shards")
            raise DataError(f"data shard {shard} of data.shards={self.shards}: {e}{hint}") from None

    def snapshot(self) -> tuple[int, dict[tuple[int, int], tuple], tuple[int, ...]]:
        """(global rows, each pipeline's snapshot, rows per source); `counted` says whether a pipeline has read
        records (and so counted bad ones) since the previous snapshot."""
        self.counted = False
        for key in self.stale:
            old, new = self._snapshots.get(key), self.pipelines[key].snapshot()
            self.counted = self.counted or old is None or old[3] is not new[3]
            self._snapshots[key] = new
        self.stale.clear()
        return self.global_rows, {key: self._snapshots[key] for key in self.pipelines}, tuple(self.blend.counts)


def merge_data_states(states: list[dict], names: list[str] | None = None) -> dict:
    """One state holding every shard, from the `state_dict()`s of all ranks of one checkpoint (each data-parallel rank
    writes the shards it owns; ranks that share a data-parallel rank, such as pipeline stages, write the same ones).
    Raises DataError naming what differs. `names` (e.g. the files they came from) label the states in errors."""
    names = names or [f"data state {i}" for i in range(len(states))]
    if not states:
        raise DataError("data: no data state to merge")
    for name, state in zip(names, states):
        if "global_rows" not in state:
            raise DataError(f"data: {name} has the per-rank data position of an older version, which the "
                            "layout-independent data order cannot continue; resume with "
                            "checkpoint.data_resume=reset (restarts the data stream)")
    first, merged = states[0], {}
    for name, state in zip(names, states):
        if state["global_rows"] != first["global_rows"]:
            raise DataError(f"data: the data states disagree on the position: {names[0]} is after "
                            f"{first['global_rows']} global rows, {name} after {state['global_rows']} (states of "
                            "different checkpoints?)")
        if state["fingerprint"] != first["fingerprint"]:
            changed = sorted(k for k in {**first["fingerprint"], **state["fingerprint"]}
                             if first["fingerprint"].get(k) != state["fingerprint"].get(k))
            raise DataError(f"data: {names[0]} and {name} were saved with other data settings; differ: "
                            f"{', '.join(changed)}")
        for shard, shard_state in state["shards"].items():
            if shard in merged and not _same(merged[shard][1], shard_state):  # pipeline stages write the same one
                raise DataError(f"data: shard {shard} differs between {merged[shard][0]} and {name}")
            merged.setdefault(shard, (name, shard_state))
    out = {"global_rows": first["global_rows"], "fingerprint": first["fingerprint"],
           "shards": {shard: shard_state for shard, (_, shard_state) in merged.items()}}
    if "source_rows" in first:  # the blend's counts: a function of global_rows, the same in every state
        out["source_rows"] = list(first["source_rows"])
    return out


def _same(a: Any, b: Any) -> bool:
    """Equal nested states (dicts, lists, arrays, scalars)."""
    if isinstance(a, dict) and isinstance(b, dict):
        return a.keys() == b.keys() and all(_same(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)):
        return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b))
    if isinstance(a, (np.ndarray, torch.Tensor)) or isinstance(b, (np.ndarray, torch.Tensor)):
        return np.array_equal(np.asarray(a), np.asarray(b))
    return type(a) is type(b) and a == b


def fingerprint(cfg: DataConfig, tokenizer: TextTokenizer, sources: list, seed: int,
                mixture: list[MixtureSource] | None = None) -> dict:
    """What a saved data position means: resuming under other settings would silently read another stream. Neither
    the world size nor the micro-batch size is here: the global order does not depend on them. `sources`: one
    record source per training source; `mixture`: the mixture's sources, when there is one."""
    out = {"order": ORDER_VERSION, "kind": cfg.kind, "input": sources[0].identity(), "seed": seed,
           "shards": cfg.shards, "seq_len": cfg.seq_len, "shuffle_buffer": cfg.shuffle_buffer,
           "docs_per_chunk": cfg.docs_per_chunk, "tokenizer_vocab": tokenizer.vocab_size, "eos": tokenizer.eos_id,
           "bos": tokenizer.bos_id}
    if mixture:
        out["input"] = {m.name: source.identity() for m, source in zip(mixture, sources)}
        out["mixture"] = [[m.name, m.weight, m.epochs] for m in mixture]
    # What the files held: a resume checks them (`content_changes`), so a file edited in place is not read from a
    # saved byte offset that now means something else.
    out["contents"] = {str(f): content_fingerprint(f) for s in sources if isinstance(s, FileSource) for f in s.files}
    return out


_DONE = object()


class StatefulLoader:
    """Iterator of this rank's micro-batches of the global row order, produced `prefetch` ahead by a background
    thread that drives every shard the rank holds."""

    def __init__(self, cfg: DataConfig, order: RankRows, micro_batch_size: int, fingerprint: dict,
                 pool: ThreadPoolExecutor):
        self.cfg, self.order, self.batch_size, self.prefetch = cfg, order, micro_batch_size, cfg.prefetch
        self.fingerprint, self.sft, self._pool = fingerprint, cfg.kind == "sft", pool
        self._snapshot: tuple | None = None
        self._thread: threading.Thread | None = None
        self._queue: queue.Queue = queue.Queue(maxsize=max(1, cfg.prefetch))
        self._stop = threading.Event()

    def load_state_dict(self, state: dict) -> None:
        """`state`: `merge_data_states` of every rank's `state_dict()` (a single rank's, when it owned every shard)."""
        if self._thread is not None:
            raise RuntimeError("load_state_dict() must come before the first batch is drawn")
        if "global_rows" not in state:
            merge_data_states([state])  # raises the message for the older per-rank format
        saved = state.get("fingerprint", {})
        if saved.get("order") != ORDER_VERSION:
            raise DataError(f"data: the checkpoint's data position belongs to another version of the data order "
                            f"({saved.get('order', 1)}, this one reads version {ORDER_VERSION}: the shuffle buffer "
                            "is split over the shards, bad records counted once); resume with "
                            "checkpoint.data_resume=reset (restarts the data stream, keeps weights and optimizer)")
        problems = content_changes(saved.get("contents", {}), self.fingerprint.get("contents", {}))
        if problems:
            raise DataError("data: the training files changed since the checkpoint, so its saved positions in them "
                            "mean other records: " + "; ".join(problems[:3]) +
                            (f" (and {len(problems) - 3} more)" if len(problems) > 3 else "") +
                            "; restore the files, or resume with checkpoint.data_resume=reset (restarts the data "
                            "stream, keeps weights and optimizer); appending to a file is allowed")
        changed = sorted(k for k in self.fingerprint if k != "contents" and saved.get(k) != self.fingerprint[k])
        if changed:
            raise DataError("data: the checkpoint's data position was saved with other settings; changed: " + "; ".join(
                f"{k}: {saved.get(k)!r} -> {self.fingerprint[k]!r}" for k in changed) +
                " (resume with the original data settings, or start from the weights alone: launch/convert.py)")
        order, rows = self.order, state["global_rows"]
        if rows % order.world:
            raise DataError(f"data: the checkpoint's data position is after {rows} global rows, which "
                            f"{order.world} data-parallel ranks cannot share out evenly: resume with a process count "
                            f"dividing {rows}")
        keys = {order.key(c, i): (c, i) for c, i in order.pipelines}
        missing = [key for key in keys if key not in state["shards"]]
        if missing:
            raise DataError(f"data: the checkpoint's data state lacks shard(s) {', '.join(missing)} of data.shards="
                            f"{order.shards} that data-parallel rank {order.rank} of {order.world} needs (each shard "
                            "is written by one rank: is a data_rank file missing from the checkpoint?)")
        for key, pipeline_key in keys.items():
            order.pipelines[pipeline_key].load_state(state["shards"][key])
        order.stale = set(order.pipelines)
        order.global_rows = order.blend.rows = rows
        order.blend.counts = [int(c) for c in state.get("source_rows", [rows])]
        self._snapshot = None

    def _current(self) -> tuple[int, dict[tuple[int, int], tuple], tuple[int, ...]]:
        return self._snapshot or self.order.snapshot()

    def state_dict(self) -> dict:
        """The position after the last micro-batch handed out (before the first: the one it starts from), with the
        shards this rank owns."""
        rows, pipelines, counts = self._current()
        owned = set(self.order.owned)
        return {"global_rows": rows, "fingerprint": dict(self.fingerprint), "source_rows": list(counts),
                "shards": {self.order.key(c, i): self.order.pipelines[(c, i)].state_from(snapshot)
                           for (c, i), snapshot in pipelines.items() if c in owned}}

    @property
    def global_rows(self) -> int:
        """Global rows consumed by all ranks together up to the last micro-batch handed out."""
        return self._current()[0]

    @property
    def rows_by_source(self) -> dict[str, int]:
        """Global rows (over all ranks) each training source gave up to the last micro-batch handed out."""
        return dict(zip(self.order.names, self._current()[2]))

    @property
    def epoch(self) -> int:
        """The smallest epoch the held shards' sources were reading when the last batch handed out was made (0
        before every shard finished its first pass)."""
        return min(snapshot[0].epoch for snapshot in self._current()[1].values())

    @property
    def source_epochs(self) -> dict[str, int]:
        """For each training source, the furthest epoch any of its held shards had reached at the last batch handed
        out (shards finish their passes at slightly different rows: this is when the source starts wrapping)."""
        epochs: dict[str, int] = {}
        for (_, stream), snapshot in self._current()[1].items():
            name = self.order.names[stream]
            epochs[name] = max(epochs.get(name, 0), snapshot[0].epoch)
        return epochs

    @property
    def bad_records(self) -> dict[str, Any]:
        """Skipped records (by reason) and usable ones (`good`) of their first pass, up to the last batch handed
        out, over the shards this rank owns, so that a sum over ranks counts each record once. With one rank the
        loader stops on too many bad records itself; with more, the trainer checks the sums over ranks
        (`check_bad_fraction`)."""
        return self._bad_records(self._current(), self.order.owned).state()

    @staticmethod
    def _bad_records(snapshot: tuple, owned: list[int]) -> BadRecords:
        total = BadRecords()
        for (c, _), pipeline in snapshot[1].items():
            if c not in owned:
                continue
            bad = BadRecords.from_state(pipeline[3])
            total.counts.update(bad.counts)
            total.examples += bad.examples[:MAX_EXAMPLES - len(total.examples)]
            total.good += bad.good
        return total

    def _batches(self) -> Iterator[tuple[dict[str, torch.Tensor], tuple]]:
        rows: list[dict] = []
        with closing(self.order.rows()) as stream:
            for row in stream:
                rows.append(row)
                if len(rows) == self.batch_size:
                    snapshot = self.order.snapshot()
                    if self.order.world == 1 and self.order.counted:  # it reads every record: the job's figures
                        check_bad_fraction(self.cfg, self._bad_records(snapshot, self.order.owned))
                    yield collate(rows, self.sft), snapshot
                    rows = []

    def _produce(self) -> None:
        batches = self._batches()
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
            if not self._stop.is_set():  # (after close() nobody reads the queue)
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
        self._pool.shutdown(wait=False, cancel_futures=True)


def build_loader(cfg: DataConfig, tokenizer: TextTokenizer, micro_batch_size: int, seed: int, rank: int = 0,
                 world: int = 1, split: str = "train", vocab_limit: int | None = None) -> StatefulLoader | None:
    """The loader of data-parallel rank `rank` of `world` for `split` ("train" or "val"); None when there is no val
    data. Validation uses the same order with shuffling off, over one shard (a held-out set is small: every rank
    reads all of it and keeps its rows, and a held-out file of few records never needs data.shards changed).
    `vocab_limit`: the model's vocabulary; a stored token id at or past it stops the run naming the file and
    document (default: the tokenizer's)."""
    cfg.validate()
    vocab_limit = vocab_limit or tokenizer.vocab_size
    if not 0 <= rank < world:
        raise ValueError(f"data-parallel rank {rank} is not in [0, {world})")
    shards = cfg.shards if split == "train" else 1
    held, _ = shard_layout(shards, rank, world)
    mixture = cfg.sources() if split == "train" and cfg.source == "files" else [None]
    pool = ThreadPoolExecutor(max_workers=2, thread_name_prefix="tokenize")
    pipelines: dict[tuple[int, int], Pipeline] = {}
    for stream in range(len(mixture)):
        for c in held:
            source = build_source(cfg, split, seed, c, shards, stream)
            if source is None:
                pool.shutdown()
                return None
            source.vocab_limit = vocab_limit
            pipelines[(c, stream)] = Pipeline(cfg, tokenizer, source, micro_batch_size, seed, c, shards,
                                              shuffle=split == "train", pool=pool, stream=stream)
    for pipeline in pipelines.values():
        # The held pipelines advance together, so one round of chunks tokenizes data.docs_per_chunk documents, as
        # one shard's chunk would: the first batch waits for no more tokenizing than with a single shard. But not
        # under MIN_CHUNK documents, which keep the tokenizer's batch encoding busy (a micro-batch's first rows
        # touch only its own shards), and indexed datasets, with nothing to tokenize, keep larger chunks.
        floor = PRETOKENIZED_CHUNK if getattr(pipeline.source, "pretokenized", False) else MIN_CHUNK
        pipeline.docs_per_chunk = max(-(-cfg.docs_per_chunk // len(pipelines)), min(floor, cfg.docs_per_chunk))
    names = [m.name if m else "data" for m in mixture]
    order = RankRows(pipelines, shards, rank, world, names)
    if cfg.mixture and split == "train":
        order.blend = Blend([m.weight for m in mixture])
    sources = [pipelines[(held[0], stream)].source for stream in range(len(mixture))]
    return StatefulLoader(cfg, order, micro_batch_size,
                          fingerprint(cfg, tokenizer, sources, seed, cfg.mixture if split == "train" else None), pool)


__all__ = ["DataError", "StatefulLoader", "build_loader", "build_tokenizer", "check_bad_fraction", "check_inputs",
           "describe_sources", "epoch_rows", "merge_data_states"]
