"""Data-test helpers: a small trained BPE shared by the session and JSON Lines writers."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from data.tokenizer import TextTokenizer, load_tokenizer, train_bpe


@pytest.fixture(scope="session")
def bpe(tmp_path_factory) -> TextTokenizer:
    """A 400-token byte-level BPE trained on a few lines (our built-in specials: BOS 0, EOS 1, PAD 2)."""
    texts = [f"document {i}: the quick brown fox jumps over the lazy dog {i * 7}" for i in range(200)]
    texts += ["User: hello\n\nAssistant: hi there, how can I help?"] * 20
    path = tmp_path_factory.mktemp("tok") / "tokenizer.json"
    train_bpe(texts, 400).save(str(path))
    return load_tokenizer(path)


def write_jsonl(path: Path, rows: list) -> Path:
    """Each row: a dict (dumped as JSON) or raw bytes/str written as one line as-is."""
    with open(path, "wb") as f:
        for row in rows:
            if isinstance(row, bytes):
                f.write(row + b"\n")
            elif isinstance(row, str):
                f.write(row.encode("utf-8") + b"\n")
            else:
                f.write(json.dumps(row).encode("utf-8") + b"\n")
    return path
