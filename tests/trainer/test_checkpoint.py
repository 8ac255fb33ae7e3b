"""Checkpoint selection, retention and exact state round trips (no processes needed)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from trainer.checkpoint import (COMPLETE, CheckpointNotFound, choose_resume, find_resume, join_arrays,
                                list_checkpoints, load_owned_tensors, owned_tensors, prune, set_aside_newer,
                                split_arrays, step_dir)
from trainer.tensorfile import scan, write_tensors


def _make(root, step, complete=True):
    path = step_dir(root, step)
    path.mkdir(parents=True)
    (path / "model.safetensors").write_bytes(b"x")
    if complete:
        (path / COMPLETE).write_text("done")
    return path


def test_auto_resume_takes_the_newest_complete_checkpoint(tmp_path):
    assert find_resume(tmp_path, "auto") is None
    _make(tmp_path, 2)
    newest = _make(tmp_path, 4)
    _make(tmp_path, 6, complete=False)  # a crash mid-save
    assert find_resume(tmp_path, "auto") == newest
    assert find_resume(tmp_path, "none") is None
    with pytest.raises(CheckpointNotFound, match="incomplete checkpoint"):
        find_resume(tmp_path, str(step_dir(tmp_path, 6)))
    with pytest.raises(CheckpointNotFound, match="no such directory"):
        find_resume(tmp_path, str(tmp_path / "elsewhere"))


def test_retention_keeps_the_newest_complete_and_drops_stale_partials(tmp_path):
    for step in (1, 2, 3, 4):
        _make(tmp_path, step)
    _make(tmp_path, 0, complete=False)
    _make(tmp_path, 9, complete=False)  # newer than any complete one: maybe still being written, kept
    prune(tmp_path, keep=2)
    complete, incomplete = list_checkpoints(tmp_path)
    assert [p.name for p in complete] == ["step_00000003", "step_00000004"]
    assert [p.name for p in incomplete] == ["step_00000009"]
    prune(tmp_path, keep=1)
    assert [p.name for p in list_checkpoints(tmp_path)[0]] == ["step_00000004"]


def test_nested_state_with_arrays_round_trips_exactly():
    rng = np.random.default_rng(5)
    state = {"position": {"epoch": 1, "extra": {}}, "rows": {"tokens": np.arange(12, dtype=np.int32).reshape(3, 4)},
             "rng": rng.bit_generator.state, "t": torch.tensor([1.5, 2.5]), "list": [np.ones(2, bool), 3]}
    meta, arrays = split_arrays(state)
    back = join_arrays(meta, arrays)
    assert back["rng"] == state["rng"] and back["position"] == state["position"]
    np.testing.assert_array_equal(back["rows"]["tokens"], state["rows"]["tokens"])
    assert back["rows"]["tokens"].dtype == np.int32 and torch.equal(back["t"], state["t"])
    assert back["list"][0].dtype == bool and back["list"][1] == 3


def _trained_tiny(expert_shard=None, seed=0):
    from model import CausalLM
    from trainer.presets import model_preset
    torch.manual_seed(seed)
    model = CausalLM(model_preset("tiny_lite"), expert_shard=expert_shard)
    opt = torch.optim.AdamW(model.parameters(), lr=0.1)
    return model, opt


def test_weights_and_optimizer_reshard_across_expert_layouts(tmp_path):
    """Saved by 2 expert shards (4 + 4 of 8 experts), loaded by 1 (all 8) and by 4 shards (2 each): every entry,
    weights and AdamW moments and steps, lands bit for bit where it belongs."""
    from safetensors.torch import save_file
    from model import next_token_labels
    full, full_opt = _trained_tiny()
    ids = torch.randint(0, 4096, (2, 16))
    full(ids, labels=next_token_labels(ids)).loss.backward()
    full_opt.step()
    for rank, (offset, count) in enumerate([(0, 4), (4, 4)]):  # two ranks, each owning half the experts
        shard, shard_opt = _trained_tiny((offset, count), seed=1)
        with torch.no_grad():
            for name, p in shard.named_parameters():
                source = dict(full.named_parameters())[name]
                p.copy_(source[offset:offset + count] if ".mlp.experts." in name else source)
            for name, p in shard.named_parameters():
                state = full_opt.state[dict(full.named_parameters())[name]]
                shard_opt.state[p] = {k: (v[offset:offset + count] if ".mlp.experts." in name and v.ndim else v)
                                      .clone() for k, v in state.items()}
        weights, optim = owned_tensors(shard, shard_opt, dense=rank == 0, experts=True)
        save_file(weights, str(tmp_path / f"model_rank{rank:05d}.safetensors"))
        save_file(optim, str(tmp_path / f"optimizer_rank{rank:05d}.safetensors"))
    for shard_spec in (None, (2, 2), (6, 2)):
        model, opt = _trained_tiny(shard_spec, seed=2)
        load_owned_tensors(tmp_path, model, opt)
        lo, n = shard_spec or (0, 8)
        for name, p in model.named_parameters():
            ref = dict(full.named_parameters())[name]
            expert = ".mlp.experts." in name
            assert torch.equal(p, ref[lo:lo + n] if expert else ref), (shard_spec, name)
            for slot, value in full_opt.state[ref].items():
                want = value[lo:lo + n] if expert and value.ndim else value
                assert torch.equal(opt.state[p][slot], want), (shard_spec, name, slot)


def test_missing_entries_are_named(tmp_path):
    from safetensors.torch import save_file
    model, _ = _trained_tiny()
    weights, _ = owned_tensors(model, None, dense=True, experts=True)
    weights.pop("model.layers.2.mlp.experts.down_proj.5")
    save_file(weights, str(tmp_path / "model_rank00000.safetensors"))
    with pytest.raises(ValueError, match=r"1 weights missing \(e\.g\. \['model\.layers\.2\.mlp\.experts\.down_proj\.5'"):
        load_owned_tensors(tmp_path, model, None)


def test_resume_choice_for_relaunches_rollbacks_and_fresh_starts(tmp_path):
    run, other = tmp_path / "run", tmp_path / "other"
    start = _make(other, 0)  # e.g. an imported HF model
    assert choose_resume(run, str(start)) == (start, [])  # first launch: the given start
    _make(run, 2)
    newest = _make(run, 4)
    assert choose_resume(run, str(start)) == (newest, [])  # relaunch of the same command: continue this run
    assert choose_resume(run, "auto") == (newest, [])
    with pytest.raises(ValueError, match=r"checkpoint\.resume=none, but checkpoint\.dir=.* holds checkpoints"):
        choose_resume(run, "none")
    older = step_dir(run, 2)
    chosen, aside = choose_resume(run, str(older))  # a deliberate rollback inside the run
    assert chosen == older and aside == [newest]
    moved = set_aside_newer(newest)
    assert moved.parent.name == "set_aside" and (moved / COMPLETE).exists()
    assert find_resume(run, "auto") == older  # auto never returns to the abandoned timeline


def _mapped(path) -> list[str]:
    """Lines of /proc/self/maps that map a file under `path`."""
    with open("/proc/self/maps", encoding="utf-8") as f:
        return [line for line in f if str(path) in line]


@pytest.mark.skipif(not __import__("os").path.exists("/proc/self/maps"), reason="needs /proc/self/maps (Linux)")
def test_a_loaded_checkpoint_leaves_no_file_mapped(tmp_path):
    """safe_open maps a file; a tensor read from it and kept (as AdamW state) would keep the whole file mapped, and
    its pages resident, for the rest of the run. After loading, nothing of the checkpoint is mapped."""
    import gc
    from model import next_token_labels
    model, opt = _trained_tiny()
    ids = torch.randint(0, 4096, (2, 16))
    model(ids, labels=next_token_labels(ids)).loss.backward()
    opt.step()
    weights, optim = owned_tensors(model, opt, dense=True, experts=True)
    write_tensors(weights, tmp_path / "model_rank00000.safetensors")
    write_tensors(optim, tmp_path / "optimizer_rank00000.safetensors")
    loaded, loaded_opt = _trained_tiny(seed=3)
    load_owned_tensors(tmp_path, loaded, loaded_opt)
    gc.collect()
    assert _mapped(tmp_path) == []
    p = next(loaded.parameters())
    assert torch.equal(loaded_opt.state[p]["exp_avg"], opt.state[next(model.parameters())]["exp_avg"])


def test_tensor_files_are_hashed_and_checked_while_written_and_verified_in_one_read(tmp_path):
    """trainer/tensorfile.py: the file reads back through safetensors exactly, the digest written is the file's
    SHA-256, and a NaN or Inf anywhere (here past the first 4 MiB chunk of a tensor, in fp32 and bf16) is named by
    both the writer and the one-read scan."""
    import hashlib
    from safetensors import safe_open
    tensors = {"a.weight": torch.randn(3, 5), "b": torch.randn(3 << 20), "c": torch.randn(7, dtype=torch.bfloat16),
               "step": torch.tensor(4.0), "empty": torch.zeros(0), "flags": torch.ones(3, dtype=torch.bool)}
    path = tmp_path / "t.safetensors"
    written = write_tensors(tensors, path, metadata={"format": "pt"})
    assert written.sha256 == hashlib.sha256(path.read_bytes()).hexdigest() and written.bytes == path.stat().st_size
    assert written.non_finite is None and scan(path, check_finite=True) == written
    with safe_open(str(path), framework="pt") as f:
        assert f.metadata() == {"format": "pt"} and sorted(f.keys()) == sorted(tensors)
        assert all(torch.equal(f.get_tensor(k), v) for k, v in tensors.items())
    for name, index, value in (("b", (2 << 20) + 3, float("nan")), ("c", 6, float("inf"))):
        bad = {k: v.clone() for k, v in tensors.items()}
        bad[name][index] = value
        found = write_tensors(bad, path)
        assert found.non_finite is not None and f"tensor {name} " in found.non_finite
        assert f"tensor {name} " in scan(path, check_finite=True).non_finite
        assert scan(path, check_finite=False).non_finite is None
