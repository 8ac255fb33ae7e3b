"""Run under torchrun: the torch.distributed.pipelining engine (`parallel.pp_schedule`) against the built-in engine
in one process, on the same initial weights and global batches (the harness of ds_check.py).

    torchrun --standalone --nproc_per_node=2 tests/distributed/pp_check.py zbv interleaved_1f1b --out result.json

A layout is `<schedule>[-ep<E>][-zero<Z>][-ac][-drop][-docs]` (pp=2 always; `ac`: activation checkpointing,
`drop`: token dropping with capacity factor 1, `docs`: packed-SFT rows of two documents). Checked on every rank:
losses, balance losses and gradient norms within 1e-5 relative, every parameter it holds after every step
(ds_check's tolerances), and each router it holds moved by the balance losses as in one process. Any mismatch
raises (non-zero exit); rank 0 writes the figures to --out.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
import torch.distributed as dist

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from tests.distributed import ds_check

ds_check.plain_global_batch = ds_check.global_batch
from tests.distributed.ds_check import LOSS_RTOL, PARAM_TOL, Reference, UnderTest, config
from tests.distributed.torchrun import finish, init_gloo
from trainer.distributed import DistEnv


def layout_config(layout: str):
    schedule, *options = layout.split("-")
    ep = next((int(o[2:]) for o in options if o.startswith("ep")), 1)
    zero = next((int(o[4:]) for o in options if o.startswith("zero") and o[4:] != "None"), 0)
    cfg = config(zero, ep, 2)
    cfg.parallel.pp_schedule = schedule
    cfg.trainer.activation_checkpointing = "ac" in options
    if "drop" in options:
        cfg.moe.capacity_factor = 1.0
    return cfg


def packed_batch(step: int, vocab: int) -> list[dict]:
    """ds_check's global batch packed as SFT packs it: each row holds two documents (positions restart, attention
    stays inside each), so document ids and positions must reach every stage."""
    batches = ds_check.plain_global_batch(step, vocab)
    for b in batches:
        B, S = b["input_ids"].shape
        cut = S // 3 + step  # documents of unequal lengths
        b["document_ids"] = (torch.arange(S) >= cut).long().expand(B, S).contiguous()
        b["position_ids"] = torch.cat([torch.arange(cut), torch.arange(S - cut)]).expand(B, S).contiguous()
    return batches


def reference_config(cfg):
    ref = config(None, 1, 1)
    ref.moe.capacity_factor = cfg.moe.capacity_factor
    return ref


def check(layout: str, env: DistEnv, steps: int) -> dict:
    cfg = layout_config(layout)
    ds_check.global_batch = packed_batch if "docs" in layout.split("-") else ds_check.plain_global_batch
    cfg.validate(env.world_size)
    ours, ref = UnderTest(cfg, env), Reference(reference_config(cfg))
    ours.compare_params(ref.model, {})  # layout-free initialisation: the same starting weights
    worst: dict[str, float] = {"loss": 0.0, "grad_norm": 0.0, "aux_loss": 0.0}
    result: dict = {"losses": [], "reference": [], "grad_norms": [], "reference_norms": [], "aux_loss": [],
                    "engine": ours.engine.name}
    after_first: dict[str, torch.Tensor] = {}
    for step in range(steps):
        r, want = ours.step(step), ref.step(step)
        after_first = after_first or gates(ours.view)
        assert abs(r.loss - want.loss) <= LOSS_RTOL * abs(want.loss), (layout, env.rank, step, r.loss, want.loss)
        assert abs(r.aux_loss - want.aux_loss) <= LOSS_RTOL * abs(want.aux_loss), (layout, step, r.aux_loss)
        assert abs(r.grad_norm - want.grad_norm) <= LOSS_RTOL * abs(want.grad_norm), (layout, step, r.grad_norm,
                                                                                    want.grad_norm)
        worst["loss"] = max(worst["loss"], abs(r.loss - want.loss) / abs(want.loss))
        worst["aux_loss"] = max(worst["aux_loss"], abs(r.aux_loss - want.aux_loss) / abs(want.aux_loss))
        worst["grad_norm"] = max(worst["grad_norm"], abs(r.grad_norm - want.grad_norm) / abs(want.grad_norm))
        for key, value in (("losses", r.loss), ("reference", want.loss), ("grad_norms", r.grad_norm),
                           ("reference_norms", want.grad_norm), ("aux_loss", r.aux_loss)):
            result[key].append(value)
        ours.compare_params(ref.model, worst)
    result["max_rel_diff"] = worst
    if cfg.parallel.zero_stage == 1:
        result["zero1"] = zero1_share(ours, env)
    result.update(balance_gradients(cfg, env, after_first))
    return result


def zero1_share(ours: UnderTest, env: DistEnv) -> dict:
    """ZeRO-1: the AdamW moments this rank holds, against the replicated optimizer's (2 x its parameters): dense
    ones split over dp, experts over edp, each to within one rounded-up slice."""
    grid = ours.grid
    dense = sum(p.numel() for n, p in ours.view.named_parameters() if not (".mlp.experts." in n and grid.ep > 1))
    experts = sum(p.numel() for n, p in ours.view.named_parameters() if ".mlp.experts." in n and grid.ep > 1)
    held = ours.engine.optimizer.state_numel()
    assert held == 2 * (-(-dense // grid.dp) + -(-experts // grid.edp)), (held, dense, experts)
    figures = {"rank": env.rank, "held": held, "replicated": 2 * (dense + experts),
               "dense_share": round(1 / grid.dp, 4), "expert_share": round(1 / grid.edp, 4)}
    gathered = [None] * env.world_size
    dist.all_gather_object(gathered, figures)
    return {"per_rank": gathered}


def gates(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in model.named_parameters() if n.endswith(".mlp.gate.weight")}


def balance_gradients(cfg, env: DistEnv, after_first: dict[str, torch.Tensor]) -> dict:
    """The balance losses reach every stage's routers under the schedule: one step of this engine without them
    leaves each router it holds elsewhere than the step with them (`after_first`), by the amount it does in one
    process (within 1e-5), and lands where one process without them lands."""
    no_aux = cfg.model.replace(aux_loss_alpha=0.0, device_aux_loss_alpha=0.0, comm_aux_loss_alpha=0.0)
    plain, plain_ref = layout_config_like(cfg, no_aux), reference_config(cfg)
    plain_ref.model = no_aux
    ours, ref = UnderTest(plain, env), Reference(plain_ref)
    ours.step(0)
    ref.step(0)
    with_aux = Reference(reference_config(cfg))
    with_aux.step(0)
    mine, want, want_aux = gates(ours.view), gates(ref.model), gates(with_aux.model)
    figures = {}
    for name, p in mine.items():
        shift, want_shift = (after_first[name] - p).abs().max(), (want_aux[name] - want[name]).abs().max()
        assert shift > 10 * PARAM_TOL["atol"], (name, float(shift))
        assert abs(shift - want_shift) <= 1e-5, (name, float(shift), float(want_shift))
        torch.testing.assert_close(p, want[name], **PARAM_TOL)
        figures[name] = {"shift": float(shift), "one_process_shift": float(want_shift)}
    gathered = [None] * env.world_size
    dist.all_gather_object(gathered, figures)
    merged = {k: v for g in gathered for k, v in g.items()}
    n_moe = sum(cfg.model.is_moe_layer(i) for i in range(cfg.model.num_hidden_layers))
    assert len(merged) == n_moe, sorted(merged)  # every MoE layer's router, whichever stage holds it
    return {"router_shift_without_balance": merged}


def layout_config_like(cfg, model):
    out = layout_config(cfg.parallel.pp_schedule + "".join(
        f"-{o}" for o in (f"ep{cfg.parallel.ep}", f"zero{cfg.parallel.zero_stage}")))
    out.model, out.moe.capacity_factor = model, cfg.moe.capacity_factor
    out.trainer.activation_checkpointing = cfg.trainer.activation_checkpointing
    return out


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("layouts", nargs="+")
    p.add_argument("--steps", type=int, default=4)
    p.add_argument("--out", type=Path, required=True)
    args = p.parse_args()
    env = init_gloo(60)
    finish(env, args.out, {layout: check(layout, env, args.steps) for layout in args.layouts})


if __name__ == "__main__":
    main()
