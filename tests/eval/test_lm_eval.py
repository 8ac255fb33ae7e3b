"""Benchmark evaluation through lm-evaluation-harness (docs/evaluation.md), offline over the local task YAMLs of
tests/eval/tasks: a multiple-choice task, a generation task and a rolling log-likelihood task.

Parity: on the HF export of a trained tiny model in fp32, our backend (`trainer/evaluation.py`) and lm-eval's own
`hf` backend (transformers) give the same metrics, per-request log-likelihoods within 1e-4, the same greedy flags and
identical generations; `launch/evaluate.py` gives the same from a training checkpoint at one process and from the
HF directory at ep=2, as a 2-stage pipeline of either engine and under ZeRO-3. Training with `eval.every` logs the
figures and survives a broken task."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.trainer.test_pretrain_e2e import _ok, metrics, run_pretrain

pytest.importorskip("lm_eval")

ROOT = Path(__file__).resolve().parents[2]
TASKS = ROOT / "tests" / "eval" / "tasks"
EVALUATE = str(ROOT / "launch" / "evaluate.py")
LOCAL = ["mc_local", "gen_local", "text_local"]
MAX_LENGTH = 48  # short enough that text_local's longer texts take several rolling windows
TOLERANCE = 1e-4


@pytest.fixture(scope="module")
def trained(tmp_path_factory, cache_dir) -> Path:
    """A tiny model (q compression, MoE with shared experts, YaRN off) trained for 40 steps on the built-in corpus:
    its run directory, with the checkpoint of step 40 and the HF export."""
    run = tmp_path_factory.mktemp("eval") / "run"
    _ok(run_pretrain(run, cache_dir, "model=tiny", "trainer.max_steps=40", "trainer.val_every=0",
                     "checkpoint.every=0", "optim.lr=3e-3"))
    return run


def _per_request(samples: list[dict], task: str) -> dict[tuple[int, int], object]:
    """(doc_id, request index) -> the response, in memory or as lm-eval's samples file writes it (strings):
    (log-likelihood, is_greedy) for mc_local, a log-likelihood for text_local, the text for gen_local."""
    out = {}
    for sample in samples:
        for i, resp in enumerate(sample["resps"]):
            value = resp[0]
            if task == "mc_local":
                value = (float(value[0]), str(value[1]) == "True")
            elif task == "text_local":
                value = float(value)
            out[sample["doc_id"], i] = value
    return out


def _compare(ours: dict, theirs: dict, task: str) -> float:
    """Asserts the same requests and answers (log-likelihoods within TOLERANCE); returns the largest difference."""
    from trainer.eval_bench import parity
    figures = parity(ours, theirs)
    assert figures["mismatched"] == [], (task, figures["mismatched"][:5])
    assert figures["loglikelihood_max_abs_diff"] <= TOLERANCE, (task, figures)
    return figures["loglikelihood_max_abs_diff"]


def _metrics(results: dict, task: str) -> dict[str, float]:
    return {k: v for k, v in results[task].items() if "," in k and "stderr" not in k}


@pytest.fixture(scope="module")
def reference(trained, tmp_path_factory):
    """lm-eval's `hf` backend (transformers) on the export, fp32: {task: (per-request responses, metrics)}."""
    pytest.importorskip("transformers")
    pytest.importorskip("accelerate")
    from lm_eval import simple_evaluate
    from lm_eval.tasks import TaskManager
    os.chdir(ROOT)  # the task YAMLs name their data files from the repository root
    manager = TaskManager(include_path=str(TASKS), include_defaults=False)
    out = {}
    for task in LOCAL:
        result = simple_evaluate(model="hf", model_args=f"pretrained={trained / 'hf'},dtype=float32,"
                                 f"max_length={MAX_LENGTH}", device="cpu", batch_size=4, tasks=[task],
                                 task_manager=manager, log_samples=True, bootstrap_iters=0)
        out[task] = (_per_request(result["samples"][task], task), _metrics(result["results"], task))
    return out


def test_our_backend_equals_lm_evals_hf_backend(trained, reference, cache_dir):
    """Same metrics, log-likelihoods within 1e-4, same greedy flags, identical generations, for a multiple-choice,
    a generation and a rolling log-likelihood task; batches of 3 (so batches mix lengths), 4 for the reference."""
    from trainer.eval_job import one_process_evaluator
    evaluator = one_process_evaluator(trained / "hf", {"tasks": LOCAL, "include_path": str(TASKS), "batch_size": 3,
                                                       "max_length": MAX_LENGTH, "bootstrap_iters": 0}, cache_dir)
    runs = {run.name: run for run in evaluator.run(log_samples=True)}
    for task in LOCAL:
        assert runs[task].error is None, runs[task].error
        ours = _per_request(runs[task].samples[task], task)
        theirs, their_metrics = reference[task]
        worst = _compare(ours, theirs, task)
        mine = _metrics(runs[task].results["results"], task)
        assert mine.keys() == their_metrics.keys()
        for name, value in mine.items():
            assert value == pytest.approx(their_metrics[name], rel=TOLERANCE), (task, name)
        print(f"{task}: {len(ours)} requests, largest log-likelihood difference {worst:.2e}, {mine}")
    generations = list(_per_request(runs["gen_local"].samples["gen_local"], "gen_local").values())
    assert len(set(generations)) > 1  # the model says different things to different prompts
    mc = reference["mc_local"][1]
    assert 0 < mc["acc,none"] < 1 or 0 < mc["acc_norm,none"] < 1  # not a trivially equal 0 or 1


