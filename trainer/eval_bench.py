"""`launch/bench.py eval`: lm-eval tasks through our backend (the model as the trainer builds it, one process) against
lm-eval's own `hf` backend (transformers) on the same Hugging Face directory and tasks, in one run.

Parity first: every request's response on both sides (log-likelihoods within 1e-4 and the same greedy flags in
fp32, identical generations); a figure over its tolerance stops the run with exit code 1 before any time is
reported. Then each side runs every task `--rounds` times after one untimed round, and the line
`ratio hf / ours seconds: N.NNx` compares their best total.

    python launch/bench.py eval --hf outputs/<date>/<time>/hf                  # the built-in tasks
    python launch/bench.py eval --hf DIR --tasks mc_local,gen_local --include-path tests/eval/tasks
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

LOGLIKELIHOOD_TOLERANCE = 1e-4


def responses(samples: dict[str, list[dict]]) -> dict[tuple, object]:
    """(task, doc_id, request) -> the response: (log-likelihood, greedy), a rolling log-likelihood or a text."""
    out = {}
    for task, rows in samples.items():
        for sample in rows:
            for i, resp in enumerate(sample["resps"]):
                value = resp[0]
                if isinstance(value, (tuple, list)):
                    value = (float(value[0]), bool(value[1]))
                elif not isinstance(value, str):
                    value = float(value)
                out[task, sample["doc_id"], i] = value
    return out


def parity(ours: dict, theirs: dict) -> dict:
    """The largest log-likelihood difference and the requests whose answers differ otherwise."""
    worst, mismatched = 0.0, []
    for key in sorted(set(ours) | set(theirs), key=str):
        a, b = ours.get(key), theirs.get(key)
        if a is None or b is None or type(a) is not type(b):
            mismatched.append(key)
        elif isinstance(a, tuple):
            worst = max(worst, abs(a[0] - b[0]))
            if a[1] != b[1]:
                mismatched.append(key)
        elif isinstance(a, float):
            worst = max(worst, abs(a - b))
        elif a != b:
            mismatched.append(key)
    return {"requests": len(ours), "loglikelihood_max_abs_diff": worst, "mismatched": [list(k) for k in mismatched]}


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(prog="bench.py eval", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--hf", type=Path, required=True, help="a Hugging Face directory (config.json, tokenizer.json)")
    p.add_argument("--tasks", default="stdlib_docstrings,stdlib_lines")
    p.add_argument("--include-path", default=None)
    p.add_argument("--limit", type=float, default=None)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--rounds", type=int, default=1)
    p.add_argument("--cache-dir", default="~/.cache/latentmoe")
    p.add_argument("--device", default="cpu")
    p.add_argument("--json", type=Path, default=None)
    args = p.parse_args(argv)

    from lm_eval import simple_evaluate

    from .eval_job import one_process_evaluator
    tasks = args.tasks.split(",")
    overrides = {"tasks": tasks, "include_path": args.include_path, "batch_size": args.batch_size,
                 "limit": args.limit, "bootstrap_iters": 0}
    evaluator = one_process_evaluator(args.hf, overrides, args.cache_dir, args.device)
    limit = None if args.limit is None else (args.limit if args.limit < 1 else int(args.limit))

    def ours() -> dict:
        return {task: samples for run in evaluator.run(log_samples=True) for task, samples in run.samples.items()}

    def hf() -> dict:
        out = {}
        for task in tasks:
            result = simple_evaluate(model="hf", model_args=f"pretrained={args.hf},dtype=float32", device=args.device,
                                     batch_size=args.batch_size, tasks=[task], task_manager=evaluator.manager,
                                     limit=limit, log_samples=True, bootstrap_iters=0)
            out.update(result["samples"])
        return out

    figures = parity(responses(ours()), responses(hf()))
    print(f"parity: {figures['requests']} requests, log-likelihoods within {figures['loglikelihood_max_abs_diff']:.2e}"
          f" (tolerance {LOGLIKELIHOOD_TOLERANCE:g}), {len(figures['mismatched'])} answers differing")
    if figures["mismatched"] or figures["loglikelihood_max_abs_diff"] > LOGLIKELIHOOD_TOLERANCE:
        raise SystemExit(f"parity broken: {figures['mismatched'][:5]}; no timing reported")
    seconds = {}
    for side, run in (("ours", ours), ("hf", hf)):
        times = []
        for _ in range(args.rounds):
            start = time.perf_counter()
            run()
            times.append(time.perf_counter() - start)
        seconds[side] = min(times)
        print(f"{side:>4}: {seconds[side]:.2f} s for {figures['requests']} requests ({', '.join(tasks)})")
    ratio = seconds["hf"] / seconds["ours"]
    print(f"ratio hf / ours seconds: {ratio:.2f}x")
    summary = {"parity": figures, "seconds": seconds, "ratio_hf_over_ours": ratio, "tasks": tasks,
               "device": args.device, "batch_size": args.batch_size}
    if args.json:
        args.json.write_text(json.dumps(summary, indent=2))
    return summary
