"""LoRA fine-tuning around the model's adapters (model/lora.py): which parameters train, the frozen base held in the
training dtype, and the PEFT export of the adapters (docs/finetuning.md, "LoRA")."""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch
import torch.distributed as dist

from model import CausalLM
from model.hf import save_safetensors
from model.lora import add_lora, lora_factors, peft_state, peft_targets
from model.moe import RoutedExperts

from .config import ConfigError, LoRAConfig
from .layout import ProcessGrid, is_expert_param

ADAPTER_CONFIG, ADAPTER_WEIGHTS = "adapter_config.json", "adapter_model.safetensors"


def apply_lora(cfg: LoRAConfig, model: CausalLM, seed: int) -> dict[str, int]:
    """Freeze this rank's part of the model and add the adapters `cfg` names (fp32, cast by autocast). The frozen
    weights stay in the dtype `build_model` made them in: bf16 under `precision=bf16` for LoRA, so no fp32 copy of
    the base exists. Returns {trainable, total} parameters on this rank."""
    try:
        adapted = add_lora(model, cfg.targets, cfg.rank, cfg.alpha, cfg.dropout, seed)
    except ValueError as e:
        raise ConfigError(f"lora: {e}") from None
    if not adapted:
        raise ConfigError(f"lora.targets={list(cfg.targets)}: no such module in this model (its attention is "
                          f"{model.config.attention_type}; routed experts: {model.config.n_routed_experts or 0})")
    trained = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return {"trainable": trained, "total": sum(p.numel() for p in model.parameters())}


def lora_settings(state: dict) -> LoRAConfig | None:
    """The LoRA settings a checkpoint's train_state.json was trained with (None: no adapters), so that a job reading
    its weights (launch/evaluate.py) builds the same adapters first."""
    node = (state.get("config") or {}).get("lora") or {}
    if not node.get("enabled"):
        return None
    return LoRAConfig(**{k: v for k, v in node.items() if k in LoRAConfig.__dataclass_fields__})


def gather_factors(model: CausalLM, grid: ProcessGrid) -> dict[str, torch.Tensor] | None:
    """Every adapter factor of the whole model on rank 0 (collective; None elsewhere). Expert stacks are sharded
    over the expert-parallel group: the first expert-data-parallel replica of each shard sends its experts, rank 0
    stacks them by global expert id."""
    local = {n: t.float().cpu() for n, t in lora_factors(model).items()}
    if grid.world == 1:
        return local
    offsets = {f"{n}.{leaf}": m.expert_offset for n, m in model.named_modules() if isinstance(m, RoutedExperts)
               for leaf in m.LORA_LEAVES}
    sent = {n: (offsets.get(n, 0), t) for n, t in local.items()
            if (grid.edp_rank == 0 if is_expert_param(n) else grid.dp_rank == 0)}
    parts = [None] * grid.world
    dist.all_gather_object(parts, sent)
    if grid.rank != 0:
        return None
    pieces: dict[str, list[tuple[int, torch.Tensor]]] = {}
    for part in parts:
        for name, piece in part.items():
            pieces.setdefault(name, []).append(piece)
    return {name: torch.cat([t for _, t in sorted(got, key=lambda x: x[0])]) if is_expert_param(name) else got[0][1]
            for name, got in pieces.items()}


def export_adapter(model: CausalLM, cfg: LoRAConfig, base: str | None, out: Path, grid: ProcessGrid) -> Path | None:
    """`out/adapter_model.safetensors` and `out/adapter_config.json` in PEFT's LoRA format, loadable with
    `peft.PeftModel.from_pretrained` onto transformers' DeepseekV2ForCausalLM of the base model (collective; the
    directory on rank 0). The weights file is renamed into place first and the config last, so an interrupted export
    never looks complete."""
    factors = gather_factors(model, grid)
    if factors is None:
        return None
    modules, parameters = peft_targets(model)
    config = {
        "peft_type": "LORA", "task_type": "CAUSAL_LM", "base_model_name_or_path": base,
        "r": cfg.rank, "lora_alpha": cfg.alpha,
        "lora_dropout": 0.0,  # PEFT refuses dropout on target_parameters; it does nothing at inference anyway
        "target_modules": modules, "target_parameters": parameters, "bias": "none", "fan_in_fan_out": False,
        "use_rslora": False, "use_dora": False, "init_lora_weights": True, "inference_mode": True,
        "rank_pattern": {}, "alpha_pattern": {}, "modules_to_save": None,
    }
    out.mkdir(parents=True, exist_ok=True)
    (out / ADAPTER_CONFIG).unlink(missing_ok=True)
    tmp = out / f".tmp-{ADAPTER_WEIGHTS}"
    save_safetensors({k: v.contiguous() for k, v in peft_state(factors).items()}, tmp, metadata={"format": "pt"})
    os.replace(tmp, out / ADAPTER_WEIGHTS)
    tmp = out / f".tmp-{ADAPTER_CONFIG}"
    tmp.write_text(json.dumps(config, indent=2) + "\n")
    os.replace(tmp, out / ADAPTER_CONFIG)
    return out
