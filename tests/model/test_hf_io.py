"""HF checkpoint I/O without transformers: round trips, sharding, expert shards, and every bad-checkpoint error."""

from __future__ import annotations

import json
import struct
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from tests.conftest import tiny_hf_config
from model import CausalLM, ModelConfig
from model.hf import CheckpointError, load_pretrained, save_pretrained
from model.moe import RoutedExperts


@pytest.fixture
def model() -> CausalLM:
    torch.manual_seed(0)
    return CausalLM(ModelConfig.from_hf_config(tiny_hf_config()))


@pytest.fixture
def single(tmp_path, model):
    """A one-file checkpoint directory."""
    return save_pretrained(model, tmp_path / "ckpt", max_shard_size="1GB")


@pytest.fixture
def sharded(tmp_path, model):
    """A checkpoint of several shards plus model.safetensors.index.json."""
    return save_pretrained(model, tmp_path / "sharded", max_shard_size="30KB")


def _assert_same_weights(a: CausalLM, b: CausalLM) -> None:
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for k in sa:
        assert torch.equal(sa[k], sb[k]), k


def test_round_trip_single_file_uses_released_names(single, model):
    assert sorted(p.name for p in single.iterdir()) == ["config.json", "generation_config.json", "model.safetensors"]
    tensors = load_file(single / "model.safetensors")
    assert tensors["model.layers.1.mlp.experts.7.gate_proj.weight"].shape == (24, 64)
    assert tensors["model.layers.1.mlp.experts.7.up_proj.weight"].shape == (24, 64)
    assert tensors["model.layers.2.mlp.experts.0.down_proj.weight"].shape == (64, 24)
    assert "model.layers.1.mlp.gate.weight" in tensors and "lm_head.weight" in tensors
    assert not any("gate_up_proj" in k for k in tensors)
    torch.testing.assert_close(tensors["model.layers.1.mlp.experts.3.up_proj.weight"],
                               model.model.layers[1].mlp.experts.gate_up_proj[3, 24:])
    assert json.loads((single / "config.json").read_text())["torch_dtype"] == "float32"
    _assert_same_weights(load_pretrained(single), model)


def test_round_trip_sharded_with_index(sharded, model):
    shards = sorted(p.name for p in sharded.glob("model-*.safetensors"))
    assert len(shards) > 2 and shards[0] == f"model-00001-of-{len(shards):05d}.safetensors"
    index = json.loads((sharded / "model.safetensors.index.json").read_text())
    assert set(index["weight_map"].values()) == set(shards)
    assert index["metadata"]["total_size"] == sum(p.numel() * 4 for p in model.parameters())
    _assert_same_weights(load_pretrained(sharded), model)
    assert not list(sharded.glob(".tmp*"))


def test_resaving_with_fewer_shards_removes_stale_ones(sharded, model):
    save_pretrained(model, sharded, max_shard_size="1GB")
    assert sorted(p.name for p in sharded.iterdir()) == ["config.json", "generation_config.json",
                                                         "model.safetensors"]
    _assert_same_weights(load_pretrained(sharded), model)


def test_load_in_bf16_and_export_in_bf16(tmp_path, single):
    model = load_pretrained(single, dtype=torch.bfloat16)
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}
    out = save_pretrained(model, tmp_path / "bf16")
    assert json.loads((out / "config.json").read_text())["torch_dtype"] == "bfloat16"
    assert load_file(out / "model.safetensors")["lm_head.weight"].dtype == torch.bfloat16


def test_gqa_ablation_round_trips(tmp_path):
    torch.manual_seed(0)
    model = CausalLM(ModelConfig.from_hf_config(tiny_hf_config(attention_type="gqa", num_key_value_heads=2,
                                                               v_head_dim=16)))
    loaded = load_pretrained(save_pretrained(model, tmp_path / "gqa"))
    assert loaded.config.attention_type == "gqa"
    _assert_same_weights(loaded, model)


