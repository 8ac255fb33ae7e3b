"""Verified checkpoints: a SHA-256 manifest of every file, written and made durable before the commit marker, and
checked (with the step and the finiteness of every stored tensor) before a checkpoint is resumed.

Neither safetensors nor DeepSpeed's files detect bit rot, a truncated or swapped file, or a file deleted under an
intact marker; the manifest does (docs/checkpoints.md, "Verification"). Verification is shared out over the ranks of
the job, file by file, so a large checkpoint is read once in total, in parallel.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from .tensorfile import scan, sha256

MANIFEST = "integrity.json"
UNLISTED = {"COMPLETE", MANIFEST}
"""Files of a checkpoint directory the manifest does not list: the marker, and the manifest itself."""
TENSOR_STEMS = ("model_", "optimizer_")
"""Our weight and optimizer files: every floating-point tensor in them must be finite."""


def digests(directory: Path, files: list[Path]) -> dict[str, dict]:
    """{path relative to `directory`: {"sha256", "bytes"}} of `files`."""
    out = {}
    for file in files:
        hexdigest, size = sha256(file)
        out[file.relative_to(directory).as_posix()] = {"sha256": hexdigest, "bytes": size}
    return out


def write_manifest(directory: Path, step: int, files: dict[str, dict], fault=None) -> None:
    """`integrity.json` (step and every file's digest), written to a temporary name, fsynced, then renamed: a crash
    leaves either no manifest or a whole one. `fault`: the test-only hook (trainer/faults.py), between halves."""
    text = json.dumps({"format": 1, "step": step, "files": dict(sorted(files.items()))}, indent=1)
    tmp = directory / (MANIFEST + ".tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        f.write(text[:len(text) // 2])
        f.flush()
        if fault is not None:
            fault()
        f.write(text[len(text) // 2:])
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, directory / MANIFEST)


def read_manifest(directory: Path) -> dict:
    """The manifest of a checkpoint; ValueError naming the file when it is missing or unreadable."""
    file = directory / MANIFEST
    try:
        manifest = json.loads(file.read_text(encoding="utf-8"))
        files = manifest["files"]
        if not isinstance(files, dict) or not isinstance(manifest["step"], int):
            raise TypeError
        return manifest
    except FileNotFoundError:
        raise ValueError(f"{file}: missing (the checkpoint cannot be verified)") from None
    except (ValueError, KeyError, TypeError, UnicodeDecodeError):
        raise ValueError(f"{file}: corrupt (not the manifest's JSON)") from None


def present_files(directory: Path) -> list[str]:
    """Every regular file under `directory` that a manifest should list, relative and sorted."""
    return sorted(p.relative_to(directory).as_posix() for p in directory.rglob("*")
                  if p.is_file() and p.name not in UNLISTED and not p.name.endswith(".tmp"))


def check_file(directory: Path, name: str, expected: dict) -> str | None:
    """Why file `name` of the checkpoint does not match its manifest entry (or holds a non-finite tensor), or None;
    the file is read once, hashed and scanned together (trainer/tensorfile.py)."""
    path = directory / name
    if not path.is_file():
        return f"{path}: missing"
    size = path.stat().st_size
    if size != expected.get("bytes"):
        return f"{path}: {size} bytes, the manifest says {expected.get('bytes')}"
    found = scan(path, check_finite=path.suffix == ".safetensors" and path.name.startswith(TENSOR_STEMS))
    if found.sha256 != expected.get("sha256"):
        return f"{path}: SHA-256 differs from the manifest (the file was changed or damaged after it was written)"
    return found.non_finite


def structural_problems(directory: Path, step: int | None) -> tuple[list[str], dict]:
    """Checks that need no hashing: the manifest reads, its step and the state file's agree with the directory
    name, and the directory holds exactly the files it lists. Returns (problems, manifest files)."""
    try:
        manifest = read_manifest(directory)
    except ValueError as e:
        return [str(e)], {}
    problems = []
    if step is not None and manifest["step"] != step:
        problems.append(f"{directory / MANIFEST}: step {manifest['step']}, the directory is step {step}")
    state_file = directory / "train_state.json"
    try:
        state = json.loads(state_file.read_text(encoding="utf-8"))
        if step is not None and not state.get("weights_only") and state.get("step") != step:
            problems.append(f"{state_file}: step {state.get('step')!r}, the directory is step {step}")
    except (OSError, ValueError):
        pass  # a damaged state file fails its digest below, naming it
    files = manifest["files"]
    extra = sorted(set(present_files(directory)) - set(files))
    if extra:
        problems.append(f"{directory}: files the manifest does not list: {', '.join(extra[:5])}")
    return problems, files


def verify(directory: Path, step: int | None, rank: int = 0, world: int = 1) -> list[str]:
    """This rank's share of verifying checkpoint `directory` (every `world`-th file of the manifest, from `rank`;
    rank 0 also the structural checks). Returns the problems found, each naming its file."""
    problems, files = structural_problems(directory, step)
    if rank != 0:
        problems = []
    if not files:
        return problems
    for i, name in enumerate(sorted(files)):
        if i % world == rank:
            problem = check_file(directory, name, files[name])
            if problem:
                problems.append(problem)
    return problems