def _evaluate(run_dir: Path, cache_dir: Path, *overrides: str, nproc: int = 1) -> subprocess.CompletedProcess:
    args = [f"hydra.run.dir={run_dir}", f"data.cache_dir={cache_dir}", f"eval.include_path={TASKS}",
            f"eval.max_length={MAX_LENGTH}", "eval.batch_size=3", "eval.log_samples=true", "eval.bootstrap_iters=0",
            "logging.wandb=disabled", *overrides]
    if nproc > 1:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}", EVALUATE,
               *args, "parallel.timeout_s=60"]
    else:
        cmd = [sys.executable, EVALUATE, *args]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "WANDB_MODE": "disabled"}
    return subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=env, cwd=ROOT)


def _samples(run_dir: Path, task: str) -> dict:
    files = sorted(run_dir.glob(f"samples_{task}_*.jsonl"))
    assert len(files) == 1, files
    return _per_request([json.loads(line) for line in files[0].read_text().splitlines()], task)


LAYOUTS = {"hf, ep=2": ["parallel.ep=2"],
           "hf, pp=2 zbv": ["parallel.pp=2", "parallel.pp_schedule=zbv"],  # V-shaped: a stage of the head alone
           "hf, DeepSpeed pp=2": ["parallel.pp=2", "parallel.pp_schedule=deepspeed"],
           "hf, ZeRO-3": ["parallel.zero_stage=3"]}


@pytest.mark.parametrize("layout", ["checkpoint, 1 process", *LAYOUTS])
def test_evaluate_matches_the_reference_from_a_checkpoint_and_at_every_layout(trained, reference, cache_dir,
                                                                              tmp_path, layout):
    """launch/evaluate.py: from the training checkpoint at one process, and from the HF directory over 2 processes
    with experts split (every rank in each forward), as a 2-stage pipeline of either engine (stages passing hidden
    states and keeping their own latent caches) and under ZeRO-3 (partitions gathered around each layer): the
    reference's responses and metrics, lm-eval's table on stdout and its results dict in eval_results.json."""
    tasks = f"eval.tasks=[{','.join(LOCAL)}]"
    if layout.startswith("checkpoint"):
        proc = _evaluate(tmp_path, cache_dir, tasks, f"checkpoint.resume={trained / 'checkpoints' / 'step_00000040'}")
    else:
        proc = _evaluate(tmp_path, cache_dir, tasks, f"model.pretrained={trained / 'hf'}", *LAYOUTS[layout], nproc=2)
    _ok(proc)
    assert "|mc_local" in proc.stdout and "|text_local" in proc.stdout, proc.stdout[-2000:]
    results = json.loads((tmp_path / "eval_results.json").read_text())
    assert results["failed"] == {}
    for task in LOCAL:
        theirs, their_metrics = reference[task]
        _compare(_samples(tmp_path, task), theirs, task)
        for name, value in _metrics(results["results"], task).items():
            assert value == pytest.approx(their_metrics[name], rel=TOLERANCE), (layout, task, name)


def test_training_logs_eval_figures_every_n_steps_and_survives_a_broken_task(tmp_path, cache_dir):
    """Two processes with experts split over both: the built-in task and a local one before the first step, at
    step 3 and at the end, into metrics.jsonl as eval/<task>/<metric> with their own time; a task whose metric
    raises is reported each time and training finishes."""
    run, tasks = tmp_path / "run", tmp_path / "tasks"
    tasks.mkdir()
    for file in TASKS.iterdir():  # training runs elsewhere: the data files named by absolute path
        if file.suffix in (".yaml", ".py"):
            (tasks / file.name).write_text(file.read_text().replace("tests/eval/tasks/", f"{TASKS}/"))
    proc = _ok(run_pretrain(run, cache_dir, "parallel.ep=2", "eval.every=3", "eval.at_start=true",
                            "eval.tasks=[stdlib_docstrings,stdlib_lines,mc_local,broken_local]",
                            f"eval.include_path={tasks}", nproc=2))
    logged = metrics(run)
    evaluated = {step: m for step, m in logged.items() if "eval_s" in m}
    assert sorted(evaluated) == [0, 3, 6]
    for step, m in evaluated.items():
        assert all(0 <= m[f"eval/{task}/acc"] <= 1 for task in ("stdlib_docstrings", "stdlib_lines", "mc_local"))
        assert m["eval_failed"] == ["broken_local"] and m["eval_s"] > 0
    assert "eval: task broken_local failed at step 3: RuntimeError: this task's metric is broken on purpose" \
        in proc.stdout
    assert "eval stdlib_docstrings acc" in proc.stdout
    assert all(m.get("tokens_per_s") for step, m in logged.items() if step > 0)


