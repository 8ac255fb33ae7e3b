"""The benchmark entry point (the README's main command) on the tiny presets: each mode must report that the two
sides it times compute the same thing, within a stated tolerance, besides its timings."""

from __future__ import annotations

import importlib.util
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent

LOGITS_TOL = 1e-4  # fp32, as tests/model/test_parity_hf.py; the bench's models agree to about 1e-6
LOSS_REL_TOL = 1e-5
GRAD_GLOBAL_TOL = 1e-4  # |grad diff| / |grad| over all parameters; measured about 4e-7 (tiny, CPU)
GRAD_TENSOR_TOL = 1e-3  # the worst single tensor; measured about 1e-6
EP_OUTPUT_TOL = 1e-5  # fp32 on CPU; the layer's outputs are of order 1e-2


def _bench_out(tmp_path: Path, *args: str, env: dict | None = None) -> tuple[dict, str]:
    out = tmp_path / "bench.json"
    proc = subprocess.run([sys.executable, str(ROOT / "launch" / "bench.py"), *args, "--json", str(out)],
                          capture_output=True, text=True, timeout=300, cwd=tmp_path, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    print(proc.stdout)
    return json.loads(out.read_text()), proc.stdout


def _bench(tmp_path: Path, *args: str, env: dict | None = None) -> dict:
    return _bench_out(tmp_path, *args, env=env)[0]


def _load_bench():
    spec = importlib.util.spec_from_file_location("bench_under_test", ROOT / "launch" / "bench.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize("preset,flags", [("tiny", ()), ("tiny_lite", ("--compile", "off",
                                                                       "--activation-checkpointing"))])
def test_bench_models_agree_and_both_transformers_rows_are_reported(tmp_path, preset, flags, transformers_ds):
    """latentmoe (the trainer's model and built-in engine) and transformers on the same weights and batch, fp32,
    eval: logits, loss and every parameter's gradient agree within the stated tolerances, for transformers'
    grouped_mm and eager experts; both rows are timed, and the first ratio line is the grouped_mm one, verbatim."""
    results, stdout = _bench_out(tmp_path, "--preset", preset, "--steps", "2", "--warmup", "1", "--batch", "2",
                                 "--seq", "32", "--rounds", "2", *flags, env={**os.environ, "OMP_NUM_THREADS": "1"})
    from model import CausalLM
    from trainer.presets import model_preset
    n_params = len(list(CausalLM(model_preset(preset)).parameters()))
    for impl in ("grouped_mm", "eager"):
        parity = results["parity"][impl]
        assert parity["dtype"] == "float32" and parity["mode"] == "eval"
        assert parity["logits_max_abs_diff"] < LOGITS_TOL
        assert parity["logits_mean_abs_diff"] <= parity["logits_max_abs_diff"]
        assert parity["logits_max_abs"] > 100 * LOGITS_TOL  # the logits are not all near zero
        assert parity["loss_rel_diff"] < LOSS_REL_TOL
        assert parity["grad_tensors"] == n_params  # every parameter got a gradient to compare
        assert parity["grad_global_rel_diff"] < GRAD_GLOBAL_TOL
        assert parity["grad_tensor_max_rel_diff"] < GRAD_TENSOR_TOL
        row = results["transformers"][impl]
        assert (row["attention"], row["experts"]) == ("sdpa", impl)
        assert row["timed_steps"] == 2 and 0 < row["mfu"] < 1 and row["peak_mem_gib"] > 0
        assert results["ratios"][impl] == pytest.approx(
            results["latentmoe"]["tokens_per_s"] / row["tokens_per_s"], rel=1e-9)
    assert results["parity"]["tolerances"] == {"logits_rel": 1e-4, "loss_rel": 1e-5, "grad_global_rel": 1e-4,
                                               "grad_tensor_rel": 1e-3}
    ours = results["latentmoe"]
    assert ours["timed_steps"] == 2 and 0 < ours["mfu"] < 1 and ours["experts"] == "grouped_mm"
    assert results["trainer"] == {"precision": "fp32", "compile": False if flags else None, "compiled": False,
                                  "activation_checkpointing": bool(flags), "engine": "built-in engine"}
    assert results["ratio"] == results["ratios"]["grouped_mm"]
    ratios = [line for line in stdout.splitlines() if line.startswith("ratio latentmoe / transformers")]
    assert len(ratios) == 2
    assert re.fullmatch(r"ratio latentmoe / transformers \(grouped_mm experts\) tokens/s: \d+\.\d\dx", ratios[0])
    assert re.fullmatch(r"ratio latentmoe / transformers \(eager experts\) tokens/s: \d+\.\d\dx", ratios[1])
    assert f"{results['ratios']['grouped_mm']:.2f}x" in ratios[0]
    # one peak for every MFU, printed; the head's share of the FLOPs printed
    assert f"peak {results['peak_tflops']:.2f} TFLOP/s" in stdout
    assert f"output head {results['head_flops_share']:.1%}" in stdout
    assert 0 < results["head_flops_share"] < 1


