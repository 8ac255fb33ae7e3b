"""Checkpoints saved in the background (`checkpoint.async_save`, docs/checkpoints.md "Background saves").

A save stops training only while this rank's weights and optimizer state are copied into host buffers (pinned on a
GPU, allocated once and reused); a thread then writes, hashes and NaN-checks the copy (trainer/tensorfile.py) and
commits it with the same protocol as a synchronous save (`checkpoint.commit`: COMPLETE only after every rank's files
and the manifest are durable). The thread's collectives run on a gloo group of their own, so they never interleave
with training's. At most one save is in flight: the next one, the end of training and a preemption wait for it.

Each step the ranks already agree on whether to stop (`Preemption.requested`); a failed background save rides on
that agreement, so every rank raises its error at the same step.
"""

from __future__ import annotations

import copy
import threading
import time
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from data.tokenizer import TextTokenizer

from .checkpoint import SaveJob, _fresh_dir, commit, owned_tensors, rng_state, write_tensor_files
from .config import ASYNC_SAVE_MIN_BYTES
from .distributed import DistEnv

if TYPE_CHECKING:
    from .config import TrainConfig
    from .engines import Engine


def state_bytes(model: torch.nn.Module) -> int:
    """A rank's checkpointed state: its weights, and AdamW's two fp32 moments of each trainable one."""
    return sum(p.numel() * (p.element_size() + (8 if p.requires_grad else 0)) for p in model.parameters())


def in_background(cfg: TrainConfig, engine: Engine) -> bool:
    """`checkpoint.async_save` resolved for this run (docs/checkpoints.md, "Background saves")."""
    if cfg.checkpoint.async_save is not None:
        return bool(cfg.checkpoint.async_save)
    return not cfg.uses_deepspeed and state_bytes(engine.model) >= ASYNC_SAVE_MIN_BYTES


class BackgroundSaver:
    """Saves checkpoints of `engine` in a thread. Create it on every rank (it makes a process group: collective)."""

    def __init__(self, engine: Engine, env: DistEnv, timeout_s: int):
        from datetime import timedelta
        self.engine, self.env = engine, env
        self.group = (torch.distributed.new_group(backend="gloo", timeout=timedelta(seconds=timeout_s))
                      if env.distributed else None)
        self.buffers: dict[str, torch.Tensor] = {}
        self.thread: threading.Thread | None = None
        self.job: SaveJob | None = None
        self.error: BaseException | None = None
        self.host_bytes = 0

    def save(self, root: str | Path, step: int, train_state: dict, data_state: dict, keep: int,
             tokenizer: TextTokenizer | None) -> SaveJob:
        """Wait for the save in flight, copy this step's state to host memory, and write it in the background.
        Returns the job (its `seconds["stall"]`: how long training stopped)."""
        self.wait()
        start = time.perf_counter()
        engine = self.engine
        weights, optim = owned_tensors(engine.model, engine.optimizer, engine.owns_dense, engine.owns_experts)
        files = {"model": weights, "optimizer": optim} if engine.optimizer is not None else {"model": weights}
        files = {stem: {k: self._stage(f"{stem}/{k}", t) for k, t in tensors.items()}
                 for stem, tensors in files.items()}
        if engine.device.type == "cuda":
            torch.cuda.synchronize(engine.device)  # the non-blocking copies into pinned memory are done
        job = SaveJob(Path(root), step, files, train_state, copy.deepcopy(data_state), rng_state(), tokenizer, keep)
        job.seconds["stall"] = time.perf_counter() - start
        self.job, self.error = job, None
        self.thread = threading.Thread(target=self._run, args=(job,), name=f"checkpoint-{step}", daemon=True)
        self.thread.start()
        return job

    def _stage(self, key: str, t: torch.Tensor) -> torch.Tensor:
        """`t` copied into this entry's host buffer (kept from save to save while shape and dtype stay)."""
        buffer = self.buffers.get(key)
        if buffer is None or buffer.shape != t.shape or buffer.dtype != t.dtype:
            pin = self.engine.device.type == "cuda"
            buffer = self.buffers[key] = torch.empty(t.shape, dtype=t.dtype, pin_memory=pin)
            self.host_bytes = sum(b.numel() * b.element_size() for b in self.buffers.values())
        buffer.copy_(t.detach(), non_blocking=True)
        return buffer

    def _run(self, job: SaveJob) -> None:
        try:
            if self.env.is_main:
                _fresh_dir(job)
            if self.group is not None:
                torch.distributed.barrier(group=self.group)
            write_tensor_files(job, self.env)
            commit(job, self.env, group=self.group)
        except BaseException as e:  # noqa: BLE001 - handed to the training thread, raised there
            self.error = e

    @property
    def in_flight(self) -> bool:
        return self.thread is not None and self.thread.is_alive()

    def failed(self) -> bool:
        """Whether the last save ended with an error (not blocking)."""
        return self.thread is not None and not self.thread.is_alive() and self.error is not None

    def wait(self) -> SaveJob | None:
        """Block until the save in flight is committed; raise its error (once) if it failed. Returns its job."""
        if self.thread is None:
            return None
        self.thread.join()
        self.thread, job, error = None, self.job, self.error
        self.error = None
        if error is not None:
            raise error
        return job

    def drain(self) -> None:
        """Wait for the save in flight while the run is already failing: its own error is printed, not raised."""
        try:
            self.wait()
        except Exception as e:  # noqa: BLE001 - the run's first error is the one reported
            print(f"rank {self.env.rank}: the background checkpoint save failed too: {e}", flush=True)
