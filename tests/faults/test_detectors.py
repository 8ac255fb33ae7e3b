"""Bounded hang detection's configuration and the loss-spike detector (docs/reliability.md: T03's groups, T15)."""

from __future__ import annotations

import json
import math
import os
import random
import subprocess
import sys
from pathlib import Path

from trainer.metrics import LossSpikes

from .report import record

HERE = Path(__file__).resolve().parent


def test_every_process_group_honours_parallel_timeout():
    """Our data-parallel, expert-parallel and expert-data-parallel groups and DeepSpeed's expert groups all time
    out after the configured seconds, not torch's 30-minute default."""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    out = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                          str(HERE / "group_timeouts.py"), "7"], capture_output=True, text=True, timeout=180, env=env)
    assert out.returncode == 0, out.stderr[-3000:]
    lines = next(json.loads(line) for line in out.stdout.splitlines() if line.startswith("["))
    assert len(lines) == 2
    for line in lines:
        assert len(line["timeouts"]) >= 6 and set(line["timeouts"].values()) == {7.0}, line
    record("group_timeouts", groups=sorted(lines[0]["timeouts"]), timeout_s=7.0)


def curve(steps: int, seed: int) -> list[float]:
    """A training-like loss curve: fast then slow decay, with 5% multiplicative noise (small batches)."""
    rng = random.Random(seed)
    return [(2.0 + 6.5 * math.exp(-s / 15)) * (1 + rng.gauss(0, 0.05)) for s in range(steps)]


def test_loss_spike_is_flagged_at_its_step_and_clean_runs_have_none():
    """T15: a loss multiplied by 10 at step 20 of a 60-step run is flagged at step 20 (and only there); 20 clean
    60-step curves raise no flag."""
    spiky = curve(60, 0)
    spiky[20] *= 10
    detector = LossSpikes(ratio=2.0, window=32)
    flagged = [s for s, loss in enumerate(spiky) if detector.check(loss) is not None]
    assert flagged == [20]
    false = 0
    for seed in range(1, 21):
        clean = LossSpikes(ratio=2.0, window=32)
        false += sum(clean.check(loss) is not None for loss in curve(60, seed))
    assert false == 0
    assert LossSpikes(2.0, 32).check(float("nan")) is None  # a skipped step is not a spike
    record("T15", detection_delay_steps=flagged[0] - 20, false_positives_per_60_clean_steps=false / 20)