def test_parity_failures_name_each_figure_over_its_tolerance():
    bench = _load_bench()
    good = {"logits_max_abs_diff": 1e-6, "logits_max_abs": 2.0, "loss_rel_diff": 1e-7, "grad_global_rel_diff": 1e-6,
            "grad_tensor_max_rel_diff": 1e-5, "grad_worst_tensor": "model.norm.weight"}
    assert bench.parity_failures(good) == []
    for key, value, named in (("logits_max_abs_diff", 1e-3, "logits"), ("loss_rel_diff", 1e-4, "loss"),
                              ("grad_global_rel_diff", 1e-3, "global"),
                              ("grad_tensor_max_rel_diff", float("nan"), "model.norm.weight")):
        failures = bench.parity_failures({**good, key: value})
        assert len(failures) == 1 and named in failures[0], (key, failures)


def test_broken_parity_stops_the_benchmark_before_timing(monkeypatch, capsys):
    """A gradient disagreement over tolerance ends the run (SystemExit: exit code 1) with the figure named."""
    bench = _load_bench()
    figures = {"dtype": "float32", "mode": "eval", "logits_max_abs_diff": 1e-6, "logits_mean_abs_diff": 1e-7,
               "logits_max_abs": 2.0, "loss": 8.3, "loss_rel_diff": 1e-7, "grad_global_rel_diff": 3e-2,
               "grad_tensor_max_rel_diff": 1e-5, "grad_worst_tensor": "lm_head.weight", "grad_tensors": 60}
    monkeypatch.setattr(bench, "parity", lambda *args: {"eager": figures})
    with pytest.raises(SystemExit, match=r"parity with transformers broken.*eager: gradient global relative diff"):
        bench.check_parity(None, {}, None, ["eager"], None)
    assert "parity with transformers (eager experts" in capsys.readouterr().out


def test_default_depth_puts_the_head_under_its_share_or_keeps_the_preset():
    """v2_lite on a CPU: the fewest layers at which the output head is under 15% of the FLOPs (one fewer is not);
    tiny, whose head is a third of its FLOPs at any depth, keeps its 4 layers."""
    import torch
    bench = _load_bench()
    cpu = torch.device("cpu")
    depth, _ = bench.default_depth("v2_lite", 2048, cpu)
    assert bench.head_flops_share(bench.with_depth("v2_lite", depth), 2048) < bench.HEAD_SHARE_TARGET
    assert bench.head_flops_share(bench.with_depth("v2_lite", depth - 1), 2048) >= bench.HEAD_SHARE_TARGET
    assert bench.default_depth("tiny", 256, cpu)[0] == 4


