"""launch/pretrain.py end to end, in subprocesses like a user runs it: metrics and exports, bitwise resume,
non-finite losses, two processes under torchrun, and config errors before anything starts (faults: tests/faults)."""

from __future__ import annotations

import json
import os
import stat
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[2]
PRETRAIN = str(ROOT / "launch" / "pretrain.py")


def run_pretrain(run_dir: Path, cache: Path, *overrides: str, nproc: int = 1, fault: str | None = None,
                 timeout: int = 300) -> subprocess.CompletedProcess:
    args = ["experiment=smoke", f"hydra.run.dir={run_dir}", f"data.cache_dir={cache}", "logging.wandb=disabled",
            *overrides]
    if nproc > 1:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}", PRETRAIN,
               *args, "parallel.timeout_s=60"]
    else:
        cmd = [sys.executable, PRETRAIN, *args]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "WANDB_MODE": "disabled"}
    env.pop("LATENTMOE_FAULT", None)
    if fault:
        env["LATENTMOE_FAULT"] = fault
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env, cwd=run_dir.parent)


def metrics(run_dir: Path) -> dict[int, dict]:
    rows = map(json.loads, (run_dir / "metrics.jsonl").read_text().splitlines())
    return {m["step"]: m for m in rows if "step" in m}  # not the `resumed_from` rows of relaunches


def assert_export_matches(hf_dir: Path, checkpoint: Path, transformers_ds) -> None:
    """transformers loads the export with the same logits as our model loaded from the training checkpoint (fp32,
    within 1e-4 absolute)."""
    from model import CausalLM
    from model.hf import load_config
    from trainer.checkpoint import load_model_weights
    _, model_cls = transformers_ds
    ours = load_model_weights(checkpoint, CausalLM(load_config(hf_dir))).eval()
    theirs = model_cls.from_pretrained(hf_dir).float().eval()
    ids = torch.randint(0, ours.config.vocab_size, (2, 24))
    with torch.no_grad():
        assert (ours(ids).logits - theirs(ids).logits).abs().max() < 1e-4


def _ok(proc: subprocess.CompletedProcess) -> subprocess.CompletedProcess:
    assert proc.returncode == 0, f"exit {proc.returncode}\n{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}"
    return proc


@pytest.fixture(scope="module")
def straight(tmp_path_factory, cache_dir) -> tuple[Path, str]:
    """One uninterrupted smoke run (6 steps, checkpoints at 3 and 6), shared by the tests that compare against it:
    (run directory, its stdout)."""
    run = tmp_path_factory.mktemp("straight") / "run"
    return run, _ok(run_pretrain(run, cache_dir)).stdout


def test_smoke_run_logs_checkpoints_and_exports(straight, transformers_ds):
    run, out = straight
    assert "checkpoint" in out and "metrics" in out and "HF export" in out
    m = metrics(run)
    assert sorted(m) == [1, 2, 3, 4, 5, 6]
    for key in ("loss", "aux_loss", "balance_expert", "balance_device", "balance_comm", "lr", "grad_norm",
                "tokens_per_s", "peak_mem_gib", "skipped_steps", "bad_records", "load_imbalance",
                "load_imbalance_per_layer"):
        assert key in m[6], key
    assert len(m[6]["load_imbalance_per_layer"]) == 2 and "val_loss" in m[3] and "val_ppl" in m[6]
    assert m[6]["loss"] < m[1]["loss"]
    complete = sorted(p.name for p in (run / "checkpoints").iterdir() if (p / "COMPLETE").exists())
    assert complete == ["step_00000003", "step_00000006"]

    # The HF export loads in transformers with the same logits as the trained model's checkpoint, its tokenizer
    # knows BOS/EOS, and every weight file is readable by others as the umask allows (safetensors writes 0600).
    assert_export_matches(run / "hf", run / "checkpoints" / "step_00000006", transformers_ds)
    assert_tokenizer_knows_bos_eos(run / "hf")
    umask = os.umask(0o022)
    os.umask(umask)
    for file in list((run / "hf").glob("*.safetensors")) + list((run / "checkpoints").rglob("*.safetensors")):
        assert stat.S_IMODE(file.stat().st_mode) == 0o666 & ~umask, file


def assert_tokenizer_knows_bos_eos(hf_dir: Path) -> None:
    """transformers' AutoTokenizer finds the model's BOS and EOS in an exported directory."""
    from transformers import AutoTokenizer
    config = json.loads((hf_dir / "config.json").read_text())
    tokenizer = AutoTokenizer.from_pretrained(hf_dir)
    assert (tokenizer.bos_token_id, tokenizer.eos_token_id) == (config["bos_token_id"], config["eos_token_id"])
    assert None not in (tokenizer.bos_token_id, tokenizer.eos_token_id)


