"""The benchmark entry point (the README's main command) runs end to end on the tiny preset."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.parametrize("preset", ["tiny", "tiny_lite"])
def test_bench_prints_both_throughputs_and_the_ratio(tmp_path, preset, transformers_ds):
    out = tmp_path / "bench.json"
    proc = subprocess.run(
        [sys.executable, str(ROOT / "launch" / "bench.py"), "--preset", preset, "--steps", "2", "--warmup", "1",
         "--batch", "2", "--seq", "32", "--rounds", "2", "--json", str(out)],
        capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    print(proc.stdout)
    assert "latentmoe" in proc.stdout and "transformers" in proc.stdout and "ratio" in proc.stdout
    results = json.loads(out.read_text())
    for name in ("latentmoe", "transformers"):
        assert results[name]["tokens_per_s"] > 0 and results[name]["timed_steps"] == 2
        assert 0 < results[name]["mfu"] < 1
    assert results["ratio"] == pytest.approx(
        results["latentmoe"]["tokens_per_s"] / results["transformers"]["tokens_per_s"])


def test_data_bench_reports_pipeline_and_raw_tokenizer_rates(tmp_path):
    out = tmp_path / "data.json"
    proc = subprocess.run(
        [sys.executable, str(ROOT / "launch" / "bench.py"), "data", "--cache-dir", str(tmp_path / "cache"),
         "--rounds", "1", "--max-mb", "1", "--seq", "128", "--json", str(out)],
        capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    print(proc.stdout)
    results = json.loads(out.read_text())
    assert results["tokens"] > 100_000 and results["pipeline_tokens_per_s"] > 0
    assert results["raw_encode_batch_tokens_per_s"] > 0
    assert results["ratio"] == pytest.approx(results["pipeline_tokens_per_s"] / max(
        v for k, v in results.items() if k.startswith("raw_")))


def test_ep_bench_reports_layer_times_and_bytes_per_token(tmp_path):
    out = tmp_path / "ep.json"
    proc = subprocess.run(
        [sys.executable, str(ROOT / "launch" / "bench.py"), "ep", "--ep", "2", "--tokens", "256", "--steps", "2",
         "--warmup", "1", "--json", str(out)], capture_output=True, text=True, timeout=300, cwd=tmp_path,
        env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    print(proc.stdout)
    result = json.loads(out.read_text())
    assert result["local_s"] > 0 and result["ep_s"] > 0
    # one row per copy can never be below one row per distinct remote rank
    assert result["bytes_per_token"] >= result["min_bytes_per_token"] > 0
