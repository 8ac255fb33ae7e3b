"""The data configuration (the `data` node of the Hydra config; `conf/data/*.yaml` are its presets)."""

from __future__ import annotations

import warnings
from dataclasses import dataclass, field

KINDS = ("pretrain", "sft")
SOURCES = ("stdlib", "files", "hub")


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
    (one document per file)."""
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
    """Packed sequences held in the seeded shuffle buffer of each shard (part of the resumable state)."""
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

    def validate(self, require_paths: bool = True) -> None:
        """Raises ValueError naming the key. `require_paths=False` (the dry run): data.paths may be left empty."""
        def bad(key: str, why: str) -> ValueError:
            return ValueError(f"data.{key}={getattr(self, key)!r}: {why}")

        if self.kind not in KINDS:
            raise bad("kind", f"allowed: {', '.join(KINDS)}")
        if self.source not in SOURCES:
            raise bad("source", f"allowed: {', '.join(SOURCES)}")
        if self.source == "files" and not self.paths and require_paths:
            raise bad("paths", "data.source=files needs data.paths=[<glob>, ...]")
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
