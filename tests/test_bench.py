"""The benchmark entry point (the README's main command) on the tiny presets: each mode must report that the two
sides it times compute the same thing, within a stated tolerance, besides its timings."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent

LOGITS_TOL = 1e-4  # fp32, as tests/model/test_parity_hf.py; the bench's models agree to about 1e-6
LOSS_REL_TOL = 1e-5
EP_OUTPUT_TOL = 1e-5  # fp32 on CPU; the layer's outputs are of order 1e-2


def _bench(tmp_path: Path, *args: str, env: dict | None = None) -> dict:
    out = tmp_path / "bench.json"
    proc = subprocess.run([sys.executable, str(ROOT / "launch" / "bench.py"), *args, "--json", str(out)],
                          capture_output=True, text=True, timeout=300, cwd=tmp_path, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    print(proc.stdout)
    return json.loads(out.read_text())


@pytest.mark.parametrize("preset", ["tiny", "tiny_lite"])
def test_bench_models_agree_and_the_ratio_is_reported(tmp_path, preset, transformers_ds):
    """latentmoe and transformers on the same weights and batch, fp32, eval: logits max |diff| < 1e-4 and loss
    relative diff < 1e-5; transformers ran the pinned experts implementation (grouped_mm) and SDPA attention."""
    results = _bench(tmp_path, "--preset", preset, "--steps", "2", "--warmup", "1", "--batch", "2", "--seq", "32",
                     "--rounds", "2")
    parity = results["parity"]
    assert parity["dtype"] == "float32" and parity["mode"] == "eval"
    assert parity["logits_max_abs_diff"] < LOGITS_TOL
    assert parity["logits_mean_abs_diff"] <= parity["logits_max_abs_diff"]
    assert parity["logits_max_abs"] > 100 * LOGITS_TOL  # the logits are not all near zero
    assert parity["loss_rel_diff"] < LOSS_REL_TOL
    assert results["implementations"] == {"latentmoe": {"attention": "sdpa", "experts": "grouped_mm"},
                                          "transformers": {"attention": "sdpa", "experts": "grouped_mm"}}
    for name in ("latentmoe", "transformers"):
        assert results[name]["timed_steps"] == 2 and 0 < results[name]["mfu"] < 1
    assert results["ratio"] == pytest.approx(
        results["latentmoe"]["tokens_per_s"] / results["transformers"]["tokens_per_s"])


def test_data_bench_pipeline_tokens_equal_the_raw_tokenizers(tmp_path):
    """Exact: the unshuffled pipeline's rows (inputs and targets) equal the raw tokenizer's encodings of the same
    documents, each followed by EOS, cut into rows (0 tokens differ, over all but the last partial row), and none
    of the shuffled loader's first rows is outside that multiset."""
    seq = 128
    results = _bench(tmp_path, "data", "--cache-dir", str(tmp_path / "cache"), "--rounds", "1", "--max-mb", "1",
                     "--seq", str(seq))
    parity = results["parity"]
    assert parity["mismatched_tokens"] == 0 and parity["shuffled_rows_unmatched"] == 0
    # every row of the epoch is compared: all tokens (plus one EOS per document) but the last partial row's
    assert 0 <= results["tokens"] + results["documents"] - parity["tokens_compared"] < seq + 1
    assert parity["shuffled_rows_checked"] > parity["rows_compared"] // 2
    assert results["ratio"] == pytest.approx(results["pipeline_tokens_per_s"] / max(
        v for k, v in results.items() if k.startswith("raw_")))


def test_ep_bench_expert_parallel_output_equals_local(tmp_path):
    """The expert-parallel layer (ep=2, gloo, fp32) gives the all-experts-local layer's output on the same tokens,
    max |diff| < 1e-5 on every rank; and one row per copy is never below one row per distinct remote rank."""
    result = _bench(tmp_path, "ep", "--ep", "2", "--tokens", "256", "--steps", "2", "--warmup", "1",
                    env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert result["dtype"] == "torch.float32"
    assert result["output_max_abs_diff"] < EP_OUTPUT_TOL
    assert result["output_max_abs"] > 100 * EP_OUTPUT_TOL
    assert all(r["output_max_abs_diff"] < EP_OUTPUT_TOL for r in result["per_rank"])
    assert result["bytes_per_token"] >= result["min_bytes_per_token"] > 0
