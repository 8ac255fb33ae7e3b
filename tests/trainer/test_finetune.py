"""Fine-tuning from a released-layout directory, end to end: a tiny random DeepSeek-V2 saved by transformers with a
small tokenizer.json built by `tokenizers`, then continued pretraining (ep=2, part of the model frozen), SFT by
epochs, and expert-specialised fine-tuning (ESFT)."""

from __future__ import annotations

import json
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


def _tensors(directory: Path) -> dict[str, torch.Tensor]:
    out = {}
    for file in sorted(directory.glob("*.safetensors")):
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


def test_a_preset_that_disagrees_with_the_released_config_is_refused(tmp_path, cache_dir, released):
    directory, text, _ = released
    proc = run_pretrain(tmp_path / "bad", cache_dir, "experiment=cpt_tiny", f"model.pretrained={directory}",
                        f"data.paths=[{text}]", "model.hidden_size=96")
    assert proc.returncode == 2 and "model.hidden_size=96 but config.json has 128" in proc.stderr


def test_sft_by_epochs_from_a_released_directory_then_generate(tmp_path, cache_dir, released, transformers_ds):
    """trainer.epochs sets the number of steps from one counted pass over the conversations; launch/generate.py
    then answers a chat prompt from the exported model, and transformers, given the same tokens, has the same
    logits at every generated position (so the same greedy choices)."""
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


def test_esft_trains_only_the_selected_experts(tmp_path, cache_dir, released):
    """Only the experts ESFT selected change (every other tensor of the export equals the released one), the
    optimizer holds state for them alone, and the same data and weights select the same experts again."""
    directory, _, sft = released
    args = ("experiment=esft_tiny", f"model.pretrained={directory}", f"data.paths=[{sft}]", "trainer.epochs=null",
            "trainer.max_steps=3", "checkpoint.every=3")
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
    again = tmp_path / "again"
    _ok(run_pretrain(again, cache_dir, *args[:-2], "trainer.max_steps=1", "checkpoint.export_hf=false"))
    assert json.loads((again / "esft_selection.json").read_text())["selection"] == chosen["selection"]
