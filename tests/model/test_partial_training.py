"""Training parts of the model: experts trained through their own copies (ESFT) compute exactly what the whole
stack does, and activation checkpointing recomputes layers without changing the loss or any gradient."""

from __future__ import annotations

import torch

from model import CausalLM, next_token_labels
from model.moe import RoutedExperts
from trainer.presets import model_preset


def test_trainable_expert_copies_compute_what_the_stack_computes():
    torch.manual_seed(0)
    experts = RoutedExperts(6, 16, 8)
    torch.nn.init.normal_(experts.gate_up_proj, 0, 0.5)
    torch.nn.init.normal_(experts.down_proj, 0, 0.5)
    counts = torch.tensor([3, 0, 2, 4, 1, 2])  # expert 1 gets no token
    x = torch.randn(int(counts.sum()), 16, requires_grad=True)
    upstream = torch.randn(int(counts.sum()), 16)
    (experts(x, counts) * upstream).sum().backward()
    want_x, want_w = x.grad.clone(), experts.gate_up_proj.grad.clone()
    x.grad = None
    experts.set_trainable_experts([1, 3, 5])
    y = experts(x, counts)
    (y * upstream).sum().backward()
    torch.testing.assert_close(x.grad, want_x)
    torch.testing.assert_close(experts.gate_up_proj_trainable.grad, want_w[[1, 3, 5]])
    assert not experts.gate_up_proj.requires_grad and experts.gate_up_proj.grad is not None  # from the first pass
    with torch.no_grad():
        experts.gate_up_proj_trainable.add_(1.0)
    state = experts.state_dict()  # reading the state writes the copies back into the stack
    assert torch.equal(state["gate_up_proj"][[1, 3, 5]], experts.gate_up_proj_trainable.detach())


def test_activation_checkpointing_changes_no_loss_or_gradient():
    torch.manual_seed(0)
    model = CausalLM(model_preset("tiny", num_hidden_layers=3, vocab_size=256)).train()
    ids = torch.randint(0, 256, (2, 16), generator=torch.Generator().manual_seed(1))
    results = []
    for checkpointing in (False, True):
        model.zero_grad(set_to_none=True)
        model.activation_checkpointing = checkpointing
        out = model(ids, labels=next_token_labels(ids))
        (out.loss + out.aux_loss).backward()
        results.append((out.loss.detach().item(), {n: p.grad.clone() for n, p in model.named_parameters()}))
    assert results[0][0] == results[1][0]
    for name, grad in results[0][1].items():
        torch.testing.assert_close(results[1][1][name], grad, rtol=1e-5, atol=1e-7, msg=name)
