"""Run under torchrun: ZeRO-1 (`trainer/zero1.py` ShardedAdamW) against the built-in engine's replicated AdamW
(`trainer/optim.py` build_optimizer), every rank on its own part of the model.

    torchrun --standalone --nproc_per_node=4 tests/distributed/zero1_check.py --ep 2 --out result.json

Two copies of this rank's part of the model (its expert shard under ep > 1) start from the same weights. Each step
both take this data-parallel rank's batch, sum gradients as the built-in engine does (dense over dp, routed experts
over edp), clip, and update: one with ShardedAdamW, one with torch's AdamW, the learning rate changing every step.
Checked bitwise: the losses and every weight after every step (the updated slices gathered in several rounds);
`get` of every parameter against the AdamW's state ({} before the first step); `load` of all those states into a
fresh ShardedAdamW, and of all but a few (those start afresh, as in the AdamW with their state deleted),
continuing; the checkpoint's per-entry tensors (`owned_tensors`) equal to the AdamW's, and `load_owned_tensors`
of them giving the same states back. Measured: the optimizer state each rank holds, which must be its contiguous
slice of each kind (ceil(N / size) elements at most) and sum over the world to the whole model's state once. A toy
module with odd sizes (an uneven last slice, a rank holding nothing of a kind) goes through the same checks. Any
mismatch raises (non-zero exit); rank 0 writes the figures to --out.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.distributed as dist
from safetensors.torch import save_file
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from model import next_token_labels  # noqa: E402
from tests.distributed.torchrun import init_gloo  # noqa: E402
from trainer.build import build_model  # noqa: E402
from trainer.checkpoint import load_owned_tensors, owned_tensors  # noqa: E402
from trainer.config import TrainConfig  # noqa: E402
from trainer.expert_parallel import build_grid, clip_grad_norm, reduce_gradients  # noqa: E402
from trainer.layout import ProcessGrid, is_expert_param  # noqa: E402
from trainer.optim import build_optimizer  # noqa: E402
from trainer.presets import model_preset  # noqa: E402
from trainer.zero1 import MOMENTS, ShardedAdamW  # noqa: E402

B, S = 2, 16
STEPS, LOAD_STEPS = 3, 2


def lr_at(step: int) -> float:
    """A different rate each step: the `lr` an engine sets in `param_groups` must reach the update."""
    return 1e-3 * (step + 2) / 3


class TinyModel:
    """The tiny preset (3 layers: a dense one, two MoE) on this rank's batch, reduced and clipped as the built-in
    engine does."""

    gather_numel = 2**18  # the weights gathered in several rounds

    def __init__(self, grid: ProcessGrid):
        self.cfg, self.grid = TrainConfig(), grid
        self.cfg.model = model_preset("tiny", num_hidden_layers=3, vocab_size=512)
        self.cfg.optim.grad_clip = 1.0

    def build(self) -> nn.Module:
        torch.manual_seed(self.cfg.trainer.seed)
        return build_model(self.cfg, self.grid, torch.device("cpu"))

    def backward(self, model: nn.Module, step: int) -> float:
        grid = self.grid
        batch = torch.randint(0, self.cfg.model.vocab_size, (B * grid.dp, S),
                              generator=torch.Generator().manual_seed(100 + step))
        ids = batch[grid.dp_rank * B:(grid.dp_rank + 1) * B]  # this data-parallel rank's rows
        out = model(input_ids=ids, labels=next_token_labels(ids))
        loss = out.loss if out.aux_loss is None else out.loss + out.aux_loss
        loss.backward()
        reduce_gradients(model, grid)
        clip_grad_norm(model, self.cfg.optim.grad_clip, grid)
        return loss.item()

    def dropped(self, model: nn.Module) -> list[str]:
        """Parameters whose state a partial load leaves out: a matrix in mid-model, a norm, an expert tensor."""
        return ["model.layers.1.self_attn.q_b_proj.weight", "model.layers.1.input_layernorm.weight",
                "model.layers.2.mlp.experts.down_proj"]


class Toy(nn.Module):
    """Odd sizes: 5 dense elements (with dp=4: slices of 2, 2, 1 and none) and 4 expert ones, weight decay on
    the matrices only."""

    def __init__(self):
        super().__init__()
        self.w = nn.Parameter(torch.randn(2, 2))
        self.b = nn.Parameter(torch.randn(1))
        self.x = nn.Module()
        self.x.mlp = nn.Module()
        self.x.mlp.experts = nn.Module()
        self.x.mlp.experts.w = nn.Parameter(torch.randn(3, 1, 1))
        self.x.mlp.experts.s = nn.Parameter(torch.randn(1))


class ToyModel:
    gather_numel = 3  # an all-gather per element or two

    def __init__(self, grid: ProcessGrid):
        self.cfg, self.grid = TrainConfig(), grid

    def build(self) -> nn.Module:
        torch.manual_seed(0)
        return Toy()

    def backward(self, model: nn.Module, step: int) -> float:
        """Gradients as after the sum: the same on every replica."""
        g = torch.Generator().manual_seed(step)
        for p in model.parameters():
            p.grad = torch.randn(p.shape, generator=g)
        return 0.0

    def dropped(self, model: nn.Module) -> list[str]:
        return ["b", "x.mlp.experts.w"]


def assert_same(ours: nn.Module, ref: nn.Module, what: str) -> None:
    for (name, p), (_, q) in zip(ours.named_parameters(), ref.named_parameters(), strict=True):
        assert torch.equal(p, q), f"{what}: {name} max |difference| {float((p - q).abs().max())}"


def compare_states(opt: ShardedAdamW, ours: nn.Module, ref_opt: torch.optim.AdamW, ref: nn.Module,
                   what: str) -> dict[str, int]:
    """`get` of every parameter (collective, in model order) against the AdamW's state, bitwise; returns the step
    count of each parameter."""
    steps = {}
    for (name, p), (_, q) in zip(ours.named_parameters(), ref.named_parameters(), strict=True):
        got, want = opt.get(p), ref_opt.state.get(q, {})
        assert set(got) == set(want), f"{what}: {name} slots {sorted(got)} != {sorted(want)}"
        for slot, value in want.items():
            assert got[slot].dtype == value.dtype and got[slot].shape == value.shape, (what, name, slot)
            assert torch.equal(got[slot].cpu(), value.cpu()), \
                f"{what}: {name} {slot} max |difference| {float((got[slot].cpu() - value.cpu()).abs().max())}"
        steps[name] = int(want["step"]) if want else 0
    return steps


def slice_numel(n: int, size: int, rank: int) -> int:
    """Elements of a flat space of n that rank `rank` of `size` holds as a contiguous slice of ceil(n / size)."""
    chunk = math.ceil(n / size)
    lo = min(rank * chunk, n)
    return min(lo + chunk, n) - lo


def check(case, grid: ProcessGrid) -> dict:
    cfg = case.cfg.optim
    ours, ref = case.build(), case.build()
    assert_same(ours, ref, "initial weights")
    opt, ref_opt = ShardedAdamW(ours, cfg, grid, case.gather_numel), build_optimizer(ref, cfg)
    assert not any(opt.get(p) for p in ours.parameters()), "state before the first step"
    result: dict = {"losses": [], "step_s": {"sharded": 0.0, "replicated": 0.0}}
    step = 0

    def train(opt: ShardedAdamW, steps: int) -> None:
        nonlocal step
        for _ in range(steps):
            for group in (*opt.param_groups, *ref_opt.param_groups):
                group["lr"] = lr_at(step)
            loss, want = case.backward(ours, step), case.backward(ref, step)
            assert loss == want, (step, loss, want)
            for name, o in (("sharded", opt), ("replicated", ref_opt)):
                start = time.perf_counter()
                o.step()
                result["step_s"][name] += time.perf_counter() - start
                o.zero_grad(set_to_none=True)
            assert_same(ours, ref, f"weights after step {step}")
            result["losses"].append(loss)
            step += 1

    train(opt, STEPS)
    compare_states(opt, ours, ref_opt, ref, "after training")

    # The state held: this rank's slice of each kind, and every element once over the world.
    expert = grid.ep > 1
    n_expert = sum(p.numel() for n, p in ours.named_parameters() if expert and is_expert_param(n))
    n_dense = sum(p.numel() for p in ours.parameters()) - n_expert
    held = opt.state_numel()
    assert held == 2 * (slice_numel(n_dense, grid.dp, grid.dp_rank) + slice_numel(n_expert, grid.edp, grid.edp_rank))
    assert held <= 2 * (math.ceil(n_dense / grid.dp) + math.ceil(n_expert / grid.edp))
    whole_model = 2 * (n_dense + grid.ep * n_expert)  # one process's AdamW: every expert
    total = torch.tensor([held])
    if grid.world > 1:
        dist.all_reduce(total)
    assert int(total) == whole_model, (int(total), whole_model)
    replica = sum(s[slot].numel() for s in ref_opt.state.values() for slot in MOMENTS)
    result.update(state_numel=held, replicated_numel=replica, model_state_numel=whole_model,
                  fraction_of_model=held / whole_model, fraction_of_replica=held / replica)

    # Every state into a fresh optimizer: the same states back, and the same next step.
    states = {p: opt.get(p) for p in ours.parameters()}
    opt = ShardedAdamW(ours, cfg, grid, case.gather_numel)
    opt.load(states, {})
    assert opt.state_numel() == held
    compare_states(opt, ours, ref_opt, ref, "after load")
    train(opt, 1)

    # Through the checkpoint's per-entry tensors: ours are the replicated AdamW's, and load back the same.
    weights, entries = owned_tensors(ours, opt, dense=True, experts=True)
    want_weights, want_entries = owned_tensors(ref, ref_opt, dense=True, experts=True)
    assert entries.keys() == want_entries.keys() and weights.keys() == want_weights.keys()
    assert all(torch.equal(entries[k], want_entries[k]) for k in entries), "checkpoint entries"
    with tempfile.TemporaryDirectory() as directory:
        save_file(weights, f"{directory}/model_rank00000.safetensors")
        save_file(entries, f"{directory}/optimizer_rank00000.safetensors")
        opt = ShardedAdamW(ours, cfg, grid, case.gather_numel)
        load_owned_tensors(Path(directory), ours, opt)
    compare_states(opt, ours, ref_opt, ref, "after load_owned_tensors")

    # Some states left out: those parameters start afresh (the AdamW's with their state deleted), the rest go on.
    states = {p: opt.get(p) for p in ours.parameters()}
    named, ref_named = dict(ours.named_parameters()), dict(ref.named_parameters())
    for name in case.dropped(ours):
        del states[named[name]], ref_opt.state[ref_named[name]]
    opt = ShardedAdamW(ours, cfg, grid, case.gather_numel)
    opt.load(states, {})
    train(opt, LOAD_STEPS)
    steps = compare_states(opt, ours, ref_opt, ref, "after a partial load")
    assert {steps[n] for n in case.dropped(ours)} == {LOAD_STEPS}
    assert set(steps.values()) == {LOAD_STEPS, STEPS + 1 + LOAD_STEPS}
    return result


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--ep", type=int, default=1)
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    env = init_gloo(60)
    grid = build_grid(env, 1, args.ep)
    start = time.perf_counter()
    mine = {"toy": check(ToyModel(grid), grid), "tiny": check(TinyModel(grid), grid)}
    mine["seconds"] = time.perf_counter() - start
    gathered = [None] * env.world_size
    dist.all_gather_object(gathered, mine)
    if env.rank == 0:
        args.out.write_text(json.dumps({"dp": grid.dp, "ep": grid.ep, "edp": grid.edp, "ranks": gathered}))
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
