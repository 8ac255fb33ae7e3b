"""Partial fine-tuning: `trainer.trainable` patterns, and expert-specialised fine-tuning (ESFT, arXiv 2407.01906).

ESFT scores every routed expert's relevance to the task data on a sample of it, before training, with the model as
loaded: the average gate score (the router's softmax probability of the expert, averaged over tokens) or the token
selection ratio (the share of the layer's token copies routed to it). Per MoE layer, scores are normalised to sum to
1 and the highest-scoring experts are kept until their cumulative share reaches `esft.threshold`; only those are
trained, everything else is frozen and left out of the optimizer (each kept expert gets a trainable copy of its
slice of the stacked tensors, `RoutedExperts.set_trainable_experts`, so memory for gradients and AdamW moments
drops with the number of kept experts). The selection is stored in every checkpoint and reused on resume.

Routed experts are addressed per expert as `model.layers.<L>.mlp.experts.<global expert>`, so a `trainer.trainable`
pattern can pick single experts as well as whole tensors (`mlp\\.shared_experts\\.`, `mlp\\.gate\\.`, ...).
"""

from __future__ import annotations

import re

import torch
import torch.distributed as dist

from model.moe import MoE, RoutedExperts

from .config import ConfigError, ESFTConfig


def expert_name(experts_module_name: str, global_expert: int) -> str:
    return f"{experts_module_name}.{global_expert}"


def _layer_index(module_name: str) -> int:
    match = re.search(r"layers\.(\d+)\.", module_name)
    if match is None:
        raise ValueError(f"{module_name}: not a decoder layer's module")
    return int(match.group(1))


def apply_trainable(model: torch.nn.Module, patterns: list[str] | None,
                    selection: dict[int, list[int]] | None = None) -> dict[str, int]:
    """Freeze every parameter except those matching a pattern (re.search over CausalLM names; experts per expert)
    and, with an ESFT `selection` ({layer: [global expert ids]}), the selected experts. No patterns and no
    selection: everything trains. Returns {"trainable": parameters trained, "total": all parameters} on this rank.
    Raises ValueError naming a pattern that matches nothing."""
    if patterns is None and selection is None:
        n = sum(p.numel() for p in model.parameters())
        return {"trainable": n, "total": n}
    regexes = [(p, re.compile(p)) for p in patterns or []]
    used = set()

    def wanted(name: str) -> bool:
        hits = [p for p, r in regexes if r.search(name)]
        used.update(hits)
        return bool(hits)

    stacks = {n: m for n, m in model.named_modules() if isinstance(m, RoutedExperts)}
    for name, p in model.named_parameters():
        owner = name.rpartition(".")[0]
        if owner not in stacks and not name.endswith("_trainable"):
            p.requires_grad_(wanted(name))
    for name, module in stacks.items():
        chosen = selection.get(_layer_index(name), []) if selection else []
        local = [i for i in range(module.n_experts)
                 if wanted(expert_name(name, module.expert_offset + i)) or module.expert_offset + i in chosen]
        module.set_trainable_experts(None if len(local) == module.n_experts else local)
    unused = [p for p, _ in regexes if p not in used]
    if unused:
        raise ConfigError(f"trainer.trainable: pattern {unused[0]!r} matches no parameter (names look like "
                         f"'model.layers.1.self_attn.kv_a_proj_with_mqa.weight'; experts like "
                         f"'model.layers.1.mlp.experts.5')")
    params = [p for n, p in model.named_parameters() if not n.endswith("_trainable")]
    trained = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return {"trainable": trained, "total": sum(p.numel() for p in params)}


@torch.no_grad()
def expert_relevance(model: torch.nn.Module, batches: list[dict], score: str, device: torch.device,
                     group=None) -> dict[int, torch.Tensor]:
    """{MoE layer index: (E,) relevance} over `batches` (summed over the data-parallel ranks of `group` when
    distributed): `gate` = mean router probability per expert, `token` = share of token copies per expert."""
    moes = {_layer_index(n): m for n, m in model.named_modules() if isinstance(m, MoE)}
    sums = {i: torch.zeros(m.n_experts, dtype=torch.float64, device=device) for i, m in moes.items()}
    tokens = torch.zeros((), dtype=torch.float64, device=device)
    hooks = []
    for i, moe in moes.items():
        def record(_module, _inputs, output, i=i):
            ids, _, scores = output
            if score == "gate":
                sums[i] += scores.double().sum(0)
            else:
                sums[i] += torch.bincount(ids.reshape(-1), minlength=scores.shape[-1]).double() / ids.shape[1]
        hooks.append(moe.gate.register_forward_hook(record))
    was_training = model.training
    model.eval()
    try:
        for batch in batches:
            inputs = {k: batch[k].to(device) for k in ("input_ids", "position_ids", "document_ids") if k in batch}
            model(**inputs)
            tokens += inputs["input_ids"].numel()
    finally:
        for h in hooks:
            h.remove()
        model.train(was_training)
    if dist.is_available() and dist.is_initialized():
        for i in sorted(sums):
            dist.all_reduce(sums[i], group=group)
        dist.all_reduce(tokens, group=group)
    return {i: (s / tokens.clamp(min=1)).float().cpu() for i, s in sums.items()}


def select_experts(relevance: dict[int, torch.Tensor], threshold: float) -> dict[int, list[int]]:
    """Per layer, the fewest highest-relevance experts whose normalised relevance adds up to `threshold` (ties broken
    by the lower expert id, so the same scores always give the same selection)."""
    selection = {}
    for layer, scores in sorted(relevance.items()):
        share = scores.double() / scores.double().sum().clamp(min=1e-30)
        order = sorted(range(len(share)), key=lambda e: (-float(share[e]), e))
        kept, total = [], 0.0
        for e in order:
            kept.append(e)
            total += float(share[e])
            if total >= threshold - 1e-12:
                break
        selection[layer] = sorted(kept)
    return selection


def esft_selection(model: torch.nn.Module, batches: list[dict], cfg: ESFTConfig, device: torch.device,
                   group=None) -> tuple[dict[int, list[int]], dict[int, list[float]]]:
    """(selection, relevance) for `cfg` on the sample `batches`."""
    if cfg.score not in ("gate", "token"):
        raise ValueError(f"esft.score={cfg.score!r}: allowed: gate, token")
    relevance = expert_relevance(model, batches, cfg.score, device, group)
    return select_experts(relevance, cfg.threshold), {i: r.tolist() for i, r in relevance.items()}
