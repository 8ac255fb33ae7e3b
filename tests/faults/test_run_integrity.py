"""One run, one directory, nothing silently different (docs/reliability.md): a second job on a run directory in use
stops at once naming the holder, a lock left by a killed job is taken over, and a resume with another tokenizer of
the same size and special ids is refused. Each test prints one JSON line."""

from __future__ import annotations

import json
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

from tests.faults.report import record
from tests.trainer.test_pretrain_e2e import _ok, run_pretrain, straight  # noqa: F401

HOLD = """
import sys, time
sys.path.insert(0, {root!r})
from trainer.runlock import lock_run
from pathlib import Path
lock = lock_run(Path({run!r}), {run!r} + "/checkpoints")
print("locked", flush=True)
time.sleep(600)
"""


def test_a_second_job_on_a_run_directory_in_use_stops_and_a_dead_holder_is_taken_over(tmp_path, cache_dir):
    root = Path(__file__).resolve().parents[2]
    run = tmp_path / "run"
    holder = subprocess.Popen([sys.executable, "-c", HOLD.format(root=str(root), run=str(run))],
                              stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        start = time.perf_counter()
        second = run_pretrain(run, cache_dir, timeout=120)
        seconds = time.perf_counter() - start
        assert second.returncode == 2, second.stderr[-2000:]
        line = second.stderr.strip().splitlines()[-1]
        assert line.startswith(f"config error: hydra.run.dir={run}: another job is using it (host ") and \
            f"pid {holder.pid}, started " in line, line
        assert not (run / "checkpoints").exists() and not (run / "metrics.jsonl").exists()
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait()
    after = _ok(run_pretrain(run, cache_dir, "trainer.max_steps=2", "checkpoint.every=0", timeout=120))
    assert "done: 2 steps" in after.stdout
    record("run_lock", second_job_exit=second.returncode, second_job_s=round(seconds, 2),
           taken_over_after_kill_9=True)


def test_a_resume_with_another_tokenizer_of_the_same_size_is_refused(tmp_path, cache_dir, straight):  # noqa: F811
    """The run's BPE with two ids swapped (same size, same BOS/EOS): the relaunch stops with one line naming the
    tokenizer file and a token whose id moved; nothing is trained."""
    from tokenizers import Tokenizer
    run, _ = straight
    resumed = tmp_path / "resumed"
    shutil.copytree(run, resumed, ignore=shutil.ignore_patterns("step_00000006", "hf"))
    original = resumed / "checkpoints" / "step_00000003" / "tokenizer.json"
    data = json.loads(Tokenizer.from_file(str(original)).to_str())
    vocab = data["model"]["vocab"]
    a, b = sorted(vocab, key=vocab.get)[300:302]
    vocab[a], vocab[b] = vocab[b], vocab[a]
    swapped = tmp_path / "swapped.json"
    swapped.write_text(json.dumps(data))
    logged = (resumed / "metrics.jsonl").read_bytes()
    proc = run_pretrain(resumed, cache_dir, f"data.tokenizer={swapped}", "trainer.max_steps=6", timeout=120)
    assert proc.returncode == 2, proc.stdout[-2000:] + proc.stderr[-2000:]
    line = proc.stderr.strip().splitlines()[-1]
    assert f"{original}: the checkpoint was trained with another tokenizer" in line and \
        f"token {a!r} is id {vocab[b]} there and {vocab[a]} here" in line, line
    assert (resumed / "metrics.jsonl").read_bytes() == logged  # nothing trained
    assert sorted(p.name for p in (resumed / "checkpoints").iterdir()) == ["step_00000003"]
    record("tokenizer_swapped_on_resume", exit=proc.returncode, refused=True)


def test_an_interrupted_export_leaves_the_previous_one_whole(tmp_path, cache_dir, straight):  # noqa: F811
    """An export that fails after its weights and config.json (here: the tokenizer's save raises) leaves the
    previous export in place, whole; the next export replaces it. A model.pretrained directory without
    tokenizer.json stops the run instead of training on the built-in BPE."""
    import dataclasses

    import pytest
    import torch

    from data.tokenizer import load_tokenizer
    from model import CausalLM
    from trainer.distributed import DistEnv
    from trainer.expert_parallel import build_grid
    from trainer.export import export_hf
    from trainer.presets import model_preset
    run, _ = straight
    tokenizer = load_tokenizer(run / "checkpoints" / "step_00000003" / "tokenizer.json")
    grid = build_grid(DistEnv(rank=0, world_size=1, local_rank=0), 1, 1)
    config = model_preset("tiny_lite").replace(vocab_size=tokenizer.vocab_size, torch_dtype="float32")
    first, second = (CausalLM(config) for _ in range(2))
    out = tmp_path / "hf"
    export_hf(first, tokenizer, out, grid)
    before = {p.name: p.read_bytes() for p in out.iterdir()}

    class DiskFull(OSError):
        pass

    def fail(directory):
        raise DiskFull("No space left on device")
    broken = dataclasses.replace(tokenizer)
    object.__setattr__(broken, "save_pretrained", fail)
    with pytest.raises(DiskFull):
        export_hf(second, broken, out, grid)
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before  # the previous export, untouched
    export_hf(second, tokenizer, out, grid)
    assert (out / "tokenizer.json").is_file() and not (tmp_path / ".hf.staging").exists()
    with torch.no_grad():
        from model.hf import load_pretrained
        reloaded = load_pretrained(out, dtype=torch.float32)
        assert torch.equal(reloaded.lm_head.weight, second.lm_head.weight)

    bare = tmp_path / "bare"
    shutil.copytree(out, bare, ignore=shutil.ignore_patterns("tokenizer*"))
    proc = run_pretrain(tmp_path / "ft", cache_dir, f"model.pretrained={bare}", "trainer.max_steps=1", timeout=120)
    assert proc.returncode == 2 and f"config error: model.pretrained={bare}: no tokenizer.json there" in proc.stderr, \
        proc.stderr[-2000:]
    record("interrupted_export", previous_kept=True, pretrained_without_tokenizer_exit=proc.returncode)


def test_a_run_directory_that_cannot_be_written_stops_in_one_line(tmp_path, cache_dir):
    """A run directory that cannot exist (under a file: what a read-only mount is to root, who may write anywhere)
    stops before Hydra's traceback, naming the path, exit 2."""
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    from tests.trainer.test_pretrain_e2e import PRETRAIN
    proc = subprocess.run([sys.executable, PRETRAIN, "experiment=smoke", f"hydra.run.dir={blocker / 'run'}",
                           f"data.cache_dir={cache_dir}"], capture_output=True, text=True, timeout=120, cwd=tmp_path)
    assert proc.returncode == 2, proc.stderr[-2000:]
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"config error: hydra.run.dir={blocker / 'run'}: cannot write "
                                                   "there (Not a directory"), lines
    record("unwritable_run_dir", exit=proc.returncode, lines=len(lines))


