"""Attention: Multi-head Latent Attention (DeepSeek-V2, docs/model.md §2) and the MHA/GQA baselines of the paper's
ablations.

Shape legend: B batch, S sequence, D model width, H query heads, Hkv key/value heads, r kv_lora_rank,
dn qk_nope_head_dim, dr qk_rope_head_dim, dv v_head_dim, dh head width of the baselines.
"""

from __future__ import annotations

import functools
import sys
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.attention import SDPBackend, sdpa_kernel

if TYPE_CHECKING:  # imported where used: importing FlexAttention imports torch._dynamo (seconds per process)
    from torch.nn.attention.flex_attention import BlockMask

from .config import ModelConfig
from .layers import RMSNorm
from .rope import apply_rope, softmax_scale


# SDPA backends in the order tried when cuDNN takes MLA's unequal head widths (docs/model.md §2.4).
_CUDNN_FIRST = [SDPBackend.CUDNN_ATTENTION, SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION,
                SDPBackend.MATH]


def _cuda_facts(index: int | None) -> tuple[int, int, int, bool]:
    """(major, minor) compute capability of CUDA device `index`, the cuDNN runtime version (9.10.2 -> 91002) and
    whether cuDNN SDPA may run (enabled, and not ruled out by strict deterministic algorithms). torch.compile takes
    the result as a constant, so the kernel choice stays a compile-time branch."""
    index = torch.cuda.current_device() if index is None else index
    major, minor = torch.cuda.get_device_capability(index)
    strict = torch.are_deterministic_algorithms_enabled() and not torch.is_deterministic_algorithms_warn_only_enabled()
    return major, minor, torch.backends.cudnn.version() or 0, torch.backends.cuda.cudnn_sdp_enabled() and not strict


@functools.cache
def _constant(fn):
    """`fn` as a result torch.compile takes as a constant (applied on first use: the decorator imports
    torch._dynamo, seconds per process)."""
    return torch.compiler.assume_constant_result(fn)


def _cudnn_takes(q_dim: int, v_dim: int, facts: tuple[int, int, int, bool]) -> bool:
    """Whether torch's cuDNN SDPA backend accepts these head widths (its published limits, docs/model.md §2.4):
    sm80-sm121 with cuDNN >= 9; widths multiples of 8 and at most 128, 256 on sm90 with cuDNN >= 9.10, and the
    DeepSeek pair 192/128 on sm100 with cuDNN >= 9.11."""
    major, minor, version, allowed = facts
    if not allowed or version < 90000 or not (8, 0) <= (major, minor) <= (12, 1):
        return False
    limit = 128
    if version >= 91000 and (major, minor) == (9, 0):
        limit = 256
    if version >= 91100 and major == 10 and (q_dim, v_dim) == (192, 128):
        limit = 192
    return max(q_dim, v_dim) <= limit and q_dim % 8 == 0 and v_dim % 8 == 0


def _sdpa_kernel(q_dim: int, v_dim: int, device: torch.device, dtype: torch.dtype) -> str:
    """The SDPA kernel for a causal or dense-masked call; "padded v" in the name means v is zero-padded to q_dim."""
    padded = v_dim < q_dim
    if device.type == "cuda":
        if dtype not in (torch.float16, torch.bfloat16):
            return "mem-efficient"  # flash and cuDNN need half precision; mem-efficient takes unequal widths
        if padded and _cudnn_takes(q_dim, v_dim, _constant(_cuda_facts)(device.index)):
            return "cudnn"
        return "flash(padded v)" if padded else "flash"
    if device.type == "cpu":  # the CPU flash kernel needs equal widths and beats the math path (docs/model.md §2.4)
        return "flash(cpu, padded v)" if padded else "flash(cpu)"
    return "sdpa(padded v)" if padded else "sdpa"


