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
