"""Benchmark evaluation through lm-evaluation-harness on the model as the trainer holds it (docs/evaluation.md): the
task runs (`Evaluator`), their metrics for the log, and the results files.

`LatentMoeLM` (trainer/lm_eval_model.py) is lm-eval's model interface (`loglikelihood`, `loglikelihood_rolling`,
`generate_until`) over a `ForwardRunner`: every rank of the job runs it. lm-eval itself runs whole on every rank and sees one process; inside
each request type the requests are length-sorted, dealt out over the data-parallel ranks, batched, and the results
gathered back in lm-eval's order, so every rank returns the same list and lm-eval's metrics are the same everywhere
(rank 0 reports them). Tokenization and the handling of contexts, windows and stop sequences follow lm-eval's `hf`
backend, so the two give the same requests to the same weights (tests/eval).
"""

from __future__ import annotations

import contextlib
import importlib
import io
import json
import logging
import math
from datetime import datetime
from dataclasses import dataclass, field
from pathlib import Path

import torch

from data.tasks import TASKS as BUILTIN_TASKS, builtin_task_dir
from data.tokenizer import TextTokenizer

from .config import ConfigError, EvalConfig
from .inference import ForwardRunner

INSTALL_HINT = 'pip install -e ".[eval]"'


def lm_eval_missing() -> str | None:
    """None when lm-eval imports, else one line saying how to install it."""
    try:
        importlib.import_module("lm_eval.api.model")
    except ImportError as e:
        return f"evaluation needs lm-evaluation-harness, which is not installed ({e.name} is missing): {INSTALL_HINT}"
    return None


def require_lm_eval() -> None:
    """Raise ConfigError (one `config error:` line, exit 2) when lm-eval is not installed."""
    missing = lm_eval_missing()
    if missing:
        raise ConfigError(missing)


@dataclass
class TaskRun:
    """One task's outcome: lm-eval's results dict (None when it failed), the error, and its per-sample records."""

    name: str
    results: dict | None = None
    error: str | None = None
    samples: dict = field(default_factory=dict)


class Evaluator:
    """lm-eval tasks on the live model (collective): built once per job, run any number of times."""

    def __init__(self, engine, tokenizer: TextTokenizer, cfg: EvalConfig, cache_dir: str | Path, seed: int):
        require_lm_eval()
        from lm_eval.tasks import TaskManager

        self.cfg, self.tasks = cfg, list(cfg.tasks)
        import datasets
        datasets.disable_progress_bars()  # the task files are tiny; their bars would bury the log
        logging.getLogger("lm_eval").setLevel(logging.ERROR)  # its notes on each task's defaults, every run
        include = [str(Path(p).expanduser()) for p in ([cfg.include_path] if cfg.include_path else [])]
        if any(task in BUILTIN_TASKS for task in self.tasks):
            include.append(str(builtin_task_dir(cache_dir)))
        # lm-eval's own task index takes seconds to build: only when a task is not among the local ones.
        self.manager = TaskManager(include_path=include or None, include_defaults=False)
        missing = [t for t in self.tasks if t not in self.manager.all_tasks]
        if missing:
            self.manager = TaskManager(include_path=include or None)
            unknown = [t for t in missing if t not in self.manager.all_tasks]
            if unknown:
                raise ConfigError(f"eval.tasks: no task named {', '.join(unknown)} in lm-eval"
                                  + (f" or eval.include_path={cfg.include_path}" if cfg.include_path else "")
                                  + f" (built in: {', '.join(BUILTIN_TASKS)})")
        self.seed = seed
        max_length = cfg.max_length or engine.cfg.model.max_position_embeddings
        from .lm_eval_model import LatentMoeLM
        self.lm = LatentMoeLM(ForwardRunner(engine), tokenizer, cfg.batch_size, max_length, cfg.max_gen_toks, seed)

    def run(self, log_samples: bool | None = None) -> list[TaskRun]:
        """Every task, one at a time: a task that fails (its data, its config, its metric) is reported and the
        others still run. On every rank; the results are rank 0's to report."""
        from lm_eval import simple_evaluate

        cfg, runs = self.cfg, []
        log_samples = cfg.log_samples if log_samples is None else log_samples
        limit = None if cfg.limit is None else (cfg.limit if cfg.limit < 1 else int(cfg.limit))
        for task in self.tasks:
            run = TaskRun(task)
            try:  # lm-eval's progress bars go to stderr: kept out of the job's output (our Progress shows it)
                with contextlib.redirect_stderr(io.StringIO()), kept_random_state():
                    out = simple_evaluate(model=self.lm, tasks=[task], num_fewshot=cfg.num_fewshot, limit=limit,
                                          task_manager=self.manager, log_samples=log_samples,
                                          bootstrap_iters=cfg.bootstrap_iters, random_seed=None, numpy_random_seed=None,
                                          torch_random_seed=None, fewshot_random_seed=self.seed)
                if out is not None:
                    run.samples = out.pop("samples", {}) or {}
                    run.results = out
            except Exception as e:  # noqa: BLE001 - a broken task must not end the job
                run.error = f"{type(e).__name__}: {e}".splitlines()[0][:300]
            runs.append(run)
        return runs


