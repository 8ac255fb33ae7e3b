"""The chunked fp32 cross-entropy equals torch's fp32 cross-entropy, in value and gradient, for any chunking."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import model.loss as loss_module
from model.loss import IGNORE_INDEX, cross_entropy


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("rows_per_chunk", [1, 7, 10_000])
def test_matches_fp32_cross_entropy(monkeypatch, dtype, rows_per_chunk):
    monkeypatch.setattr(loss_module, "_rows_per_chunk", lambda logits: rows_per_chunk)
    torch.manual_seed(0)
    logits = (3 * torch.randn(50, 97)).to(dtype).requires_grad_()
    targets = torch.randint(0, 97, (50,))
    targets[::4] = IGNORE_INDEX
    before = logits.detach().clone()
    ours = cross_entropy(logits, targets)
    (grad,) = torch.autograd.grad(2.5 * ours, logits)
    assert torch.equal(logits.detach(), before)  # the in-place backward never touches the input
    ref = F.cross_entropy(logits.float(), targets, ignore_index=IGNORE_INDEX)
    (ref_grad,) = torch.autograd.grad(2.5 * ref, logits)
    assert ours.dtype == torch.float32
    torch.testing.assert_close(ours, ref, rtol=1e-6, atol=1e-6)
    assert grad.dtype == dtype
    torch.testing.assert_close(grad.float(), ref_grad.float(), rtol=1e-5, atol=1e-7 if dtype == torch.float32 else 1e-3)


def test_no_supervised_token_gives_zero_loss_and_zero_grad():
    logits = torch.randn(6, 11, requires_grad=True)
    loss = cross_entropy(logits, torch.full((6,), IGNORE_INDEX))
    loss.backward()
    assert loss.item() == 0.0 and torch.equal(logits.grad, torch.zeros_like(logits))


@pytest.mark.parametrize("bad", [-1, 11])
def test_out_of_range_targets_are_refused(bad):
    with pytest.raises(RuntimeError, match="every target must be in"):
        cross_entropy(torch.randn(4, 11), torch.tensor([0, 3, bad, IGNORE_INDEX]))
