"""Checkpoint selection, retention and exact state round trips (no processes needed)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from trainer.checkpoint import (COMPLETE, CheckpointNotFound, choose_resume, find_resume, join_arrays,
                                list_checkpoints, load_optimizer_tensors, optimizer_tensors, prune, set_aside_newer,
                                split_arrays, step_dir)


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


def test_optimizer_state_round_trips_by_parameter_name():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.Linear(4, 2))
    opt = torch.optim.AdamW(model.parameters(), lr=0.1)
    model(torch.randn(5, 3)).sum().backward()
    opt.step()
    saved = optimizer_tensors(model, opt)
    fresh = torch.optim.AdamW(model.parameters(), lr=0.1)
    load_optimizer_tensors(model, fresh, saved)
    for p in model.parameters():
        for key in ("exp_avg", "exp_avg_sq", "step"):
            assert torch.equal(opt.state[p][key], fresh.state[p][key])
    with pytest.raises(ValueError, match="unknown parameter"):
        load_optimizer_tensors(model, fresh, {"9.weight::exp_avg": torch.zeros(1)})


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
