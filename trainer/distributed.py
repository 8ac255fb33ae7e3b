"""Process setup and the few collectives the simple data-parallel path needs. Everything that crosses processes
lives in trainer/, never in model/."""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import traceback
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path

import torch
import torch.distributed as dist


@dataclass
class DistEnv:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


def env_from_launcher() -> DistEnv:
    """Rank, world size and local rank as torchrun and the deepspeed launcher export them (one process otherwise)."""
    return DistEnv(int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1)),
                   int(os.environ.get("LOCAL_RANK", 0)))


def pick_device(choice: str, env: DistEnv) -> torch.device:
    if choice == "auto":
        choice = "cuda" if torch.cuda.is_available() else "cpu"
    if choice == "cuda":
        if not torch.cuda.is_available():
            raise ValueError("trainer.device=cuda: no CUDA device is visible")
        return torch.device("cuda", env.local_rank % torch.cuda.device_count())
    return torch.device(choice)


def init_process_group(env: DistEnv, device: torch.device, backend: str, timeout_s: int,
                       single: bool = False) -> None:
    """The default process group of a launched job. `single`: a one-process group also when run under plain
    `python` (DeepSpeed's engine needs one, and would otherwise look for MPI)."""
    if dist.is_initialized() or not (env.distributed or single):
        return
    if not env.distributed:
        with socket.socket() as s:  # a free local port for the one-process rendezvous
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
        os.environ.setdefault("MASTER_PORT", str(port))
        for key, value in (("RANK", "0"), ("WORLD_SIZE", "1"), ("LOCAL_RANK", "0")):
            os.environ.setdefault(key, value)
    if backend == "auto":
        backend = "nccl" if device.type == "cuda" else "gloo"
    if device.type == "cuda":
        torch.cuda.set_device(device)
        for key, value in NCCL_DEFAULTS.items():
            os.environ.setdefault(key, value)
    timeout = timedelta(seconds=timeout_s)
    # Every group created later without a timeout of its own (ours in expert_parallel.build_grid, DeepSpeed's expert
    # and data groups) takes torch's default: make that default ours, so no collective waits torch's 30 minutes.
    c10d = dist.distributed_c10d
    c10d.default_pg_timeout = c10d.default_pg_nccl_timeout = timeout
    dist.init_process_group(backend=backend, rank=env.rank, world_size=env.world_size, timeout=timeout)


NCCL_DEFAULTS = {
    "TORCH_NCCL_ASYNC_ERROR_HANDLING": "3",  # the watchdog ends the process on a timed-out or failed collective
    "TORCH_NCCL_TRACE_BUFFER_SIZE": "2000",  # the flight recorder: the last collectives of every rank...
    "TORCH_NCCL_DUMP_ON_TIMEOUT": "1",  # ...dumped when one times out (docs/reliability.md)
}
"""NCCL watchdog and flight-recorder settings set unless the environment already has them."""


class CollectiveError(RuntimeError):
    """A collective failed: a peer died (its connection closed) or stopped responding (the group's timeout)."""


_FAILURE_SIGNS = ("Timed out", "timed out", "Connection closed by peer", "Connection reset by peer",
                  "NCCL", "Broken pipe", "DistBackendError")


@dataclass
class Where:
    """What the run is doing, for the message of a collective that fails: the step (1-based) being trained or
    just finished, and the phase (startup, verify, resume, step, save, export)."""

    step: int = 0
    phase: str = "startup"

    def at(self, phase: str, step: int | None = None) -> None:
        self.phase = phase
        if step is not None:
            self.step = step


current = Where()
"""Updated by the training loop (`current.at("save", step)`)."""


@contextlib.contextmanager
def collective_errors(env: DistEnv):
    """Turn the failure of a collective inside the block into a CollectiveError naming rank, step, phase and where."""
    try:
        yield
    except RuntimeError as e:
        failure = collective_failure(e, env)
        if failure is None:
            raise
        raise failure from None


def collective_failure(e: BaseException, env: DistEnv) -> CollectiveError | None:
    """A CollectiveError naming this rank, the step and phase (`current`) and where the failed collective was called
    (the innermost frames of our code), if `e` is the failure of a collective; None otherwise."""
    if not (isinstance(e, dist.DistError) or isinstance(e, RuntimeError) and any(s in str(e) for s in _FAILURE_SIGNS)):
        return None
    root = Path(__file__).resolve().parents[1]
    frames = [f for f in traceback.extract_tb(e.__traceback__) if Path(f.filename).resolve().is_relative_to(root)]
    site = " <- ".join(f"{f.name} ({Path(f.filename).resolve().relative_to(root)}:{f.lineno})"
                       for f in reversed(frames[-3:])) if frames else "an unknown collective"
    first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
    return CollectiveError(f"rank {env.rank}: step {current.step} ({current.phase}): the collective at {site} "
                           f"failed: {first[:300]}; another "
                           "rank died or stopped responding (parallel.timeout_s); the job ends, and a relaunch "
                           "resumes from the newest checkpoint")


def end_local_peers() -> list[int]:
    """Under torchrun: SIGKILL the other workers of this launcher (this host), so that a worker which is alive but
    stuck (stopped, spinning, in a kernel wait) cannot hold the job for the launcher's grace period after a
    collective failed; the launcher then ends at once. Returns the pids signalled."""
    if "TORCHELASTIC_RUN_ID" not in os.environ:
        return []
    parent, me, killed = os.getppid(), os.getpid(), []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == me:
            continue
        try:
            ppid = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
        except (OSError, IndexError, ValueError):
            continue
        if ppid == parent:
            try:
                os.kill(int(entry.name), signal.SIGKILL)
                killed.append(int(entry.name))
            except OSError:
                pass
    return killed


def shutdown() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()


def broadcast_object(obj, env: DistEnv):
    """Rank 0's `obj` on every rank."""
    if not env.distributed:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def barrier(env: DistEnv) -> None:
    if env.distributed:
        dist.barrier()


def all_reduce_sum(t: torch.Tensor, env: DistEnv) -> torch.Tensor:
    if env.distributed:
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t


def spawn_local(target, world: int, args) -> list[dict]:
    """Run `target(rank, args, port, queue)` in `world` spawned processes on this machine (the benchmarks' gloo
    workers; `port` is a free one for their process group) and return what each put on `queue`, by "rank"."""
    import socket

    import torch.multiprocessing as mp

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    procs = [ctx.Process(target=target, args=(r, args, port, queue)) for r in range(world)]
    for proc in procs:
        proc.start()
    results = sorted((queue.get(timeout=600) for _ in procs), key=lambda r: r["rank"])
    for proc in procs:
        proc.join()
        if proc.exitcode:
            raise SystemExit(f"a worker process failed (exit {proc.exitcode})")
    return results
