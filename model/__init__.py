"""DeepSeek-V2 in pure PyTorch: config, MLA, DeepSeekMoE, balance losses, the causal LM and HF checkpoint I/O."""

from .config import ModelConfig
from .moe import LocalDispatcher, MoE, RoutingStats, TokenDispatcher
from .transformer import CausalLM, CausalLMOutput, next_token_labels

__all__ = ["CausalLM", "CausalLMOutput", "LocalDispatcher", "ModelConfig", "MoE", "RoutingStats", "TokenDispatcher",
           "next_token_labels"]
