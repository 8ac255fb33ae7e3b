"""RMSNorm: the released numerics outside autocast, the autocast dtype (and no fp32 activation copy) inside it, and a
graph torch.compile takes whole."""

from __future__ import annotations

import pytest
import torch

from model.layers import RMSNorm


def _norm(dim: int = 64, eps: float = 1e-6) -> RMSNorm:
    norm = RMSNorm(dim, eps)
    with torch.no_grad():
        norm.weight.copy_(torch.randn(dim, generator=torch.Generator().manual_seed(1)) * 0.5 + 1.0)
    return norm


def _released(dim: int = 64, eps: float = 1e-6):
    modeling = pytest.importorskip("transformers.models.deepseek_v2.modeling_deepseek_v2")
    ref = modeling.DeepseekV2RMSNorm(dim, eps)
    ref.load_state_dict(_norm(dim, eps).state_dict())
    return ref


def _input(dtype=torch.float32) -> torch.Tensor:
    return (torch.randn(3, 7, 64, generator=torch.Generator().manual_seed(2)) * 3).to(dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_outside_autocast_bitwise_the_released_norm(dtype):
    norm, ref = _norm(), _released()
    x = _input(dtype)
    y = norm(x)
    assert y.dtype == torch.float32  # fp32 weight times an activation of either dtype, as released
    assert torch.equal(y, ref(x))
    if dtype == torch.bfloat16:  # a model kept in bf16
        y16 = _norm().to(torch.bfloat16)(x)
        assert y16.dtype == torch.bfloat16 and torch.equal(y16, ref.to(torch.bfloat16)(x))


def test_under_autocast_the_output_is_bf16_as_a_bf16_model_computes_it():
    norm = _norm()
    x = _input()  # the fp32 residual stream of an fp32 model under autocast
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = norm(x)
        y_from_bf16 = norm(x.to(torch.bfloat16))
    assert y.dtype == torch.bfloat16 and y_from_bf16.dtype == torch.bfloat16
    torch.testing.assert_close(y.float(), norm(x), rtol=3 * 2**-8, atol=0)  # weight, input, product rounded
    # A bf16 activation normalises exactly as the released code does in a model kept in bf16.
    assert torch.equal(y_from_bf16, _released().to(torch.bfloat16)(x.to(torch.bfloat16)))
    # The weight stays fp32 and gets an fp32 gradient.
    with torch.autocast("cpu", dtype=torch.bfloat16):
        norm(x).float().pow(2).sum().backward()
    assert norm.weight.grad is not None and norm.weight.grad.dtype == torch.float32


def test_under_autocast_no_fp32_activation_is_saved_for_backward():
    """What backward keeps of an (N, D) fp32 input: the input itself (the residual stream, alive anyway), and in the
    autocast dtype otherwise; before, the normalised fp32 activation was kept too."""
    norm = _norm()
    x = _input().requires_grad_()
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            norm(x)
    full_fp32 = [t for t in saved if t.dtype == torch.float32 and t.numel() == x.numel()]
    assert saved and all(t.untyped_storage().data_ptr() == x.untyped_storage().data_ptr() for t in full_fp32), \
        [(t.dtype, tuple(t.shape)) for t in saved]
    assert any(t.dtype == torch.bfloat16 and t.numel() == x.numel() for t in saved)


@pytest.mark.parametrize("autocast", [False, True])
def test_compiles_as_one_graph(autocast):
    norm = _norm()
    compiled = torch.compile(norm, fullgraph=True, backend="aot_eager")
    x = _input()
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        y, want = compiled(x), norm(x)
    assert y.dtype == want.dtype == (torch.bfloat16 if autocast else torch.float32)
    assert torch.equal(y, want)
