"""Fine-tuning from a released-layout directory, end to end: a tiny random DeepSeek-V2 saved by transformers with a
small tokenizer.json built by `tokenizers`, then continued pretraining (ep=2, part of the model frozen), SFT by
epochs, and expert-specialised fine-tuning (ESFT)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

from tests.trainer.test_pretrain_e2e import ROOT, _ok, assert_export_matches, metrics, run_pretrain

WORDS = ("alpha beta gamma delta epsilon zeta eta theta iota kappa lambda mu nu xi omicron pi rho sigma tau upsilon "
         "phi chi psi omega red green blue cyan magenta yellow black white one two three four five six seven").split()


def _sentences(n: int, seed: int) -> list[str]:
    g = torch.Generator().manual_seed(seed)
    return [" ".join(WORDS[int(i)] for i in torch.randint(0, len(WORDS), (12,), generator=g)) for _ in range(n)]


@pytest.fixture(scope="module")
def released(tmp_path_factory, transformers_module):
    """(directory, text.jsonl, sft.jsonl): config.json + model.safetensors written by transformers'
    DeepseekV2ForCausalLM.save_pretrained for our tiny_lite preset, and a 300-id BPE tokenizer.json."""
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers

    from trainer.presets import model_preset
    root = tmp_path_factory.mktemp("released")
    directory = root / "tiny-v2"
    bos, eos = "<｜begin▁of▁sentence｜>", "<｜end▁of▁sentence｜>"
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.train_from_iterator(_sentences(400, 0), trainers.BpeTrainer(
        vocab_size=300, special_tokens=[bos, eos], initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    hf = model_preset("tiny_lite").to_hf_config()
    hf.update(bos_token_id=tok.token_to_id(bos), eos_token_id=tok.token_to_id(eos), torch_dtype="float32")
    torch.manual_seed(0)
    model = transformers_module.DeepseekV2ForCausalLM(transformers_module.DeepseekV2Config(**hf))
    with torch.no_grad():  # released norms are not all ones: make every tensor distinctive
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.02)
    model.save_pretrained(directory)
    tok.save(str(directory / "tokenizer.json"))
    text = root / "text.jsonl"
    text.write_text("".join(json.dumps({"text": s}) + "\n" for s in _sentences(300, 1)))
    sft = root / "sft.jsonl"
    pairs = zip(_sentences(60, 2), _sentences(60, 3), strict=True)
    sft.write_text("".join(json.dumps({"messages": [{"role": "user", "content": q},
                                                    {"role": "assistant", "content": a}]}) + "\n" for q, a in pairs))
    return directory, text, sft


@pytest.fixture(scope="module")
def transformers_module():
    transformers = pytest.importorskip("transformers")
    if not hasattr(transformers, "DeepseekV2ForCausalLM"):
        pytest.skip("this transformers has no native DeepseekV2ForCausalLM")
    return transformers


def _tensors(directory: Path, pattern: str = "*.safetensors") -> dict[str, torch.Tensor]:
    """Every tensor of the safetensors files of `directory` matching `pattern`."""
    out = {}
    for file in sorted(directory.glob(pattern)):
        with safe_open(str(file), framework="pt") as f:
            out.update({k: f.get_tensor(k) for k in f.keys()})
    return out


def test_continued_pretraining_from_a_released_directory_with_ep2(tmp_path, cache_dir, released, transformers_ds):
    """model.pretrained under expert parallelism (each rank reads its experts), the tokenizer taken from the same
    directory, embeddings frozen by `trainer.trainable`: the export reloads in transformers with the training
    weights' logits, and differs from the released weights exactly in the tensors training touched."""
    directory, text, _ = released
    run = tmp_path / "cpt"
    out = _ok(run_pretrain(run, cache_dir, "experiment=cpt_tiny", f"model.pretrained={directory}",
                           f"data.paths=[{text}]", "parallel.ep=2", "trainer.trainable=['^(?!model.embed_tokens)']",
                           nproc=2)).stdout
    assert f"tokenizer {directory / 'tokenizer.json'}" in out and "expert-parallel 2" in out
    assert_export_matches(run / "hf", run / "checkpoints" / "step_00000004", transformers_ds)
    start, end = _tensors(directory), _tensors(run / "hf")
    assert start.keys() == end.keys()
    assert torch.equal(start["model.embed_tokens.weight"], end["model.embed_tokens.weight"])  # frozen, and loaded
    changed = [k for k in start if not torch.equal(start[k], end[k])]
    assert sorted(changed) == sorted(k for k in start if k != "model.embed_tokens.weight")