def test_resume_continues_bitwise(tmp_path, cache_dir, straight):
    """Steps 4-6 resumed from the step-3 checkpoint have the uninterrupted run's losses, gradient norms and
    validation loss exactly."""
    run, _ = straight
    resumed = tmp_path / "resumed"
    out = _ok(run_pretrain(resumed, cache_dir, f"checkpoint.resume={run / 'checkpoints' / 'step_00000003'}")).stdout
    assert "resumed from" in out
    a, b = metrics(run), metrics(resumed)
    assert sorted(b) == [4, 5, 6]
    for step in (4, 5, 6):
        assert (a[step]["loss"], a[step]["grad_norm"]) == (b[step]["loss"], b[step]["grad_norm"]), step
    assert a[6]["val_loss"] == b[6]["val_loss"]


def test_non_finite_loss_is_skipped_or_stops_the_run(tmp_path, cache_dir):
    run = tmp_path / "skip"
    _ok(run_pretrain(run, cache_dir, "checkpoint.every=0", fault="nan_loss@1"))  # 0-based step 1 = step 2
    m = metrics(run)
    assert m[1]["skipped_steps"] == 0 and m[2]["skipped_steps"] == 1 and m[6]["skipped_steps"] == 1
    assert all(v["loss"] == v["loss"] for s, v in m.items() if s != 2)  # finite everywhere else
    stopped = run_pretrain(tmp_path / "stop", cache_dir, "trainer.non_finite=stop", fault="nan_loss@1")
    assert stopped.returncode != 0 and "step 2: non-finite loss" in stopped.stderr
    assert not (tmp_path / "stop" / "checkpoints").exists()  # nothing saved after the bad step


def test_config_errors_stop_before_anything_starts(tmp_path, cache_dir, straight):
    """Each user mistake ends in one line naming the key or file and exit 2, before the run writes anything: a key
    the schema does not have (checked before Hydra composes), a value that fails validation, a data glob matching
    nothing, and a fresh start refused where checkpoints already are."""
    cases = [("trainer.max_step=3", "config error: trainer.max_step: unknown key (did you mean trainer.max_steps?)"),
             ("trainer.global_batch_size=5", "config error: trainer.global_batch_size=5: must be a multiple"),
             ("data.paths=[/nonexistent/dir/*.jsonl]", "data error: data.paths: '/nonexistent/dir/*.jsonl' matches "
                                                       "no file")]
    for i, (override, message) in enumerate(cases):
        extra = ["data=files"] if override.startswith("data.paths") else []
        proc = run_pretrain(tmp_path / f"bad{i}", cache_dir, *extra, override, timeout=120)
        assert proc.returncode == 2 and message in proc.stderr, (override, proc.stderr[-2000:])
        assert len(proc.stderr.strip().splitlines()) == 1, proc.stderr
        assert not any((tmp_path / f"bad{i}" / name).exists() for name in ("resolved_config.yaml", "metrics.jsonl",
                                                                            "checkpoints"))
    run, _ = straight
    proc = run_pretrain(run, cache_dir, "checkpoint.resume=none")
    assert proc.returncode == 2 and "config error: checkpoint.resume=none, but checkpoint.dir" in proc.stderr


def test_convert_exports_a_checkpoint_and_imports_an_hf_directory_to_train_from(tmp_path, cache_dir, straight):
    """convert.py export writes the checkpoint's exact weights and a tokenizer transformers reads with BOS/EOS;
    convert.py import makes a weights-only checkpoint a run starts from at step 0."""
    from model import CausalLM
    from model.hf import load_config, load_pretrained
    from trainer.checkpoint import load_model_weights

    step3 = straight[0] / "checkpoints" / "step_00000003"
    convert = [sys.executable, str(ROOT / "launch" / "convert.py")]
    subprocess.run(convert + ["export", str(step3), str(tmp_path / "hf")], check=True, capture_output=True,
                   env={**os.environ, "HF_HUB_OFFLINE": "1"}, timeout=120)
    exported = load_pretrained(tmp_path / "hf")
    trained = load_model_weights(step3, CausalLM(load_config(tmp_path / "hf"))).state_dict()
    assert all(torch.equal(v, trained[k]) for k, v in exported.state_dict().items())
    assert_tokenizer_knows_bos_eos(tmp_path / "hf")

    subprocess.run(convert + ["import", str(tmp_path / "hf"), str(tmp_path / "start")], check=True,
                   capture_output=True, timeout=120)
    out = _ok(run_pretrain(tmp_path / "again", cache_dir, "trainer.max_steps=2",
                           f"checkpoint.resume={tmp_path / 'start'}")).stdout
    assert f"resumed from {tmp_path / 'start'} at step 0" in out


