"""torch.compile for training (docs/performance.md): each decoder layer compiled on its own, torchtitan-style, after
activation checkpointing, plus the loss. Dense and MoE layers compile with fullgraph=True under the local and the
all-to-all dispatcher; the ESFT split path runs eagerly."""

from __future__ import annotations

import torch

from model import CausalLM


def compile_default(device: torch.device) -> bool:
    """Whether `trainer.compile: null` compiles on this device (chosen from measurements, docs/performance.md)."""
    return device.type == "cuda"


def apply_compile(model: CausalLM, enabled: bool | None, device: torch.device) -> bool:
    """Compile every decoder layer of `model` (and its loss) when `enabled` (None: `compile_default(device)`).
    Returns whether it did."""
    if enabled is None:
        enabled = compile_default(device)
    if not enabled:
        return False
    for layer in model.model.layers.values():
        layer.compile(fullgraph=True)
    return True
