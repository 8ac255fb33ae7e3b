"""The layout and per-rank memory of a run, from the config alone: what `trainer.dry_run=true` prints.

Pure arithmetic (no process group, no tensors), so a 128-rank layout of V2 is checked on a laptop before a job is
queued. Stages are cut by `layout.stage_boundaries`, as the pipeline engine cuts them, so the dry run and the real
run agree.

Bytes per parameter held by a rank (weights / gradients / optimizer states):

    DeepSpeed engine, bf16:      2 / 2 / 12   (bf16 weights and gradients; fp32 master copy + Adam m + v)
    DeepSpeed engine, fp32:      4 / 4 / 8    (Adam m + v)
    built-in engine (any):       4 / 4 / 8    (fp32 weights: bf16 autocast only casts activations)

ZeRO-1 divides the optimizer states over data parallelism (dense parameters over dp, experts over their edp
replicas, each rounded up), ZeRO-2 also the gradients, ZeRO-3 also the weights; ZeRO-0 and the built-in engine
divide nothing. Only trainable parameters get gradients and optimizer states (`plan(..., trainable=...)`).

Activations are a ROUGH estimate, without recomputation: per micro-batch and decoder layer
`seq_len x micro_batch x hidden x 34` bytes (Korthikanti et al. 2022, 16-bit activations, attention scores left out
as a fused kernel keeps them; 68 in fp32), plus `seq_len x micro_batch x vocab x 4` for the fp32 logits of the head.
Under 1F1B pipeline stage s keeps min(pp - s, micro-batches per step) micro-batches in flight (stage 0 up to pp);
without a pipeline one. Buffers, fragmentation, the all-to-all and the CUDA context are not counted.
"""

from __future__ import annotations

import itertools
import re
from collections.abc import Sequence
from dataclasses import dataclass, field

from .config import TrainConfig
from .layout import SlotParams, is_expert_param, slot_kinds, slot_param_counts, slot_params, stage_boundaries

ACTIVATION_BYTES_PER_HIDDEN = 34
"""Bytes of saved 16-bit activations per token, hidden unit and decoder layer (no recomputation)."""
GROUPS_SHOWN = 2
"""Groups listed per kind; the rest are counted."""


@dataclass
class GroupKind:
    """One kind of process group: how many, how many ranks each, and the first few."""

    name: str
    count: int
    size: int
    first: list[list[int]]


@dataclass
class StagePlan:
    """One pipeline stage as one of its ranks sees it (every rank of a stage holds the same amounts)."""

    stage: int
    ranks: list[int]
    slots: range
    kinds: list[str]
    params: SlotParams
    """Parameters held (before any ZeRO-3 partitioning)."""
    weight_bytes: int
    grad_bytes: int
    optimizer_bytes: int
    activation_bytes: int
    in_flight: int
    """Micro-batches whose activations the stage keeps at once."""

    @property
    def total_bytes(self) -> int:
        return self.weight_bytes + self.grad_bytes + self.optimizer_bytes + self.activation_bytes


@dataclass
class Plan:
    world: int
    pp: int
    dp: int
    ep: int
    edp: int
    zero_stage: int | None
    """None: the built-in engine (nothing partitioned)."""
    precision: str
    partition: str
    n_experts: int
    experts_per_rank: int
    total_params: int
    micro_batch: int
    seq_len: int
    micro_batches_per_step: int
    groups: list[GroupKind]
    stages: list[StagePlan] = field(default_factory=list)
    recompute: bool = False
    """Activation checkpointing: layers keep only their inputs."""

    @property
    def peak(self) -> StagePlan:
        return max(self.stages, key=lambda s: s.total_bytes)


