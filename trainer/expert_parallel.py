"""Expert parallelism and data-parallel reductions over torch.distributed: the process groups, the all-to-all
token dispatcher plugged into every MoE layer, gradient sums and the global clip norm.

The grid (`layout.ProcessGrid`): world = pp x dp, dp = ep x edp, an EP group is `ep` consecutive data-parallel ranks.
Gradients: dense parameters are summed over the data-parallel group, expert parameters over the
expert-data-parallel group only (their owner already received every token of its EP group), so a run at any `ep`
takes the same optimizer step as one process with the same global batch (docs/parallelism.md).
"""

from __future__ import annotations

import math

import torch
import torch.distributed as dist

from model import CausalLM
from model.moe import RoutedExperts, combine, sort_copies

from .distributed import DistEnv, all_reduce_sum
from .layout import ProcessGrid, is_expert_param


def build_grid(env: DistEnv, pp: int, ep: int) -> ProcessGrid:
    """Create the process groups (collective: every rank creates every group, in the same order)."""
    grid = ProcessGrid(rank=env.rank, world=env.world_size, pp=pp, ep=ep)
    if not env.distributed:
        return grid
    dp, edp = grid.dp, grid.edp
    for stage in range(pp):
        base = stage * dp
        group = dist.new_group(list(range(base, base + dp)))
        if stage == env.rank // dp:
            grid.dp_group = group
        for e in range(edp):
            ranks = list(range(base + e * ep, base + (e + 1) * ep))
            group = dist.new_group(ranks)
            if env.rank in ranks:
                grid.ep_group = group
        for r in range(ep):
            ranks = list(range(base + r, base + dp, ep))
            group = dist.new_group(ranks)
            if env.rank in ranks:
                grid.edp_group = group
    return grid


