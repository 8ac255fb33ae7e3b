"""Parity with transformers' DeepseekV2ForCausalLM through the real checkpoint converter (fp32, CPU).

A tiny random transformers model is saved with `save_pretrained`, loaded by our `load_pretrained`, and must give the
same logits, loss and gradients; our `save_pretrained` output must load back into transformers with the same logits.
"""

from __future__ import annotations

import pytest
import torch

from tests.conftest import tiny_hf_config
from model import next_token_labels
from model.hf import load_pretrained, save_pretrained

TOL = 1e-4

VARIANTS = {
    "q_lora+group_limited+yarn": {},
    "no_q_lora+greedy+yarn": dict(q_lora_rank=None, topk_method="greedy", n_group=1, topk_group=1),
    "q_lora+greedy+scaled": dict(topk_method="greedy", routed_scaling_factor=16.0),
    "no_q_lora+group_limited+no_yarn": dict(q_lora_rank=None, rope_scaling=None, topk_group=3),
}


def _reference(transformers_ds, tmp_path, **overrides):
    config_cls, model_cls = transformers_ds
    torch.manual_seed(0)
    hf_model = model_cls(config_cls(**tiny_hf_config(**overrides))).float().eval()
    with torch.no_grad():  # every tensor distinct from its init value (norms start at exactly 1)
        for p in hf_model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    hf_model.save_pretrained(tmp_path / "hf")
    return hf_model


def _report(name: str, a: torch.Tensor, b: torch.Tensor) -> float:
    diff = (a - b).abs()
    print(f"{name}: max abs diff {diff.max().item():.3e}, mean {diff.mean().item():.3e}")
    return diff.max().item()


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_load_transformers_checkpoint_same_logits_loss_and_grads(transformers_ds, tmp_path, variant):
    """A checkpoint transformers wrote, loaded through our converter, in fp32: logits within 1e-4 absolute of
    transformers' (measured about 4e-6), the loss within 1e-5, and every gradient within 1e-4 of its tensor's largest
    gradient (measured about 2e-6)."""
    hf_model = _reference(transformers_ds, tmp_path, **VARIANTS[variant])
    ours = load_pretrained(tmp_path / "hf", dtype=torch.float32).eval()
    ids = torch.randint(0, ours.config.vocab_size, (2, 33), generator=torch.Generator().manual_seed(1))

    with torch.no_grad():
        assert _report(f"{variant} logits", ours(ids).logits, hf_model(ids).logits) <= TOL

    # Gradients: next-token loss on both sides (ours takes shifted targets, transformers shifts internally).
    ours.train()
    hf_model.train()
    our_loss = ours(ids, labels=next_token_labels(ids)).loss
    hf_loss = hf_model(ids, labels=ids).loss
    assert abs(our_loss.item() - hf_loss.item()) <= 1e-5
    our_loss.backward()
    hf_loss.backward()
    hf_params = dict(hf_model.named_parameters())
    worst = 0.0
    for name, param in ours.named_parameters():
        ref = hf_params[name]  # stacked expert tensors carry the same names and layout on both sides
        assert param.grad is not None and ref.grad is not None, name
        scale = ref.grad.abs().max().item() + 1e-12
        worst = max(worst, (param.grad - ref.grad).abs().max().item() / scale)
    print(f"{variant} grads: worst max-abs diff relative to the tensor's largest gradient {worst:.3e}")
    assert worst <= 1e-4


@pytest.mark.parametrize("variant", ["q_lora+group_limited+yarn", "no_q_lora+greedy+yarn"])
def test_our_export_loads_in_transformers_with_same_logits(transformers_ds, tmp_path, variant):
    """Our save_pretrained, loaded by transformers: logits within 1e-4 absolute of ours (fp32)."""
    _, model_cls = transformers_ds
    _reference(transformers_ds, tmp_path, **VARIANTS[variant])
    ours = load_pretrained(tmp_path / "hf", dtype=torch.float32).eval()
    with torch.no_grad():  # move away from the reference weights so the check cannot pass by accident
        for p in ours.parameters():
            p.add_(0.01 * torch.randn_like(p))
    save_pretrained(ours, tmp_path / "ours", max_shard_size="40KB")
    assert (tmp_path / "ours" / "model.safetensors.index.json").exists()
    reloaded = model_cls.from_pretrained(tmp_path / "ours").float().eval()
    ids = torch.randint(0, ours.config.vocab_size, (2, 29), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        assert _report(f"{variant} export logits", ours(ids).logits, reloaded(ids).logits) <= TOL


def test_bf16_error_is_no_worse_than_transformers(transformers_ds, tmp_path):
    """In bf16 both implementations round differently; ours must stay as close to the fp32 truth as theirs."""
    _, model_cls = transformers_ds
    hf_fp32 = _reference(transformers_ds, tmp_path)
    ids = torch.randint(0, hf_fp32.config.vocab_size, (2, 33), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        truth = hf_fp32(ids).logits
        ours = load_pretrained(tmp_path / "hf", dtype=torch.bfloat16).eval()
        assert ours.lm_head.weight.dtype == torch.bfloat16
        theirs = model_cls.from_pretrained(tmp_path / "hf", dtype=torch.bfloat16).eval()
        our_err = (ours(ids).logits.float() - truth).abs().mean().item()
        their_err = (theirs(ids).logits.float() - truth).abs().mean().item()
    print(f"bf16 mean abs error vs fp32: ours {our_err:.3e}, transformers {their_err:.3e}")
    assert our_err <= 1.5 * their_err
