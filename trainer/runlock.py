"""One run, one directory: rank 0 holds an exclusive lock on the run directory (and on a `checkpoint.dir` outside
it) for the job's whole life, so a second job started on the same directory stops at once instead of interleaving
its checkpoints and metrics with the first's (docs/reliability.md, "One job per run directory").

The lock is `flock` on `<dir>/.latentmoe.lock`: the kernel drops it when the holding process ends in any way,
kill -9 included, so a lock left by a dead job is simply taken. The file also names the holder (host, pid, start
time) for the message a second job prints."""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import socket
import time
from pathlib import Path

from .config import ConfigError

LOCK_FILE = ".latentmoe.lock"


class RunLock:
    """Exclusive locks on directories, held until `release` or the end of the process."""

    def __init__(self):
        self.handles: list[int] = []

    def acquire(self, directory: Path, key: str) -> None:
        """Lock `directory` (created if needed) or raise ConfigError naming `key` and the job holding it."""
        path = directory / LOCK_FILE
        try:
            directory.mkdir(parents=True, exist_ok=True)
            fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as e:  # read-only, not a directory, no space: nothing of the run could be written there
            raise ConfigError(f"{key}={directory}: cannot write there ({e.strerror or e}: {e.filename or path}); give "
                              f"a writable {key}") from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = _holder(fd)
            os.close(fd)
            raise ConfigError(f"{key}={directory}: another job is using it ({holder}); wait for that job to end, or "
                              f"give this run another {key}") from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, json.dumps({"host": socket.gethostname(), "pid": os.getpid(),
                                  "started": time.strftime("%Y-%m-%d %H:%M:%S")}).encode(), 0)
        os.fsync(fd)
        self.handles.append(fd)

    def release(self) -> None:
        for fd in self.handles:
            with contextlib.suppress(OSError):
                fcntl.flock(fd, fcntl.LOCK_UN)
                os.close(fd)
        self.handles.clear()


def _holder(fd: int) -> str:
    try:
        info = json.loads(os.pread(fd, 4096, 0).decode() or "{}")
    except (OSError, ValueError):
        info = {}
    if not info:
        return "its holder did not say who it is"
    return f"host {info.get('host')}, pid {info.get('pid')}, started {info.get('started')}"


def lock_run(run_dir: Path, checkpoint_dir: str) -> RunLock:
    """Rank 0's locks for a training job: the run directory, and `checkpoint.dir` when it lies outside it."""
    lock = RunLock()
    lock.acquire(run_dir, "hydra.run.dir")
    ckpt = Path(checkpoint_dir).expanduser().resolve()
    if not ckpt.is_relative_to(run_dir.resolve()):
        try:
            lock.acquire(ckpt, "checkpoint.dir")
        except ConfigError:
            lock.release()
            raise
    return lock
