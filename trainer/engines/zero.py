"""DeepSpeed's engine with ZeRO 0-3 for data parallelism, experts as DeepSpeed MoE parameter groups.

The step is the built-in engine's (same micro-batch loop, same objective); only the backward, the gradient
reduction and the update go through DeepSpeed. DeepSpeed averages gradients over data-parallel ranks (experts too:
divided by the data-parallel size, summed over the expert-data-parallel group) and divides each micro-batch's loss
by the accumulation steps, where the built-in engine sums: multiplying each micro-batch's loss by accumulation x dp
before `engine.backward` makes the two take exactly the same step.
"""

from __future__ import annotations

import torch
from torch import nn

from model import CausalLM

from ..expert_parallel import clip_grad_norm
from .base import checked, finite
from .builtin import DataParallelEngine
from .deepspeed_setup import (
    DeepSpeedState,
    create_expert_groups,
    deepspeed_param_states,
    import_deepspeed,
    initialize,
    mark_expert_params,
    moe_marker_class,
)


class EngineModel(nn.Module):
    """What DeepSpeed wraps: the CausalLM (as `module`, which `model.hf.unwrap` follows) plus the expert-group
    marker when experts are sharded."""

    def __init__(self, model: CausalLM, ep: int, pp: int):
        super().__init__()
        self.module = model
        if ep > 1 and model.moe_layers():
            self.expert_groups = moe_marker_class()(model.config.n_routed_experts, ep, pp)

    def forward(self, **kwargs):
        return self.module(**kwargs)


class ZeroEngine(DeepSpeedState, DataParallelEngine):
    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        model, cfg, grid = self.model, self.cfg, self.grid
        import_deepspeed()  # first: it quiets DeepSpeed before anything of it loads
        self.zero_stage = cfg.resolved_zero_stage()
        self.name = f"DeepSpeed ZeRO-{self.zero_stage}"
        mark_expert_params(model, grid)
        create_expert_groups(grid)
        # accumulation x dp: under context parallelism cp ranks share each micro-batch's sequences
        self.per_term = cfg.trainer.global_batch_size // cfg.trainer.micro_batch_size * grid.cp
        self.ds = initialize(EngineModel(model, grid.ep, grid.pp), model, cfg, grid,
                             self.per_term // grid.dp, self.precision)
        self.optimizer = deepspeed_param_states(self.ds)  # our per-entry files read and write it

    def forward(self, **inputs):
        return self.ds(**inputs)

    def backward(self, loss: torch.Tensor, last: bool) -> None:
        # DeepSpeed divides by its accumulation steps and averages over dp: undo both to keep our sums.
        self.ds.backward(loss * self.per_term)
        if not last:
            self.ds.step()  # DeepSpeed counts micro-batches by its step(); before the boundary it updates nothing

    def update(self, loss: float) -> tuple[float, bool]:
        """At the accumulation boundary: ZeRO 1-3 clip by the global norm and skip a non-finite update themselves.
        ZeRO-0's own clipping averages per-rank norms (and in bf16 leaves the experts out), so its gradients, whole
        on every rank here, are clipped by the built-in engine's global norm instead (each expert counted once)."""
        if self.zero_stage == 0:
            max_norm = self.cfg.optim.grad_clip if self.cfg.optim.grad_clip > 0 else float("inf")
            norm = clip_grad_norm(self.model, max_norm, self.grid)
            if not finite(norm) and not self.ds.bfloat16_enabled():
                # fp32: torch AdamW leaves parameters without a gradient (and their state) untouched. (bf16: the
                # gradients stay non-finite and DeepSpeed's bf16 optimizer skips the step itself.)
                for p in self.model.parameters():
                    p.grad = None
        self.ds.step()  # the update (DeepSpeed skips it for a non-finite norm under ZeRO 1-3)
        applied = self.ds.was_step_applied()
        if self.zero_stage != 0:
            return checked(self.ds.get_global_grad_norm()), not (applied and finite(loss))
        return norm, not (applied and finite(loss, norm))
