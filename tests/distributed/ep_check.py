"""Run under torchrun: expert parallelism against the single-process model, every rank checking its own share.

    torchrun --standalone --nproc_per_node=4 tests/distributed/ep_check.py --ep 4 --out result.json

1. The all-to-all dispatcher against the local one on the same tokens (outputs and every gradient), for routing
   edge cases: everything on rank 0's experts, perfectly uniform, a rank with no tokens at all, one expert per rank.
2. The whole model: for the same initial weights and global batch, the loss and every parameter's gradient under
   ep match one process, with and without token dropping, and so do the parameters over several AdamW steps.
   With ep == n_group, no token goes to more than topk_group ranks.
Any mismatch raises (non-zero exit); rank 0 writes the measured differences to --out.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch
import torch.distributed as dist

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from model import CausalLM, LocalDispatcher, next_token_labels  # noqa: E402
from model.moe import RoutedExperts  # noqa: E402
from tests.distributed.torchrun import init_gloo  # noqa: E402
from trainer.expert_parallel import (AllToAllDispatcher, attach_dispatchers, build_grid, clip_grad_norm,  # noqa: E402
                                     is_expert_param, reduce_gradients)
from trainer.presets import model_preset  # noqa: E402

TOL = dict(rtol=1e-5, atol=1e-6)
# AdamW's first steps move each weight by about lr * sign(grad), amplifying rounding differences of tiny gradients.
# With AdamW's default eps=1e-8 a 1e-9 gradient difference on a 1e-8 gradient moves a weight by ~lr/4; eps=1e-6
# keeps that amplification 100x smaller, so parameters can be held to 1e-5 after several steps (1% of one step's
# largest move at lr 1e-3) while the gradients feeding the first step match to 1e-6.
LR = 1e-3
PARAM_TOL = dict(rtol=1e-4, atol=1e-5)
# From the second step on, the two models start from weights that differ by that much, so their gradients do too.
LATER_GRAD_TOL = dict(rtol=1e-3, atol=1e-5)


def gather_rows(t: torch.Tensor, world: int) -> list[torch.Tensor]:
    """Every rank's tensor (first dims may differ)."""
    out = [None] * world
    dist.all_gather_object(out, t.detach().cpu())
    return out


def check_dispatcher(grid, case: str, n_experts: int, worst: dict) -> None:
    """One routing case: AllToAllDispatcher on each rank's tokens vs LocalDispatcher on all tokens."""
    torch.manual_seed(100)  # the same full expert weights everywhere
    D, inter, K = 8, 8, 2
    full = RoutedExperts(n_experts, D, inter)
    torch.nn.init.normal_(full.gate_up_proj, 0, 0.5)
    torch.nn.init.normal_(full.down_proj, 0, 0.5)
    offset, count = grid.expert_shard(n_experts)
    local = RoutedExperts(count, D, inter, expert_offset=offset, n_total=n_experts)
    with torch.no_grad():
        local.gate_up_proj.copy_(full.gate_up_proj[offset:offset + count])
        local.down_proj.copy_(full.down_proj[offset:offset + count])

    g = torch.Generator().manual_seed(grid.rank)
    T = 0 if case == "empty_rank" and grid.rank == 1 else (8 if case == "uniform" else 5 + grid.rank)
    x = torch.randn(T, D, generator=g, requires_grad=True)
    weights = torch.rand(T, K, generator=g)
    if case == "all_on_rank0":
        ids = torch.randint(0, count, (T, K), generator=g)
    elif case == "uniform":  # every expert gets exactly T K / E copies from every rank
        ids = ((torch.arange(T * K) + grid.rank) % n_experts).view(T, K)
    else:
        ids = torch.stack([torch.randperm(n_experts, generator=g)[:K] for _ in range(T)]) if T else \
            torch.zeros(0, K, dtype=torch.long)
    upstream = torch.randn(T, D, generator=g)

    y = AllToAllDispatcher(grid, n_experts, K)(x, ids, weights, local)
    (y * upstream).sum().backward()
    for grad in (local.gate_up_proj.grad, local.down_proj.grad):  # replicas of these experts saw other tokens
        if grid.edp > 1:
            dist.all_reduce(grad, group=grid.edp_group)

    # Reference: all ranks' tokens through the full experts in one process (each rank recomputes it).
    xs, idss, ws, ups = (gather_rows(t, grid.world) for t in (x, ids, weights, upstream))
    x_all = torch.cat(xs).requires_grad_()
    y_all = LocalDispatcher()(x_all, torch.cat(idss), torch.cat(ws), full)
    (y_all * torch.cat(ups)).sum().backward()
    start = sum(len(t) for t in xs[:grid.rank])
    _close(f"{case}: output", y, y_all[start:start + T], worst)
    _close(f"{case}: input grad", x.grad, x_all.grad[start:start + T], worst)
    _close(f"{case}: expert grads", local.gate_up_proj.grad, full.gate_up_proj.grad[offset:offset + count], worst)
    _close(f"{case}: expert grads", local.down_proj.grad, full.down_proj.grad[offset:offset + count], worst)
    assert local.gate_up_proj.grad is not None  # also on a rank whose experts got no token
    if case == "uniform":
        received = torch.bincount(torch.cat(idss).reshape(-1), minlength=n_experts)
        assert (received == received[0]).all(), received


