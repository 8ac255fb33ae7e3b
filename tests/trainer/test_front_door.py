"""The front door as a newcomer meets it: one message per failure under torchrun, resumes that say what they change,
honest summaries, pictures of a run, quiet logs, and the README's figures held to a shortened main job."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tests.trainer.test_pretrain_e2e import PRETRAIN, ROOT, _ok, metrics, run_pretrain, straight  # noqa: F401

ENV = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "WANDB_MODE": "disabled"}


def _torchrun(tmp_path: Path, cache: Path, *overrides: str, timeout: int = 120) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", PRETRAIN,
           f"hydra.run.dir={tmp_path / 'run'}", f"data.cache_dir={cache}", "logging.wandb=disabled", *overrides]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=ENV, cwd=tmp_path)


@pytest.mark.parametrize("override, message", [
    ("trainer.max_step=5", "config error: trainer.max_step: unknown key (did you mean trainer.max_steps?)"),
    ("trainer.global_batch_size=6", "config error: trainer.global_batch_size=6: must be a multiple"),
])
def test_a_config_error_under_torchrun_is_printed_once_and_ends_the_output(tmp_path, cache_dir, override, message):
    """Two workers find the same mistake (before Hydra composes, and in validation): the line is printed once, and
    torchrun's closing report, the end of the output, names it as the root cause with our exit code 2."""
    proc = _torchrun(tmp_path, cache_dir, "experiment=smoke", override)
    output = proc.stdout + proc.stderr
    assert proc.returncode == 1, output[-3000:]  # torchrun's own code for a failed worker
    assert sum(line.startswith(message) for line in output.splitlines()) == 1, output[-3000:]
    tail = [line.strip() for line in proc.stderr.strip().splitlines()[-6:]]
    assert any(line.startswith("traceback : " + message) for line in tail), tail
    assert "exitcode  : 2" in proc.stderr
    assert "(rank 1)" not in output  # rank 1 waited, and torchrun stopped it


def test_resume_says_what_changed_and_can_keep_the_schedule(tmp_path, cache_dir, straight):  # noqa: F811
    """Relaunched from step 3 with trainer.max_steps=9: the line names the change and the next step's LR, which the
    log then shows; `optim.schedule_resume=keep` keeps the 6-step schedule; the summary counts this launch's steps;
    a setting the checkpoint cannot take is refused naming the key."""
    from trainer.config import to_train_config
    from trainer.optim import lr_at
    run, _ = straight
    state = json.loads((run / "checkpoints" / "step_00000003" / "train_state.json").read_text())
    optim = to_train_config(state["config"]).optim
    outs = {}
    for mode in ("stretch", "keep"):
        resumed = tmp_path / mode
        shutil.copytree(run, resumed, ignore=shutil.ignore_patterns("step_00000006", "hf"))
        out = _ok(run_pretrain(resumed, cache_dir, "trainer.max_steps=9", f"optim.schedule_resume={mode}",
                               "optim.weight_decay=0.05")).stdout
        outs[mode] = out
        horizon = 9 if mode == "stretch" else 6
        lr4 = lr_at(3, optim, horizon)
        assert metrics(resumed)[4]["lr"] == pytest.approx(lr4, rel=1e-9)
        line = next(line for line in out.splitlines() if line.startswith("resume: trainer.max_steps 6 -> 9"))
        assert f"lr at step 4 becomes {lr4:.2e}" in line, line
        assert f"the checkpoint's schedule gives {lr_at(3, optim, 6):.2e}" in line, line
        assert "resume: optim.weight_decay 0.1 -> 0.05: applies from step 4" in out
        assert "done: 6 steps this launch (4-9; the run is at step 9)" in out
    assert "re-stretched over 9 steps (was 6)" in outs["stretch"] and "optim.schedule_resume=keep" in outs["stretch"]
    assert "the schedule keeps its 6 steps (optim.schedule_resume=keep; steps past 6 stay" in outs["keep"]
    refused = run_pretrain(tmp_path / "stretch", cache_dir, "trainer.max_steps=12", "lora.enabled=true")
    assert refused.returncode == 2 and "config error: lora.enabled=True: the checkpoint's run trained with False" \
        in refused.stderr, refused.stderr[-2000:]


def test_plot_draws_every_chart_of_a_run_also_in_progress(tmp_path, straight):  # noqa: F811
    """launch/plot.py on the smoke run: loss, lr, gradient norm, tokens/s, balance and one expert-load heatmap per
    MoE layer; a half-written last line (a run in progress) is skipped; the run directory holds no empty log."""
    pytest.importorskip("matplotlib")
    run, out = straight
    assert f"plots        python launch/plot.py {run}" in out
    assert not list(run.glob("*.log")), list(run.glob("*.log"))
    live = tmp_path / "live"
    live.mkdir()
    shutil.copy(run / "metrics.jsonl", live / "metrics.jsonl")
    with open(live / "metrics.jsonl", "a") as f:
        f.write('{"step": 7, "loss": 3.')  # being written
    proc = subprocess.run([sys.executable, str(ROOT / "launch" / "plot.py"), str(live)], capture_output=True,
                          text=True, timeout=120, env=ENV)
    assert proc.returncode == 0, proc.stderr[-2000:]
    names = sorted(p.name for p in (live / "plots").glob("*.png"))
    assert names == ["balance.png", "expert_load_layer_1.png", "expert_load_layer_2.png", "grad_norm.png",
                     "loss.png", "lr.png", "tokens_per_s.png"], names
    from PIL import Image
    for name in names:
        with Image.open(live / "plots" / name) as image:
            assert image.size[0] >= 500 and image.size[1] >= 400, (name, image.size)
    record = json.loads((run / "metrics.jsonl").read_text().splitlines()[-1])
    assert sorted(record["expert_load"]) == ["1", "2"] and abs(sum(record["expert_load"]["1"]) - 1) < 1e-3


