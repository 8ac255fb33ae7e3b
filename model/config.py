"""The model configuration: one dataclass whose field names are the Hugging Face `config.json` keys.

Every field of the released DeepSeek-V2 / V2-Lite `config.json` (docs/model.md §1.1) is here, plus three of
ours: `attention_type` (MLA, or the MHA/GQA baselines of the paper's ablations) and the coefficients of the
device-level and communication balance losses, which the released config does not carry.

`from_hf_config` accepts both spellings of YaRN (`rope_scaling` in the released files, `rope_parameters` in files
re-saved by transformers 5.x); `to_hf_config` writes the released spelling back. Invalid values raise `ValueError`
naming the field.
"""

from __future__ import annotations

import dataclasses
import math
import warnings
from dataclasses import dataclass
from typing import Any, ClassVar

ATTENTION_TYPES = ("mla", "mha", "gqa")
TOPK_METHODS = ("greedy", "group_limited_greedy")

# Keys a Hugging Face config.json may carry that describe the file or the remote code, not the network.
_HF_BOOKKEEPING_KEYS = {
    "architectures", "auto_map", "model_type", "transformers_version", "dtype", "use_cache",
    "output_router_logits", "head_dim", "qk_head_dim", "rope_parameters", "_name_or_path",
    "return_dict", "output_hidden_states", "output_attentions", "chunk_size_feed_forward",
    "is_encoder_decoder", "id2label", "label2id", "problem_type", "tokenizer_class", "_attn_implementation",
}


