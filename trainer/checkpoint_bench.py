"""`launch/bench.py checkpoint`: what a checkpoint costs training, in one run (docs/benchmarks.md, "Checkpoints").

One process trains the tiny preset widened until its training state (fp32 weights and AdamW's two moments, 12 bytes
per parameter) passes `--state-gb`, through the trainer's own model, built-in engine and save paths:

- the training stall of a save: the seconds a save keeps the training loop from its next step, synchronous
  (`checkpoint.save_sync`) against background (`background.BackgroundSaver`), the median of `--saves` each, and how
  much slower the steps that overlap a background write run;
- the cost per GB of writing (and hashing, and checking) a checkpoint, of verifying it (`integrity.verify`) and of
  loading it (`checkpoint.load_owned_tensors`);
- the steady resident memory of a resumed run against a fresh one, each in a process of its own.

It prints `ratio async / sync save stall: 0.NNx` and, with --json, writes every figure.
"""

from __future__ import annotations

import argparse
import gc
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
"""The repository root: the memory runs import the trainer from it."""


def rss_gib() -> float:
    """This process's resident memory now (VmRSS), GiB."""
    with open("/proc/self/status", encoding="ascii") as f:
        kib = next(int(line.split()[1]) for line in f if line.startswith("VmRSS:"))
    return kib / 2**20


def build(args: argparse.Namespace):
    """(config, engine, a fixed batch) for the widened tiny model on CPU, fp32, the built-in engine."""
    from trainer.build import build_model
    from trainer.config import TrainConfig
    from trainer.distributed import DistEnv
    from trainer.engines import build_engine
    from trainer.layout import ProcessGrid
    from trainer.presets import model_preset

    cfg = TrainConfig()
    cfg.model = model_preset("tiny", hidden_size=args.hidden, n_routed_experts=args.experts,
                             moe_intermediate_size=args.expert_width, num_hidden_layers=args.layers)
    cfg.data.seq_len = args.seq
    cfg.trainer.micro_batch_size = cfg.trainer.global_batch_size = 1
    cfg.trainer.device, cfg.trainer.precision, cfg.trainer.compile = "cpu", "fp32", False
    cfg.validate(1, planning=True)
    torch.manual_seed(0)
    grid, device = ProcessGrid(), torch.device("cpu")
    engine = build_engine(build_model(cfg, grid, device), cfg, grid, DistEnv(), device, "fp32")
    ids = torch.randint(2, cfg.model.vocab_size, (1, args.seq + 1))
    batch = {"input_ids": ids[:, :-1], "labels": ids[:, 1:]}
    return cfg, engine, batch


def state_bytes(engine) -> int:
    from trainer.checkpoint import owned_tensors
    weights, optim = owned_tensors(engine.model, engine.optimizer, True, True)
    return sum(t.numel() * t.element_size() for t in [*weights.values(), *optim.values()])


def timed_steps(engine, batch, first: int, n: int) -> list[float]:
    times = []
    for i in range(n):
        start = time.perf_counter()
        engine.step(first + i, [batch])
        times.append(time.perf_counter() - start)
    return times


