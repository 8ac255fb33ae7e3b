"""Pipeline parallelism through DeepSpeed's `PipelineModule` / `PipelineEngine`, combined with expert parallelism.

The model is cut into L + 2 pipeline layers (slots): the token embedding, the L decoder layers, and the final norm
with the output head; `trainer.plan.stage_boundaries` decides which stage holds which (the dry run prints the same
cut). Between stages travel `(hidden, position_ids, exempt[, document_ids])`: only `hidden` is floating point, so
it is the only tensor whose gradient goes back.

Balance losses on every stage: a MoE layer's auxiliary loss never reaches the last stage's loss, so each layer adds
its gradient where it is computed. `inject_aux(hidden, aux, scale)` returns `hidden` unchanged and, on the way back,
gives `aux` the gradient `scale` (its weight in the step's objective), so the router of a first-stage layer is
trained exactly as in the one-process model. The logged balance terms are summed over stages and ranks.

Gradient scale: DeepSpeed divides the last stage's loss by the micro-batches per step and averages gradients over
data-parallel ranks. The loss function therefore returns CE sum x (micro-batches x dp / supervised tokens of the
step), and the injected balance gradient is 1 / micro-batches, which together take the built-in engine's step.

Each stage's part of the model is also seen as a `StageView`: the same modules under their CausalLM names
(`model.layers.7.mlp.experts.gate_up_proj`), so checkpoints and the Hugging Face export are written by stage with
the names and layout of every other engine.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
import torch.utils.checkpoint
from torch import nn

from model import ModelConfig
from model.attention import document_causal_mask, rope_dim
from model.layers import RMSNorm
from model.loss import IGNORE_INDEX, cross_entropy
from model.moe import MoE, exempt_sequences
from model.rope import RotaryEmbedding
from model.transformer import (
    DecoderLayer,
    init_module_weights,
    layer_balance,
    weight_seed,
)

from .config import TrainConfig, stop_if_non_finite
from .distributed import DistEnv
from .expert_parallel import ProcessGrid
from .optim import build_param_groups, lr_at
from .plan import stage_boundaries


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


@dataclass
class StageRecords:
    """What this stage's layers saw during one step (or one validation pass), read and cleared by the step."""

    balance: list[tuple[int, torch.Tensor, dict[str, torch.Tensor], torch.Tensor, torch.Tensor | None]] = field(
        default_factory=list)  # (MoE layer index, aux, terms, tokens per expert, dropped copies) per micro-batch
    ce: list[tuple[torch.Tensor, torch.Tensor]] = field(default_factory=list)  # (CE sum, supervised) per micro-batch

    def clear(self) -> None:
        self.balance.clear()
        self.ce.clear()


class EmbeddingStage(nn.Module):
    def __init__(self, config: ModelConfig, no_drop_fraction: float):
        super().__init__()
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.no_drop_fraction = no_drop_fraction

    def forward(self, inputs: tuple[torch.Tensor, ...]) -> tuple[torch.Tensor, ...]:
        input_ids, position_ids, *documents = inputs
        exempt = exempt_sequences(input_ids, self.no_drop_fraction).long()  # integer: no gradient travels for it
        return (self.embed_tokens(input_ids), position_ids, exempt, *documents)


class DecoderStage(nn.Module):
    def __init__(self, config: ModelConfig, layer_idx: int, expert_shard: tuple[int, int] | None,
                 records: StageRecords):
        super().__init__()
        self.config, self.layer_idx, self.moe_index = config, layer_idx, None
        self.layer = DecoderLayer(config, layer_idx, expert_shard)
        self.rotary_emb = RotaryEmbedding(rope_dim(config), config)
        self.records = records
        self.aux_scale = 1.0  # set by the step: 1 / micro-batches
        self.checkpointing = False  # trainer.activation_checkpointing: recompute the layer in backward

    def forward(self, inputs: tuple[torch.Tensor, ...]) -> tuple[torch.Tensor, ...]:
        hidden, position_ids, exempt, *documents = inputs
        cos, sin = self.rotary_emb(position_ids)
        mask = document_causal_mask(documents[0]) if documents else None
        if self.checkpointing and self.training and torch.is_grad_enabled():
            hidden, stats = torch.utils.checkpoint.checkpoint(self.layer, hidden, cos, sin, mask, exempt.bool(),
                                                              use_reentrant=False)
        else:
            hidden, stats = self.layer(hidden, cos, sin, mask, exempt.bool())
        if stats is not None and self.training:
            aux, terms = layer_balance(stats, self.config)
            hidden = inject_aux(hidden, aux, self.aux_scale)
            self.records.balance.append((self.moe_index, aux.detach(), terms, stats.tokens_per_expert.detach(),
                                         stats.dropped))
        return (hidden, position_ids, exempt, *documents)


class HeadStage(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)

    def forward(self, inputs: tuple[torch.Tensor, ...]) -> torch.Tensor:
        return self.lm_head(self.norm(inputs[0]))  # (B, S, V)


