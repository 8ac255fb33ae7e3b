"""The layout of a run as arithmetic: process-grid sizes, the expert-parallel size, and where pipeline stages cut
the model. No process group, no tensors, no DeepSpeed: config validation, the dry run and every engine import this,
so they agree on the layout and a config can be checked on a laptop.

    world = pp x dp        dp = ep x edp
    rank = pp_rank * dp + dp_rank        dp_rank = edp_rank * ep + ep_rank   (an EP group: `ep` consecutive ranks)

Routed experts are sharded over the `ep` ranks of an EP group (rank r holds experts [r E/ep, (r + 1) E/ep)) and
replicated over `edp`; everything else is replicated over `dp` (docs/parallelism.md).

A pipeline cuts the model into L + 2 *slots*: 0 the token embedding, 1..L the decoder layers, L + 1 the final norm
with the output head. `stage_boundaries` is the one place stages are cut.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass

from model.config import ModelConfig
from model.flops import attention_params


@dataclass
class ProcessGrid:
    """This rank's place in the grid, and (once `expert_parallel.build_grid` created them) its process groups."""

    rank: int = 0
    world: int = 1
    pp: int = 1
    ep: int = 1
    dp_group: object = None
    ep_group: object = None
    edp_group: object = None
    pp_group: object = None
    """The `pp` ranks of this rank's pipeline (same data-parallel rank, every stage); created for pp > 1."""
    cp: int = 1
    """Context parallelism: `cp` consecutive data-parallel ranks share each sequence (trainer/context_parallel.py).
    They count as data-parallel ranks for gradient sums and expert parallelism; the loader sees dp / cp ranks."""
    cp_group: object = None
    """The `cp` ranks sharing this rank's sequences; created for cp > 1."""

    @property
    def cp_rank(self) -> int:
        return self.dp_rank % self.cp

    @property
    def data_rank(self) -> int:
        """This rank's data-parallel rank as the loader sees it (its context-parallel group's)."""
        return self.dp_rank // self.cp

    @property
    def data_size(self) -> int:
        """Data-parallel ranks that read different sequences: dp / cp."""
        return self.dp // self.cp

    @property
    def dp(self) -> int:
        return self.world // self.pp

    @property
    def edp(self) -> int:
        return self.dp // self.ep

    @property
    def stage(self) -> int:
        return self.rank // self.dp

    @property
    def dp_rank(self) -> int:
        return self.rank % self.dp

    @property
    def ep_rank(self) -> int:
        return self.dp_rank % self.ep

    @property
    def edp_rank(self) -> int:
        return self.dp_rank // self.ep

    def expert_shard(self, n_experts: int) -> tuple[int, int]:
        """(first global expert, count) of this rank's routed experts."""
        per_rank = n_experts // self.ep
        return self.ep_rank * per_rank, per_rank


def resolve_ep(requested: int | None, dp: int, n_experts: int | None, n_group: int = 1,
               group_limited: bool = False) -> int:
    """`parallel.ep`; None picks the largest size dividing the data-parallel size and the expert count, and with
    device-limited routing the number of routing groups too, so that groups stay whole on ranks (V2: 8 groups,
    8 ranks, as the paper's devices)."""
    if n_experts is None:
        return 1
    if requested is not None:
        return requested
    return math.gcd(dp, n_group if group_limited and n_group > 1 else n_experts)


def validate_layout(world: int, pp: int, ep: int, n_experts: int | None) -> None:
    """Raises ValueError naming the key: checked before any process group starts."""
    if pp < 1 or world % pp:
        raise ValueError(f"parallel.pp={pp}: must divide the number of processes ({world})")
    dp = world // pp
    if ep < 1 or dp % ep:
        raise ValueError(f"parallel.ep={ep}: must divide the data-parallel size {dp} (= {world} processes / pp {pp})")
    if ep > 1 and (n_experts is None or n_experts % ep):
        raise ValueError(f"parallel.ep={ep}: must divide model.n_routed_experts={n_experts}")


def is_expert_param(name: str) -> bool:
    """A routed expert's tensor (sharded over the EP group, reduced over its replicas only)."""
    return ".mlp.experts." in name


# ------------------------------------------------------------------------------------ pipeline slots and stages
@dataclass(frozen=True)
class SlotParams:
    """Parameters of one pipeline slot held by one rank: replicated over dp (`dense`) or sharded over the EP group
    and replicated over edp (`expert`, the routed experts). ZeRO divides the two over different groups."""

    dense: int
    expert: int = 0

    @property
    def total(self) -> int:
        return self.dense + self.expert


