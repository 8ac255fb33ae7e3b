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
        self.optimizer: torch.optim.Optimizer | None = None
        """Our AdamW when its state goes into our checkpoint files; None when the engine keeps it (DeepSpeed)."""

    # ---------------------------------------------------------------- training
    def step(self, step: int, batches: list[dict], bad_records: int = 0) -> StepResult:
        """One optimizer step (0-based `step`) over this rank's micro-batches: forward, backward, gradient
        reduction, clipping, and the update unless the loss or gradient norm is not finite (every rank decides
        alike). `bad_records`: this rank's skipped input records so far, summed into the result."""
        raise NotImplementedError

    def lr(self, step: int) -> float:
        return lr_at(step, self.cfg.optim, self.cfg.trainer.max_steps)

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


def finite(*values: float) -> bool:
    return all(math.isfinite(v) for v in values)


def checked(value: Any) -> float:
    """A norm DeepSpeed reports (None when it computed none) as a float."""
    return float(value) if value is not None else float("nan")
