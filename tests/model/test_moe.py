"""DeepSeekMoE: router semantics (docs/model.md §4.2), grouped GEMM vs the per-expert loop, the dispatcher seam,
stats."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from tests.conftest import tiny_hf_config
from model import LocalDispatcher, ModelConfig, MoE
from model.moe import _GROUPED_MM, RoutedExperts


def _config(**changes) -> ModelConfig:
    return ModelConfig.from_hf_config(tiny_hf_config(**changes))


def _moe(seed: int = 0, **changes) -> MoE:
    torch.manual_seed(seed)
    moe = MoE(_config(**changes))
    for p in moe.parameters():
        torch.nn.init.normal_(p, 0.0, 0.2)
    return moe


def _dense_reference(moe: MoE, x: torch.Tensor) -> torch.Tensor:
    """Every expert on every token, masked by the router's choice: no sorting, no grouped GEMM."""
    tokens = x.reshape(-1, x.shape[-1])
    ids, weights, _ = moe.gate(tokens)
    out = torch.zeros_like(tokens)
    e = moe.experts
    for k in range(ids.shape[1]):
        for expert in range(e.n_experts):
            gate, up = (tokens @ e.gate_up_proj[expert].T).split(e.intermediate_size, -1)
            y = (F.silu(gate) * up) @ e.down_proj[expert].T
            out = out + y * (weights[:, k] * (ids[:, k] == expert)).unsqueeze(-1)
    return (out + moe.shared_experts(tokens)).view_as(x)