class PipelineLoss:
    """Last stage: CE sum x the step's scale (labels travel as `(labels, scale)`), recorded for the metrics."""

    def __init__(self, records: StageRecords):
        self.records = records
        self.__name__ = "token_weighted_cross_entropy"

    def __call__(self, logits: torch.Tensor, labels: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        targets, scale = labels
        n = (targets != IGNORE_INDEX).sum()
        ce_sum = cross_entropy(logits.flatten(0, 1), targets.flatten()) * n
        self.records.ce.append((ce_sum.detach(), n))
        return ce_sum * scale.reshape(())


class StageView(nn.Module):
    """This stage's modules under their CausalLM names (shared, not copied)."""

    hf_names = True

    def __init__(self, config: ModelConfig, stages: list[nn.Module]):
        super().__init__()
        self.config = config
        self.model = nn.Module()
        self.model.layers = nn.ModuleDict()
        for stage in stages:
            if isinstance(stage, EmbeddingStage):
                self.model.embed_tokens = stage.embed_tokens
            elif isinstance(stage, DecoderStage):
                self.model.layers[str(stage.layer_idx)] = stage.layer
            elif isinstance(stage, HeadStage):
                self.model.norm = stage.norm
                self.lm_head = stage.lm_head

    def moe_layers(self) -> list[MoE]:
        return [layer.mlp for layer in self.model.layers.values() if layer.is_moe]


def _pipeline_module_class():
    from deepspeed.pipe import PipelineModule

    class LatentPipeline(PipelineModule):
        """PipelineModule with our stage cut (trainer.plan.stage_boundaries) instead of DeepSpeed's own."""

        def __init__(self, parts: list[int], **kwargs):
            self._latent_parts = parts
            super().__init__(**kwargs)

        def _partition_layers(self, method: str = "parameters") -> None:
            self.parts = list(self._latent_parts)
            stage = self._topo.get_coord(self.global_rank).pipe
            self._set_bounds(start=self.parts[stage], stop=self.parts[stage + 1])

    return LatentPipeline


@dataclass
class Pipeline:
    engine: object
    view: StageView
    records: StageRecords
    stages: list[nn.Module]  # this rank's pipeline layers
    n_moe_layers: int


def build_pipeline(cfg: TrainConfig, grid: ProcessGrid, accumulation: int, precision: str,
                   device: torch.device, before_engine: Callable[[StageView], None] | None = None) -> Pipeline:
    """This rank's stage of the model, initialised layout-free (then `before_engine(view)`, e.g. released weights
    loaded into it), inside DeepSpeed's pipeline engine."""
    import torch.distributed as dist

    from .deepspeed_engine import (_moe_marker_class, create_expert_groups, deepspeed_config, group_name,
                                   import_deepspeed, mark_expert_params)
    from .expert_parallel import attach_dispatchers
    deepspeed = import_deepspeed()  # before anything of DeepSpeed's initialises on CPU
    from deepspeed.pipe import LayerSpec
    from deepspeed.runtime.pipe.topology import PipeDataParallelTopology
    deepspeed.init_distributed(dist_backend=dist.get_backend())  # wraps our process group for PipelineModule
    config = cfg.model
    seed = weight_seed()  # after torch.manual_seed(trainer.seed): the same base seed as CausalLM's
    shard = grid.expert_shard(config.n_routed_experts) if grid.ep > 1 else None
    records = StageRecords()
    specs = [LayerSpec(EmbeddingStage, config, cfg.moe.no_drop_fraction)]
    specs += [LayerSpec(DecoderStage, config, i, shard, records) for i in range(config.num_hidden_layers)]
    specs.append(LayerSpec(HeadStage, config))
    boundaries = stage_boundaries(config, grid.pp, grid.ep, cfg.parallel.pp_partition)
    module = _pipeline_module_class()(
        boundaries, layers=specs, topology=PipeDataParallelTopology(num_pp=grid.pp, num_dp=grid.dp),
        loss_fn=PipelineLoss(records), partition_method="latentmoe")
    stages = list(module.forward_funcs)
    moe_ids = [i for i in range(config.num_hidden_layers) if config.is_moe_layer(i)]
    for stage in stages:
        if isinstance(stage, DecoderStage):
            init_module_weights(stage.layer, seed, config.initializer_range, prefix=f"model.layers.{stage.layer_idx}.")
            stage.moe_index = moe_ids.index(stage.layer_idx) if stage.layer.is_moe else None
            stage.checkpointing = cfg.trainer.activation_checkpointing
            if stage.layer.is_moe:
                stage.layer.mlp.capacity_factor = cfg.moe.capacity_factor
        elif isinstance(stage, EmbeddingStage):
            init_module_weights(stage, seed, config.initializer_range, prefix="model.")
        else:
            init_module_weights(stage, seed, config.initializer_range, prefix="")  # `lm_head`, and the norm
    view = StageView(config, stages)
    module.to(device)
    if before_engine is not None:
        before_engine(view)
    if grid.ep > 1:
        attach_dispatchers(view, grid)
        mark_expert_params(view, grid)
        create_expert_groups(grid)  # on every stage, with or without MoE layers
        if view.moe_layers():
            module.expert_groups = _moe_marker_class()(config.n_routed_experts, grid.ep, grid.pp)
    o = cfg.optim
    groups = build_param_groups(view, o, expert_group=group_name(grid.ep) if grid.ep > 1 else None)
    optimizer = torch.optim.AdamW(groups, lr=o.lr, betas=tuple(o.betas), eps=o.eps)
    engine, *_ = deepspeed.initialize(model=module, optimizer=optimizer,
                                      config=deepspeed_config(cfg, grid, accumulation, precision))
    return Pipeline(engine, view, records, stages, len(moe_ids))


def _micro_batches(batches: list[dict], scale: float, fault: float, device: torch.device, with_documents: bool):
    for batch in batches:
        inputs = [batch["input_ids"], batch.get("position_ids")]
        if inputs[1] is None:
            B, S = batch["input_ids"].shape
            inputs[1] = torch.arange(S).expand(B, S).contiguous()
        if with_documents:
            inputs.append(batch["document_ids"])
        yield (tuple(t.to(device) for t in inputs),
               (batch["labels"].to(device), torch.tensor([scale * fault], device=device)))


def pipeline_step(step: int, pipe: Pipeline, batches: list[dict], cfg: TrainConfig, env: DistEnv,
                  grid: ProcessGrid, device: torch.device, bad_records: int = 0, fault: float = 1.0):
    """One optimizer step through DeepSpeed's 1F1B schedule; returns the built-in step's StepResult."""
    import torch.distributed as dist

    from .train import step_result

    accumulation = len(batches)
    supervised = torch.tensor(float(sum(int((b["labels"] != IGNORE_INDEX).sum()) for b in batches)), device=device)
    if grid.dp > 1:
        dist.all_reduce(supervised, group=grid.dp_group)
    global_supervised = max(float(supervised), 1.0)
    lr = lr_at(step, cfg.optim, cfg.trainer.max_steps)
    for group in pipe.engine.optimizer.param_groups:
        group["lr"] = lr
    for stage in pipe.stages:
        if isinstance(stage, DecoderStage):
            stage.aux_scale = 1.0 / accumulation
    pipe.records.clear()
    with_documents = "document_ids" in batches[0]
    pipe.engine.train_batch(data_iter=_micro_batches(batches, accumulation * grid.dp / global_supervised, fault,
                                                     device, with_documents))

    n_experts = cfg.model.n_routed_experts or 0
    stats = torch.zeros(7 + pipe.n_moe_layers * n_experts, device=device, dtype=torch.float64)
    for ce, _ in pipe.records.ce:  # device tensors throughout: one host sync, at the reduction
        stats[0] += ce.double()
    stats[5] = bad_records if env.rank < grid.dp else 0  # the first stage's ranks count the data once
    per_term = accumulation * grid.dp
    for index, aux, terms, tokens, dropped in pipe.records.balance:
        stats[1] += aux.double() / per_term
        for i, name in enumerate(("expert", "device", "comm")):
            stats[2 + i] += terms[name].double() / (per_term * pipe.n_moe_layers)
        if dropped is not None:
            stats[6] += dropped.double()
        stats[7 + index * n_experts:7 + (index + 1) * n_experts] += tokens.double()
    pipe.records.clear()
    if env.distributed:
        dist.all_reduce(stats)
    loss_value = float(stats[0]) / global_supervised
    norm = pipe.engine.get_global_grad_norm()
    norm = float(norm) if norm is not None else float("nan")
    skipped = not pipe.engine.was_step_applied() or not math.isfinite(loss_value)
    stop_if_non_finite(skipped, step, loss_value, norm, cfg.trainer.non_finite)
    return step_result(stats, loss_value, norm, skipped, batches, grid, pipe.n_moe_layers, n_experts)


@torch.no_grad()
def pipeline_validate(pipe: Pipeline, batches: list[dict], env: DistEnv, device: torch.device) -> float:
    """Token-weighted held-out CE through the pipeline (collective over every rank)."""
    import torch.distributed as dist

    pipe.records.clear()
    with_documents = "document_ids" in batches[0]
    pipe.engine.eval_batch(data_iter=_micro_batches(batches, 1.0, 1.0, device, with_documents),
                           num_micro_batches=len(batches))
    total = torch.tensor([sum(float(ce) for ce, _ in pipe.records.ce), sum(float(n) for _, n in pipe.records.ce)],
                         device=device, dtype=torch.float64)
    pipe.records.clear()
    pipe.engine.module.train()
    if env.distributed:
        dist.all_reduce(total)
    return float(total[0] / total[1].clamp(min=1))


__all__ = ["Pipeline", "StageView", "build_pipeline", "inject_aux", "pipeline_step", "pipeline_validate"]
