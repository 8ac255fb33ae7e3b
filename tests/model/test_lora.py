"""LoRA in the model (model/lora.py): the routed experts' grouped-GEMM updates against the per-expert reference,
layout-free initial adapters, merged weights against the adapted forward, and what is frozen."""

from __future__ import annotations

import pytest
import torch

from model import CausalLM
from model.hf import load_pretrained, save_pretrained
from model.lora import DEFAULT_TARGETS, TARGETS, LoRALinear, add_lora, lora_factors, peft_state
from model.moe import RoutedExperts
from trainer.presets import model_preset


def _nonzero_b(model: torch.nn.Module, seed: int = 0) -> None:
    """Trained-looking adapters: B factors start at zero, which would hide any mistake in them."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("B"):
                p.copy_(torch.randn(p.shape, generator=g) * 0.05)


def test_grouped_expert_updates_equal_the_per_expert_loop_forward_and_backward():
    torch.manual_seed(0)
    experts = RoutedExperts(4, 32, 16)
    with torch.no_grad():
        experts.gate_up_proj.normal_(0, 0.1)
        experts.down_proj.normal_(0, 0.1)
    experts.add_lora(rank=4, alpha=8.0)
    with torch.no_grad():
        for name in experts.LORA_LEAVES:
            getattr(experts, name).normal_(0, 0.1)
    counts = torch.tensor([5, 0, 7, 4])  # an expert with no rows
    x = torch.randn(16, 32)
    results = []
    for impl in ("grouped", "loop"):
        experts.impl = impl
        experts.zero_grad()
        y = experts(x, counts)
        (y * torch.linspace(-1, 1, y.numel()).view_as(y)).sum().backward()
        results.append((y.detach(), {n: getattr(experts, n).grad.clone() for n in experts.LORA_LEAVES}))
    (y_g, g_g), (y_l, g_l) = results
    torch.testing.assert_close(y_g, y_l, rtol=1e-5, atol=1e-6)
    for name in experts.LORA_LEAVES:
        torch.testing.assert_close(g_g[name], g_l[name], rtol=1e-5, atol=1e-6, msg=name)
    assert g_g["gate_up_lora_B"][1].abs().max() == 0  # no rows, no gradient
    assert experts.gate_up_proj.grad is None or experts.gate_up_proj.grad.abs().max() == 0


def test_initial_adapters_do_not_depend_on_the_expert_shard():
    config = model_preset("tiny_lite")
    torch.manual_seed(0)
    whole = CausalLM(config)
    torch.manual_seed(0)
    shard = CausalLM(config, expert_shard=(4, 4))
    for model in (whole, shard):
        add_lora(model, DEFAULT_TARGETS, rank=4, alpha=8.0, dropout=0.0, seed=7)
    a, b = lora_factors(whole), lora_factors(shard)
    assert a.keys() == b.keys()
    for name in a:
        expected = a[name][4:8] if ".mlp.experts." in name else a[name]
        assert torch.equal(b[name], expected), name
    assert all(t.abs().max() == 0 for n, t in a.items() if n.endswith("B"))  # training starts from the base


def test_only_the_adapters_train_and_the_start_is_the_base_model():
    config = model_preset("tiny_lite")
    torch.manual_seed(0)
    model = CausalLM(config).eval()
    ids = torch.randint(0, config.vocab_size, (2, 12))
    before = model(ids).logits.detach()
    adapted = add_lora(model, TARGETS, rank=4, alpha=8.0, dropout=0.0, seed=0)
    assert "model.layers.1.mlp.gate" in adapted and "model.layers.1.mlp.experts" in adapted
    assert isinstance(model.model.layers[0].mlp.gate_proj, LoRALinear)
    assert isinstance(model.model.layers[1].mlp.shared_experts.down_proj, LoRALinear)
    assert not isinstance(model.lm_head, LoRALinear)
    torch.testing.assert_close(model(ids).logits, before, rtol=0, atol=0)  # B = 0
    model.train()
    model(ids, labels=ids).loss.backward()
    trained = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trained and all("lora_" in n for n in trained)
    assert all(p.grad is None for n, p in model.named_parameters() if n not in trained)


def test_merged_export_equals_the_adapted_model(tmp_path):
    """save_pretrained of an adapted model writes W + alpha/r B A under the released names (no factor tensors), and
    the plain model loaded from it has the adapted model's logits."""
    config = model_preset("tiny_lite").replace(torch_dtype="float32")
    torch.manual_seed(0)
    model = CausalLM(config).eval()
    add_lora(model, TARGETS, rank=4, alpha=8.0, dropout=0.0, seed=0)
    _nonzero_b(model)
    save_pretrained(model, tmp_path)
    plain = load_pretrained(tmp_path, dtype=torch.float32).eval()
    assert not any("lora" in n for n, _ in plain.named_parameters())
    ids = torch.randint(0, config.vocab_size, (2, 12))
    with torch.no_grad():
        torch.testing.assert_close(plain(ids).logits, model(ids).logits, rtol=1e-5, atol=1e-5)


def test_peft_layout_of_expert_factors():
    """PEFT's fused-expert factors: A rows e*r + k, B columns k*E + e, gate_up_proj nested as `base_layer`."""
    a = torch.arange(3 * 2 * 5, dtype=torch.float32).view(3, 2, 5)  # (E, r, in)
    b = torch.arange(3 * 4 * 2, dtype=torch.float32).view(3, 4, 2)  # (E, out, r)
    prefix = "model.layers.1.mlp.experts"
    state = peft_state({f"{prefix}.gate_up_lora_A": a, f"{prefix}.gate_up_lora_B": b,
                        f"{prefix}.down_lora_A": a, f"{prefix}.down_lora_B": b})
    pa = state[f"base_model.model.{prefix}.base_layer.lora_A.weight"]
    pb = state[f"base_model.model.{prefix}.base_layer.lora_B.weight"]
    assert pa.shape == (6, 5) and pb.shape == (4, 6)
    for e in range(3):
        for k in range(2):
            assert torch.equal(pa[e * 2 + k], a[e, k])
            assert torch.equal(pb[:, k * 3 + e], b[e, :, k])
    assert f"base_model.model.{prefix}.lora_A.weight" in state  # down_proj, the outer wrapper


@pytest.mark.parametrize("targets, rank, message", [(["wq"], 4, "unknown LoRA target 'wq'"),
                                                    (["q_proj"], 0, "LoRA rank 0: must be >= 1")])
def test_bad_adapters_are_refused(targets, rank, message):
    with pytest.raises(ValueError, match=message):
        add_lora(CausalLM(model_preset("tiny_lite")), targets, rank=rank, alpha=1.0, dropout=0.0, seed=0)
