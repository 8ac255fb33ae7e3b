"""The dry-run plan: per-slot parameters from the config, pipeline stage cuts, per-rank memory by hand, and
`trainer.dry_run=true` through the CLI (exit 0 with the layout, exit 2 for a refused combination)."""

from __future__ import annotations

import itertools
import re
import subprocess
import sys
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir

from trainer.cli import CONF_DIR, dry_run, to_train_config
from trainer.config import TrainConfig, register_configs
from trainer.distributed import DistEnv
from trainer.plan import (
    SlotParams,
    plan,
    slot_kinds,
    slot_param_counts,
    slot_params,
    stage_boundaries,
)
from trainer.presets import model_preset

register_configs()
ROOT = Path(__file__).resolve().parents[2]
PAPER = ["model=v2", "parallel.pp=16", "parallel.ep=8", "parallel.zero_stage=1", "parallel.world_size=128"]
PAPER_BATCH = ["data.seq_len=4096", "trainer.micro_batch_size=1", "trainer.global_batch_size=9216"]


def compose_config(*overrides: str) -> TrainConfig:
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base=None):
        return to_train_config(compose("config", overrides=["checkpoint.dir=/tmp/unused", *overrides]))


@pytest.mark.parametrize("name,total", [("v2", 235_741_434_880), ("v2_lite", 15_706_484_224)])
def test_slots_sum_to_the_model_and_ep_shrinks_only_the_routed_experts(name, total):
    c = model_preset(name)
    full, sharded = slot_param_counts(c, 1), slot_param_counts(c, 8)
    assert sum(full) == total and len(full) == c.num_hidden_layers + 2
    routed = c.n_routed_experts * 3 * c.hidden_size * c.moe_intermediate_size
    for kind, f, s in zip(slot_kinds(c), full, sharded):
        assert f - s == (routed * 7 // 8 if kind == "moe_layer" else 0), kind


def test_paper_layout_stage_figures_by_hand():
    """V2 (docs/model.md §1 numbers written out) on 128 ranks: pp 16, ep 8, dp 8, edp 1, ZeRO-1, bf16."""
    d, vocab, heads, q_lora, kv_lora, nope, rope, v = 5120, 102400, 128, 1536, 512, 128, 64, 128
    attention = (d * q_lora + q_lora * heads * (nope + rope) + d * (kv_lora + rope)
                 + kv_lora * heads * (nope + v) + heads * v * d)           # 149,225,472
    norms = q_lora + kv_lora + 2 * d                                         # latent norms + 2 block RMSNorms
    dense_layer = attention + norms + 3 * d * 12288                          # 337,981,440
    moe_replicated = attention + norms + 160 * d + 3 * d * (2 * 1536)        # router + 2 shared: 197,242,880
    moe_experts = 160 // 8 * 3 * d * 1536                                    # 20 experts per rank: 471,859,200
    embedding = vocab * d                                                    # 524,288,000
    assert (attention, moe_replicated, moe_experts) == (149_225_472, 197_242_880, 471_859_200)

    p = plan(compose_config(*PAPER, *PAPER_BATCH), 128)
    assert (p.pp, p.dp, p.ep, p.edp, p.zero_stage, p.experts_per_rank) == (16, 8, 8, 1, 1, 20)
    s0, s1 = p.stages[0], p.stages[1]
    assert s0.kinds == ["embedding", "dense_layer", "moe_layer", "moe_layer"] and s1.kinds == ["moe_layer"] * 4

    # A stage of 4 MoE layers: ZeRO-1 divides the fp32 master + Adam m, v (12 B) of replicated parameters over
    # dp = 8 and of expert parameters over edp = 1; bf16 weights and gradients (2 B each) stay whole.
    assert s1.params.total == 4 * (moe_replicated + moe_experts) == 2_676_408_320
    assert s1.optimizer_bytes == 12 * (4 * moe_replicated // 8 + 4 * moe_experts) == 23_832_698_880
    assert s1.weight_bytes == s1.grad_bytes == 2 * 2_676_408_320
    # Stage 0: embedding + the dense layer 0 + MoE layers 1-2.
    replicated0 = embedding + dense_layer + 2 * moe_replicated
    assert s0.params.total == replicated0 + 2 * moe_experts == 2_200_473_600
    assert s0.optimizer_bytes == 12 * (replicated0 // 8 + 2 * moe_experts) == 13_209_753_600
    # 1F1B: stage 0 holds pp micro-batches in flight, the last stage one.
    assert (s0.in_flight, p.stages[-1].in_flight) == (16, 1)
    assert s0.activation_bytes == 16 * 3 * 4096 * d * 34


def test_zero_stages_and_frozen_parameters_divide_the_right_terms():
    c = compose_config("model=tiny", "parallel.ep=2", "trainer.global_batch_size=32")
    held = slot_params(c.model, 2)
    builtin = plan(c, 4).stages[0]  # built-in engine: fp32 everything, nothing divided
    n = sum(s.total for s in held)
    assert (builtin.weight_bytes, builtin.grad_bytes, builtin.optimizer_bytes) == (4 * n, 4 * n, 8 * n)
    dense, expert = sum(s.dense for s in held), sum(s.expert for s in held)
    c.parallel.zero_stage = 2  # dp 4 = ep 2 x edp 2
    z2 = plan(c, 4).stages[0]
    sharded = -(-dense // 4) + -(-expert // 2)
    assert (z2.weight_bytes, z2.grad_bytes, z2.optimizer_bytes) == (2 * n, 2 * sharded, 12 * sharded)
    frozen_experts = [SlotParams(s.dense) for s in held]
    z2f = plan(c, 4, trainable=frozen_experts).stages[0]
    assert (z2f.weight_bytes, z2f.optimizer_bytes) == (2 * n, 12 * -(-dense // 4))


@pytest.mark.parametrize("name,pp,method", [("v2", 16, "parameters"), ("v2", 16, "uniform"), ("v2", 7, "type:moe"),
                                            ("tiny", 6, "parameters"), ("tiny", 3, "type:dense|head"),
                                            ("v2_lite", 1, "parameters")])
def test_stage_boundaries_cover_every_slot_without_empty_stages(name, pp, method):
    c = model_preset(name)
    parts = stage_boundaries(c, pp, 8 if name == "v2" else 1, method)
    assert len(parts) == pp + 1 and parts[0] == 0 and parts[-1] == c.num_hidden_layers + 2
    assert all(a < b for a, b in itertools.pairwise(parts))


def test_stage_boundaries_refuse_what_cannot_be_cut():
    c = model_preset("tiny")  # 4 layers: 6 slots
    with pytest.raises(ValueError, match=r"parallel\.pp=7: each stage needs at least one of the 6 pipeline slots"):
        stage_boundaries(c, 7)
    with pytest.raises(ValueError, match=r"parallel\.pp_partition='type:attention': matches no slot type"):
        stage_boundaries(c, 2, method="type:attention")
    with pytest.raises(ValueError, match=r"parallel\.pp_partition='profile': allowed"):
        stage_boundaries(c, 2, method="profile")


def test_only_rank_zero_prints_the_plan(capsys):
    cfg = compose_config("trainer.dry_run=true", "parallel.world_size=2")
    dry_run(cfg, DistEnv(rank=1, world_size=2))
    assert capsys.readouterr().out == ""
    dry_run(cfg, DistEnv(rank=0, world_size=2))
    assert "dry run: 2 processes = pp 1 x dp 2" in capsys.readouterr().out


def _cli(tmp_path: Path, *overrides: str) -> subprocess.CompletedProcess:
    cmd = [sys.executable, str(ROOT / "launch" / "pretrain.py"), *overrides, "trainer.dry_run=true",
           f"hydra.run.dir={tmp_path / 'run'}"]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=120, cwd=tmp_path, check=False)


def test_the_dry_run_of_a_pretrained_directory_that_is_not_there_names_it(tmp_path):
    """No plan for another model than the one named: a missing directory, or one without config.json, stops the
    dry run with one line naming the path (exit 2), as it stops training."""
    (tmp_path / "empty").mkdir()
    for path, why in ((tmp_path / "missing", "no such directory"), (tmp_path / "empty", "no config.json there")):
        proc = _cli(tmp_path, f"model.pretrained={path}", "data=sft", "data.paths=[/data/*.jsonl]")
        assert proc.returncode == 2 and proc.stderr.startswith(f"config error: model.pretrained={path}: {why}"), \
            proc.stderr
        assert len(proc.stderr.strip().splitlines()) == 1 and "model=v2_lite" in proc.stderr
        assert "memory per rank" not in proc.stdout


def test_dry_run_prints_the_paper_layout_and_exits(tmp_path):
    proc = _cli(tmp_path, *PAPER, *PAPER_BATCH)
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = proc.stdout
    assert "dry run: 128 processes = pp 16 x dp 8; dp 8 = ep 8 x edp 1; DeepSpeed ZeRO-1, bf16" in out
    assert "160 routed experts per MoE layer, 20 per rank" in out
    assert "expert-parallel      16 x 8     [0-7]; [8-15]; ..." in out
    assert "    1  8-15      L3-6" in out and "   15  120-127   L57-59 + head" in out
    assert "peak: stage 1" in out
    # every schedule's bubble and activations at this pp and batch (tests/trainer/test_schedules.py checks them)
    assert "pipeline schedules at pp 16, 1152 micro-batches per step" in out and "\n* deepspeed, 1f1b " in out
    assert all(f"\n  {name} " in out for name in ("interleaved_1f1b", "zbv", "interleaved_zb", "dualpipev"))
    assert not (tmp_path / "run" / "checkpoints").exists()


def test_dry_run_refuses_a_combination_deepspeed_cannot_run(tmp_path):
    proc = _cli(tmp_path, "parallel.pp=2", "parallel.zero_stage=2", "parallel.world_size=4")
    assert proc.returncode == 2 and "dry run" not in proc.stdout
    assert "config error: parallel.zero_stage=2 with parallel.pp=2: DeepSpeed's pipeline engine only supports" \
        in proc.stderr


def test_esft_plan_counts_optimizer_state_for_the_assumed_experts_only():
    """V2-Lite ESFT on one GPU (DeepSpeed ZeRO-0, bf16): with 15% of each MoE layer's 64 experts assumed selected
    (10), gradients and optimizer states cover 26 layers x 10 experts x 3 x 2048 x 1408 parameters, nothing else."""
    from trainer.plan import plan, trainable_slot_params
    cfg = compose_config("experiment=esft_v2_lite", "data.paths=[/data/*.jsonl]")
    cfg.validate(1)
    trained = 26 * 10 * 3 * 2048 * 1408
    partial = trainable_slot_params(cfg, ep=1)
    assert sum(s.total for s in partial) == trained and sum(s.dense for s in partial) == 0
    stage = plan(cfg, 1, partial).stages[0]
    assert (stage.grad_bytes, stage.optimizer_bytes) == (2 * trained, 12 * trained)
    assert stage.weight_bytes == 2 * 15_706_484_224
    assert stage.total_bytes < 80 * 1024**3 < plan(cfg, 1).stages[0].total_bytes  # fits 80 GB; full FT does not


def test_our_stage_cuts_are_deepspeeds():
    """`balanced_cut` / `uniform_cut` give the cuts of DeepSpeed's own `parameters` / `uniform` partitioning, so
    stages stay where runs (and their checkpoints) of the DeepSpeed-cut pipeline put them; random weights
    including zeros and ties."""
    utils = pytest.importorskip("deepspeed.runtime.utils")
    import random

    from trainer.layout import balanced_cut, uniform_cut
    rng = random.Random(0)
    for _ in range(500):
        n, parts = rng.randint(1, 30), rng.randint(1, 12)
        weights = [rng.choice([0, 1, rng.randint(0, 10**9)]) for _ in range(n)]
        assert balanced_cut(weights, parts) == [int(x) for x in utils.partition_balanced(weights, parts)], weights
        assert uniform_cut(n, parts) == [int(x) for x in utils.partition_uniform(n, parts)], (n, parts)


def test_lora_plan_holds_the_base_once_in_bf16_and_trains_only_the_adapters():
    """V2-Lite LoRA on one GPU (rank 16, every default target): adapters counted by hand from the released shapes
    (r x (in + out) per matrix; 64 experts x r x (D + 2I) + (I + D) per MoE layer), the frozen base at 2 bytes, the
    adapters at 4 + 4 + 8; it fits an 80 GB GPU and the report says so, full fine-tuning does not."""
    from trainer.plan import format_plan, plan, trainable_slot_params
    cfg = compose_config("experiment=lora_v2_lite", "data.paths=[/data/*.jsonl]")
    cfg.validate(1)
    r, d = 16, 2048
    attention = r * ((d + 16 * 192) + (d + 576) + (512 + 16 * 256) + (16 * 128 + d))
    dense = 3 * r * (d + 10944)
    shared = 3 * r * (d + 2816)
    experts = 64 * r * ((d + 2 * 1408) + (1408 + d))
    adapters = 27 * attention + dense + 26 * (shared + experts)
    partial = trainable_slot_params(cfg, ep=1)
    assert sum(s.total for s in partial) == adapters == 235_311_104
    stage = plan(cfg, 1, partial).stages[0]
    assert stage.weight_bytes == 2 * 15_706_484_224 + 4 * adapters and stage.adapter_bytes == 4 * adapters
    assert (stage.grad_bytes, stage.optimizer_bytes) == (4 * adapters, 8 * adapters)
    assert stage.total_bytes < 79 * 1024**3 < plan(cfg, 1).stages[0].total_bytes
    report = format_plan(plan(cfg, 1, partial))
    assert "LoRA: weights = frozen base 29.26 GiB (bf16) + adapters 0.88 GiB (235,311,104 parameters" in report
    assert "per rank fits an 80 GB GPU" in report
    assert "does NOT fit an 80 GB GPU" in format_plan(plan(cfg, 1))


def test_a_plan_that_does_not_fit_names_the_smallest_layout_that_does(tmp_path):
    """V2-Lite full training on one process plans 238 GiB: the dry run says it does not fit an 80 GB GPU and names
    the fewest GPUs that do, with the settings; the plan of that layout fits. The header says what precision the plan
    is for on a CPU."""
    proc = _cli(tmp_path, "model=v2_lite")
    assert proc.returncode == 0, proc.stderr[-2000:]
    out = proc.stdout
    assert "bf16 on GPUs (trainer.precision=auto: a CPU run trains in fp32)" in out.splitlines()[0]
    assert "does NOT fit an 80 GB GPU (79 GiB usable)" in out
    line = out.strip().splitlines()[-1]
    match = re.match(r"smallest layout that fits: (\d+) GPUs, ([\d.]+) GiB per GPU, with (.*) \(plan it: "
                     r"trainer.dry_run=true (.*)\)$", line)
    assert match, line
    suggested = _cli(tmp_path, "model=v2_lite", *match.group(4).split())
    assert suggested.returncode == 0 and "per rank fits an 80 GB GPU" in suggested.stdout, suggested.stdout[-2000:]
    peak = float(re.search(r"peak: stage 0, ([\d.]+) GiB", suggested.stdout).group(1))
    assert abs(peak - float(match.group(2))) < 0.06
    # and the smaller counts do not fit
    smaller = int(match.group(1)) // 2
    assert "fits an 80 GB GPU" not in _cli(tmp_path, "model=v2_lite", f"parallel.world_size={smaller}",
                                          "parallel.zero_stage=3", "trainer.micro_batch_size=8").stdout


def test_the_plan_says_how_checkpoints_are_saved_and_what_a_background_save_holds_in_host_memory():
    """checkpoint.async_save resolved as the trainer does: on from 1 GiB of checkpointed state per rank (weights
    and AdamW's two moments, 12 bytes a parameter in fp32), off for a smaller one, off under DeepSpeed."""
    from trainer.plan import format_plan
    lite = compose_config("model=v2_lite", "parallel.world_size=8", "trainer.micro_batch_size=2")
    p = plan(lite, 8)
    assert p.stages[0].checkpoint_bytes == 12 * p.stages[0].params.total
    line = format_plan(p).splitlines()[-1]
    gib = p.stages[0].checkpoint_bytes / 2**30
    assert line.startswith(f"checkpoint: {gib:.2f} GiB per rank, saved in the background") and \
        f"host memory of {gib:.2f} GiB per rank" in line, line
    assert "synchronously (checkpoint.async_save=null saves in the background from 1 GiB" in format_plan(
        plan(compose_config(), 1))
    lite.parallel.zero_stage = 1
    assert "synchronously (DeepSpeed writes its own" in format_plan(plan(lite, 8))
    lite.parallel.zero_stage, lite.checkpoint.async_save = None, False
    assert "synchronously (checkpoint.async_save=false)" in format_plan(plan(lite, 8))


def test_context_parallelism_in_the_plan_fits_v2_at_128k_where_whole_sequences_do_not():
    """long_context_v2 at 131,072 tokens on 128 GPUs (ZeRO-3): with parallel.cp=8 a rank holds 16,384 tokens of a
    sequence and the plan fits an 80 GB GPU; whole sequences (cp=1, a batch it can split) do not. The exchange per
    layer is the latent's, 576 numbers a token against 40,960 for full heads (71.1x)."""
    from trainer.plan import format_plan
    common = ["experiment=long_context_v2", "data.paths=[/d/*.jsonl]", "parallel.world_size=128",
              "data.seq_len=131072"]
    split = compose_config(*common, "parallel.cp=8")
    text = format_plan(plan(split, 128))
    p = plan(split, 128)
    assert p.peak.total_bytes / 2**30 < 79 and "fit: " in text and "does NOT fit" not in text
    assert "16,384 tokens per rank and micro-batch" in text and "576 numbers a token" in text and "71.1x more" in text
    sent = 16384 * 576 * 2 * 7 / 2**20  # bf16, to 7 other ranks
    assert f"{sent:,.1f} MiB sent per rank" in text
    whole = plan(compose_config(*common, "parallel.cp=1", "trainer.global_batch_size=640"), 128)
    assert whole.peak.total_bytes / 2**30 > 79
    assert whole.peak.activation_bytes > 7 * p.peak.activation_bytes
