"""The layout and per-rank memory of a run, from the config alone: what `trainer.dry_run=true` prints.

Pure arithmetic (no process group, no tensors), so a 128-rank layout of V2 is checked on a laptop before a job is
queued. Stages are cut by `layout.stage_boundaries`, as the pipeline engine cuts them, so the dry run and the real
run agree.

Bytes per parameter held by a rank (weights / gradients / optimizer states):

    DeepSpeed engine, bf16:      2 / 2 / 12   (bf16 weights and gradients; fp32 master copy + Adam m + v)
    DeepSpeed engine, fp32:      4 / 4 / 8    (Adam m + v)
    built-in engine (any):       4 / 4 / 8    (fp32 weights: bf16 autocast only casts activations)
    torch pipeline engine (any): 4 / 4 / 8    (as the built-in engine; its ZeRO-1 splits Adam's m + v)
    LoRA (built-in engine):      frozen base 2 (bf16) or 4 (fp32) / 0 / 0; adapters 4 / 4 / 8

ZeRO-1 divides the optimizer states over data parallelism (dense parameters over dp, experts over their edp
replicas, each rounded up), ZeRO-2 also the gradients, ZeRO-3 also the weights; ZeRO-0 and the built-in engine
divide nothing. Only trainable parameters get gradients and optimizer states (`plan(..., trainable=...)`).

Activations are a ROUGH estimate, without recomputation: per micro-batch and decoder layer
`seq_len x micro_batch x hidden x 34` bytes (Korthikanti et al. 2022, 16-bit activations, attention scores left out
as a fused kernel keeps them; 68 in fp32), plus `seq_len x micro_batch x vocab x 4` for the fp32 logits of the head.
Under DeepSpeed's 1F1B pipeline stage s keeps min(pp - s, micro-batches per step) micro-batches in flight (stage 0
up to pp); without a pipeline one. Under a torch.distributed.pipelining schedule a rank holds several virtual stages
(`layout.rank_stages`), and what it keeps in flight is counted from the schedule's action list
(`schedules.in_flight`). Buffers, fragmentation, the all-to-all and the CUDA context are not counted.

With a pipeline, the report also compares every schedule at this pp and batch: the bubble fraction from simulating
the schedule's action list (`schedules.analyse`, unit costs F = I = W, B = I + W) and each one's activations.
"""

from __future__ import annotations

import copy
import itertools
import re
import time
from collections.abc import Sequence
from dataclasses import dataclass, field

from .config import ASYNC_SAVE_MIN_BYTES, TrainConfig
from .layout import (
    PP_SCHEDULES,
    SlotParams,
    is_expert_param,
    rank_stages,
    slot_kinds,
    slot_param_counts,
    slot_params,
    stage_boundaries,
    stages_per_rank,
)
from .schedules import ScheduleFigures, analyse, problem, schedule_actions, torch_schedule

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
    """One pipeline stage as one of its ranks sees it (every rank of a stage holds the same amounts); under a
    torch.distributed.pipelining schedule one pipeline rank with all its virtual stages."""

    stage: int
    """The stage, or under a torch schedule the pipeline rank."""
    ranks: list[int]
    slots: Sequence[int]
    kinds: list[str]
    params: SlotParams
    """Parameters held (before any ZeRO-3 partitioning)."""
    weight_bytes: int
    grad_bytes: int
    optimizer_bytes: int
    activation_bytes: int
    in_flight: int
    """Micro-batches whose activations the stage keeps at once; under a torch schedule (micro-batch, virtual stage)
    pairs."""
    virtual_stages: list[int] = field(default_factory=list)
    """Under a torch schedule: the virtual stages the pipeline rank holds."""
    adapter_bytes: int = 0
    """LoRA: the part of `weight_bytes` that is adapters (fp32); the rest is the frozen base."""
    checkpoint_bytes: int = 0
    """What the rank's checkpoint holds: its weights and AdamW's two fp32 moments of the trainable ones (the host
    copy a background save makes, trainer/background.py)."""

    @property
    def total_bytes(self) -> int:
        return self.weight_bytes + self.grad_bytes + self.optimizer_bytes + self.activation_bytes


