"""Benchmark evaluation through lm-evaluation-harness on the model as the trainer holds it (docs/evaluation.md).

`LatentMoeLM` is lm-eval's model interface (`loglikelihood`, `loglikelihood_rolling`, `generate_until`) over a
`ForwardRunner`: every rank of the job runs it. lm-eval itself runs whole on every rank and sees one process; inside
each request type the requests are length-sorted, dealt out over the data-parallel ranks, batched, and the results
gathered back in lm-eval's order, so every rank returns the same list and lm-eval's metrics are the same everywhere
(rank 0 reports them). Tokenization and the handling of contexts, windows and stop sequences follow lm-eval's `hf`
backend, so the two give the same requests to the same weights (tests/eval).
"""

from __future__ import annotations

import contextlib
import io
import json
import logging
import math
import time
from datetime import datetime
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.distributed as dist

from data.tasks import TASKS as BUILTIN_TASKS, builtin_task_dir
from data.tokenizer import TextTokenizer

from .config import ConfigError, EvalConfig
from .inference import ForwardRunner

INSTALL_HINT = 'pip install -e ".[eval]"'


def lm_eval_missing() -> str | None:
    """None when lm-eval imports, else one line saying how to install it."""
    try:
        import lm_eval.api.model  # noqa: F401
    except ImportError as e:
        return f"evaluation needs lm-evaluation-harness, which is not installed ({e.name} is missing): {INSTALL_HINT}"
    return None


def require_lm_eval() -> None:
    """Raise ConfigError (one `config error:` line, exit 2) when lm-eval is not installed."""
    missing = lm_eval_missing()
    if missing:
        raise ConfigError(missing)


