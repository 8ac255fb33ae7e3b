"""Run under torchrun: the DeepSpeed engine (ZeRO 0-3, optionally with expert parallelism or pipeline stages)
against the built-in engine in one process, on the same initial weights and the same global batches.

    torchrun --standalone --nproc_per_node=2 tests/distributed/ds_check.py --zero 2 --ep 2 --out result.json

Every rank also runs the one-process reference itself (the whole model, every micro-batch of the global batch), so
each rank checks the losses it sees. Any mismatch raises (non-zero exit); rank 0 writes the figures to --out.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from datetime import timedelta
from pathlib import Path

import torch
import torch.distributed as dist

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from model import CausalLM, next_token_labels
from trainer.config import TrainConfig
from trainer.distributed import DistEnv
from trainer.expert_parallel import ProcessGrid, attach_dispatchers, build_grid
from trainer.optim import build_optimizer
from trainer.presets import model_preset
from trainer.train import NativeStep, train_step

B, S, MICRO = 8, 24, 2
LOSS_RTOL = 1e-5


def config(zero: int | None, ep: int, pp: int) -> TrainConfig:
    cfg = TrainConfig()
    cfg.model = model_preset("tiny", num_hidden_layers=4, vocab_size=512)
    cfg.parallel.zero_stage, cfg.parallel.ep, cfg.parallel.pp = zero, ep, pp
    cfg.optim.lr, cfg.optim.eps, cfg.optim.warmup_steps, cfg.optim.grad_clip = 1e-3, 1e-6, 0, 1.0
    cfg.trainer.micro_batch_size, cfg.trainer.global_batch_size, cfg.trainer.max_steps = MICRO, B, 10
    return cfg


def global_batch(step: int, vocab: int) -> list[dict]:
    """The step's global batch as micro-batches of MICRO sequences (data-parallel rank r gets rows r*B/dp...)."""
    ids = torch.randint(0, vocab, (B, S), generator=torch.Generator().manual_seed(70 + step))
    labels = next_token_labels(ids)
    labels[0, :5] = -100  # unequal supervised counts per micro-batch: the token weighting matters
    return [{"input_ids": ids[i:i + MICRO], "labels": labels[i:i + MICRO]} for i in range(0, B, MICRO)]


def reference_losses(cfg: TrainConfig, steps: int) -> list[tuple[float, float]]:
    torch.manual_seed(cfg.trainer.seed)
    model = CausalLM(cfg.model)
    model.train()
    stepper = NativeStep(model, build_optimizer(model, cfg.optim), ProcessGrid(), cfg)
    out = []
    for step in range(steps):
        r = train_step(step, stepper, global_batch(step, cfg.model.vocab_size), cfg, DistEnv(), ProcessGrid(),
                       torch.device("cpu"), torch.autocast("cpu", enabled=False))
        out.append((r.loss, r.grad_norm))
    return out


def deepspeed_losses(cfg: TrainConfig, env: DistEnv, steps: int) -> list[tuple[float, float]]:
    from trainer.deepspeed_engine import DeepSpeedStep, initialize
    grid = build_grid(env, cfg.parallel.pp, cfg.expert_parallel_size(env.world_size))
    torch.manual_seed(cfg.trainer.seed)
    model = CausalLM(cfg.model, expert_shard=grid.expert_shard(cfg.model.n_routed_experts) if grid.ep > 1 else None)
    if grid.ep > 1:
        attach_dispatchers(model, grid)
    model.train()
    accumulation = B // (MICRO * grid.dp)
    engine = initialize(model, cfg, grid, accumulation, "fp32")
    stepper = DeepSpeedStep(engine, grid, cfg)
    out = []
    for step in range(steps):
        mine = global_batch(step, cfg.model.vocab_size)[grid.dp_rank * accumulation:(grid.dp_rank + 1) * accumulation]
        r = train_step(step, stepper, mine, cfg, env, grid, torch.device("cpu"), torch.autocast("cpu", enabled=False))
        out.append((r.loss, r.grad_norm))
    return out


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--zero", type=int, required=True)
    p.add_argument("--ep", type=int, default=1)
    p.add_argument("--pp", type=int, default=1)
    p.add_argument("--steps", type=int, default=4)
    p.add_argument("--out", type=Path, required=True)
    args = p.parse_args()
    env = DistEnv(int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"]), int(os.environ["LOCAL_RANK"]))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", timeout=timedelta(seconds=60))
    cfg = config(args.zero, args.ep, args.pp)
    cfg.validate(env.world_size)
    ours = deepspeed_losses(cfg, env, args.steps)
    ref = reference_losses(config(None, 1, 1), args.steps)
    worst = {"loss": 0.0, "grad_norm": 0.0}
    for step, ((loss, norm), (ref_loss, ref_norm)) in enumerate(zip(ours, ref)):
        worst["loss"] = max(worst["loss"], abs(loss - ref_loss) / abs(ref_loss))
        worst["grad_norm"] = max(worst["grad_norm"], abs(norm - ref_norm) / abs(ref_norm))
        assert abs(loss - ref_loss) <= LOSS_RTOL * abs(ref_loss), (env.rank, step, loss, ref_loss)
    if env.rank == 0:
        args.out.write_text(json.dumps({"losses": [x for x, _ in ours], "reference": [x for x, _ in ref],
                                        "grad_norms": [n for _, n in ours], "reference_norms": [n for _, n in ref],
                                        "max_rel_diff": worst}, indent=1))
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
