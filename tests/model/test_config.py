"""ModelConfig: presets copy the released configs, derived sizes match docs/model.md §1.2, bad values name their
field."""

from __future__ import annotations

import pytest
import torch

from tests.conftest import tiny_hf_config
from model import CausalLM, ModelConfig
from model.flops import parameter_counts, training_flops_per_token
from trainer.presets import available_model_presets, model_preset


def test_presets_exist_and_release_presets_use_mla():
    assert {"tiny", "tiny_lite", "v2", "v2_lite"} <= set(available_model_presets())
    for name in ("v2", "v2_lite"):
        assert model_preset(name).attention_type == "mla"  # V2 is not GQA (docs/model.md §8.2)


def test_v2_preset_matches_released_config():
    c = model_preset("v2")
    assert (c.hidden_size, c.num_hidden_layers, c.num_attention_heads) == (5120, 60, 128)
    assert (c.q_lora_rank, c.kv_lora_rank, c.qk_nope_head_dim, c.qk_rope_head_dim, c.v_head_dim) == (
        1536, 512, 128, 64, 128)
    assert (c.intermediate_size, c.moe_intermediate_size) == (12288, 1536)
    assert (c.n_routed_experts, c.n_shared_experts, c.num_experts_per_tok) == (160, 2, 6)
    assert (c.n_group, c.topk_group, c.topk_method) == (8, 3, "group_limited_greedy")
    assert (c.routed_scaling_factor, c.norm_topk_prob, c.seq_aux, c.aux_loss_alpha) == (16.0, False, True, 0.001)
    assert c.rope_scaling == {"type": "yarn", "factor": 40, "original_max_position_embeddings": 4096,
                              "beta_fast": 32, "beta_slow": 1, "mscale": 0.707, "mscale_all_dim": 0.707}
    assert (c.max_position_embeddings, c.vocab_size, c.bos_token_id, c.eos_token_id) == (163840, 102400, 100000,
                                                                                          100001)


def test_v2_lite_preset_matches_released_config():
    c = model_preset("v2_lite")
    assert (c.hidden_size, c.num_hidden_layers, c.num_attention_heads, c.q_lora_rank) == (2048, 27, 16, None)
    assert (c.intermediate_size, c.moe_intermediate_size, c.n_routed_experts) == (10944, 1408, 64)
    assert (c.n_group, c.topk_group, c.topk_method, c.routed_scaling_factor) == (1, 1, "greedy", 1.0)
    assert c.first_k_dense_replace == 1 and c.rope_scaling["factor"] == 40


@pytest.mark.parametrize("name,total,active,kv", [
    ("v2", 235_741_434_880, 21_375_800_320, 34_560),
    ("v2_lite", 15_706_484_224, 2_661_150_208, 15_552),
])
def test_derived_sizes_match_spec(name, total, active, kv):
    """docs/model.md §1.2: totals counted from the released checkpoints; the built module tree must agree."""
    c = model_preset(name)
    counts = parameter_counts(c)
    assert counts.total == total
    assert counts.active == active
    assert c.kv_cache_elements_per_token() == kv
    with torch.device("meta"):
        model = CausalLM(c)
    assert sum(p.numel() for p in model.parameters()) == total


def test_activated_matmul_params_match_the_module_tree():
    """The MFU numerator's parameter count, recounted from a built model: K/E of each expert stack plus the rest."""
    c = model_preset("tiny")
    model = CausalLM(c)
    counted = model.lm_head.weight.numel()
    for layer in model.model.layers.values():
        counted += sum(p.numel() for n, p in layer.self_attn.named_parameters() if "layernorm" not in n)
        if layer.is_moe:
            moe = layer.mlp
            counted += moe.gate.weight.numel() + sum(p.numel() for p in moe.shared_experts.parameters())
            counted += (moe.experts.gate_up_proj.numel() + moe.experts.down_proj.numel()) * (
                c.num_experts_per_tok / c.n_routed_experts)
        else:
            counted += sum(p.numel() for p in layer.mlp.parameters())
    assert parameter_counts(c).active_matmul == counted
    attention = 3 * c.num_hidden_layers * c.num_attention_heads * (c.qk_head_dim + c.v_head_dim) * 128
    assert training_flops_per_token(c, 128) == 6 * counted + attention


