"""ZeRO-1 without DeepSpeed: AdamW whose moments are split over the data-parallel ranks, for the engines that sum
gradients themselves (the torch pipeline engine at `parallel.zero_stage=1`).

As DeepSpeed's ZeRO stage 1 (docs/deepspeed.md; Rajbhandari et al., "ZeRO", section 5.1, P_os): each kind of
parameter is laid out in one flat index space, dense parameters (replicated over `dp`) in one, routed experts
(with ep > 1, replicated over their `edp` replicas) in another; within a kind, the parameters with weight decay come
first, then those without, each in model order (the groups of `optim.build_param_groups`). Rank r of the kind's group
holds the contiguous slice [r c, (r + 1) c) with c = ceil(N / size) of each moment, so a rank keeps at most c
elements of `exp_avg` and of `exp_avg_sq` per kind: 1/dp of the whole model's optimizer state (an expert shard is
already 1/ep of the experts). Gradients arrive whole and already summed (dense over dp, experts over edp, as the
built-in engine's `GradReducer`) and clipped; each rank updates its slice with torch's own AdamW (fused where the
replicated one is: elementwise, so the slice's numbers are the replicated optimizer's bit for bit) and the updated
slices are all-gathered into every replica's weights.

The weights stay whole fp32 parameters of the model (fp32 weights under bf16 autocast, as the built-in engine): a
rank's slice is read from them at each step, so weights written from outside (a checkpoint, a broadcast) need no
refresh, and no fp32 master copy is kept.
"""

from __future__ import annotations

import bisect
import itertools
import math
from dataclasses import dataclass, field

import torch
import torch.distributed as dist
from torch import nn

from .config import OptimConfig
from .engines.base import ParamStates
from .layout import ProcessGrid, is_expert_param
from .optim import build_param_groups

MOMENTS = ("exp_avg", "exp_avg_sq")

GATHER_NUMEL = 2**26
"""Elements all-gathered at a time after a step (256 MiB of fp32; DeepSpeed's `allgather_bucket_size`): the updated
slices reach the weights in rounds, so no whole flat copy of the weights is ever allocated."""

# all_gather_single is torch 2.13's name for all_gather_into_tensor (both gather by concatenation on gloo and NCCL)
_all_gather_flat = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor


@dataclass
class _Kind:
    """One flat index space (dense or expert parameters) and the group that shares its optimizer state."""

    group: object
    size: int
    rank: int
    params: list[nn.Parameter] = field(default_factory=list)
    starts: list[int] = field(default_factory=list)
    numel: int = 0
    weights: torch.Tensor | None = None
    """(chunk,) fp32: this rank's slice of the weights (zero padding after it), what the all-gather sends."""
    grads: torch.Tensor | None = None
    """(chunk,) fp32: this rank's slice of the gradients."""

    @property
    def chunk(self) -> int:
        return math.ceil(self.numel / self.size)

    def bounds(self, rank: int) -> tuple[int, int]:
        """Rank `rank`'s slice [lo, hi) of the flat space (empty for the last ranks of a small kind)."""
        lo = min(rank * self.chunk, self.numel)
        return lo, min(lo + self.chunk, self.numel)

    def segments(self, lo: int, hi: int):
        """(parameter, first, last) element ranges of the parameters covering flat range [lo, hi), in order."""
        i = bisect.bisect_right(self.starts, lo) - 1
        while lo < hi:
            p, start = self.params[i], self.starts[i]
            end = min(hi, start + p.numel())
            if end > lo:
                yield p, lo - start, end - start
            lo, i = max(lo, end), i + 1


@dataclass
class _Piece:
    """A run of this rank's slice whose parameters share one weight-decay group and one AdamW step count: one fp32
    shard parameter of the inner AdamW."""

    kind: _Kind
    lo: int
    hi: int
    group: int
    shard: nn.Parameter


