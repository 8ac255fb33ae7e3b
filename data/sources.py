"""Document sources: resumable, split into disjoint parts (the canonical shards), with bad records skipped and counted.

A source is an endless sequence of *records* (a JSON line, a Parquet row, a whole text file, a hub example),
epoch after epoch, with the file order reshuffled each epoch from the seed. A source is built as part `rank` of
`world`: record k of the order belongs to part k % world, every part walks the same order and parses only its own
records, so no record is read by two parts. The loader builds canonical shard c of `data.shards` as the part
(rank=c, world=data.shards), whatever the number of data-parallel ranks (docs/data.md#data-order). `Position` says
where a part stands, so a resumed run continues with the very next record.

Records that cannot be used (malformed JSON, a missing or non-string field, an empty document, invalid UTF-8) are
skipped and counted by reason, with the file and line of the first few, in `BadRecords`: in the first pass only, so
a record is counted once however many epochs the run makes (later passes skip it silently).

A part reads only its own records (docs/data.md#data-order): JSON Lines through a one-time index of line
offsets (`line_index`, cached in `data.cache_dir`), Megatron `.bin/.idx` indexed datasets (`data/indexed.py`) by
document through their own index, whole text files by name. Parquet files are the exception: a part decodes the text
column of every row group and keeps its own rows.
"""

from __future__ import annotations

import functools
import glob
import hashlib
import json
import os
import sysconfig
import zlib
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from .errors import DataError, SourceExhausted
from .indexed import IndexedDataset

MAX_EXAMPLES = 20
JSON_SUFFIXES = (".jsonl", ".json", ".ndjson")
PARQUET_SUFFIXES = (".parquet",)
TEXT_SUFFIXES = (".txt", ".md", ".text", ".py", ".rst")
INDEXED_SUFFIXES = (".bin",)  # with its .idx beside it: a Megatron indexed dataset (data/indexed.py)




@dataclass
class BadRecords:
    """Skipped records by reason, with `file:line` of the first few, and the usable ones (`good`), counted in the
    first pass over the data only (epoch 0): once per record however many epochs a run makes."""

    counts: Counter = field(default_factory=Counter)
    examples: list[str] = field(default_factory=list)
    good: int = 0

    def add(self, reason: str, where: str, epoch: int = 0) -> None:
        if epoch:
            return
        self.counts[reason] += 1
        if len(self.examples) < MAX_EXAMPLES:
            self.examples.append(f"{where}: {reason}")

    def ok(self, epoch: int = 0) -> None:
        """A usable record read in `epoch`."""
        self.good += not epoch

    @property
    def bad(self) -> int:
        return sum(self.counts.values())

    def fraction(self) -> float:
        total = self.good + self.bad
        return self.bad / total if total else 0.0

    def state(self) -> dict:
        return {"counts": dict(self.counts), "examples": list(self.examples), "good": self.good}

    @classmethod
    def from_state(cls, state: dict) -> BadRecords:
        return cls(Counter(state["counts"]), list(state["examples"]), state["good"])


@dataclass
class Position:
    """Where a rank stands: epoch, index into that epoch's file order, offset inside the file (byte offset of the
    next JSON line, next Parquet row; 0 for whole-file records), and the global record counter."""

    epoch: int = 0
    file: int = 0
    offset: int = 0
    line: int = 0  # lines of the current JSON Lines file already read, to report bad lines by number
    record: int = 0
    extra: dict[str, Any] = field(default_factory=dict)  # hub sources keep datasets' own state here

    def state(self) -> dict:
        return {"epoch": self.epoch, "file": self.file, "offset": self.offset, "line": self.line,
                "record": self.record, "extra": dict(self.extra)}

    @classmethod
    def from_state(cls, state: dict) -> Position:
        return cls(**state)


@dataclass
class Record:
    """One usable record: its payload (text, or a message list for SFT), where it came from, and the position
    just after it."""

    payload: Any
    where: str
    position: Position


def what_to_fix(counts: Counter | dict) -> str:
    """A hint for a stream whose records are unusable: a missing field usually means the wrong field name."""
    if any(reason.startswith("missing field") for reason in counts):
        return ("; the records lack the configured field: set data.text_field=<field> (data.messages_field=<field> "
                "for SFT) to the one holding the text")
    return ""


