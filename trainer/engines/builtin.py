"""The built-in engine: plain data parallelism with exact gradient sums (dense over dp, experts over edp), our own
clipping and non-finite guard, fp32 weights with bf16 autocast on GPUs. The reference the other engines are
tested against."""

from __future__ import annotations

import contextlib
from typing import ContextManager

import torch

from ..config import stop_if_non_finite
from ..distributed import all_reduce_sum
from ..expert_parallel import broadcast_replicas, clip_grad_norm
from ..grad_sync import GradReducer
from ..optim import build_optimizer
from ..step import MODEL_INPUTS, StepResult, StepStats, fault_scale, supervised_tokens
from .base import Engine, finite


class DataParallelEngine(Engine):
    """The step of the data-parallel engines (built-in, DeepSpeed ZeRO): each micro-batch forward and backward on
    this rank, then reduction and update. Subclasses say how to run forward, backward and the update."""

    def forward(self, **inputs):
        return self.model(**inputs)

    def backward(self, loss: torch.Tensor, last: bool) -> None:
        """One micro-batch's backward (`last`: the step's final one)."""
        raise NotImplementedError

    def update(self, loss: float) -> tuple[float, bool]:
        """Reduce, clip and apply the step's gradients unless `loss` or the gradient norm is not finite; returns
        (the gradient norm before clipping, skipped)."""
        raise NotImplementedError

    def step(self, step: int, batches: list[dict], records: tuple[int, int] = (0, 0)) -> StepResult:
        self.set_lr(step)
        stats, supervised = self.forward_backward(step, batches, records)
        loss = stats.loss(supervised)
        grad_norm, skipped = self.update(loss)
        stop_if_non_finite(skipped, step, loss, grad_norm, self.cfg.trainer.non_finite)
        return stats.result(loss, grad_norm, skipped, batches, self.grid.dp)

    def forward_backward(self, step: int, batches: list[dict], records: tuple[int, int]) -> tuple[StepStats, float]:
        """Backpropagate each micro-batch's share of the step's objective (its summed cross-entropy over the
        supervised tokens of the whole step on all ranks, plus its share of the balance losses); returns the
        reduced statistics and the step's supervised tokens over all ranks."""
        grid, n = self.grid, len(batches)
        counts = [supervised_tokens([b]) for b in batches]
        supervised = all_reduce_sum(torch.tensor(float(sum(counts)), device=self.device), self.env).item()
        moe_layers = self.model.moe_layers()
        stats = StepStats(len(moe_layers), moe_layers[0].n_experts if moe_layers else 0, n, grid.dp, self.device)
        stats.add_records(records)
        fault = fault_scale(step, self.env.rank)
        # One autocast region for the whole step, so its cache casts each weight to bf16 once for all micro-batches
        # (it is dropped when the region closes, before the update changes the weights). Backward runs with autocast
        # off: it takes the dtypes the forward chose, and a custom backward's matmuls must not be cast again.
        with self.autocast():
            for i, (batch, count) in enumerate(zip(batches, counts, strict=True)):
                inputs = {k: batch[k].to(self.device, non_blocking=True) for k in MODEL_INPUTS if k in batch}
                labels = batch["labels"].to(self.device, non_blocking=True)
                out = self.forward(**inputs, labels=labels)
                ce_sum = out.loss * count * fault
                loss = ce_sum / max(supervised, 1.0)
                if out.aux_loss is not None:
                    loss = loss + out.aux_loss / (n * grid.dp)
                with torch.autocast(self.device.type, enabled=False):
                    self.backward(loss, last=i == n - 1)
                stats.ce_sum += ce_sum.detach().double()
                stats.add_routing(out)
                del out, ce_sum, loss  # this micro-batch's logits are freed before the next forward
        stats.reduce(self.env)
        return stats, supervised


class BuiltinEngine(DataParallelEngine):
    name = "built-in engine"

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.optimizer = build_optimizer(self.model, self.cfg.optim)
        broadcast_replicas(self.model, self.grid)  # identical replicas, whatever each rank was given
        self.grad_sync = GradReducer(self.model, self.grid)

    def autocast(self) -> ContextManager:
        if self.precision == "bf16":
            return torch.autocast(self.device.type, dtype=torch.bfloat16)
        return contextlib.nullcontext()

    def backward(self, loss: torch.Tensor, last: bool) -> None:
        """Earlier micro-batches only accumulate; the last one's backward launches the gradient sums bucket by bucket
        as their gradients become ready, and the rest right after it (trainer/grad_sync.py)."""
        if last:
            self.grad_sync.arm()
        loss.backward()
        if last:
            self.grad_sync.launch_rest()

    def update(self, loss: float) -> tuple[float, bool]:
        return sum_clip_update(self, self.grad_sync, loss)


def sum_clip_update(engine: Engine, grad_sync: GradReducer, loss: float) -> tuple[float, bool]:
    """The built-in engine's update, shared by the torch pipeline engine: sum the gradients over their replicas,
    clip by the global norm, and apply the update unless the loss or the gradient norm is not finite (the same
    decision on every rank: both come from reduced values). Returns (norm before clipping, skipped)."""
    grad_sync.finish()
    max_norm = engine.cfg.optim.grad_clip if engine.cfg.optim.grad_clip > 0 else float("inf")
    grad_norm = clip_grad_norm(engine.model, max_norm, engine.grid)
    skipped = not finite(loss, grad_norm)
    if not skipped:
        engine.optimizer.step()
    engine.optimizer.zero_grad(set_to_none=True)
    return grad_norm, skipped
