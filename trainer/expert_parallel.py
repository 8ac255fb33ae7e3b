"""Expert parallelism and data-parallel reductions over torch.distributed: the process groups, the all-to-all
token dispatcher plugged into every MoE layer, gradient sums and the global clip norm.

The grid (`layout.ProcessGrid`): world = pp x dp, dp = ep x edp, an EP group is `ep` consecutive data-parallel ranks.
Gradients: dense parameters are summed over the data-parallel group, expert parameters over the
expert-data-parallel group only (their owner already received every token of its EP group), so a run at any `ep`
takes the same optimizer step as one process with the same global batch (docs/parallelism.md).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.distributed._functional_collectives as funcol

from model import CausalLM
from model.moe import RoutedExperts, combine, expert_histogram

from . import faults
from .distributed import DistEnv, all_reduce_sum
from .layout import ProcessGrid, is_expert_param


def build_grid(env: DistEnv, pp: int, ep: int, cp: int = 1) -> ProcessGrid:
    """Create the process groups (collective: every rank creates every group, in the same order)."""
    grid = ProcessGrid(rank=env.rank, world=env.world_size, pp=pp, ep=ep, cp=cp)
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
    if pp > 1:
        for r in range(dp):
            ranks = list(range(r, env.world_size, dp))
            group = dist.new_group(ranks)
            if env.rank in ranks:
                grid.pp_group = group
    if cp > 1:
        for first in range(0, env.world_size, cp):
            ranks = list(range(first, first + cp))
            group = dist.new_group(ranks)
            if env.rank in ranks:
                grid.cp_group = group
    return grid


DISPATCH_FIELDS = ("tokens", "ranks_sum", "ranks_max", "bytes_remote")
"""What `AllToAllDispatcher.combine` reports per call, as one float tensor: tokens routed, distinct ranks their kept
copies went to (sum and max over tokens), and bytes its forward exchanges sent to other ranks (rows, routing lists
and split sizes, both ways)."""


@dataclass
class _Pending:
    """A dispatch in flight: what `combine` needs of it."""

    received: torch.Tensor  # (M, D) rows that arrived, grouped by source rank (may still be in flight)
    routes: torch.Tensor  # (M, 2 Kr) fp32: the gate weights and local expert ids (-1: none) of each arrived row
    per_expert: torch.Tensor  # (E_local,) int64 copies that arrived for each local expert
    copies: int  # sum of per_expert
    experts: RoutedExperts
    token_of_pair: torch.Tensor  # (R,) the token each sent row came from, in send order
    send_splits: list[int]
    recv_splits: list[int]
    send_dtype: torch.dtype
    dtype: torch.dtype
    n_tokens: int
    stats: torch.Tensor


class AllToAllDispatcher:
    """Expert parallelism, deduplicated (docs/parallelism.md): a token goes to each rank holding some of its
    experts ONCE, with the list of that rank's experts it selected and their gate weights. The receiving rank
    expands each row to its experts (one grouped GEMM over all its local experts) and sums their weighted outputs,
    so one row per token and rank travels back, where the token's rank adds up its ranks' partial sums.

    Host syncs: exactly one per call, reading the split sizes after the (device-side) count exchange. Every rank
    takes part in every exchange, forward and backward, even when it sends or receives nothing, so no rank can
    hang; a rank whose experts received no token still gets (zero) gradients for them through the grouped GEMM.
    """

    def __init__(self, grid: ProcessGrid, n_experts: int, top_k: int):
        self.group, self.ep, self.ep_rank = grid.ep_group, grid.ep, grid.ep_rank
        self.n_experts, self.per_rank = n_experts, n_experts // grid.ep
        self.slots = min(top_k, self.per_rank)  # Kr: the most experts one token selects on one rank

    def dispatch(self, x: torch.Tensor, expert_ids: torch.Tensor, weights: torch.Tensor, experts: RoutedExperts,
                 dropping: bool = False) -> _Pending:
        T, K = expert_ids.shape
        ep, L, Kr = self.ep, self.per_rank, self.slots
        rank = torch.where(expert_ids >= 0, expert_ids // L, ep)  # (T, K), ep for dropped copies
        hit = torch.zeros(T, ep + 1, dtype=torch.bool, device=x.device).scatter_(1, rank, True)[:, :ep]  # (T, ep)
        rows = hit.sum(0)  # (ep,) rows this rank sends to each rank
        counts = torch.cat((rows[:, None], expert_histogram(expert_ids, ep * L).view(ep, L)), 1)  # (ep, 1 + L)
        if faults.armed("a2a"):  # test-only (trainer/faults.py); a constant False otherwise, also when compiled
            faults.fault("a2a")
        arrived = funcol.all_to_all_single(counts, None, None, self.group)  # (ep sources, 1 + L)
        sizes = torch.cat((rows, arrived.reshape(-1))).tolist()  # the one host sync of the layer
        send_splits, recv_splits = sizes[:ep], sizes[ep::1 + L]
        copies = sum(sizes[ep:]) - sum(recv_splits)  # copies that arrive for this rank's experts
        R = sum(send_splits)

        # Rows in rank-major order: pair (r, t) gets index pair[r, t]; unhit pairs scatter to a spare slot R.
        hit_rm = hit.T.reshape(-1)  # (ep * T,)
        pair = torch.where(hit_rm, hit_rm.cumsum(0) - 1, R)
        tokens = torch.arange(T, device=x.device).repeat(ep)
        token_of_pair = torch.zeros(R + 1, dtype=torch.long, device=x.device).scatter_(0, pair, tokens)[:R]
        # Each kept copy's place in its row's route list: the earlier slots of its token on the same rank.
        earlier = torch.ones(K, K, dtype=torch.bool, device=x.device).tril(-1)  # [k, k'] = k' < k
        slot = ((rank[:, :, None] == rank[:, None, :]) & earlier).sum(-1)  # (T, K)
        row = pair.view(ep, T).gather(0, rank.clamp(max=ep - 1).T).T  # (T, K) row of each copy
        target = torch.where(expert_ids >= 0, row * Kr + slot, R * Kr).reshape(-1)
        gate = weights.new_zeros(R * Kr + 1).scatter(0, target, weights.reshape(-1).float())[:R * Kr]
        local = torch.full((R * Kr + 1,), -1.0, device=x.device).scatter(
            0, target, (expert_ids % L).reshape(-1).float())[:R * Kr]
        routes = torch.cat((gate.view(R, Kr), local.view(R, Kr)), 1)  # (R, 2 Kr) fp32

        send = x.index_select(0, token_of_pair)  # (R, D)
        if torch.is_autocast_enabled(x.device.type):  # the experts compute in the autocast dtype: send that
            send = send.to(torch.get_autocast_dtype(x.device.type))
        if torch.is_grad_enabled():
            # Every rank must run both exchanges' backward, or a rank whose inputs and experts need no gradient
            # (frozen experts, ESFT) would leave the others waiting in the reverse all-to-all.
            send, routes = _needs_grad(send), _needs_grad(routes)
        received = funcol.all_to_all_single_autograd(send, recv_splits, send_splits, self.group)
        received_routes = funcol.all_to_all_single_autograd(routes, recv_splits, send_splits, self.group)
        # Bytes to other ranks: rows and routes out, partial sums back, and the split sizes.
        row_bytes = x.shape[-1] * send.element_size()
        sent = ((R - send_splits[self.ep_rank]) * (row_bytes + routes.shape[1] * routes.element_size())
                + (sum(recv_splits) - recv_splits[self.ep_rank]) * row_bytes
                + (ep - 1) * counts.shape[1] * counts.element_size())
        return _Pending(received, received_routes, arrived[:, 1:].sum(0), copies, experts, token_of_pair,
                        send_splits, recv_splits, send.dtype, x.dtype, T, self._stats(hit, sent))

    def combine(self, p: _Pending) -> tuple[torch.Tensor, torch.Tensor]:
        Kr = self.slots
        gate, local = p.routes[:, :Kr], p.routes[:, Kr:].detach()  # (M, Kr) each
        M = gate.shape[0]
        # The arrived rows' copies sorted by local expert; the slots without an expert (-1) sort last.
        key = torch.where(local >= 0, local, float(self.per_rank)).reshape(-1).long()  # (M * Kr,)
        order = key.argsort(stable=True)[:p.copies]
        row_of_copy = order // Kr
        y = p.experts(p.received.index_select(0, row_of_copy), p.per_expert)  # (C, D)
        partial = combine(y, gate.reshape(-1)[order], row_of_copy, M).to(p.send_dtype)  # (M, D), one per row
        back = funcol.all_to_all_single_autograd(partial, p.send_splits, p.recv_splits, self.group)  # (R, D)
        out = back.new_zeros(p.n_tokens, back.shape[-1], dtype=torch.float32).index_add(
            0, p.token_of_pair, back.float())
        return out.to(p.dtype), p.stats

    def _stats(self, hit: torch.Tensor, sent: int) -> torch.Tensor:
        """DISPATCH_FIELDS of this call (no gradient, no sync)."""
        per_token = hit.sum(1).float()  # (T,)
        peak = per_token.max() if per_token.numel() else per_token.new_zeros(())
        return torch.stack((per_token.new_tensor(float(hit.shape[0])), per_token.sum(), peak,
                            per_token.new_tensor(float(sent))))

    def __call__(self, x: torch.Tensor, expert_ids: torch.Tensor, weights: torch.Tensor, experts: RoutedExperts,
                 dropping: bool = True) -> torch.Tensor:
        """Both phases at once: the weighted sum of expert outputs (T, D)."""
        return self.combine(self.dispatch(x, expert_ids, weights, experts, dropping))[0]


def _needs_grad(t: torch.Tensor) -> torch.Tensor:
    return t if t.requires_grad else t.detach().requires_grad_()


def attach_dispatchers(model: CausalLM, grid: ProcessGrid) -> list[AllToAllDispatcher]:
    """Plug an all-to-all dispatcher into every MoE layer of an expert-sharded model (ep > 1)."""
    dispatchers = []
    for moe in model.moe_layers():
        moe.dispatcher = AllToAllDispatcher(grid, moe.n_experts, moe.top_k)
        dispatchers.append(moe.dispatcher)
    return dispatchers


def reduce_gradients(model: torch.nn.Module, grid: ProcessGrid, bucket_bytes: int = 32 * 2**20) -> None:
    """Sum dense gradients over the data-parallel group and expert gradients over the expert-data-parallel group,
    in coalesced buckets, all after the backward. A parameter without a gradient on this rank contributes zeros, so
    every rank's buckets have the same layout whatever its routing was. The built-in engine overlaps these sums with
    the backward instead (`grad_sync.GradReducer`); this all-at-once form is the reference the tests hold it to
    (tests/trainer/test_grad_sync.py, tests/distributed/ep_check.py)."""
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
    group) and every pipeline stage (summed over the pipeline group), then clipping; returns the norm before
    clipping (the same value on every rank)."""
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
    total = dense_sq + expert_sq
    if grid.pp > 1 and grid.pp_group is not None:  # the other pipeline stages' parameters
        dist.all_reduce(total, op=dist.ReduceOp.SUM, group=grid.pp_group)
    norm = float(total.sqrt())
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


def dispatch_metrics(total: torch.Tensor | None, env: DistEnv, device: torch.device) -> dict:
    """Distinct ranks each token's copies went to (mean and max over ranks and MoE layers) and bytes its exchanges
    sent to other ranks per token, from this rank's running `step.merge_dispatch` total (None: nothing dispatched,
    e.g. a pipeline stage without MoE layers). Collective: every rank calls it."""
    total = torch.zeros(4, dtype=torch.float64, device=device) if total is None else total.to(device)
    sums, peak = total[[0, 1, 3]].clone(), total[2].clone()
    all_reduce_sum(sums, env)
    if env.distributed:
        dist.all_reduce(peak, op=dist.ReduceOp.MAX)
    tokens = max(float(sums[0]), 1.0)
    return {"ranks_per_token_mean": float(sums[1]) / tokens, "ranks_per_token_max": int(peak),
            "a2a_bytes_per_token": float(sums[2]) / tokens}