def check_text(value: Any, field_name: str) -> str | None:
    """None if `value` is a usable document text, else the reason it is not."""
    if value is None:
        return f"missing field '{field_name}'"
    if not isinstance(value, str):
        return f"field '{field_name}' is {type(value).__name__}, not a string"
    if not value.strip():
        return "empty document"
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        return "invalid unicode (lone surrogate)"
    return None


def expand_globs(patterns: list[str], key: str = "data.paths") -> list[Path]:
    """Sorted files matching the globs; a directory stands for the supported files under it (recursively). A
    pattern that matches no file is an error naming it."""
    supported = JSON_SUFFIXES + PARQUET_SUFFIXES + TEXT_SUFFIXES + INDEXED_SUFFIXES
    files: list[Path] = []
    for pattern in patterns:
        path = Path(os.path.expanduser(pattern))
        if path.is_dir():
            matches = sorted(p for p in path.rglob("*") if p.is_file() and p.suffix.lower() in supported)
            if not matches:
                raise DataError(f"{key}: {pattern!r} is a directory without .jsonl/.json, .parquet, .txt/.md or "
                                f".bin/.idx files; give the files or a glob (e.g. {str(path / '*.jsonl')!r})")
        else:
            matches = sorted(Path(p) for p in glob.glob(str(path), recursive=True) if Path(p).is_file())
        matches = [m for m in matches if not is_shard_manifest(m)]
        if not matches:
            raise DataError(f"{key}: {pattern!r} matches no file")
        for match in matches:
            if match.suffix.lower() == ".idx":  # an indexed dataset named by its index: read as its .bin
                match = match.with_suffix(".bin")
                if not match.is_file():
                    raise DataError(f"{key}: {match.with_suffix('.idx')} has no {match.name} beside it (an indexed "
                                    "dataset is a .bin/.idx pair)")
            if match.suffix.lower() not in supported:
                raise DataError(f"{key}: {match} has an unsupported format (use .jsonl/.json, .parquet, .txt/.md or "
                                "a .bin/.idx indexed dataset)")
            files.append(match)
    return list(dict.fromkeys(files))  # a file named by two globs is read once


def is_shard_manifest(path: Path) -> bool:
    """The tokenize job's manifest.json (data/manifest.py), which a directory or `DIR/*` glob of shards also
    names: not an input."""
    return path.name == "manifest.json" and any(path.parent.glob("*.idx"))


def opened(path: Path, cache_dir: str | os.PathLike | None = None):
    """The line index of a JSON Lines file or the IndexedDataset of a .bin, from a small per-process cache keyed by
    the file's size and modification time: every shard of a rank walks the same files, every pass."""
    stat = path.stat()
    return _opened(str(path), stat.st_size, stat.st_mtime_ns, None if cache_dir is None else str(cache_dir))


@functools.lru_cache(maxsize=16)
def _opened(path: str, size: int, mtime_ns: int, cache_dir: str | None):
    if path.lower().endswith(INDEXED_SUFFIXES):
        return IndexedDataset(path)
    return line_index(Path(path), cache_dir)


def line_index(path: Path, cache_dir: str | os.PathLike | None = None) -> np.ndarray:
    """Byte offsets of the lines of a JSON Lines file: line i is bytes [index[i], index[i + 1]) (its newline
    included), as `readline` cuts them. Built by one read of the file and, with `cache_dir`, kept there (keyed by
    the file's path, size and modification time, written atomically), so every later launch and every rank of a
    machine memory-maps it instead of reading the file."""
    stat = path.stat()
    key = hashlib.sha256(f"{path.resolve()}|{stat.st_size}|{stat.st_mtime_ns}|v1".encode()).hexdigest()[:24]
    cached = Path(cache_dir).expanduser() / "line_index" / f"{key}.npy" if cache_dir else None
    if cached is not None and cached.is_file():
        try:
            return np.load(cached, mmap_mode="r")
        except (OSError, ValueError):  # a damaged cache entry is rebuilt
            pass
    starts = [np.zeros(1, np.int64)]
    with open(path, "rb") as f:
        done = 0
        while block := f.read(1 << 24):
            starts.append(np.flatnonzero(np.frombuffer(block, np.uint8) == 10).astype(np.int64) + done + 1)
            done += len(block)
    index = np.concatenate(starts)
    if index[-1] != stat.st_size:  # a last line without a newline
        index = np.append(index, stat.st_size)
    if cached is not None:
        try:
            cached.parent.mkdir(parents=True, exist_ok=True)
            tmp = cached.with_suffix(f".{os.getpid()}.tmp.npy")
            np.save(tmp, index)
            os.replace(tmp, cached)
        except OSError:  # a read-only cache only costs the rebuild
            pass
    return index