def test_training_files_changed_in_place_are_refused_and_an_append_is_not(tmp_path, cache_dir):
    """A JSONL file truncated, or rewritten to the same size, between the step-2 checkpoint and the relaunch: the
    resume stops with one line naming the file and the change (exit 2). Appended to: the run resumes."""
    import random
    rng = random.Random(0)
    words = "alpha beta gamma delta epsilon zeta eta theta iota kappa lambda mu".split()
    lines = [json.dumps({"text": " ".join(rng.choice(words) for _ in range(40))}) + "\n" for _ in range(400)]
    base = tmp_path / "base"
    data = tmp_path / "train.jsonl"
    data.write_text("".join(lines))
    args = ("data=files", f"data.paths=[{data}]", "trainer.max_steps=4", "checkpoint.every=2", "trainer.val_every=0")
    _ok(run_pretrain(base, cache_dir, *args, timeout=180))
    original = data.read_bytes()
    edits = {"truncated": original[: len(original) // 3],
             "rewritten": original.replace(lines[1].encode(), lines[1].encode()[::-1].replace(b"\n", b"") + b"\n"),
             "appended": original + "".join(lines[:20]).encode()}
    outcomes = {}
    for name, content in edits.items():
        run = tmp_path / name
        shutil.copytree(base, run, ignore=shutil.ignore_patterns("step_00000004", "hf"))
        data.write_bytes(content)
        proc = run_pretrain(run, cache_dir, *args, timeout=180)
        outcomes[name] = proc.returncode
        if name == "appended":
            assert proc.returncode == 0 and "resumed from" in proc.stdout, proc.stderr[-2000:]
        else:
            assert proc.returncode == 2, proc.stdout[-1500:] + proc.stderr[-1500:]
            line = proc.stderr.strip().splitlines()[-1]
            why = "truncated (" if name == "truncated" else "bytes changed (rewritten, reordered or replaced)"
            assert line.startswith("data error: data: the training files changed since the checkpoint") and \
                f"{data}: " in line and why in line, line
        data.write_bytes(original)
    record("data_files_changed_in_place", **outcomes)


def _tmpfs(path: Path, size: int, read_only: bool = False) -> bool:
    """Mount a tmpfs of `size` bytes at `path` (root with CAP_SYS_ADMIN only); False where it cannot."""
    path.mkdir(parents=True, exist_ok=True)
    options = f"size={size}" + (",ro" if read_only else "")
    return subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(path)],
                          capture_output=True).returncode == 0