def test_a_model_holding_an_expert_shard_reads_only_its_experts(single, model):
    """Expert parallelism: a layer holding experts 4..7 loads those and skips the others without error."""
    sharded = CausalLM(model.config)
    for layer in list(sharded.model.layers.values())[1:]:
        layer.mlp.experts = RoutedExperts(4, 64, 24, expert_offset=4, n_total=8)
    load_pretrained(single, model=sharded)
    for ours, full in zip(list(sharded.model.layers.values())[1:], list(model.model.layers.values())[1:]):
        assert torch.equal(ours.mlp.experts.gate_up_proj, full.mlp.experts.gate_up_proj[4:])
        assert torch.equal(ours.mlp.experts.down_proj, full.mlp.experts.down_proj[4:])


# ------------------------------------------------------------------------------------------- bad checkpoints
def _rewrite(directory, edit) -> None:
    path = directory / "model.safetensors"
    tensors = load_file(path)
    edit(tensors)
    save_file(tensors, path)


def test_missing_tensor_is_named(single):
    _rewrite(single, lambda t: t.pop("model.layers.1.self_attn.kv_b_proj.weight"))
    with pytest.raises(CheckpointError, match=r"missing.*model\.layers\.1\.self_attn\.kv_b_proj\.weight"):
        load_pretrained(single)


def test_missing_expert_is_named(single):
    _rewrite(single, lambda t: t.pop("model.layers.2.mlp.experts.5.up_proj.weight"))
    with pytest.raises(CheckpointError, match=r"model\.layers\.2\.mlp\.experts\.5\.up_proj\.weight"):
        load_pretrained(single)


def test_unexpected_tensor_is_named(single):
    _rewrite(single, lambda t: t.update({"model.layers.1.mlp.gate.e_score_correction_bias": torch.zeros(8)}))
    with pytest.raises(CheckpointError, match=r"unexpected tensor 'model\.layers\.1\.mlp\.gate\.e_score_corr"):
        load_pretrained(single)


def test_expert_beyond_the_config_is_unexpected(single):
    _rewrite(single, lambda t: t.update({"model.layers.1.mlp.experts.8.up_proj.weight": torch.zeros(24, 64)}))
    with pytest.raises(CheckpointError, match=r"unexpected tensor 'model\.layers\.1\.mlp\.experts\.8\.up_proj"):
        load_pretrained(single)


def test_shape_mismatch_names_the_tensor_and_both_shapes(single):
    _rewrite(single, lambda t: t.update({"model.layers.0.self_attn.o_proj.weight": torch.zeros(64, 40)}))
    with pytest.raises(CheckpointError, match=r"o_proj\.weight' has shape \[64, 40\], the model expects \[64, 48\]"):
        load_pretrained(single)


def test_config_that_disagrees_with_the_weights_is_a_shape_error(single):
    config = json.loads((single / "config.json").read_text())
    config["kv_lora_rank"] = 32
    (single / "config.json").write_text(json.dumps(config))
    with pytest.raises(CheckpointError, match=r"self_attn\.kv_a_\w+\.weight' has shape \[(16|24, 64)\], the model "
                                              r"expects \[(32|40, 64)\]"):
        load_pretrained(single)


@pytest.mark.parametrize("nan", [float("nan"), float("inf")])
def test_non_finite_weights_are_named(single, nan):
    def poison(t):
        t["model.layers.2.mlp.experts.3.down_proj.weight"][1, 2] = nan
    _rewrite(single, poison)
    with pytest.raises(CheckpointError, match=r"experts\.3\.down_proj\.weight' contains NaN or Inf"):
        load_pretrained(single)


@pytest.mark.parametrize("keep", ["0", "7", "8", "mid-header", "mid-data", "minus-1"])
def test_truncated_file_is_named(single, keep):
    path = single / "model.safetensors"
    data = path.read_bytes()
    header_len = struct.unpack("<Q", data[:8])[0]
    cut = {"0": 0, "7": 7, "8": 8, "mid-header": 8 + header_len // 2, "mid-data": 8 + header_len + 1000,
           "minus-1": len(data) - 1}[keep]
    path.write_bytes(data[:cut])
    with pytest.raises(CheckpointError, match=r"model\.safetensors: .*(truncated|corrupt)"):
        load_pretrained(single)


