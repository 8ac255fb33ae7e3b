"""torch.compile for training (docs/performance.md): each decoder layer compiled on its own, torchtitan-style, with
its activation checkpointing inside the compiled region, plus the loss.

Dense and MoE layers compile with fullgraph=True under the local and the all-to-all dispatcher: routing keeps
its statistics in tensors and syncs the host only for the all-to-all's split sizes (captured as unbacked sizes). A
layer whose experts train only in part (ESFT) runs its split expert path eagerly, so that layer compiles without
fullgraph.
"""

from __future__ import annotations

import torch

from model import CausalLM
from model.loss import cross_entropy
from model.moe import RoutedExperts, register_compile_ops


def compile_default(device: torch.device) -> bool:
    """Whether `trainer.compile: null` compiles on this device (chosen from measurements, docs/performance.md)."""
    return device.type == "cuda"


def apply_compile(model: CausalLM, enabled: bool | None, device: torch.device, backend: str = "inductor") -> bool:
    """Compile every decoder layer of `model` and its loss when `enabled` (None: `compile_default(device)`), after
    activation checkpointing and partial training are set. Returns whether it did. (`backend` other than inductor:
    tests that check tracing alone.)"""
    if enabled is None:
        enabled = compile_default(device)
    if not enabled:
        return False
    register_compile_ops()
    torch._dynamo.config.capture_scalar_outputs = True  # the all-to-all's split sizes (.tolist()) stay in the graph
    torch._dynamo.config.cache_size_limit = max(torch._dynamo.config.cache_size_limit, 64)
    for layer in model.model.layers.values():
        split = [m for m in layer.modules() if isinstance(m, RoutedExperts) and m.trainable_ids]
        for experts in split:  # ESFT's split expert path reads counts on the host: it runs eagerly
            experts._forward_split = torch.compiler.disable(experts._forward_split)
        layer.compile(fullgraph=not split, backend=backend)
    if model.lm_head is not None:
        model.loss_fn = torch.compile(cross_entropy, fullgraph=True, backend=backend)
    return True
