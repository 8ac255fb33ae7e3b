"""What every script run under torchrun by the tests does first."""

from __future__ import annotations

import os
from datetime import timedelta

import torch
import torch.distributed as dist

from trainer.distributed import DistEnv


def init_gloo(timeout_s: int) -> DistEnv:
    """This process's rank from torchrun's environment, one thread, and a gloo process group whose collectives fail
    after `timeout_s` instead of hanging a test."""
    env = DistEnv(int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"]), int(os.environ["LOCAL_RANK"]))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", timeout=timedelta(seconds=timeout_s))
    return env


def run_check(script: str, nproc: int, *args: str, out, timeout: int = 300) -> dict:
    """Launch `tests/distributed/<script>` on `nproc` processes (standalone, one thread each) with `args` and
    `--out <out>`; fails the test with the ranks' stderr unless every rank exits 0; returns the JSON rank 0 wrote."""
    import json
    import subprocess
    import sys
    from pathlib import Path

    script_path = Path(__file__).resolve().parent / script
    proc = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
         str(script_path), *args, "--out", str(out)],
        capture_output=True, text=True, timeout=timeout, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stderr[-6000:]
    return json.loads(Path(out).read_text())


def finish(env: DistEnv, out, results: dict) -> None:
    """The end of a check script: rank 0 writes `results` to `out` once every rank is done, then the group ends."""
    import json
    from pathlib import Path

    if env.rank == 0:
        Path(out).write_text(json.dumps(results, indent=1))
    dist.barrier()
    dist.destroy_process_group()
