"""Shared helpers: tiny DeepSeek-V2 configs in Hugging Face form, and a transformers reference when installed."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
os.environ.setdefault("HF_HUB_OFFLINE", "1")  # tests never download
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))

YARN = {"type": "yarn", "factor": 4.0, "original_max_position_embeddings": 64, "beta_fast": 32, "beta_slow": 1,
        "mscale": 0.707, "mscale_all_dim": 0.707}


def tiny_hf_config(**overrides) -> dict:
    """A tiny DeepSeek-V2 config.json dict: a dense layer, then MoE layers with shared experts, q compression,
    group-limited routing over 4 groups, routed_scaling_factor != 1, YaRN."""
    cfg = dict(
        model_type="deepseek_v2", vocab_size=211, hidden_size=64, intermediate_size=96, moe_intermediate_size=24,
        num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=4, q_lora_rank=32, kv_lora_rank=16,
        qk_nope_head_dim=16, qk_rope_head_dim=8, v_head_dim=12, n_routed_experts=8, n_shared_experts=2,
        num_experts_per_tok=3, n_group=4, topk_group=2, topk_method="group_limited_greedy",
        routed_scaling_factor=2.5, norm_topk_prob=False, first_k_dense_replace=1, max_position_embeddings=256,
        rope_theta=10000.0, rope_scaling=dict(YARN), rms_norm_eps=1e-6, tie_word_embeddings=False,
        bos_token_id=1, eos_token_id=2, initializer_range=0.1,
    )
    cfg.update(overrides)
    return cfg


@pytest.fixture
def transformers_ds():
    """transformers' DeepseekV2 classes (the parity reference), or skip when transformers is absent."""
    transformers = pytest.importorskip("transformers")
    if not hasattr(transformers, "DeepseekV2ForCausalLM"):
        pytest.skip("this transformers has no native DeepseekV2ForCausalLM")
    return transformers.DeepseekV2Config, transformers.DeepseekV2ForCausalLM


@pytest.fixture(scope="session")
def cache_dir(tmp_path_factory):
    """One built-in BPE for the whole session (training it takes seconds), shared by every end-to-end test."""
    return tmp_path_factory.mktemp("bpe-cache")