def test_data_bench_pipeline_tokens_equal_the_raw_tokenizers(tmp_path, cache_dir):
    """Exact: the unshuffled pipeline's rows (inputs and targets) equal the raw tokenizer's encodings of the same
    documents, each followed by EOS, cut into rows (0 tokens differ, over all but the last partial row), and none
    of the shuffled loader's first rows is outside that multiset. The same documents pre-tokenized (.bin/.idx)
    give the same rows, unshuffled and shuffled; the ratio line is printed; the 3-source mixture's rows per source
    are the largest-deficit-first counts; data.shards 1, 8 and 32 each have a row, on-the-fly and pre-tokenized,
    whose first rows agree. Timings are reported, not tested."""
    seq = 64
    results, stdout = _bench_out(tmp_path, "data", "--cache-dir", str(cache_dir), "--rounds", "1", "--max-mb", "1",
                                 "--shard-mb", "0.5", "--seq", str(seq), "--min-seconds", "0",
                                 "--docs-per-chunk", "16")
    parity = results["parity"]
    assert parity["mismatched_tokens"] == 0 and parity["shuffled_rows_unmatched"] == 0
    # every row of the epoch is compared: all tokens (plus one EOS per document) but the last partial row's
    assert 0 <= results["tokens"] + results["documents"] - parity["tokens_compared"] < seq + 1
    assert parity["shuffled_rows_checked"] > parity["rows_compared"] // 2
    assert results["ratio"] == pytest.approx(results["pipeline_tokens_per_s"] / max(
        v for k, v in results.items() if k.startswith("raw_") and k.endswith("_tokens_per_s")))

    pretokenized = results["pretokenized"]
    assert pretokenized["files"] == 4 and pretokenized["tokens_per_s"] > 0
    assert pretokenized["parity"]["rows_compared"] == parity["rows_compared"]
    assert pretokenized["parity"]["mismatched_tokens"] == 0
    assert pretokenized["parity"]["shuffled_rows_compared"] == parity["shuffled_rows_checked"]
    assert pretokenized["parity"]["shuffled_mismatched_tokens"] == 0
    ratio_lines = [line for line in stdout.splitlines() if "ratio pretokenized / on-the-fly" in line]
    assert len(ratio_lines) == 1
    assert re.fullmatch(r"  ratio pretokenized / on-the-fly tokens/s: \d+\.\d\dx", ratio_lines[0])
    assert f"{results['ratio_pretokenized']:.2f}x" in ratio_lines[0]
    assert results["ratio_pretokenized"] == pytest.approx(pretokenized["tokens_per_s"] /
                                                          results["pipeline_tokens_per_s"])

    mixture = results["mixture"]
    assert [(m["name"], m["weight"], m["format"]) for m in mixture["sources"]] == [
        ("text", 0.5, "jsonl"), ("tokens-a", 0.3, "bin"), ("tokens-b", 0.2, "bin")]
    assert mixture["mismatched_rows"] == 0 and mixture["tokens_per_s"] > 0
    assert mixture["rows_by_source"] == mixture["expected_rows_by_source"]
    assert sum(mixture["rows_by_source"].values()) == mixture["global_rows"] > 0
    for name, weight in (("text", 0.5), ("tokens-a", 0.3), ("tokens-b", 0.2)):
        assert abs(mixture["rows_by_source"][name] - weight * mixture["global_rows"]) <= 1

    shard_rows = results["shard_rows"]
    rows = {(r["kind"], r["shards"]): r for r in shard_rows["rows"]}
    assert set(rows) == {(kind, shards) for kind in ("on-the-fly", "pretokenized") for shards in (1, 8, 32)}
    for row in rows.values():
        assert row["tokens_per_s"] > 0 and row["first_batch_s"] > 0
    for shards in ("1", "8", "32"):
        assert shard_rows["parity"][shards]["rows_compared"] >= 128
        assert shard_rows["parity"][shards]["mismatched_tokens"] == 0
    sustained = results["sustained"]
    assert sustained["seq"] == 4096
    assert sustained["rows_per_s"] == pytest.approx(pretokenized["tokens_per_s"] / 4096)