def measure_saves(args: argparse.Namespace, engine, batch, root: Path) -> dict:
    """Sync and background saves of the same engine, alternating; the stall of each and the steps around them.
    The synchronous stall is timed around `save_checkpoint` itself, so `--sync-only` measures any version."""
    from trainer.checkpoint import save_checkpoint, step_dir
    from trainer.distributed import DistEnv

    env, step, out = DistEnv(), 0, {"sync": [], "async": [], "async_write": []}
    plain = timed_steps(engine, batch, step, args.steps_between)  # steps with no save in flight
    step += args.steps_between
    saver, overlapped = None, []
    if not args.sync_only:
        from trainer.background import BackgroundSaver
        saver = BackgroundSaver(engine, env, timeout_s=600)
    for i in range(args.saves):
        start = time.perf_counter()
        save_checkpoint(root / "sync", step, engine, {"step": step, "world_size": 1}, {}, env, keep=1)
        out["sync"].append(time.perf_counter() - start)
        if saver is None:
            step += 1
            engine.step(step, [batch])
            print(f"  save {i + 1}/{args.saves}: sync stall {out['sync'][-1]:.2f} s", flush=True)
            continue
        job = saver.save(root / "async", step, {"step": step, "world_size": 1}, {}, 1, None)
        out["async"].append(job.seconds["stall"])
        overlapped += timed_steps(engine, batch, step, args.steps_between)
        step += args.steps_between
        saver.wait()
        out["async_write"].append(job.seconds["write"] + job.seconds["commit"])
        print(f"  save {i + 1}/{args.saves}: sync stall {out['sync'][-1]:.2f} s, background stall "
              f"{out['async'][-1]:.3f} s (write and commit {out['async_write'][-1]:.1f} s)", flush=True)
    out["host_copy_gib"] = saver.host_bytes / 2**30 if saver else 0.0
    if saver is not None:  # the last step was saved both ways: the background copy must be the same state
        out["same_tensor_bytes"] = tensor_digests(step_dir(root / "sync", step - args.steps_between)) == \
            tensor_digests(step_dir(root / "async", step - args.steps_between))
    out["plain_step_s"] = statistics.median(plain)
    out["overlapped_step_s"] = statistics.median(overlapped) if overlapped else None
    return out


def tensor_digests(path: Path) -> dict[str, str]:
    """SHA-256 of a checkpoint's weight and optimizer files, from its manifest."""
    files = json.loads((path / "integrity.json").read_text())["files"]
    return {name: entry["sha256"] for name, entry in files.items() if name.startswith(("model_", "optimizer_"))}


def measure_restart(root: Path, engine) -> dict:
    """Verify and load the newest synchronous checkpoint into the engine (the optimizer state too)."""
    from trainer.checkpoint import list_checkpoints, load_owned_tensors
    from trainer.integrity import verify

    path = list_checkpoints(root / "sync")[0][-1]
    start = time.perf_counter()
    problems = verify(path, None)
    verify_s = time.perf_counter() - start
    if problems:
        raise RuntimeError(f"the benchmark's own checkpoint failed verification: {problems}")
    start = time.perf_counter()
    load_owned_tensors(path, engine.model, engine.optimizer)
    return {"checkpoint": str(path), "verify_s": verify_s, "load_s": time.perf_counter() - start,
            "checkpoint_gb": sum(f.stat().st_size for f in path.rglob("*") if f.is_file()) / 1e9}


def memory_run(args: argparse.Namespace) -> dict:
    """In a process of its own: build, optionally load `--resume` (weights and optimizer), train `--steps-between`
    steps, and report the resident memory then."""
    from trainer.checkpoint import load_owned_tensors
    _, engine, batch = build(args)
    if args.resume:
        load_owned_tensors(Path(args.resume), engine.model, engine.optimizer)
    timed_steps(engine, batch, 0, args.steps_between)
    gc.collect()
    return {"rss_gib": rss_gib()}


def measure_memory(args: argparse.Namespace, checkpoint: str) -> dict:
    common = [sys.executable, "-m", "trainer.checkpoint_bench", "--memory-run", *args.passthrough]

    def run(*extra: str) -> dict:
        proc = subprocess.run([*common, *extra], capture_output=True, text=True, cwd=ROOT)
        if proc.returncode != 0:
            raise RuntimeError(f"the memory run failed: {proc.stderr[-2000:]}")
        return json.loads(proc.stdout.splitlines()[-1])

    fresh, resumed = run(), run("--resume", checkpoint)
    return {"fresh_rss_gib": fresh["rss_gib"], "resumed_rss_gib": resumed["rss_gib"],
            "resumed_over_fresh": resumed["rss_gib"] / fresh["rss_gib"]}


