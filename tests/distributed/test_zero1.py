"""ZeRO-1 without DeepSpeed (trainer/zero1.py): the sharded AdamW takes the replicated AdamW's steps bit for bit while
each data-parallel rank holds 1/dp of the optimizer state, in one process and under torchrun over gloo."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from tests.distributed.torchrun import run_check
from tests.distributed.zero1_check import LOAD_STEPS, STEPS, TinyModel, ToyModel, check
from trainer.layout import ProcessGrid


def zero1_check(tmp_path: Path, nproc: int, ep: int) -> dict:
    result = run_check("zero1_check.py", nproc, "--ep", str(ep), out=tmp_path / "result.json", timeout=180)
    print(json.dumps(result, indent=1))
    return result


@pytest.mark.parametrize("nproc,ep", [(4, 2)])
def test_sharded_adamw_steps_like_adamw_with_one_dp_th_of_the_state(tmp_path, nproc, ep):
    """zero1_check asserts on every rank, bitwise: losses and weights over 6 steps, `get` of every parameter against
    torch's AdamW, `load` of all states (and of all but three, which start afresh) continuing, and the checkpoint's
    per-entry tensors equal to the replicated AdamW's. 4 processes: dp=4 with ep=2 x edp=2 (dense state over 4 ranks,
    experts' over their 2 replicas; dp=2 runs inside the pipeline engine, tests/distributed/test_torch_pipeline.py).
    Each rank holds its contiguous slice of each kind (ceil(N / size) at most), the slices summing to the whole
    model's state once: 1/dp of it on every rank (measured: exactly 0.25 on the tiny preset). The toy module's odd
    sizes leave an uneven last slice and, at dp=4, a rank without dense state."""
    result = zero1_check(tmp_path, nproc, ep)
    assert (result["dp"], result["ep"]) == (nproc, ep) and len(result["ranks"]) == nproc
    for rank in result["ranks"]:
        tiny = rank["tiny"]
        assert len(tiny["losses"]) == STEPS + 1 + LOAD_STEPS and len(set(tiny["losses"])) > 1
        assert tiny["fraction_of_model"] == pytest.approx(1 / nproc, rel=1e-3)
    toy = [rank["toy"]["state_numel"] for rank in result["ranks"]]
    assert len(set(toy)) > 1, "the toy's slices should be uneven"


def test_sharded_adamw_in_one_process_needs_no_process_group():
    """dp == 1 (no process group at all): the whole state on the one rank, the same steps as AdamW."""
    grid = ProcessGrid()
    assert grid.dp_group is None and grid.edp_group is None
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as the torchrun ranks: on busy shared cores two threads took 26 s here instead of 1 s
    try:
        for case in (ToyModel(grid), TinyModel(grid)):
            result = check(case, grid)
            assert result["fraction_of_model"] == 1.0 and len(result["losses"]) == STEPS + 1 + LOAD_STEPS
    finally:
        torch.set_num_threads(threads)
