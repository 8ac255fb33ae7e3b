"""Context parallelism over gloo, in separate torchrun launches: the model with its sequences split zigzag over 2
and 4 ranks, exchanging MLA's latent, against the whole sequences in one process (tests/distributed/cp_check.py)."""

from __future__ import annotations

import json

import pytest

from tests.distributed.torchrun import run_check


@pytest.mark.parametrize("nproc,seq,cases", [(2, 64, "causal,documents,checkpointing"),
                                             (4, 64, "causal,documents,checkpointing"),
                                             (2, 4096, "causal")])
def test_context_parallel_model_matches_whole_sequences(tmp_path, nproc, seq, cases):
    """Logits at each rank's tokens, the summed loss, the balance losses (their statistics summed over the group)
    and every gradient summed over the ranks equal the whole run's within 1e-5 relative (measured at most 1.6e-6
    for gradients, 6.4e-7 for logits): plain causal sequences, packed documents crossing chunk boundaries with
    positions restarting, and with activation checkpointing; at 4096 tokens too. The exchange is the latent: each
    rank hands all_gather (r + dr) x 4 bytes per token and layer to each other rank."""
    result = run_check("cp_check.py", nproc, "--seq", str(seq), "--cases", cases, out=tmp_path / "result.json",
                       timeout=300)
    print(json.dumps(result, indent=1))
    for case in cases.split(","):
        assert result[f"grads_checked:{case}"] >= 50 and result[f"grad:{case}"] < 1e-5
    assert result["logits"] < 1e-5 and result["loss"] < 1e-5 and result["aux"] < 1e-5
    # tiny: r + dr = 32 + 16 numbers a token, 4 layers, batch 2, seq / nproc tokens a rank, fp32, to nproc - 1 ranks
    per_forward = 2 * (seq // nproc) * (32 + 16) * 4 * 4 * (nproc - 1)
    forwards = {"causal": 1, "documents": 1, "checkpointing": 2}  # checkpointing recomputes each layer once
    assert result["floating_bytes_sent_rank0"] == per_forward * sum(forwards[c] for c in cases.split(","))