def test_moe_equals_dense_reference():
    moe = _moe()
    x = torch.randn(3, 7, 64)
    y, _ = moe(x)
    torch.testing.assert_close(y, _dense_reference(moe, x), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("counts", [[5, 0, 3, 0, 1, 7, 0, 2], [18, 0, 0, 0, 0, 0, 0, 0], [0, 0, 0, 0, 0, 0, 0, 0]])
def test_grouped_gemm_matches_per_expert_loop_forward_and_backward(counts):
    torch.manual_seed(0)
    experts = RoutedExperts(8, 16, 12)
    torch.nn.init.normal_(experts.gate_up_proj, 0, 0.3)
    torch.nn.init.normal_(experts.down_proj, 0, 0.3)
    counts = torch.tensor(counts)
    x = torch.randn(int(counts.sum()), 16, requires_grad=True)
    grad_out = torch.randn(int(counts.sum()), 16)
    assert _GROUPED_MM is not None  # this torch has a grouped GEMM, so "grouped" below is not the loop again
    results = []
    for impl in ("grouped", "loop"):
        experts.impl = impl
        experts.zero_grad()
        x.grad = None
        y = experts(x, counts)
        y.backward(grad_out)
        results.append((y.detach(), x.grad.clone(), experts.gate_up_proj.grad.clone(), experts.down_proj.grad.clone()))
    for grouped, loop in zip(*results):
        torch.testing.assert_close(grouped, loop, rtol=1e-5, atol=1e-6)


def test_local_dispatcher_grouped_and_loop_agree_through_the_layer():
    moe = _moe()
    x = torch.randn(2, 11, 64, requires_grad=True)
    outs = []
    for impl in ("grouped", "loop"):
        moe.experts.impl = impl
        moe.zero_grad()
        x.grad = None
        y, _ = moe(x)
        (y * torch.linspace(-1, 1, 64)).sum().backward()
        outs.append([y.detach(), x.grad.clone()] + [p.grad.clone() for p in moe.parameters()])
    for a, b in zip(*outs):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_dispatcher_is_a_plug_in():
    """The MoE layer hands (tokens, ids, weights, experts) to whatever dispatcher it holds (the EP seam), in two
    phases with the shared experts between them (they overlap the exchange)."""
    moe = _moe()
    calls = []

    class Recording(LocalDispatcher):
        def dispatch(self, x, expert_ids, weights, experts, dropping=False):
            calls.append(("dispatch", x.shape, expert_ids.shape, weights.dtype))
            return super().dispatch(x, expert_ids, weights, experts, dropping)

        def combine(self, pending):
            calls.append("combine")
            return super().combine(pending)

    moe.shared_experts.register_forward_hook(lambda *_: calls.append("shared"))
    reference, _ = moe(torch.ones(1, 4, 64))
    calls.clear()
    moe.dispatcher = Recording()
    y, _ = moe(torch.ones(1, 4, 64))
    assert calls == [("dispatch", (4, 64), (4, 3), torch.float32), "shared", "combine"]
    torch.testing.assert_close(y, reference)


def test_group_limited_routing_stays_within_topk_group_groups():
    moe = _moe(topk_method="group_limited_greedy", n_group=4, topk_group=2)
    tokens = torch.randn(200, 64)
    ids, weights, scores = moe.gate(tokens)
    groups = ids // 2  # 4 groups of 2 consecutive experts
    assert max(len(set(row.tolist())) for row in groups) <= 2
    # Kept groups are those with the highest *max* expert score (docs/model.md §4.2), and top-k is taken inside them.
    group_best = scores.view(200, 4, 2).amax(-1)
    kept = group_best.topk(2, dim=-1).indices.sort(-1).values
    for t in range(200):
        assert set(groups[t].tolist()) <= set(kept[t].tolist())
        allowed = scores[t].view(4, 2)[kept[t]].flatten()
        torch.testing.assert_close(weights[t].sort().values / 2.5, allowed.topk(3).values.sort().values)


def test_greedy_routing_weights_are_scaled_raw_probabilities():
    moe = _moe(topk_method="greedy", routed_scaling_factor=16.0)
    tokens = torch.randn(50, 64)
    ids, weights, scores = moe.gate(tokens)
    ref_w, ref_ids = scores.topk(3, dim=-1)
    torch.testing.assert_close(weights.sort(-1).values, (16.0 * ref_w).sort(-1).values)
    assert torch.equal(ids.sort(-1).values, ref_ids.sort(-1).values)
    assert torch.allclose(scores.sum(-1), torch.ones(50))


def test_norm_topk_prob_renormalises_and_skips_the_scaling_factor():
    """transformers ignores norm_topk_prob; the remote code (and we) divide by the top-k sum instead of scaling."""
    moe = _moe(topk_method="greedy", routed_scaling_factor=16.0, norm_topk_prob=True)
    ids, weights, scores = moe.gate(torch.randn(50, 64))
    torch.testing.assert_close(weights.sum(-1), torch.ones(50))
    raw = scores.gather(1, ids)
    torch.testing.assert_close(weights, raw / raw.sum(-1, keepdim=True))


def test_router_runs_in_fp32_and_the_layer_returns_the_activation_dtype():
    """docs/model.md §8.1: fp32 gate weights must not leak an fp32 residual stream into a bf16 model."""
    moe = _moe().to(torch.bfloat16)
    x = torch.randn(2, 5, 64, dtype=torch.bfloat16)
    ids, weights, scores = moe.gate(x.view(-1, 64))
    assert weights.dtype == torch.float32 and scores.dtype == torch.float32
    y, stats = moe(x)
    assert y.dtype == torch.bfloat16 and stats.expert_probs.dtype == torch.float32


def test_router_stays_fp32_under_bf16_autocast():
    moe = _moe()
    x = torch.randn(2, 5, 64)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        ids, weights, scores = moe.gate(x.view(-1, 64))
        y, _ = moe(x)
    assert weights.dtype == torch.float32 and scores.dtype == torch.float32
    assert torch.equal(ids, moe.gate(x.view(-1, 64))[0])  # same routing as without autocast
    assert y.dtype == torch.float32  # the residual stream keeps its dtype
    reference, _ = moe(x)
    torch.testing.assert_close(y, reference, rtol=0.05, atol=0.05)


def test_local_dispatcher_refuses_an_expert_shard():
    moe = _moe()
    moe.experts = RoutedExperts(4, 64, 24, expert_offset=4, n_total=8)
    with pytest.raises(ValueError, match="full expert set"):
        moe(torch.randn(1, 3, 64))


def test_combine_saves_expert_outputs_in_their_own_dtype():
    """The fp32 weighted sum must not keep an fp32 copy of the (N, D) expert outputs alive for backward."""
    from model.moe import combine
    y = torch.randn(12, 8, dtype=torch.bfloat16, requires_grad=True)
    w = torch.rand(12, requires_grad=True)
    tokens = torch.arange(12) // 3
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        out = combine(y, w, tokens, 4)
    assert out.dtype == torch.float32
    assert not any(t.dtype == torch.float32 and t.shape == (12, 8) for t in saved)
    out.sum().backward()
    ref_y = y.detach().float().requires_grad_()
    ref_w = w.detach().clone().requires_grad_()
    torch.zeros(4, 8).index_add(0, tokens, ref_y * ref_w[:, None]).sum().backward()
    torch.testing.assert_close(y.grad.float(), ref_y.grad, rtol=1e-2, atol=1e-2)
    torch.testing.assert_close(w.grad, ref_w.grad, rtol=1e-5, atol=1e-5)


def test_routing_stats_count_every_copy():
    moe = _moe()
    x = torch.randn(3, 10, 64)
    _, stats = moe(x)
    ids, _, scores = moe.gate(x.view(-1, 64))
    assert stats.expert_counts.shape == (3, 8) and stats.expert_counts.sum() == 3 * 10 * 3
    assert torch.equal(stats.tokens_per_expert, torch.bincount(ids.flatten(), minlength=8).float())
    torch.testing.assert_close(stats.expert_probs, scores.view(3, 10, 8).mean(1))
    groups_hit = torch.zeros(30, 4).scatter_(1, ids // 2, 1.0).view(3, 10, 4).sum(1)
    assert torch.equal(stats.group_tokens, groups_hit)
    assert stats.expert_probs.requires_grad and not stats.expert_counts.requires_grad


def test_router_gets_gradient_through_the_gate_weights():
    moe = _moe()
    y, _ = moe(torch.randn(2, 6, 64))
    y.sum().backward()
    assert moe.gate.weight.grad is not None and moe.gate.weight.grad.abs().sum() > 0


def test_capacity_keeps_the_highest_affinity_copies_per_group_of_the_micro_batch():
    from model.moe import capacity_keep
    # Two sequences of 3 tokens, K=1, 4 experts in 2 groups: 6 copies, budget = 1.0 * 6 / 2 groups = 3 per group.
    ids = torch.tensor([[0, 1, 0], [1, 2, 0]])           # group 0 gets 5 copies, group 1 gets 1
    weights = torch.tensor([[0.9, 0.2, 0.5], [0.7, 0.4, 0.1]])
    keep = capacity_keep(ids, weights, experts_per_group=2, n_group=2, capacity_factor=1.0, exempt=None)
    assert keep.tolist() == [[True, False, True], [True, True, False]]  # group 0 keeps 0.9, 0.7, 0.5
    # An exempt sequence is never dropped and uses up budget first: sequence 1's two group-0 copies (0.7, 0.1)
    # take 2 of the 3 places, the best other copy (0.9) the last one; 0.5 and 0.2 are dropped.
    exempt = capacity_keep(ids, weights, 2, 2, 1.0, exempt=torch.tensor([False, True]))
    assert exempt.tolist() == [[True, False, False], [True, True, True]]
    assert capacity_keep(ids, weights, 2, 2, 2.0, exempt=None).all()  # twice the average share: nothing dropped


def test_moe_drops_only_in_training_and_counts_the_drops():
    moe = _moe(topk_method="greedy", n_group=4, topk_group=4)
    moe.capacity_factor = 0.5
    x = torch.randn(2, 16, 64)
    y_train, stats = moe(x)
    assert stats.dropped is not None and stats.dropped > 0
    # The dropped copies simply do not contribute: same as masking their gate weights by hand.
    ids, weights, _ = moe.gate(x.view(-1, 64))
    from model.moe import capacity_keep
    keep = capacity_keep(ids.view(2, -1), weights.view(2, -1), 2, 4, 0.5, None).view_as(ids)
    reference = LocalDispatcher()(x.view(-1, 64), ids.masked_fill(~keep, -1), weights * keep, moe.experts)
    torch.testing.assert_close(y_train, (reference.view(2, 16, 64) + moe.shared_experts(x)))
    moe.eval()
    y_eval, stats = moe(x)
    assert stats.dropped is None
    moe.capacity_factor = None
    moe.train()
    torch.testing.assert_close(y_eval, moe(x)[0])  # evaluation equals training without dropping


def test_exempt_sequences_are_about_the_fraction_and_layout_free():
    from model.moe import exempt_sequences
    ids = torch.randint(0, 1000, (4000, 32), generator=torch.Generator().manual_seed(0))
    chosen = exempt_sequences(ids, 0.1)
    assert 0.08 < chosen.float().mean() < 0.12
    assert torch.equal(chosen[1000:2000], exempt_sequences(ids[1000:2000], 0.1))  # the same in any split
