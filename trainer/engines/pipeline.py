"""Pipeline parallelism through DeepSpeed's `PipelineEngine` (1F1B), combined with expert parallelism.

Each rank's stage is a `CausalLM` holding a contiguous cut of the model (`layout.stage_part`: its layers by global
index, the embedding on the first stage, the final norm and head on the last), so the stage runs the model's own
forward and names its tensors as the whole model does. To DeepSpeed it is one pipeline layer, `PipelineStage`,
which unpacks the activations tuple and packs the result. Between stages travel `(hidden, position_ids, exempt[,
document_ids])`: only `hidden` is floating point, so it is the only tensor whose gradient goes back.

Balance losses on every stage: a MoE layer's auxiliary loss never reaches the last stage's loss, so each stage
attaches its own to its output with `inject_aux`, which returns the output unchanged and, on the way back, gives the
auxiliary loss the gradient `scale` (its weight in the step's objective), so the router of a first-stage layer is
trained exactly as in the one-process model.

Gradient scale: DeepSpeed divides the last stage's loss by the micro-batches per step and averages gradients over
data-parallel ranks. The loss function therefore returns CE sum x (micro-batches x dp / supervised tokens of the
step), and the injected balance gradient is 1 / micro-batches, which together take the built-in engine's step.
"""

from __future__ import annotations

import contextlib
import io

import torch
import torch.distributed as dist
from torch import nn

from model import CausalLM
from model.loss import IGNORE_INDEX, cross_entropy
from model.moe import exempt_sequences

from ..config import stop_if_non_finite
from ..step import StepResult, StepStats, fault_scale, supervised_tokens
from .base import Engine, checked, finite
from .deepspeed_setup import (
    DeepSpeedState,
    create_expert_groups,
    deepspeed_param_states,
    import_deepspeed,
    initialize,
    mark_expert_params,
    moe_marker_class,
)


class _InjectAux(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden: torch.Tensor, aux: torch.Tensor, scale: float) -> torch.Tensor:
        ctx.scale, ctx.aux_meta = scale, (aux.shape, aux.dtype, aux.device)
        return hidden.view_as(hidden)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        shape, dtype, device = ctx.aux_meta
        return grad, torch.full(shape, ctx.scale, dtype=dtype, device=device), None


def inject_aux(hidden: torch.Tensor, aux: torch.Tensor, scale: float) -> torch.Tensor:
    """`hidden`, through which backward also sends d(objective)/d(aux) = `scale` into `aux`'s graph."""
    return _InjectAux.apply(hidden, aux, scale)


class PipelineStage(nn.Module):
    """This rank's stage as DeepSpeed's one pipeline layer: the activations tuple in, CausalLM's forward, the tuple
    out (the logits on the last stage). During a training step it adds its routing statistics to `stats`."""

    def __init__(self, model: CausalLM, first_moe_layer: int):
        super().__init__()
        self.model, self.first_moe_layer = model, first_moe_layer
        self.stats: StepStats | None = None
        self.aux_scale = 1.0

    def forward(self, inputs: tuple[torch.Tensor, ...]):
        if self.model.model.embed_tokens is not None:
            input_ids, position_ids, *documents = inputs
            exempt = exempt_sequences(input_ids, self.model.no_drop_fraction)
            start = {"input_ids": input_ids}
        else:
            hidden, position_ids, exempt, *documents = inputs
            exempt, start = exempt.bool(), {"hidden_states": hidden}
        out = self.model(**start, position_ids=position_ids, document_ids=documents[0] if documents else None,
                         exempt=exempt)
        result = out.logits if out.logits is not None else out.hidden_states
        if out.aux_loss is not None:  # training
            result = inject_aux(result, out.aux_loss, self.aux_scale)
            if self.stats is not None:
                self.stats.add_routing(out, self.first_moe_layer)
        if out.logits is not None:
            return result
        return (result, position_ids, exempt.long(), *documents)  # integers: no gradient travels for them


