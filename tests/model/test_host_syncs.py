"""Routing without host syncs (docs/performance.md): one MoE layer's forward and backward under the local
dispatcher read no tensor value on the host, with and without token dropping. The all-to-all dispatcher's budget
(one sync per layer, its split sizes) is checked under torchrun in tests/distributed/ep_check.py."""

from __future__ import annotations

import pytest
import torch

from model import CausalLM, next_token_labels
from model.moe import MoE
from tests.syncs import SyncCounter
from trainer.presets import model_preset


def _moe_layer(capacity: float | None) -> MoE:
    torch.manual_seed(0)
    moe = MoE(model_preset("tiny")).train()
    for p in moe.parameters():
        torch.nn.init.normal_(p, 0.0, 0.05)
    moe.capacity_factor = capacity
    return moe


@pytest.mark.parametrize("capacity", [None, 1.0])
def test_moe_layer_forward_and_backward_sync_the_host_zero_times(capacity):
    moe = _moe_layer(capacity)
    x = torch.randn(4, 32, moe.gate.weight.shape[1], requires_grad=True)
    exempt = torch.tensor([True, False, False, False])
    with SyncCounter().python_reads() as counter:
        y, stats = moe(x, exempt)
        (y.square().mean() + stats.expert_probs.sum()).backward()
    assert counter.total == 0, dict(counter.counts)
    if capacity is not None:
        assert float(stats.dropped) > 0  # the dropping path ran


def test_the_counter_sees_the_syncs_it_is_meant_to_catch():
    """The counter is not blind: each kind of host read is counted."""
    t = torch.tensor([0, 2, 1])
    with SyncCounter().python_reads() as counter:
        t.nonzero()
        t.tolist()
        t.sum().item()
        torch.bincount(t)
        torch.repeat_interleave(t, t)
        t[t > 0]
    assert counter.counts["aten.nonzero"] >= 1 and counter.counts["Tensor.tolist"] == 1
    assert counter.counts["Tensor.item"] == 1 and counter.counts["aten.bincount"] == 1
    assert counter.counts["repeat_interleave without output_size"] == 1
    assert counter.counts["boolean indexing"] == 1


def test_a_whole_training_forward_and_backward_syncs_the_host_zero_times():
    """Every layer, the balance losses and the chunked cross-entropy: nothing reads a value on the host."""
    torch.manual_seed(0)
    model = CausalLM(model_preset("tiny", num_hidden_layers=3, vocab_size=512)).train()
    model.set_token_dropping(1.0)
    ids = torch.randint(0, 512, (2, 32))
    with SyncCounter().python_reads() as counter:
        out = model(ids, labels=next_token_labels(ids))
        (out.loss + out.aux_loss).backward()
    assert counter.total == 0, dict(counter.counts)