def attention_kernel(q_dim: int, v_dim: int, device: torch.device, dtype: torch.dtype, packed: bool) -> str:
    """Name of the kernel `_causal_attention` runs for q/k of width q_dim and v of width v_dim on `device`/`dtype`;
    `packed`: with document_ids (SFT packing), whose mask `document_causal_mask` builds. Names: "flex" (CUDA,
    packed), "cudnn" (unpadded v), "flash(padded v)", "flash", "mem-efficient" (CUDA fp32), "flash(cpu, padded v)",
    "flash(cpu)", with ", dense mask" appended where packed sequences take a dense (B, 1, S, S) mask."""
    device = torch.device(device)
    if packed and device.type == "cuda":
        return "flex"
    return _sdpa_kernel(q_dim, v_dim, device, dtype) + (", dense mask" if packed else "")


@functools.cache
def _compiled(fn):
    """`fn` compiled once for eager callers: flex_attention and create_block_mask are only fused when compiled."""
    return torch.compile(fn, dynamic=False)


def _causal_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float,
                      mask: torch.Tensor | BlockMask | None = None, enable_gqa: bool = False) -> torch.Tensor:
    """Causal attention; the fused kernels accumulate the softmax in fp32 for bf16 inputs, as the eager reference
    does. `mask`: None (plainly causal), a (B, 1, S, T) bool tensor, True = may attend, or a BlockMask from
    `document_causal_mask` (packed documents on CUDA, run by FlexAttention).

    Kernel choice (`attention_kernel`, docs/model.md §2.4): where torch's cuDNN backend takes MLA's unequal widths
    (q/k 192, v 128 in half precision on sm90 with cuDNN >= 9.10, ...) v stays unpadded and cuDNN goes first;
    elsewhere v is zero-padded to the q/k width and the output sliced back, as the released FlashAttention-2 path
    does, so flash kernels (CUDA, and CPU where flash beats the math path that unequal widths fall back to) apply.
    """
    if _is_block_mask(mask):  # widths may differ: FlexAttention needs no padding
        from torch.nn.attention.flex_attention import flex_attention
        flex = flex_attention if torch.compiler.is_compiling() or not q.is_cuda else _compiled(flex_attention)
        return flex(q, k, v, block_mask=mask, scale=scale, enable_gqa=enable_gqa)
    kernel = _sdpa_kernel(q.shape[-1], v.shape[-1], q.device, q.dtype)
    if kernel == "cudnn":
        with sdpa_kernel(_CUDNN_FIRST, set_priority=True):
            return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=mask is None, scale=scale,
                                                  enable_gqa=enable_gqa)
    v_dim = v.shape[-1]
    if "padded v" in kernel:
        v = F.pad(v, (0, q.shape[-1] - v_dim))
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=mask is None, scale=scale,
                                         enable_gqa=enable_gqa)
    return out[..., :v_dim]


def _is_block_mask(mask) -> bool:
    """Whether `mask` is a FlexAttention BlockMask (only possible once FlexAttention was imported)."""
    flex = sys.modules.get("torch.nn.attention.flex_attention")
    return flex is not None and isinstance(mask, flex.BlockMask)


def document_block_mask(document_ids: torch.Tensor) -> BlockMask:
    """(B, S) document ids -> FlexAttention BlockMask: attend to earlier positions of the same document only.
    Blocks of 128 x 128 positions that no document spans are skipped, so packed sequences cost what their
    documents cost instead of a full causal S x S."""
    def same_document_causal(b, h, q_idx, kv_idx):
        return (document_ids[b, q_idx] == document_ids[b, kv_idx]) & (q_idx >= kv_idx)

    from torch.nn.attention.flex_attention import create_block_mask

    B, S = document_ids.shape
    eager = document_ids.is_cuda and not torch.compiler.is_compiling()  # compiled: no S x S mask in memory
    build = _compiled(create_block_mask) if eager else create_block_mask
    return build(same_document_causal, B, None, S, S, device=document_ids.device)


def document_causal_mask(document_ids: torch.Tensor) -> torch.Tensor | BlockMask:
    """(B, S) document ids -> the mask `_causal_attention` takes for packed documents: a BlockMask for FlexAttention
    on CUDA; elsewhere a (B, 1, S, S) bool tensor (on CPU SDPA with a dense mask beats FlexAttention, which has no
    CPU backward; docs/model.md §2.4)."""
    if document_ids.is_cuda:
        return document_block_mask(document_ids)
    S = document_ids.shape[1]
    same = document_ids[:, :, None] == document_ids[:, None, :]  # (B, S, S)
    causal = torch.ones(S, S, dtype=torch.bool, device=document_ids.device).tril()
    return (same & causal).unsqueeze(1)