def test_kv_cache_of_ablation_variants():
    v2 = model_preset("v2")
    # The MHA equivalent of docs/model.md §1.2.
    assert v2.replace(attention_type="mha").kv_cache_elements_per_token() == 1_966_080
    gqa = v2.replace(attention_type="gqa", num_key_value_heads=8)
    assert gqa.kv_cache_elements_per_token() == 2 * 8 * 128 * 60


@pytest.mark.parametrize("changes,field", [
    (dict(num_experts_per_tok=9), "num_experts_per_tok"),
    (dict(n_group=3), "n_group"),
    (dict(topk_group=5), "topk_group"),
    (dict(topk_group=1, num_experts_per_tok=3), "topk_group"),  # 1 group of 2 experts cannot hold top-3
    (dict(qk_rope_head_dim=7), "qk_rope_head_dim"),
    (dict(attention_type="gqa", num_key_value_heads=3), "num_key_value_heads"),
    (dict(attention_type="mha", num_key_value_heads=2), "num_key_value_heads"),
    (dict(attention_type="linear"), "attention_type"),
    (dict(topk_method="noaux_tc"), "topk_method"),
    (dict(scoring_func="sigmoid"), "scoring_func"),
    (dict(hidden_size=0), "hidden_size"),
    (dict(first_k_dense_replace=9), "first_k_dense_replace"),
    (dict(aux_loss_alpha=-1.0), "aux_loss_alpha"),
    (dict(attention_bias=True), "attention_bias"),
    (dict(tie_word_embeddings=True), "tie_word_embeddings"),
    (dict(rope_scaling={"type": "linear", "factor": 2.0}), "rope_scaling"),
    (dict(rope_scaling={"type": "yarn", "factor": 2.0}), "rope_scaling.original_max_position_embeddings"),
])
def test_invalid_values_raise_value_error_naming_the_field(changes, field):
    with pytest.raises(ValueError, match=field.replace(".", r"\.")):
        ModelConfig.from_hf_config(tiny_hf_config(**changes))


def test_head_dims_that_do_not_add_up_are_rejected():
    with pytest.raises(ValueError, match="qk_head_dim"):
        ModelConfig.from_hf_config(tiny_hf_config(qk_head_dim=25))  # 16 + 8 = 24


def test_both_yarn_spellings_give_the_same_config():
    released = tiny_hf_config()
    resaved = tiny_hf_config(rope_scaling=None, rope_parameters={
        "rope_type": "yarn", "rope_theta": 10000.0, "factor": 4.0, "original_max_position_embeddings": 64,
        "beta_fast": 32, "beta_slow": 1, "mscale": 0.707, "mscale_all_dim": 0.707})
    del resaved["rope_theta"]
    assert ModelConfig.from_hf_config(released) == ModelConfig.from_hf_config(resaved)


def test_hf_config_round_trip_uses_the_released_spelling():
    c = ModelConfig.from_hf_config(tiny_hf_config())
    out = c.to_hf_config()
    assert out["rope_scaling"]["type"] == "yarn" and "rope_parameters" not in out
    assert out["architectures"] == ["DeepseekV2ForCausalLM"] and out["model_type"] == "deepseek_v2"
    assert "attention_type" not in out  # MLA is the released layout
    assert ModelConfig.from_hf_config(out) == c
    gqa = c.replace(attention_type="gqa", num_key_value_heads=2)
    assert ModelConfig.from_hf_config(gqa.to_hf_config()) == gqa


def test_foreign_model_types_and_quantized_checkpoints_are_refused():
    with pytest.raises(ValueError, match="model_type"):
        ModelConfig.from_hf_config(tiny_hf_config(model_type="deepseek_v3"))
    with pytest.raises(ValueError, match="quantization_config"):
        ModelConfig.from_hf_config(tiny_hf_config(quantization_config={"quant_method": "fp8"}))


def test_unknown_preset_and_key_are_named():
    with pytest.raises(ValueError, match="model='v9'.*available"):
        model_preset("v9")
    with pytest.raises(ValueError, match="hidden_sise"):
        model_preset("tiny", hidden_sise=3)
