"""Run under torchrun (2 processes): every process group of the job, ours and DeepSpeed's, has the timeout given
to `init_process_group` (parallel.timeout_s); rank 0 prints every rank's, as one JSON line."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from trainer.distributed import DistEnv, init_process_group  # noqa: E402
from trainer.engines.deepspeed_setup import create_expert_groups  # noqa: E402
from trainer.expert_parallel import build_grid  # noqa: E402


def timeout_of(group) -> float:
    return group._get_backend(torch.device("cpu")).options._timeout.total_seconds()


def main() -> None:
    torch.set_num_threads(1)
    env = DistEnv(int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"]), int(os.environ["LOCAL_RANK"]))
    init_process_group(env, torch.device("cpu"), "gloo", int(sys.argv[1]))
    grid = build_grid(env, pp=1, ep=2)
    create_expert_groups(grid)
    from deepspeed.utils import groups
    timeouts = {"default": timeout_of(torch.distributed.group.WORLD), "dp": timeout_of(grid.dp_group),
                "ep": timeout_of(grid.ep_group), "edp": timeout_of(grid.edp_group)}
    for name, group in groups._get_expert_parallel_group_dict().items():
        timeouts[f"deepspeed_{name}"] = timeout_of(group)
    for name, group in groups._get_expert_data_parallel_group_dict().items():
        timeouts[f"deepspeed_data_{name}"] = timeout_of(group)
    everyone: list = [None] * env.world_size
    torch.distributed.all_gather_object(everyone, {"rank": env.rank, "timeouts": timeouts})
    if env.is_main:
        print(json.dumps(everyone), flush=True)
    torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main()
