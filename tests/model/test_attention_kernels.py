"""Attention kernel choice (docs/model.md §2.4): every path `_causal_attention` can take on this machine against an
explicit fp32 softmax(QK^T * scale + mask) V, forward and backward, with MLA's unequal widths, GQA and packed
documents; the kernel names `attention_kernel` gives; the CUDA paths (cuDNN, padded flash, FlexAttention) where a
GPU is present."""

from __future__ import annotations

import warnings

import pytest
import torch
import torch.nn.functional as F

import model.attention as attention
from model import ModelConfig
from model.attention import (MultiHeadLatentAttention, _causal_attention, attention_kernel, document_block_mask,
                             document_causal_mask)
from model.rope import RotaryEmbedding
from tests.conftest import tiny_hf_config

cuda_only = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")


def reference(q, k, v, scale, allowed):
    """Explicit fp32 attention; allowed (B or 1, 1, S, T) bool, True = may attend. Key/value heads are repeated
    for GQA (query head h reads kv head h // (H / Hkv))."""
    q, k, v = q.float(), k.float(), v.float()
    group = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(group, dim=1), v.repeat_interleave(group, dim=1)
    scores = (q @ k.transpose(-1, -2)) * scale
    return scores.masked_fill(~allowed, float("-inf")).softmax(dim=-1) @ v


def causal(S, device="cpu"):
    return torch.ones(S, S, dtype=torch.bool, device=device).tril()[None, None]