def slot_kinds(c: ModelConfig) -> list[str]:
    """Type names of the slots, matched by `pp_partition=type:<regex>` (like DeepSpeed's layer class names)."""
    layers = ["moe_layer" if c.is_moe_layer(i) else "dense_layer" for i in range(c.num_hidden_layers)]
    return ["embedding", *layers, "head"]


def slot_params(c: ModelConfig, ep: int = 1) -> list[SlotParams]:
    """Per-rank parameters of every slot, with each MoE layer's routed experts split over `ep` ranks."""
    n_experts = c.n_routed_experts or 0
    if ep < 1 or (ep > 1 and n_experts % ep):
        raise ValueError(f"parallel.ep={ep}: must divide model.n_routed_experts={c.n_routed_experts}")
    d = c.hidden_size
    attn, attn_norms = attention_params(c)
    block = attn + attn_norms + 2 * d  # attention with its latent norms, and the two block RMSNorms
    slots = [SlotParams(c.vocab_size * d)]
    for i in range(c.num_hidden_layers):
        if c.is_moe_layer(i):
            router, shared = n_experts * d, 3 * d * c.shared_intermediate_size
            slots.append(SlotParams(block + router + shared, n_experts // ep * 3 * d * c.moe_intermediate_size))
        else:
            slots.append(SlotParams(block + 3 * d * c.intermediate_size))
    slots.append(SlotParams(d + c.vocab_size * d))  # final norm + untied head
    return slots


def slot_param_counts(c: ModelConfig, ep: int = 1) -> list[int]:
    """Parameters held by one rank for each slot (the weights the `parameters` cut balances)."""
    return [s.total for s in slot_params(c, ep)]


def uniform_cut(n: int, parts: int) -> list[int]:
    """`parts + 1` boundaries cutting n items into near-equal runs, the first runs one longer where n does not
    divide (with n <= parts, one item per part and empty parts at the end)."""
    if n <= parts:
        return [min(p, n) for p in range(parts + 1)]
    size, extra = divmod(n, parts)
    return [p * size + min(p, extra) for p in range(parts + 1)]


def balanced_cut(weights: list[int], parts: int) -> list[int]:
    """`parts + 1` boundaries cutting `weights` into contiguous non-empty runs whose sums are close: dynamic
    programming over prefixes, where each (prefix, runs) state keeps the predecessor cut that gives the smallest
    spread (largest minus smallest run sum), later cuts winning ties. The same cut as DeepSpeed's `parameters`
    partitioning, so stages stay where earlier runs and their checkpoints put them."""
    n = len(weights)
    if n <= parts:
        return uniform_cut(n, parts)
    prefix = [0]
    for w in weights:
        prefix.append(prefix[-1] + w)
    # best[j][i] = (spread, largest, smallest, previous cut) for the first i items in j runs; None: unreachable
    best: list[list[tuple | None]] = [[None] * (n + 1) for _ in range(parts + 1)]
    best[0][0] = (0, 0, math.inf, 0)
    for i in range(1, n + 1):
        for j in range(1, min(i, parts) + 1):
            for k in range(j - 1, i):
                if best[j - 1][k] is None:
                    continue
                run = prefix[i] - prefix[k]
                largest, smallest = max(best[j - 1][k][1], run), min(best[j - 1][k][2], run)
                if best[j][i] is None or largest - smallest <= best[j][i][0]:
                    best[j][i] = (largest - smallest, largest, smallest, k)
    cuts = [n]
    for j in range(parts, 0, -1):
        cuts.append(best[j][cuts[-1]][3])
    return cuts[::-1]


def stage_boundaries(c: ModelConfig, pp: int, ep: int = 1, method: str = "parameters") -> list[int]:
    """pp + 1 slot indices: stage s holds slots [parts[s], parts[s + 1]).

    `parameters` balances the per-rank parameter counts (experts per EP shard, as each rank holds them), `uniform`
    the slot counts, `type:<regex>` the slots whose type name (`slot_kinds`) matches.
    """
    n = c.num_hidden_layers + 2
    if not 1 <= pp <= n:
        raise ValueError(f"parallel.pp={pp}: each stage needs at least one of the {n} pipeline slots (embedding, "
                         f"{c.num_hidden_layers} layers, head); use parallel.pp <= {n}")
    kind = method.lower()
    if kind == "uniform":
        parts = uniform_cut(n, pp)
    elif kind == "parameters":
        parts = balanced_cut(slot_param_counts(c, ep), pp)
    elif kind.startswith("type:"):
        try:
            pattern = re.compile(method.split(":", 1)[1], re.IGNORECASE)
        except re.error as e:
            raise ValueError(f"parallel.pp_partition={method!r}: bad regular expression ({e})") from None
        weights = [1 if pattern.search(name) else 0 for name in slot_kinds(c)]
        if not any(weights):
            raise ValueError(f"parallel.pp_partition={method!r}: matches no slot type (embedding, dense_layer, "
                             "moe_layer, head)")
        parts = balanced_cut(weights, pp)
    else:
        raise ValueError(f"parallel.pp_partition={method!r}: allowed: parameters, uniform, type:moe, type:<regex>")
    empty = [s for s in range(pp) if parts[s + 1] <= parts[s]]
    if empty or parts[0] != 0 or parts[-1] != n:
        raise ValueError(f"parallel.pp={pp} with parallel.pp_partition={method!r}: stage(s) {empty} get no slot "
                         f"(boundaries {parts}); use fewer stages or another partition method")
    return parts


@dataclass(frozen=True)
class StagePart:
    """What one pipeline stage holds of the model: `CausalLM(config, layers=..., embedding=..., head=...)`."""

    layers: range
    embedding: bool
    head: bool


def stage_part(c: ModelConfig, parts: list[int], stage: int) -> StagePart:
    """The part of the model between slot boundaries parts[stage] and parts[stage + 1]."""
    first, stop = parts[stage], parts[stage + 1]
    return StagePart(range(max(first, 1) - 1, min(stop, c.num_hidden_layers + 1) - 1), embedding=first == 0,
                     head=stop == c.num_hidden_layers + 2)


# ------------------------------------------------------------------------------------ pipeline schedules
PP_SCHEDULES = {"deepspeed": 1, "1f1b": 1, "interleaved_1f1b": 2, "zbv": 2, "interleaved_zb": 2, "dualpipev": 2}
"""`parallel.pp_schedule` -> default stages per pipeline rank. `deepspeed` is DeepSpeed's PipelineEngine (1F1B);
the others run on torch.distributed.pipelining (docs/parallelism.md, "Pipeline schedules")."""
V_SCHEDULES = ("zbv", "dualpipev")
"""Schedules placing a rank's two stages in a V (rank r holds stages r and 2 pp - 1 - r); the others loop (rank r
holds stages r, r + pp, r + 2 pp, ...)."""
SPLIT_BACKWARD = ("zbv", "interleaved_zb", "dualpipev")
"""Schedules that split each backward into input gradients and weight gradients (zero-bubble)."""


def stages_per_rank(schedule: str, requested: int | None = None) -> int:
    """Virtual stages each pipeline rank holds under `schedule` (`parallel.pp_stages_per_rank`, where the schedule
    lets it vary: the interleaved ones)."""
    if schedule not in PP_SCHEDULES:
        raise ValueError(f"parallel.pp_schedule={schedule!r}: allowed: {', '.join(PP_SCHEDULES)}")
    if requested is None or schedule not in ("interleaved_1f1b", "interleaved_zb"):
        return PP_SCHEDULES[schedule]
    return requested


def stage_ranks(pp: int, per_rank: int, schedule: str) -> list[int]:
    """The pipeline rank of every virtual stage, as torch.distributed.pipelining places them: a V for zbv and
    dualpipev, a loop otherwise."""
    n = pp * per_rank
    if schedule not in V_SCHEDULES:
        return [s % pp for s in range(n)]
    return [s % pp if (s // pp) % 2 == 0 else pp - 1 - s % pp for s in range(n)]


def rank_stages(pp: int, per_rank: int, schedule: str, pipe_rank: int) -> list[int]:
    """The virtual stages pipeline rank `pipe_rank` holds, in increasing order."""
    return [s for s, r in enumerate(stage_ranks(pp, per_rank, schedule)) if r == pipe_rank]


def virtual_stages(cfg, pp: int, ep: int, pipe_rank: int) -> list[tuple[list[int], int]]:
    """(slot boundaries, stage index) of each pipeline stage pipeline rank `pipe_rank` holds for `cfg` (a
    TrainConfig): its one stage under DeepSpeed's pipeline; under a torch.distributed.pipelining schedule its virtual
    stages in increasing order, the model cut into pp x stages-per-rank pieces by the same planner."""
    n_stages = cfg.pipeline_stages() if cfg.torch_pipeline else pp
    parts = stage_boundaries(cfg.model, n_stages, ep, cfg.parallel.pp_partition)
    if not cfg.torch_pipeline:
        return [(parts, pipe_rank)]
    return [(parts, s) for s in rank_stages(pp, n_stages // pp, cfg.parallel.pp_schedule, pipe_rank)]