def _lm_class():
    from lm_eval.api.model import TemplateLM

    class LatentMoeLM(TemplateLM):
        """lm-eval's model interface over this job's model (collective: every rank calls each method with the same
        requests)."""

        backend = "causal"

        def __init__(self, runner: ForwardRunner, tokenizer: TextTokenizer, batch_size: int, max_length: int,
                     max_gen_toks: int, seed: int = 1234):
            super().__init__()
            self.runner, self.text = runner, tokenizer
            self.batch_size, self._max_length, self.max_gen_toks = batch_size, max_length, max_gen_toks
            self.grid = runner.grid
            self.generator = torch.Generator(device=runner.device).manual_seed(seed)

        # ------------------------------------------------------------ tokens, as lm-eval's hf backend has them
        @property
        def eot_token_id(self) -> int:
            return self.text.eos_id

        @property
        def prefix_token_id(self) -> int:
            return self.text.bos_id if self.text.bos_id is not None else self.text.eos_id

        @property
        def max_length(self) -> int:
            return self._max_length

        @property
        def tokenizer_name(self) -> str:
            return self.text.source

        def tok_encode(self, string: str, add_special_tokens: bool | None = None, left_truncate_len: int | None = None,
                       **kwargs) -> list[int]:
            add = True if add_special_tokens is None else add_special_tokens
            if add_special_tokens is None and string.startswith(self.tok_decode([self.prefix_token_id], False)):
                add = False  # the text brings its own BOS
            ids = self.text.tokenizer.encode(string, add_special_tokens=add).ids
            return ids[-left_truncate_len:] if left_truncate_len else ids

        def tok_decode(self, tokens, skip_special_tokens: bool = True) -> str:
            tokens = [tokens] if isinstance(tokens, int) else list(tokens)
            return self.text.tokenizer.decode(tokens, skip_special_tokens=skip_special_tokens)

        # ------------------------------------------------------------ the three request types
        def _loglikelihood_tokens(self, requests, disable_tqdm: bool = False, **kwargs) -> list[tuple[float, bool]]:
            """(key, context ids, continuation ids) -> (sum of the continuation's log-probabilities, whether it is the
            greedy continuation); too long: cut on the left to `max_length` + 1 tokens, as the hf backend does."""
            rows = []
            for _, context, continuation in requests:
                if not context or not continuation:
                    raise ValueError("lm-eval gave an empty context or continuation")
                whole = (context + continuation)[-(self.max_length + 1):]
                rows.append((whole, len(continuation)))

            def run(batch: list[tuple[list[int], int]]) -> list[tuple[float, bool]]:
                width = max(len(w) for w, _ in batch) - 1
                ids = torch.zeros(len(batch), width, dtype=torch.long)
                targets = torch.zeros_like(ids)
                for i, (whole, _) in enumerate(batch):
                    ids[i, :len(whole) - 1] = torch.tensor(whole[:-1])
                    targets[i, :len(whole) - 1] = torch.tensor(whole[1:])
                logprobs, greedy = self.runner.score(ids, targets)
                out = []
                for i, (whole, n) in enumerate(batch):
                    end = len(whole) - 1
                    out.append((float(logprobs[i, end - n:end].double().sum()), bool(greedy[i, end - n:end].all())))
                return out

            return self._shared(rows, key=lambda row: len(row[0]), run=run, dummy=([0, 0], 1),
                                desc="loglikelihood")

        def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
            from lm_eval import utils

            windows, owner = [], []
            for index, (string,) in enumerate(req.args for req in requests):
                for context, continuation in map(utils.make_disjoint_window, utils.get_rolling_token_windows(
                        token_list=self.tok_encode(string), prefix_token=self.prefix_token_id,
                        max_seq_len=self.max_length, context_len=1)):
                    windows.append(((None,), context, continuation))
                    owner.append(index)
            scores = self._loglikelihood_tokens(windows) if windows else []
            totals = [0.0] * len(requests)
            for index, (logprob, _) in zip(owner, scores, strict=True):
                totals[index] += logprob
            return totals

        def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
            from lm_eval.models.utils import handle_stop_sequences, normalize_gen_kwargs, postprocess_generated_text

            eos = self.tok_decode(self.eot_token_id, skip_special_tokens=False)
            results: list[str | None] = [None] * len(requests)
            groups: dict[str, list[int]] = {}
            for i, req in enumerate(requests):  # one batch kind per set of generation settings, as lm-eval groups
                groups.setdefault(json.dumps(req.args[1], sort_keys=True, default=str), []).append(i)
            for indices in groups.values():
                kwargs = normalize_gen_kwargs(dict(requests[indices[0]].args[1]), self.max_gen_toks)
                until = handle_stop_sequences(kwargs.pop("until", None), eos=eos)
                max_new = int(kwargs.pop("max_gen_toks"))
                if max_new >= self.max_length:
                    raise ValueError(f"max_gen_toks={max_new} leaves no room for a context within max_length="
                                     f"{self.max_length}")
                temperature = float(kwargs.pop("temperature", 0.0) or 0.0) if kwargs.pop("do_sample", False) else 0.0
                top_p = float(kwargs.pop("top_p", 1.0) or 1.0)
                prompts = [(i, self.tok_encode(requests[i].args[0], left_truncate_len=self.max_length - max_new))
                           for i in indices]

                def run(batch, until=until, max_new=max_new, temperature=temperature, top_p=top_p):
                    def stopped(row: int, new: list[int]) -> bool:
                        if batch[row][0] < 0 or new[-1] == self.eot_token_id:  # a stand-in row stops at once
                            return True
                        text = self.tok_decode(new)
                        return any(stop in text for stop in until)

                    new = self.runner.generate([p for _, p in batch], max_new, self.text.pad_id, stopped,
                                               temperature, top_p, self.generator)
                    return [postprocess_generated_text(self.tok_decode(tokens), until, None) for tokens in new]

                texts = self._shared(prompts, key=lambda row: len(row[1]), run=run,
                                     dummy=(-1, [self.prefix_token_id]), desc="generate_until")
                for (i, _), text in zip(prompts, texts, strict=True):
                    results[i] = text
            return results

        # ------------------------------------------------------------ sharing the work over the ranks
        def _shared(self, rows: list, key, run, dummy, desc: str) -> list:
            """`run` over batches of `rows` (longest first), the rows dealt round-robin over the data-parallel
            ranks; every rank runs as many batches as the busiest one (a one-row `dummy` where it has none left: the
            expert-parallel exchange and ZeRO-3's gathers need every rank in each forward). Returns every row's
            result in the order of `rows`, on every rank."""
            grid = self.grid
            order = sorted(range(len(rows)), key=lambda i: -key(rows[i]))
            mine = order[grid.dp_rank::grid.dp]
            batches = [mine[i:i + self.batch_size] for i in range(0, len(mine), self.batch_size)]
            n = len(batches)
            if grid.world > 1:
                count = torch.tensor([float(n)], device=self.runner.device)
                dist.all_reduce(count, op=dist.ReduceOp.MAX)
                n = int(count.item())
            results = {}
            progress = Progress(desc, len(rows), grid.rank == 0)
            for b in range(n):
                if b < len(batches):
                    results.update(zip(batches[b], run([rows[i] for i in batches[b]]), strict=True))
                else:
                    run([dummy])
                progress.update(min(len(rows), (b + 1) * self.batch_size * grid.dp))
            if grid.dp > 1:
                gathered = [None] * grid.dp
                dist.all_gather_object(gathered, results, group=grid.dp_group)
                results = {k: v for part in gathered for k, v in part.items()}
            progress.close()
            return [results[i] for i in range(len(rows))]

    return LatentMoeLM


