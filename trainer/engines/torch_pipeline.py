"""Pipeline parallelism on torch.distributed.pipelining: 1F1B, interleaved 1F1B, the zero-bubble schedules (ZB-V, as
the paper trained DeepSeek-V2, and interleaved zero-bubble) and DualPipeV, combined with expert parallelism inside
stages and ZeRO-1 over data parallelism (docs/parallelism.md, "Pipeline schedules").

The model is cut into pp x stages-per-rank *virtual stages* by the same planner as DeepSpeed's pipeline
(`layout.stage_boundaries`); a rank holds its virtual stages (`build.virtual_stages`: a loop, or a V for zbv and
dualpipev) as one `CausalLM` part under the whole model's names, which is what checkpoints, exports and the
optimizer see. Each virtual stage runs the model's own forward on a `CausalLM.share_part` view of that part.

What travels: only the hidden states go from stage to stage (and their gradients back). Positions, packed-SFT
document ids and the sequences exempt from token dropping are the same for every stage of a micro-batch and every
rank of a pipeline reads the same batches, so each stage is handed them as keyword inputs instead.

Objective and gradients: as the built-in engine's. The last stage's loss is the micro-batch's CE sum over the
supervised tokens of the whole step on all data-parallel ranks; each virtual stage attaches its MoE layers' balance
losses to its output with `inject_aux` (scale 1 / (micro-batches x dp)), so their gradients reach the routers of
every stage, also through the zero-bubble schedules' split backward (input gradients first, weight gradients later:
both walk the same graph from the stage output). After the schedule, gradients are summed over data-parallel
replicas (dense over dp, experts over edp), clipped by the norm over all stages, and the optimizer steps.
"""

from __future__ import annotations

import contextlib
import time
from typing import ContextManager

import torch
import torch.distributed as dist
from torch import nn

from model import CausalLM
from model.loss import IGNORE_INDEX
from model.moe import exempt_sequences

from ..config import stop_if_non_finite
from ..expert_parallel import broadcast_replicas
from ..grad_sync import GradReducer
from ..layout import stage_part, stage_ranks, virtual_stages
from ..optim import build_optimizer
from ..schedules import linear_lowering, schedule_class
from ..step import StepResult, StepStats, fault_scale, supervised_tokens
from .base import Engine
from .builtin import sum_clip_update


class _AttachAux(torch.autograd.Function):
    """`hidden` itself (marked as modified in place, so it stays a tensor of its own and not a view, which torch's
    split backward needs to detach), through which backward also gives the balance loss `aux` the gradient
    `scale`, its weight in the step's objective."""

    @staticmethod
    def forward(ctx, hidden: torch.Tensor, aux: torch.Tensor, scale: float) -> torch.Tensor:
        ctx.scale, ctx.aux_meta = scale, (aux.shape, aux.dtype, aux.device)
        ctx.mark_dirty(hidden)
        return hidden

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        shape, dtype, device = ctx.aux_meta
        return grad, torch.full(shape, ctx.scale, dtype=dtype, device=device), None


class VirtualStage(nn.Module):
    """One virtual stage as torch's PipelineStage runs it: token ids (first stage) or hidden states in, the
    CausalLM part's forward, hidden states or logits out, with its balance losses attached to the output."""

    def __init__(self, part: CausalLM, first_moe_layer: int, engine: TorchPipelineEngine):
        super().__init__()
        self.part, self.first_moe_layer = part, first_moe_layer
        self._engine = [engine]  # not a submodule

    def forward(self, x: torch.Tensor, position_ids: torch.Tensor, document_ids: torch.Tensor | None = None,
                exempt: torch.Tensor | None = None) -> torch.Tensor:
        engine = self._engine[0]
        start = {"input_ids": x} if self.part.model.embed_tokens is not None else {"hidden_states": x}
        with engine.autocast():
            out = self.part(**start, position_ids=position_ids, document_ids=document_ids, exempt=exempt)
        result = out.logits if out.logits is not None else out.hidden_states
        if out.aux_loss is not None and torch.is_grad_enabled():
            result = _AttachAux.apply(result, out.aux_loss, engine.aux_scale)
            if engine.stats is not None:
                engine.stats.add_routing(out, self.first_moe_layer)
        return result


