"""LoRA (Hu et al. 2021, arXiv 2106.09685) on MLA's projections, the dense and shared MLPs, every routed expert and
optionally the router, with the base weights frozen (docs/finetuning.md, "LoRA").

A target's weight W (out, in) acts as W + alpha / r * B A, with A (r, in) drawn like PEFT's default and B (out, r)
zero, so training starts from the base model exactly. Base tensors keep their names (`...q_proj.weight`), so the
released weights, checkpoints and exports read them as before; the factors are new parameters next to them:

    model.layers.N.self_attn.q_proj.lora_A / .lora_B           (every nn.Linear target, and the router `mlp.gate`)
    model.layers.N.mlp.experts.gate_up_lora_A / _B, down_lora_A / _B   (stacked by expert, `RoutedExperts.add_lora`)

Routed experts compute their updates with the same grouped GEMMs as the experts (model/moe.py), so they cost two
small grouped GEMMs per projection, not a loop over experts. `peft_state` writes the factors under PEFT's names
and layout: transformers' fused experts are targeted with PEFT's `target_parameters`, whose factors for E experts of
rank r are one (r*E, in) A with rows e*r + k and one (out, r*E) B with columns k*E + e.
"""

from __future__ import annotations

import math
import zlib

import torch
import torch.nn.functional as F
from torch import nn

from .layers import low_rank
from .moe import MoEGate, RoutedExperts

ATTENTION_TARGETS = ("q_proj", "q_a_proj", "q_b_proj", "kv_a_proj_with_mqa", "kv_b_proj", "o_proj")
MLP_TARGETS = ("gate_proj", "up_proj", "down_proj")
TARGETS = ATTENTION_TARGETS + MLP_TARGETS + ("experts", "gate")
DEFAULT_TARGETS = ATTENTION_TARGETS + MLP_TARGETS + ("experts",)
"""Every linear map of attention and the MLPs, and the routed experts; the router (`gate`) only when asked."""


class LoRALinear(nn.Module):
    """A frozen nn.Linear's weight (the same Parameter, under the same name) plus a trainable low-rank update."""

    def __init__(self, base: nn.Linear, rank: int, alpha: float, dropout: float = 0.0):
        super().__init__()
        if base.bias is not None:
            raise ValueError("LoRALinear: the DeepSeek-V2 projections have no bias")
        self.in_features, self.out_features = base.in_features, base.out_features
        self.weight = base.weight
        self.weight.requires_grad_(False)
        device = base.weight.device
        self.lora_A = nn.Parameter(torch.zeros(rank, self.in_features, device=device, dtype=torch.float32))
        self.lora_B = nn.Parameter(torch.zeros(self.out_features, rank, device=device, dtype=torch.float32))
        self.lora_scale, self.lora_dropout = alpha / rank, dropout

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        update_input = F.dropout(x, self.lora_dropout, self.training) if self.lora_dropout else x
        a, b = self.lora_A, self.lora_B
        if not torch.is_autocast_enabled(x.device.type):
            a, b = a.to(x.dtype), b.to(x.dtype)  # the adapters are fp32 whatever dtype the base is held in
        return F.linear(x, self.weight) + low_rank(update_input, a, b, self.lora_scale)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, rank={self.lora_A.shape[0]}"


def _targeted(name: str, module: nn.Module, targets: set[str]) -> bool:
    leaf = name.rpartition(".")[2]
    if isinstance(module, RoutedExperts):
        return "experts" in targets
    if isinstance(module, MoEGate):
        return "gate" in targets
    if not isinstance(module, nn.Linear) or leaf not in targets:
        return False
    return (".self_attn." if leaf in ATTENTION_TARGETS else ".mlp.") in f".{name}."


def add_lora(model: nn.Module, targets: tuple[str, ...] | list[str], rank: int, alpha: float, dropout: float,
             seed: int) -> list[str]:
    """Freeze every parameter of `model` (a CausalLM or a part of it) and give each targeted module LoRA factors
    (module names as in the released checkpoint; `experts` the routed experts, `gate` the router). A is drawn from a
    generator seeded by (`seed`, the module's name, and the global expert), so every layout starts from the same
    adapters. Returns the names of the modules adapted."""
    unknown = sorted(set(targets) - set(TARGETS))
    if unknown:
        raise ValueError(f"unknown LoRA target {unknown[0]!r}; allowed: {', '.join(TARGETS)}")
    if rank < 1:
        raise ValueError(f"LoRA rank {rank}: must be >= 1")
    for p in model.parameters():
        p.requires_grad_(False)
    wanted = set(targets)
    chosen = [(n, m) for n, m in model.named_modules() if n and _targeted(n, m, wanted)]
    for name, module in chosen:
        if isinstance(module, RoutedExperts):
            module.add_lora(rank, alpha, dropout)
        elif isinstance(module, MoEGate):
            device = module.weight.device
            module.lora_A = nn.Parameter(torch.zeros(rank, module.weight.shape[1], device=device))
            module.lora_B = nn.Parameter(torch.zeros(module.weight.shape[0], rank, device=device))
            module.lora_scale = alpha / rank
        else:
            parent, _, leaf = name.rpartition(".")
            setattr(model.get_submodule(parent), leaf, LoRALinear(module, rank, alpha, dropout))
    init_lora(model, seed)
    return [n for n, _ in chosen]