@dataclass
class ModelConfig:
    """DeepSeek-V2 architecture. Field names and meanings are those of the released `config.json`."""

    vocab_size: int = 102400
    """Rows of the embedding and of the (untied) output head."""
    hidden_size: int = 2048
    """Model width d."""
    intermediate_size: int = 10944
    """Width of the dense SwiGLU MLP used by the first `first_k_dense_replace` layers."""
    moe_intermediate_size: int = 1408
    """Width of one routed expert; the shared experts are one MLP of width `moe_intermediate_size * n_shared_experts`."""
    num_hidden_layers: int = 27
    """Number of decoder layers l."""
    num_attention_heads: int = 16
    """Attention heads n_h."""
    num_key_value_heads: int | None = None
    """Key/value heads; used only by `attention_type=gqa` (MLA ignores it, MHA requires it to equal n_h)."""
    q_lora_rank: int | None = None
    """Query compression rank d'_c; null means a plain `q_proj` (V2-Lite)."""
    kv_lora_rank: int = 512
    """Key/value compression rank d_c: the cached latent per token and layer."""
    qk_nope_head_dim: int = 128
    """Per-head query/key width without position information (d_h)."""
    qk_rope_head_dim: int = 64
    """Width of the decoupled RoPE query per head and of the single shared RoPE key (d^R_h)."""
    v_head_dim: int = 128
    """Per-head value width."""
    n_routed_experts: int | None = 64
    """Routed experts per MoE layer N_r; null makes every layer dense."""
    n_shared_experts: int | None = 2
    """Shared experts N_s (always active, no gate); null or 0 means none."""
    num_experts_per_tok: int = 6
    """Routed experts per token K_r."""
    n_group: int = 1
    """Routing groups of consecutive experts: the paper's devices D (device-limited routing and balance losses)."""
    topk_group: int = 1
    """Groups a token may use with `group_limited_greedy`: the paper's M."""
    topk_method: str = "greedy"
    """`greedy` (top-K over all experts) or `group_limited_greedy` (top `topk_group` groups by max score, then top-K)."""
    routed_scaling_factor: float = 1.0
    """Multiplies the routed experts' gate weights (16 for V2) unless `norm_topk_prob`."""
    norm_topk_prob: bool = False
    """Renormalise the top-K weights to sum to 1 (then `routed_scaling_factor` is not applied)."""
    scoring_func: str = "softmax"
    """Router scoring function; DeepSeek-V2 uses softmax (sigmoid belongs to V3)."""
    aux_loss_alpha: float = 0.001
    """Expert-level balance loss coefficient alpha1 (0 disables it). The paper used 0.003 for V2."""
    seq_aux: bool = True
    """Balance losses per sequence (averaged over sequences, as released) rather than over the whole micro-batch."""
    device_aux_loss_alpha: float = 0.0
    """Device-level balance loss coefficient alpha2 over the `n_group` routing groups (paper: 0.05 for V2)."""
    comm_aux_loss_alpha: float = 0.0
    """Communication balance loss coefficient alpha3 over the `n_group` routing groups (paper: 0.02 for V2)."""
    first_k_dense_replace: int = 1
    """The first this-many layers use the dense MLP instead of MoE."""
    moe_layer_freq: int = 1
    """After the dense prefix, layer i is MoE when i % moe_layer_freq == 0."""
    ep_size: int = 1
    """Kept for round trips of the released config (remote-code inference field); parallelism is set elsewhere."""
    hidden_act: str = "silu"
    """Activation of the SwiGLU MLPs."""
    rms_norm_eps: float = 1e-6
    """Epsilon of the block and final RMSNorms (the latent norms always use 1e-6, as released)."""
    rope_theta: float = 10000.0
    """RoPE base."""
    rope_scaling: dict[str, Any] | None = None
    """YaRN settings {type: yarn, factor, original_max_position_embeddings, beta_fast, beta_slow, mscale,
    mscale_all_dim}, or null for plain RoPE."""
    max_position_embeddings: int = 163840
    """Longest position the config claims (V2-Lite is advertised at 32K despite this value)."""
    initializer_range: float = 0.02
    """Std of the normal init of every matrix (the paper used 0.006)."""
    attention_bias: bool = False
    """Must be false: the released models have no biases."""
    mlp_bias: bool = False
    """Must be false: the released models have no biases."""
    attention_dropout: float = 0.0
    """Must be 0."""
    tie_word_embeddings: bool = False
    """Must be false: `embed_tokens` and `lm_head` are separate tensors."""
    bos_token_id: int | None = 100000
    eos_token_id: int | None = 100001
    pad_token_id: int | None = None
    pretraining_tp: int = 1
    """Unused; kept for round trips."""
    torch_dtype: str | None = "bfloat16"
    """Dtype of the weights on disk."""
    pretrained: str | None = None
    """A released-layout directory (config.json + safetensors) whose weights the run starts from; ours, never written
    to config.json. Its config must agree with this one on the architecture (see `architecture_differences`)."""
    attention_type: str = "mla"
    """`mla` (DeepSeek-V2), or the ablation baselines `mha` / `gqa` (standard attention, RoPE on the whole head of
    width `v_head_dim`). Not part of the released config."""

    TRAINING_FIELDS: ClassVar[frozenset[str]] = frozenset({
        "torch_dtype", "bos_token_id", "eos_token_id", "pad_token_id", "initializer_range", "aux_loss_alpha",
        "device_aux_loss_alpha", "comm_aux_loss_alpha", "seq_aux", "rope_scaling", "rope_theta",
        "max_position_embeddings", "attention_dropout", "pretraining_tp"})
    """Fields a training run may choose on its own over a released config: token ids (the tokenizer's), dtype,
    init, the balance-loss coefficients, and the RoPE/YaRN settings and context length (what long-context
    extension changes). Every other field decides tensor shapes or the computation of the network."""

    def __post_init__(self) -> None:
        if self.num_key_value_heads is None:
            self.num_key_value_heads = self.num_attention_heads
        if self.rope_scaling is not None:
            self.rope_scaling = _normalize_rope_scaling(dict(self.rope_scaling))
        self.validate()

    # ---------------------------------------------------------------- derived quantities
    @property
    def qk_head_dim(self) -> int:
        return self.qk_nope_head_dim + self.qk_rope_head_dim

    @property
    def experts_per_group(self) -> int:
        return (self.n_routed_experts or 0) // self.n_group

    @property
    def shared_intermediate_size(self) -> int:
        return self.moe_intermediate_size * (self.n_shared_experts or 0)

    @property
    def head_dim(self) -> int:
        """Head width of the MHA/GQA baselines (q, k and v)."""
        return self.v_head_dim

    def is_moe_layer(self, layer_idx: int) -> bool:
        """The remote code's rule: MoE after the dense prefix, every `moe_layer_freq`-th layer."""
        return (
            self.n_routed_experts is not None
            and layer_idx >= self.first_k_dense_replace
            and layer_idx % self.moe_layer_freq == 0
        )

    def kv_cache_elements_per_token(self) -> int:
        """Elements a KV cache stores per token over all layers (the paper's Table 1 / Table 9 quantity)."""
        if self.attention_type == "mla":
            return (self.kv_lora_rank + self.qk_rope_head_dim) * self.num_hidden_layers
        kv_heads = self.num_attention_heads if self.attention_type == "mha" else self.num_key_value_heads
        return 2 * kv_heads * self.head_dim * self.num_hidden_layers

    # ---------------------------------------------------------------- validation
    def validate(self) -> None:
        def bad(name: str, why: str) -> ValueError:
            return ValueError(f"ModelConfig.{name}={getattr(self, name)!r}: {why}")

        for name in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                     "kv_lora_rank", "qk_nope_head_dim", "qk_rope_head_dim", "v_head_dim", "max_position_embeddings",
                     "num_experts_per_tok", "n_group", "topk_group", "moe_layer_freq", "moe_intermediate_size"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                raise bad(name, "must be a positive integer")
        if self.q_lora_rank is not None and self.q_lora_rank <= 0:
            raise bad("q_lora_rank", "must be a positive integer or null (no query compression)")
        if self.qk_rope_head_dim % 2:
            raise bad("qk_rope_head_dim", "RoPE rotates pairs, so it must be even")
        if self.attention_type not in ATTENTION_TYPES:
            raise bad("attention_type", f"allowed: {', '.join(ATTENTION_TYPES)}")
        if self.attention_type == "mha" and self.num_key_value_heads != self.num_attention_heads:
            raise bad("num_key_value_heads", "attention_type=mha needs num_key_value_heads == num_attention_heads")
        if self.attention_type == "gqa" and (
            self.num_key_value_heads <= 0 or self.num_attention_heads % self.num_key_value_heads
        ):
            raise bad("num_key_value_heads", f"must divide num_attention_heads={self.num_attention_heads}")
        if self.attention_type != "mla" and self.v_head_dim % 2:
            raise bad("v_head_dim", "the MHA/GQA baselines rotate the whole head, so it must be even")
        if self.n_routed_experts is not None:
            if self.n_routed_experts <= 0:
                raise bad("n_routed_experts", "must be a positive integer or null (all layers dense)")
            if self.num_experts_per_tok > self.n_routed_experts:
                raise bad("num_experts_per_tok", f"top-k cannot exceed n_routed_experts={self.n_routed_experts}")
            if self.n_routed_experts % self.n_group:
                raise bad("n_group", f"must divide n_routed_experts={self.n_routed_experts} (groups are equal blocks)")
            if self.topk_group > self.n_group:
                raise bad("topk_group", f"cannot exceed n_group={self.n_group}")
            if self.topk_method == "group_limited_greedy" and (
                self.topk_group * self.experts_per_group < self.num_experts_per_tok
            ):
                raise bad("topk_group", f"{self.topk_group} groups of {self.experts_per_group} experts hold fewer "
                                        f"than num_experts_per_tok={self.num_experts_per_tok}")
        if self.n_shared_experts is not None and self.n_shared_experts < 0:
            raise bad("n_shared_experts", "must be >= 0 or null")
        if self.topk_method not in TOPK_METHODS:
            raise bad("topk_method", f"allowed: {', '.join(TOPK_METHODS)}")
        if self.scoring_func != "softmax":
            raise bad("scoring_func", "DeepSeek-V2 routes with softmax; allowed: softmax")
        if self.hidden_act != "silu":
            raise bad("hidden_act", "allowed: silu")
        if self.first_k_dense_replace < 0 or self.first_k_dense_replace > self.num_hidden_layers:
            raise bad("first_k_dense_replace", f"must be in [0, num_hidden_layers={self.num_hidden_layers}]")
        for name in ("aux_loss_alpha", "device_aux_loss_alpha", "comm_aux_loss_alpha"):
            if getattr(self, name) < 0:
                raise bad(name, "a balance-loss coefficient must be >= 0 (0 disables it)")
        if self.routed_scaling_factor <= 0:
            raise bad("routed_scaling_factor", "must be > 0")
        for name in ("attention_bias", "mlp_bias", "tie_word_embeddings"):
            if getattr(self, name):
                raise bad(name, "not supported: DeepSeek-V2 has no biases and an untied head")
        if self.attention_dropout != 0.0:
            raise bad("attention_dropout", "not supported; must be 0.0")
        if self.rms_norm_eps <= 0:
            raise bad("rms_norm_eps", "must be > 0")
        if self.rope_theta <= 0:
            raise bad("rope_theta", "must be > 0")

    # ---------------------------------------------------------------- HF config.json
    @classmethod
    def from_hf_config(cls, hf: dict[str, Any], **overrides: Any) -> "ModelConfig":
        """Build from a Hugging Face `config.json` dict (released or transformers-5 re-saved)."""
        hf = dict(hf)
        model_type = hf.get("model_type", "deepseek_v2")
        if model_type != "deepseek_v2":
            raise ValueError(f"config.json model_type={model_type!r}: only 'deepseek_v2' is supported")
        if "quantization_config" in hf:
            raise ValueError("config.json quantization_config: quantized checkpoints are not supported")
        rope = hf.get("rope_scaling")
        params = hf.get("rope_parameters")
        if rope is None and params:
            # transformers 5.x nests rope_theta inside rope_parameters and spells the type `rope_type`.
            params = dict(params)
            if "rope_theta" in params and "rope_theta" not in hf:
                hf["rope_theta"] = params["rope_theta"]
            rope = params
        hf["rope_scaling"] = rope
        if "torch_dtype" not in hf and "dtype" in hf:
            hf["torch_dtype"] = hf["dtype"]
        if hf.get("qk_head_dim") is not None and "qk_nope_head_dim" in hf and "qk_rope_head_dim" in hf:
            if hf["qk_head_dim"] != hf["qk_nope_head_dim"] + hf["qk_rope_head_dim"]:
                raise ValueError(
                    f"config.json qk_head_dim={hf['qk_head_dim']} != qk_nope_head_dim + qk_rope_head_dim = "
                    f"{hf['qk_nope_head_dim']} + {hf['qk_rope_head_dim']}"
                )
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(k for k in hf if k not in names and k not in _HF_BOOKKEEPING_KEYS)
        if unknown:
            warnings.warn(f"config.json keys ignored (not part of the DeepSeek-V2 architecture): {unknown}",
                          stacklevel=2)
        kwargs = {k: v for k, v in hf.items() if k in names and k != "pretrained"}
        kwargs.update(overrides)
        if kwargs.get("n_group") is None:
            kwargs["n_group"] = 1
        if kwargs.get("topk_group") is None:
            kwargs["topk_group"] = 1
        if isinstance(kwargs.get("eos_token_id"), list):
            kwargs["eos_token_id"] = kwargs["eos_token_id"][0]
        return cls(**kwargs)

    def to_hf_config(self) -> dict[str, Any]:
        """The released `config.json` layout (YaRN as `rope_scaling`), loadable by transformers."""
        out: dict[str, Any] = {"architectures": ["DeepseekV2ForCausalLM"], "model_type": "deepseek_v2"}
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            out[f.name] = dict(value) if isinstance(value, dict) else value
        del out["pretrained"]  # a training input, not part of the network
        if self.attention_type == "mla":
            del out["attention_type"]  # the released layout; absent means mla
        return out

    def architecture_differences(self, other: "ModelConfig") -> list[tuple[str, Any, Any]]:
        """(field, ours, theirs) for every field that decides tensor shapes or the computation of the network
        (all but `TRAINING_FIELDS` and `pretrained`)."""
        free = self.TRAINING_FIELDS | {"pretrained"}
        return [(f.name, getattr(self, f.name), getattr(other, f.name)) for f in dataclasses.fields(self)
                if f.name not in free and getattr(self, f.name) != getattr(other, f.name)]

    def replace(self, **changes: Any) -> "ModelConfig":
        return dataclasses.replace(self, **changes)


