"""The built-in engine's step: gradient sums overlapped with the last backward (trainer/grad_sync.py), one autocast
region per step, and each micro-batch's logits freed before the next forward.

The distributed checks run this file under torchrun over gloo (short process-group timeout, outer timeout): every
rank trains its own data, so routing differs between ranks, and checks its own gradients and parameters against
today's path (all backwards, then `expert_parallel.reduce_gradients`). Any mismatch raises (non-zero exit); rank 0
writes what it measured to --out.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import weakref
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from model import CausalLM, next_token_labels  # noqa: E402
from trainer.config import TrainConfig  # noqa: E402
from trainer.distributed import DistEnv  # noqa: E402
from trainer.grad_sync import GradReducer  # noqa: E402
from trainer.layout import ProcessGrid  # noqa: E402
from trainer.presets import model_preset  # noqa: E402

MICRO, S, VOCAB = 2, 16, 512


def small_config():
    return model_preset("tiny", num_hidden_layers=3, vocab_size=VOCAB)


def rank_batches(seed: int, n: int) -> list[dict]:
    """`n` micro-batches of MICRO sequences; each rank passes its own seed, so routing differs between ranks."""
    ids = torch.randint(0, VOCAB, (n * MICRO, S), generator=torch.Generator().manual_seed(seed))
    labels = next_token_labels(ids)
    labels[0, : 3 + seed % 5] = -100  # unequal supervised counts
    return [{"input_ids": ids[i:i + MICRO], "labels": labels[i:i + MICRO]} for i in range(0, n * MICRO, MICRO)]


# ------------------------------------------------------------------------------------------ under torchrun
def _twin_models(grid, esft: bool) -> tuple[CausalLM, CausalLM]:
    """Two identical copies of this rank's model. Each gets extra dense parameters that some ranks never use
    (`skip`: only rank 0; `early`: every rank in the first micro-batch, only rank 0 in the last), and with edp > 1
    an expert one only each edp group's first replica uses, so buckets must be flushed with zeros or with gradients
    of earlier micro-batches. `esft`: attention and routers train, plus experts chosen differently on each EP rank
    (a rank may hold no trainable copy in a layer), everything else frozen."""
    from trainer.esft import apply_trainable
    from trainer.expert_parallel import attach_dispatchers
    config = small_config()
    models = []
    for _ in range(2):
        torch.manual_seed(0)
        model = CausalLM(config, expert_shard=grid.expert_shard(config.n_routed_experts) if grid.ep > 1 else None)
        if grid.ep > 1:
            attach_dispatchers(model, grid)
        layers = model.model.layers
        layers[1].skip = torch.nn.Parameter(torch.linspace(-1, 1, 3000))
        layers[2].early = torch.nn.Parameter(torch.linspace(1, 2, 700))
        layers[2].mlp.experts.skip = torch.nn.Parameter(torch.linspace(0, 1, 900))
        if esft:
            apply_trainable(model, [r"self_attn\.", r"mlp\.gate\.", r"\.skip$", r"\.early$"],
                            {1: [0, 1, 5], 2: [9, 12]})
        model.train()
        models.append(model)
    return models[0], models[1]


def _objective(model: CausalLM, batch: dict, grid, i: int) -> torch.Tensor:
    out = model(batch["input_ids"], labels=batch["labels"])
    loss = out.loss + out.aux_loss
    layers = model.model.layers
    if grid.rank == 0:
        loss = loss + 1e-3 * layers[1].skip.square().sum()
    if i == 0 or grid.rank == 0:
        loss = loss + 1e-3 * layers[2].early.square().sum() * (i + 1)
    if grid.edp_rank == 0 and grid.edp > 1:
        loss = loss + 1e-3 * layers[2].mlp.experts.skip.sum()
    return loss


def check_reducer(grid, esft: bool, steps: int = 2) -> dict:
    """GradReducer (small buckets, so there are many) against reduce_gradients: every gradient bitwise over 2 ranks
    (over more, to rounding: the summation order may follow the bucket layout), and buckets launched
    before the backward's last gradient was accumulated."""
    from trainer.expert_parallel import reduce_gradients
    ref, new = _twin_models(grid, esft)
    reducer = GradReducer(new, grid, bucket_bytes=64 * 2**10)
    seen: list[int] = []  # reducer.launched each time a gradient of the last backward is accumulated
    for p in (p for p in new.parameters() if p.requires_grad):
        p.register_post_accumulate_grad_hook(lambda p: seen.append(reducer.launched) if reducer.armed else None)
    report = {"buckets": len(reducer.buckets), "max_abs_diff": 0.0, "bitwise": True, "launched_before_last": []}
    for step in range(steps):
        if step == 1:  # what trains changes between steps: the reducer rebuilds its buckets
            for m in (ref, new):
                m.model.layers[1].skip.requires_grad_(False)
        batches = rank_batches(100 * step + grid.rank, 3)
        for i, batch in enumerate(batches):
            _objective(ref, batch, grid, i).backward()
        reduce_gradients(ref, grid)
        seen.clear()
        for i, batch in enumerate(batches):
            last = i == len(batches) - 1
            if last:
                reducer.arm()
            _objective(new, batch, grid, i).backward()
            if last:
                in_backward = reducer.launched
                reducer.launch_rest()
        reducer.finish()
        assert len(seen) > 2 and seen[-2] >= 1 and in_backward >= 1, (seen, in_backward)
        report["launched_before_last"].append([seen[-2], len(reducer.buckets)])
        for (name, a), (_, b) in zip(ref.named_parameters(), new.named_parameters(), strict=True):
            assert (a.grad is None) == (b.grad is None), name
            if a.grad is None:
                continue
            diff = float((a.grad - b.grad).abs().max())
            report["max_abs_diff"] = max(report["max_abs_diff"], diff)
            report["bitwise"] &= torch.equal(a.grad, b.grad)
            if grid.dp == 2:
                assert torch.equal(a.grad, b.grad), (name, diff)
            else:
                scale = float(a.grad.abs().max())  # rounding of partial sums: relative to the tensor's scale
                torch.testing.assert_close(b.grad, a.grad, rtol=1e-6, atol=1e-5 * scale,
                                           msg=lambda m, n=name: f"{n}: {m}")
        for m in (ref, new):
            m.zero_grad(set_to_none=True)
    return report