# ------------------------------------------------------------------------------------ context parallelism
@dataclass
class ContextMask:
    """The attention layout of one micro-batch whose sequences are split over context-parallel ranks (docs/
    parallelism.md, "Context parallelism"), passed to the layers in place of a mask. Built by the trainer's exchange
    (trainer/context_parallel.py), so the model stays free of torch.distributed: `gather` is the only communication.

    Causality is by `q_index`/`k_index`, each token's index in its whole sequence (RoPE positions may restart inside
    packed documents); with `q_doc`/`k_doc` a token attends within its document only."""

    gather: Callable[[torch.Tensor], torch.Tensor]
    """(B, S, ...) this rank's tokens -> (B, T, ...) every rank's, in rank order; its backward sends each rank its
    tokens' gradients (summed over the ranks that used them)."""
    q_index: torch.Tensor
    """(S,) index in the sequence of each local token."""
    k_index: torch.Tensor
    """(T,) index in the sequence of each gathered token."""
    q_spans: list[tuple[int, int, int]]
    """(start, end, sequence index of start) of local token ranges contiguous in the sequence: the attention's query
    tiles."""
    k_spans: list[tuple[int, int, int]]
    """The same for the gathered tokens: the key tiles."""
    q_doc: torch.Tensor | None = None
    """(B, S) document of each local token (packed documents), or None."""
    k_doc: torch.Tensor | None = None
    """(B, T) document of each gathered token, or None."""
    reduce_stats: Callable | None = None
    """RoutingStats -> the same summed over the ranks sharing the sequences (for the per-sequence balance losses)."""

    def pairs(self) -> list[tuple[tuple[int, int], tuple[int, int], bool]]:
        """(query range, key range, needs the causal mask) of every tile pair with at least one allowed pair: a key
        tile wholly after a query tile is skipped, one wholly before it needs no causal mask."""
        out = []
        for qa, qb, q_lo in self.q_spans:
            q_hi = q_lo + qb - qa - 1
            for ka, kb, k_lo in self.k_spans:
                if k_lo <= q_hi:
                    out.append(((qa, qb), (ka, kb), k_lo + kb - ka - 1 > q_lo))
        return out