def test_a_validation_only_line_has_no_placeholders():
    """A validation-only line shows only what was measured."""
    from trainer.metrics import format_line
    line = format_line(7, 10, {"loss": 3.5, "val_loss": 3.9, "val_ppl": 49.4})
    assert line == "step 7/10 | loss 3.5000 | val 3.9000 ppl 49.4"
    assert "-" not in line.replace("step 7/10", "")


def test_wandb_run_id_is_kept_by_a_relaunch(tmp_path):
    from trainer.metrics import wandb_run_id
    first = wandb_run_id(tmp_path, resumed=False)
    assert wandb_run_id(tmp_path, resumed=True) == first
    assert wandb_run_id(tmp_path, resumed=False) != first


def test_first_use_of_the_built_in_bpe_says_what_it_does(tmp_path, capsys):
    from data.tokenizer import cached_bpe
    texts = ["def f(x):\n    return x + 1\n" * 20] * 10
    cached_bpe(lambda: texts, "fp", 300, tmp_path)
    out = capsys.readouterr().out.splitlines()
    assert len(out) == 1 and out[0].startswith("tokenizer: training the built-in 300-id BPE"), out
    assert re.search(r" \.\.\. done in \d+\.\d s$", out[0]), out
    cached_bpe(lambda: texts, "fp", 300, tmp_path)
    assert capsys.readouterr().out == ""  # cached: silent


def _readme_figures() -> tuple[str, float, float]:
    """The shortened main job the README states, and its loss and held-out loss."""
    text = (ROOT / "README.md").read_text()
    match = re.search(r"`torchrun --standalone --nproc_per_node=2 launch/pretrain.py ([^`]+)`\s+ends with loss "
                      r"([\d.]+) and held-out loss ([\d.]+)", text)
    assert match, "README.md no longer states the shortened main job's figures"
    return match.group(1), float(match.group(2)), float(match.group(3))


def test_the_readmes_main_job_figures_hold(tmp_path, cache_dir):
    """The README's check of its main-job figures: the first 60 steps of the main job (its schedule, 2 processes)
    end within 3% of the loss and held-out loss it states."""
    overrides, loss, val = _readme_figures()
    proc = _torchrun(tmp_path, cache_dir, *overrides.split(), timeout=400)
    assert proc.returncode == 0, proc.stderr[-3000:]
    last = metrics(tmp_path / "run")[max(metrics(tmp_path / "run"))]
    assert last["loss"] == pytest.approx(loss, rel=0.03) and last["val_loss"] == pytest.approx(val, rel=0.03), \
        (last["loss"], last["val_loss"], "README.md states", loss, val)


def test_a_launch_with_nothing_to_do_starts_no_wandb_run(tmp_path):
    from trainer.config import LoggingConfig, WandbMode
    from trainer.metrics import MetricsLogger
    logger = MetricsLogger(tmp_path, LoggingConfig(wandb=WandbMode.offline), max_steps=5, start_step=5, enabled=True,
                           config_dict={}, progress=False)
    assert logger.wandb is None and not (tmp_path / "wandb").exists()
    logger.close()


def test_wandb_heatmaps_have_axes_when_matplotlib_is_there():
    pytest.importorskip("matplotlib")
    import numpy as np

    from trainer.metrics import heatmap_image, labelled_heatmap
    rows = [(step, np.full(16, 1 / 16)) for step in range(10, 60, 10)]
    image = labelled_heatmap(rows, layer=1)
    bare = heatmap_image([load for _, load in rows])
    assert image.ndim == 3 and image.shape[2] == 3 and image.dtype == np.uint8
    assert image.shape != bare.shape  # a figure (axes, labels, colour bar), not the bare grid
    assert (image < 100).any()  # dark pixels: text and axes on the white figure


def test_a_relaunch_is_marked_in_metrics_jsonl(tmp_path, cache_dir, straight):  # noqa: F811
    """After a crash the redone steps are logged again: a `resumed_from` row says where the relaunch took up."""
    run, _ = straight
    resumed = tmp_path / "resumed"
    shutil.copytree(run, resumed, ignore=shutil.ignore_patterns("step_00000006", "hf"))
    _ok(run_pretrain(resumed, cache_dir))
    rows = [json.loads(line) for line in (resumed / "metrics.jsonl").read_text().splitlines()]
    marks = [i for i, r in enumerate(rows) if "resumed_from" in r]
    assert len(marks) == 1 and rows[marks[0]]["at_step"] == 3, rows
    assert rows[marks[0]]["resumed_from"].endswith("step_00000003")
    assert [r["step"] for r in rows[marks[0] + 1:]] == [4, 5, 6]  # the redone steps follow it
    assert [r["step"] for r in rows[:marks[0]]] == [1, 2, 3, 4, 5, 6]