class _ReduceAfterBackward:
    """Today's path, as the reference engine's reducer: nothing during backward, reduce_gradients at the end."""

    def __init__(self, model, grid):
        self.model, self.grid = model, grid

    def arm(self):
        pass

    def launch_rest(self):
        pass

    def finish(self):
        from trainer.expert_parallel import reduce_gradients
        reduce_gradients(self.model, self.grid)


def check_engine(grid, env, esft: bool, steps: int = 2) -> dict:
    """BuiltinEngine steps against the same engine reducing after the backwards: parameters bitwise over 2 ranks
    (over more, within 1e-5 absolute + 1e-4 relative after 2 AdamW steps)."""
    from trainer.build import build_model
    from trainer.engines import build_engine
    from trainer.esft import apply_trainable
    cfg = TrainConfig()
    cfg.model = small_config()
    cfg.parallel.ep = grid.ep
    # eps 1e-6: AdamW's first steps move a weight by about lr * sign(grad); over 4 ranks, where the sums may round
    # differently, a larger eps keeps a rounding difference on a tiny gradient from moving a weight by lr.
    cfg.optim.warmup_steps, cfg.optim.lr, cfg.optim.eps = 0, 1e-3, 1e-6
    engines = []
    for _ in range(2):
        torch.manual_seed(0)
        model = build_model(cfg, grid, torch.device("cpu"))
        if esft:
            apply_trainable(model, [r"self_attn\.", r"mlp\.gate\."], {1: [0, 1, 5], 2: [9, 12]})
        engines.append(build_engine(model, cfg, grid, env, torch.device("cpu"), "fp32"))
    ref, new = engines
    ref.grad_sync = _ReduceAfterBackward(ref.model, grid)
    report = {"max_abs_diff": 0.0, "bitwise": True}
    for step in range(steps):
        batches = rank_batches(7 + 100 * step + grid.rank, 3)
        a, b = ref.step(step, batches), new.step(step, batches)
        if grid.dp == 2:
            assert a.loss == b.loss and a.grad_norm == b.grad_norm, (a, b)
        else:
            assert abs(a.loss - b.loss) <= 1e-5 * a.loss and abs(a.grad_norm - b.grad_norm) <= 1e-4 * a.grad_norm
    for (name, p), (_, q) in zip(ref.model.named_parameters(), new.model.named_parameters(), strict=True):
        report["max_abs_diff"] = max(report["max_abs_diff"], float((p - q).detach().abs().max()))
        report["bitwise"] &= torch.equal(p, q)
        if grid.dp == 2:
            assert torch.equal(p, q), name
        else:
            torch.testing.assert_close(q, p, rtol=1e-4, atol=1e-5, msg=lambda m, n=name: f"{n}: {m}")
    return report


def main() -> None:
    import torch.distributed as dist

    from tests.distributed.torchrun import init_gloo
    from trainer.expert_parallel import build_grid
    p = argparse.ArgumentParser()
    p.add_argument("--eps", type=int, nargs="+", required=True)
    p.add_argument("--out", type=Path, required=True)
    args = p.parse_args()
    env = init_gloo(60)
    results = {}
    for ep in args.eps:
        grid = build_grid(env, pp=1, ep=ep)
        for esft in (False, True) if ep > 1 else (False,):
            key = f"ep{ep}" + ("_esft" if esft else "")
            results[key] = {"reducer": check_reducer(grid, esft), "engine": check_engine(grid, env, esft)}
    if env.rank == 0:
        args.out.write_text(json.dumps(results, indent=1))
    dist.barrier()
    dist.destroy_process_group()


