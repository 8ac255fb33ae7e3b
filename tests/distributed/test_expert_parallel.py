"""Expert parallelism over gloo, in separate torchrun launches (short process-group timeout, outer timeout)."""

from __future__ import annotations

import json

import pytest

from tests.distributed.torchrun import run_check


@pytest.mark.parametrize("nproc,ep", [(2, 2), (4, 4), (4, 2)])
def test_expert_parallel_matches_one_process(tmp_path, nproc, ep):
    """Dispatcher edge cases and the whole model (loss, every gradient, parameters over 3 AdamW steps, with and
    without token dropping) against one process; ep=4 is also ep == n_group for device-limited routing. ep_check
    asserts: the dispatcher's outputs and gradients and the model's first-step gradients within 1e-6 absolute +
    1e-5 relative (measured max 2.2e-8; the dispatcher 0 with one replica, 3e-6 with two), losses within 1e-5
    relative (measured 3.6e-7), gradient norms within 1e-5 relative at step 0 and 1e-4 later, and parameters over
    3 AdamW steps (lr 1e-3, eps 1e-6) within 1e-5 absolute + 1e-4 relative (measured 1.6e-6)."""
    result = run_check("ep_check.py", nproc, "--ep", str(ep), out=tmp_path / "result.json", timeout=240)
    print(json.dumps(result, indent=1))
    assert result["drop"]["dropped_copies"] > 0 and result["no_drop"]["dropped_copies"] == 0
    assert result["drop"]["losses"] != result["no_drop"]["losses"]
    if ep == 4:  # ep == n_group (4) with topk_group 2: the limit is reached, never passed
        assert result["no_drop"]["ranks_per_token_max"] == 2