def _block_attention(q: torch.Tensor, keys: torch.Tensor, expand: Callable, scale: float,
                     allowed: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
    """One block of attention in fp32: (output (B, H, Sq, dv), log-sum-exp of its scores (B, H, Sq)). `keys`: the
    block's exchanged tokens, which `expand` turns into keys and values (B, H, Sk, ...); `allowed` (B or 1, 1, Sq,
    Sk) bool; a row with nothing allowed gets output 0 and log-sum-exp -inf."""
    k, v = expand(keys)
    scores = torch.matmul(q.float(), k.float().transpose(-1, -2)) * scale  # (B, H, Sq, Sk): one block, never S x S
    if allowed is not None:
        scores = scores.masked_fill(~allowed, float("-inf"))
    lse = torch.logsumexp(scores, dim=-1)
    weights = torch.exp(scores - lse.unsqueeze(-1).clamp(min=torch.finfo(torch.float32).min))
    return torch.matmul(weights, v.float()), lse


def context_attention(q: torch.Tensor, keys: torch.Tensor, expand: Callable, scale: float,
                      layout: ContextMask) -> torch.Tensor:
    """Attention of this rank's queries q (B, H, S, dqk) over every rank's tokens `keys` (B, T, ...: what was
    exchanged), one block of (query chunk, key chunk) at a time, merged by their log-sum-exps (the flash-attention
    recurrence at chunk granularity). `expand` turns a block's exchanged tokens into its keys and values inside the
    block, and each block is recomputed in the backward pass instead of stored: no S x T matrix is formed and no
    expanded keys or values are kept, only the exchanged tokens."""
    blocks: dict[tuple[int, int], list] = {}
    for (qa, qb), (ka, kb), causal in layout.pairs():
        allowed = None
        if causal:
            allowed = (layout.k_index[ka:kb][None, :] <= layout.q_index[qa:qb][:, None])[None, None]
        if layout.q_doc is not None:
            same = (layout.q_doc[:, qa:qb, None] == layout.k_doc[:, None, ka:kb]).unsqueeze(1)
            allowed = same if allowed is None else allowed & same
        part = torch.utils.checkpoint.checkpoint(_block_attention, q[:, :, qa:qb], keys[:, ka:kb], expand, scale,
                                                 allowed, use_reentrant=False)
        blocks.setdefault((qa, qb), []).append(part)
    outputs = []
    for (qa, qb), parts in sorted(blocks.items()):
        lse = torch.logsumexp(torch.stack([p[1] for p in parts]), dim=0)  # (B, H, Sq)
        outputs.append(sum(torch.exp(p[1] - lse).unsqueeze(-1) * p[0] for p in parts))
    return torch.cat(outputs, dim=2).to(q.dtype)


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
                mask: torch.Tensor | BlockMask | ContextMask | None = None, cache: LatentCache | None = None
                ) -> torch.Tensor:
        """With `cache` (generation): x holds the new positions only, which attend to the cached ones too. With a
        `ContextMask` (context parallelism) x holds this rank's chunks of the sequences: the latent and the shared
        RoPE key, r + dr numbers a token, are exchanged, and each rank expands the keys and values it needs."""
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
        q_pe = apply_rope(q_pe, cos, sin)  # (B, H, S, dr)
        q = torch.cat((q_nope, q_pe), dim=-1)  # (B, H, S, dn + dr)
        if isinstance(mask, ContextMask):
            out = self._context_attention(q, latent, k_pe, mask)
            return self.o_proj(out.transpose(1, 2).reshape(B, S, self.n_heads * self.v_dim))
        past = cache.length if cache is not None else 0
        if cache is not None:
            latent, k_pe = cache.append(latent, k_pe)  # (B, T, r), (B, 1, T, dr) with T = past + S
        T = latent.shape[1]
        kv = self.kv_b_proj(latent)
        kv = kv.view(B, T, self.n_heads, self.nope_dim + self.v_dim).transpose(1, 2)  # (B, H, T, dn + dv)
        k_nope, v = kv.split([self.nope_dim, self.v_dim], dim=-1)
        k = torch.cat((k_nope, k_pe.expand(-1, self.n_heads, -1, -1)), dim=-1)  # (B, H, T, dn + dr)

        if past and mask is None:  # new position i (absolute past + i) sees keys 0 .. past + i
            mask = (torch.arange(T, device=x.device)[None, :] <= past + torch.arange(S, device=x.device)[:, None])
            mask = mask[None, None]
        out = _causal_attention(q, k, v, self.scale, mask)  # (B, H, S, dv)
        return self.o_proj(out.transpose(1, 2).reshape(B, S, self.n_heads * self.v_dim))


    def _context_attention(self, q: torch.Tensor, latent: torch.Tensor, k_pe: torch.Tensor,
                           layout: ContextMask) -> torch.Tensor:
        """q (B, H, S, dn + dr) of this rank's tokens over every rank's: one exchange of [latent | k_pe] (B, S, r +
        dr), then kv_b_proj inside each block on the key chunk a local query needs (recomputed here, never sent)."""
        exchanged = layout.gather(torch.cat((latent, k_pe.squeeze(1)), dim=-1))  # (B, T, r + dr)
        return context_attention(q, exchanged, self._expand, self.scale, layout)  # (B, H, S, dv)

    def _expand(self, tokens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Exchanged [latent | rotated k_pe] (B, T, r + dr) -> keys (B, H, T, dn + dr) and values (B, H, T, dv)."""
        B, T, _ = tokens.shape
        latent, k_pe = tokens.split([self.kv_rank, self.rope_dim], dim=-1)
        kv = self.kv_b_proj(latent).view(B, T, self.n_heads, self.nope_dim + self.v_dim).transpose(1, 2)
        k_nope, v = kv.split([self.nope_dim, self.v_dim], dim=-1)
        return torch.cat((k_nope, k_pe.unsqueeze(1).expand(-1, self.n_heads, -1, -1)), dim=-1), v


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
                mask: torch.Tensor | BlockMask | None = None) -> torch.Tensor:
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