# ------------------------------------------------------------------------------------------ pytest
def _torchrun(tmp_path, nproc: int, eps: list[int]) -> dict:
    out = tmp_path / "result.json"
    proc = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}", __file__,
         "--eps", *map(str, eps), "--out", str(out)],
        capture_output=True, text=True, timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stderr[-6000:]
    result = json.loads(out.read_text())
    print(json.dumps(result, indent=1))
    return result


def test_overlapped_sums_equal_reduce_gradients_bitwise_over_two_ranks(tmp_path):
    """2 ranks, ep 1 (everything over dp) and ep 2 (experts sharded, with and without ESFT choosing different experts
    on each rank): buckets go out during the last backward, and gradients and parameters are bitwise today's."""
    result = _torchrun(tmp_path, 2, [1, 2])
    assert set(result) == {"ep1", "ep2", "ep2_esft"}
    for case in result.values():
        assert case["reducer"]["bitwise"] and case["engine"]["bitwise"]
        assert all(before >= 1 for before, _ in case["reducer"]["launched_before_last"])


def test_expert_sums_over_the_expert_data_parallel_group(tmp_path):
    """4 ranks, ep 2: dense sums over 4 ranks, expert sums over their 2 replicas (the expert buckets exist only
    there). Over more than 2 ranks the order of a sum may follow the bucket layout: equal to rounding."""
    result = _torchrun(tmp_path, 4, [2])
    for case in result.values():
        assert case["reducer"]["max_abs_diff"] < 1e-6
        assert all(before >= 1 for before, _ in case["reducer"]["launched_before_last"])


def _engine(precision: str = "fp32"):
    from trainer.engines import build_engine
    cfg = TrainConfig()
    cfg.model = small_config()
    cfg.optim.warmup_steps = 0
    torch.manual_seed(0)
    model = CausalLM(cfg.model)
    model.train()
    return build_engine(model, cfg, ProcessGrid(), DistEnv(), torch.device("cpu"), precision)


def test_each_micro_batch_logits_are_freed_before_the_next_forward():
    engine = _engine()
    previous: list[weakref.ref] = []
    alive_at_forward = []
    forward = engine.forward

    def tracked(**inputs):
        alive_at_forward.append([ref() is not None for ref in previous])
        out = forward(**inputs)
        previous.extend([weakref.ref(out.logits), weakref.ref(out.loss)])
        return out

    engine.forward = tracked
    result = engine.step(0, rank_batches(3, 3))
    assert len(alive_at_forward) == 3 and not any(any(alive) for alive in alive_at_forward), alive_at_forward
    assert result.loss > 0 and not result.skipped


def test_bf16_autocast_casts_each_weight_once_per_step():
    """Three micro-batches, one autocast region: the lm_head weight is cast to bf16 once (it was once per micro-batch),
    and backward runs with autocast off."""
    from torch.utils._python_dispatch import TorchDispatchMode
    engine = _engine("bf16")
    head = engine.model.lm_head.weight

    class CountCasts(TorchDispatchMode):
        casts = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            kwargs = kwargs or {}
            if func is torch.ops.aten._to_copy.default and args[0] is head \
                    and kwargs.get("dtype") == torch.bfloat16:
                CountCasts.casts += 1
            return func(*args, **kwargs)

    autocast_in_backward = []
    engine.model.lm_head.weight.register_post_accumulate_grad_hook(
        lambda p: autocast_in_backward.append(torch.is_autocast_enabled("cpu")))
    with CountCasts():
        result = engine.step(0, rank_batches(5, 3))
    assert CountCasts.casts == 1, CountCasts.casts
    assert autocast_in_backward == [False] * 3
    assert not result.skipped and head.grad is None  # the update ran and the gradients were released


def test_one_process_fills_missing_gradients_with_zeros():
    """No group to sum over: no buckets, but a parameter that trains and got no gradient gets zeros (the optimizer
    then treats every rank and layout alike), as reduce_gradients does."""
    model = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.Linear(4, 4))
    model[1].weight.requires_grad_(False)
    reducer = GradReducer(model, ProcessGrid())
    model[0](torch.randn(2, 4)).sum().backward()
    reducer.finish()
    assert reducer.buckets == []
    assert torch.equal(model[1].bias.grad, torch.zeros(4)) and model[1].weight.grad is None
    assert model[0].weight.grad.abs().sum() > 0


if __name__ == "__main__":
    main()
