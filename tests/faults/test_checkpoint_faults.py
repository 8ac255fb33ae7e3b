"""Checkpoint faults at the file level (docs/reliability.md: T04, T06, T14's checkpoint side, T19, the full disk):
a process killed in each phase of a save, bytes flipped in every kind of checkpoint file, deleted and swapped
files, NaN written into stored weights, retention next to bad checkpoints, and a disk that fills up. Each test
prints one JSON line of figures (tests/faults/report.py)."""

from __future__ import annotations

import json
import os
import random
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from trainer.checkpoint import COMPLETE, REJECTED, choose_resume, list_checkpoints, prune, step_dir, step_of
from trainer.config import TrainConfig
from trainer.distributed import DistEnv
from trainer.integrity import MANIFEST, digests, sha256, verify, write_manifest
from trainer.prepare import Prepared, verify_resume

from .report import record

WORKER = str(Path(__file__).with_name("save_worker.py"))


def save(root: Path, *steps: int, keep: int = 3, fault: str | None = None, file_limit: int | None = None,
         background: bool = False) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    env.pop("LATENTMOE_FAULT", None)
    if background:
        env["LATENTMOE_BACKGROUND"] = "1"
    if fault:
        env["LATENTMOE_FAULT"] = fault
    if file_limit:
        env["LATENTMOE_FILE_LIMIT"] = str(file_limit)
    return subprocess.run([sys.executable, WORKER, str(root), str(keep), *map(str, steps)], capture_output=True,
                          text=True, timeout=120, env=env)


@pytest.fixture(scope="module")
def saved(tmp_path_factory) -> Path:
    """Checkpoints of steps 2 and 4 written by the save path (kept read-only: tests copy them)."""
    root = tmp_path_factory.mktemp("saved") / "ckpt"
    proc = save(root, 2, 4)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return root


def copy(saved: Path, tmp_path: Path) -> Path:
    target = tmp_path / "ckpt"
    shutil.copytree(saved, target)
    return target


def resume_step(root: Path) -> int | None:
    """The step a relaunch with `resume=auto` resumes from: the trainer's own choice and verification (one
    process), which sets failing checkpoints aside."""
    cfg = TrainConfig()
    cfg.checkpoint.dir = str(root)
    chosen, _ = choose_resume(root, "auto")
    prepared = verify_resume(Prepared(cfg, None, None, [], chosen), DistEnv())
    return step_of(prepared.resume.path) if prepared.resume else None


@pytest.mark.parametrize("background", [False, True], ids=["sync", "background"])
@pytest.mark.parametrize("phase", ["save_shards", "save", "save_manifest", "save_marker", "save_prune"])
def test_kill_in_each_phase_of_a_save_leaves_the_previous_checkpoint_to_resume(tmp_path, phase, background):
    """T04: the process dies while saving step 6 (after checkpoints 2 and 4; keep=2, so step 6's save also prunes
    step 2). Resume selects the newest committed checkpoint that verifies; nothing half-written counts. The same
    with background saves (`checkpoint.async_save`): the process dies in the writing thread while training goes
    on."""
    root = tmp_path / "ckpt"
    proc = save(root, 2, 4, 6, keep=2, fault=f"{phase}@6", background=background)
    assert proc.returncode == 137, proc.stderr[-2000:]
    complete, incomplete = list_checkpoints(root)
    chosen = resume_step(root)
    expected = 6 if phase == "save_prune" else 4  # after COMPLETE the new checkpoint is committed
    assert chosen == expected
    assert all(not verify(p, int(p.name.split("_")[1])) for p in complete)  # every complete one verifies
    garbage = sum(f.stat().st_size for p in incomplete for f in p.rglob("*") if f.is_file())
    half_deleted = [p.name for p in root.iterdir() if p.name.endswith(".deleting")]
    # A later save cleans up what the crash left (an incomplete step 6, a half-deleted old checkpoint).
    if phase != "save_prune":
        assert [p.name for p in incomplete] == ["step_00000006"]
    left = None
    if phase in ("save_manifest", "save_prune"):  # the two kinds of leftovers: an incomplete and a half-deleted dir
        cleanup = save(root, 8, keep=2, background=background)
        assert cleanup.returncode == 0, cleanup.stderr[-2000:]
        left = len(list_checkpoints(root)[1]) + sum(p.name.endswith(".deleting") for p in root.iterdir())
        assert left == 0
    record("T04", phase=phase, background=background, selected_resume_step=chosen, expected_step=expected,
           complete_on_disk=len(complete), complete_verified=len(complete), incomplete_on_disk=len(incomplete),
           half_deleted=len(half_deleted), garbage_bytes=garbage, left_after_next_save=left)


