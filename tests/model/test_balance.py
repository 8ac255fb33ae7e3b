"""The three balance losses (docs/model.md §5) against hand-computed values, the released seq_aux formula, and the
model."""

from __future__ import annotations

import pytest
import torch

from tests.conftest import tiny_hf_config
from model import CausalLM, ModelConfig, MoE
from model.balance import balance_losses, comm_balance_loss, device_balance_loss, expert_balance_loss


def _four_expert_moe(weight: torch.Tensor, top_k: int = 2) -> MoE:
    """4 experts in 2 routing groups, top-k, device-limited to 1 group; router weights set by hand."""
    config = ModelConfig(vocab_size=8, hidden_size=4, intermediate_size=8, moe_intermediate_size=4,
                         num_hidden_layers=2, num_attention_heads=1, kv_lora_rank=4, qk_nope_head_dim=2,
                         qk_rope_head_dim=2, v_head_dim=2, n_routed_experts=4, n_shared_experts=1,
                         num_experts_per_tok=top_k, n_group=2, topk_group=1, topk_method="group_limited_greedy")
    moe = MoE(config)
    with torch.no_grad():
        moe.gate.weight.copy_(weight)
        for p in (moe.experts.gate_up_proj, moe.experts.down_proj):
            p.normal_()
    return moe


def _losses(moe: MoE, x: torch.Tensor, per_sequence: bool = True, top_k: int = 2) -> dict[str, torch.Tensor]:
    _, stats = moe(x)
    return {
        "expert": expert_balance_loss(stats, top_k, per_sequence),
        "device": device_balance_loss(stats, top_k, 2, per_sequence),
        "comm": comm_balance_loss(stats, top_k, 2, 1, per_sequence),
    }


@pytest.mark.parametrize("per_sequence", [True, False])
def test_all_tokens_on_two_experts_of_one_group(per_sequence):
    """Every token picks experts {0, 1} (group 0) with probabilities a, b:
    f = [2, 2, 0, 0] so L_expert = 2(a + b); f' = [2, 0] so L_device = 2(a + b); f'' = [2, 0] so L_comm = 2(a + b)."""
    logits = torch.tensor([3.0, 2.0, 0.0, -1.0])
    moe = _four_expert_moe(torch.stack([logits, torch.zeros(4), torch.zeros(4), torch.zeros(4)], dim=1))
    x = torch.zeros(3, 5, 4)
    x[..., 0] = 1.0  # every token's logits are exactly `logits`
    a, b = logits.softmax(-1)[:2].tolist()
    losses = _losses(moe, x, per_sequence)
    for name in ("expert", "device", "comm"):
        assert losses[name].item() == pytest.approx(2 * (a + b), rel=1e-6), name
        losses[name].backward(retain_graph=True)
        assert torch.isfinite(moe.gate.weight.grad).all()


@pytest.mark.parametrize("per_sequence", [True, False])
def test_all_tokens_on_one_expert(per_sequence):
    """Top-1, every token picks expert 0 with probability a: f = [4, 0, 0, 0] so L_expert = 4a;
    f' = [2, 0] and P' = [a + b, c + d] so L_device = 2(a + b); f'' = [2, 0] so L_comm = 2(a + b)."""
    logits = torch.tensor([3.0, 2.0, 0.0, -1.0])
    moe = _four_expert_moe(torch.stack([logits, torch.zeros(4), torch.zeros(4), torch.zeros(4)], dim=1), top_k=1)
    x = torch.zeros(2, 6, 4)
    x[..., 0] = 1.0
    a, b = logits.softmax(-1)[:2].tolist()
    losses = _losses(moe, x, per_sequence, top_k=1)
    assert losses["expert"].item() == pytest.approx(4 * a, rel=1e-6)
    assert losses["device"].item() == pytest.approx(2 * (a + b), rel=1e-6)
    assert losses["comm"].item() == pytest.approx(2 * (a + b), rel=1e-6)
    for value in losses.values():
        value.backward(retain_graph=True)
    assert torch.isfinite(moe.gate.weight.grad).all()


@pytest.mark.parametrize("per_sequence", [True, False])
def test_perfectly_uniform_routing_gives_exactly_one(per_sequence):
    """Tokens t=0..3 favour experts (0,1), (1,0), (2,3), (3,2): every expert gets 2 of the 8 copies (f = 1), its mean
    probability is 1/4, each group receives 2 of 4 tokens (f' = f'' = 1) and holds probability 1/2."""
    high, mid, low = 4.0, 3.0, 0.0
    w = torch.tensor([[high, mid, low, low],  # expert 0's logit for tokens 0..3
                      [mid, high, low, low],
                      [low, low, high, mid],
                      [low, low, mid, high]])
    moe = _four_expert_moe(w)
    x = torch.eye(4).repeat(2, 1, 1)  # 2 sequences of the 4 tokens
    losses = _losses(moe, x, per_sequence)
    for name in ("expert", "device", "comm"):
        assert losses[name].item() == pytest.approx(1.0, abs=1e-6), name
        losses[name].backward(retain_graph=True)
        assert torch.isfinite(moe.gate.weight.grad).all()