def test_sft_run_and_bf16_autocast_on_cpu(tmp_path, cache_dir):
    """SFT from a directory of JSON Lines under bf16 autocast: the same run in fp32 starts from the same weights
    and data, so a step-1 loss that differs (but by less than 2%) shows the matmuls ran in bf16."""
    rows = [{"messages": [{"role": "user", "content": f"what is {i} plus {i}?"},
                          {"role": "assistant", "content": f"{2 * i}"}]} for i in range(40)]
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "sft.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    losses = {}
    for precision in ("bf16", "fp32"):
        run = tmp_path / precision
        _ok(run_pretrain(run, cache_dir, "data=sft", f"data.paths=[{tmp_path / 'data'}]", "data.seq_len=64",
                         "trainer.val_every=0", "trainer.max_steps=3" if precision == "bf16" else "trainer.max_steps=1",
                         "checkpoint.every=0", "checkpoint.export_hf=false", f"trainer.precision={precision}"))
        losses[precision] = metrics(run)[1]["loss"]
    m = metrics(tmp_path / "bf16")
    assert sorted(m) == [1, 2, 3] and all(v["loss"] == v["loss"] for v in m.values())
    assert 0 < abs(losses["bf16"] - losses["fp32"]) < 0.02 * losses["fp32"], losses


def test_two_processes_nan_loss_on_one_rank_is_skipped_by_both(tmp_path, cache_dir):
    """A NaN loss on rank 1 alone is skipped by both ranks (a rank dying mid-save: tests/faults)."""
    run = tmp_path / "nan"
    _ok(run_pretrain(run, cache_dir, "trainer.max_steps=3", "checkpoint.every=0", "checkpoint.export_hf=false",
                     nproc=2, fault="nan_loss@1:1"))
    m = metrics(run)
    assert (m[1]["skipped_steps"], m[2]["skipped_steps"], m[3]["skipped_steps"]) == (0, 1, 1)


def _hf_tensors(directory: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file
    tensors = {}
    for file in directory.glob("*.safetensors"):
        tensors.update(load_file(file))
    return tensors


def test_checkpoint_saved_at_ep2_resumes_at_ep1_with_identical_weights(tmp_path, cache_dir):
    """Experts re-shard on load (and the HF export gathers them from every rank): the export after resuming at
    ep=1 (2 processes) equals the export of the ep=2 run that wrote the checkpoint (other expert layouts:
    tests/trainer/test_checkpoint.py), and
    one more step at ep=1 from the re-sharded weights and AdamW state reproduces the ep=2 run's loss within 1e-5
    relative and its gradient norm within 1e-4."""
    from model.hf import load_pretrained

    from model import CausalLM
    from model.hf import hf_tensors, load_config
    from trainer.checkpoint import load_model_weights

    first = tmp_path / "ep2"
    out = _ok(run_pretrain(first, cache_dir, "trainer.max_steps=3", "checkpoint.every=2", "parallel.ep=2",
                           nproc=2)).stdout
    assert "expert-parallel 2" in out
    ckpt = first / "checkpoints" / "step_00000002"
    assert sorted(p.name for p in ckpt.glob("model_rank*")) == ["model_rank00000.safetensors",
                                                               "model_rank00001.safetensors"]
    # The step-2 weights in HF naming, gathered from the two ranks' files into one model.
    full = load_model_weights(ckpt, CausalLM(load_config(first / "hf")))
    reference = {name: t.contiguous() for name, t in hf_tensors(full)}
    assert len([k for k in reference if ".mlp.experts." in k]) == 2 * 8 * 3  # 2 MoE layers x 8 experts x 3
    # (4 processes at ep=4 train like 2 at ep=2 from the start: tests/faults/test_job_faults.py)
    for name, nproc, extra in (("ep1", 2, ["parallel.ep=1"]),):
        out = _ok(run_pretrain(tmp_path / name, cache_dir, "trainer.max_steps=2", f"checkpoint.resume={ckpt}",
                               *extra, nproc=nproc)).stdout
        assert "resumed from" in out and "nothing to do: already at step 2" in out
        tensors = _hf_tensors(tmp_path / name / "hf")
        assert tensors.keys() == reference.keys()
        assert all(torch.equal(tensors[k], reference[k]) for k in reference), name
    load_pretrained(tmp_path / "ep1" / "hf")  # a complete, loadable export
    # One more step at ep=1 from the re-sharded weights and AdamW state: the loss the ep=2 run had at step 3.
    _ok(run_pretrain(tmp_path / "ep1-step3", cache_dir, "trainer.max_steps=3", f"checkpoint.resume={ckpt}",
                     "parallel.ep=1", nproc=2))
    a, b = metrics(first)[3], metrics(tmp_path / "ep1-step3")[3]
    assert abs(a["loss"] - b["loss"]) <= 1e-5 * a["loss"] and abs(a["grad_norm"] - b["grad_norm"]) <= 1e-4