@contextlib.contextmanager
def kept_random_state():
    """The global random states (Python, NumPy, torch) as they were before: an evaluation in the middle of training
    leaves the run's random streams where they were (lm-eval's bootstrap draws from them)."""
    import random

    import numpy as np

    state = random.getstate(), np.random.get_state(), torch.random.get_rng_state()
    cuda = torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None
    try:
        yield
    finally:
        random.setstate(state[0])
        np.random.set_state(state[1])
        torch.random.set_rng_state(state[2])
        if cuda is not None:
            torch.cuda.set_rng_state_all(cuda)


def flat_metrics(runs: list[TaskRun]) -> dict[str, float]:
    """`eval/<task>/<metric>` for every number lm-eval reports (filters joined to the metric name as
    lm-eval writes them: `acc,none` -> `acc`, `exact_match,strict-match` -> `exact_match_strict-match`)."""
    metrics = {}
    for run in runs:
        if run.results is None:
            continue
        for task, values in run.results.get("results", {}).items():
            for key, value in values.items():
                if not isinstance(value, (int, float)) or isinstance(value, bool) or key in ("alias", "sample_len"):
                    continue
                if isinstance(value, float) and not math.isfinite(value):
                    continue
                name, _, filt = key.partition(",")
                metrics[f"eval/{task}/{name if filt in ('', 'none') else f'{name}_{filt}'}"] = float(value)
    return metrics


def merged_results(runs: list[TaskRun]) -> dict:
    """One lm-eval results dict for all tasks (each ran on its own): the per-task tables merged."""
    merged: dict = {}
    for run in runs:
        if run.results is None:
            continue
        for key, value in run.results.items():
            if isinstance(value, dict) and isinstance(merged.get(key), dict):
                merged[key].update(value)
            elif key not in merged:
                merged[key] = value
    merged["failed"] = {run.name: run.error for run in runs if run.error is not None}
    return merged


def report(runs: list[TaskRun], out_dir: Path, log_samples: bool) -> Path:
    """Rank 0: lm-eval's table on stdout, a line per failed task on stderr, `eval_results.json` (lm-eval's results
    dict, with `failed` added) and, with `log_samples`, lm-eval's `samples_<task>_<time>.jsonl` in `out_dir`."""
    import sys

    from lm_eval.utils import handle_non_serializable, make_table

    merged = merged_results(runs)
    if merged.get("results"):
        print(make_table(merged), flush=True)
    for run in runs:
        if run.error is not None:
            print(f"eval error: task {run.name} failed: {run.error}", file=sys.stderr, flush=True)
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / "eval_results.json"
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(merged, indent=2, default=handle_non_serializable, ensure_ascii=False))
    tmp.replace(path)
    if log_samples:
        from lm_eval.loggers import EvaluationTracker

        tracker = EvaluationTracker(output_path=str(path))  # a .json path: the samples go beside it
        # The file's time stamp, which lm-eval sets when it writes its own aggregated results (we write ours).
        tracker.date_id = datetime.now().isoformat().replace(":", "-")
        for run in runs:
            for task, samples in run.samples.items():
                tracker.save_results_samples(task_name=task, samples=samples)
    return path
