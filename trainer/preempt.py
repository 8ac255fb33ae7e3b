"""Preemption: SIGTERM (what schedulers and torchrun send before killing a job) and SIGUSR1 (what SLURM can send a
set time before the job's end, `#SBATCH --signal=USR1@120`) make every rank finish the step it is in, write a
committed checkpoint of it, and exit with status 0; the relaunch resumes with no step lost (docs/reliability.md).

The handler only records the signal. After each step the ranks agree on whether any of them received one, with one
tiny all-reduce, so they all stop at the same step even when the signal reached only some of them.
"""

from __future__ import annotations

import signal
import threading

import torch

from .distributed import DistEnv

SIGNALS = (signal.SIGTERM, signal.SIGUSR1)


class Preemption:
    """Installed for the training loop (`with Preemption(env, device) as preemption:`), previous handlers restored
    after it when it ends normally."""

    def __init__(self, env: DistEnv, device: torch.device):
        self.env, self.device = env, device
        self.received: int | None = None
        self.save_failed = False
        """Set by `requested`: some rank's background checkpoint save failed (trainer/background.py)."""
        self._previous: dict[int, object] = {}

    def __enter__(self) -> Preemption:
        if threading.current_thread() is threading.main_thread():  # Python delivers signals to the main thread
            for sig in SIGNALS:
                self._previous[sig] = signal.signal(sig, self._record)
        return self

    def __exit__(self, exc_type, *exc) -> None:
        if exc_type is not None:
            return  # failing: a SIGTERM from the launcher must not cut short the error report on its way out
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)

    def _record(self, signum: int, frame) -> None:
        if self.received is None:
            print(f"rank {self.env.rank}: received {signal.Signals(signum).name}: finishing this step, then "
                  "checkpointing and exiting", flush=True)
        self.received = signum

    def requested(self, save_failed: bool = False) -> str | None:
        """The signal's name if any rank received one (collective: every rank calls it after every step). The same
        all-reduce carries whether a rank's background save failed (`save_failed`), so all of them learn it at
        once."""
        flags = torch.tensor([float(self.received or 0), float(save_failed)], device=self.device)
        if self.env.distributed:
            torch.distributed.all_reduce(flags, op=torch.distributed.ReduceOp.MAX)
        signum, self.save_failed = int(flags[0].item()), bool(flags[1].item())
        return signal.Signals(signum).name if signum else None