def check_frozen_rank(grid) -> None:
    """ESFT-like: rank 1's inputs need no gradient and its experts are frozen. Its backward must still run both
    reverse exchanges, or rank 0 would wait forever; rank 0's expert gradients must still include rank 1's tokens."""
    torch.manual_seed(100)
    D, inter, K, E = 8, 8, 2, 8
    offset, count = grid.expert_shard(E)
    local = RoutedExperts(count, D, inter, expert_offset=offset, n_total=E)
    torch.nn.init.normal_(local.gate_up_proj, 0, 0.5)
    torch.nn.init.normal_(local.down_proj, 0, 0.5)
    frozen = grid.rank == 1
    local.requires_grad_(not frozen)
    g = torch.Generator().manual_seed(grid.rank)
    x = torch.randn(6, D, generator=g, requires_grad=not frozen)
    ids = torch.stack([torch.randperm(E, generator=g)[:K] for _ in range(6)])
    y = AllToAllDispatcher(grid, E, K)(x, ids, torch.rand(6, K, generator=g), local)
    y.sum().backward()  # hangs (until the process-group timeout) without the fix
    if not frozen:
        assert local.gate_up_proj.grad is not None and local.gate_up_proj.grad.abs().sum() > 0

def check_syncs(grid) -> dict:
    """The all-to-all dispatcher's host-sync budget: one per MoE layer forward (reading its split sizes after the
    count exchange), none in backward, with and without token dropping."""
    from tests.syncs import SyncCounter

    config = model_preset("tiny", num_hidden_layers=3, vocab_size=512)
    torch.manual_seed(0)
    model = CausalLM(config, expert_shard=grid.expert_shard(config.n_routed_experts)).train()
    attach_dispatchers(model, grid)
    ids = torch.randint(0, 512, (2, 16), generator=torch.Generator().manual_seed(grid.rank))
    counts = {}
    for capacity in (None, 1.0):
        model.set_token_dropping(capacity)
        with SyncCounter().python_reads() as forward:
            out = model(ids, labels=next_token_labels(ids))
        with SyncCounter().python_reads() as backward:
            (out.loss + out.aux_loss).backward()
        layers = len(model.moe_layers())
        assert dict(forward.counts) == {"Tensor.tolist": layers}, (capacity, dict(forward.counts))
        assert backward.total == 0, (capacity, dict(backward.counts))
        counts["drop" if capacity else "no_drop"] = {"forward": forward.total, "backward": backward.total,
                                                      "moe_layers": layers}
    return counts


def _close(what: str, a: torch.Tensor, b: torch.Tensor, worst: dict, tol: dict = TOL) -> None:
    torch.testing.assert_close(a, b, **tol, msg=lambda m: f"{what}: {m}")
    if a.numel():
        worst[what.split(":")[-1].strip()] = max(worst.get(what.split(":")[-1].strip(), 0.0),
                                                 float((a - b).abs().max()))


