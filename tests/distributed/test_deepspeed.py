"""The DeepSpeed engine over gloo in torchrun launches: ZeRO stages and pipeline stages against one process, and
save / resume / export through the command line."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tests.trainer.test_pretrain_e2e import _ok, assert_export_matches, metrics, run_pretrain

ROOT = Path(__file__).resolve().parents[2]
pytest.importorskip("deepspeed")


def ds_check(tmp_path: Path, nproc: int, *layouts: str) -> dict:
    out = tmp_path / "result.json"
    proc = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
         str(ROOT / "tests" / "distributed" / "ds_check.py"), *layouts, "--out", str(out)],
        capture_output=True, text=True, timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stderr[-6000:]
    result = json.loads(out.read_text())
    print(json.dumps(result, indent=1))
    return result


@pytest.mark.parametrize("nproc,layouts", [(2, ("zero1", "zero0-ep2", "zero2-ep2", "zero3", "zero1-pp2",
                                                "zero1-pp2-ac")),
                                           (4, ("zero2-ep2", "zero1-pp2-ep2"))])
def test_layouts_match_one_process(tmp_path, nproc, layouts):
    """Four AdamW steps with clipping, token-weighted loss and balance losses. ds_check asserts on every rank:
    losses and aux losses within 1e-5 relative of the built-in engine in one process (measured at most 4.1e-8),
    gradient norms within 1e-5 relative (measured at most 4.5e-7), and (except under ZeRO-3, which holds
    partitions) every parameter this rank holds within 1e-5 absolute + 1e-4 relative after each step (measured at
    most 2.6e-6); without balance losses a first-stage router lands 2.0e-3 away (required: > 1e-4). With pipeline stages, one
    step without balance losses moves a first-stage router by far more than that tolerance, so the matching
    parameters show the balance-loss gradients reached it. 4 processes: ZeRO-2 with ep=2 x edp=2 (expert gradients
    reduced over their replicas only), and pp=2 x ep=2. ZeRO-0 with ep=2 clips by our global norm, not DeepSpeed's;
    `-ac` runs the pipeline stages with activation checkpointing."""
    results = ds_check(tmp_path, nproc, *layouts)
    for layout in layouts:
        r = results[layout]
        assert len(r["losses"]) == 4 and len(set(r["losses"])) > 1
        assert r["max_rel_diff"]["grad_norm"] < 1e-5, layout
        if "pp" in layout:
            assert min(r["first_stage_gate_shift_without_balance"].values()) > 1e-4


def test_zero2_and_zero3_train_like_the_builtin_engine_from_given_weights_and_resume_bitwise(
        tmp_path, cache_dir, transformers_ds):
    """From a weights-only checkpoint (what `convert.py import` writes), ZeRO-2 x ep=2 and ZeRO-3 have the built-in
    engine's losses step for step (within 1e-5 relative): ZeRO's fp32 master copies were taken from the loaded weights (ZeRO-3 loads them
    into gathered partitions), not from the initial ones. Both DeepSpeed runs resume bitwise, and the
    ZeRO-2 export (experts from both EP ranks) loads in transformers with the training weights' logits."""
    from model import CausalLM
    from trainer.checkpoint import write_weights_only
    from trainer.presets import model_preset

    torch.manual_seed(7)
    start = write_weights_only(tmp_path / "start", CausalLM(model_preset("tiny_lite")), {})
    common = ("trainer.max_steps=4", "checkpoint.every=2", "optim.warmup_steps=0")
    runs = {"builtin": (), "zero2": ("parallel.zero_stage=2", "parallel.ep=2"), "zero3": ("parallel.zero_stage=3",)}
    for name, extra in runs.items():
        out = _ok(run_pretrain(tmp_path / name, cache_dir, *common, f"checkpoint.resume={start}", *extra,
                               nproc=2)).stdout
        assert f"resumed from {start} at step 0" in out
    ref = metrics(tmp_path / "builtin")
    ckpt = tmp_path / "builtin" / "checkpoints" / "step_00000002"
    assert (ckpt / "data_rank00000.json").exists() and (ckpt / "data_rank00001.json").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["builtin", "start", "zero2", "zero3"]  # rank 1 wrote none
    for name in runs:
        m = metrics(tmp_path / name)
        for step in (1, 2, 3, 4):
            assert abs(m[step]["loss"] - ref[step]["loss"]) <= 1e-5 * ref[step]["loss"], (name, step)
        ckpt = tmp_path / name / "checkpoints" / "step_00000002"
        if name == "builtin":
            continue  # its bitwise resume is tested with one process and across expert layouts elsewhere
        assert list((ckpt / "deepspeed" / "state").glob("*optim_states.pt"))
        resumed = tmp_path / f"{name}-resumed"
        _ok(run_pretrain(resumed, cache_dir, *common, *runs[name], f"checkpoint.resume={ckpt}",
                         "checkpoint.export_hf=false", nproc=2))
        a, b = metrics(tmp_path / name), metrics(resumed)
        assert [(a[s]["loss"], a[s]["grad_norm"]) for s in (3, 4)] == [(b[s]["loss"], b[s]["grad_norm"]) for s in (3, 4)]
        assert a[4]["val_loss"] == b[4]["val_loss"]
    assert_export_matches(tmp_path / "zero2" / "hf", tmp_path / "zero2" / "checkpoints" / "step_00000004",
                          transformers_ds)


def test_pipeline_with_experts_resumes_bitwise_exports_and_guards_its_layout(tmp_path, cache_dir, transformers_ds):
    """pp=2 x ep=2 on 4 processes through the command line: bitwise resume, an export written by stage and EP rank
    that transformers loads with the training weights' logits, and a resume under another layout refused (exit 2,
    naming the key) unless the optimizer and data position are reset."""
    args = ("trainer.max_steps=4", "checkpoint.every=2", "parallel.pp=2", "parallel.ep=2")
    run = tmp_path / "run"
    out = _ok(run_pretrain(run, cache_dir, *args, nproc=4)).stdout
    assert "DeepSpeed ZeRO-1" in out and "pipeline 2 x data-parallel 2 x expert-parallel 2" in out
    ckpt = run / "checkpoints" / "step_00000002"
    assert len(list(ckpt.glob("model_rank*.safetensors"))) == 4  # each (stage, EP rank) its own entries
    resumed = tmp_path / "resumed"
    _ok(run_pretrain(resumed, cache_dir, *args, f"checkpoint.resume={ckpt}", nproc=4))
    a, b = metrics(run), metrics(resumed)
    assert [(a[s]["loss"], a[s]["grad_norm"]) for s in (3, 4)] == [(b[s]["loss"], b[s]["grad_norm"]) for s in (3, 4)]
    assert a[4]["val_loss"] == b[4]["val_loss"] and a[4]["aux_loss"] == b[4]["aux_loss"] > 0

    assert_export_matches(run / "hf", run / "checkpoints" / "step_00000004", transformers_ds)

    # One process, built-in engine: DeepSpeed's partitions do not fit; refused before anything starts.
    refused = run_pretrain(tmp_path / "one", cache_dir, "trainer.max_steps=5", f"checkpoint.resume={ckpt}")
    assert refused.returncode == 2 and "checkpoint.optimizer_resume=reset" in refused.stderr
    out = _ok(run_pretrain(tmp_path / "one", cache_dir, "trainer.max_steps=3", f"checkpoint.resume={ckpt}",
                           "checkpoint.optimizer_resume=reset", "checkpoint.data_resume=reset")).stdout
    assert "resumed from" in out and metrics(tmp_path / "one")[3]["loss"] < a[1]["loss"]