class _AllToAll(torch.autograd.Function):
    """all_to_all_single with uneven splits; its backward is the reverse exchange."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, out_splits: list[int], in_splits: list[int], group) -> torch.Tensor:
        ctx.splits, ctx.group = (out_splits, in_splits), group
        out = x.new_empty(sum(out_splits), *x.shape[1:])
        dist.all_to_all_single(out, x.contiguous(), out_splits, in_splits, group=group)
        return out

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        out_splits, in_splits = ctx.splits
        back = grad.new_empty(sum(in_splits), *grad.shape[1:])
        dist.all_to_all_single(back, grad.contiguous(), in_splits, out_splits, group=ctx.group)
        return back, None, None, None


def all_to_all(x: torch.Tensor, out_splits: list[int], in_splits: list[int], group) -> torch.Tensor:
    return _AllToAll.apply(x, out_splits, in_splits, group)


class DispatchStats:
    """Counters of one dispatcher since the last reset: tokens dispatched, distinct ranks per token (sum and max,
    kept on the device so reading them is the only sync), and copies sent to other ranks."""

    def __init__(self):
        self.reset()

    def reset(self) -> None:
        self.tokens = 0
        self.ranks_sum: torch.Tensor | int = 0
        self.ranks_max: torch.Tensor | int = 0
        self.rows_sent_remote = 0
        self.row_bytes = 0


class AllToAllDispatcher:
    """Send every kept token copy to the rank holding its expert, run the local experts with one grouped GEMM,
    send the results back and combine them with the gate weights on the token's own rank.

    Every rank takes part in both exchanges even when it sends or receives nothing, so no rank can hang; a rank
    whose experts received no token still gets (zero) gradients for them through the grouped GEMM.
    """

    def __init__(self, grid: ProcessGrid, n_experts: int):
        self.group, self.ep, self.ep_rank = grid.ep_group, grid.ep, grid.ep_rank
        self.n_experts, self.per_rank = n_experts, n_experts // grid.ep
        self.stats = DispatchStats()

    def __call__(self, x: torch.Tensor, expert_ids: torch.Tensor, weights: torch.Tensor,
                 experts: RoutedExperts) -> torch.Tensor:
        T, K = expert_ids.shape
        order, ids, w = sort_copies(expert_ids, weights)  # kept copies, sorted by global expert (so by rank)
        token_of_copy = order // K
        per_expert = torch.bincount(ids, minlength=self.n_experts).view(self.ep, self.per_rank)  # (ep, E_local)
        # Exchange how many copies each rank sends to each of the receiver's experts.
        received = torch.empty_like(per_expert)
        dist.all_to_all_single(received, per_expert.contiguous(), group=self.group)  # (ep sources, E_local)
        in_splits = per_expert.sum(1).tolist()
        out_splits = received.sum(1).tolist()
        send = x.index_select(0, token_of_copy)  # (N, D)
        if torch.is_autocast_enabled(x.device.type):  # the experts compute in the autocast dtype: send that
            send = send.to(torch.get_autocast_dtype(x.device.type))
        if torch.is_grad_enabled() and not send.requires_grad:
            # Every rank must run both exchanges' backward, or a rank whose inputs and experts need no gradient
            # (frozen experts, ESFT) would leave the others waiting in the reverse all-to-all.
            send = send.detach().requires_grad_()
        if torch.is_grad_enabled():
            self._count(expert_ids, in_splits, send)

        rows = all_to_all(send, out_splits, in_splits, self.group)  # (M, D)
        # Received rows come grouped by source rank, then by local expert: regroup by local expert.
        local_expert = torch.repeat_interleave(
            torch.arange(self.per_rank, device=x.device).repeat(self.ep), received.reshape(-1))
        regroup = local_expert.argsort(stable=True)
        y_local = experts(rows.index_select(0, regroup), received.sum(0))  # (M, D)
        y_rows = torch.empty_like(y_local).index_copy(0, regroup, y_local)  # back to arrival order
        y_sorted = all_to_all(y_rows, in_splits, out_splits, self.group)  # (N, D) in `order`
        return combine(y_sorted, w, token_of_copy, T).to(x.dtype)

    @torch.no_grad()
    def _count(self, expert_ids: torch.Tensor, in_splits: list[int], x: torch.Tensor) -> None:
        ranks = torch.where(expert_ids >= 0, expert_ids // self.per_rank, -1)  # (T, K), -1 for dropped copies
        hit = torch.zeros(expert_ids.shape[0], self.ep + 1, dtype=torch.bool, device=x.device)
        hit.scatter_(1, ranks + 1, True)
        per_token = hit[:, 1:].sum(1)
        self.stats.tokens += expert_ids.shape[0]
        self.stats.ranks_sum = self.stats.ranks_sum + per_token.sum()
        self.stats.ranks_max = torch.maximum(torch.as_tensor(self.stats.ranks_max, device=x.device),
                                             per_token.max() if per_token.numel() else per_token.new_zeros(()))
        self.stats.rows_sent_remote += sum(n for r, n in enumerate(in_splits) if r != self.ep_rank)
        self.stats.row_bytes = x.shape[-1] * x.element_size()


def attach_dispatchers(model: CausalLM, grid: ProcessGrid) -> list[AllToAllDispatcher]:
    """Plug an all-to-all dispatcher into every MoE layer of an expert-sharded model (ep > 1)."""
    dispatchers = []
    for moe in model.moe_layers():
        moe.dispatcher = AllToAllDispatcher(grid, moe.n_experts)
        dispatchers.append(moe.dispatcher)
    return dispatchers


def reduce_gradients(model: torch.nn.Module, grid: ProcessGrid, bucket_bytes: int = 32 * 2**20) -> None:
    """Sum dense gradients over the data-parallel group and expert gradients over the expert-data-parallel group,
    in coalesced buckets. A parameter without a gradient on this rank contributes zeros, so every rank's buckets
    have the same layout whatever its routing was."""
    dense, expert = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        if p.grad is None:
            p.grad = torch.zeros_like(p)
        (expert if is_expert_param(name) and grid.ep > 1 else dense).append(p.grad)
    for grads, group, size in ((dense, grid.dp_group, grid.dp), (expert, grid.edp_group, grid.edp)):
        if size > 1:
            _bucketed_all_reduce(grads, group, bucket_bytes)


def _bucketed_all_reduce(grads: list[torch.Tensor], group, bucket_bytes: int) -> None:
    bucket: list[torch.Tensor] = []
    size = 0
    for g in grads + [None]:
        if g is not None:
            bucket.append(g)
            size += g.numel() * g.element_size()
        if bucket and (g is None or size >= bucket_bytes):
            flat = torch.cat([b.reshape(-1) for b in bucket])
            dist.all_reduce(flat, op=dist.ReduceOp.SUM, group=group)
            offset = 0
            for b in bucket:
                b.copy_(flat[offset:offset + b.numel()].view_as(b))
                offset += b.numel()
            bucket, size = [], 0


def clip_grad_norm(model: torch.nn.Module, max_norm: float, grid: ProcessGrid) -> float:
    """Global gradient norm over every parameter, counting each expert once (its squares summed over the EP
    group), then clipping; returns the norm before clipping (the same value on every rank)."""
    dense, expert = [], []
    for name, p in model.named_parameters():
        if p.grad is not None:
            (expert if is_expert_param(name) and grid.ep > 1 else dense).append(p.grad.detach())
    grads = dense + expert
    device = grads[0].device if grads else torch.device("cpu")

    def squares(tensors: list[torch.Tensor]) -> torch.Tensor:  # fused per-tensor norms, no fp64 copies of grads
        if not tensors:
            return torch.zeros((), dtype=torch.float64, device=device)
        return torch.stack(torch._foreach_norm(tensors)).double().pow(2).sum()

    dense_sq, expert_sq = squares(dense), squares(expert)
    if grid.ep > 1:
        dist.all_reduce(expert_sq, op=dist.ReduceOp.SUM, group=grid.ep_group)
    norm = float((dense_sq + expert_sq).sqrt())
    if math.isfinite(norm) and norm > max_norm:
        scale = max_norm / (norm + 1e-6)
        for g in grads:
            g.mul_(scale)
    return norm


def broadcast_replicas(model: torch.nn.Module, grid: ProcessGrid) -> None:
    """Make replicas identical: dense tensors from data-parallel rank 0, expert shards from their edp rank 0."""
    if grid.world == 1:
        return
    dp_src = dist.get_global_rank(grid.dp_group, 0) if grid.dp_group is not None else 0
    edp_src = dist.get_global_rank(grid.edp_group, 0) if grid.edp_group is not None else 0
    for name, t in model.state_dict().items():
        if is_expert_param(name) and grid.ep > 1:
            if grid.edp > 1:
                dist.broadcast(t, src=edp_src, group=grid.edp_group)
        elif grid.dp > 1:
            dist.broadcast(t, src=dp_src, group=grid.dp_group)


def dispatch_metrics(dispatchers: list[AllToAllDispatcher], env: DistEnv, device: torch.device) -> dict:
    """Distinct ranks each token's copies went to (mean and max over ranks and MoE layers) and bytes sent to other
    ranks per token, since the last call; resets the counters. Collective: every rank calls it, also a pipeline
    stage without MoE layers (no dispatchers)."""
    sums = torch.tensor([float(sum(d.stats.tokens for d in dispatchers)),
                         float(sum(torch.as_tensor(d.stats.ranks_sum).item() for d in dispatchers)),
                         float(sum(d.stats.rows_sent_remote * d.stats.row_bytes for d in dispatchers))],
                        device=device, dtype=torch.float64)
    peak = torch.tensor(float(max((torch.as_tensor(d.stats.ranks_max).item() for d in dispatchers), default=0)),
                        device=device)
    all_reduce_sum(sums, env)
    if env.distributed:
        dist.all_reduce(peak, op=dist.ReduceOp.MAX)
    for d in dispatchers:
        d.stats.reset()
    tokens = max(float(sums[0]), 1.0)
    return {"ranks_per_token_mean": float(sums[1]) / tokens, "ranks_per_token_max": int(peak),
            "a2a_bytes_per_token": float(sums[2]) / tokens}
