"""LoRA fine-tuning from a transformers-made directory, end to end (docs/finetuning.md, "LoRA"): adapters on every
target (MLA projections, dense and shared MLPs, every routed expert, the router), the base frozen, the PEFT adapter
loaded by `peft` onto transformers' DeepseekV2ForCausalLM, the merged export, expert parallelism and resume."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from model.lora import TARGETS
from tests.trainer.test_finetune import _tensors, released, transformers_module  # noqa: F401 (shared fixtures)
from tests.trainer.test_pretrain_e2e import ROOT, _ok, metrics, run_pretrain

EVERY_TARGET = f"lora.targets=[{','.join(TARGETS)}]"
STEPS = 8


def _lora_run(run: Path, cache: Path, directory: Path, sft: Path, *extra: str, nproc: int = 1):
    return run_pretrain(run, cache, "experiment=lora_tiny", f"model.pretrained={directory}", f"data.paths=[{sft}]",
                        EVERY_TARGET, "trainer.epochs=null", f"trainer.max_steps={STEPS}", "checkpoint.every=4",
                        *extra, nproc=nproc)


@pytest.fixture(scope="module")
def lora_runs(tmp_path_factory, cache_dir, released):
    """The same LoRA fine-tune on 1 process and on 2 with parallel.ep=2: {name: (run dir, stdout)}."""
    directory, _, sft = released
    root = tmp_path_factory.mktemp("lora")
    runs = {}
    for name, extra, nproc in (("one", (), 1), ("ep2", ("parallel.ep=2",), 2)):
        runs[name] = root / name, _ok(_lora_run(root / name, cache_dir, directory, sft, *extra, nproc=nproc)).stdout
    return runs


def _ours(directory: Path, checkpoint: Path):
    """Our model: the released weights, the LoRA settings of the run, the checkpoint's adapters."""
    from model.hf import load_pretrained
    from trainer.checkpoint import load_model_weights
    from trainer.lora import apply_lora, lora_settings
    state = json.loads((checkpoint / "train_state.json").read_text())
    model = load_pretrained(directory, dtype=torch.float32)
    apply_lora(lora_settings(state), model, seed=0)
    return load_model_weights(checkpoint, model).eval()


def _factors(checkpoint: Path) -> dict[str, torch.Tensor]:
    return {k: v for k, v in _tensors_of(checkpoint).items() if "lora_" in k}


def _tensors_of(checkpoint: Path) -> dict[str, torch.Tensor]:
    """A checkpoint's weight entries (experts one by one, as the checkpoint names them)."""
    return _tensors(checkpoint, "model_rank*.safetensors")


@pytest.mark.parametrize("name", ["one", "ep2"])
def test_lora_adapter_loads_in_peft_and_merged_export_matches(lora_runs, released, transformers_module, name):
    """The PEFT adapter on transformers' model, the merged export in transformers, and our model with the
    checkpoint's adapters give the same logits (fp32, 1e-4); the adapter holds every target, the run trained."""
    peft = pytest.importorskip("peft")
    directory, _, _ = released
    run, out = lora_runs[name]
    checkpoint = run / "checkpoints" / f"step_{STEPS:08d}"
    assert f"LoRA adapter {run / 'adapter'}" in out
    config = json.loads((run / "adapter" / "adapter_config.json").read_text())
    assert sorted(config["target_modules"]) == ["kv_a_proj_with_mqa", "kv_b_proj", "o_proj", "q_proj"]
    assert set(config["target_parameters"]) == {
        "mlp.gate_proj.weight", "mlp.up_proj.weight", "mlp.down_proj.weight", "mlp.shared_experts.gate_proj.weight",
        "mlp.shared_experts.up_proj.weight", "mlp.shared_experts.down_proj.weight", "mlp.gate.weight",
        "mlp.experts.gate_up_proj", "mlp.experts.down_proj"}
    ours = _ours(directory, checkpoint)
    ids = torch.randint(0, ours.config.vocab_size, (2, 24), generator=torch.Generator().manual_seed(0))
    base = transformers_module.DeepseekV2ForCausalLM.from_pretrained(directory).float().eval()
    with torch.no_grad():
        expected = ours(ids).logits
        assert (base(ids).logits - expected).abs().max() > 1e-3, "the adapters changed nothing"
        adapted = peft.PeftModel.from_pretrained(base, run / "adapter").eval()
        # every adapter tensor of the file went somewhere: PEFT made exactly the modules the file names
        loaded = {n for n, _ in adapted.named_parameters() if "lora_" in n}
        assert len(loaded) == len(_tensors(run / "adapter")) > 0
        assert (adapted(ids).logits - expected).abs().max() < 1e-4
        merged = transformers_module.DeepseekV2ForCausalLM.from_pretrained(run / "hf").float().eval()
        assert (merged(ids).logits - expected).abs().max() < 1e-4


