"""The engine interface: what the training loop, checkpoints and the export ask of an engine, whichever it is.

An engine owns this rank's part of the model (its pipeline stage and expert shard, under the CausalLM names), the
optimizer, and how one optimizer step runs over a step's micro-batches. The loop in `trainer/train.py` calls only
these methods; each engine is one subclass (docs/design.md).
"""

from __future__ import annotations

import contextlib
import math
from pathlib import Path
from typing import Any, ContextManager

import torch

from data.tokenizer import TextTokenizer
from model import CausalLM
from model.loss import IGNORE_INDEX

from ..config import TrainConfig
from ..distributed import DistEnv, all_reduce_sum
from ..export import export_hf
from ..layout import ProcessGrid
from ..optim import lr_at
from ..step import MODEL_INPUTS, StepResult


class Engine:
    """One training engine. Subclasses implement `step` and, where they hold state of their own, the hooks below."""

    name = "engine"

    def __init__(self, model: CausalLM, cfg: TrainConfig, grid: ProcessGrid, env: DistEnv, device: torch.device,
                 precision: str):
        self.model, self.cfg, self.grid, self.env, self.device = model, cfg, grid, env, device
        self.precision = precision
        self.optimizer: torch.optim.Optimizer | ParamStates | None = None
        """Where the checkpoint's per-entry optimizer files are read from and written into: our AdamW (the built-in
        engine), or `ParamStates` over an optimizer the engine keeps partitioned (DeepSpeed); None: not saved."""

    # ---------------------------------------------------------------- training
    def step(self, step: int, batches: list[dict], records: tuple[int, int] = (0, 0)) -> StepResult:
        """One optimizer step (0-based `step`) over this rank's micro-batches: forward, backward, gradient
        reduction, clipping, and the update unless the loss or gradient norm is not finite (every rank decides
        alike). `records`: this rank's (skipped, usable) input records so far, summed into the result."""
        raise NotImplementedError

    def lr(self, step: int) -> float:
        return lr_at(step, self.cfg.optim, self.cfg.optim.schedule_steps or self.cfg.trainer.max_steps)

    def set_lr(self, step: int) -> None:
        for group in self.optimizer.param_groups:
            group["lr"] = self.lr(step)

    def autocast(self) -> ContextManager:
        """bf16 autocast over fp32 weights (the built-in engine); engines that keep bf16 weights need none."""
        return contextlib.nullcontext()

    @torch.no_grad()
    def validate(self, batches: list[dict]) -> float:
        """Token-weighted mean cross-entropy over the held-out batches of every rank (collective)."""
        self.model.eval()
        total = torch.zeros(2, device=self.device, dtype=torch.float64)
        try:
            for batch in batches:
                inputs = {k: batch[k].to(self.device) for k in MODEL_INPUTS if k in batch}
                labels = batch["labels"].to(self.device)
                with self.autocast():
                    out = self.model(**inputs, labels=labels)
                n = (labels != IGNORE_INDEX).sum()
                total += torch.stack([out.loss.double() * n, n.double()])
        finally:
            self.model.train()
        all_reduce_sum(total, self.env)
        return float(total[0] / total[1].clamp(min=1))

    def eval_stages(self) -> tuple[list[tuple[int, CausalLM]], list[int]]:
        """For forward-only passes (trainer/inference.py): this rank's pipeline stages as (stage index, the CausalLM
        part that runs it), and the pipeline rank that holds each stage of the model."""
        return [(0, self.model)], [0]

    # ---------------------------------------------------------------- checkpoints and export
    @property
    def owns_dense(self) -> bool:
        """This rank writes the dense tensors of its stage (the stage's first data-parallel rank)."""
        return self.grid.dp_rank == 0

    @property
    def owns_experts(self) -> bool:
        """This rank writes its expert shard (the shard's first expert-data-parallel replica)."""
        return self.grid.edp_rank == 0

    def full_weights(self, modifier_rank: int | None = None) -> ContextManager:
        """A context in which `model` holds whole weights (collective where the engine partitions them). With
        `modifier_rank`, that rank's writes into them are kept."""
        return contextlib.nullcontext()

    def save_state(self, path: Path) -> list[Path]:
        """Write the engine's own state into checkpoint directory `path` (collective); returns the files written."""
        return []

    def load_state(self, path: Path) -> bool:
        """Restore the engine's own state from `path` (collective); True when the weights came with it (then our
        weight files are not read)."""
        return False

    def weights_changed(self) -> None:
        """Weights were written into `model` from outside (a start from given weights, a fresh optimizer): refresh
        any copy of them the engine keeps."""

    def export(self, out: Path, tokenizer: TextTokenizer) -> Path | None:
        """The Hugging Face directory of the current weights (collective); its path on rank 0."""
        with self.full_weights():
            return export_hf(self.model, tokenizer, out, self.grid)


