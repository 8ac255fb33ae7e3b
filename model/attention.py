"""Attention: Multi-head Latent Attention (DeepSeek-V2, docs/model.md §2) and the MHA/GQA baselines of the paper's
ablations.

Shape legend: B batch, S sequence, D model width, H query heads, Hkv key/value heads, r kv_lora_rank,
dn qk_nope_head_dim, dr qk_rope_head_dim, dv v_head_dim, dh head width of the baselines.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .config import ModelConfig
from .layers import RMSNorm
from .rope import apply_rope, softmax_scale


def _causal_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float,
                      mask: torch.Tensor | None = None, enable_gqa: bool = False) -> torch.Tensor:
    """Causal SDPA; the fused kernels accumulate the softmax in fp32 for bf16 inputs, as the eager reference does.
    `mask` (B, 1, S, S) bool, True = may attend, replaces the plain causal mask (packed documents).

    When v is narrower than q/k (MLA: 128 vs 192) it is zero-padded to the q/k width and the output sliced back, as
    the released FlashAttention-2 path does (docs/model.md §2.4): flash kernels need equal head widths, and on CPU
    the flash kernel beats the unfused math path that unequal widths would fall back to.
    """
    v_dim = v.shape[-1]
    if v_dim < q.shape[-1]:
        v = F.pad(v, (0, q.shape[-1] - v_dim))
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=mask is None, scale=scale,
                                         enable_gqa=enable_gqa)
    return out[..., :v_dim]


def document_causal_mask(document_ids: torch.Tensor) -> torch.Tensor:
    """(B, S) document ids -> (B, 1, S, S) bool: attend to earlier positions of the same document only."""
    S = document_ids.shape[1]
    same = document_ids[:, :, None] == document_ids[:, None, :]  # (B, S, S)
    causal = torch.ones(S, S, dtype=torch.bool, device=document_ids.device).tril()
    return (same & causal).unsqueeze(1)


class LatentCache:
    """MLA's inference cache for one layer: the compressed latent c^KV (after its norm) and the shared RoPE key
    (rotated), r + dr numbers per token instead of H x (dn + dr + dv) (paper §2.1.2). Keys and values of the heads
    are re-expanded from the latent with kv_b_proj at each step."""

    def __init__(self):
        self.latent: torch.Tensor | None = None  # (B, T, r)
        self.k_pe: torch.Tensor | None = None  # (B, 1, T, dr)

    @property
    def length(self) -> int:
        return 0 if self.latent is None else self.latent.shape[1]

    def append(self, latent: torch.Tensor, k_pe: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        self.latent = latent if self.latent is None else torch.cat((self.latent, latent), dim=1)
        self.k_pe = k_pe if self.k_pe is None else torch.cat((self.k_pe, k_pe), dim=2)
        return self.latent, self.k_pe


class MultiHeadLatentAttention(nn.Module):
    """MLA: low-rank joint KV compression plus a decoupled RoPE key shared by all heads (paper §2.1, Eqs. 37-47).

    Attribute names are the released checkpoint's, so the HF adapter needs no renaming here.
    """

    def __init__(self, config: ModelConfig):
        super().__init__()
        self.n_heads = config.num_attention_heads
        self.nope_dim, self.rope_dim = config.qk_nope_head_dim, config.qk_rope_head_dim
        self.v_dim, self.kv_rank = config.v_head_dim, config.kv_lora_rank
        qk_dim = self.nope_dim + self.rope_dim
        d = config.hidden_size
        if config.q_lora_rank is None:  # V2-Lite: no query compression
            self.q_proj = nn.Linear(d, self.n_heads * qk_dim, bias=False)
        else:
            self.q_a_proj = nn.Linear(d, config.q_lora_rank, bias=False)
            self.q_a_layernorm = RMSNorm(config.q_lora_rank)  # eps 1e-6 as released, not rms_norm_eps
            self.q_b_proj = nn.Linear(config.q_lora_rank, self.n_heads * qk_dim, bias=False)
        # Rows [0, r) give the latent c^KV; rows [r, r + dr) give the single shared RoPE key ("MQA" part).
        self.kv_a_proj_with_mqa = nn.Linear(d, self.kv_rank + self.rope_dim, bias=False)
        self.kv_a_layernorm = RMSNorm(self.kv_rank)
        self.kv_b_proj = nn.Linear(self.kv_rank, self.n_heads * (self.nope_dim + self.v_dim), bias=False)
        self.o_proj = nn.Linear(self.n_heads * self.v_dim, d, bias=False)
        self.scale = softmax_scale(qk_dim, config.rope_scaling)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                mask: torch.Tensor | None = None, cache: LatentCache | None = None) -> torch.Tensor:
        """With `cache` (generation): x holds the new positions only, which attend to the cached ones too."""
        B, S, _ = x.shape
        if hasattr(self, "q_proj"):
            q = self.q_proj(x)
        else:
            q = self.q_b_proj(self.q_a_layernorm(self.q_a_proj(x)))
        q = q.view(B, S, self.n_heads, -1).transpose(1, 2)  # (B, H, S, dn + dr)
        q_nope, q_pe = q.split([self.nope_dim, self.rope_dim], dim=-1)

        latent, k_pe = self.kv_a_proj_with_mqa(x).split([self.kv_rank, self.rope_dim], dim=-1)  # (B,S,r), (B,S,dr)
        latent = self.kv_a_layernorm(latent)
        k_pe = apply_rope(k_pe.unsqueeze(1), cos, sin)  # (B, 1, S, dr): one RoPE key for all heads
        past = cache.length if cache is not None else 0
        if cache is not None:
            latent, k_pe = cache.append(latent, k_pe)  # (B, T, r), (B, 1, T, dr) with T = past + S
        T = latent.shape[1]
        kv = self.kv_b_proj(latent)
        kv = kv.view(B, T, self.n_heads, self.nope_dim + self.v_dim).transpose(1, 2)  # (B, H, T, dn + dv)
        k_nope, v = kv.split([self.nope_dim, self.v_dim], dim=-1)

        q_pe = apply_rope(q_pe, cos, sin)  # (B, H, S, dr)
        q = torch.cat((q_nope, q_pe), dim=-1)  # (B, H, S, dn + dr)
        k = torch.cat((k_nope, k_pe.expand(-1, self.n_heads, -1, -1)), dim=-1)  # (B, H, T, dn + dr)

        if past and mask is None:  # new position i (absolute past + i) sees keys 0 .. past + i
            mask = (torch.arange(T, device=x.device)[None, :] <= past + torch.arange(S, device=x.device)[:, None])
            mask = mask[None, None]
        out = _causal_attention(q, k, v, self.scale, mask)  # (B, H, S, dv)
        return self.o_proj(out.transpose(1, 2).reshape(B, S, self.n_heads * self.v_dim))


class GroupedQueryAttention(nn.Module):
    """Standard attention with RoPE on the whole head: MHA when Hkv == H, GQA otherwise (ablation baselines)."""

    def __init__(self, config: ModelConfig):
        super().__init__()
        self.n_heads = config.num_attention_heads
        self.n_kv_heads = config.num_key_value_heads if config.attention_type == "gqa" else self.n_heads
        self.head_dim = config.head_dim
        d = config.hidden_size
        self.q_proj = nn.Linear(d, self.n_heads * self.head_dim, bias=False)
        self.k_proj = nn.Linear(d, self.n_kv_heads * self.head_dim, bias=False)
        self.v_proj = nn.Linear(d, self.n_kv_heads * self.head_dim, bias=False)
        self.o_proj = nn.Linear(self.n_heads * self.head_dim, d, bias=False)
        self.scale = softmax_scale(self.head_dim, config.rope_scaling)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                mask: torch.Tensor | None = None) -> torch.Tensor:
        B, S, _ = x.shape
        q = self.q_proj(x).view(B, S, self.n_heads, self.head_dim).transpose(1, 2)  # (B, H, S, dh)
        k = self.k_proj(x).view(B, S, self.n_kv_heads, self.head_dim).transpose(1, 2)  # (B, Hkv, S, dh)
        v = self.v_proj(x).view(B, S, self.n_kv_heads, self.head_dim).transpose(1, 2)  # (B, Hkv, S, dh)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        out = _causal_attention(q, k, v, self.scale, mask, enable_gqa=self.n_kv_heads != self.n_heads)  # (B,H,S,dh)
        return self.o_proj(out.transpose(1, 2).reshape(B, S, self.n_heads * self.head_dim))


def build_attention(config: ModelConfig) -> nn.Module:
    if config.attention_type == "mla":
        return MultiHeadLatentAttention(config)
    return GroupedQueryAttention(config)


def rope_dim(config: ModelConfig) -> int:
    """Width RoPE rotates: the decoupled key for MLA, the whole head for the baselines."""
    return config.qk_rope_head_dim if config.attention_type == "mla" else config.head_dim
