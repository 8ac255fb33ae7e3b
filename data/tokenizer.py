"""Tokenizers: a `tokenizer.json` file, a released checkpoint directory, or a byte-level BPE trained once on the
built-in corpus and cached.

`TextTokenizer.encode_batch` returns token id arrays with the special tokens the tokenizer itself defines (the
DeepSeek-V2 tokenizer prepends BOS 100000 through its post-processor); the packer appends `eos_id` after each
document. BOS/EOS are found from `tokenizer_config.json` beside the file when present, else from well-known names.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

BOS_NAMES = ("<｜begin▁of▁sentence｜>", "<s>", "<|begin_of_text|>", "<bos>", "<|bos|>")
EOS_NAMES = ("<｜end▁of▁sentence｜>", "</s>", "<|end_of_text|>", "<|endoftext|>", "<eos>", "<|eos|>")
# Our built-in BPE uses the DeepSeek-V2 spellings, at ids 0/1/2.
BUILTIN_SPECIALS = ("<｜begin▁of▁sentence｜>", "<｜end▁of▁sentence｜>", "<｜pad｜>")


PIECE_CHARS = 1 << 18
"""Documents longer than this (in characters) are tokenized in pieces (`document_pieces`)."""
BATCH_CHARS = 1 << 21
"""At most this many characters go to one `encode_batch` call of `TextTokenizer.encode_documents`."""


def document_pieces(text: str, limit: int | None = None) -> list[str]:
    """`text` cut into pieces of at most `limit` characters (default `PIECE_CHARS`). Each cut is placed just before
    the last line break inside the limit that follows a non-space character: byte-level BPE pre-tokenizers (GPT-2's
    rule, DeepSeek-V2's) always start a new piece of text there, as no pattern lets a word take a line break after
    it, so the pieces' ids are one call's. Without such a line break: after the last line break, else the last
    space, else at the limit (ids may then differ from one call's at the cut). Short texts are one piece."""
    limit = limit or PIECE_CHARS
    if len(text) <= limit:
        return [text]
    pieces, start = [], 0
    while len(text) - start > limit:
        window = text[start:start + limit]
        cut = window.rfind("\n")
        while cut > 0 and window[cut - 1].isspace():
            cut = window.rfind("\n", 0, cut)
        if cut <= 0:
            cut = window.rfind("\n") + 1 or window.rfind(" ") + 1 or limit
        pieces.append(text[start:start + cut])
        start += cut
    pieces.append(text[start:])
    return pieces


@dataclass
class TextTokenizer:
    """A `tokenizers.Tokenizer` plus the ids the data pipeline needs."""

    tokenizer: Tokenizer
    bos_id: int | None
    eos_id: int | None
    pad_id: int
    source: str

    @property
    def vocab_size(self) -> int:
        """One more than the largest id the tokenizer can produce (the model's embedding must have at least this)."""
        return self.tokenizer.get_vocab_size(with_added_tokens=True)

    def encode_batch(self, texts: list[str], add_special_tokens: bool = True) -> list[np.ndarray]:
        encodings = self.tokenizer.encode_batch_fast(texts, add_special_tokens=add_special_tokens) \
            if hasattr(self.tokenizer, "encode_batch_fast") else \
            self.tokenizer.encode_batch(texts, add_special_tokens=add_special_tokens)
        return [np.asarray(e.ids, dtype=np.int32) for e in encodings]

    def encode_documents(self, texts: list[str]) -> list[np.ndarray]:
        """What the pretraining pipeline hands the packer for each document, and what `launch/tokenize.py` stores:
        the tokenizer's ids with its own special tokens, then EOS (int32). A document longer than `PIECE_CHARS`
        characters is tokenized in pieces cut where the pre-tokenizer splits anyway (`document_pieces`; special
        tokens on the first piece only), and `encode_batch` is called on at most `BATCH_CHARS` characters at a time, so one huge document
        costs memory in proportion to its tokens, not to the tokenizer's per-token bookkeeping of all of them."""
        pieces, owner = [], []
        for i, text in enumerate(texts):
            for j, piece in enumerate(document_pieces(text)):
                pieces.append((piece, j == 0))
                owner.append(i)
        ids: list[list[np.ndarray]] = [[] for _ in texts]
        start = 0
        while start < len(pieces):
            end, chars = start, 0
            while end < len(pieces) and (end == start or chars + len(pieces[end][0]) <= BATCH_CHARS) \
                    and pieces[end][1] == pieces[start][1]:
                chars += len(pieces[end][0])
                end += 1
            encoded = self.encode_batch([p for p, _ in pieces[start:end]], add_special_tokens=pieces[start][1])
            for k, array in zip(range(start, end), encoded):
                ids[owner[k]].append(array)
            start = end
        eos = [np.array([self.eos_id], np.int32)] if self.eos_id is not None else []
        return [parts[0] if len(parts) == 1 and not eos else np.concatenate(parts + eos) for parts in ids]

    def identity(self) -> dict:
        """What names this tokenizer in a manifest or an error: where it came from, a SHA-256 of its serialised
        form (the same file gives the same hash wherever it lives), its vocabulary and BOS/EOS ids."""
        return {"source": self.source, "sha256": hashlib.sha256(self.tokenizer.to_str().encode("utf-8")).hexdigest(),
                "vocab_size": self.vocab_size, "bos": self.bos_id, "eos": self.eos_id}

    def encode(self, text: str, add_special_tokens: bool = False) -> list[int]:
        return self.tokenizer.encode(text, add_special_tokens=add_special_tokens).ids

    def decode(self, ids) -> str:
        return self.tokenizer.decode(list(ids))

    def save(self, path: str | os.PathLike) -> None:
        self.tokenizer.save(str(path))

    def save_pretrained(self, directory: str | os.PathLike) -> None:
        """`tokenizer.json` plus a `tokenizer_config.json` naming BOS/EOS/pad, so that transformers' AutoTokenizer
        (and `load_tokenizer`) find the special tokens in an exported model directory."""
        directory = Path(directory)
        self.save(directory / "tokenizer.json")
        config = {"tokenizer_class": "PreTrainedTokenizerFast"}
        for key, token_id in (("bos_token", self.bos_id), ("eos_token", self.eos_id), ("pad_token", self.pad_id)):
            if token_id is not None and self.tokenizer.id_to_token(token_id) is not None:
                config[key] = self.tokenizer.id_to_token(token_id)
        (directory / "tokenizer_config.json").write_text(json.dumps(config, indent=2) + "\n", encoding="utf-8")


def _special_id(tokenizer: Tokenizer, configured: str | None, names: tuple[str, ...]) -> int | None:
    for name in ((configured,) if configured else ()) + names:
        token_id = tokenizer.token_to_id(name)
        if token_id is not None:
            return token_id
    return None


def _tokenizer_config_tokens(directory: Path) -> dict[str, str]:
    """bos/eos/pad token strings from a tokenizer_config.json, which stores them as strings or {"content": ...}."""
    path = directory / "tokenizer_config.json"
    if not path.is_file():
        return {}
    try:
        config = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"{path}: not valid JSON ({e})") from None
    out = {}
    for key in ("bos_token", "eos_token", "pad_token"):
        value = config.get(key)
        if isinstance(value, dict):
            value = value.get("content")
        if isinstance(value, str):
            out[key] = value
    return out


def load_tokenizer(path: str | os.PathLike) -> TextTokenizer:
    """A `tokenizer.json` file, or a directory holding one (a released Hugging Face checkpoint directory)."""
    path = Path(path).expanduser()
    file = path / "tokenizer.json" if path.is_dir() else path
    if not file.is_file():
        raise ValueError(f"data.tokenizer={str(path)!r}: no tokenizer.json found "
                         "(give a tokenizer.json file or a directory that holds one)")
    try:
        tokenizer = Tokenizer.from_file(str(file))
    except Exception as e:  # tokenizers raises a bare Exception for malformed files
        raise ValueError(f"data.tokenizer: {file} is not a valid tokenizer.json ({e})") from None
    named = _tokenizer_config_tokens(file.parent)
    bos = _special_id(tokenizer, named.get("bos_token"), BOS_NAMES)
    eos = _special_id(tokenizer, named.get("eos_token"), EOS_NAMES)
    pad = _special_id(tokenizer, named.get("pad_token"), ("<｜pad｜>", "<pad>", "<|pad|>"))
    return TextTokenizer(tokenizer, bos, eos, pad if pad is not None else (eos if eos is not None else 0), str(file))


@contextmanager
def _file_lock(path: Path):
    """Exclusive lock across processes (ranks of one job, or concurrent jobs sharing a cache)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def train_bpe(texts: list[str], vocab_size: int) -> Tokenizer:
    """Byte-level BPE (the DeepSeek-V2 tokenizer's algorithm) with BOS/EOS/PAD at ids 0/1/2; BOS is prepended by
    the post-processor, like the released tokenizer does."""
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=list(BUILTIN_SPECIALS),
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tokenizer.train_from_iterator(texts, trainer)
    bos = BUILTIN_SPECIALS[0]
    tokenizer.post_processor = processors.TemplateProcessing(
        single=f"{bos} $A", pair=f"{bos} $A {bos} $B", special_tokens=[(bos, tokenizer.token_to_id(bos))])
    return tokenizer


def cached_bpe(texts_fn, fingerprint: str, vocab_size: int, cache_dir: str | os.PathLike) -> TextTokenizer:
    """Train a BPE on `texts_fn()` once per (corpus fingerprint, vocab size) and reuse it from `cache_dir`."""
    cache = Path(cache_dir).expanduser()
    key = hashlib.sha256(f"{fingerprint}|{vocab_size}|v1".encode()).hexdigest()[:16]
    file = cache / f"bpe-{vocab_size}-{key}.json"
    with _file_lock(cache / f".bpe-{key}.lock"):
        if not file.is_file():
            # First use only: one line, begun before the seconds of work and finished with their duration.
            print(f"tokenizer: training the built-in {vocab_size}-id BPE on this Python's standard library, once "
                  f"(cached as {file}) ...", end="", flush=True)
            start = time.perf_counter()
            tokenizer = train_bpe(texts_fn(), vocab_size)
            tmp = file.with_suffix(".tmp")
            tokenizer.save(str(tmp))
            os.replace(tmp, file)
            print(f" done in {time.perf_counter() - start:.1f} s", flush=True)
    return load_tokenizer(file)
