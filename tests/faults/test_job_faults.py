"""Faults of a running job, through launch/pretrain.py under torchrun as users run it (docs/reliability.md: T01,
T02, T03, T06's fallback, T10, T14, T18): a rank killed inside the expert all-to-all and inside the gradient
all-reduce, a rank stopped with SIGSTOP, SIGTERM from inside and from the scheduler, a corrupt newest checkpoint, a
weight turned NaN, and the same run at 1, 2 and 4 processes. Each test prints one JSON line of figures."""

from __future__ import annotations

import json
import os
import random
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from trainer.integrity import verify

from .report import record

ROOT = Path(__file__).resolve().parents[2]
PRETRAIN = str(ROOT / "launch" / "pretrain.py")
STEPS = 8
BASE = ["experiment=smoke", "logging.wandb=disabled", f"trainer.max_steps={STEPS}", "trainer.micro_batch_size=1",
        "checkpoint.every=2",
        "checkpoint.keep=4", "checkpoint.export_hf=false", "trainer.val_every=0", "trainer.progress=false"]


def command(run_dir: Path, cache: Path, *overrides: str, nproc: int = 2, timeout_s: int = 20,
            launcher: tuple[str, ...] = ()) -> list[str]:
    args = [*BASE, f"hydra.run.dir={run_dir}", f"data.cache_dir={cache}", *overrides]
    if nproc == 1:
        return [sys.executable, PRETRAIN, *args]
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}", *launcher,
            PRETRAIN, *args, f"parallel.timeout_s={timeout_s}"]


def environment(fault: str | None = None) -> dict:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "WANDB_MODE": "disabled"}
    env.pop("LATENTMOE_FAULT", None)
    if fault:
        env["LATENTMOE_FAULT"] = fault
    return env


def launch(run_dir: Path, cache: Path, *overrides: str, nproc: int = 2, fault: str | None = None,
           timeout_s: int = 20) -> subprocess.CompletedProcess:
    proc = subprocess.run(command(run_dir, cache, *overrides, nproc=nproc, timeout_s=timeout_s), capture_output=True,
                          text=True, timeout=240, env=environment(fault), cwd=run_dir.parent,
                          start_new_session=True)
    proc.ended = time.time()
    return proc


def ok(proc: subprocess.CompletedProcess) -> subprocess.CompletedProcess:
    assert proc.returncode == 0, f"exit {proc.returncode}\n{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}"
    return proc


def steps(run_dir: Path) -> dict[int, dict]:
    rows = map(json.loads, (run_dir / "metrics.jsonl").read_text().splitlines())
    return {m["step"]: m for m in rows if "step" in m}  # not the `resumed_from` rows of relaunches


def fault_time(proc: subprocess.CompletedProcess) -> float:
    return float(re.search(r"\[fault injection\].*time ([0-9.]+)", proc.stdout + proc.stderr).group(1))


def bitwise(a: dict[int, dict], b: dict[int, dict], at: range) -> int:
    """Steps of `at` whose loss and gradient norm are bitwise equal in both runs."""
    return sum(a[s]["loss"].hex() == b[s]["loss"].hex() and a[s]["grad_norm"].hex() == b[s]["grad_norm"].hex()
               for s in at)


def tensor_digests(run_dir: Path) -> dict[str, str]:
    """SHA-256 of the final checkpoint's weight and optimizer files (the state file differs: it names the run)."""
    files = json.loads((run_dir / "checkpoints" / f"step_{STEPS:08d}" / "integrity.json").read_text())["files"]
    return {name: entry["sha256"] for name, entry in files.items() if name.startswith(("model_", "optimizer_"))}


def orphans(run_dir: Path) -> int:
    """Processes of the job still alive (matched by its unique run directory on their command line)."""
    out = subprocess.run(["pgrep", "-f", f"hydra.run.dir={run_dir}"], capture_output=True, text=True).stdout
    return len(out.split())


@pytest.fixture(scope="module")
def reference(tmp_path_factory, cache_dir) -> Path:
    """An uninterrupted 2-process run of 8 steps, checkpoints every 2 (the run every fault is compared with)."""
    run = tmp_path_factory.mktemp("reference") / "run"
    ok(launch(run, cache_dir))
    return run