class ParamStates:
    """The optimizer state of each parameter, whole and under the parameter's own shape, whatever partitions the
    engine keeps: the seam between an engine's optimizer and the checkpoint's per-entry files (trainer/checkpoint.py
    `owned_tensors`, `load_owned_tensors`), so that any engine resumes from any other's checkpoint
    (docs/checkpoints.md). Slots are AdamW's: `exp_avg` and `exp_avg_sq` (fp32, the parameter's shape) and `step`
    (a 0-d fp32 tensor).

    `get` and `master` are collective where the state is partitioned (`collective`): every rank of a data-parallel
    group calls them for the same parameters in the same order, owners of the entries or not."""

    collective = False
    keeps_masters = False
    """The engine keeps fp32 master copies of the weights beside the model's (`load` takes them)."""

    def get(self, p: torch.nn.Parameter) -> dict[str, torch.Tensor]:
        """`p`'s whole state ({} before the first update, and for a parameter the optimizer does not hold)."""
        raise NotImplementedError

    def master(self, p: torch.nn.Parameter) -> torch.Tensor | None:
        """The fp32 master copy of a lower-precision `p`, whole; None where `p` is its own master."""
        return None

    def load(self, states: dict[torch.nn.Parameter, dict[str, torch.Tensor]],
             masters: dict[torch.nn.Parameter, torch.Tensor]) -> None:
        """Replace the optimizer state by `states` (whole tensors of this rank's parameters, in their shapes; the
        parameters absent start afresh) and set the fp32 masters of lower-precision parameters from `masters`
        (the checkpoint's fp32 weights). Not collective."""
        raise NotImplementedError


class TorchParamStates(ParamStates):
    """A torch optimizer whose state is keyed by the model's own parameters (ours; DeepSpeed's at ZeRO-0 in fp32)."""

    def __init__(self, optimizer: torch.optim.Optimizer):
        self.optimizer = optimizer

    def get(self, p: torch.nn.Parameter) -> dict[str, torch.Tensor]:
        return self.optimizer.state.get(p, {})

    def load(self, states: dict[torch.nn.Parameter, dict[str, torch.Tensor]],
             masters: dict[torch.nn.Parameter, torch.Tensor]) -> None:
        if not states:
            return  # a checkpoint without optimizer entries: the state stays as it is
        self.optimizer.state.clear()
        for p, state in states.items():
            if p.requires_grad:  # a frozen parameter (ESFT) is not the optimizer's
                # AdamW keeps `step` on the CPU (unless capturable), the moments beside the parameter.
                self.optimizer.state[p] = {k: v.to("cpu" if k == "step" else p.device) for k, v in state.items()}


def param_states(optimizer: torch.optim.Optimizer | ParamStates | None) -> ParamStates | None:
    """`Engine.optimizer` (or a bare torch optimizer) as `ParamStates`."""
    if optimizer is None or isinstance(optimizer, ParamStates):
        return optimizer
    return TorchParamStates(optimizer)


def finite(*values: float) -> bool:
    return all(math.isfinite(v) for v in values)


def checked(value: Any) -> float:
    """A norm DeepSpeed reports (None when it computed none) as a float."""
    return float(value) if value is not None else float("nan")
