"""The manifest of a directory of pre-tokenized shards (`manifest.json`, written by `launch/tokenize.py`).

It says which tokenizer made the shards and, per shard (keyed by the `.bin` file name), the input file it came from
(path, size, modification time), its documents, tokens, skipped records and largest token id. The tokenize job uses
it to keep finished shards when it is run again; training uses it to refuse shards made with another tokenizer
(`check_shard_tokenizer`): token ids mean nothing under another vocabulary, and nothing in a `.bin/.idx` pair says
which one it was made with. A directory without a manifest (a corpus made by Megatron's own tools) is not checked.

    {"format": "latentmoe-tokenized", "version": 1,
     "tokenizer": {"source": ..., "sha256": ..., "vocab_size": ..., "bos": ..., "eos": ...},
     "settings": {"text_field": "text", "tokenizer": {...}, "job_version": 1},
     "shards": {"00000-a.jsonl.bin": {"source": "/data/a.jsonl", "source_size": ..., "source_mtime_ns": ...,
                                      "documents": ..., "tokens": ..., "bad_records": ..., "max_token_id": ...,
                                      ...}}}
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from .errors import DataError

MANIFEST = "manifest.json"
FORMAT = "latentmoe-tokenized"
VERSION = 1


def write_manifest(directory: str | os.PathLike, tokenizer_identity: dict, shards: dict[str, dict],
                   settings: dict) -> Path:
    """Writes `<directory>/manifest.json` atomically (a temporary file renamed over it): a reader sees the old
    manifest or the new one, never a part."""
    path = Path(directory) / MANIFEST
    body = {"format": FORMAT, "version": VERSION, "tokenizer": dict(tokenizer_identity), "settings": dict(settings),
            "shards": {name: dict(entry) for name, entry in sorted(shards.items())}}
    tmp = path.with_name(f".{MANIFEST}.{os.getpid()}.tmp")
    try:
        with open(tmp, "w", encoding="utf-8") as f:
            json.dump(body, f, indent=1)
            f.write("\n")
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    _cache.pop(str(path.resolve()), None)
    return path


def read_manifest(directory: str | os.PathLike) -> dict | None:
    """The manifest of `directory`, or None when it has none. DataError naming the file when it cannot be used."""
    path = Path(directory) / MANIFEST
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        return None
    except (OSError, UnicodeDecodeError) as e:
        raise DataError(f"{path}: cannot read the shard manifest ({e})") from None
    try:
        manifest = json.loads(text)
    except json.JSONDecodeError as e:
        raise DataError(f"{path}: the shard manifest is not valid JSON ({e}); re-run launch/tokenize.py with "
                        "--overwrite, or delete it to use the shards unchecked") from None
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise DataError(f"{path}: not a latentmoe shard manifest (no \"format\": {FORMAT!r}); a file of that name "
                        "in a shard directory is reserved for it")
    if manifest.get("version") != VERSION:
        raise DataError(f"{path}: shard manifest version {manifest.get('version')!r}, this code reads version "
                        f"{VERSION}; re-tokenize with this version's launch/tokenize.py")
    tokenizer, shards = manifest.get("tokenizer"), manifest.get("shards")
    if not isinstance(tokenizer, dict) or not isinstance(tokenizer.get("sha256"), str) \
            or not isinstance(shards, dict) or not all(isinstance(e, dict) for e in shards.values()):
        raise DataError(f"{path}: damaged shard manifest (its \"tokenizer\" or \"shards\" entry is malformed); "
                        "re-run launch/tokenize.py with --overwrite")
    return manifest


_cache: dict[str, tuple[tuple[int, int], dict | None]] = {}


def _manifest_of(bin_path: str | os.PathLike) -> dict | None:
    """The manifest of the shard's directory, read once per version of the file (training asks for every shard)."""
    path = (Path(bin_path).parent / MANIFEST).resolve()
    try:
        stat = path.stat()
    except FileNotFoundError:
        return None
    key = (stat.st_size, stat.st_mtime_ns)
    cached = _cache.get(str(path))
    if cached is None or cached[0] != key:
        cached = _cache[str(path)] = (key, read_manifest(path.parent))
    return cached[1]


def shard_entry(bin_path: str | os.PathLike) -> tuple[dict, dict] | None:
    """(manifest, the shard's entry) when the shard's directory has a manifest listing it, else None. `bin_path`
    may also name the `.idx` or the pair's prefix."""
    manifest = _manifest_of(bin_path)
    if manifest is None:
        return None
    name = Path(bin_path).name
    if not name.endswith(".bin"):
        name = name.removesuffix(".idx") + ".bin"
    entry = manifest["shards"].get(name)
    return (manifest, entry) if entry is not None else None


def describe_tokenizer(identity: dict) -> str:
    """`source (sha256 1234abcd..., vocab N)`: how errors name a tokenizer."""
    return (f"{identity.get('source', '?')} (sha256 {str(identity.get('sha256', '?'))[:12]}, vocab "
            f"{identity.get('vocab_size', '?')}, eos {identity.get('eos')})")


def same_tokenizer(a: dict, b: dict) -> bool:
    """Whether two tokenizer identities encode alike: the same serialised tokenizer and the same BOS/EOS ids (EOS
    ends every stored document; `tokenizer_config.json` beside the file may choose it)."""
    return a.get("sha256") == b.get("sha256") and a.get("eos") == b.get("eos") and a.get("bos") == b.get("bos")


_identities: dict[int, tuple[object, dict]] = {}


def _identity(tokenizer) -> dict:
    """`tokenizer.identity()`, computed once per tokenizer object (it hashes the serialised tokenizer, megabytes for
    a large vocabulary, and training checks every shard)."""
    held = _identities.get(id(tokenizer))
    if held is None or held[0] is not tokenizer:
        held = _identities[id(tokenizer)] = (tokenizer, tokenizer.identity())
    return held[1]


def check_shard_tokenizer(bin_path: str | os.PathLike, tokenizer) -> None:
    """Refuses a shard made with another tokenizer than `tokenizer` (a `TextTokenizer`), when its directory's
    manifest lists it. No manifest, or a shard it does not list: nothing to check."""
    found = shard_entry(bin_path)
    if found is None:
        return
    made_with, ours = found[0]["tokenizer"], _identity(tokenizer)
    if not same_tokenizer(made_with, ours):
        raise DataError(f"{bin_path}: these shards were tokenized with {describe_tokenizer(made_with)}, but this "
                        f"run's tokenizer is {describe_tokenizer(ours)}; set data.tokenizer to the one the shards "
                        "were made with, or re-tokenize them with this one (launch/tokenize.py --tokenizer "
                        "<it> --overwrite)")


def shard_max_id(bin_path: str | os.PathLike) -> int | None:
    """The largest token id of the shard as its manifest records it, or None (no manifest, or not listed)."""
    found = shard_entry(bin_path)
    if found is None:
        return None
    value = found[1].get("max_token_id")
    return int(value) if isinstance(value, int) else None