def test_same_losses_at_one_two_and_four_processes(reference, tmp_path, cache_dir):
    """T10 (data side): the global batches do not depend on the process count, so 1 and 4 processes (ep as the
    default picks it: 1 and 4) train like 2 (ep 2): step 1 within 1e-5 relative, 8 steps within 1e-4."""
    ref = steps(reference)
    figures = {}
    for nproc in (1, 4):
        run = tmp_path / f"p{nproc}"
        ok(launch(run, cache_dir, nproc=nproc))
        other = steps(run)
        deltas = [abs(other[s]["loss"] - ref[s]["loss"]) / abs(ref[s]["loss"]) for s in range(1, STEPS + 1)]
        assert deltas[0] < 1e-5 and max(deltas) < 1e-4, (nproc, deltas)
        figures[f"max_rel_dloss_{nproc}p_vs_2p"] = max(deltas)
        figures[f"step1_rel_dloss_{nproc}p_vs_2p"] = deltas[0]
    record("T10-layout", steps=STEPS, **figures)


def test_two_process_checkpoint_continues_on_one_process(reference, tmp_path, cache_dir):
    """T10: the 2-process step-4 checkpoint resumed by 1 process with default settings continues the 2-process
    run's losses (steps 5-8 within 1e-4 relative)."""
    run = tmp_path / "run"
    shutil.copytree(reference / "checkpoints" / "step_00000004", run / "checkpoints" / "step_00000004")
    out = ok(launch(run, cache_dir, nproc=1)).stdout
    assert "resumed from" in out and "at step 4" in out
    ref, resumed = steps(reference), steps(run)
    deltas = [abs(resumed[s]["loss"] - ref[s]["loss"]) / abs(ref[s]["loss"]) for s in range(5, STEPS + 1)]
    assert max(deltas) < 1e-4, deltas
    record("T10-resume", saved_processes=2, resumed_processes=1, max_rel_dloss=max(deltas))


@pytest.mark.parametrize("site", ["a2a", "grad_reduce"])
def test_rank_killed_mid_step_ends_the_job_and_the_relaunch_resumes_bitwise(reference, tmp_path, cache_dir, site):
    """T01 + T02: SIGKILL of rank 1 at step 3, inside the MoE all-to-all or the gradient all-reduce. The survivor
    fails at once naming the collective, the job ends, and the relaunch resumes from step 2 and trains steps
    3-8 bitwise like the uninterrupted run (the all-to-all case also relaunches; both measure the detection)."""
    run = tmp_path / "run"
    crashed = launch(run, cache_dir, fault=f"{site}@3:1:KILL")
    assert crashed.returncode != 0
    assert "distributed error: rank 0: step 3 (step): the collective at" in crashed.stderr, crashed.stderr[-3000:]
    latency = crashed.ended - fault_time(crashed)
    figures = {"site": site, "job_end_after_kill_s": round(latency, 2), "orphans": orphans(run)}
    assert latency < 15 and figures["orphans"] == 0
    if site == "a2a":
        start = time.time()
        out = ok(launch(run, cache_dir)).stdout
        assert "at step 2" in out
        ref, resumed = steps(reference), steps(run)
        equal = bitwise(ref, resumed, range(3, STEPS + 1))
        assert equal == STEPS - 2
        same_weights = verify(run / "checkpoints" / "step_00000008", 8) == [] and \
            tensor_digests(run) == tensor_digests(reference)
        assert same_weights
        figures.update(steps_lost=3 - 1 - 2, bitwise_equal_steps=equal, resumed_steps=STEPS - 2,
                       final_checkpoint_sha256_equal=same_weights, relaunch_s=round(time.time() - start, 1))
    record("T02", **figures)


def test_stopped_rank_ends_the_job_within_the_timeout(tmp_path, cache_dir):
    """T03: SIGSTOP of rank 1 at step 3 with parallel.timeout_s=10: rank 0's collective times out, it reports the
    step and where, and the whole job (the stopped rank included) is gone within 10 s + 10 s."""
    run = tmp_path / "run"
    timeout_s = 10
    stopped = launch(run, cache_dir, fault="step@3:1:STOP", timeout_s=timeout_s)
    elapsed = stopped.ended - fault_time(stopped)
    assert stopped.returncode != 0
    assert "distributed error: rank 0: step 3 (step): the collective at" in stopped.stderr, stopped.stderr[-3000:]
    assert timeout_s <= elapsed < timeout_s + 10
    assert orphans(run) == 0
    record("T03", timeout_s=timeout_s, job_end_after_stop_s=round(elapsed, 2),
           detection_over_timeout=round(elapsed / timeout_s, 2), orphans=0)


