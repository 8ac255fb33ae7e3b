"""Run under torchrun: the DeepSpeed engine (ZeRO 0-3, optionally with expert parallelism or pipeline stages)
against the built-in engine in one process, on the same initial weights and the same global batches.

    torchrun --standalone --nproc_per_node=2 tests/distributed/ds_check.py zero1 zero2-ep2 zero3 --out result.json

Every rank also runs the one-process reference itself (the whole model, every micro-batch of the global batch), so
each rank checks the losses it sees. Any mismatch raises (non-zero exit); rank 0 writes the figures to --out.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch
import torch.distributed as dist

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from model import next_token_labels
from trainer.build import build_model
from trainer.config import TrainConfig
from tests.distributed.torchrun import init_gloo
from trainer.distributed import DistEnv
from trainer.engines import build_engine
from trainer.expert_parallel import build_grid
from trainer.layout import ProcessGrid
from trainer.presets import model_preset

B, S, MICRO = 8, 24, 2
LOSS_RTOL = 1e-5
# As in ep_check: AdamW (eps 1e-6) amplifies rounding of near-zero gradients, so weights are held to 1e-5.
PARAM_TOL = {"rtol": 1e-4, "atol": 1e-5}


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


class Reference:
    """The built-in engine in one process, on every micro-batch of the global batch."""

    def __init__(self, cfg: TrainConfig):
        self.cfg = cfg
        torch.manual_seed(cfg.trainer.seed)
        self.model = build_model(cfg, ProcessGrid(), torch.device("cpu"))
        self.engine = build_engine(self.model, cfg, ProcessGrid(), DistEnv(), torch.device("cpu"), "fp32")

    def step(self, step: int):
        return self.engine.step(step, global_batch(step, self.cfg.model.vocab_size))


class UnderTest:
    """The engine the config asks for (DeepSpeed ZeRO or its pipeline) on this rank's share of the same global
    batches, built as the training loop builds it."""

    def __init__(self, cfg: TrainConfig, env: DistEnv):
        self.cfg, self.env = cfg, env
        self.grid = grid = build_grid(env, cfg.parallel.pp, cfg.expert_parallel_size(env.world_size))
        self.accumulation = B // (MICRO * grid.dp)
        torch.manual_seed(cfg.trainer.seed)
        self.view = build_model(cfg, grid, torch.device("cpu"))
        self.engine = build_engine(self.view, cfg, grid, env, torch.device("cpu"), "fp32")

    def step(self, step: int):
        grid, acc = self.grid, self.accumulation
        mine = global_batch(step, self.cfg.model.vocab_size)[grid.dp_rank * acc:(grid.dp_rank + 1) * acc]
        return self.engine.step(step, mine)

    def compare_params(self, reference: torch.nn.Module, worst: dict) -> None:
        """This rank's parameters (its stage, its expert shard) against the reference's."""
        ref = dict(reference.named_parameters())
        offset, count = self.grid.expert_shard(self.cfg.model.n_routed_experts)
        for name, p in self.view.named_parameters():
            want = ref[name][offset:offset + count] if ".mlp.experts." in name and self.grid.ep > 1 else ref[name]
            torch.testing.assert_close(p.detach(), want.detach(), **PARAM_TOL, msg=lambda m, n=name: f"{n}: {m}")
            worst["params"] = max(worst.get("params", 0.0), float((p.detach() - want.detach()).abs().max()))


def first_stage_router_needs_balance_grads(cfg: TrainConfig, under_test: UnderTest) -> dict:
    """The balance losses move the routers of the first stage's MoE layers: one reference step without them leaves
    those gates measurably elsewhere, so matching parameters (above) prove the gradients arrived."""
    no_aux = config(None, 1, 1)
    no_aux.model = no_aux.model.replace(aux_loss_alpha=0.0, device_aux_loss_alpha=0.0, comm_aux_loss_alpha=0.0)
    with_aux, without = Reference(config(None, 1, 1)), Reference(no_aux)
    with_aux.step(0)
    without.step(0)
    gates = [n for n, _ in under_test.view.named_parameters() if n.endswith(".mlp.gate.weight")]
    assert gates, "this stage holds no MoE layer"
    a, b = dict(with_aux.model.named_parameters()), dict(without.model.named_parameters())
    return {n: float((a[n] - b[n]).detach().abs().max()) for n in gates}


def check(layout: str, env: DistEnv, steps: int) -> dict:
    """One layout, `zero<Z>[-ep<E>][-pp<P>][-ac]`, against the reference over `steps` steps (`ac`: activation
    checkpointing, which recomputes each layer in backward and must not change a number)."""
    zero, ep, pp = int(layout.split("zero")[1].split("-")[0]), 1, 1
    for part in layout.split("-")[1:]:
        if part.startswith("ep"):
            ep = int(part[2:])
        elif part.startswith("pp"):
            pp = int(part[2:])
    cfg = config(zero, ep, pp)
    cfg.trainer.activation_checkpointing = layout.endswith("-ac")
    cfg.validate(env.world_size)
    ours, ref = UnderTest(cfg, env), Reference(config(None, 1, 1))
    if cfg.resolved_zero_stage() != 3:  # ZeRO-3 holds only partitions of the weights
        ours.compare_params(ref.model, {})  # layout-free initialisation: the same starting weights
    worst: dict[str, float] = {"loss": 0.0, "grad_norm": 0.0}
    result: dict = {"losses": [], "reference": [], "grad_norms": [], "reference_norms": [], "aux_loss": []}
    first_layer = next(iter(ours.view.model.layers.values()))  # every stage of these layouts holds layers
    calls: list[int] = []
    hook = first_layer.self_attn.register_forward_pre_hook(lambda *_: calls.append(1))  # (recompute stops early)
    for step in range(steps):
        r, want = ours.step(step), ref.step(step)
        if step == 0:  # recomputation runs each layer's forward a second time in backward
            hook.remove()
            expected = ours.accumulation * (2 if cfg.trainer.activation_checkpointing else 1)
            assert len(calls) == expected, (layout, len(calls), expected)
            result["layer_forwards_per_step"] = len(calls)
        assert abs(r.loss - want.loss) <= LOSS_RTOL * abs(want.loss), (layout, env.rank, step, r.loss, want.loss)
        assert abs(r.aux_loss - want.aux_loss) <= LOSS_RTOL * abs(want.aux_loss), (layout, step, r.aux_loss)
        worst["loss"] = max(worst["loss"], abs(r.loss - want.loss) / abs(want.loss))
        worst["grad_norm"] = max(worst["grad_norm"], abs(r.grad_norm - want.grad_norm) / abs(want.grad_norm))
        for key, value in (("losses", r.loss), ("reference", want.loss), ("grad_norms", r.grad_norm),
                           ("reference_norms", want.grad_norm), ("aux_loss", r.aux_loss)):
            result[key].append(value)
        if cfg.resolved_zero_stage() != 3:  # ZeRO-3 holds only partitions of the weights
            ours.compare_params(ref.model, worst)
    result["max_rel_diff"] = worst
    if pp > 1:
        # Stage 0's figures: how far one step without balance losses moves its routers.
        moved = first_stage_router_needs_balance_grads(cfg, ours) if ours.grid.rank // ours.grid.dp == 0 else {}
        gathered = [None] * env.world_size
        dist.all_gather_object(gathered, moved)
        result["first_stage_gate_shift_without_balance"] = gathered[0]
        assert gathered[0] and min(gathered[0].values()) > 10 * PARAM_TOL["atol"], gathered[0]
    return result


def forget_deepspeed_expert_groups() -> None:
    """DeepSpeed keeps one set of expert groups per EP size for the life of the process; a job has one layout, this
    check runs several, so each starts from none (the new ones are created by the engine it builds)."""
    from deepspeed.utils import groups
    for name in ("_EXPERT_PARALLEL_GROUP", "_EXPERT_DATA_PARALLEL_GROUP", "_EXPERT_PARALLEL_GROUP_RANKS",
                 "_EXPERT_DATA_PARALLEL_GROUP_RANKS"):
        getattr(groups, name).clear()


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("layouts", nargs="+", help="e.g. zero1 zero2-ep2 zero3 zero1-pp2-ep2")
    p.add_argument("--steps", type=int, default=4)
    p.add_argument("--out", type=Path, required=True)
    args = p.parse_args()
    env = init_gloo(60)
    results = {}
    for layout in args.layouts:
        forget_deepspeed_expert_groups()
        results[layout] = check(layout, env, args.steps)
    if env.rank == 0:
        args.out.write_text(json.dumps(results, indent=1))
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