def check_model(grid, capacity: float | None, steps: int, worst: dict) -> dict:
    config = model_preset("tiny", num_hidden_layers=3, vocab_size=512)
    torch.manual_seed(0)
    reference = CausalLM(config)
    torch.manual_seed(0)  # the training path: same seed, this rank's expert shard only
    model = CausalLM(config, expert_shard=grid.expert_shard(config.n_routed_experts))
    attach_dispatchers(model, grid)
    ref_params = dict(reference.named_parameters())
    offset, count = grid.expert_shard(config.n_routed_experts)

    def part(name: str, t: torch.Tensor) -> torch.Tensor:
        return t[offset:offset + count] if is_expert_param(name) else t

    for name, p in model.named_parameters():  # layout-independent init: the shard is a slice of the full model
        assert torch.equal(p, part(name, ref_params[name])), name
    for m in (reference, model):
        m.set_token_dropping(capacity, no_drop_fraction=0.25)
        m.train()
    opt = torch.optim.AdamW(model.parameters(), lr=LR, eps=1e-6)
    ref_opt = torch.optim.AdamW(reference.parameters(), lr=LR, eps=1e-6)

    B, S = 8, 24
    per_rank = B // grid.dp
    losses, dropped, ranks_max = [], 0.0, 0
    for step in range(steps):
        ids = torch.randint(0, config.vocab_size, (B, S), generator=torch.Generator().manual_seed(50 + step))
        labels = next_token_labels(ids)
        n_global = float((labels != -100).sum())
        # Reference: the same per-rank micro-batches, accumulated in one process.
        ref_loss = 0.0
        for r in range(grid.dp):
            rows = slice(r * per_rank, (r + 1) * per_rank)
            out = reference(ids[rows], labels=labels[rows])
            n = float((labels[rows] != -100).sum())
            loss = out.loss * n / n_global + out.aux_loss / grid.dp
            loss.backward()
            ref_loss += float(loss)
        rows = slice(grid.dp_rank * per_rank, (grid.dp_rank + 1) * per_rank)
        out = model(ids[rows], labels=labels[rows])
        if capacity is not None:
            dropped += float(sum(s.dropped for s in out.routing))
        ranks_max = max([ranks_max] + [int(s.dispatch[2]) for s in out.routing])
        n = float((labels[rows] != -100).sum())
        loss = out.loss * n / n_global + out.aux_loss / grid.dp
        loss.backward()
        reduce_gradients(model, grid)
        total = torch.tensor(float(loss))
        dist.all_reduce(total)
        assert abs(float(total) - ref_loss) <= 1e-5 * max(1.0, abs(ref_loss)), (step, float(total), ref_loss)
        worst["loss"] = max(worst.get("loss", 0.0), abs(float(total) - ref_loss))
        losses.append(ref_loss)
        for name, p in model.named_parameters():
            _close(f"step {step} {name}: grads" + ("" if step == 0 else " (later steps)"), p.grad,
                   part(name, ref_params[name].grad), worst, TOL if step == 0 else LATER_GRAD_TOL)
        norm = clip_grad_norm(model, 1.0, grid)
        ref_norm = float(torch.nn.utils.clip_grad_norm_(reference.parameters(), 1.0))
        assert abs(norm - ref_norm) <= (1e-5 if step == 0 else 1e-4) * ref_norm, (step, norm, ref_norm)
        opt.step()
        ref_opt.step()
        opt.zero_grad(set_to_none=True)
        ref_opt.zero_grad(set_to_none=True)
        for name, p in model.named_parameters():
            _close(f"step {step} {name}: params", p, part(name, ref_params[name]), worst, PARAM_TOL)
    total_dropped = torch.tensor(dropped)
    dist.all_reduce(total_dropped)
    if capacity is not None:
        assert total_dropped > 0, "the capacity limit dropped nothing: the dropping path was not exercised"
    return {"losses": losses, "ranks_per_token_max": ranks_max, "dropped_copies": int(total_dropped)}


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--ep", type=int, required=True)
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--out", type=Path, required=True)
    args = p.parse_args()
    env = init_gloo(30)
    grid = build_grid(env, pp=1, ep=args.ep)
    worst: dict[str, float] = {}
    for case in ("all_on_rank0", "uniform", "empty_rank", "random"):
        check_dispatcher(grid, case, n_experts=8, worst=worst)
    check_dispatcher(grid, "one_expert_per_rank", n_experts=args.ep, worst=worst)  # ep == number of experts
    check_frozen_rank(grid)
    results = {"ep": args.ep, "world": env.world_size, "host_syncs": check_syncs(grid),
               "no_drop": check_model(grid, None, args.steps, worst),
               "drop": check_model(grid, 1.0, args.steps, worst)}
    config = model_preset("tiny")
    if args.ep == config.n_group:  # device-limited routing: at most topk_group ranks per token (and it is reached)
        assert results["no_drop"]["ranks_per_token_max"] == config.topk_group, results
    results["max_abs_diff"] = worst
    if env.rank == 0:
        args.out.write_text(json.dumps(results, indent=2))
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