def test_sigterm_on_one_rank_checkpoints_the_step_and_exits_zero(reference, tmp_path, cache_dir):
    """T18: SIGTERM reaches rank 1 alone during step 3: both ranks finish step 3, commit its checkpoint, and exit
    0; the relaunch starts at step 3, loses no step, and trains steps 4-8 bitwise like the uninterrupted run."""
    run = tmp_path / "run"
    stopped = ok(launch(run, cache_dir, fault="step@3:1:TERM"))
    assert "preempted (SIGTERM) after step 3" in stopped.stdout
    marker = run / "checkpoints" / "step_00000003" / "COMPLETE"
    committed_after = marker.stat().st_mtime - fault_time(stopped)
    assert verify(marker.parent, 3) == []
    out = ok(launch(run, cache_dir)).stdout
    assert "at step 3" in out
    equal = bitwise(steps(reference), steps(run), range(4, STEPS + 1))
    assert equal == STEPS - 3
    record("T18", signal="SIGTERM", receiving_ranks=1, exit_status=stopped.returncode,
           signal_to_committed_s=round(committed_after, 2), steps_lost=0, bitwise_equal_steps_after=equal)


def test_sigusr1_to_torchrun_is_forwarded_and_checkpointed(tmp_path, cache_dir):
    """T18 as SLURM sends it before the time limit: SIGUSR1 to torchrun itself, launched as
    launch/slurm/pretrain.sbatch does (forwarding SIGUSR1): the step in flight is checkpointed (committed, verified)
    on every rank before torchrun's grace period ends."""
    run = tmp_path / "run"
    launcher = ("--signals-to-handle=SIGTERM,SIGINT,SIGHUP,SIGQUIT,SIGUSR1",)
    proc = subprocess.Popen(command(run, cache_dir, "trainer.max_steps=200", "checkpoint.every=0", launcher=launcher),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=environment(),
                            cwd=tmp_path, start_new_session=True)
    metrics = run / "metrics.jsonl"
    deadline = time.time() + 180
    while time.time() < deadline and not (metrics.exists() and len(metrics.read_text().splitlines()) >= 2):
        time.sleep(0.2)
    sent = time.time()
    proc.send_signal(signal.SIGUSR1)
    out, err = proc.communicate(timeout=120)
    ended = time.time() - sent
    last = max(steps(run))
    checkpoint = run / "checkpoints" / f"step_{last:08d}"
    assert f"preempted (SIGUSR1) after step {last}" in out, err[-3000:]
    assert verify(checkpoint, last) == [] and (checkpoint / "COMPLETE").exists()
    assert ended < 30  # torchrun's default grace before it kills its workers
    assert orphans(run) == 0
    record("T18-torchrun", signal="SIGUSR1", checkpoint_step=last, signal_to_exit_s=round(ended, 2),
           torchrun_exit_status=proc.returncode, ranks_failed="ChildFailedError" in err)


def test_corrupt_newest_checkpoint_falls_back_and_a_named_one_stops(reference, tmp_path, cache_dir):
    """T06 end to end: the newest checkpoint's optimizer file gets one flipped bit and its state file an invalid
    first byte (so even reading its step fails). `resume=auto` reports it, sets it aside and resumes from the
    previous one (step 6), training steps 7-8 bitwise like the reference; the same checkpoint named by
    `checkpoint.resume=<path>` stops before training, naming the file."""
    run = tmp_path / "run"
    shutil.copytree(reference / "checkpoints", run / "checkpoints")
    damaged = run / "checkpoints" / "step_00000008" / "optimizer_rank00000.safetensors"
    data = bytearray(damaged.read_bytes())
    data[random.Random(3).randrange(len(data))] ^= 0x10
    damaged.write_bytes(bytes(data))
    state = damaged.parent / "train_state.json"
    state.write_bytes(b"\xff" + state.read_bytes()[1:])
    named = launch(tmp_path / "named", cache_dir, f"checkpoint.resume={damaged.parent}", nproc=1)
    assert named.returncode == 2 and named.stderr.startswith("checkpoint error: checkpoint.resume="), named.stderr
    assert "failed verification" in named.stderr and damaged.name in named.stderr
    out = ok(launch(run, cache_dir, "trainer.max_steps=8")).stdout
    assert "failed verification" in out and damaged.name in out and state.name in out and "at step 6" in out
    equal = bitwise(steps(reference), steps(run), range(7, STEPS + 1))
    assert equal == 2
    record("T06-e2e", auto_fell_back_to=6, named_resume_exit=named.returncode, bitwise_equal_steps_after=equal)