Extract = Callable[[dict], tuple[Any, str | None]]  # a parsed JSON object -> (payload, reason it is bad or None)


def text_extractor(field_name: str) -> Extract:
    def extract(obj: dict) -> tuple[Any, str | None]:
        value = obj.get(field_name)
        return value, check_text(value, field_name)
    return extract


CONTENT_SAMPLES, CONTENT_BLOCK = 16, 4096
"""A file's content fingerprint: this many blocks of this many bytes, spread over the fingerprinted length."""


def content_fingerprint(path: Path, size: int | None = None) -> dict:
    """{size, sample}: the first `size` bytes of `path` (default: all of it) summarised by a SHA-256 of
    `CONTENT_SAMPLES` + 1 blocks spread evenly over them, the last ending at `size` (68 KiB read per file, whatever
    its size). Recomputed at the saved size it tells a file that was only appended to (the same) from one
    rewritten, reordered or replaced (almost surely another)."""
    size = path.stat().st_size if size is None else size
    digest = hashlib.sha256(str(size).encode())
    with open(path, "rb") as f:
        for k in range(CONTENT_SAMPLES + 1):
            start = min(max(0, size - CONTENT_BLOCK), k * size // CONTENT_SAMPLES)
            f.seek(start)
            digest.update(f.read(min(CONTENT_BLOCK, size - start)))
    return {"size": size, "sample": digest.hexdigest()[:24]}


def content_changes(saved: dict[str, dict], now: dict[str, dict]) -> list[str]:
    """How the files of `saved` ({path: content_fingerprint}) differ now, one phrase each; appending keeps the
    bytes a run has read, so it is not a change. `now`: the fingerprints just taken of the same files, whose
    samples are compared directly where the size is unchanged (no second read)."""
    problems = []
    for name, was in saved.items():
        path = Path(name)
        if not path.is_file():
            problems.append(f"{name}: gone")
            continue
        size = path.stat().st_size
        current = now.get(name) if now.get(name, {}).get("size") == was["size"] == size else None
        if size < was["size"]:
            problems.append(f"{name}: truncated ({was['size']:,} -> {size:,} bytes)")
        elif (current or content_fingerprint(path, was["size"]))["sample"] != was["sample"]:
            problems.append(f"{name}: its first {was['size']:,} bytes changed (rewritten, reordered or replaced)")
    return problems


class FileSource:
    """Local JSON Lines / Parquet / text files and `.bin/.idx` indexed datasets, as records in file order, shuffled
    file order per epoch. A `.bin` file's records are its documents, already token ids (numpy arrays); the others'
    records are texts (or message lists for SFT).

    `seed`: an int, or a sequence of ints (a mixture's sources each have their own). `epochs`: stop after that many
    passes, raising `SourceExhausted` (mixture sources, docs/data.md#mixtures); `name` labels its messages.
    `cache_dir`: where JSON Lines line indexes are kept (`line_index`)."""

    def __init__(self, files: list[Path], extract: Extract, field_name: str, seed: int | tuple[int, ...], rank: int,
                 world: int, shuffle_files: bool = True, *, name: str | None = None, epochs: int | None = None,
                 cache_dir: str | os.PathLike | None = None):
        """`field_name` is the column Parquet files must have (`data.text_field`, or `data.messages_field` for SFT)."""
        if not files:
            raise DataError("data: no input files")
        self.files, self.extract, self.field_name = files, extract, field_name
        self.seed = tuple(seed) if isinstance(seed, (tuple, list)) else (seed,)
        self.rank, self.world, self.shuffle_files = rank, world, shuffle_files
        self.name, self.epochs, self.cache_dir = name, epochs, cache_dir
        self.vocab_limit: int | None = None  # token ids of indexed datasets must be below it (set by the loader)
        self.bad = BadRecords()

    def identity(self) -> list[str]:
        return [str(f) for f in self.files]

    @property
    def pretokenized(self) -> bool:
        """Every file is an indexed dataset: records are token ids, nothing to tokenize."""
        return all(f.suffix.lower() in INDEXED_SUFFIXES for f in self.files)

    def file_order(self, epoch: int) -> list[Path]:
        if not self.shuffle_files:
            return self.files
        order = np.random.default_rng([*self.seed, epoch]).permutation(len(self.files))
        return [self.files[i] for i in order]

    def records(self, start: Position) -> Iterator[Record]:
        pos = Position(**start.state())
        label = f"data.mixture[{self.name}]" if self.name else "data"
        while True:
            if self.epochs is not None and pos.epoch >= self.epochs:
                raise SourceExhausted(f"{label}: all {self.epochs} epoch(s) of this source are used up (its "
                                      "`epochs` cap); raise its epochs, drop the cap, or train fewer steps")
            full_pass, good = pos.file == 0 and pos.offset == 0, 0
            files = self.file_order(pos.epoch)
            while pos.file < len(files):
                path = files[pos.file]
                suffix = path.suffix.lower()
                if suffix in JSON_SUFFIXES:
                    reader = self._json_lines(path, pos)
                elif suffix in PARQUET_SUFFIXES:
                    reader = self._parquet(path, pos)
                elif suffix in INDEXED_SUFFIXES:
                    reader = self._indexed(path, pos)
                else:
                    reader = self._text_file(path, pos)
                for record in reader:
                    good += 1
                    yield record
                pos.file, pos.offset, pos.line = pos.file + 1, 0, 0
            if full_pass and not good:
                raise DataError(f"{label}: a whole pass over {len(self.files)} files gave rank {self.rank} no usable "
                                f"record; skipped: {dict(self.bad.counts)}; first: {self.bad.examples[:3]}"
                                f"{what_to_fix(self.bad.counts)}")
            pos.epoch, pos.file, pos.offset, pos.line = pos.epoch + 1, 0, 0, 0

    def _skip(self, reason: str, where: str, pos: Position) -> None:
        self.bad.add(reason, where, pos.epoch)

    def _good(self, payload: Any, where: str, pos: Position) -> Record:
        self.bad.ok(pos.epoch)
        return Record(payload, where, Position(**pos.state()))

    def _next_own(self, pos: Position, count: int) -> int | None:
        """The index (in this file) of this part's next record after `pos.line` records of a file of `count`, with
        `pos.record` and `pos.line` moved past the others' records up to it; None (and `pos` at the file's end)
        when the file has no more of them."""
        skip = (self.rank - pos.record) % self.world
        local = pos.line + skip
        if local >= count:
            pos.record += count - pos.line
            pos.line = count
            return None
        pos.record += skip + 1
        pos.line = local + 1
        return local

    def _json_lines(self, path: Path, pos: Position) -> Iterator[Record]:
        index = opened(path, self.cache_dir)
        count = len(index) - 1
        with open(path, "rb") as f:
            while (local := self._next_own(pos, count)) is not None:
                begin, end = int(index[local]), int(index[local + 1])
                pos.offset = end
                f.seek(begin)
                raw = f.read(end - begin)
                where = f"{path}:{local + 1}"
                try:
                    text = raw.decode("utf-8")
                except UnicodeDecodeError:
                    self._skip("invalid UTF-8", where, pos)
                    continue
                if begin == 0:
                    text = text.removeprefix("\ufeff")
                if not text.strip():
                    self._skip("empty line", where, pos)
                    continue
                try:
                    obj = json.loads(text)
                except json.JSONDecodeError as e:
                    self._skip(f"malformed JSON ({e.msg})", where, pos)
                    continue
                if not isinstance(obj, dict):
                    self._skip(f"JSON {type(obj).__name__}, not an object", where, pos)
                    continue
                payload, reason = self.extract(obj)
                if reason:
                    self._skip(reason, where, pos)
                    continue
                yield self._good(payload, where, pos)
        pos.offset = int(index[-1])

    def _indexed(self, path: Path, pos: Position) -> Iterator[Record]:
        dataset = opened(path)
        signed = np.issubdtype(dataset.dtype, np.signedinteger)
        pos.line = pos.offset  # documents already passed: for .bin files both count documents
        while (local := self._next_own(pos, len(dataset))) is not None:
            pos.offset = pos.line
            tokens = dataset.document(local)
            if len(tokens) and self.vocab_limit is not None and (
                    tokens.max() >= self.vocab_limit or signed and tokens.min() < 0):
                bad = int(tokens.max()) if tokens.max() >= self.vocab_limit else int(tokens.min())
                raise DataError(f"{path}: document {local} holds token id {bad}, outside the model's vocabulary of "
                                f"{self.vocab_limit} ids: were these shards made with another tokenizer? (set "
                                "data.tokenizer to theirs, or re-tokenize with launch/tokenize.py)")
            yield self._good(tokens, f"{path}:document {local}", pos)
        pos.offset = pos.line

    def _parquet(self, path: Path, pos: Position) -> Iterator[Record]:
        import pyarrow.parquet as pq

        try:
            pf = pq.ParquetFile(path)
        except Exception as e:  # pyarrow raises ArrowInvalid / OSError for damaged files
            raise DataError(f"{path}: not a readable Parquet file ({e})") from None
        if self.field_name not in pf.schema_arrow.names:
            raise DataError(f"{path}: no column {self.field_name!r} (columns: {pf.schema_arrow.names}); "
                            "set data.text_field (or data.messages_field for SFT)")
        row0 = 0
        for group in range(pf.num_row_groups):
            rows = pf.metadata.row_group(group).num_rows
            if row0 + rows <= pos.offset:
                row0 += rows
                continue
            column = pf.read_row_group(group, columns=[self.field_name]).column(0).to_pylist()
            for i in range(pos.offset - row0, rows):
                pos.offset = row0 + i + 1
                if not self._mine(pos):
                    continue
                payload, reason = self.extract({self.field_name: column[i]})
                if reason:
                    self._skip(reason, f"{path}:row {row0 + i}", pos)
                    continue
                yield self._good(payload, f"{path}:row {row0 + i}", pos)
            row0 += rows

    def _mine(self, pos: Position) -> bool:
        mine = pos.record % self.world == self.rank
        pos.record += 1
        return mine

    def _text_file(self, path: Path, pos: Position) -> Iterator[Record]:
        if not self._mine(pos):
            return
        try:
            text = path.read_bytes().decode("utf-8")
        except UnicodeDecodeError as e:
            self._skip(f"invalid UTF-8 at byte {e.start}", str(path), pos)
            return
        reason = check_text(text, "text")
        if reason:
            self._skip(reason, str(path), pos)
            return
        after = Position(**pos.state())
        after.file += 1  # a whole-file record: the next record starts the next file
        record = self._good(text, str(path), pos)
        record.position = after
        yield record


# ---------------------------------------------------------------------------------------------- built-in corpus
def stdlib_documents() -> list[tuple[str, Callable[[], bytes]]]:
    """(name, reader) of every document of the built-in corpus, in a fixed order: the running interpreter's
    standard library sources (tests and site-packages excluded) and the pydoc_data topics."""
    root = Path(sysconfig.get_paths()["stdlib"])
    skip = {"site-packages", "dist-packages", "test", "tests", "idle_test", "__pycache__"}
    docs: list[tuple[str, Callable[[], bytes]]] = []
    paths = []
    for folder, subfolders, files in os.walk(root):
        subfolders[:] = [d for d in subfolders if d not in skip]  # never descend into installed packages
        paths += [Path(folder, f) for f in files if f.endswith(".py")]
    for path in sorted(paths):
        if path.stat().st_size:  # an empty __init__.py holds no text
            docs.append((f"stdlib/{path.relative_to(root)}", path.read_bytes))
    try:
        from pydoc_data.topics import topics
    except ImportError:  # some distributions strip pydoc_data
        topics = {}
    for name in sorted(topics):
        docs.append((f"pydoc_data/{name}", lambda text=topics[name]: text.encode("utf-8")))
    return docs


def stdlib_split(split: str, holdout_every: int) -> list[tuple[str, Callable[[], bytes]]]:
    """The train or val documents: 1 in `holdout_every` by a stable hash of the name goes to val, never to train."""
    def held_out(name: str) -> bool:
        return zlib.crc32(name.encode()) % holdout_every == 0
    return [d for d in stdlib_documents() if held_out(d[0]) == (split == "val")]


class StdlibSource:
    """The built-in corpus as whole-document records, document order reshuffled per epoch."""

    def __init__(self, split: str, holdout_every: int, seed: int, rank: int, world: int, shuffle: bool = True):
        self.docs = stdlib_split(split, holdout_every)
        if len(self.docs) < world:
            raise DataError(f"the built-in corpus {split} split has {len(self.docs)} documents, fewer than the "
                            f"{world} shards it is split into (lower data.shards)")
        self.seed, self.rank, self.world, self.shuffle = seed, rank, world, shuffle
        self.bad = BadRecords()

    def fingerprint(self) -> str:
        return "|".join(name for name, _ in self.docs)

    def identity(self) -> list[str]:
        return [f"stdlib:{len(self.docs)} documents:{hashlib.sha256(self.fingerprint().encode()).hexdigest()[:16]}"]

    def texts(self) -> list[str]:
        return [read().decode("utf-8", errors="replace") for _, read in self.docs]

    def records(self, start: Position) -> Iterator[Record]:
        pos = Position(**start.state())
        while True:
            order = (np.random.default_rng([self.seed, pos.epoch]).permutation(len(self.docs)) if self.shuffle
                     else np.arange(len(self.docs)))
            while pos.file < len(order):
                name, read = self.docs[order[pos.file]]
                mine = pos.record % self.world == self.rank
                pos.record += 1
                pos.file += 1
                if not mine:
                    continue
                try:
                    text = read().decode("utf-8")
                except UnicodeDecodeError as e:
                    self.bad.add(f"invalid UTF-8 at byte {e.start}", name, pos.epoch)
                    continue
                reason = check_text(text, "text")
                if reason:
                    self.bad.add(reason, name, pos.epoch)
                    continue
                self.bad.ok(pos.epoch)
                yield Record(text, name, Position(**pos.state()))
            pos.epoch, pos.file = pos.epoch + 1, 0


# ---------------------------------------------------------------------------------------------- hub datasets
class HubSource:
    """A Hugging Face dataset streamed through `datasets` (hub name or a builder like `json` with data_files),
    sharded with `split_dataset_by_node`; `datasets`' own state_dict makes the position exact."""

    def __init__(self, path: str, name: str | None, split: str, data_files: list[str], extract: Extract, seed: int,
                 rank: int, world: int):
        from datasets import load_dataset
        from datasets.distributed import split_dataset_by_node

        kwargs = {"data_files": data_files} if data_files else {}
        try:
            dataset = load_dataset(path, name, split=split, streaming=True, **kwargs)
        except Exception as e:  # datasets raises many types (FileNotFoundError, DatasetNotFoundError, ...)
            raise DataError(f"data.hub_path={path!r}: cannot open the dataset ({type(e).__name__}: {e})") from None
        self.dataset = split_dataset_by_node(dataset, rank=rank, world_size=world)
        self.extract, self.seed, self.rank = extract, seed, rank
        self._identity = [f"hub:{path}:{name}:{split}", *data_files]
        self.bad = BadRecords()

    def identity(self) -> list[str]:
        return list(self._identity)

    def records(self, start: Position) -> Iterator[Record]:
        pos = Position(**start.state())
        while True:
            self.dataset.set_epoch(pos.epoch)
            if pos.extra.get("datasets_state"):
                self.dataset.load_state_dict(pos.extra["datasets_state"])
            good = 0
            for example in self.dataset:
                pos.record += 1
                payload, reason = self.extract(example)
                if reason:
                    self.bad.add(reason, f"{self.dataset.info.dataset_name or 'hub'}:example {pos.record}", pos.epoch)
                    continue
                good += 1
                self.bad.ok(pos.epoch)
                pos.extra = {"datasets_state": self.dataset.state_dict()}
                yield Record(payload, f"hub:{pos.record}", Position(**pos.state()))
            if not good and not pos.extra.get("datasets_state"):
                raise DataError(f"data: a whole pass over the hub dataset gave rank {self.rank} no usable record; "
                                f"skipped: {dict(self.bad.counts)}; first: {self.bad.examples[:3]}"
                                f"{what_to_fix(self.bad.counts)}")
            pos.epoch, pos.extra = pos.epoch + 1, {}
