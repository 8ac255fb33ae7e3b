"""The torch.distributed.pipelining engine over gloo in torchrun launches: every schedule against one process, with
expert parallelism, ZeRO-1, activation checkpointing and token dropping; and save / resume through the command
line, across engines."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest

from tests.distributed.torchrun import run_check
from tests.trainer.test_pretrain_e2e import _ok, assert_export_matches, metrics, run_pretrain


def pp_check(tmp_path: Path, nproc: int, *layouts: str) -> dict:
    result = run_check("pp_check.py", nproc, *layouts, out=tmp_path / "result.json")
    print(json.dumps({k: {"max_rel_diff": v["max_rel_diff"], "engine": v["engine"]} for k, v in result.items()}))
    return result


@pytest.mark.parametrize("nproc,layouts", [
    (2, ("zbv", "interleaved_1f1b", "1f1b", "dualpipev", "interleaved_zb-ac-drop-docs")),
    (4, ("zbv-zero1", "zbv-ep2-zero1", "interleaved_1f1b-ep2-drop")),
])
def test_schedules_match_one_process(tmp_path, nproc, layouts):
    """pp=2 (4 virtual stages under the interleaved and V schedules, on the 4-layer tiny model) over four AdamW
    steps with clipping, token-weighted loss and balance losses. pp_check asserts on every rank: losses, balance
    losses and gradient norms within 1e-5 relative of the built-in engine in one process, every parameter the rank
    holds after every step within ds_check's tolerance, and every router moved by the balance losses by what one
    process moves it (within 1e-5), so their gradients reached every stage through each schedule's backward (split
    into input and weight gradients under zbv, interleaved_zb and dualpipev). 4 processes: pp=2 x dp=2 with ZeRO-1
    (each rank holds half its stage's optimizer state, measured by pp_check) and pp=2 x ep=2."""
    results = pp_check(tmp_path, nproc, *layouts)
    for layout in layouts:
        r = results[layout]
        assert len(r["losses"]) == 4 and len(set(r["losses"])) > 1
        assert r["max_rel_diff"]["loss"] < 1e-5 and r["max_rel_diff"]["grad_norm"] < 1e-5, layout
        assert len(r["router_shift_without_balance"]) == 3, layout  # the tiny model's three MoE layers
        if layout == "zbv-zero1":  # pp=2 x dp=2: each rank holds half its stage's AdamW moments (one slice rounded up)
            for rank in r["zero1"]["per_rank"]:
                assert rank["replicated"] / 2 <= rank["held"] <= rank["replicated"] / 2 + 2, rank


def _tensors(path: Path) -> dict:
    from safetensors.torch import load_file
    out = {}
    for file in sorted(path.glob("model_rank*.safetensors")):
        out.update(load_file(file))
    return out


def test_zbv_checkpoint_resumes_bitwise_and_under_deepspeed_and_builtin(tmp_path, cache_dir, transformers_ds):
    """A zbv run (pp=2, ZeRO-1 by default) through the command line, checkpoints at steps 2 and 4. Resumed from step
    2 under zbv: steps 3-4 and the step-4 weights and optimizer files are bitwise the uninterrupted run's. The same
    step-2 checkpoint resumed under DeepSpeed's pipeline (2 processes) and by the built-in engine (1 process), with
    the optimizer state from the per-parameter files: the step-4 weights within 1e-5 of the zbv run's (measured 2.5e-6
    under DeepSpeed, whose clipping uses its own norm) and the losses within 1e-6 relative (measured 0). The zbv run's
    export (each pipeline rank writing its virtual stages' tensors) loads in transformers with our logits."""
    args = ("trainer.max_steps=4", "checkpoint.every=2", "optim.warmup_steps=0", "parallel.pp=2")
    first = tmp_path / "uninterrupted"
    _ok(run_pretrain(first, cache_dir, *args, "parallel.pp_schedule=zbv", nproc=2))
    saved = first / "checkpoints" / "step_00000002"
    runs = {"zbv": (("parallel.pp_schedule=zbv",), 2)}
    if importlib.util.find_spec("deepspeed") is not None:
        runs["deepspeed"] = (("parallel.pp_schedule=deepspeed",), 2)
    runs["builtin"] = (("parallel.pp=1",), 1)
    want, want_weights = metrics(first), _tensors(first / "checkpoints" / "step_00000004")
    assert_export_matches(first / "hf", first / "checkpoints" / "step_00000004", transformers_ds)
    for name, (extra, nproc) in runs.items():
        run = tmp_path / name
        _ok(run_pretrain(run, cache_dir, *args, *extra, f"checkpoint.resume={saved}", nproc=nproc))
        got = metrics(run)
        assert sorted(got) == [3, 4], (name, sorted(got))
        weights = _tensors(run / "checkpoints" / "step_00000004")
        assert weights.keys() == want_weights.keys(), name
        worst = max(float((weights[k] - want_weights[k]).abs().max()) for k in weights)
        print(name, "largest weight difference after 2 resumed steps", worst,
              "losses", [got[s]["loss"] for s in (3, 4)], "vs", [want[s]["loss"] for s in (3, 4)])
        if name == "zbv":
            assert got[4]["val_loss"] == want[4]["val_loss"]
            assert [got[s]["loss"] for s in (3, 4)] == [want[s]["loss"] for s in (3, 4)]
            assert [got[s]["grad_norm"] for s in (3, 4)] == [want[s]["grad_norm"] for s in (3, 4)]
            assert worst == 0.0
            digests = [json.loads((r / "checkpoints" / "step_00000004" / "integrity.json").read_text())["files"]
                       for r in (first, run)]
            for file in ("model_rank00000.safetensors", "model_rank00001.safetensors",
                         "optimizer_rank00000.safetensors", "optimizer_rank00001.safetensors"):
                assert digests[0][file]["sha256"] == digests[1][file]["sha256"], file
        # Validation runs stage after stage on the pipeline (its own forward-only pass): the same held-out loss
        # after step 3's update as the engine that resumed.
        assert abs(got[3]["val_loss"] - want[3]["val_loss"]) <= 1e-6 * want[3]["val_loss"], name
        if name != "zbv":
            assert worst <= 1e-5, (name, worst)  # ds_check's absolute tolerance (DeepSpeed clips by its own norm)
            for s in (3, 4):
                assert abs(got[s]["loss"] - want[s]["loss"]) <= 1e-6 * want[s]["loss"], (name, s)

