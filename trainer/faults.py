"""Test-only fault injection, so the fault-injection suite (tests/faults/) reaches the exact points where a real
fault hurts without any production path changing. Off unless the environment variable is set.

    LATENTMOE_FAULT=<site>@<step>[:<rank>][:<action>]

`site` is a point named by a `fault(site)` call (see SITES), `step` the training step (1-based) being run or the
checkpoint step being saved, `rank` the global rank (every rank when omitted), and `action` one of `exit` (the
default: the process ends at once with status 137, like a kill -9 without the signal), `KILL`, `STOP`, `TERM` or
`USR1` (that signal sent to the process itself), or `nan` (site `weights` only: a NaN written into the first
weight after the step's update). Each fault fires at most once per process.
"""

from __future__ import annotations

import os
import signal
import time

SITES = {
    "step": "the start of a training step, before its first forward",
    "weights": "the end of a training step, after its update (with action `nan`)",
    "nan_loss": "every micro-batch loss of a step, made NaN (its step is 0-based; read by trainer/step.py)",
    "a2a": "inside an MoE layer's expert all-to-all, before this rank's exchange of split sizes",
    "grad_reduce": "the data-parallel gradient all-reduce, before this rank launches it",
    "save": "a checkpoint save, after this rank's data state and before its RNG state",
    "save_shards": "a checkpoint save, between this rank's weight and optimizer files",
    "save_manifest": "a checkpoint save, while rank 0 writes the integrity manifest (half of it written)",
    "save_marker": "a checkpoint save, after every rank's files are durable and before COMPLETE",
    "save_prune": "a checkpoint save, after COMPLETE, while retention deletes an old checkpoint",
}
"""Where faults can be injected."""

_SIGNALS = {"KILL": signal.SIGKILL, "STOP": signal.SIGSTOP, "TERM": signal.SIGTERM, "USR1": signal.SIGUSR1}
_fired = False
current_step = 0
"""The training step (1-based) being run, set by the training loop."""


def _parse() -> tuple[str, int, int | None, str] | None:
    raw = os.environ.get("LATENTMOE_FAULT", "")
    if not raw:
        return None
    site, _, rest = raw.partition("@")
    parts = rest.split(":")
    rank = int(parts[1]) if len(parts) > 1 and parts[1] not in ("", "*") else None
    action = parts[2] if len(parts) > 2 else "exit"
    return site, int(parts[0]), rank, action


_spec = _parse()  # read once, at import: the launcher sets it before the process starts


def scheduled(site: str) -> tuple[int, int | None] | None:
    """(step, rank or None for every rank) of the fault set for `site`, or None."""
    return (_spec[1], _spec[2]) if armed(site) else None


def armed(site: str) -> bool:
    """Whether a fault is set for `site` at all (a constant: a hot path, even a compiled one, skips the call)."""
    return _spec is not None and _spec[0] == site


def fault(site: str, step: int | None = None) -> bool:
    """Fire the configured fault if it names `site`, this step (default: `current_step`) and this rank. Returns
    True for the `nan` action, which the caller carries out (a NaN written into a weight)."""
    global _fired
    if _fired or not armed(site):
        return False
    _, at_step, rank, action = _spec
    if at_step != (current_step if step is None else step):
        return False
    if rank is not None and rank != int(os.environ.get("RANK", 0)):
        return False
    _fired = True
    print(f"[fault injection] {action} at {site}, step {at_step}, rank {os.environ.get('RANK', 0)}, "
          f"time {time.time():.3f}", flush=True)
    if action == "exit":
        os._exit(137)
    if action == "nan":
        return True
    os.kill(os.getpid(), _SIGNALS[action])
    return False