@dataclass
class ScheduleRow:
    """One pipeline schedule at the plan's pp and batch: its figures, or why it cannot run the layout."""

    name: str
    per_rank: int
    figures: ScheduleFigures | None = None
    activation_bytes: list[int] = field(default_factory=list)
    """Per pipeline rank, as the memory table counts them (in flight + logits + recomputation)."""
    problem: str | None = None


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
    schedule: str = "deepspeed"
    """`parallel.pp_schedule` (pp > 1)."""
    stages_per_rank: int = 1
    schedules: list[ScheduleRow] = field(default_factory=list)
    """Every schedule at this pp and batch (pp > 1)."""
    precision_auto: bool = False
    """trainer.precision=auto: bf16 on GPUs, what the plan is for; fp32 on a CPU."""
    saves: str = ""
    """How checkpoints are saved (`save_mode`)."""
    context: list[str] = field(default_factory=list)
    """Under context parallelism: the dry run's lines on the split and the exchange (`context_lines`)."""
    schedule_build_s: float | None = None
    """Under a torch pipeline schedule: seconds this machine took to build its action lists for the step's
    micro-batches, what an engine start pays."""

    @property
    def torch_pipeline(self) -> bool:
        return self.pp > 1 and self.schedule != "deepspeed"

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


@dataclass(frozen=True)
class _Activations:
    """The activation model of the module docstring for one configuration."""

    per_layer: int
    """Bytes one decoder layer keeps per micro-batch in flight (its input only under recomputation)."""
    working: int
    """Bytes of the one layer recomputed in full at a time (0 without recomputation)."""
    logits: int
    """Bytes of the head's fp32 logits of one micro-batch."""

    def stage_bytes(self, kinds: list[str], slots: Sequence[int]) -> int:
        """One micro-batch's activations of the slots (a stage)."""
        return self.per_layer * sum(kinds[i].endswith("_layer") for i in slots)

    def rank_bytes(self, in_flight_bytes: int, kinds: list[str], slots: Sequence[int]) -> int:
        """What a rank holding `slots` keeps: what is in flight, the working layer, and the logits with the head."""
        return in_flight_bytes + self.working + (self.logits if kinds[slots[-1]] == "head" else 0)


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
    lora = cfg.lora.enabled and trainable is not None
    trainable = list(held if trainable is None else trainable)
    if len(trainable) != len(held):
        raise ValueError(f"trainable: {len(trainable)} slots given, the model has {len(held)}")
    # the built-in and the torch pipeline engine keep fp32 weights under autocast
    fp32 = zero is None or cfg.torch_pipeline or t.precision == "fp32"
    w_bytes, g_bytes, o_bytes = (4, 4, 8) if fp32 else (2, 2, 12)
    # LoRA: the frozen base once in the training dtype, fp32 adapters (`trainable`) with their gradients and states
    base_bytes = 4 if t.precision == "fp32" else 2
    act_scale = 2 if t.precision == "fp32" else 1
    cp = par.cp
    per_step = t.global_batch_size // (t.micro_batch_size * dp // cp)
    tokens = t.micro_batch_size * cfg.data.seq_len // cp  # a rank's share of its micro-batch
    layer = tokens * c.hidden_size * ACTIVATION_BYTES_PER_HIDDEN * act_scale
    exchanged, tile_work = context_bytes(cfg, act_scale) if cp > 1 else (0, 0)
    act = _Activations(per_layer=(tokens * c.hidden_size * 2 * act_scale if t.activation_checkpointing
                                  else layer + exchanged),
                       working=layer + exchanged + tile_work if t.activation_checkpointing else tile_work,
                       logits=tokens * c.vocab_size * 4)

    def sharded(p: SlotParams, divide: bool) -> int:
        return _ceil_div(p.dense, dp) + _ceil_div(p.expert, edp) if divide else p.total

    out = Plan(world=world_size, pp=pp, dp=dp, ep=ep, edp=edp, zero_stage=zero,
               precision="fp32" if t.precision == "fp32" else "bf16", partition=par.pp_partition,
               precision_auto=t.precision == "auto",
               n_experts=c.n_routed_experts or 0, experts_per_rank=(c.n_routed_experts or 0) // ep,
               total_params=sum(slot_param_counts(c, 1)), micro_batch=t.micro_batch_size, seq_len=cfg.data.seq_len,
               micro_batches_per_step=per_step, groups=_groups(world_size, pp, ep),
               recompute=t.activation_checkpointing, schedule=par.pp_schedule if pp > 1 else "deepspeed",
               stages_per_rank=cfg.pipeline_stages() // pp)
    kinds = slot_kinds(c)
    if pp > 1:
        out.schedules = _schedule_table(cfg, pp, ep, per_step, kinds, act)
        if out.torch_pipeline:
            out.schedule_build_s = _build_seconds(out)
    for s, (stages, slots, in_flight, in_flight_bytes) in enumerate(_rank_slots(cfg, out, kinds, act)):
        h = SlotParams(sum(held[i].dense for i in slots), sum(held[i].expert for i in slots))
        tr = SlotParams(sum(trainable[i].dense for i in slots), sum(trainable[i].expert for i in slots))
        z = zero or 0
        weights = base_bytes * h.total + 4 * tr.total if lora else w_bytes * sharded(h, z >= 3)
        out.stages.append(StagePlan(
            stage=s, ranks=list(range(s * dp, (s + 1) * dp)), slots=slots, kinds=[kinds[i] for i in slots],
            params=h, weight_bytes=weights, grad_bytes=g_bytes * sharded(tr, z >= 2), adapter_bytes=4 * tr.total * lora,
            optimizer_bytes=o_bytes * sharded(tr, z >= 1), in_flight=in_flight, virtual_stages=stages,
            activation_bytes=act.rank_bytes(in_flight_bytes, kinds, slots),
            checkpoint_bytes=(base_bytes * h.total + 4 * tr.total if lora else 4 * h.total) + 8 * tr.total))
    out.saves = save_mode(cfg, max(s.checkpoint_bytes for s in out.stages))
    if cp > 1:
        out.context = context_lines(cfg, act_scale)
    return out


def context_bytes(cfg: TrainConfig, act_scale: int) -> tuple[int, int]:
    """Context parallelism's extra activations per MLA layer and rank: the exchanged latent of the whole micro-batch
    (kept for the backward), and the working memory of one attention tile pair (its fp32 scores and weights,
    per head; trainer/context_parallel.py `TILE`)."""
    from .context_parallel import TILE
    c, micro = cfg.model, cfg.trainer.micro_batch_size
    exchanged = micro * cfg.data.seq_len * (c.kv_lora_rank + c.qk_rope_head_dim) * 2 * act_scale
    tile = min(TILE, cfg.data.seq_len // (2 * cfg.parallel.cp))
    return exchanged, 2 * micro * c.num_attention_heads * tile * tile * 4


def context_lines(cfg: TrainConfig, act_scale: int) -> list[str]:
    """What the dry run says about context parallelism: the split, and the exchange per layer against full heads."""
    from .context_parallel import per_token
    c, cp, micro, seq = cfg.model, cfg.parallel.cp, cfg.trainer.micro_batch_size, cfg.data.seq_len
    latent, heads = per_token(c)
    mine = micro * seq // cp
    element = 2 * act_scale
    sent, full = mine * latent * element * (cp - 1), mine * heads * element * (cp - 1)
    mib = 2 ** 20
    return [f"context parallelism: cp {cp}, each sequence of {seq:,} tokens split zigzag into {2 * cp} chunks of "
            f"{seq // (2 * cp):,}, {mine:,} tokens per rank and micro-batch",
            f"  exchange per MLA layer and micro-batch, each way: {sent / mib:,.1f} MiB sent per rank (the latent, "
            f"{latent} numbers a token); a full-heads exchange would send {full / mib:,.1f} MiB ({heads} numbers): "
            f"{heads / latent:.1f}x more"]


def save_mode(cfg: TrainConfig, state_bytes: int) -> str:
    """How checkpoints are saved (`checkpoint.async_save` resolved as trainer/background.py does), in words."""
    if cfg.uses_deepspeed:
        return "saved synchronously (DeepSpeed writes its own checkpoint files)"
    if cfg.checkpoint.async_save is False:
        return "saved synchronously (checkpoint.async_save=false)"
    if cfg.checkpoint.async_save is None and state_bytes < ASYNC_SAVE_MIN_BYTES:
        return (f"saved synchronously (checkpoint.async_save=null saves in the background from "
                f"{ASYNC_SAVE_MIN_BYTES / 2**30:.0f} GiB per rank)")
    return (f"saved in the background (checkpoint.async_save) from a copy in host memory of "
            f"{state_bytes / 2**30:.2f} GiB per rank, pinned on GPUs")


def _build_seconds(p: Plan) -> float | None:
    """Seconds to build the configured schedule's action lists at the step's micro-batches (None: it refuses)."""
    start = time.perf_counter()
    try:
        schedule_actions(p.schedule, p.pp, p.stages_per_rank, p.micro_batches_per_step)
    except (ValueError, AssertionError, RuntimeError):
        return None
    return time.perf_counter() - start


def _rank_slots(cfg: TrainConfig, p: Plan, kinds: list[str], act: _Activations):
    """For each pipeline rank (each stage without a torch schedule): its virtual stages, its slots, what it keeps in
    flight (micro-batches; (micro-batch, stage) pairs under a torch schedule) and the bytes of that. Under a torch
    schedule the figures are the schedule table's row for the configured schedule (`1f1b` shares `deepspeed`'s)."""
    c, n = cfg.model, len(kinds)
    if not p.torch_pipeline:
        parts = stage_boundaries(c, p.pp, p.ep, p.partition) if p.pp > 1 else [0, n]
        for s in range(p.pp):
            slots = range(parts[s], parts[s + 1])
            in_flight = min(p.pp - s, p.micro_batches_per_step) if p.pp > 1 else 1  # DeepSpeed's 1F1B
            yield [], slots, in_flight, in_flight * act.stage_bytes(kinds, slots)
        return
    row = next(r for r in p.schedules if r.name == ("deepspeed" if p.schedule == "1f1b" else p.schedule))
    for r, (stages, slots) in enumerate(_rank_cut(cfg, p.pp, p.ep, p.stages_per_rank, p.schedule)):
        yield stages, slots, row.figures.in_flight[r], row.figures.in_flight_bytes[r]


def _rank_cut(cfg: TrainConfig, pp: int, ep: int, per_rank: int, schedule: str) -> list[tuple[list[int], list[int]]]:
    """Per pipeline rank: the virtual stages `schedule` places on it and the slots they hold (the cut into
    pp x per_rank stages of `layout.stage_boundaries`, as the engine builds it)."""
    parts = stage_boundaries(cfg.model, pp * per_rank, ep, cfg.parallel.pp_partition)
    out = []
    for r in range(pp):
        stages = rank_stages(pp, per_rank, schedule, r)
        out.append((stages, sorted(i for v in stages for i in range(parts[v], parts[v + 1]))))
    return out


def _stage_bytes(cfg: TrainConfig, n_stages: int, ep: int, kinds: list[str], act: _Activations) -> list[int]:
    """One micro-batch's activations of each of the n_stages stages."""
    parts = stage_boundaries(cfg.model, n_stages, ep, cfg.parallel.pp_partition)
    return [act.stage_bytes(kinds, range(parts[v], parts[v + 1])) for v in range(n_stages)]


def _schedule_table(cfg: TrainConfig, pp: int, ep: int, micro_batches: int, kinds: list[str],
                    act: _Activations) -> list[ScheduleRow]:
    """Every schedule at this pp and batch (`deepspeed` and `1f1b` share a row: DeepSpeed's PipelineEngine trains
    with 1F1B, and both cut pp stages): bubble fraction and activations per pipeline rank, or why it cannot run."""
    rows = []
    for name in PP_SCHEDULES:
        if name == "1f1b":
            continue
        per_rank = stages_per_rank(name, cfg.parallel.pp_stages_per_rank)
        row = ScheduleRow(name=name, per_rank=per_rank)
        rows.append(row)
        n_stages = pp * per_rank
        if n_stages > len(kinds):
            row.problem = (f"cannot run: needs {n_stages} stages ({per_rank} per rank), the model has {len(kinds)} "
                           "pipeline slots")
            continue
        why = problem(name, pp, per_rank, micro_batches)
        if why and name == "deepspeed":
            row.problem = (f"not analysed: torch's 1f1b list needs at least {pp} micro-batches per step (DeepSpeed's "
                           "engine runs fewer, with a larger bubble)")
        if why:
            row.problem = row.problem or f"cannot run: {why}"
            continue
        row.figures = analyse(name, pp, per_rank, micro_batches, _stage_bytes(cfg, n_stages, ep, kinds, act))
        for r, (_, slots) in enumerate(_rank_cut(cfg, pp, ep, per_rank, torch_schedule(name))):
            row.activation_bytes.append(act.rank_bytes(row.figures.in_flight_bytes[r], kinds, slots))
    return rows


def trainable_slot_params(cfg: TrainConfig, ep: int) -> list[SlotParams] | None:
    """Per-slot trainable parameters of one rank under `trainer.trainable` and ESFT (None: everything trains).
    The patterns are applied to the model built on the meta device (no memory); ESFT's selection depends on the
    data, so the plan assumes `esft.plan_fraction` of each MoE layer's experts."""
    import torch

    from model import CausalLM
    from model.lora import add_lora

    from .esft import apply_trainable
    c = cfg.model
    if cfg.trainer.trainable is None and not cfg.esft.enabled and not cfg.lora.enabled:
        return None
    selection = None
    if cfg.esft.enabled:
        keep = max(1, round(cfg.esft.plan_fraction * (c.n_routed_experts or 0)))
        selection = {i: list(range(keep)) for i in range(c.num_hidden_layers) if c.is_moe_layer(i)}
    with torch.random.fork_rng(devices=[]), torch.device("meta"):
        model = CausalLM(c)
    if cfg.lora.enabled:
        add_lora(model, cfg.lora.targets, cfg.lora.rank, cfg.lora.alpha, cfg.lora.dropout, seed=0)
    else:
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


def _layers(slots: Sequence[int], kinds: list[str]) -> str:
    """`embed + L0-3 (3 MoE) + head`: decoder layer indices are slot - 1. Slots that are not contiguous (a rank's
    virtual stages) give one span per run: `embed + L0-1 + L57-59 + head`."""
    words, run = [], []
    for slot, kind in zip(slots, kinds, strict=True):
        if run and slot != run[-1][0] + 1:
            words += _run_words(run)
            run = []
        run.append((slot, kind))
    return " + ".join(words + _run_words(run))


def _run_words(run: list[tuple[int, str]]) -> list[str]:
    words = ["embed"] if run[0][1] == "embedding" else []
    layers = [slot - 1 for slot, kind in run if kind.endswith("_layer")]
    if layers:
        n_moe = sum(kind == "moe_layer" for _, kind in run)
        span = f"L{layers[0]}" if len(layers) == 1 else f"L{layers[0]}-{layers[-1]}"
        words.append(span if n_moe == len(layers) else f"{span} ({n_moe} MoE)" if n_moe else f"{span} (dense)")
    return words + (["head"] if run[-1][1] == "head" else [])


def format_plan(p: Plan) -> str:
    """The dry run's report: layout, groups, memory per rank for every stage (GiB), then with a pipeline every
    schedule's bubble and activations."""
    gib = 1024 ** 3
    engine = "built-in engine (nothing partitioned)" if p.zero_stage is None else f"DeepSpeed ZeRO-{p.zero_stage}"
    if p.torch_pipeline:
        engine = (f"torch.distributed.pipelining {p.schedule} ({p.stages_per_rank} stage"
                  f"{'s' if p.stages_per_rank > 1 else ''} per rank), ZeRO-{p.zero_stage or 0}")
    lines = [
        f"dry run: {p.world} process{'es' if p.world > 1 else ''} = pp {p.pp} x dp {p.dp}; dp {p.dp} = ep {p.ep} x "
        f"edp {p.edp}; {engine}, {p.precision}" + (" on GPUs (trainer.precision=auto: a CPU run trains in fp32)"
                                                    if p.precision_auto else "")
        + (f", pp_partition={p.partition}" if p.pp > 1 else ""),
        (f"model: {p.total_params:,} parameters; {p.n_experts} routed experts per MoE layer, {p.experts_per_rank} "
         "per rank" if p.n_experts else f"model: {p.total_params:,} parameters, all layers dense"),
        (f"batch: {p.micro_batch} x {p.seq_len} tokens per micro-batch; micro-batches per step and data-parallel "
         f"rank: {p.micro_batches_per_step}"),
        "process groups (rank = pp_rank*dp + dp_rank, dp_rank = edp_rank*ep + ep_rank):",
    ]
    for g in p.groups:
        shown = "; ".join(f"[{_ranks(r)}]" for r in g.first) + ("; ..." if g.count > len(g.first) else "")
        lines.append(f"  {g.name:<17} {g.count:>5} x {g.size:<5} {shown}")
    width = max(30, *(len(_layers(s.slots, s.kinds)) for s in p.stages))
    recompute = "activation checkpointing" if p.recompute else "no recomputation"
    if p.torch_pipeline:
        lines += [f"memory per pipeline rank, GiB (activations: rough, {recompute}; then the rank's virtual stages "
                  "and, in", f"brackets, the (micro-batch, stage) pairs it keeps in flight under the {p.schedule} "
                  "action list):"]
    else:
        lines.append(f"memory per rank, GiB (activations: rough, {recompute}, micro-batches in flight in brackets):")
    lines.append(f"{'stage' if not p.torch_pipeline else 'pipe':>5}  {'ranks':<9} {'layers':<{width}} "
                 f"{'params/rank':>15}  {'weights':>8} {'grads':>7} {'optim':>7} {'activ':>7} {'total':>7}")
    for s in p.stages:
        stages = f"  stages {','.join(map(str, s.virtual_stages))}" if p.torch_pipeline else ""
        lines.append(f"{s.stage:>5}  {_ranks(s.ranks):<9} {_layers(s.slots, s.kinds):<{width}} {s.params.total:>15,}  "
                     f"{s.weight_bytes / gib:>8.2f} {s.grad_bytes / gib:>7.2f} {s.optimizer_bytes / gib:>7.2f} "
                     f"{s.activation_bytes / gib:>7.2f} {s.total_bytes / gib:>7.2f}{stages}  [{s.in_flight}]")
    peak = p.peak
    lines.append(f"peak: {'stage' if not p.torch_pipeline else 'pipeline rank'} {peak.stage}, "
                 f"{peak.total_bytes / gib:.2f} GiB per rank "
                 f"({(peak.total_bytes - peak.activation_bytes) / gib:.2f} GiB model states + "
                 f"{peak.activation_bytes / gib:.2f} GiB activations)")
    if peak.adapter_bytes:
        lines.append(f"LoRA: weights = frozen base {(peak.weight_bytes - peak.adapter_bytes) / gib:.2f} GiB "
                     f"({p.precision}) + adapters {peak.adapter_bytes / gib:.2f} GiB "
                     f"({peak.adapter_bytes // 4:,} parameters, fp32); only the adapters get gradients and AdamW "
                     "states")
    lines.append(gpu_fit(peak.total_bytes))
    lines.append(f"checkpoint: {max(s.checkpoint_bytes for s in p.stages) / gib:.2f} GiB per rank, {p.saves}")
    lines += p.context
    if p.schedules:
        lines += _format_schedules(p)
    return "\n".join(lines)


GPU_GIB = 79.0
"""What an 80 GB GPU (H100, A100 80GB) gives a process, GiB."""


def gpu_fit(total_bytes: int) -> str:
    """Whether a rank's planned memory fits an 80 GB GPU, said plainly."""
    gib = total_bytes / 1024 ** 3
    if gib <= GPU_GIB:
        return (f"fit: {gib:.2f} GiB per rank fits an 80 GB GPU ({GPU_GIB:.0f} GiB usable), {GPU_GIB - gib:.1f} GiB "
                "left for what the plan does not count (buffers, the CUDA context, fragmentation)")
    return f"fit: {gib:.2f} GiB per rank does NOT fit an 80 GB GPU ({GPU_GIB:.0f} GiB usable)"


def smallest_fit(cfg: TrainConfig, worlds: Sequence[int] = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024)) -> str:
    """The fewest GPUs (powers of two) on which `cfg`, with its batch, model and fine-tuning settings, fits an
    80 GB GPU in this plan, and the engine that does it: the built-in engine or DeepSpeed ZeRO-1/2/3, experts
    spread as far as they go (pipelines are not tried: ZeRO-3 divides everything). One line for the dry run."""
    gib = 1024 ** 3
    trainable: dict[int, list[SlotParams] | None] = {}
    for world in worlds:
        # the same global batch: fewer sequences per micro-batch where it would not split over `world` ranks
        micro = next((m for m in range(cfg.trainer.micro_batch_size, 0, -1)
                      if cfg.trainer.global_batch_size % (m * world) == 0), None)
        if micro is None:
            continue
        fits = []
        for zero in (None, 1, 2, 3):
            trial = copy.deepcopy(cfg)
            trial.parallel.world_size, trial.parallel.zero_stage, trial.parallel.pp, trial.parallel.ep = \
                world, zero, 1, None
            trial.trainer.micro_batch_size = micro
            try:
                trial.validate(world, planning=True)
            except ValueError:
                continue
            ep = trial.expert_parallel_size(world)
            if ep not in trainable:
                trainable[ep] = trainable_slot_params(trial, ep)
            peak = plan(trial, world, trainable[ep]).peak.total_bytes
            if peak <= GPU_GIB * gib:
                settings = [f"parallel.zero_stage={zero}" if zero is not None else "parallel.zero_stage=null"]
                settings += [f"trainer.micro_batch_size={micro}"] if micro != cfg.trainer.micro_batch_size else []
                fits.append((peak, settings, ep))
        if fits:
            peak, settings, ep = min(fits, key=lambda f: f[0])
            return (f"smallest layout that fits: {world} GPU{'s' if world > 1 else ''}, {peak / gib:.1f} GiB per GPU"
                    + (f" (experts over {ep} ranks)" if ep > 1 else "") + f", with {' '.join(settings)} (plan it: "
                    f"trainer.dry_run=true parallel.world_size={world} {' '.join(settings)})")
    return (f"no layout of up to {worlds[-1]} GPUs fits this batch of {cfg.trainer.global_batch_size} sequences "
            "(one per data-parallel rank at least): raise trainer.global_batch_size to spread it over more GPUs, "
            "add pipeline stages (parallel.pp), lower data.seq_len, turn on trainer.activation_checkpointing, or "
            "fine-tune with LoRA (experiment=lora_v2_lite)")


def _format_schedules(p: Plan) -> list[str]:
    """The schedule table: bubble fraction (max and mean over pipeline ranks) and activation GiB per pipeline rank
    (largest, smallest), each schedule with its own cut into pp x stages-per-rank stages."""
    gib = 1024 ** 3
    simulated = {r.figures.simulated for r in p.schedules
                 if r.figures and r.figures.simulated < r.figures.micro_batches}
    lines = [f"pipeline schedules at pp {p.pp}, {p.micro_batches_per_step} micro-batches per step: bubble simulated "
             "from each schedule's torch action list",
             "  (unit costs F = I = W, B = I + W, no communication time); activ: GiB per pipeline rank as in the "
             "memory", "  table; in flight: (micro-batch, stage) pairs"]
    if simulated:
        lines.append(f"  (lists built for {', '.join(map(str, sorted(simulated)))} micro-batches: each rank's idle "
                     f"time is the same with more; the bubble is extended to {p.micro_batches_per_step})")
    lines.append(f"  {'schedule':<17} {'stages/rank':>11} {'bubble max':>10} {'mean':>7}  {'activ max (pipe)':>16} "
                 f"{'min':>6}  {'in flight max':>13}")
    for row in p.schedules:
        label = "deepspeed, 1f1b" if row.name == "deepspeed" else row.name
        mark = "*" if torch_schedule(p.schedule) == torch_schedule(row.name) else " "
        head = f"{mark} {label:<17} {row.per_rank:>11}"
        if row.figures is None:
            lines.append(f"{head}  {row.problem}")
            continue
        f, a = row.figures, row.activation_bytes
        top = max(range(p.pp), key=lambda r: a[r])
        lines.append(f"{head} {f.bubble_max:>10.2%} {f.bubble_mean:>7.2%}  {a[top] / gib:>10.2f} {f'({top})':<5} "
                     f"{min(a) / gib:>6.2f}  {max(f.in_flight):>13}")
    lines.append("  (*: parallel.pp_schedule; deepspeed is DeepSpeed's PipelineEngine, which trains with 1F1B: "
                 "analysed as 1f1b)")
    if p.schedule_build_s is not None:
        lines.append(f"  building the {p.schedule} schedule for {p.micro_batches_per_step} micro-batches took "
                     f"{p.schedule_build_s:.2f} s here: what each rank pays once at engine start (linear in "
                     "micro-batches, trainer/schedules.py)")
    return lines
