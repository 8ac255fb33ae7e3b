"""The paper's three balance losses (paper §2.2.3; docs/model.md §5), as pure functions of one layer's `RoutingStats`.

With T tokens in a sequence, K experts per token, E experts in G routing groups of E/G consecutive experts and
M = groups a token may use:

    expert-level (alpha1):   f_i  = E/(K T) * copies to expert i,           P_i  = mean_t s_{i,t}      L = sum_i f_i P_i
    device-level (alpha2):   f'_g = mean_{i in g} f_i,                       P'_g = sum_{i in g} P_i    L = sum_g f'_g P'_g
    communication (alpha3):  f''_g = G/(M T) * tokens with a copy in g,      P''_g = P'_g               L = sum_g f''_g P''_g

"Device" means the routing group, never the parallel layout, so the losses do not change with expert parallelism.
With `per_sequence` (the released `seq_aux`) each loss is computed per sequence and averaged over sequences;
otherwise the micro-batch is treated as one long sequence. Perfectly uniform routing gives exactly 1.0 for each.
"""

from __future__ import annotations

import torch

from .config import ModelConfig
from .moe import RoutingStats

BALANCE_TERMS = ("expert", "device", "comm")


def _pool(stats: RoutingStats, per_sequence: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(counts, probs, group_tokens) per sequence, or summed into one row for the per-batch form."""
    counts, probs, group_tokens = stats.expert_counts, stats.expert_probs, stats.group_tokens
    if not per_sequence:
        counts, probs = counts.sum(0, keepdim=True), probs.mean(0, keepdim=True)
        group_tokens = group_tokens.sum(0, keepdim=True)
    return counts, probs, group_tokens


def _tokens_per_row(counts: torch.Tensor, top_k: int) -> torch.Tensor:
    """T of each row: every token selects exactly K experts."""
    return counts.sum(-1, keepdim=True) / top_k  # (rows, 1)


def expert_balance_loss(stats: RoutingStats, top_k: int, per_sequence: bool = True) -> torch.Tensor:
    counts, probs, _ = _pool(stats, per_sequence)
    n_experts = counts.shape[-1]
    f = counts * n_experts / (top_k * _tokens_per_row(counts, top_k))  # (rows, E)
    return (f * probs).sum(-1).mean()


def device_balance_loss(stats: RoutingStats, top_k: int, n_group: int, per_sequence: bool = True) -> torch.Tensor:
    counts, probs, _ = _pool(stats, per_sequence)
    rows, n_experts = counts.shape
    f = counts * n_experts / (top_k * _tokens_per_row(counts, top_k))  # (rows, E)
    f_group = f.view(rows, n_group, -1).mean(-1)  # (rows, G)
    p_group = probs.view(rows, n_group, -1).sum(-1)  # (rows, G)
    return (f_group * p_group).sum(-1).mean()


def comm_balance_loss(stats: RoutingStats, top_k: int, n_group: int, groups_per_token: int,
                      per_sequence: bool = True) -> torch.Tensor:
    counts, probs, group_tokens = _pool(stats, per_sequence)
    rows = counts.shape[0]
    f = group_tokens * n_group / (groups_per_token * _tokens_per_row(counts, top_k))  # (rows, G)
    p_group = probs.view(rows, n_group, -1).sum(-1)  # (rows, G)
    return (f * p_group).sum(-1).mean()


def groups_per_token(config: ModelConfig) -> int:
    """M of the communication loss: `topk_group` under device-limited routing, else the most groups K copies reach."""
    if config.topk_method == "group_limited_greedy":
        return config.topk_group
    return min(config.num_experts_per_tok, config.n_group)


def balance_losses(stats: RoutingStats, config: ModelConfig) -> dict[str, torch.Tensor]:
    """The three unweighted terms for one layer, keyed by `BALANCE_TERMS`."""
    k, g = config.num_experts_per_tok, config.n_group
    return {
        "expert": expert_balance_loss(stats, k, config.seq_aux),
        "device": device_balance_loss(stats, k, g, config.seq_aux),
        "comm": comm_balance_loss(stats, k, g, groups_per_token(config), config.seq_aux),
    }


def balance_coefficients(config: ModelConfig) -> dict[str, float]:
    return {"expert": config.aux_loss_alpha, "device": config.device_aux_loss_alpha,
            "comm": config.comm_aux_loss_alpha}