class ShardedAdamW(ParamStates):
    """AdamW with `trainer/optim.py`'s settings and groups, its moments partitioned over the data-parallel group
    (dense parameters) and the expert-data-parallel group (routed experts, ep > 1). Use as an optimizer: the engine
    sets `lr` in `param_groups`, calls `step()` on summed, clipped gradients (every trainable parameter is updated;
    a missing gradient counts as zeros, as `GradReducer.finish` fills them) and `zero_grad()`. As `ParamStates`,
    `get` is collective over the parameter's group; `load` is not.

    The trainable parameters are fixed at construction: an engine that changes which parameters train (ESFT) builds
    a new one."""

    collective = True

    def __init__(self, model: nn.Module, cfg: OptimConfig, grid: ProcessGrid, gather_numel: int = GATHER_NUMEL):
        self.cfg, self.gather_numel = cfg, gather_numel
        self.param_groups = [{"params": g["params"], "lr": cfg.lr, "weight_decay": g["weight_decay"]}
                             for g in build_param_groups(model, cfg)]
        """The replicated AdamW's groups (weight decay, then none): the `lr` set here is used at the next step."""
        experts = {id(p) for n, p in model.named_parameters() if is_expert_param(n)} if grid.ep > 1 else set()
        for name, p in model.named_parameters():
            if p.requires_grad and p.dtype != torch.float32:
                raise ValueError(f"ShardedAdamW keeps no master copies: {name} must be fp32, not {p.dtype}")
        self.kinds = {"dense": _Kind(grid.dp_group, grid.dp, grid.dp_rank),
                      "expert": _Kind(grid.edp_group, grid.edp, grid.edp_rank)}
        self.kind_of: dict[nn.Parameter, _Kind] = {}
        self.start_of: dict[nn.Parameter, int] = {}
        self.group_of: dict[nn.Parameter, int] = {}
        for index, group in enumerate(self.param_groups):
            for p in group["params"]:
                kind = self.kinds["expert" if id(p) in experts else "dense"]
                kind.params.append(p)
                kind.starts.append(kind.numel)
                self.kind_of[p], self.start_of[p], self.group_of[p] = kind, kind.numel, index
                kind.numel += p.numel()
        self.steps = dict.fromkeys(self.kind_of, 0)
        """AdamW's step count of each parameter, the same on every rank (0: no state yet)."""
        self._build()

    # ---------------------------------------------------------------- layout
    def _build(self) -> None:
        """Cut this rank's slice of each kind into pieces of one weight-decay group and one step count (the
        replicated optimizer's step is per parameter, the fused kernel's per tensor), with a fresh inner AdamW."""
        self.pieces: list[_Piece] = []
        for kind in self.kinds.values():
            lo, hi = kind.bounds(kind.rank)
            if kind.numel:
                kind.weights, kind.grads = (kind.params[0].new_zeros(kind.chunk, dtype=torch.float32)
                                            for _ in range(2))
            runs = itertools.groupby(range(len(kind.params)),
                                     key=lambda i: (self.group_of[kind.params[i]], self.steps[kind.params[i]]))
            for (group, _), members in runs:
                members = list(members)
                last = kind.params[members[-1]]
                a, b = max(lo, kind.starts[members[0]]), min(hi, kind.starts[members[-1]] + last.numel())
                if a < b:  # views: the inner AdamW reads and writes the kind's buffers in place
                    shard = nn.Parameter(kind.weights[a - lo:b - lo])
                    shard.grad = kind.grads[a - lo:b - lo]
                    self.pieces.append(_Piece(kind, a, b, group, shard))
        shards = [piece.shard for piece in self.pieces]
        # As optim.build_optimizer: the fused kernel exactly where the replicated optimizer uses it.
        self.fused = bool(shards) and all(s.device.type in ("cpu", "cuda") for s in shards)
        self.inner = torch.optim.AdamW(
            [{"params": [piece.shard], "weight_decay": self.param_groups[piece.group]["weight_decay"]}
             for piece in self.pieces], lr=self.cfg.lr, betas=tuple(self.cfg.betas), eps=self.cfg.eps,
            fused=self.fused) if shards else None

    @staticmethod
    def _flat(kind: _Kind, lo: int, hi: int, tensor_of, out: torch.Tensor | None = None) -> torch.Tensor:
        """Flat range [lo, hi) of `kind` gathered from a per-parameter tensor (`tensor_of(p)`, p's shape or None
        for zeros), into `out` if given."""
        parts = []
        for p, a, b in kind.segments(lo, hi):
            t = tensor_of(p)
            parts.append(p.new_zeros(b - a) if t is None else t.detach().reshape(-1)[a:b].to(p.device, p.dtype))
        return torch.cat(parts, out=out)

    def _piece_at(self, kind: _Kind, position: int) -> _Piece:
        return next(piece for piece in self.pieces if piece.kind is kind and piece.lo <= position < piece.hi)

    # ---------------------------------------------------------------- optimizer
    @torch.no_grad()
    def step(self) -> None:
        """Update this rank's slices from the gradients, then all-gather every kind's slices into the weights
        (collective over the data-parallel and expert-data-parallel groups)."""
        for kind in self.kinds.values():
            lo, hi = kind.bounds(kind.rank)
            if lo < hi:
                self._flat(kind, lo, hi, lambda p: p, out=kind.weights[:hi - lo])
                self._flat(kind, lo, hi, lambda p: p.grad, out=kind.grads[:hi - lo])
        if self.inner is not None:
            for group, piece in zip(self.inner.param_groups, self.pieces):
                group["lr"] = self.param_groups[piece.group]["lr"]
            self.inner.step()
        for kind in self.kinds.values():  # dense, then expert: the same order on every rank
            self._gather_weights(kind)
        for p in self.steps:
            self.steps[p] += 1

    def _gather_weights(self, kind: _Kind) -> None:
        """Every rank's updated slice of `kind` into the weights, `gather_numel` elements per all-gather: round j
        gathers elements [j w, (j + 1) w) of each rank's (padded) slice."""
        most = max(1, self.gather_numel // kind.size)
        for offset in range(0, kind.chunk if kind.numel else 0, most):
            width = min(most, kind.chunk - offset)
            part = kind.weights[offset:offset + width]
            if kind.size > 1:
                flat = part.new_empty(kind.size * width)
                _all_gather_flat(flat, part, group=kind.group)
            else:
                flat = part
            for rank in range(kind.size):
                a = rank * kind.chunk + offset
                b = min(a + width, kind.numel)
                position = rank * width
                for p, x, y in kind.segments(a, b):  # none where the slice is padding
                    p.detach().view(-1)[x:y].copy_(flat[position:position + y - x])
                    position += y - x

    def zero_grad(self, set_to_none: bool = True) -> None:
        for p in self.steps:
            if set_to_none:
                p.grad = None
            elif p.grad is not None:
                p.grad.zero_()

    def state_numel(self) -> int:
        """Elements of optimizer state this rank holds (`exp_avg` and `exp_avg_sq` of its slices)."""
        if self.inner is None:
            return 0
        return sum(state[slot].numel() for state in self.inner.state.values() for slot in MOMENTS if slot in state)

    # ---------------------------------------------------------------- ParamStates: whole per-parameter states
    def get(self, p: nn.Parameter) -> dict[str, torch.Tensor]:
        """`p`'s whole moments, all-gathered from the ranks holding its slices (collective over p's group; {} before
        its first update, with no collective, alike on every rank)."""
        kind = self.kind_of.get(p)
        if kind is None or not self.steps[p] or not p.numel():
            return {}
        start = self.start_of[p]
        end = start + p.numel()
        spans = [(max(start, lo), min(end, hi)) for lo, hi in map(kind.bounds, range(kind.size))]
        width = max(b - a for a, b in spans)
        mine = torch.zeros(2, width, dtype=torch.float32, device=p.device)
        a, b = spans[kind.rank]
        if a < b:
            piece = self._piece_at(kind, a)
            state = self.inner.state[piece.shard]
            for row, slot in enumerate(MOMENTS):
                mine[row, :b - a] = state[slot][a - piece.lo:b - piece.lo]
        if kind.size > 1:  # flat buffers: gloo gathers only by concatenation
            gathered = torch.empty(kind.size * 2 * width, dtype=torch.float32, device=p.device)
            _all_gather_flat(gathered, mine.view(-1), group=kind.group)
            gathered = gathered.view(kind.size, 2, width)
        else:
            gathered = mine[None]
        whole = torch.empty(2, p.numel(), dtype=torch.float32, device=p.device)
        for rank, (a, b) in enumerate(spans):
            if a < b:
                whole[:, a - start:b - start] = gathered[rank, :, :b - a]
        return {"exp_avg": whole[0].view_as(p), "exp_avg_sq": whole[1].view_as(p),
                "step": torch.tensor(float(self.steps[p]), dtype=torch.float32)}

    def load(self, states: dict[nn.Parameter, dict[str, torch.Tensor]],
             masters: dict[nn.Parameter, torch.Tensor]) -> None:
        """This rank's slices of whole per-parameter states (absent parameters start afresh, parameters that do not
        train are ignored). The weights are fp32 and their own masters: `masters` is not needed."""
        if not states:
            return  # a checkpoint without optimizer entries: the state stays as it is
        for p in self.steps:
            state = states.get(p, {})
            self.steps[p] = int(state["step"]) if all(k in state for k in (*MOMENTS, "step")) else 0
        self._build()
        for piece in self.pieces:
            first = next(iter(piece.kind.segments(piece.lo, piece.hi)))[0]
            if not self.steps[first]:
                continue  # the run's parameters start afresh: AdamW creates their state at its first step
            # Torch's layout of the step: on the parameter's device under the fused kernel, else on the CPU.
            step = torch.tensor(float(self.steps[first]), dtype=torch.float32,
                                device=piece.shard.device if self.fused else "cpu")
            self.inner.state[piece.shard] = {
                "step": step, **{slot: self._flat(piece.kind, piece.lo, piece.hi, lambda p, s=slot: states[p][s])
                                 for slot in MOMENTS}}