def test_sft_by_epochs_from_a_released_directory_then_generate(tmp_path, cache_dir, released, transformers_ds):
    """trainer.epochs sets the number of steps from one counted pass over the conversations; launch/generate.py
    then answers a chat prompt from the exported model, and transformers, given the same tokens, has the same
    logits at every generated position within 1e-4 absolute + 1e-4 relative (so the same greedy choices)."""
    directory, _, sft = released
    run = tmp_path / "sft"
    out = _ok(run_pretrain(run, cache_dir, "experiment=sft_tiny", f"model.pretrained={directory}",
                           f"data.paths=[{sft}]", "trainer.epochs=1")).stdout
    steps = max(metrics(run))
    assert f"trainer.epochs=1: {steps} steps ({steps} per epoch)" in out
    # 60 conversations of ~40 tokens, one per 64-token row, 4 rows a step: about 15 steps, not max_steps.
    assert 10 <= steps <= 20

    proc = subprocess.run([sys.executable, str(ROOT / "launch" / "generate.py"), str(run / "hf"), "--prompt",
                           "alpha beta gamma", "--max-new-tokens", "8", "--json"],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    prompt, completion = result["prompt_ids"], result["completion_ids"]
    assert completion, "no token generated"
    from model.generation import generate
    from model.hf import load_pretrained
    ours = load_pretrained(run / "hf", dtype=torch.float32)
    ids, steps = generate(ours, torch.tensor([prompt]), len(completion))
    assert ids[0, len(prompt):].tolist() == completion
    _, model_cls = transformers_ds
    theirs = model_cls.from_pretrained(run / "hf").float().eval()
    with torch.no_grad():
        logits = theirs(ids).logits[0]
    for i, step in enumerate(steps):
        torch.testing.assert_close(step[0], logits[len(prompt) - 1 + i].float(), rtol=1e-4, atol=1e-4)


def test_esft_trains_only_the_selected_experts_and_resumes_with_its_selection(tmp_path, cache_dir, released):
    """Only the experts ESFT selected change (every other tensor of the export equals the released one), the
    optimizer holds state for them alone, and the same data and weights select the same experts again. Resumed from
    its step-3 checkpoint, the run keeps the checkpoint's selection (no new scoring: no esft_selection.json is
    written) and steps 4-6 reproduce the uninterrupted run's losses and gradient norms bitwise."""
    directory, _, sft = released
    args = ("experiment=esft_tiny", f"model.pretrained={directory}", f"data.paths=[{sft}]", "trainer.epochs=null",
            "trainer.max_steps=6", "checkpoint.every=3")
    run = tmp_path / "esft"
    out = _ok(run_pretrain(run, cache_dir, *args)).stdout
    assert "(ESFT:" in out
    chosen = json.loads((run / "esft_selection.json").read_text())
    selection = {int(k): v for k, v in chosen["selection"].items()}
    n_experts = len(chosen["relevance"]["1"])
    assert all(0 < len(v) < n_experts for v in selection.values()), selection
    start, end = _tensors(directory), _tensors(run / "hf")
    trained = {f"model.layers.{layer}.mlp.experts.{e}.{proj}.weight" for layer, experts in selection.items()
               for e in experts for proj in ("gate_proj", "up_proj", "down_proj")}
    changed = {k for k in start if not torch.equal(start[k], end[k])}
    assert changed == trained
    with safe_open(str(run / "checkpoints" / "step_00000003" / "optimizer_rank00000.safetensors"), "pt") as f:
        entries = {k.split("::")[0] for k in f.keys()}
    assert entries == {f"model.layers.{layer}.mlp.experts.{proj}.{e}" for layer, experts in selection.items()
                       for e in experts for proj in ("gate_up_proj", "down_proj")}

    resumed = tmp_path / "resumed"
    _ok(run_pretrain(resumed, cache_dir, *args, f"checkpoint.resume={run / 'checkpoints' / 'step_00000003'}",
                     "checkpoint.export_hf=false"))
    assert not (resumed / "esft_selection.json").exists()  # the experts were not scored again
    state = json.loads((resumed / "checkpoints" / "step_00000006" / "train_state.json").read_text())
    assert state["esft_selection"] == chosen["selection"]
    a, b = metrics(run), metrics(resumed)
    assert sorted(b) == [4, 5, 6]
    assert [(a[s]["loss"], a[s]["grad_norm"]) for s in (4, 5, 6)] == [(b[s]["loss"], b[s]["grad_norm"])
                                                                       for s in (4, 5, 6)]

    again = tmp_path / "again"
    _ok(run_pretrain(again, cache_dir, *args[:-2], "trainer.max_steps=1", "checkpoint.export_hf=false"))
    assert json.loads((again / "esft_selection.json").read_text())["selection"] == chosen["selection"]


@pytest.fixture(scope="module")
def unusual(tmp_path_factory, released, transformers_module):
    """A DeepSeek-V2 saved by transformers whose shapes match no preset (2 layers, 6 experts, width 48, query
    compression, plain RoPE), with the released fixture's tokenizer."""
    directory = tmp_path_factory.mktemp("unusual") / "v2-odd"
    hf = dict(vocab_size=320, hidden_size=48, intermediate_size=80, moe_intermediate_size=16, num_hidden_layers=2,
              num_attention_heads=3, num_key_value_heads=3, q_lora_rank=24, kv_lora_rank=16, qk_nope_head_dim=8,
              qk_rope_head_dim=8, v_head_dim=8, n_routed_experts=6, n_shared_experts=1, num_experts_per_tok=2,
              n_group=1, topk_group=1, topk_method="greedy", first_k_dense_replace=1, max_position_embeddings=128,
              rope_scaling=None, torch_dtype="float32", bos_token_id=0, eos_token_id=1)
    torch.manual_seed(1)
    transformers_module.DeepseekV2ForCausalLM(transformers_module.DeepseekV2Config(**hf)).save_pretrained(directory)
    (directory / "tokenizer.json").write_bytes((released[0] / "tokenizer.json").read_bytes())
    return directory


def test_a_transformers_directory_alone_defines_the_model(tmp_path, cache_dir, released, unusual, transformers_ds):
    """`model.pretrained=<dir>` with no other model key trains the directory's architecture (a preset it matches
    does not exist), takes its tokenizer, and exports a model transformers loads with the training weights' logits;
    a model key that contradicts the directory, set directly or through a preset, stops before start naming the
    field and both values."""
    _, _, sft = released
    common = [f"model.pretrained={unusual}", "data=sft", f"data.paths=[{sft}]", "data.seq_len=64",
              "trainer.max_steps=2", "trainer.micro_batch_size=2", "trainer.global_batch_size=4",
              "trainer.val_every=0", "checkpoint.every=0", f"data.cache_dir={cache_dir}", "logging.wandb=disabled"]
    run = tmp_path / "odd"
    out = _ok(_launch(run, *common)).stdout
    assert f"weights   released weights from {unusual}" in out and f"tokenizer {unusual / 'tokenizer.json'}" in out
    exported = json.loads((run / "hf" / "config.json").read_text())
    released_cfg = json.loads((unusual / "config.json").read_text())
    for key in ("hidden_size", "num_hidden_layers", "n_routed_experts", "q_lora_rank", "moe_intermediate_size"):
        assert exported[key] == released_cfg[key], key
    assert_export_matches(run / "hf", run / "checkpoints" / "step_00000002", transformers_ds)
    for extra, message in (("model.hidden_size=64", "model.hidden_size=64 but config.json has 48"),
                           ("model=tiny_lite", "model.hidden_size=128 but config.json has 48 (from model=tiny_lite)")):
        proc = _launch(tmp_path / "bad", *common, extra)
        assert proc.returncode == 2 and f"config error: model.pretrained={unusual}: " in proc.stderr, proc.stderr
        assert message in proc.stderr and len(proc.stderr.strip().splitlines()) == 1, proc.stderr


def _launch(run_dir: Path, *overrides: str) -> subprocess.CompletedProcess:
    """launch/pretrain.py exactly as given (no experiment added), one process."""
    return subprocess.run([sys.executable, str(ROOT / "launch" / "pretrain.py"), *overrides,
                           f"hydra.run.dir={run_dir}"], capture_output=True, text=True, timeout=300,
                          cwd=run_dir.parent, env={**os.environ, "OMP_NUM_THREADS": "1", "WANDB_MODE": "disabled"})