def parse(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="bench.py checkpoint", description=__doc__.split("\n\n")[0])
    p.add_argument("--hidden", type=int, default=512, help="model.hidden_size of the widened tiny model")
    p.add_argument("--experts", type=int, default=64, help="model.n_routed_experts")
    p.add_argument("--expert-width", type=int, default=256, help="model.moe_intermediate_size")
    p.add_argument("--layers", type=int, default=5, help="model.num_hidden_layers")
    p.add_argument("--seq", type=int, default=64, help="tokens per step (one sequence)")
    p.add_argument("--saves", type=int, default=3, help="saves of each kind (the median is reported)")
    p.add_argument("--steps-between", type=int, default=4, help="training steps after each save")
    p.add_argument("--state-gb", type=float, default=1.0, help="refuse a model whose state is smaller than this")
    p.add_argument("--dir", type=Path, default=None, help="where to write (default: a temporary directory)")
    p.add_argument("--json", type=Path, default=None, help="write every figure here")
    p.add_argument("--sync-only", action="store_true",
                   help="only synchronous saves (to compare with a version that has no background saves)")
    p.add_argument("--memory-run", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--resume", default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    args.passthrough = [f"--{k.replace('_', '-')}={getattr(args, k)}" for k in
                        ("hidden", "experts", "expert_width", "layers", "seq", "steps_between")]
    return args


def main(argv: list[str] | None = None) -> dict:
    args = parse(argv)
    if args.memory_run:
        result = memory_run(args)
        print(json.dumps(result))
        return result
    _, engine, batch = build(args)
    timed_steps(engine, batch, 0, 1)  # the optimizer's state exists from the first step
    size = state_bytes(engine)
    if size < args.state_gb * 1e9:
        raise SystemExit(f"the model's training state is {size / 1e9:.2f} GB, under --state-gb={args.state_gb}: "
                         "widen it (--hidden, --experts, --expert-width, --layers)")
    print(f"checkpoint bench: {sum(p.numel() for p in engine.model.parameters()) / 1e6:.1f}M parameters, "
          f"{size / 1e9:.2f} GB of weights and AdamW state, one CPU process, fp32", flush=True)
    with tempfile.TemporaryDirectory(dir=args.dir) as tmp:
        saves = measure_saves(args, engine, batch, Path(tmp))
        restart = measure_restart(Path(tmp), engine)
        memory = measure_memory(args, restart["checkpoint"])
    sync = statistics.median(saves["sync"])
    background = statistics.median(saves["async"]) if saves["async"] else None
    gb = restart["checkpoint_gb"]
    result = {"state_gb": size / 1e9, "sync_stall_s": sync, "async_stall_s": background,
              "ratio": background / sync if background is not None else None, **saves, **restart, **memory,
              "sync_save_s_per_gb": sync / gb, "verify_s_per_gb": restart["verify_s"] / gb,
              "load_s_per_gb": restart["load_s"] / gb}
    verify_s, load_s = restart["verify_s"], restart["load_s"]
    print(f"  checkpoint {gb:.2f} GB: sync save {sync:.2f} s ({sync / gb:.2f} s/GB), verify {verify_s:.2f} s "
          f"({verify_s / gb:.2f} s/GB), load {load_s:.2f} s ({load_s / gb:.2f} s/GB)")
    print(f"  steady memory after {args.steps_between} steps: resumed {memory['resumed_rss_gib']:.2f} GiB, fresh "
          f"{memory['fresh_rss_gib']:.2f} GiB (ratio {memory['resumed_over_fresh']:.3f})")
    if background is not None:
        print(f"  background save: host copy {saves['host_copy_gib']:.2f} GiB; steps overlapping its write "
              f"{saves['overlapped_step_s']:.3f} s against {saves['plain_step_s']:.3f} s without; its tensor files "
              f"{'equal' if saves['same_tensor_bytes'] else 'DIFFER FROM'} the synchronous save's, byte for byte")
        print(f"ratio async / sync save stall: {background / sync:.2f}x")
    if args.json:
        args.json.write_text(json.dumps(result, indent=2))
    return result


if __name__ == "__main__":
    main(sys.argv[1:])