@pytest.mark.parametrize("damage", ["junk-appended", "huge-header-length", "garbage-header", "not-utf8",
                                    "overlapping", "byte-count"])
def test_corrupt_file_is_named(single, damage):
    path = single / "model.safetensors"
    data = path.read_bytes()
    header_len = struct.unpack("<Q", data[:8])[0]
    header = json.loads(data[8:8 + header_len])
    body = data[8 + header_len:]

    def with_header(h: dict) -> bytes:
        raw = json.dumps(h, separators=(",", ":")).encode().ljust(header_len)  # keep the data offsets valid
        assert len(raw) == header_len
        return data[:8] + raw + body

    names = [k for k in header if k != "__metadata__"]
    if damage == "junk-appended":
        data = data + b"\x00" * 100
    elif damage == "huge-header-length":
        data = struct.pack("<Q", 2**40) + data[8:]
    elif damage == "garbage-header":
        data = data[:8] + b"{" + b"x" * (header_len - 1) + body
    elif damage == "not-utf8":
        data = data[:8] + b"\xff\xfe" + data[10:]
    elif damage == "overlapping":
        header[names[1]]["data_offsets"] = header[names[0]]["data_offsets"]
        data = with_header(header)
    elif damage == "byte-count":
        header[names[0]]["shape"] = [header[names[0]]["shape"][0] + 1] + header[names[0]]["shape"][1:]
        data = with_header(header)
    path.write_bytes(data)
    with pytest.raises(CheckpointError, match=r"model\.safetensors: .*(corrupt|truncated|needs|overlap)"):
        load_pretrained(single)


def test_shard_listed_in_index_but_absent_is_named(sharded):
    victim = sorted(sharded.glob("model-*.safetensors"))[1]
    victim.unlink()
    with pytest.raises(CheckpointError, match=rf"{victim.name}: shard listed in model\.safetensors\.index\.json"):
        load_pretrained(sharded)


def test_tensor_listed_in_index_but_absent_from_its_shard_is_named(sharded):
    index_path = sharded / "model.safetensors.index.json"
    index = json.loads(index_path.read_text())
    name = "model.layers.1.mlp.experts.2.gate_proj.weight"
    index["weight_map"][name] = next(p.name for p in sorted(sharded.glob("model-*.safetensors"))
                                     if p.name != index["weight_map"][name])
    index_path.write_text(json.dumps(index))
    with pytest.raises(CheckpointError, match=r"experts\.2\.gate_proj\.weight' is listed in .* absent"):
        load_pretrained(sharded)


def test_missing_config_and_bad_json_are_named(single):
    (single / "config.json").write_text("{not json")
    with pytest.raises(CheckpointError, match=r"config\.json: not valid JSON"):
        load_pretrained(single)
    (single / "config.json").unlink()
    with pytest.raises(CheckpointError, match=r"config\.json: file not found"):
        load_pretrained(single)


def test_pickle_weights_are_never_loaded(tmp_path, single):
    """A directory holding only pytorch_model.bin is refused without unpickling anything."""
    sentinel = tmp_path / "pwned"

    class Payload:
        def __reduce__(self):
            return (open, (str(sentinel), "w"))

    import pickle
    directory = tmp_path / "pickled"
    directory.mkdir()
    (directory / "config.json").write_text((single / "config.json").read_text())
    (directory / "pytorch_model.bin").write_bytes(pickle.dumps(Payload()))
    with pytest.raises(CheckpointError, match=r"only pickle weights .* never loaded"):
        load_pretrained(directory)
    assert not sentinel.exists()


def test_nothing_to_load_is_named(tmp_path, single):
    (single / "model.safetensors").unlink()
    with pytest.raises(CheckpointError, match=r"neither model\.safetensors\.index\.json nor model\.safetensors"):
        load_pretrained(single)
    with pytest.raises(CheckpointError, match="not a directory"):
        load_pretrained(tmp_path / "nowhere")


