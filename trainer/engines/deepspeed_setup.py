"""What DeepSpeed's two engines here (ZeRO, pipeline) share: the generated DeepSpeed config, experts registered as
DeepSpeed MoE parameters, the expert-group marker, and DeepSpeed's own checkpoint files.

Routed expert parameters are registered the way DeepSpeed's own MoE layers register theirs (`allreduce=False`, a
`group_name`, an optimizer group with `moe: True`), so ZeRO reduces and partitions them over the
expert-data-parallel group only. DeepSpeed recognises a model with experts by finding one of its `MoE` modules in
it; `ExpertGroups` is that marker (no parameters, no forward), and it creates DeepSpeed's expert groups with the
same layout as ours (`ep` consecutive ranks inside each pipeline stage).
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import warnings
from pathlib import Path
from typing import ContextManager

import torch
from torch import nn

from model.hf import CheckpointError

from ..config import TrainConfig
from ..layout import ProcessGrid, is_expert_param
from ..optim import build_param_groups


def import_deepspeed():
    """`deepspeed`, set up for this machine and quiet. On CPU, DeepSpeed would JIT-compile a shared-memory all-reduce
    kernel on first use (about a minute on 2 cores, and a C++ toolchain required); gloo does the same job, so it is
    skipped. DeepSpeed's info lines (its config, timers, the accelerator it picked, the compiler calls of its
    op-compatibility probes) are kept below the log's level, and torch's deprecation notices for the collectives
    DeepSpeed calls are not shown (nothing a user can change). Call it before importing anything of DeepSpeed's."""
    if not torch.cuda.is_available():
        os.environ.setdefault("DS_ACCELERATOR", "cpu")  # chosen, not guessed: no "unable to detect" warning
    logging.getLogger("compilers").setLevel(logging.WARNING)  # DeepSpeed's op probes log each gcc call at info
    warnings.filterwarnings("ignore", message=r"`torch\.distributed\.\w+` is deprecated", category=FutureWarning)
    import deepspeed
    from deepspeed.accelerator import get_accelerator
    from deepspeed.utils import logger
    logger.setLevel(logging.WARNING)
    if get_accelerator().device_name() == "cpu":
        deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False
    return deepspeed


def create_expert_groups(grid: ProcessGrid) -> None:
    """DeepSpeed's expert groups (collective: every rank creates every group). Done on every rank before the engine
    is built, also where a pipeline stage holds no MoE layer and so no marker, or the ranks would disagree."""
    if grid.ep == 1 or grid.world == 1:
        return
    import torch.distributed as dist
    deepspeed = import_deepspeed()
    from deepspeed.utils import groups
    deepspeed.init_distributed(dist_backend=dist.get_backend())
    if group_name(grid.ep) not in groups._get_expert_parallel_group_dict():
        groups._create_expert_and_data_parallel(grid.ep, pp_size=grid.pp)


def group_name(ep: int) -> str:
    return f"ep_size_{ep}"  # DeepSpeed's own name for the expert groups of size ep


def moe_marker_class():
    from deepspeed.moe.layer import MoE as DeepSpeedMoE

    class ExpertGroups(DeepSpeedMoE):
        """Tells DeepSpeed the model has experts (it looks for its MoE modules) and creates its expert groups."""

        def __init__(self, n_experts: int, ep: int, pp: int):
            nn.Module.__init__(self)  # none of DeepSpeedMoE's gate/experts: ours live in model/moe.py
            self.num_experts, self.ep_size, self.pp = n_experts, ep, pp
            self.num_local_experts = n_experts // ep
            self.expert_group_name = group_name(ep)

        def set_deepspeed_parallelism(self, use_data_before_expert_parallel_: bool = False) -> None:
            from deepspeed.utils import groups
            if self.expert_group_name not in groups._get_expert_parallel_group_dict():
                groups._create_expert_and_data_parallel(self.ep_size, pp_size=self.pp)

        def forward(self, *args, **kwargs):
            raise RuntimeError("ExpertGroups is a marker for DeepSpeed, not a layer")

    return ExpertGroups


def mark_expert_params(model: nn.Module, grid: ProcessGrid) -> None:
    """Flag routed-expert parameters as DeepSpeed MoE parameters (reduced over the expert-data-parallel group)."""
    if grid.ep == 1:
        return
    for name, p in model.named_parameters():
        if is_expert_param(name):
            p.allreduce = False
            p.group_name = group_name(grid.ep)


def initialize(module: nn.Module, model: nn.Module, cfg: TrainConfig, grid: ProcessGrid, accumulation: int,
               precision: str):
    """DeepSpeed's engine over `module` (what DeepSpeed wraps around `model`, this rank's CausalLM part), with our
    AdamW and the paper's groups handed to ZeRO; the routed experts in an expert group of their own when sharded."""
    deepspeed = import_deepspeed()
    groups = build_param_groups(model, cfg.optim, expert_group=group_name(grid.ep) if grid.ep > 1 else None)
    o = cfg.optim
    optimizer = torch.optim.AdamW(groups, lr=o.lr, betas=tuple(o.betas), eps=o.eps)
    engine, *_ = deepspeed.initialize(model=module, optimizer=optimizer,
                                      config=deepspeed_config(cfg, grid, accumulation, precision))
    return engine