class PipelineLoss:
    """Last stage: CE sum x the step's scale (labels travel as `(labels, scale)`); the CE sums and supervised
    tokens of the pass are added up in `totals`."""

    __name__ = "token_weighted_cross_entropy"

    def __init__(self):
        self.totals: torch.Tensor | None = None  # (2,) float64: CE sum, supervised tokens

    def __call__(self, logits: torch.Tensor, labels: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        targets, scale = labels
        n = (targets != IGNORE_INDEX).sum()
        ce_sum = cross_entropy(logits.flatten(0, 1), targets.flatten()) * n
        self.totals += torch.stack([ce_sum.detach().double(), n.double()])
        return ce_sum * scale.reshape(())


def _pipeline_module_class():
    from deepspeed.pipe import PipelineModule

    class LatentPipeline(PipelineModule):
        """PipelineModule with one layer per stage, each rank holding its own (our cut, not DeepSpeed's)."""

        def _partition_layers(self, method: str = "parameters") -> None:
            self.parts = list(range(self.num_stages + 1))
            self._set_bounds(start=self.stage_id, stop=self.stage_id + 1)

    return LatentPipeline


class PipelineEngine(DeepSpeedState, Engine):
    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        model, cfg, grid = self.model, self.cfg, self.grid
        self.name = f"DeepSpeed ZeRO-{cfg.resolved_zero_stage()}, pipeline 1F1B"
        deepspeed = import_deepspeed()
        from deepspeed.runtime.pipe.topology import PipeDataParallelTopology
        deepspeed.init_distributed(dist_backend=dist.get_backend())  # wraps our process group for PipelineModule
        first_layer = min(map(int, model.model.layers), default=0)
        self.stage_module = PipelineStage(model, sum(cfg.model.is_moe_layer(i) for i in range(first_layer)))
        self.loss = PipelineLoss()
        with contextlib.redirect_stdout(io.StringIO()):  # DeepSpeed prints its layer-seeding settings
            module = _pipeline_module_class()(
                layers=[self.stage_module if s == grid.stage else None for s in range(grid.pp)],
                topology=PipeDataParallelTopology(num_pp=grid.pp, num_dp=grid.dp), loss_fn=self.loss)
        if grid.ep > 1:
            mark_expert_params(model, grid)
            create_expert_groups(grid)  # on every stage, with or without MoE layers
            if model.moe_layers():
                module.expert_groups = moe_marker_class()(cfg.model.n_routed_experts, grid.ep, grid.pp)
        self.accumulation = cfg.trainer.global_batch_size // (cfg.trainer.micro_batch_size * grid.dp)
        self.ds = initialize(module, model, cfg, grid, self.accumulation, self.precision)
        self.optimizer = deepspeed_param_states(self.ds)  # our per-entry files read and write it
        self.n_moe_layers = sum(cfg.model.is_moe_layer(i) for i in range(cfg.model.num_hidden_layers))

    def _micro_batches(self, batches: list[dict], scale: float):
        """DeepSpeed's data iterator: ((input_ids, position_ids[, document_ids]), (labels, scale)) per batch."""
        for batch in batches:
            position_ids = batch.get("position_ids")
            if position_ids is None:
                B, S = batch["input_ids"].shape
                position_ids = torch.arange(S).expand(B, S).contiguous()
            inputs = [batch["input_ids"], position_ids] + ([batch["document_ids"]] if "document_ids" in batch else [])
            yield (tuple(t.to(self.device) for t in inputs),
                   (batch["labels"].to(self.device), torch.tensor([scale], device=self.device)))

    def step(self, step: int, batches: list[dict], records: tuple[int, int] = (0, 0)) -> StepResult:
        grid = self.grid
        supervised = torch.tensor(float(supervised_tokens(batches)), device=self.device)
        if grid.dp > 1:
            dist.all_reduce(supervised, group=grid.dp_group)
        supervised = max(float(supervised), 1.0)
        self.set_lr(step)
        stats = StepStats(self.n_moe_layers, self.cfg.model.n_routed_experts or 0, len(batches), grid.dp,
                          self.device)
        if grid.stage == 0:  # every stage reads the data: count it once
            stats.add_records(records)
        self.stage_module.stats, self.stage_module.aux_scale = stats, 1.0 / len(batches)
        self.loss.totals = torch.zeros(2, dtype=torch.float64, device=self.device)
        scale = len(batches) * grid.dp / supervised * fault_scale(step, self.env.rank)
        try:
            self.ds.train_batch(data_iter=self._micro_batches(batches, scale))
        finally:
            self.stage_module.stats = None
        stats.ce_sum += self.loss.totals[0]
        stats.reduce(self.env)
        loss = stats.loss(supervised)
        norm = checked(self.ds.get_global_grad_norm())
        skipped = not (self.ds.was_step_applied() and finite(loss))
        stop_if_non_finite(skipped, step, loss, norm, self.cfg.trainer.non_finite)
        return stats.result(loss, norm, skipped, batches, grid.dp)

    @torch.no_grad()
    def eval_stages(self) -> tuple[list[tuple[int, CausalLM]], list[int]]:
        return [(self.grid.stage, self.model)], list(range(self.grid.pp))

    def validate(self, batches: list[dict]) -> float:
        self.loss.totals = torch.zeros(2, dtype=torch.float64, device=self.device)
        self.ds.eval_batch(data_iter=self._micro_batches(batches, 1.0), num_micro_batches=len(batches))
        self.ds.module.train()
        total = self.loss.totals
        if self.env.distributed:
            dist.all_reduce(total)  # only the last stage's ranks hold non-zero sums
        return float(total[0] / total[1].clamp(min=1))