def packed_documents(B, S, device="cpu"):
    """Document ids with a boundary inside every row, one-token documents and a document spanning a 128 block."""
    ids = torch.zeros(B, S, dtype=torch.long)
    for b in range(B):
        cuts = sorted({3 + b, 4 + b, S // 3, S // 3 + 1, S - 1 - b})
        for cut in cuts:
            ids[b, cut:] += 1
    return ids.to(device)


def allowed_of(ids):
    S = ids.shape[1]
    return ((ids[:, :, None] == ids[:, None, :]) & causal(S, ids.device)[0, 0])[:, None]


def qkv(B, H, Hkv, S, q_dim, v_dim, dtype=torch.float32, device="cpu"):
    g = torch.Generator().manual_seed(0)
    make = lambda h, d: torch.randn(B, h, S, d, generator=g).to(device, dtype).requires_grad_()
    return make(H, q_dim), make(Hkv, q_dim), make(Hkv, v_dim)


def check_against_reference(q, k, v, mask, allowed, atol, rtol, backward=True):
    scale = q.shape[-1] ** -0.5
    out = _causal_attention(q, k, v, scale, mask, enable_gqa=k.shape[1] != q.shape[1])
    ref = reference(q, k, v, scale, allowed)
    assert out.shape == ref.shape
    torch.testing.assert_close(out.float(), ref, atol=atol, rtol=rtol)
    if backward:
        grad = torch.randn_like(ref)
        got = torch.autograd.grad(out, (q, k, v), grad.to(out.dtype))
        want = torch.autograd.grad(ref, (q, k, v), grad)
        for a, b in zip(got, want):
            torch.testing.assert_close(a.float(), b.float(), atol=atol, rtol=rtol)


SHAPES = {  # H, Hkv, q/k width, v width
    "mla_tiny": (4, 4, 48, 32),
    "mla_lite_head": (2, 2, 192, 128),
    "mha": (4, 4, 16, 16),
    "gqa": (4, 2, 16, 16),
}


@pytest.mark.parametrize("packed", [False, True], ids=["causal", "packed"])
@pytest.mark.parametrize("shape", SHAPES.values(), ids=SHAPES.keys())
def test_cpu_paths_match_the_explicit_reference(shape, packed):
    H, Hkv, q_dim, v_dim = shape
    B, S = 2, 40
    q, k, v = qkv(B, H, Hkv, S, q_dim, v_dim)
    ids = packed_documents(B, S)
    mask = document_causal_mask(ids) if packed else None
    assert mask is None or isinstance(mask, torch.Tensor)  # CPU: dense mask, SDPA's flash kernel
    check_against_reference(q, k, v, mask, allowed_of(ids) if packed else causal(S), atol=2e-5, rtol=1e-4)


@pytest.mark.parametrize("shape", SHAPES.values(), ids=SHAPES.keys())
def test_flex_path_matches_the_reference_forward_on_cpu(shape):
    """The BlockMask path CUDA takes for packed documents, run by eager FlexAttention (no CPU backward)."""
    H, Hkv, q_dim, v_dim = shape
    B, S = 2, 160  # two 128-position blocks, one partly filled
    ids = packed_documents(B, S)
    block_mask = document_block_mask(ids)
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # eager flex_attention warns that it is unfused
        q, k, v = (t.detach() for t in qkv(B, H, Hkv, S, q_dim, v_dim))
        check_against_reference(q, k, v, block_mask, allowed_of(ids), atol=2e-5, rtol=1e-4, backward=False)


def test_block_mask_skips_blocks_no_document_spans():
    S = 512
    ids = torch.zeros(1, S, dtype=torch.long)
    ids[0, 256:] = 1  # two documents of two 128-blocks each: 3 of the 4 causal blocks per document, none across
    block_mask = document_block_mask(ids)
    assert block_mask.kv_num_blocks.sum() + block_mask.full_kv_num_blocks.sum() == 6
    torch.testing.assert_close(block_mask.to_dense()[0, 0].bool(),
                               allowed_of(ids)[0, 0].reshape(4, 128, 4, 128).any(3).any(1))


def test_cpu_pads_v_for_the_flash_kernel(monkeypatch):
    """On CPU padded v on the flash kernel beats unequal widths on the math path (docs/model.md §2.4)."""
    widths = []
    sdpa = F.scaled_dot_product_attention
    monkeypatch.setattr(F, "scaled_dot_product_attention", lambda q, k, v, **kw: widths.append(v.shape[-1]) or sdpa(
        q, k, v, **kw))
    q, k, v = qkv(1, 2, 2, 8, 48, 32)
    assert _causal_attention(q, k, v, 0.1).shape[-1] == 32
    assert widths == [48]


def test_kernel_names_on_cpu():
    f32, bf16 = torch.float32, torch.bfloat16
    assert attention_kernel(48, 32, torch.device("cpu"), f32, False) == "flash(cpu, padded v)"
    assert attention_kernel(192, 128, "cpu", bf16, False) == "flash(cpu, padded v)"
    assert attention_kernel(64, 64, "cpu", f32, False) == "flash(cpu)"
    assert attention_kernel(48, 32, "cpu", f32, True) == "flash(cpu, padded v), dense mask"


@pytest.mark.parametrize("facts, q_dim, v_dim, dtype, want", [
    ((9, 0, 91002, True), 192, 128, torch.bfloat16, "cudnn"),  # H100/H200, cuDNN 9.10: widths up to 256
    ((9, 0, 91002, True), 192, 128, torch.float16, "cudnn"),
    ((9, 0, 91002, True), 48, 32, torch.bfloat16, "cudnn"),
    ((9, 0, 90800, True), 192, 128, torch.bfloat16, "flash(padded v)"),  # cuDNN 9.8: widths up to 128
    ((9, 0, 91002, False), 192, 128, torch.bfloat16, "flash(padded v)"),  # cuDNN SDPA switched off
    ((9, 0, 91002, True), 192, 128, torch.float32, "mem-efficient"),
    ((9, 0, 91002, True), 128, 128, torch.bfloat16, "flash"),
    ((8, 0, 91002, True), 192, 128, torch.bfloat16, "flash(padded v)"),  # A100: 128 at most
    ((8, 0, 91002, True), 48, 32, torch.bfloat16, "cudnn"),
    ((8, 9, 91002, True), 44, 36, torch.bfloat16, "flash(padded v)"),  # not multiples of 8
    ((10, 0, 91100, True), 192, 128, torch.bfloat16, "cudnn"),  # B200: the DeepSeek pair
    ((10, 0, 91100, True), 256, 128, torch.bfloat16, "flash(padded v)"),
    ((7, 5, 91002, True), 48, 32, torch.float16, "flash(padded v)"),  # cuDNN SDPA needs sm80+
])
def test_kernel_names_on_cuda(monkeypatch, facts, q_dim, v_dim, dtype, want):
    monkeypatch.setattr(attention, "_cuda_facts", lambda index: facts)
    assert attention_kernel(q_dim, v_dim, torch.device("cuda", 0), dtype, False) == want
    assert attention_kernel(q_dim, v_dim, "cuda", dtype, True) == "flex"


def mla(seed=0, **changes):
    """An MLA block with the tiny preset's head widths: q/k 32 + 16 = 48, v 32, 4 heads."""
    torch.manual_seed(seed)
    c = ModelConfig.from_hf_config(tiny_hf_config(qk_nope_head_dim=32, qk_rope_head_dim=16, v_head_dim=32,
                                                  **changes))
    return MultiHeadLatentAttention(c), RotaryEmbedding(c.qk_rope_head_dim, c)


def test_packed_documents_equal_separate_sequences():
    """MLA over packed documents (positions restarting per document) equals running each document alone."""
    attn, rope = mla()
    lengths = [5, 1, 9, 7]
    x = torch.randn(1, sum(lengths), 64)
    ids = torch.cat([torch.full((n,), i) for i, n in enumerate(lengths)])[None]
    positions = torch.cat([torch.arange(n) for n in lengths])[None]
    packed = attn(x, *rope(positions), document_causal_mask(ids))
    alone = torch.cat([attn(part, *rope(torch.arange(part.shape[1])[None]))
                       for part in x.split(lengths, dim=1)], dim=1)
    torch.testing.assert_close(packed, alone, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("packed", [False, True], ids=["causal", "packed"])
def test_mla_compiles_as_one_graph(packed):
    """torch.compile(fullgraph=True) of the attention block, as the trainer compiles each layer: the kernel choice
    branches on device, dtype and widths only. aot_eager traces forward and backward without code generation."""
    attn, rope = mla()
    B, S = 2, 24
    x = torch.randn(B, S, 64, requires_grad=True)
    cos, sin = rope(torch.arange(S).expand(B, S))
    mask = document_causal_mask(packed_documents(B, S)) if packed else None
    compiled = torch.compile(attn, fullgraph=True, backend="aot_eager")
    out, ref = compiled(x, cos, sin, mask), attn(x, cos, sin, mask)
    torch.testing.assert_close(out, ref)
    grad = torch.randn_like(ref)
    torch.testing.assert_close(torch.autograd.grad(out, x, grad)[0], torch.autograd.grad(ref, x, grad)[0])


# --- CUDA: cuDNN / padded flash / mem-efficient through SDPA, FlexAttention for packed documents ----------------

@cuda_only
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("shape", SHAPES.values(), ids=SHAPES.keys())
def test_cuda_sdpa_paths_match_the_reference(shape, dtype):
    H, Hkv, q_dim, v_dim = shape
    q, k, v = qkv(2, H, Hkv, 256, q_dim, v_dim, dtype, "cuda")
    tol = 1e-4 if dtype == torch.float32 else 2e-2
    check_against_reference(q, k, v, None, causal(256, "cuda"), atol=tol, rtol=tol)


@cuda_only
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("shape", SHAPES.values(), ids=SHAPES.keys())
def test_cuda_flex_path_matches_the_reference(shape, dtype):
    H, Hkv, q_dim, v_dim = shape
    ids = packed_documents(2, 300, "cuda")
    mask = document_causal_mask(ids)
    assert isinstance(mask, attention.BlockMask)
    q, k, v = qkv(2, H, Hkv, 300, q_dim, v_dim, dtype, "cuda")
    tol = 1e-4 if dtype == torch.float32 else 2e-2
    check_against_reference(q, k, v, mask, allowed_of(ids), atol=tol, rtol=tol)


@cuda_only
def test_cuda_kernel_named_cudnn_is_accepted_by_cudnn():
    """Where `attention_kernel` says "cudnn", torch's cuDNN backend alone must run these widths."""
    from torch.nn.attention import SDPBackend, sdpa_kernel
    for q_dim, v_dim in ((192, 128), (48, 32)):
        if attention_kernel(q_dim, v_dim, torch.device("cuda"), torch.bfloat16, False) != "cudnn":
            continue
        q, k, v = qkv(1, 4, 4, 128, q_dim, v_dim, torch.bfloat16, "cuda")
        with sdpa_kernel(SDPBackend.CUDNN_ATTENTION):
            out = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        out.sum().backward()
        assert out.shape[-1] == v_dim


@cuda_only
@pytest.mark.parametrize("packed", [False, True], ids=["causal", "packed"])
def test_cuda_mla_compiles_as_one_graph(packed):
    attn, rope = mla()
    attn, rope = attn.cuda().to(torch.bfloat16), rope.cuda()
    B, S = 2, 256
    x = torch.randn(B, S, 64, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    cos, sin = rope(torch.arange(S, device="cuda").expand(B, S))
    mask = document_causal_mask(packed_documents(B, S, "cuda")) if packed else None
    out, ref = torch.compile(attn, fullgraph=True)(x, cos, sin, mask), attn(x, cos, sin, mask)
    torch.testing.assert_close(out, ref, atol=2e-2, rtol=2e-2)
    out.float().sum().backward()
    assert torch.isfinite(x.grad).all()
