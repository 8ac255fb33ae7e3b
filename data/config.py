"""The data configuration (the `data` node of the Hydra config; `conf/data/*.yaml` are its presets)."""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass, field

KINDS = ("pretrain", "sft")
SOURCES = ("stdlib", "files", "hub")


@dataclass
class MixtureSource:
    """One source of `data.mixture` (docs/data.md#mixtures)."""

    name: str = ""
    """Its name in the log, metrics (`tokens_by_source`) and errors; unique within the mixture."""
    paths: list[str] = field(default_factory=list)
    """Globs, as `data.paths`: JSON Lines, Parquet, text, or `.bin/.idx` indexed datasets."""
    weight: float | None = None
    """Its share of the training sequences (weights are normalised to sum to 1)."""
    text_field: str | None = None
    """Field holding the text (default: `data.text_field`)."""
    messages_field: str | None = None
    """SFT: field holding the messages (default: `data.messages_field`)."""
    epochs: int | None = None
    """Passes over this source at most; the run stops with a message when they are used up (default: no cap, each
    pass starts the next epoch in its own seeded order)."""


@dataclass
class DataConfig:
    kind: str = "pretrain"
    """`pretrain`: documents packed into fixed windows, loss on every token; `sft`: chat conversations rendered with
    the DeepSeek-V2 template, loss on assistant tokens only, packed without attending across conversations."""
    source: str = "stdlib"
    """`stdlib` (built in: this Python's standard library sources and pydoc topics, nothing downloaded), `files`
    (`paths`: JSON Lines, Parquet or plain-text globs) or `hub` (a Hugging Face dataset, streamed)."""
    paths: list[str] = field(default_factory=list)
    """Globs of local files for `source=files`: *.jsonl / *.json (one JSON object per line), *.parquet, *.txt / *.md
    (one document per file), *.bin with its *.idx (a Megatron indexed dataset of token ids: `launch/tokenize.py`)."""
    mixture: list[MixtureSource] = field(default_factory=list)
    """`source=files`: a weighted mixture instead of `paths`, each `{name, paths, weight}` plus optional
    `text_field`, `messages_field`, `epochs` (docs/data.md#mixtures). Each packed sequence comes from one source; at
    every point each source's count of sequences is within one of its weight x the total."""
    hub_path: str | None = None
    """`source=hub`: the dataset name (or a builder such as `json`), passed to `datasets.load_dataset(streaming=True)`."""
    hub_name: str | None = None
    """`source=hub`: the dataset configuration name."""
    hub_split: str = "train"
    hub_data_files: list[str] = field(default_factory=list)
    """`source=hub`: data_files for builder datasets (json, parquet, text)."""
    text_field: str = "text"
    """Field holding a document's text (JSON Lines, Parquet, hub)."""
    messages_field: str = "messages"
    """`kind=sft`: field holding the list of {role, content} messages."""
    tokenizer: str | None = None
    """A tokenizer.json file or a directory holding one (e.g. a released checkpoint). Default: a byte-level BPE of
    `vocab_size` trained once on the built-in corpus and cached in `cache_dir`."""
    vocab_size: int = 4096
    """Vocabulary of the built-in BPE (ignored when `tokenizer` is given)."""
    seq_len: int = 256
    """Tokens per training sequence."""
    val_paths: list[str] = field(default_factory=list)
    """Held-out files for validation (same formats as `paths`). Default: a held-out slice of the built-in corpus
    (every document whose name hashes to 0 mod `holdout_every`) that the training stream never reads."""
    holdout_every: int = 50
    """The built-in corpus puts 1 in `holdout_every` documents (by a stable hash of their name) in the validation
    split. (How often validation runs is `trainer.val_every`.)"""
    val_every: int | None = None
    """Deprecated name of `holdout_every` (it read like `trainer.val_every`); still accepted."""
    shards: int = 8
    """Canonical shards of the data order (docs/data.md#data-order): shard c reads the records k with k mod
    `shards` == c and packs and shuffles them on its own, and global row n is the next row of shard n mod `shards`,
    so the global batches do not depend on the number of data-parallel ranks. Choose a multiple of every
    data-parallel size you will run at: then each rank reads only its own shards' records. Part of the resumable
    state: a checkpoint resumes only with the same value."""
    shuffle_buffer: int = 128
    """Packed sequences held for shuffling, over all shards together: each canonical shard (of each mixture source)
    holds ceil(shuffle_buffer / shards) in its seeded buffer, so neither the first batch's wait nor the checkpointed
    state grows with `shards` (part of the resumable state)."""
    prefetch: int = 8
    """Micro-batches prepared ahead by the background worker."""
    docs_per_chunk: int = 128
    """Documents tokenized per `encode_batch` call."""
    max_bad_fraction: float = 0.01
    """Stop with an error when more than this fraction of the records read are malformed (checked once at least
    `bad_check_after` records were read)."""
    bad_check_after: int = 200
    cache_dir: str = "~/.cache/latentmoe"
    """Where the built-in BPE is cached."""

    def __post_init__(self) -> None:
        if self.val_every is not None:
            warnings.warn("data.val_every is deprecated: it is data.holdout_every (the held-out share of the "
                          "built-in corpus); how often validation runs is trainer.val_every", stacklevel=2)
            self.holdout_every, self.val_every = self.val_every, None

    def sources(self) -> list[MixtureSource]:
        """The training sources: `mixture`, or one source named `data` made of `paths` (a one-source mixture reads
        exactly as `paths`), with the field names filled in."""
        listed = self.mixture or [MixtureSource("data", list(self.paths), 1.0)]
        return [MixtureSource(m.name, list(m.paths), m.weight, m.text_field or self.text_field,
                              m.messages_field or self.messages_field, m.epochs) for m in listed]

    def paths_key(self, name: str) -> str:
        """The key that names a training source's globs in messages."""
        return f"data.mixture[{name}].paths" if self.mixture else "data.paths"

    def inputs(self) -> list[tuple[str, str | None, list[str]]]:
        """(key, source name, globs) of every file input: each training source's with `source=files`, then
        `val_paths` (source name None) when set."""
        listed = [(self.paths_key(m.name), m.name, m.paths) for m in (self.sources() if self.source == "files" else [])]
        return listed + ([("data.val_paths", None, list(self.val_paths))] if self.val_paths else [])

    def validate(self, require_paths: bool = True) -> None:
        """Raises ValueError naming the key. `require_paths=False` (the dry run): data.paths may be left empty."""
        def bad(key: str, why: str) -> ValueError:
            return ValueError(f"data.{key}={getattr(self, key)!r}: {why}")

        if self.kind not in KINDS:
            raise bad("kind", f"allowed: {', '.join(KINDS)}")
        if self.source not in SOURCES:
            raise bad("source", f"allowed: {', '.join(SOURCES)}")
        if self.mixture:
            self._validate_mixture()
        elif self.source == "files" and not self.paths and require_paths:
            raise bad("paths", "data.source=files needs data.paths=[<glob>, ...] or data.mixture=[...]")
        if self.source == "hub" and not self.hub_path:
            raise bad("hub_path", "data.source=hub needs data.hub_path=<dataset name or builder>")
        if self.source == "stdlib" and self.kind == "sft":
            raise bad("source", "the built-in corpus has no conversations; SFT needs data.source=files")
        for key in ("seq_len", "shards", "shuffle_buffer", "prefetch", "docs_per_chunk", "vocab_size", "holdout_every"):
            if getattr(self, key) < 1:
                raise bad(key, "must be >= 1")
        if self.seq_len < 2:
            raise bad("seq_len", "must be >= 2")
        if self.tokenizer is None and self.vocab_size < 300:
            raise bad("vocab_size", "a byte-level BPE needs at least 256 byte tokens plus merges; use >= 300")
        if not 0.0 <= self.max_bad_fraction <= 1.0:
            raise bad("max_bad_fraction", "must be in [0, 1]")

    def _validate_mixture(self) -> None:
        if self.source != "files":
            raise ValueError(f"data.mixture is set but data.source={self.source!r}: a mixture reads local files; add "
                             "data=files (or data.source=files)")
        if self.paths:
            raise ValueError("data.paths and data.mixture are exclusive: put those globs under a mixture source's "
                             "paths, or drop data.mixture")
        names = [m.name for m in self.mixture]
        for i, m in enumerate(self.mixture):
            label = f"data.mixture[{m.name or i}]"
            if not m.name:
                raise ValueError(f"data.mixture[{i}]: every source needs a name (name: web, ...)")
            if names.count(m.name) > 1:
                raise ValueError(f"data.mixture: the name {m.name!r} is used by {names.count(m.name)} sources; "
                                 "names must be unique")
            if not m.paths:
                raise ValueError(f"{label}.paths: empty; give the source's globs (paths: [/data/web/*.jsonl])")
            if m.weight is None:
                raise ValueError(f"{label}.weight: missing; give each source a weight > 0 (weight: 0.6)")
            if m.epochs is not None and m.epochs < 1:
                raise ValueError(f"{label}.epochs={m.epochs}: must be >= 1 (or null for no cap)")
        weights = [m.weight for m in self.mixture]
        if not all(math.isfinite(w) for w in weights) or sum(weights) <= 0:
            raise ValueError(f"data.mixture: the weights {weights} sum to {sum(weights):g}; give each source a "
                             "weight > 0")
        for m in self.mixture:
            if m.weight <= 0:
                raise ValueError(f"data.mixture[{m.name}].weight={m.weight}: must be > 0 (drop the source to leave "
                                 "it out)")
