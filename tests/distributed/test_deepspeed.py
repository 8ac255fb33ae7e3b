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

from tests.trainer.test_pretrain_e2e import _ok, metrics, run_pretrain

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


def test_zero2_resumes_bitwise_and_exports_for_transformers(tmp_path, transformers_ds):
    cache = tmp_path / "cache"
    args = ("trainer.max_steps=4", "checkpoint.every=2", "parallel.zero_stage=2", "parallel.ep=2")
    run = tmp_path / "run"
    out = _ok(run_pretrain(run, cache, *args, nproc=2)).stdout
    assert "DeepSpeed ZeRO-2" in out
    ckpt = run / "checkpoints" / "step_00000002"
    assert (ckpt / "COMPLETE").exists() and list((ckpt / "deepspeed" / "state").glob("*optim_states.pt"))
    resumed = tmp_path / "resumed"
    _ok(run_pretrain(resumed, cache, *args, f"checkpoint.resume={ckpt}", nproc=2))
    a, b = metrics(run), metrics(resumed)
    assert [(a[s]["loss"], a[s]["grad_norm"]) for s in (3, 4)] == [(b[s]["loss"], b[s]["grad_norm"]) for s in (3, 4)]
    assert a[4]["val_loss"] == b[4]["val_loss"]

    # The export (experts gathered from both EP ranks) loads in transformers with the training model's logits.
    from model import CausalLM
    from model.hf import load_config
    from trainer.checkpoint import load_model_weights
    _, model_cls = transformers_ds
    ours = load_model_weights(run / "checkpoints" / "step_00000004", CausalLM(load_config(run / "hf"))).eval()
    theirs = model_cls.from_pretrained(run / "hf").float().eval()
    ids = torch.randint(0, 4096, (2, 24))
    with torch.no_grad():
        assert (ours(ids).logits - theirs(ids).logits).abs().max() < 1e-4


def test_zero3_resumes_bitwise_and_exports_gathered_weights(tmp_path):
    cache = tmp_path / "cache"
    args = ("trainer.max_steps=4", "checkpoint.every=2", "parallel.zero_stage=3")
    run = tmp_path / "run"
    _ok(run_pretrain(run, cache, *args, nproc=2))
    resumed = tmp_path / "resumed"
    _ok(run_pretrain(resumed, cache, *args, f"checkpoint.resume={run / 'checkpoints' / 'step_00000002'}", nproc=2))
    a, b = metrics(run), metrics(resumed)
    assert [(a[s]["loss"], a[s]["grad_norm"]) for s in (3, 4)] == [(b[s]["loss"], b[s]["grad_norm"]) for s in (3, 4)]
    # Partitioned weights were gathered for the weight files and the export: whole tensors, equal to each other.
    from model import CausalLM
    from model.hf import load_config, load_pretrained
    from trainer.checkpoint import load_model_weights
    ours = load_model_weights(run / "checkpoints" / "step_00000004", CausalLM(load_config(run / "hf")))
    exported = load_pretrained(run / "hf")
    for (name, p), (_, q) in zip(ours.named_parameters(), exported.named_parameters()):
        assert p.numel() > 0 and torch.equal(p, q), name


def test_pipeline_with_experts_resumes_bitwise_exports_and_guards_its_layout(tmp_path, transformers_ds):
    """pp=2 x ep=2 on 4 processes through the command line: bitwise resume, an export written by stage and EP rank
    that transformers loads with the training weights' logits, and a resume under another layout refused (exit 2,
    naming the key) unless the optimizer and data position are reset."""
    cache = tmp_path / "cache"
    args = ("trainer.max_steps=4", "checkpoint.every=2", "parallel.pp=2", "parallel.ep=2")
    run = tmp_path / "run"
    out = _ok(run_pretrain(run, cache, *args, nproc=4)).stdout
    assert "DeepSpeed ZeRO-1" in out and "pipeline 2 x data-parallel 2 x expert-parallel 2" in out
    ckpt = run / "checkpoints" / "step_00000002"
    assert len(list(ckpt.glob("model_rank*.safetensors"))) == 4  # each (stage, EP rank) its own entries
    resumed = tmp_path / "resumed"
    _ok(run_pretrain(resumed, cache, *args, f"checkpoint.resume={ckpt}", nproc=4))
    a, b = metrics(run), metrics(resumed)
    assert [(a[s]["loss"], a[s]["grad_norm"]) for s in (3, 4)] == [(b[s]["loss"], b[s]["grad_norm"]) for s in (3, 4)]
    assert a[4]["val_loss"] == b[4]["val_loss"] and a[4]["aux_loss"] == b[4]["aux_loss"] > 0

    from model import CausalLM
    from model.hf import load_config
    from trainer.checkpoint import load_model_weights
    _, model_cls = transformers_ds
    ours = load_model_weights(run / "checkpoints" / "step_00000004", CausalLM(load_config(run / "hf"))).eval()
    theirs = model_cls.from_pretrained(run / "hf").float().eval()
    ids = torch.randint(0, 4096, (2, 24))
    with torch.no_grad():
        assert (ours(ids).logits - theirs(ids).logits).abs().max() < 1e-4

    # One process, built-in engine: DeepSpeed's partitions do not fit; refused before anything starts.
    refused = run_pretrain(tmp_path / "one", cache, "trainer.max_steps=5", f"checkpoint.resume={ckpt}")
    assert refused.returncode == 2 and "checkpoint.optimizer_resume=reset" in refused.stderr
    out = _ok(run_pretrain(tmp_path / "one", cache, "trainer.max_steps=3", f"checkpoint.resume={ckpt}",
                           "checkpoint.optimizer_resume=reset", "checkpoint.data_resume=reset")).stdout
    assert "resumed from" in out and metrics(tmp_path / "one")[3]["loss"] < a[1]["loss"]


def test_a_weights_only_start_trains_the_same_under_zero2(tmp_path):
    """From an imported (weights-only) checkpoint, ZeRO-2 must take its fp32 master copies from the loaded weights,
    not the initial ones: its losses match the built-in engine's over three steps."""
    cache = tmp_path / "cache"
    _ok(run_pretrain(tmp_path / "src", cache, "trainer.max_steps=2", "checkpoint.export_hf=false"))
    start = tmp_path / "start"
    subprocess.run([sys.executable, str(ROOT / "launch" / "convert.py"), "export",
                    str(tmp_path / "src" / "checkpoints" / "step_00000002"), str(tmp_path / "hf")],
                   check=True, capture_output=True, timeout=120)
    subprocess.run([sys.executable, str(ROOT / "launch" / "convert.py"), "import", str(tmp_path / "hf"), str(start)],
                   check=True, capture_output=True, timeout=120)
    common = ("trainer.max_steps=3", f"checkpoint.resume={start}", "checkpoint.export_hf=false",
              "optim.warmup_steps=0")
    _ok(run_pretrain(tmp_path / "builtin", cache, *common, nproc=2))
    _ok(run_pretrain(tmp_path / "zero2", cache, *common, "parallel.zero_stage=2", nproc=2))
    a, b = metrics(tmp_path / "builtin"), metrics(tmp_path / "zero2")
    for step in (1, 2, 3):
        assert abs(a[step]["loss"] - b[step]["loss"]) <= 1e-5 * a[step]["loss"], step
