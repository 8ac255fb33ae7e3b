"""RoPE/YaRN numbers from docs/model.md §2.3 and §3, the interleaved-pair layout, and causal MLA / MHA / GQA
attention."""

from __future__ import annotations

import math

import pytest
import torch

from tests.conftest import tiny_hf_config
from model import CausalLM, ModelConfig
from model.attention import GroupedQueryAttention, MultiHeadLatentAttention
from model.rope import RotaryEmbedding, apply_rope, inv_frequencies, rope_cos_sin_scale, softmax_scale
from trainer.presets import model_preset


def test_yarn_frequencies_follow_the_spec_ramp():
    """V2: dims i <= 10 keep the base frequency, dims i >= 23 are interpolated by 40, in between linearly blended."""
    c = model_preset("v2")
    base = 1.0 / (10000.0 ** (torch.arange(0, 64, 2, dtype=torch.float64) / 64))
    freq = inv_frequencies(64, c.rope_theta, c.rope_scaling).double()
    torch.testing.assert_close(freq[:11], base[:11], rtol=1e-6, atol=0)
    torch.testing.assert_close(freq[23:], base[23:] / 40, rtol=1e-6, atol=0)
    ramp = (torch.arange(32, dtype=torch.float64)[11:23] - 10) / 13
    torch.testing.assert_close(freq[11:23], base[11:23] / 40 * ramp + base[11:23] * (1 - ramp), rtol=1e-6, atol=0)


def test_yarn_frequencies_match_transformers(transformers_ds):
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS
    config_cls, _ = transformers_ds
    hf = config_cls(**model_preset("v2").to_hf_config())
    ref, attention_factor = ROPE_INIT_FUNCTIONS["yarn"](hf)
    ours = inv_frequencies(64, 10000.0, model_preset("v2").rope_scaling)
    torch.testing.assert_close(ours, ref.float(), rtol=1e-6, atol=0)
    assert rope_cos_sin_scale(model_preset("v2").rope_scaling) == pytest.approx(attention_factor) == 1.0


def test_softmax_scale_carries_the_mscale_correction():
    """docs/model.md §2.3: 192^-0.5 * (0.1 * 0.707 * ln 40 + 1)^2 = 0.114721 for the released configs."""
    c = model_preset("v2")
    m = 0.1 * 0.707 * math.log(40) + 1
    assert softmax_scale(192, c.rope_scaling) == pytest.approx(192 ** -0.5 * m * m)
    assert softmax_scale(192, c.rope_scaling) == pytest.approx(0.114721, abs=1e-6)
    assert softmax_scale(192, None) == pytest.approx(192 ** -0.5)


def test_rope_rotates_adjacent_pairs_like_a_complex_product():
    x = torch.randn(2, 3, 5, 8)
    angles = torch.randn(2, 5, 4)
    out = apply_rope(x, angles.cos(), angles.sin())
    ref = torch.view_as_real(torch.view_as_complex(x.reshape(2, 3, 5, 4, 2)) * torch.polar(
        torch.ones_like(angles), angles)[:, None]).flatten(-2)
    torch.testing.assert_close(out, ref)
    # NeoX rotate-half on the raw (interleaved) layout is a different function: the docs/model.md §3.2 pitfall.
    x1, x2 = x.chunk(2, dim=-1)
    cos, sin = torch.cat([angles.cos()] * 2, -1)[:, None], torch.cat([angles.sin()] * 2, -1)[:, None]
    neox = x * cos + torch.cat((-x2, x1), -1) * sin
    assert (neox - out).abs().max() > 1e-2


def test_rope_keeps_fp32_frequencies_when_the_model_is_cast():
    model = CausalLM(ModelConfig.from_hf_config(tiny_hf_config())).to(torch.bfloat16)
    assert model.model.rotary_emb.inv_freq.dtype == torch.float32
    cos, _ = model.model.rotary_emb(torch.arange(100)[None])
    assert cos.dtype == torch.float32


@pytest.mark.parametrize("changes", [
    {},
    dict(q_lora_rank=None),
    dict(attention_type="mha", v_head_dim=16),
    dict(attention_type="gqa", num_key_value_heads=2, v_head_dim=16),
])
def test_attention_is_causal(changes):
    torch.manual_seed(0)
    c = ModelConfig.from_hf_config(tiny_hf_config(**changes))
    model = CausalLM(c).eval()
    ids = torch.randint(0, c.vocab_size, (2, 16))
    changed = ids.clone()
    changed[:, 10:] = (changed[:, 10:] + 1) % c.vocab_size
    with torch.no_grad():
        a, b = model(ids).logits, model(changed).logits
    torch.testing.assert_close(a[:, :10], b[:, :10])  # the future never leaks into the past
    assert (a[:, 10:] - b[:, 10:]).abs().max() > 1e-3


def test_attention_variants_are_selected_by_config():
    mla = CausalLM(ModelConfig.from_hf_config(tiny_hf_config()))
    assert isinstance(mla.model.layers[0].self_attn, MultiHeadLatentAttention)
    assert hasattr(mla.model.layers[0].self_attn, "q_a_proj")
    lite = CausalLM(ModelConfig.from_hf_config(tiny_hf_config(q_lora_rank=None)))
    assert hasattr(lite.model.layers[0].self_attn, "q_proj") and not hasattr(lite.model.layers[0].self_attn,
                                                                              "q_a_proj")
    gqa = CausalLM(ModelConfig.from_hf_config(tiny_hf_config(attention_type="gqa", num_key_value_heads=2,
                                                             v_head_dim=16)))
    attn = gqa.model.layers[0].self_attn
    assert isinstance(attn, GroupedQueryAttention) and attn.k_proj.weight.shape == (2 * 16, 64)


def test_gqa_equals_mha_with_repeated_key_value_heads():
    torch.manual_seed(0)
    c = ModelConfig.from_hf_config(tiny_hf_config(attention_type="gqa", num_key_value_heads=2, v_head_dim=16))
    gqa = GroupedQueryAttention(c)
    mha = GroupedQueryAttention(c.replace(attention_type="mha", num_key_value_heads=4))
    with torch.no_grad():
        for name in ("q_proj", "o_proj"):
            getattr(mha, name).weight.copy_(getattr(gqa, name).weight)
        for name in ("k_proj", "v_proj"):  # each kv head serves 2 consecutive query heads
            w = getattr(gqa, name).weight.view(2, 16, 64)
            getattr(mha, name).weight.copy_(w.repeat_interleave(2, dim=0).reshape(64, 64))
    x = torch.randn(2, 9, 64)
    rope = RotaryEmbedding(16, c)
    cos, sin = rope(torch.arange(9).expand(2, 9))
    torch.testing.assert_close(gqa(x, cos, sin), mha(x, cos, sin))
