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
from .base import ParamStates, TorchParamStates


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


class PartitionedParamStates(ParamStates):
    """DeepSpeed's ZeRO-1/2/3 (and bf16) optimizer state per parameter, through DeepSpeed's public helpers
    (`deepspeed.utils.safe_get_full_optimizer_state`, `safe_get_full_fp32_param` and their `safe_set_full_*`).
    Getting is collective: ZeRO-1/2 and the bf16 optimizer sum each rank's fragment over the parameter's
    data-parallel group (for experts, their expert-data-parallel group), ZeRO-3 all-gathers its partitions. Setting
    writes this rank's own fragment from the whole tensor, with no communication.

    The wrapped torch AdamW keeps one state per flat fp32 partition, created at its first update: on a resume before
    that, the state is created here (zero moments, the resumed step) and DeepSpeed's fragment views re-linked to it,
    then filled. `step` is one counter for all partitions (every update steps every group), so each parameter
    reports the same."""

    collective = keeps_masters = True

    def __init__(self, ds):
        self.zero = ds.optimizer  # DeepSpeed's wrapper
        self.base = ds.optimizer.optimizer  # our torch AdamW over its flat fp32 partitions
        for name in ("fp32_partitioned_groups_flat", "single_partition_of_fp32_groups", "fp32_groups_flat_partition"):
            if getattr(self.zero, name, None) is not None:  # ZeRO-3, ZeRO-1/2, bf16 optimizer
                self.flats = list(getattr(self.zero, name))
                break
        else:
            raise TypeError(f"{type(self.zero).__name__}: not a DeepSpeed optimizer whose state we can read")

    def _slots(self) -> list[str]:
        """AdamW's per-element slots ([] before the first update), the same on every rank."""
        for flat in self.flats:
            state = self.base.state.get(flat)
            if state:
                return sorted(k for k, v in state.items() if torch.is_tensor(v) and v.shape == flat.shape)
        return []

    def _link(self, slots: list[str]) -> None:
        """ZeRO-1/2 and the bf16 optimizer give each parameter views of its fragment in AdamW's state, linked once,
        after the first parameter group's first update, when the other groups have no state yet (DeepSpeed 0.19):
        link again whenever the state tensors are not those last linked. (ZeRO-3 reads AdamW's state directly.)"""
        if not hasattr(self.zero, "_hp_optimizer_states_linked"):
            return
        current = tuple(id(self.base.state[flat][slot]) for flat in self.flats for slot in slots)
        if current != getattr(self, "_linked", None):
            self.zero._hp_optimizer_states_linked = False
            self.zero._lazy_init_hp_params_optimizer_state()
            self._linked = current

    def _step(self) -> float:
        states = [self.base.state.get(flat, {}) for flat in self.flats]
        return max(float(state["step"]) for state in states if "step" in state)

    def get(self, p: nn.Parameter) -> dict[str, torch.Tensor]:
        slots = self._slots() if p.requires_grad else []
        if not slots:
            return {}
        from deepspeed.utils import safe_get_full_optimizer_state
        self._link(slots)
        shape = getattr(p, "ds_shape", p.shape)  # ZeRO-3: the whole shape, whether gathered or not
        state = {slot: safe_get_full_optimizer_state(p, slot).reshape(shape) for slot in slots}
        return {**state, "step": torch.tensor(self._step(), dtype=torch.float32)}

    def master(self, p: nn.Parameter) -> torch.Tensor | None:
        if p.dtype == torch.float32 or not p.requires_grad:
            return None
        from deepspeed.utils import safe_get_full_fp32_param
        return safe_get_full_fp32_param(p).reshape(getattr(p, "ds_shape", p.shape))

    def load(self, states: dict[nn.Parameter, dict[str, torch.Tensor]],
             masters: dict[nn.Parameter, torch.Tensor]) -> None:
        from deepspeed.utils import safe_set_full_fp32_param, safe_set_full_optimizer_state
        states = {p: s for p, s in states.items() if p.requires_grad}
        slots = sorted({k for s in states.values() for k in s if k != "step"})
        if slots:
            steps = [float(s["step"]) for s in states.values() if "step" in s]
            for flat in self.flats:
                self.base.state[flat] = {"step": torch.tensor(max(steps, default=0.0), dtype=torch.float32),
                                         **{k: torch.zeros_like(flat) for k in slots}}
            self._link(slots)
            for p, state in states.items():
                for slot in slots:
                    if slot in state:
                        safe_set_full_optimizer_state(p, state[slot].to(p.device, torch.float32), slot)
        for p, value in masters.items():  # every fp32 master: they were taken from the weights the engine started with
            if p.requires_grad:
                safe_set_full_fp32_param(p, value.to(p.device, torch.float32))


class MasterParamStates(TorchParamStates):
    """DeepSpeed's optimizer at ZeRO-0 in bf16: a whole fp32 master copy of each parameter, which AdamW updates and
    keys its state by (nothing partitioned, nothing collective)."""

    keeps_masters = True

    def __init__(self, wrapper):
        super().__init__(wrapper.optimizer)
        self.masters = {p: m for lp, fp32 in zip(wrapper.fp16_groups, wrapper.fp32_groups, strict=True)
                        for p, m in zip(lp, fp32, strict=True)}

    def get(self, p: nn.Parameter) -> dict[str, torch.Tensor]:
        return self.optimizer.state.get(self.masters[p], {}) if p in self.masters else {}

    def master(self, p: nn.Parameter) -> torch.Tensor | None:
        return self.masters.get(p)

    def load(self, states: dict[nn.Parameter, dict[str, torch.Tensor]],
             masters: dict[nn.Parameter, torch.Tensor]) -> None:
        super().load({self.masters[p]: s for p, s in states.items() if p in self.masters}, {})
        with torch.no_grad():
            for p, value in masters.items():
                if p in self.masters:
                    self.masters[p].copy_(value)


def deepspeed_param_states(ds) -> ParamStates | None:
    """DeepSpeed's optimizer state per parameter, for our per-entry checkpoint files; None for an optimizer wrapper
    we cannot read (its checkpoints then resume only at the layout that wrote them)."""
    optimizer = ds.optimizer
    if isinstance(optimizer, torch.optim.Optimizer):  # ZeRO-0 in fp32: our AdamW over the model's parameters
        return TorchParamStates(optimizer)
    if hasattr(optimizer, "fp16_groups") and hasattr(optimizer, "fp32_groups"):
        return MasterParamStates(optimizer)
    try:
        return PartitionedParamStates(ds)
    except TypeError:
        return None


class DeepSpeedState:
    """What both DeepSpeed engines do alike around `self.ds` (DeepSpeed's engine): the learning rate of its
    optimizer, its state per parameter for our checkpoint files (`self.optimizer`), and its own checkpoint files
    beside ours."""

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