def flip(path: Path, rng: random.Random) -> int:
    data = bytearray(path.read_bytes())
    offset = rng.randrange(len(data))
    data[offset] ^= 1 << rng.randrange(8)
    path.write_bytes(bytes(data))
    return offset


def test_byte_flips_deleted_and_swapped_files_are_detected(saved, tmp_path):
    """T06: one flipped bit at a random offset, 3 trials for each kind of file a checkpoint holds (weights,
    optimizer, data and RNG state in both their files, the state file, the manifest itself); a file deleted under
    an intact COMPLETE; a file replaced by the same file of another step. Verification reports every one, naming
    the damaged file (or the manifest when that is the damaged one)."""
    root = copy(saved, tmp_path)
    target = step_dir(root, 4)
    kinds = sorted(p.name for p in target.iterdir() if p.name != COMPLETE)
    assert len(kinds) >= 8
    rng, trials, detected, named, seconds, megabytes = random.Random(0), 0, 0, 0, 0.0, 0.0
    for name in kinds:
        for _ in range(3):
            original = (target / name).read_bytes()
            flip(target / name, rng)
            start = time.perf_counter()
            problems = verify(target, 4)
            seconds += time.perf_counter() - start
            megabytes += sum(f.stat().st_size for f in target.iterdir()) / 2**20
            trials += 1
            detected += bool(problems)
            # A flip inside the manifest may change a digest: then the file it lists is reported.
            named += name != MANIFEST and any(name in p for p in problems)
            (target / name).write_bytes(original)
    assert not verify(target, 4)  # restored: clean again
    manifest_trials = 3 if MANIFEST in kinds else 0
    assert detected == trials and named == trials - manifest_trials

    (target / "optimizer_rank00000.safetensors").unlink()
    deleted = verify(target, 4)
    assert any("optimizer_rank00000.safetensors: missing" in p for p in deleted)
    shutil.copy(step_dir(root, 2) / "optimizer_rank00000.safetensors", target)
    swapped = verify(target, 4)
    assert any("optimizer_rank00000.safetensors" in p for p in swapped)
    record("T06", flip_trials=trials, flips_detected=detected, data_file_flips=trials - manifest_trials,
           data_file_flips_naming_the_file=named,
           deleted_file_detected=bool(deleted), swapped_file_detected=bool(swapped),
           verify_ms_per_checkpoint=round(1000 * seconds / trials, 1), checkpoint_mb=round(megabytes / trials, 3))


def test_step_of_the_state_file_must_match_the_directory(saved, tmp_path):
    """The state file's step agrees with the directory name, even with a manifest rewritten to match."""
    root = copy(saved, tmp_path)
    target = step_dir(root, 4)
    state = json.loads((target / "train_state.json").read_text())
    state["step"] = 40000
    (target / "train_state.json").write_text(json.dumps(state))
    files = json.loads((target / MANIFEST).read_text())["files"]
    files.update(digests(target, [target / "train_state.json"]))
    write_manifest(target, 4, files)
    problems = verify(target, 4)
    assert any("train_state.json: step 40000, the directory is step 4" in p for p in problems)