def test_a_full_and_a_read_only_checkpoint_filesystem_stop_in_one_line(tmp_path, cache_dir):
    """checkpoint.dir on a small tmpfs that holds one checkpoint but not two: the second save fails on ENOSPC and
    the run stops with one `checkpoint error:` line naming the path (exit 2); the first checkpoint stays complete and
    verifies, the second is never committed. On a read-only tmpfs the run stops at once, in one line, exit 2.
    Skipped where this process cannot mount a tmpfs."""
    import pytest
    from trainer.checkpoint import list_checkpoints
    from trainer.integrity import verify
    args = ("checkpoint.every=2", "checkpoint.keep=4", "checkpoint.export_hf=false", "trainer.val_every=0")
    _ok(run_pretrain(tmp_path / "sized", cache_dir, *args, "trainer.max_steps=2", timeout=180))
    args += ("trainer.max_steps=4",)
    one = sum(f.stat().st_size for f in (tmp_path / "sized" / "checkpoints").rglob("*") if f.is_file())
    full = tmp_path / "full"
    if not _tmpfs(full, int(one * 1.5)):
        pytest.skip("cannot mount a tmpfs here (needs root with CAP_SYS_ADMIN)")
    try:
        proc = run_pretrain(tmp_path / "run", cache_dir, *args, f"checkpoint.dir={full}", timeout=180)
        lines = proc.stderr.strip().splitlines()
        assert proc.returncode == 2 and len(lines) == 1, proc.stderr[-3000:]
        assert lines[0].startswith(f"checkpoint error: rank 0: writing checkpoint {full / 'step_00000004'} failed") \
            and "No space left on device" in lines[0], lines
        complete, incomplete = list_checkpoints(full)
        assert [p.name for p in complete] == ["step_00000002"] and verify(complete[0], 2) == []
    finally:
        subprocess.run(["umount", str(full)], check=False)
    read_only = tmp_path / "ro"
    assert _tmpfs(read_only, 1 << 20, read_only=True)
    try:
        ro = run_pretrain(tmp_path / "ro_run", cache_dir, *args, f"checkpoint.dir={read_only}", timeout=180)
        ro_lines = ro.stderr.strip().splitlines()
        assert ro.returncode == 2 and len(ro_lines) == 1 and str(read_only) in ro_lines[0] and \
            "Read-only file system" in ro_lines[0], ro.stderr[-3000:]
    finally:
        subprocess.run(["umount", str(read_only)], check=False)
    record("full_and_read_only_filesystems", checkpoint_bytes=one, tmpfs_bytes=int(one * 1.5),
           full_exit=proc.returncode, full_line=lines[0][:160], read_only_exit=ro.returncode,
           read_only_line=ro_lines[0][:160])