def test_expert_loss_matches_the_released_seq_aux_formula():
    """docs/model.md §5.1: ce[b,e] = count / (S K / E); aux = mean_b sum_e ce[b,e] * mean_t s[b,t,e]; and the
    batch form."""
    torch.manual_seed(0)
    config = ModelConfig.from_hf_config(tiny_hf_config())
    moe = MoE(config)
    torch.nn.init.normal_(moe.gate.weight, 0, 0.5)
    torch.nn.init.normal_(moe.experts.gate_up_proj, 0, 0.1)
    torch.nn.init.normal_(moe.experts.down_proj, 0, 0.1)
    B, S, E, K = 3, 9, 8, 3
    x = torch.randn(B, S, 64)
    _, stats = moe(x)
    ids, _, scores = moe.gate(x.view(-1, 64))
    ce = torch.zeros(B, E).scatter_add_(1, ids.view(B, S * K), torch.ones(B, S * K)) / (S * K / E)
    seq_ref = (ce * scores.view(B, S, E).mean(1)).sum(1).mean()
    assert expert_balance_loss(stats, K, per_sequence=True).item() == pytest.approx(seq_ref.item(), rel=1e-6)
    fi = torch.nn.functional.one_hot(ids.view(-1), E).float().mean(0) * E
    batch_ref = (fi * scores.mean(0)).sum()
    assert expert_balance_loss(stats, K, per_sequence=False).item() == pytest.approx(batch_ref.item(), rel=1e-6)


def _model(**changes) -> CausalLM:
    torch.manual_seed(0)
    return CausalLM(ModelConfig.from_hf_config(tiny_hf_config(**changes)))


def test_model_aux_loss_is_the_weighted_sum_over_layers_and_zero_disables_a_term():
    alphas = dict(aux_loss_alpha=0.003, device_aux_loss_alpha=0.05, comm_aux_loss_alpha=0.0)
    model = _model(**alphas).train()
    ids = torch.randint(0, 211, (2, 12))
    out = model(ids)
    assert len(out.routing) == 2  # layers 1 and 2 are MoE, layer 0 dense
    per_layer = [balance_losses(s, model.config) for s in out.routing]
    expected = sum(0.003 * t["expert"] + 0.05 * t["device"] for t in per_layer)  # comm: alpha3 = 0
    assert out.aux_loss.item() == pytest.approx(expected.item(), rel=1e-6)
    for name in ("expert", "device", "comm"):
        assert out.balance[name].item() == pytest.approx(sum(t[name] for t in per_layer).item(), rel=1e-6)
    out.aux_loss.backward()
    assert model.model.layers[1].mlp.gate.weight.grad.abs().sum() > 0


def test_aux_loss_only_in_training_and_zero_when_all_coefficients_are_zero():
    ids = torch.randint(0, 211, (2, 12))
    model = _model(aux_loss_alpha=0.0, device_aux_loss_alpha=0.0, comm_aux_loss_alpha=0.0).train()
    assert model(ids).aux_loss.item() == 0.0
    model = _model(aux_loss_alpha=0.01).eval()
    out = model(ids)
    assert out.aux_loss is None and len(out.routing) == 2


def test_each_term_and_each_granularity_against_hand_values():
    """Two sequences of 2 tokens, K=2, 4 experts in 2 groups, M=2 (copies spread across groups):
    seq 0 routes a->{0,2}, b->{0,1}; seq 1 routes c->{2,3}, d->{3,1}.
    per sequence: expert 1.3, device 1.2, comm 0.85; per batch: expert 1.0, device 1.0, comm 0.75."""
    from model.moe import RoutingStats
    stats = RoutingStats(
        expert_counts=torch.tensor([[2.0, 1.0, 1.0, 0.0], [0.0, 1.0, 1.0, 2.0]]),
        expert_probs=torch.tensor([[0.4, 0.3, 0.2, 0.1], [0.1, 0.2, 0.3, 0.4]]),
        group_tokens=torch.tensor([[2.0, 1.0], [1.0, 2.0]]))
    expected = {True: (1.3, 1.2, 0.85), False: (1.0, 1.0, 0.75)}
    for per_sequence, (expert, device, comm) in expected.items():
        assert expert_balance_loss(stats, 2, per_sequence).item() == pytest.approx(expert)
        assert device_balance_loss(stats, 2, 2, per_sequence).item() == pytest.approx(device)
        assert comm_balance_loss(stats, 2, 2, 2, per_sequence).item() == pytest.approx(comm)
