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


def ds_check(tmp_path: Path, nproc: int, *args: str) -> dict:
    out = tmp_path / "result.json"
    proc = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
         str(ROOT / "tests" / "distributed" / "ds_check.py"), *args, "--out", str(out)],
        capture_output=True, text=True, timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stderr[-6000:]
    result = json.loads(out.read_text())
    print(json.dumps(result, indent=1))
    return result


@pytest.mark.parametrize("zero,ep", [(1, 1), (2, 2), (3, 1)])
def test_zero_stages_match_one_process(tmp_path, zero, ep):
    """Four AdamW steps with clipping: losses within 1e-5 relative of the built-in engine in one process (checked
    on every rank inside ds_check), gradient norms within 1e-5 relative."""
    result = ds_check(tmp_path, 2, "--zero", str(zero), "--ep", str(ep))
    assert len(result["losses"]) == 4 and result["losses"] != [result["losses"][0]] * 4
    assert result["max_rel_diff"]["grad_norm"] < 1e-5


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
