"""The DeepSpeed engine over gloo in torchrun launches: ZeRO stages and pipeline stages against one process, and
save / resume / export through the command line."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

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


@pytest.mark.parametrize("nproc,layouts", [(2, ("zero1", "zero2-ep2", "zero3", "zero1-pp2")),
                                           (4, ("zero2-ep2",)), (4, ("zero1-pp2-ep2",))])
def test_layouts_match_one_process(tmp_path, nproc, layouts):
    """Four AdamW steps with clipping, token-weighted loss and balance losses. ds_check asserts on every rank:
    losses and aux losses within 1e-5 relative of the built-in engine in one process, and (except under ZeRO-3,
    which holds partitions) every parameter this rank holds within 1e-5 after each step. With pipeline stages, one
    step without balance losses moves a first-stage router by far more than that tolerance, so the matching
    parameters show the balance-loss gradients reached it. 4 processes: ZeRO-2 with ep=2 x edp=2 (expert gradients
    reduced over their replicas only), and pp=2 x ep=2."""
    results = ds_check(tmp_path, nproc, *layouts)
    for layout in layouts:
        r = results[layout]
        assert len(r["losses"]) == 4 and len(set(r["losses"])) > 1
        assert r["max_rel_diff"]["grad_norm"] < 1e-5, layout
        if "pp" in layout:
            assert min(r["first_stage_gate_shift_without_balance"].values()) > 1e-4


def test_zero2_and_zero3_resume_bitwise_export_and_start_from_imported_weights(tmp_path, cache_dir,
                                                                              transformers_ds):
    """ZeRO-2 with ep=2: bitwise resume, and an export (experts from both EP ranks) that transformers loads with the
    training weights' logits. That export imported as a weights-only checkpoint: the built-in engine, ZeRO-2 and
    ZeRO-3 (which loads it into gathered partitions) train from it alike, so ZeRO's fp32 master copies came from
    the loaded weights, not the initial ones; and ZeRO-3 resumes bitwise too."""
    args = ("trainer.max_steps=4", "checkpoint.every=2", "parallel.zero_stage=2", "parallel.ep=2")
    run = tmp_path / "run"
    out = _ok(run_pretrain(run, cache_dir, *args, nproc=2)).stdout
    assert "DeepSpeed ZeRO-2" in out
    ckpt = run / "checkpoints" / "step_00000002"
    assert (ckpt / "COMPLETE").exists() and list((ckpt / "deepspeed" / "state").glob("*optim_states.pt"))
    resumed = tmp_path / "resumed"
    _ok(run_pretrain(resumed, cache_dir, *args, f"checkpoint.resume={ckpt}", nproc=2))
    a, b = metrics(run), metrics(resumed)
    assert [(a[s]["loss"], a[s]["grad_norm"]) for s in (3, 4)] == [(b[s]["loss"], b[s]["grad_norm"]) for s in (3, 4)]
    assert a[4]["val_loss"] == b[4]["val_loss"]

    assert_export_matches(run / "hf", run / "checkpoints" / "step_00000004", transformers_ds)

    start = tmp_path / "start"
    subprocess.run([sys.executable, str(ROOT / "launch" / "convert.py"), "import", str(run / "hf"), str(start)],
                   check=True, capture_output=True, timeout=120)
    common = ("trainer.max_steps=2", "checkpoint.every=1", "checkpoint.export_hf=false", "optim.warmup_steps=0")
    for name, extra in (("builtin", ()), ("zero2", ("parallel.zero_stage=2",)), ("zero3", ("parallel.zero_stage=3",))):
        _ok(run_pretrain(tmp_path / name, cache_dir, *common, f"checkpoint.resume={start}", *extra, nproc=2))
    ref = metrics(tmp_path / "builtin")
    for name in ("zero2", "zero3"):
        m = metrics(tmp_path / name)
        for step in (1, 2):
            assert abs(m[step]["loss"] - ref[step]["loss"]) <= 1e-5 * ref[step]["loss"], (name, step)
    zero3 = tmp_path / "zero3"
    _ok(run_pretrain(tmp_path / "zero3-resumed", cache_dir, *common, "parallel.zero_stage=3",
                     f"checkpoint.resume={zero3 / 'checkpoints' / 'step_00000001'}", nproc=2))
    assert metrics(tmp_path / "zero3-resumed")[2]["loss"] == metrics(zero3)[2]["loss"]


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