def test_a_nan_weight_is_never_checkpointed(tmp_path, cache_dir):
    """T14: a weight turns NaN after step 3's update: the next checkpoint (step 4) is refused, the run stops with
    an error naming the tensor, and the step-2 checkpoint stays the newest, complete and verified."""
    run = tmp_path / "run"
    proc = launch(run, cache_dir, nproc=1, fault="weights@3:0:nan")
    assert proc.returncode == 1 and "weights are not finite" in proc.stderr, proc.stderr[-3000:]
    checkpoints = sorted(p.name for p in (run / "checkpoints").iterdir())
    assert checkpoints == ["step_00000002"] and verify(run / "checkpoints" / "step_00000002", 2) == []
    record("T14", nan_after_step=3, checkpoints_after=checkpoints, non_finite_checkpoints=0,
           exit_status=proc.returncode)


# ------------------------------------------------------------------------------------ background saves
BACKGROUND = "checkpoint.async_save=true"


def test_background_saves_train_and_resume_bitwise_like_synchronous_ones(reference, tmp_path, cache_dir):
    """`checkpoint.async_save=true` on 2 processes: the same losses as the synchronous reference run, bitwise, and
    the same checkpoint bytes. Then a kill of rank 1 inside its writing thread while step 4 is saved (training has
    gone on): the job ends, step 4 is never marked complete, and the relaunch resumes from step 2 bitwise."""
    run = tmp_path / "run"
    out = ok(launch(run, cache_dir, BACKGROUND)).stdout
    assert "checkpoint.async_save: " in out and "in the background" in out, out[-2000:]
    same = bitwise(steps(reference), steps(run), range(1, STEPS + 1))
    assert same == STEPS and tensor_digests(run) == tensor_digests(reference)

    killed = tmp_path / "killed"
    crashed = launch(killed, cache_dir, BACKGROUND, fault="save_shards@4:1")
    assert crashed.returncode != 0 and "[fault injection] exit at save_shards, step 4, rank 1" in crashed.stdout
    marker = killed / "checkpoints" / "step_00000004" / "COMPLETE"
    assert not marker.exists() and (killed / "checkpoints" / "step_00000002" / "COMPLETE").exists()
    relaunched = ok(launch(killed, cache_dir, BACKGROUND)).stdout
    assert "at step 2" in relaunched
    equal = bitwise(steps(reference), steps(killed), range(3, STEPS + 1))
    assert equal == STEPS - 2 and tensor_digests(killed) == tensor_digests(reference)
    record("background_saves", bitwise_equal_steps=same, same_checkpoint_bytes=True, killed_in_write_at_step=4,
           resumed_from=2, bitwise_equal_steps_after_relaunch=equal)


def test_sigterm_during_a_background_save_waits_for_it_then_commits(reference, tmp_path, cache_dir):
    """SIGTERM reaches rank 0 from inside its thread writing step 4: the save in flight is committed, the step
    training was in is checkpointed too, every rank exits 0, and the relaunch loses no step."""
    run = tmp_path / "run"
    stopped = ok(launch(run, cache_dir, BACKGROUND, fault="save_shards@4:0:TERM"))
    assert "preempted (SIGTERM) after step" in stopped.stdout, stopped.stdout[-2000:]
    at = int(re.search(r"preempted \(SIGTERM\) after step (\d+)", stopped.stdout).group(1))
    assert at >= 4 and all(verify(step_dir, int(step_dir.name[5:])) == [] for step_dir in
                           [run / "checkpoints" / f"step_{s:08d}" for s in sorted({4, at})])
    out = ok(launch(run, cache_dir, BACKGROUND)).stdout
    assert f"at step {at}" in out
    equal = bitwise(steps(reference), steps(run), range(at + 1, STEPS + 1))
    assert equal == STEPS - at
    record("background_sigterm", signal_during_save_of=4, stopped_after=at, committed=[4, at], steps_lost=0,
           bitwise_equal_steps_after=equal)


def test_a_nan_weight_is_never_checkpointed_in_the_background(tmp_path, cache_dir):
    """T14 with background saves: the writing thread finds the NaN, nothing is committed, and the run stops at the
    next step with the same error."""
    run = tmp_path / "run"
    proc = launch(run, cache_dir, BACKGROUND, nproc=1, fault="weights@3:0:nan")
    assert proc.returncode == 1 and "weights are not finite" in proc.stderr, proc.stderr[-3000:]
    checkpoints = sorted(p.name for p in (run / "checkpoints").iterdir())
    assert checkpoints == ["step_00000002"] and verify(run / "checkpoints" / "step_00000002", 2) == []
    record("T14-background", nan_after_step=3, checkpoints_after=checkpoints, exit_status=proc.returncode)