def test_ep_bench_expert_parallel_output_equals_local(tmp_path):
    """The expert-parallel layer (ep=2, gloo, fp32) gives the all-experts-local layer's output on the same tokens,
    max |diff| < 1e-5 on every rank; and the bytes sent to the other rank, counted at torch's all-to-all calls, are
    within 1.1x the routing's minimum (one row per token and distinct remote rank, each way), as the dispatcher
    itself reports them (measured 1.03x)."""
    result = _bench(tmp_path, "ep", "--ep", "2", "--tokens", "256", "--steps", "2", "--warmup", "1",
                    env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert result["dtype"] == "torch.float32"
    assert result["output_max_abs_diff"] < EP_OUTPUT_TOL
    assert result["output_max_abs"] > 100 * EP_OUTPUT_TOL
    assert all(r["output_max_abs_diff"] < EP_OUTPUT_TOL for r in result["per_rank"])
    assert result["min_bytes_per_token"] > 0
    assert result["min_bytes_per_token"] <= result["bytes_per_token"] <= 1.1 * result["min_bytes_per_token"]
    assert result["reported_bytes_per_token"] == pytest.approx(result["bytes_per_token"], rel=1e-6)


CPU_SECTIONS = ("versions", "grouped_gemm", "attention", "numerics", "moe_layer", "all_to_all", "model_bench")


def test_gpu_check_runs_its_cpu_sections_on_cpu(tmp_path, transformers_ds):
    """`bench.py gpu --device cpu --quick`: one JSON with all nine sections in order, each with a status, its time
    and (unless skipped) its figures; the CPU-runnable ones ok with their errors under the stated tolerances, and
    the GPU-only one (DeepSpeed bf16) skipped with a reason. Section 8 (two launch/pretrain.py runs, a minute on 2
    cores) is left out here: tests/trainer/test_pretrain_e2e.py checks the same bitwise resume on CPU."""
    out = tmp_path / "gpu_check.json"
    proc = subprocess.run([sys.executable, str(ROOT / "launch" / "bench.py"), "gpu", "--device", "cpu", "--quick",
                           "--skip", "8", "--out", str(out)], capture_output=True, text=True, timeout=600,
                          cwd=tmp_path, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads(out.read_text())
    sections = {s["name"]: s for s in report["sections"]}
    assert [s["section"] for s in report["sections"]] == list(range(1, 10))
    for s in report["sections"]:
        assert s["status"] in ("ok", "failed", "skipped") and s["elapsed_s"] >= 0
        assert s["status"] == "ok" or s["reason"], s
        assert f"[{s['section']} {s['name']}] {s['status']}" in proc.stdout  # elapsed printed per section
    for name in CPU_SECTIONS:
        assert sections[name]["status"] == "ok", (name, sections[name].get("reason"), sections[name].get("traceback"))
    assert sections["resume"]["reason"] == "--skip"
    assert sections["deepspeed"]["status"] == "skipped" and "GPU" in sections["deepspeed"]["reason"]

    versions = sections["versions"]["figures"]
    assert versions["torch"] and versions["pretrain_missing"] == [] and versions["device_type"] == "cpu"
    grouped = sections["grouped_gemm"]["figures"]
    assert grouped["experts_without_tokens"] and grouped["fp32_grouped"]["kernel"] == "grouped_mm"
    for label, tol in (("fp32_grouped", 1e-5), ("bf16_grouped", 2e-2), ("bf16_loop", 2e-2)):
        assert max(grouped[label]["rel_err_vs_fp32_loop"].values()) < tol, label
        assert grouped[label]["empty_experts_grad_zero"] and grouped[label]["finite"]
    attention = sections["attention"]["figures"]
    for layout in ("causal", "packed"):
        assert max(attention[f"{layout}_model_attention"]["rel_err_vs_fp32_math"].values()) < 2e-2
        assert max(attention[f"{layout}_math"]["rel_err_vs_fp32_math"].values()) < 2e-2
    assert "causal cudnn" in attention["unavailable"]  # no cuDNN on a CPU: reported, not fatal
    numerics = sections["numerics"]["figures"]
    assert numerics["cross_entropy"]["loss_rel_diff"] < 1e-5 and numerics["cross_entropy"]["grad_rel_err"] < 2e-2
    assert max(numerics["combine"]["float32"]["rel_err_vs_index_add"].values()) < 1e-5
    for term, value in numerics["balance"]["paper_float64"].items():
        assert numerics["balance"]["device"][term] == pytest.approx(value, rel=1e-5)
    moe = sections["moe_layer"]["figures"]
    assert len(moe["top_kernels"]) == 10 and moe["top_kernels"][0]["self_ms"] > 0
    a2a = sections["all_to_all"]["figures"]
    assert a2a["backend"] == "gloo" and max(a2a["fp32"]["rel_err_vs_local"].values()) < 1e-5
    runs = sections["model_bench"]["figures"]["runs"]
    first = runs["compile=off activation_checkpointing=false"]
    assert first["status"] == "ok" and set(first["transformers"]) == {"grouped_mm", "eager"}
    assert first["parity"]["grouped_mm"]["grad_global_rel_diff"] < GRAD_GLOBAL_TOL
    checkpointed = runs["compile=off activation_checkpointing=true"]
    assert checkpointed["status"] == "ok" and checkpointed["trainer"]["activation_checkpointing"] is True
    assert runs["compile=on activation_checkpointing=false"]["status"] == "skipped"


def test_checkpoint_bench_measures_both_saves_of_the_same_state(tmp_path):
    """`bench.py checkpoint` on a small model: the synchronous and the background save of the same step write the
    same tensor bytes (the host copy is the step's state), and every figure the closing notes quote is there."""
    result = _bench(tmp_path, "checkpoint", "--hidden", "64", "--experts", "8", "--expert-width", "32",
                    "--layers", "2", "--saves", "2", "--steps-between", "2", "--state-gb", "0",
                    env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert result["same_tensor_bytes"] is True
    assert 0 < result["async_stall_s"] and 0 < result["sync_stall_s"] and result["ratio"] > 0
    assert result["checkpoint_gb"] > 0 and result["verify_s"] > 0 and result["load_s"] > 0
    assert result["host_copy_gib"] * 2**30 >= 0.9 * result["state_gb"] * 1e9
    assert 0.5 < result["resumed_over_fresh"] < 2


def test_cp_bench_counts_the_latent_exchange_and_the_ratios(tmp_path):
    """`bench.py cp`: on 2 gloo processes the bytes handed to all_gather are exactly the latent's, r + dr numbers a
    token and layer to the other rank, the backward returns as many, and the full-heads figure is H (dqk + dv) for
    the same tokens: 320 / 48 for tiny; V2's computed ratio clears the issue's 30x."""
    result = _bench(tmp_path, "cp", "--cp", "2", "--seq", "256", env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert result["forward_bytes"] == result["latent_bytes_expected"] > 0
    assert result["backward_bytes"] == result["forward_bytes"]
    assert result["ratio_measured"] == pytest.approx(320 / 48)
    assert result["ratios"]["v2"] == pytest.approx(40960 / 576) and result["ratios"]["v2"] >= 30
    assert result["ratios"]["v2_lite"] == pytest.approx(5120 / 576)