def _normalize_rope_scaling(rope: dict[str, Any]) -> dict[str, Any] | None:
    """Accept `type` or `rope_type`; keep only YaRN (the released setting) or none."""
    kind = rope.pop("type", None) or rope.pop("rope_type", None) or "default"
    rope.pop("rope_type", None)
    rope.pop("rope_theta", None)
    if kind == "default":
        return None
    if kind != "yarn":
        raise ValueError(f"ModelConfig.rope_scaling type={kind!r}: allowed: yarn (or null for plain RoPE)")
    for key in ("factor", "original_max_position_embeddings"):
        if rope.get(key) is None:
            raise ValueError(f"ModelConfig.rope_scaling.{key}: required for yarn")
    if rope["factor"] <= 0 or not math.isfinite(rope["factor"]):
        raise ValueError(f"ModelConfig.rope_scaling.factor={rope['factor']!r}: must be a positive number")
    allowed = {"factor", "original_max_position_embeddings", "beta_fast", "beta_slow", "mscale", "mscale_all_dim",
               "attention_factor", "truncate"}
    extra = sorted(set(rope) - allowed)
    if extra:
        raise ValueError(f"ModelConfig.rope_scaling: unknown keys {extra}; allowed: {sorted(allowed)}")
    return {"type": "yarn", **rope}