def test_loading_never_holds_the_checkpoint_twice(tmp_path):
    """Peak resident memory of a fresh process loading a ~160 MB single-file checkpoint stays near one model copy:
    growth below 1.15 x the model's bytes + 16 MiB (measured 170 MiB for a 162 MiB checkpoint, where a memory-mapped
    read took 332 MiB)."""
    if not Path("/proc/self/clear_refs").exists():
        pytest.skip("needs Linux /proc to read the peak resident memory")
    import subprocess
    import sys
    from tests.conftest import ROOT

    config = ModelConfig.from_hf_config(tiny_hf_config(
        vocab_size=4096, hidden_size=256, num_hidden_layers=4, n_routed_experts=32, moe_intermediate_size=512,
        n_group=1, topk_group=1, topk_method="greedy"))
    torch.manual_seed(0)
    directory = save_pretrained(CausalLM(config), tmp_path / "big", max_shard_size="10GB")
    script = (
        "import json, sys, torch\n"
        f"sys.path.insert(0, {str(ROOT)!r})\n"
        "from model import CausalLM\n"
        "from model.hf import load_config, load_pretrained\n"
        "with torch.device('meta'):  # warm up torch's lazily imported machinery, which is not checkpoint memory\n"
        f"    CausalLM(load_config({str(directory)!r}))\n"
        "def status(key):\n"
        "    line = next(l for l in open('/proc/self/status') if l.startswith(key))\n"
        "    return int(line.split()[1]) * 1024\n"
        "open('/proc/self/clear_refs', 'w').write('5')  # reset the peak (VmHWM) to the current RSS\n"
        "base = status('VmRSS')\n"
        f"model = load_pretrained({str(directory)!r})\n"
        "size = sum(p.numel() * p.element_size() for p in model.parameters())\n"
        "print(json.dumps({'base': base, 'peak': status('VmHWM'), 'model_bytes': size}))\n"
    )
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    figures = json.loads(proc.stdout.strip().splitlines()[-1])
    growth = figures["peak"] - figures["base"]
    print(f"model {figures['model_bytes'] / 2**20:.0f} MiB, peak RSS growth while loading {growth / 2**20:.0f} MiB")
    assert figures["model_bytes"] > 100 * 2**20
    assert growth < 1.15 * figures["model_bytes"] + 16 * 2**20


def test_tensor_in_a_shard_but_not_in_the_index_is_unexpected(sharded):
    shard = sorted(sharded.glob("model-*.safetensors"))[0]
    tensors = load_file(shard)
    tensors["model.layers.1.mlp.gate.e_score_correction_bias"] = torch.zeros(8)
    save_file(tensors, shard)
    with pytest.raises(CheckpointError, match=r"unexpected tensor 'model\.layers\.1\.mlp\.gate\.e_score_correction_"
                                              r"bias' \(in the shard but not in model\.safetensors\.index\.json"):
        load_pretrained(sharded)


def test_integer_weights_are_refused(single):
    _rewrite(single, lambda t: t.update({"lm_head.weight": torch.zeros(211, 64, dtype=torch.int8)}))
    with pytest.raises(CheckpointError, match=r"'lm_head\.weight' has dtype I8"):
        load_pretrained(single)


def test_values_that_overflow_the_target_dtype_are_caught(single):
    def big(t):
        t["model.norm.weight"][3] = 1e6  # finite in fp32, inf in fp16
    _rewrite(single, big)
    load_pretrained(single, dtype=torch.float32)
    with pytest.raises(CheckpointError, match=r"'model\.norm\.weight' contains NaN or Inf after conversion"):
        load_pretrained(single, dtype=torch.float16)


def test_export_refuses_a_partial_expert_set_and_unwraps_wrappers(tmp_path, model):
    class Wrapper(torch.nn.Module):  # what DDP / DeepSpeed engines look like: the model under .module
        def __init__(self, inner):
            super().__init__()
            self.module = inner

    out = save_pretrained(Wrapper(model), tmp_path / "wrapped")
    assert "lm_head.weight" in load_file(out / "model.safetensors")
    model.model.layers[1].mlp.experts = RoutedExperts(4, 64, 24, expert_offset=4, n_total=8)
    with pytest.raises(ValueError, match=r"holds 4 of 8 experts; gather"):
        save_pretrained(model, tmp_path / "partial")