def _ceil_div(a: int, b: int) -> int:
    return -(-a // b)


def _groups(world: int, pp: int, ep: int) -> list[GroupKind]:
    """The groups `expert_parallel.build_grid` and DeepSpeed's pipe x data topology create (the first few)."""
    dp = world // pp
    edp = dp // ep
    take = range(min(GROUPS_SHOWN, pp))
    return [
        GroupKind("pipeline stage", pp, dp, [list(range(s * dp, (s + 1) * dp)) for s in take]),
        GroupKind("pipe (p2p)", dp, pp, [list(range(r, world, dp)) for r in range(min(GROUPS_SHOWN, dp))]),
        GroupKind("data-parallel", pp, dp, [list(range(s * dp, (s + 1) * dp)) for s in take]),
        GroupKind("expert-parallel", pp * edp, ep, [list(range(e * ep, (e + 1) * ep))
                                                    for e in range(min(GROUPS_SHOWN, pp * edp))]),
        GroupKind("expert-data-par.", pp * ep, edp, [list(range((g // ep) * dp + g % ep, (g // ep + 1) * dp, ep))
                                                     for g in range(min(GROUPS_SHOWN, pp * ep))]),
    ]


def plan(cfg: TrainConfig, world_size: int, trainable: Sequence[SlotParams] | None = None) -> Plan:
    """The layout and per-rank memory of `cfg` on `world_size` processes (validate the config first).

    `trainable`: per-slot trainable parameters held by one rank (default: all of `slot_params`); frozen parameters
    keep their weights but get no gradients or optimizer states (e.g. expert-specialised fine-tuning).
    """
    c, t, par = cfg.model, cfg.trainer, cfg.parallel
    pp = max(1, par.pp)
    dp, ep, zero = world_size // pp, cfg.expert_parallel_size(world_size), cfg.resolved_zero_stage()
    edp = dp // ep
    held = slot_params(c, ep)
    trainable = list(held if trainable is None else trainable)
    if len(trainable) != len(held):
        raise ValueError(f"trainable: {len(trainable)} slots given, the model has {len(held)}")
    fp32 = zero is None or t.precision == "fp32"  # the built-in engine keeps fp32 weights under autocast
    w_bytes, g_bytes, o_bytes = (4, 4, 8) if fp32 else (2, 2, 12)
    act_scale = 2 if t.precision == "fp32" else 1
    parts = stage_boundaries(c, pp, ep, par.pp_partition) if pp > 1 else [0, len(held)]
    per_step = t.global_batch_size // (t.micro_batch_size * dp)
    tokens = t.micro_batch_size * cfg.data.seq_len

    def sharded(p: SlotParams, divide: bool) -> int:
        return _ceil_div(p.dense, dp) + _ceil_div(p.expert, edp) if divide else p.total

    out = Plan(world=world_size, pp=pp, dp=dp, ep=ep, edp=edp, zero_stage=zero,
               precision="fp32" if t.precision == "fp32" else "bf16", partition=par.pp_partition,
               n_experts=c.n_routed_experts or 0, experts_per_rank=(c.n_routed_experts or 0) // ep,
               total_params=sum(slot_param_counts(c, 1)), micro_batch=t.micro_batch_size, seq_len=cfg.data.seq_len,
               micro_batches_per_step=per_step, groups=_groups(world_size, pp, ep),
               recompute=t.activation_checkpointing)
    kinds = slot_kinds(c)
    for s in range(pp):
        slots = range(parts[s], parts[s + 1])
        h = SlotParams(sum(held[i].dense for i in slots), sum(held[i].expert for i in slots))
        tr = SlotParams(sum(trainable[i].dense for i in slots), sum(trainable[i].expert for i in slots))
        in_flight = min(pp - s, per_step) if pp > 1 else 1
        n_layers = sum(k.endswith("_layer") for k in (kinds[i] for i in slots))
        if t.activation_checkpointing:  # each layer keeps its input; one layer at a time is recomputed in full
            activations = (in_flight * n_layers * tokens * c.hidden_size * 2
                           + tokens * c.hidden_size * ACTIVATION_BYTES_PER_HIDDEN) * act_scale
        else:
            activations = in_flight * n_layers * tokens * c.hidden_size * ACTIVATION_BYTES_PER_HIDDEN * act_scale
        if kinds[slots[-1]] == "head":
            activations += tokens * c.vocab_size * 4
        z = zero or 0
        out.stages.append(StagePlan(
            stage=s, ranks=list(range(s * dp, (s + 1) * dp)), slots=slots, kinds=[kinds[i] for i in slots],
            params=h, weight_bytes=w_bytes * sharded(h, z >= 3), grad_bytes=g_bytes * sharded(tr, z >= 2),
            optimizer_bytes=o_bytes * sharded(tr, z >= 1), activation_bytes=activations, in_flight=in_flight))
    return out


def trainable_slot_params(cfg: TrainConfig, ep: int) -> list[SlotParams] | None:
    """Per-slot trainable parameters of one rank under `trainer.trainable` and ESFT (None: everything trains).
    The patterns are applied to the model built on the meta device (no memory); ESFT's selection depends on the
    data, so the plan assumes `esft.plan_fraction` of each MoE layer's experts."""
    import torch

    from model import CausalLM

    from .esft import apply_trainable
    c = cfg.model
    if cfg.trainer.trainable is None and not cfg.esft.enabled:
        return None
    selection = None
    if cfg.esft.enabled:
        keep = max(1, round(cfg.esft.plan_fraction * (c.n_routed_experts or 0)))
        selection = {i: list(range(keep)) for i in range(c.num_hidden_layers) if c.is_moe_layer(i)}
    with torch.random.fork_rng(devices=[]), torch.device("meta"):
        model = CausalLM(c)
    apply_trainable(model, cfg.trainer.trainable, selection)
    dense = [0] * (c.num_hidden_layers + 2)
    expert = [0] * (c.num_hidden_layers + 2)
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        layer = re.match(r"model\.layers\.(\d+)\.", name)
        slot = int(layer.group(1)) + 1 if layer else (0 if name.startswith("model.embed_tokens") else len(dense) - 1)
        if is_expert_param(name):
            expert[slot] += p.numel() // ep
        else:
            dense[slot] += p.numel()
    return [SlotParams(d, e) for d, e in zip(dense, expert, strict=True)]


def _ranks(ranks: list[int]) -> str:
    """0-7, or 0,8,..,120 for a stride, or the list when short."""
    if len(ranks) <= 3:
        return ",".join(map(str, ranks))
    step = ranks[1] - ranks[0]
    if all(b - a == step for a, b in itertools.pairwise(ranks)):
        return f"{ranks[0]}-{ranks[-1]}" if step == 1 else f"{ranks[0]},{ranks[1]},..,{ranks[-1]}"
    return ",".join(map(str, ranks))


def _layers(slots: range, kinds: list[str]) -> str:
    """`embed + L0-3 (3 MoE) + head`: decoder layer indices are slot - 1."""
    words = []
    if kinds[0] == "embedding":
        words.append("embed")
    layers = [i - 1 for i, k in zip(slots, kinds) if k.endswith("_layer")]
    if layers:
        n_moe = sum(k == "moe_layer" for k in kinds)
        span = f"L{layers[0]}" if len(layers) == 1 else f"L{layers[0]}-{layers[-1]}"
        words.append(f"{span} ({n_moe} MoE)" if n_moe < len(layers) else span)
    if kinds[-1] == "head":
        words.append("head")
    return " + ".join(words)


def format_plan(p: Plan) -> str:
    """The dry run's report: layout, groups, then memory per rank for every stage (GiB)."""
    gib = 1024 ** 3
    engine = "built-in engine (nothing partitioned)" if p.zero_stage is None else f"DeepSpeed ZeRO-{p.zero_stage}"
    lines = [
        f"dry run: {p.world} process{'es' if p.world > 1 else ''} = pp {p.pp} x dp {p.dp}; dp {p.dp} = ep {p.ep} x "
        f"edp {p.edp}; {engine}, {p.precision}" + (f", pp_partition={p.partition}" if p.pp > 1 else ""),
        (f"model: {p.total_params:,} parameters; {p.n_experts} routed experts per MoE layer, {p.experts_per_rank} "
         "per rank" if p.n_experts else f"model: {p.total_params:,} parameters, all layers dense"),
        (f"batch: {p.micro_batch} x {p.seq_len} tokens per micro-batch; micro-batches per step and data-parallel "
         f"rank: {p.micro_batches_per_step}"),
        "process groups (rank = pp_rank*dp + dp_rank, dp_rank = edp_rank*ep + ep_rank):",
    ]
    for g in p.groups:
        shown = "; ".join(f"[{_ranks(r)}]" for r in g.first) + ("; ..." if g.count > len(g.first) else "")
        lines.append(f"  {g.name:<17} {g.count:>5} x {g.size:<5} {shown}")
    header = (f"{'stage':>5}  {'ranks':<9} {'layers':<30} {'params/rank':>15}  {'weights':>8} {'grads':>7} "
              f"{'optim':>7} {'activ':>7} {'total':>7}")
    recompute = "activation checkpointing" if p.recompute else "no recomputation"
    lines += [f"memory per rank, GiB (activations: rough, {recompute}, micro-batches in flight in brackets):",
              header]
    for s in p.stages:
        lines.append(f"{s.stage:>5}  {_ranks(s.ranks):<9} {_layers(s.slots, s.kinds):<30} {s.params.total:>15,}  "
                     f"{s.weight_bytes / gib:>8.2f} {s.grad_bytes / gib:>7.2f} {s.optimizer_bytes / gib:>7.2f} "
                     f"{s.activation_bytes / gib:>7.2f} {s.total_bytes / gib:>7.2f}  [{s.in_flight}]")
    peak = p.peak
    lines.append(f"peak: stage {peak.stage}, {peak.total_bytes / gib:.2f} GiB per rank "
                 f"({(peak.total_bytes - peak.activation_bytes) / gib:.2f} GiB model states + "
                 f"{peak.activation_bytes / gib:.2f} GiB activations)")
    return "\n".join(lines)
