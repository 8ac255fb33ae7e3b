"""Parameter and FLOP counts from the config alone: the one place MFU's numerator is defined.

`training_flops_per_token` counts *activated* parameters only (a token touches K routed experts, not E):
6 FLOPs per activated matmul parameter (2 forward, 4 backward) plus causal attention scores and values,
3 * L * H * (d_qk + d_v) * S per token (forward 2 * H * (d_qk + d_v) * S/2 on average under the causal mask,
times 3 for training). Embedding lookups and norms are not counted; the output head is.
"""

from __future__ import annotations

from dataclasses import dataclass

from .config import ModelConfig


@dataclass
class ParamCounts:
    total: int
    """Every parameter, all experts included."""
    active: int
    """Parameters one token uses, embedding and output head included (the paper's "activated" count)."""
    active_matmul: int
    """Activated parameters that take part in a matmul (active minus the embedding lookup and the norms)."""


def attention_params(c: ModelConfig) -> tuple[int, int]:
    """(matmul params, norm params) of one attention block."""
    d, h = c.hidden_size, c.num_attention_heads
    if c.attention_type != "mla":
        kv = c.num_key_value_heads if c.attention_type == "gqa" else h
        return d * h * c.head_dim * 2 + d * kv * c.head_dim * 2, 0
    qk = c.qk_nope_head_dim + c.qk_rope_head_dim
    if c.q_lora_rank is None:
        q, q_norm = d * h * qk, 0
    else:
        q, q_norm = d * c.q_lora_rank + c.q_lora_rank * h * qk, c.q_lora_rank
    kv = d * (c.kv_lora_rank + c.qk_rope_head_dim) + c.kv_lora_rank * h * (c.qk_nope_head_dim + c.v_head_dim)
    return q + kv + h * c.v_head_dim * d, q_norm + c.kv_lora_rank


def parameter_counts(c: ModelConfig) -> ParamCounts:
    d = c.hidden_size
    attn, attn_norms = attention_params(c)
    total = active = 2 * c.vocab_size * d + d  # embedding, head, final norm
    active_matmul = c.vocab_size * d  # the head
    for i in range(c.num_hidden_layers):
        layer_norms = attn_norms + 2 * d
        if c.is_moe_layer(i):
            expert = 3 * d * c.moe_intermediate_size
            shared = 3 * d * c.shared_intermediate_size
            router = c.n_routed_experts * d
            total += attn + layer_norms + router + shared + c.n_routed_experts * expert
            layer_active = attn + router + shared + c.num_experts_per_tok * expert
        else:
            dense = 3 * d * c.intermediate_size
            total += attn + layer_norms + dense
            layer_active = attn + dense
        active += layer_active + layer_norms
        active_matmul += layer_active
    return ParamCounts(total=total, active=active, active_matmul=active_matmul)


def training_flops_per_token(c: ModelConfig, seq_len: int) -> float:
    """Model FLOPs of one training token (forward + backward) at sequence length `seq_len`."""
    if c.attention_type == "mla":
        qk, v = c.qk_nope_head_dim + c.qk_rope_head_dim, c.v_head_dim
    else:
        qk = v = c.head_dim
    attention = 3 * c.num_hidden_layers * c.num_attention_heads * (qk + v) * seq_len
    return 6 * parameter_counts(c).active_matmul + attention