def deepspeed_config(cfg: TrainConfig, grid: ProcessGrid, accumulation: int, precision: str) -> dict:
    """The DeepSpeed JSON for this run, with `parallel.deepspeed_config` (if any) merged over it."""
    stage = cfg.resolved_zero_stage()
    micro = cfg.trainer.micro_batch_size
    ds = {
        "train_micro_batch_size_per_gpu": micro,
        "gradient_accumulation_steps": accumulation,
        "train_batch_size": micro * accumulation * grid.dp,
        # ZeRO 1-3 clip by the global norm; ZeRO-0's own clipping averages per-rank norms (and in bf16 leaves the
        # experts out), so there DeepSpeedStep clips with the built-in engine's norm instead.
        "gradient_clipping": cfg.optim.grad_clip if stage else 0.0,
        "zero_optimization": {"stage": stage, "overlap_comm": False, "contiguous_gradients": True,
                              "reduce_bucket_size": 5e7, "allgather_bucket_size": 5e7},
        "bf16": {"enabled": precision == "bf16"},
        "zero_allow_untested_optimizer": True,  # our torch AdamW with the paper's groups
        "steps_per_print": 2**31 - 1,
        "wall_clock_breakdown": False,
        "checkpoint": {"load_universal": False},
    }
    if stage == 3:
        ds["zero_optimization"].update(stage3_gather_16bit_weights_on_model_save=False)
    if cfg.parallel.deepspeed_config:
        user = json.loads(Path(os.path.expanduser(cfg.parallel.deepspeed_config)).read_text())
        ds = _merge(ds, user)
    return ds


def _merge(base: dict, override: dict) -> dict:
    out = dict(base)
    for key, value in override.items():
        out[key] = _merge(out[key], value) if isinstance(value, dict) and isinstance(out.get(key), dict) else value
    return out


# ------------------------------------------------------------------------------------ checkpoints
# A DeepSpeed run's checkpoint is our usual step directory (weights one entry per expert, data position, RNG, commit
# marker) plus DeepSpeed's own save in `deepspeed/` for the ZeRO-partitioned optimizer states (and, under ZeRO-3, the
# partitioned weights). DeepSpeed writes those with torch.save (pickle): they are only ever read back from our own
# checkpoint directories, never from a downloaded one.
DEEPSPEED_DIR, TAG = "deepspeed", "state"


class DeepSpeedState:
    """What both DeepSpeed engines do alike around `self.ds` (DeepSpeed's engine): the learning rate of its
    optimizer, and its own checkpoint files beside ours."""

    ds = None

    def set_lr(self, step: int) -> None:
        for group in self.ds.optimizer.param_groups:
            group["lr"] = self.lr(step)

    def full_weights(self, modifier_rank: int | None = None) -> ContextManager:
        """Under ZeRO-3, a context in which every weight is whole on every rank (collective); otherwise a no-op.
        With `modifier_rank`, that rank's changes are written back to the partitions."""
        if not self.ds.zero_optimization_partition_weights():
            return contextlib.nullcontext()
        import deepspeed
        return deepspeed.zero.GatheredParameters(list(self.model.parameters()), modifier_rank=modifier_rank)

    def save_state(self, path: Path) -> list[Path]:
        """DeepSpeed's save_checkpoint into `path/deepspeed` (collective); returns the files it wrote (for fsync
        before the commit marker)."""
        before = set((path / DEEPSPEED_DIR).rglob("*")) if (path / DEEPSPEED_DIR).exists() else set()
        self.ds.save_checkpoint(str(path / DEEPSPEED_DIR), tag=TAG, client_state={}, save_latest=False)
        return [p for p in (path / DEEPSPEED_DIR).rglob("*") if p.is_file() and p not in before]

    def load_state(self, path: Path) -> bool:
        """Restore DeepSpeed's optimizer partitions (collective); True under ZeRO-3, whose partitions hold the
        weights. The expert-group marker is taken out while DeepSpeed loads, so it does not look for per-expert
        files of its own MoE layers: our experts come from our weight files, which are loaded afterwards
        (DeepSpeed's module file holds only the first expert shard's)."""
        if not (path / DEEPSPEED_DIR / TAG).is_dir():
            raise CheckpointError(f"{path}: no DeepSpeed state ({DEEPSPEED_DIR}/{TAG}); it was written by the "
                                  "built-in engine (parallel.zero_stage=null): resume it with the same engine, or "
                                  "start from its weights")
        marker = self.ds.module._modules.pop("expert_groups", None)
        try:
            self.ds.load_checkpoint(str(path / DEEPSPEED_DIR), tag=TAG, load_optimizer_states=True,
                                    load_lr_scheduler_states=False, load_module_strict=False)
        finally:
            if marker is not None:
                self.ds.module._modules["expert_groups"] = marker
        return self.ds.zero_optimization_partition_weights()

    def weights_changed(self) -> None:
        """ZeRO's fp32 master copies were made from the weights the engine was built with: after weights were
        written into the module (a weights-only start, a fresh optimizer) they are taken again, or the first update
        would bring the old weights back. (After DeepSpeed restored its own state they already agree.)"""
        refresh = getattr(self.ds.optimizer, "refresh_fp32_params", None)
        if refresh is not None:
            refresh()