def test_nan_in_stored_weights_or_moments_is_reported(saved, tmp_path):
    """T14 (checkpoint side): a NaN written into a stored weight and an Inf into an Adam moment, with the manifest
    rewritten so only the finiteness check can catch them; `resume=auto` then falls back to step 2."""
    root = copy(saved, tmp_path)
    target = step_dir(root, 4)
    for name, value in (("model_rank00000.safetensors", float("nan")), ("optimizer_rank00000.safetensors",
                                                                       float("inf"))):
        tensors = load_file(target / name)
        key = sorted(k for k, t in tensors.items() if t.is_floating_point() and t.numel() > 1)[0]
        tensors[key] = tensors[key].clone()
        tensors[key].view(-1)[0] = value
        save_file(tensors, target / name, metadata={"format": "pt"})
    files = json.loads((target / MANIFEST).read_text())["files"]
    files.update(digests(target, [target / "model_rank00000.safetensors", target / "optimizer_rank00000.safetensors"]))
    write_manifest(target, 4, files)
    problems = verify(target, 4)
    assert sum("non-finite" in p for p in problems) == 2
    assert resume_step(root) == 2 and not step_dir(root, 4).exists()  # set aside in rejected/
    record("T14-checkpoint", non_finite_files_detected=sum("non-finite" in p for p in problems),
           resume_falls_back_to=2)


def test_retention_never_deletes_the_newest_verified_checkpoint(saved, tmp_path):
    """T19: steps 2..5; step 5 corrupt, step 4 incomplete: resume picks 3, and pruning down to one checkpoint (as
    the next save does, protecting what it wrote) deletes 2 and keeps 3, the newest that verified."""
    root = tmp_path / "ckpt"
    for step in (2, 3, 4, 5):
        shutil.copytree(step_dir(saved, 4 if step % 2 == 0 else 2), step_dir(root, step))
        # make each a consistent checkpoint of its own step
        target = step_dir(root, step)
        state = json.loads((target / "train_state.json").read_text())
        state["step"] = step
        (target / "train_state.json").write_text(json.dumps(state))
        files = json.loads((target / MANIFEST).read_text())["files"]
        files.update(digests(target, [target / "train_state.json"]))
        write_manifest(target, step, files)
        assert not verify(target, step)
    flip(step_dir(root, 5) / "model_rank00000.safetensors", random.Random(1))
    (step_dir(root, 4) / COMPLETE).unlink()
    chosen = resume_step(root)  # moves step 5 aside, skips the incomplete 4
    assert chosen == 3 and [p.name.split("-")[0] for p in (root / REJECTED).iterdir()] == ["step_00000005"]
    deleted = prune(root, keep=1, protect=step_dir(root, 3))
    remaining = [p.name for p in list_checkpoints(root)[0]]
    assert remaining == ["step_00000003"] and [p.name for p in deleted] == ["step_00000002"]
    record("T19", selected_step=chosen, valid_remaining=len(remaining), deleted=[p.name for p in deleted])


@pytest.mark.parametrize("background", [False, True], ids=["sync", "background"])
def test_a_full_disk_never_leaves_a_checkpoint_counted_as_complete(tmp_path, background):
    """The disk fills up after the first checkpoint: the next save fails with an error, and only the first one
    is complete (and verifies); a background save's error is raised in the training thread."""
    root = tmp_path / "ckpt"
    proc = save(root, 2, 4, file_limit=20_000, background=background)
    assert proc.returncode != 0 and "CheckpointError: rank 0: writing checkpoint" in proc.stderr, proc.stderr[-2000:]
    assert "File too large" in proc.stderr and "is not committed" in proc.stderr
    complete, incomplete = list_checkpoints(root)
    assert [p.name for p in complete] == ["step_00000002"] and not verify(complete[0], 2)
    record("full_disk", background=background, complete=[p.name for p in complete],
           incomplete=[p.name for p in incomplete],
           error=proc.stderr.strip().splitlines()[-1][:160])


def test_manifest_hashing_speed_is_reported(tmp_path):
    """The cost of verification: SHA-256 throughput on this machine (a figure, bounded only loosely)."""
    blob = tmp_path / "blob.bin"
    blob.write_bytes(os.urandom(64 << 20))
    start = time.perf_counter()
    sha256(blob)
    rate = 64 / (time.perf_counter() - start)
    assert rate > 20  # MB/s: far below any real disk; catches a pathological implementation
    record("hash_rate", mb_per_s=round(rate, 1), torch_threads=torch.get_num_threads())