def init_lora(model: nn.Module, seed: int) -> None:
    """A ~ U(-1/sqrt(in), 1/sqrt(in)) (PEFT's default, kaiming-uniform with a = sqrt(5)), B = 0; each A from its own
    generator, so the values do not depend on which process holds the module."""
    def draw(a: torch.Tensor, name: str, offset: int = 0) -> None:
        if a.is_meta:  # a model planned, not built
            return
        g = torch.Generator(a.device)
        g.manual_seed((seed + 1_000_003 * zlib.crc32(name.encode()) + offset) % 2**63)
        bound = 1.0 / math.sqrt(a.shape[-1])
        a.uniform_(-bound, bound, generator=g)

    with torch.no_grad():
        for name, module in model.named_modules():
            if isinstance(module, RoutedExperts) and module.lora_rank:
                for local in range(module.n_experts):
                    e = module.expert_offset + local
                    draw(module.gate_up_lora_A[local], f"{name}.gate_up", e)
                    draw(module.down_lora_A[local], f"{name}.down", e)
                    module.gate_up_lora_B[local].zero_()
                    module.down_lora_B[local].zero_()
            elif "lora_A" in module._parameters:
                draw(module.lora_A, name)
                module.lora_B.zero_()


def is_lora_param(name: str) -> bool:
    """A LoRA factor (`...lora_A`, `...gate_up_lora_B`, ...)."""
    leaf = name.rpartition(".")[2]
    return leaf in ("lora_A", "lora_B") or leaf in RoutedExperts.LORA_LEAVES


def has_lora(model: nn.Module) -> bool:
    return any(is_lora_param(n) for n, _ in model.named_parameters())


@torch.no_grad()
def merged(module: nn.Module, leaf: str) -> torch.Tensor | None:
    """The base tensor `leaf` of `module` with its LoRA update added, in fp32 (W + alpha / r * B A); None when the
    module has no LoRA on it."""
    if isinstance(module, RoutedExperts) and module.lora_rank and leaf in ("gate_up_proj", "down_proj"):
        prefix = leaf.removesuffix("_proj")
        a, b = getattr(module, f"{prefix}_lora_A").float(), getattr(module, f"{prefix}_lora_B").float()
        return getattr(module, leaf).float() + module.lora_scale * torch.bmm(b, a)
    if leaf == "weight" and "lora_A" in module._parameters:
        return module.weight.float() + module.lora_scale * (module.lora_B.float() @ module.lora_A.float())
    return None


# ------------------------------------------------------------------------------------------------- PEFT's format
def peft_targets(model: nn.Module) -> tuple[list[str], list[str]]:
    """(target_modules, target_parameters) of PEFT's LoraConfig for the adapters of `model`, on transformers'
    DeepseekV2ForCausalLM. Attention projections are nn.Linear targets. The MLP projections are named as parameters
    (`mlp.gate_proj.weight`, `mlp.shared_experts.gate_proj.weight`): PEFT, on transformers v5, reads a *module*
    target called gate_proj/up_proj/down_proj as the fused routed experts, and the dense and shared MLPs would get
    no adapter. Routed experts are transformers' fused `mlp.experts.gate_up_proj` and `mlp.experts.down_proj`."""
    modules, params = set(), set()
    for name, module in model.named_modules():
        leaf = name.rpartition(".")[2]
        if isinstance(module, RoutedExperts) and module.lora_rank:
            params |= {"mlp.experts.gate_up_proj", "mlp.experts.down_proj"}
        elif isinstance(module, MoEGate) and "lora_A" in module._parameters:
            params.add("mlp.gate.weight")
        elif isinstance(module, LoRALinear):
            if leaf in ATTENTION_TARGETS:
                modules.add(leaf)
            else:
                params.add(("mlp.shared_experts." if ".shared_experts." in f".{name}." else "mlp.") + f"{leaf}.weight")
    return sorted(modules), sorted(params, key=lambda p: (p.startswith("mlp.experts.down"), p))


def lora_factors(model: nn.Module) -> dict[str, torch.Tensor]:
    """{parameter name: tensor} of the LoRA factors this model (or shard) holds, detached."""
    return {n: p.detach() for n, p in model.named_parameters() if is_lora_param(n)}


def peft_state(factors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """PEFT's adapter state dict (fp32) from our factors (`lora_factors` of the whole model: routed experts with
    every expert of the layer, see trainer/lora.py for gathering the shards)."""
    out = {}
    for name, t in factors.items():
        prefix, _, leaf = name.rpartition(".")
        key = f"base_model.model.{prefix}"
        if leaf in ("lora_A", "lora_B"):
            out[f"{key}.{leaf}.weight"] = t.float()
        elif leaf.endswith("lora_A"):  # a stack of experts: (E, r, in) and its B (E, out, r)
            # PEFT nests the second targeted parameter's wrapper around the first: gate_up_proj is `base_layer`.
            sub = f"{key}.base_layer" if leaf.startswith("gate_up") else key
            b = factors[name[:-1] + "B"].float()
            E, r = t.shape[0], t.shape[1]
            out[f"{sub}.lora_A.weight"] = t.float().reshape(E * r, -1)  # row e*r + k
            out[f"{sub}.lora_B.weight"] = b.permute(1, 2, 0).reshape(b.shape[1], r * E)  # column k*E + e
    return out