def test_lora_trains_only_the_adapters(lora_runs, released):
    """The base in every checkpoint is bitwise the released weights; every B factor (every expert's too) moved off
    zero; the loss fell; only adapters were trained and only they have optimizer state."""
    from model.hf import load_pretrained
    directory, _, _ = released
    run, out = lora_runs["one"]
    assert "training " in out and " parameters on this rank" in out
    start = {k: v for k, v in load_pretrained(directory, dtype=torch.float32).state_dict().items()}
    checkpoint = run / "checkpoints" / f"step_{STEPS:08d}"
    saved = _tensors_of(checkpoint)
    base = {k: v for k, v in saved.items() if "lora_" not in k}
    assert base, "no base weights in the checkpoint"
    for key, value in base.items():  # per-expert entries `...experts.gate_up_proj.<e>` against the stacked start
        name, _, expert = key.rpartition(".")
        original = start[name][int(expert)] if expert.isdigit() and name in start else start[key]
        assert torch.equal(value, original), key
    factors = _factors(checkpoint)
    bs = {k: v for k, v in factors.items() if k.rpartition(".")[0].endswith("B") or ".lora_B" in k}
    assert len(bs) >= 7 * 3, sorted(bs)  # 3 layers x (4 attention + 3 MLP), plus experts and routers
    for key, value in bs.items():
        assert value.abs().max() > 0, f"{key} never trained"
    optim = _tensors_of_optimizer(checkpoint)
    assert optim and all("lora_" in k for k in optim), [k for k in optim if "lora_" not in k][:3]
    losses = [m["loss"] for _, m in sorted(metrics(run).items()) if "loss" in m]
    assert losses[-1] < losses[0] - 0.3, losses


def _tensors_of_optimizer(checkpoint: Path) -> dict[str, torch.Tensor]:
    return _tensors(checkpoint, "optimizer_rank*.safetensors")


def test_lora_at_ep2_equals_one_process(lora_runs):
    """Expert-sharded adapters (each rank holds and trains its experts' factors): the same losses and the same
    adapters as one process (the 2-process run's adapter also loads in peft, test above)."""
    one, ep2 = lora_runs["one"][0], lora_runs["ep2"][0]
    a, b = metrics(one), metrics(ep2)
    for step in range(1, STEPS + 1):
        assert abs(a[step]["loss"] - b[step]["loss"]) < 1e-4, (step, a[step]["loss"], b[step]["loss"])
    fa, fb = (_factors(run / "checkpoints" / f"step_{STEPS:08d}") for run in (one, ep2))
    assert fa.keys() == fb.keys()
    for key in fa:  # to 0.1% of each tensor's scale (float sums in another order, through 8 AdamW steps)
        assert (fb[key] - fa[key]).abs().max() <= 1e-3 * fa[key].abs().max(), key


