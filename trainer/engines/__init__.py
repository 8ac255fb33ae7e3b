"""Training engines behind one interface (`Engine`): the built-in data-parallel engine, DeepSpeed ZeRO, DeepSpeed's
pipeline, and torch.distributed.pipelining's schedules. `build_engine` is the one place that picks one; nothing else
asks which it is."""

from __future__ import annotations

import torch

from model import CausalLM

from ..config import TrainConfig
from ..distributed import DistEnv
from ..compile import apply_compile, compile_default
from ..layout import SPLIT_BACKWARD, ProcessGrid
from .base import Engine
from .builtin import BuiltinEngine


def build_engine(model: CausalLM, cfg: TrainConfig, grid: ProcessGrid, env: DistEnv, device: torch.device,
                 precision: str) -> Engine:
    """The engine the config asks for, around this rank's part of the model (already holding its start weights:
    DeepSpeed copies or partitions them when it is built). Compiles the model's layers first when
    `trainer.compile` says so (after partial training is set: ESFT layers keep their split path eager)."""
    compile_on = cfg.trainer.compile
    if compile_on is None:  # the device's default, never under ZeRO-3 (see TrainConfig validation)
        compile_on = (compile_default(device) and cfg.resolved_zero_stage() != 3 and cfg.parallel.cp == 1
                      and not (cfg.torch_pipeline and cfg.parallel.pp_schedule in SPLIT_BACKWARD))
    apply_compile(model, compile_on, device)
    if cfg.torch_pipeline:
        from .torch_pipeline import TorchPipelineEngine
        return TorchPipelineEngine(model, cfg, grid, env, device, precision)
    if grid.pp > 1:
        from .pipeline import PipelineEngine
        return PipelineEngine(model, cfg, grid, env, device, precision)
    if cfg.parallel.zero_stage is not None:
        from .zero import ZeroEngine
        return ZeroEngine(model, cfg, grid, env, device, precision)
    return BuiltinEngine(model, cfg, grid, env, device, precision)


__all__ = ["BuiltinEngine", "Engine", "build_engine"]