class Progress:
    """Rank 0's progress lines for long request lists: one every 30 s and a last one, only past 10 s."""

    def __init__(self, desc: str, total: int, enabled: bool):
        self.desc, self.total, self.enabled = desc, total, enabled
        self.start = self.shown = time.perf_counter()

    def update(self, done: int) -> None:
        now = time.perf_counter()
        if self.enabled and now - self.shown >= 30 and done < self.total:
            self.shown = now
            eta = (now - self.start) / max(done, 1) * (self.total - done)
            print(f"eval: {self.desc} {done:,}/{self.total:,} requests, {now - self.start:.0f} s, eta {eta:.0f} s",
                  flush=True)

    def close(self) -> None:
        seconds = time.perf_counter() - self.start
        if self.enabled and seconds >= 10:
            print(f"eval: {self.desc} {self.total:,} requests in {seconds:.0f} s", flush=True)


@dataclass
class TaskRun:
    """One task's outcome: lm-eval's results dict (None when it failed), the error, and the seconds it took."""

    name: str
    results: dict | None = None
    error: str | None = None
    seconds: float = 0.0
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
        self.lm = _lm_class()(ForwardRunner(engine), tokenizer, cfg.batch_size, max_length, cfg.max_gen_toks, seed)

    def run(self, bootstrap_iters: int | None = None, log_samples: bool | None = None) -> list[TaskRun]:
        """Every task, one at a time: a task that fails (its data, its config, its metric) is reported and the
        others still run. On every rank; the results are rank 0's to report."""
        from lm_eval import simple_evaluate

        cfg, runs = self.cfg, []
        log_samples = cfg.log_samples if log_samples is None else log_samples
        limit = None if cfg.limit is None else (cfg.limit if cfg.limit < 1 else int(cfg.limit))
        for task in self.tasks:
            start = time.perf_counter()
            run = TaskRun(task)
            try:  # lm-eval's progress bars go to stderr: kept out of the job's output (our Progress shows it)
                with contextlib.redirect_stderr(io.StringIO()), kept_random_state():
                    out = simple_evaluate(model=self.lm, tasks=[task], num_fewshot=cfg.num_fewshot, limit=limit,
                                          task_manager=self.manager, log_samples=log_samples,
                                          bootstrap_iters=cfg.bootstrap_iters if bootstrap_iters is None
                                          else bootstrap_iters, random_seed=None, numpy_random_seed=None,
                                          torch_random_seed=None, fewshot_random_seed=self.seed)
                if out is not None:
                    run.samples = out.pop("samples", {}) or {}
                    run.results = out
            except Exception as e:  # noqa: BLE001 - a broken task must not end the job
                run.error = f"{type(e).__name__}: {e}".splitlines()[0][:300]
            run.seconds = time.perf_counter() - start
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
