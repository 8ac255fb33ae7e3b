"""What one optimizer step reports, and the typed statistics every engine accumulates on the device to get there.

Every engine's step minimises the same objective: the summed cross-entropy over the supervised tokens of the whole
step on all ranks divided by their number, plus each micro-batch's balance losses averaged over the step's
micro-batches and the data-parallel ranks. `StepStats` holds the figures of that step on the device, in one flat
float64 vector reduced by a single all-reduce, so no engine syncs the host per micro-batch or per layer.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from model import CausalLMOutput
from model.balance import BALANCE_TERMS
from model.loss import IGNORE_INDEX

from . import faults
from .distributed import DistEnv, all_reduce_sum

MODEL_INPUTS = ("input_ids", "position_ids", "document_ids")
"""The batch fields a model forward takes (the loader adds `labels`)."""


@dataclass
class StepResult:
    loss: float
    """Token-weighted mean cross-entropy of the step over all ranks."""
    aux_loss: float
    """The balance losses' contribution to the objective (summed over MoE layers, averaged over micro-batches)."""
    balance: dict[str, float]
    """Unweighted expert/device/comm balance terms, the mean over MoE layers (1.0 is perfectly balanced)."""
    grad_norm: float
    """Global gradient norm before clipping (nan when not finite)."""
    skipped: bool
    """The update was dropped: the loss or the gradient norm was not finite."""
    tokens: int
    """Positions processed by the step over all data-parallel ranks (padding included)."""
    tokens_per_expert: torch.Tensor | None
    """(MoE layers, experts) token copies, summed over ranks; None for a dense model."""
    bad_records: int
    """Input records skipped so far, summed over ranks (each counted once, in its first pass)."""
    dropped_copies: int
    """Token copies dropped by the capacity limit this step, summed over ranks."""
    dispatch: torch.Tensor | None = None
    good_records: int = 0
    """Usable input records of their first pass so far, summed over ranks (with `bad_records`, the bad share)."""
    """This rank's expert-parallel exchange figures of the step (`expert_parallel.DISPATCH_FIELDS`: sums, and the
    max for ranks_max), on the device, not reduced; None without expert parallelism."""


def supervised_tokens(batches: list[dict]) -> int:
    """Positions of this rank's micro-batches that carry a loss (labels != -100)."""
    return int(sum(int((b["labels"] != IGNORE_INDEX).sum()) for b in batches))


class StepStats:
    """One step's figures on the device, summed over micro-batches (and, after `reduce`, over ranks).

    `ce_sum`, `aux_loss`, `balance` (the 3 terms), `dropped`, `bad_records`, `good_records` and `tokens_per_expert` (MoE layers x
    experts) are views into one float64 vector. Balance terms are added already divided by what makes their sum the
    step's mean, so a pipeline stage adds only its own layers and the reduction over stages completes the sum.
    """

    def __init__(self, n_moe_layers: int, n_experts: int, micro_batches: int, dp: int, device: torch.device):
        self.n_moe_layers, self.n_experts, self.per_term = n_moe_layers, n_experts, micro_batches * dp
        self.flat = torch.zeros(8 + n_moe_layers * n_experts, dtype=torch.float64, device=device)
        self.ce_sum, self.aux_loss, self.dropped, self.bad_records, self.good_records = (self.flat[i] for i in range(5))
        self.balance = self.flat[5:8]
        self.tokens_per_expert = self.flat[8:].view(n_moe_layers, n_experts)
        self.dispatch: torch.Tensor | None = None

    def add_records(self, records: tuple[int, int]) -> None:
        """This rank's input records so far: (skipped, usable), of their first pass."""
        self.bad_records += records[0]
        self.good_records += records[1]

    def add_routing(self, out: CausalLMOutput, first_moe_layer: int = 0) -> None:
        """A training forward's balance losses and routing counts; its MoE layers are the model's MoE layers
        `first_moe_layer`, `first_moe_layer + 1`, ... (a pipeline stage holds some of them)."""
        if out.aux_loss is None:
            return
        self.aux_loss += out.aux_loss.detach().double() / self.per_term
        self.balance += torch.stack([out.balance[n] for n in BALANCE_TERMS]).double() / (
            self.per_term * self.n_moe_layers)
        dropped = [s.dropped for s in out.routing if s.dropped is not None]
        if dropped:
            self.dropped += torch.stack(dropped).sum().double()
        rows = slice(first_moe_layer, first_moe_layer + len(out.routing))
        self.tokens_per_expert[rows] += torch.stack([s.tokens_per_expert for s in out.routing]).double()
        dispatch = [s.dispatch for s in out.routing if s.dispatch is not None]
        if dispatch:
            self.dispatch = merge_dispatch(self.dispatch, torch.stack(dispatch))

    def reduce(self, env: DistEnv) -> None:
        """Sum over every rank of the job (collective)."""
        all_reduce_sum(self.flat, env)

    def loss(self, supervised: float) -> float:
        """The step's token-weighted mean cross-entropy (after `reduce`; `supervised`: its supervised tokens over
        all ranks)."""
        return float(self.ce_sum) / max(supervised, 1.0)

    def result(self, loss: float, grad_norm: float, skipped: bool, batches: list[dict], dp: int) -> StepResult:
        """The StepResult of the reduced statistics."""
        _, aux, dropped, bad, good, *balance = self.flat[:8].tolist()
        load = self.tokens_per_expert.float().cpu() if self.n_moe_layers else None
        tokens = sum(b["input_ids"].numel() for b in batches) * dp
        return StepResult(loss, aux, dict(zip(BALANCE_TERMS, balance, strict=True)), grad_norm, skipped, tokens,
                          load, int(bad), int(dropped), self.dispatch, int(good))


def merge_dispatch(total: torch.Tensor | None, calls: torch.Tensor) -> torch.Tensor:
    """Fold dispatch figures (calls, 4) or (4,) into a running (4,) total: sums, except ranks_max (index 2), a max."""
    calls = calls.view(-1, 4).double()
    merged = calls.sum(0)
    merged[2] = calls[:, 2].max()
    if total is not None:
        merged[2] = torch.maximum(merged[2], total[2])
        merged[[0, 1, 3]] += total[[0, 1, 3]]
    return merged


def fault_scale(step: int, rank: int) -> float:
    """Test-only (trainer/faults.py): LATENTMOE_FAULT=nan_loss@<step>[:rank] makes that 0-based step's loss NaN on
    that rank (1.0 otherwise)."""
    at = faults.scheduled("nan_loss")
    return float("nan") if at is not None and at[0] == step and at[1] in (None, rank) else 1.0