def test_lora_resume_is_bitwise(tmp_path, cache_dir, released, lora_runs):
    """Killed after the step-4 checkpoint (its step-8 checkpoint removed) and relaunched: the same adapters and AdamW
    moments at step 8, bit for bit, and the same losses."""
    directory, _, sft = released
    straight = lora_runs["one"][0]
    run = tmp_path / "resumed"
    shutil.copytree(straight, run, ignore=shutil.ignore_patterns("step_00000008", "hf", "adapter"))
    lines = (run / "metrics.jsonl").read_text().splitlines()
    (run / "metrics.jsonl").write_text("".join(line + "\n" for line in lines if json.loads(line).get("step", 0) <= 4))
    out = _ok(_lora_run(run, cache_dir, directory, sft)).stdout
    assert "resumed from" in out and "at step 4" in out
    end = f"step_{STEPS:08d}"
    for read in (_factors, _tensors_of_optimizer):
        a, b = read(straight / "checkpoints" / end), read(run / "checkpoints" / end)
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert metrics(run)[STEPS]["loss"] == metrics(straight)[STEPS]["loss"]


@pytest.mark.parametrize("override, expected", [
    ("lora.targets=[q_proj,wq]", "lora.targets: unknown target 'wq'"),
    ("lora.rank=0", "lora.rank=0: must be >= 1"),
    ("esft.enabled=true", "lora.enabled with esft.enabled"),
    ("parallel.zero_stage=0", "lora.enabled runs on the built-in engine (parallel.zero_stage=null, parallel.pp=1)"),
])
def test_bad_lora_settings_fail_in_one_line(tmp_path, cache_dir, override, expected):
    """Exit 2 with one `config error:` line naming the key, before anything is built."""
    proc = subprocess.run([sys.executable, str(ROOT / "launch" / "pretrain.py"), "experiment=lora_tiny",
                           f"hydra.run.dir={tmp_path}", f"data.cache_dir={cache_dir}", "data.paths=[/nonexistent.jsonl]",
                           override], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2, proc.stdout + proc.stderr
    errors = [line for line in (proc.stdout + proc.stderr).splitlines() if line.startswith("config error:")]
    assert len(errors) == 1 and expected in errors[0], proc.stdout + proc.stderr


def _loglikelihoods(run_dir: Path, source: str) -> list[float]:
    """launch/evaluate.py on the local multiple-choice task: every request's log-likelihood, in document order."""
    proc = subprocess.run([sys.executable, str(ROOT / "launch" / "evaluate.py"), source, "eval.tasks=[mc_local]",
                           f"eval.include_path={ROOT / 'tests' / 'eval' / 'tasks'}", "eval.limit=6",
                           "eval.log_samples=true", "eval.bootstrap_iters=0", f"hydra.run.dir={run_dir}",
                           "logging.wandb=disabled"], capture_output=True, text=True, timeout=300,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    (samples,) = run_dir.glob("samples_mc_local_*.jsonl")
    rows = sorted(map(json.loads, samples.read_text().splitlines()), key=lambda r: r["doc_id"])
    return [float(resp[0][0]) for row in rows for resp in row["resps"]]


def test_evaluating_a_lora_checkpoint_uses_its_adapters(tmp_path, lora_runs, released):
    """launch/evaluate.py on a LoRA run's checkpoint builds the adapters its train_state.json names before reading
    its weights: the same log-likelihoods as the merged export (1e-3), not the base model's."""
    pytest.importorskip("lm_eval")
    directory, _, _ = released
    run = lora_runs["one"][0]
    adapted = _loglikelihoods(tmp_path / "ckpt", f"checkpoint.resume={run / 'checkpoints' / f'step_{STEPS:08d}'}")
    merged = _loglikelihoods(tmp_path / "merged", f"model.pretrained={run / 'hf'}")
    base = _loglikelihoods(tmp_path / "base", f"model.pretrained={directory}")
    assert len(adapted) == len(merged) == len(base) == 24
    assert max(abs(a - m) for a, m in zip(adapted, merged)) < 1e-3
    assert max(abs(a - b) for a, b in zip(adapted, base)) > 0.1
