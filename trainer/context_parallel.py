"""Context parallelism: each sequence split over `cp` ranks, attention exchanging MLA's latent rather than its heads
(docs/parallelism.md, "Context parallelism").

A sequence of L tokens is cut into 2 cp chunks of L / (2 cp); rank r of the group holds chunks r and 2 cp - 1 - r
(zigzag), so every rank has the same causal work. In each MLA layer a rank computes the latent c_KV and the shared
RoPE key of its own tokens, r + dr numbers a token (576 at V2 widths), and the group all-gathers them; each rank then
expands, with kv_b_proj, only the key chunks its queries may see and attends block by block, merging the blocks by
their log-sum-exps (model/attention.py `context_attention`). A full-heads exchange would move H (dqk + dv) numbers a
token (40,960 at V2): 71x more. The backward of the all-gather sends each rank the gradients of its latents.

The model sees this through `CausalLM.context` (an object with `layout`), so model/ stays free of
torch.distributed; the per-sequence balance-loss statistics are summed over the group by the layout's
`reduce_stats`, so the losses are those of whole sequences.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from model.attention import ContextMask
from model.moe import RoutingStats

SEQUENCE_KEYS = ("input_ids", "labels", "position_ids", "document_ids")
"""The (B, L) entries of a micro-batch that are split along the sequence."""
TILE = 1024
"""Tokens of a query or key tile of the block attention: each (query tile, key tile) pair forms one tile x tile
score matrix per head, recomputed in backward (B x H x 1024 x 1024 x 4 bytes: 0.5 GiB at V2's 128 heads)."""


def per_token(config) -> tuple[int, int]:
    """(latent, full-heads) numbers a token sends per MLA layer: r + dr against H (dqk + dv)."""
    qk = config.qk_nope_head_dim + config.qk_rope_head_dim
    return config.kv_lora_rank + config.qk_rope_head_dim, config.num_attention_heads * (qk + config.v_head_dim)


def zigzag_chunks(cp: int, rank: int) -> tuple[int, int]:
    """The two chunks (of 2 cp) rank `rank` holds: the r-th from the start and the r-th from the end."""
    return rank, 2 * cp - 1 - rank


def chunk_index(cp: int, rank: int, chunk: int, device: torch.device | None = None) -> torch.Tensor:
    """(2 chunk,) the sequence indices of the tokens rank `rank` holds, for chunks of `chunk` tokens."""
    return torch.cat([torch.arange(c * chunk, (c + 1) * chunk, device=device) for c in zigzag_chunks(cp, rank)])


def split_sequences(batch: dict, cp: int, rank: int) -> dict:
    """This rank's part of a micro-batch of whole sequences: its two zigzag chunks of every sequence entry, with
    `position_ids` added (the tokens' positions in the whole sequence, so RoPE and YaRN see global positions) where
    the batch has none. Other entries are kept as they are."""
    L = batch["input_ids"].shape[1]
    if L % (2 * cp):
        raise ValueError(f"a sequence of {L} tokens does not split into 2 x parallel.cp = {2 * cp} chunks")
    out = dict(batch)
    if "position_ids" not in batch:
        out["position_ids"] = torch.arange(L, device=batch["input_ids"].device).expand_as(batch["input_ids"])
    index = chunk_index(cp, rank, L // (2 * cp), batch["input_ids"].device)
    for key in SEQUENCE_KEYS:
        if key in out:
            out[key] = out[key][:, index]
    return out


class _GatherSequence(torch.autograd.Function):
    """All-gather along the sequence (dim 1) in rank order; the backward hands each rank the sum, over the ranks, of
    the gradients of its own tokens (a reduce-scatter; an all-to-all then a sum where the backend has none)."""

    @staticmethod
    def forward(ctx, t: torch.Tensor, group) -> torch.Tensor:
        ctx.group, ctx.size = group, t.shape[1]
        parts = [torch.empty_like(t) for _ in range(dist.get_world_size(group))]
        dist.all_gather(parts, t.contiguous(), group=group)
        return torch.cat(parts, dim=1)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        parts = [p.contiguous() for p in grad.split(ctx.size, dim=1)]
        if dist.get_backend(ctx.group) == dist.Backend.NCCL:
            out = torch.empty_like(parts[0])
            dist.reduce_scatter(out, parts, group=ctx.group)
            return out, None
        received = [torch.empty_like(p) for p in parts]
        dist.all_to_all(received, parts, group=ctx.group)
        return torch.stack(received).sum(0), None


class _SumOverGroup(torch.autograd.Function):
    """All-reduce (sum) whose backward is the same sum of the gradients: each rank's input feeds every rank's
    output."""

    @staticmethod
    def forward(ctx, t: torch.Tensor, group) -> torch.Tensor:
        ctx.group = group
        out = t.clone()
        dist.all_reduce(out, group=group)
        return out

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        out = grad.contiguous().clone()
        dist.all_reduce(out, group=ctx.group)
        return out, None


class LatentExchange:
    """`CausalLM.context` for one rank of a context-parallel group: builds each micro-batch's `ContextMask`."""

    def __init__(self, group, cp: int, rank: int, tile: int = TILE):
        self.group, self.cp, self.rank, self.tile = group, cp, rank, tile

    def gather(self, t: torch.Tensor) -> torch.Tensor:
        """(B, S, ...) -> (B, cp S, ...) in rank order, differentiable (its backward returns each rank's share)."""
        return _GatherSequence.apply(t, self.group)

    def layout(self, batch: int, seq_len: int, device: torch.device, document_ids: torch.Tensor | None
               ) -> ContextMask:
        chunk = seq_len // 2
        k_index = torch.cat([chunk_index(self.cp, r, chunk, device) for r in range(self.cp)])
        k_doc = None
        if document_ids is not None:
            parts = [torch.empty_like(document_ids) for _ in range(self.cp)]
            dist.all_gather(parts, document_ids.contiguous(), group=self.group)
            k_doc = torch.cat(parts, dim=1)
        mine = zigzag_chunks(self.cp, self.rank)
        everyone = [c for r in range(self.cp) for c in zigzag_chunks(self.cp, r)]
        return ContextMask(gather=self.gather, q_index=chunk_index(self.cp, self.rank, chunk, device),
                           k_index=k_index, q_spans=self.tiles(mine, chunk), k_spans=self.tiles(everyone, chunk),
                           q_doc=document_ids, k_doc=k_doc, reduce_stats=self.reduce_stats)

    def tiles(self, chunks: tuple[int, ...] | list[int], chunk: int) -> list[tuple[int, int, int]]:
        """(start, end, sequence index of start) of tiles of at most `tile` tokens over `chunks` laid end to end."""
        out = []
        for position, c in enumerate(chunks):
            for offset in range(0, chunk, self.tile):
                n = min(self.tile, chunk - offset)
                out.append((position * chunk + offset, position * chunk + offset + n, c * chunk + offset))
        return out

    def reduce_stats(self, stats: RoutingStats) -> RoutingStats:
        """One MoE layer's per-sequence statistics over the whole sequences: copies and tokens summed over the
        group, the mean router probability averaged (every rank holds the same number of each sequence's tokens);
        the probabilities keep their gradient."""
        counts, groups = stats.expert_counts.clone(), stats.group_tokens.clone()
        dist.all_reduce(counts, group=self.group)
        dist.all_reduce(groups, group=self.group)
        probs = _SumOverGroup.apply(stats.expert_probs, self.group) / self.cp
        return RoutingStats(expert_counts=counts, expert_probs=probs, group_tokens=groups, dropped=stats.dropped,
                            dispatch=stats.dispatch)