class TorchPipelineEngine(Engine):
    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        model, cfg, grid = self.model, self.cfg, self.grid
        self.schedule_name = cfg.parallel.pp_schedule
        zero = cfg.resolved_zero_stage()
        self.name = f"torch.distributed.pipelining {self.schedule_name}, ZeRO-{zero}"
        self.n_stages = cfg.pipeline_stages()
        self.owners = stage_ranks(grid.pp, self.n_stages // grid.pp, self.schedule_name)
        self.n_moe_layers = sum(cfg.model.is_moe_layer(i) for i in range(cfg.model.num_hidden_layers))
        self.micro_batches = cfg.trainer.global_batch_size // (cfg.trainer.micro_batch_size * grid.dp)
        self.stats: StepStats | None = None
        self.aux_scale = 1.0
        self.loss = PipelineLoss(self)
        self.modules: dict[int, VirtualStage] = {}
        for parts, s in virtual_stages(cfg, grid.pp, grid.ep, grid.stage):
            piece = stage_part(cfg.model, parts, s)
            first_moe = sum(cfg.model.is_moe_layer(i) for i in range(piece.layers.start))
            self.modules[s] = VirtualStage(model.share_part(piece.layers, piece.embedding, piece.head), first_moe,
                                           self)
        self._schedule = None
        self._shape: tuple[int, int] | None = None
        broadcast_replicas(model, grid)  # identical replicas, whatever each rank was given
        self.grad_sync = GradReducer(model, grid)
        if zero == 1:
            from ..zero1 import ShardedAdamW
            self.optimizer = ShardedAdamW(model, cfg.optim, grid)
        else:
            self.optimizer = build_optimizer(model, cfg.optim)

    # ---------------------------------------------------------------- the schedule
    def autocast(self) -> ContextManager:
        if self.precision == "bf16":
            return torch.autocast(self.device.type, dtype=torch.bfloat16)
        return contextlib.nullcontext()

    def _build_schedule(self, micro: int, seq: int):
        """torch's stages and schedule for micro-batches of `micro` x `seq` tokens. Shapes are given (static
        metadata): inferring them would run the stages on meta tensors, which the all-to-all dispatch cannot."""
        from torch.distributed.pipelining import PipelineStage
        c = self.cfg.model
        dtype = next(self.model.parameters()).dtype
        logits_dtype = torch.bfloat16 if self.precision == "bf16" else dtype
        meta = torch.device("meta")
        hidden = torch.empty(micro, seq, c.hidden_size, dtype=dtype, device=meta, requires_grad=True)
        stages = []
        for s, module in self.modules.items():
            first, last = s == 0, s == self.n_stages - 1
            inputs = torch.empty(micro, seq, dtype=torch.long, device=meta) if first else hidden
            outputs = (torch.empty(micro, seq, c.vocab_size, dtype=logits_dtype, device=meta, requires_grad=True)
                       if last else hidden)
            stages.append(PipelineStage(module, s, self.n_stages, self.device, input_args=(inputs,),
                                        output_args=(outputs,), group=self.grid.pp_group))
        cls = schedule_class(self.schedule_name)
        single = self.schedule_name == "1f1b"
        start = time.perf_counter()
        with linear_lowering():
            schedule = cls(stages[0] if single else stages, n_microbatches=self.micro_batches, loss_fn=self.loss,
                           scale_grads=False)
        if self.env.is_main:
            print(f"pipeline schedule {self.schedule_name} built for {self.micro_batches} micro-batches of {micro} x "
                  f"{seq} tokens in {time.perf_counter() - start:.2f} s", flush=True)
        return schedule

    def _inputs(self, batches: list[dict], training: bool) -> tuple[torch.Tensor, torch.Tensor, dict]:
        """The step's micro-batches joined along the batch dimension (the schedule splits them back into the same
        micro-batches): token ids, labels, and the keyword inputs every stage takes."""
        def joined(key: str) -> torch.Tensor:
            return torch.cat([b[key] for b in batches]).to(self.device)
        input_ids, labels = joined("input_ids"), joined("labels")
        B, S = input_ids.shape
        kwargs = {"position_ids": joined("position_ids") if "position_ids" in batches[0]
                  else torch.arange(S, device=self.device).expand(B, S).contiguous()}
        if "document_ids" in batches[0]:
            kwargs["document_ids"] = joined("document_ids")
        if training and self.cfg.moe.capacity_factor:  # token dropping: the first stage's choice, for every stage
            kwargs["exempt"] = exempt_sequences(input_ids, self.model.no_drop_fraction)
        return input_ids, labels, kwargs

    def step(self, step: int, batches: list[dict], records: tuple[int, int] = (0, 0)) -> StepResult:
        grid = self.grid
        if len(batches) != self.micro_batches:
            raise ValueError(f"step {step}: {len(batches)} micro-batches, the {self.schedule_name} schedule was "
                             f"built for {self.micro_batches}")
        shape = tuple(batches[0]["input_ids"].shape)
        if self._schedule is None or shape != self._shape:
            self._schedule, self._shape = self._build_schedule(*shape), shape
        supervised = torch.tensor(float(supervised_tokens(batches)), device=self.device)
        if grid.dp > 1:
            dist.all_reduce(supervised, group=grid.dp_group)
        supervised = max(float(supervised), 1.0)
        self.set_lr(step)
        self.stats = StepStats(self.n_moe_layers, self.cfg.model.n_routed_experts or 0, len(batches), grid.dp,
                               self.device)
        if grid.stage == 0:  # every stage reads the data: count it once
            self.stats.add_records(records)
        self.aux_scale = 1.0 / (len(batches) * grid.dp)
        self.loss.supervised, self.loss.fault = supervised, fault_scale(step, self.env.rank)
        input_ids, labels, kwargs = self._inputs(batches, training=True)
        stats = self.stats
        try:
            self._schedule.step(input_ids, target=labels, return_outputs=False, **kwargs)
        finally:
            self.stats = None
        stats.reduce(self.env)
        loss = stats.loss(supervised)
        norm, skipped = sum_clip_update(self, self.grad_sync, loss)
        stop_if_non_finite(skipped, step, loss, norm, self.cfg.trainer.non_finite)
        return stats.result(loss, norm, skipped, batches, grid.dp)

    # ---------------------------------------------------------------- evaluation
    def _train(self, mode: bool) -> None:
        """Training or evaluation mode for the rank's part and its virtual-stage views (which keep a flag of their
        own: the balance losses and the check for dropping's exempt flags read it)."""
        self.model.train(mode)
        for module in self.modules.values():
            module.train(mode)

    @torch.no_grad()
    def eval_stages(self) -> tuple[list[tuple[int, CausalLM]], list[int]]:
        return [(s, self.modules[s].part) for s in sorted(self.modules)], list(self.owners)

    def validate(self, batches: list[dict]) -> float:
        """Forward only, stage after stage: each rank runs its virtual stages in order, receiving a stage's input
        from the rank of the stage before and sending its output to the rank of the next."""
        grid, me = self.grid, self.grid.stage
        total = torch.zeros(2, dtype=torch.float64, device=self.device)
        peer = {q: q * grid.dp + grid.dp_rank for q in range(grid.pp)}  # pipeline rank -> global rank
        self._train(False)
        try:
            for batch in batches:
                input_ids, labels, kwargs = self._inputs([batch], training=False)
                B, S = input_ids.shape
                x = input_ids
                for s in range(self.n_stages):
                    if self.owners[s] != me:
                        continue
                    if s > 0 and self.owners[s - 1] != me:
                        x = torch.empty(B, S, self.cfg.model.hidden_size, device=self.device,
                                        dtype=next(self.model.parameters()).dtype)
                        dist.recv(x, src=peer[self.owners[s - 1]], group=grid.pp_group)
                    x = self.modules[s](x, **kwargs)
                    if s < self.n_stages - 1 and self.owners[s + 1] != me:
                        dist.send(x.contiguous(), dst=peer[self.owners[s + 1]], group=grid.pp_group)
                    elif s == self.n_stages - 1:
                        n = (labels != IGNORE_INDEX).sum()
                        ce = self.model.loss_fn(x.flatten(0, 1).float(), labels.flatten())
                        total += torch.stack([ce.double() * n, n.double()])
        finally:
            self._train(True)
        if self.env.distributed:
            dist.all_reduce(total)  # only the ranks holding the last stage have non-zero sums
        return float(total[0] / total[1].clamp(min=1))


class PipelineLoss:
    """The last stage's loss of one micro-batch: its CE sum over the step's supervised tokens on all data-parallel
    ranks (`supervised`), the built-in engine's per-micro-batch term; the CE sum goes into the step's statistics."""

    def __init__(self, engine: TorchPipelineEngine):
        self.engine, self.supervised, self.fault = engine, 1.0, 1.0

    def __call__(self, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        n = (labels != IGNORE_INDEX).sum()
        ce_sum = self.engine.model.loss_fn(logits.flatten(0, 1), labels.flatten()) * n * self.fault
        if self.engine.stats is not None:
            self.engine.stats.ce_sum += ce_sum.detach().double()
        return ce_sum / self.supervised