def test_evaluate_says_what_is_missing_in_one_line(trained, tmp_path, cache_dir):
    """No model named, a model directory that is not there, an unknown task, or lm-eval not installed: one
    `config error:` line and exit 2. A broken task: its `eval error:` line, the other tasks' results, exit 1."""
    proc = _evaluate(tmp_path / "a", cache_dir, "eval.tasks=[mc_local]")
    assert proc.returncode == 2 and proc.stderr.strip().startswith("config error: launch/evaluate.py evaluates a "
                                                                   "trained model: set model.pretrained="), proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1
    proc = _evaluate(tmp_path / "b", cache_dir, "eval.tasks=[no_such_task]", "model.pretrained=/nonexistent")
    assert proc.returncode == 2 and proc.stderr.strip() == ("config error: model.pretrained=/nonexistent: no such "
                                                            "directory"), proc.stderr
    proc = _evaluate(tmp_path / "d", cache_dir, "eval.tasks=[mc_local,no_such_task]",
                     f"model.pretrained={trained / 'hf'}")
    assert proc.returncode == 2 and proc.stderr.strip().startswith(
        f"config error: eval.tasks: no task named no_such_task in lm-eval or eval.include_path={TASKS}"), proc.stderr
    proc = _evaluate(tmp_path / "e", cache_dir, "eval.tasks=[mc_local,broken_local]",
                     f"model.pretrained={trained / 'hf'}")
    assert proc.returncode == 1 and proc.stderr.strip().endswith(
        "eval error: task broken_local failed: RuntimeError: this task's metric is broken on purpose"), proc.stderr
    results = json.loads((tmp_path / "e" / "eval_results.json").read_text())
    assert list(results["results"]) == ["mc_local"] and list(results["failed"]) == ["broken_local"]
    proc = subprocess.run([sys.executable, EVALUATE, "model.pretrained=/nonexistent", "eval.tasks=[mc_local]",
                           f"hydra.run.dir={tmp_path / 'c'}"], capture_output=True, text=True, timeout=120,
                          cwd=ROOT, env={**os.environ, "PYTHONPATH": _without_lm_eval(tmp_path)})
    assert proc.returncode == 2 and 'pip install -e ".[eval]"' in proc.stderr, proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1, proc.stderr


def _without_lm_eval(tmp_path: Path) -> str:
    """A PYTHONPATH under which `import lm_eval` fails as it does where the extra is not installed."""
    fake = tmp_path / "no_lm_eval" / "lm_eval"
    fake.mkdir(parents=True, exist_ok=True)
    (fake / "__init__.py").write_text("raise ImportError('not installed', name='lm_eval')\n")
    return f"{fake.parent}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"


def test_training_without_the_eval_extra_says_so_once_and_trains(tmp_path, cache_dir, monkeypatch):
    monkeypatch.setenv("PYTHONPATH", _without_lm_eval(tmp_path))
    proc = _ok(run_pretrain(tmp_path / "run", cache_dir, "eval.every=3", "eval.tasks=[stdlib_docstrings]"))
    assert proc.stdout.count('note: eval.every=3 is skipped: evaluation needs lm-evaluation-harness, which is not '
                             'installed (lm_eval is missing): pip install -e ".[eval]"') == 1, proc.stdout
    assert not any("eval_s" in m for m in metrics(tmp_path / "run").values())


def test_the_eval_benchmark_checks_parity_before_timing(trained, tmp_path, cache_dir, monkeypatch):
    """`launch/bench.py eval`: both backends answer every request alike (log-likelihoods within 1e-4, identical
    generations) before their times and the ratio are reported; a broken parity stops it before any timing."""
    from trainer import eval_bench
    monkeypatch.chdir(ROOT)
    out = tmp_path / "bench.json"
    args = ["--hf", str(trained / "hf"), "--tasks", "mc_local,gen_local", "--include-path", str(TASKS),
            "--batch-size", "4", "--cache-dir", str(cache_dir), "--json", str(out)]
    summary = eval_bench.main(args)
    assert summary["parity"]["mismatched"] == [] and summary["parity"]["requests"] == 24 * 4 + 12
    assert summary["parity"]["loglikelihood_max_abs_diff"] <= 1e-4
    assert summary["seconds"]["ours"] > 0 and summary["seconds"]["hf"] > 0
    assert json.loads(out.read_text())["ratio_hf_over_ours"] == pytest.approx(summary["ratio_hf_over_ours"])
    calls = iter(range(10))  # each side's first generation now reads differently
    monkeypatch.setattr(eval_bench, "responses", lambda samples, real=eval_bench.responses: {
        **real(samples), ("gen_local", 0, 0): f"answer {next(calls)}"})
    with pytest.raises(SystemExit, match="parity broken"):
        eval_bench.main(args)
