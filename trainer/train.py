"""The training loop, read top to bottom: build the model and its engine, resume, then step / log / validate /
checkpoint, and export at the end. Everything engine-specific is behind `engines.Engine`; the step's objective is
described in `trainer/step.py`, the checked inputs in `trainer/prepare.py`."""

from __future__ import annotations

import math
import random
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from omegaconf import OmegaConf

from data.loader import build_loader, check_bad_fraction, describe_sources, epoch_rows
from data.sources import BadRecords
from data.tokenizer import TextTokenizer
from model.flops import training_flops_per_token
from model.hf import CheckpointError

from .build import build_model, load_start_weights, setup_trainable
from .changes import resume_changes
from .background import BackgroundSaver, in_background
from .checkpoint import SaveJob, load_checkpoint, save_sync, set_aside_newer, step_dir
from .config import NonFiniteError, TrainConfig, config_dict
from .context_parallel import split_sequences
from . import faults
from .distributed import DistEnv, barrier, current, pick_device
from .engines import Engine, build_engine
from .expert_parallel import build_grid, dispatch_metrics
from .layout import ProcessGrid
from .lora import export_adapter
from .metrics import LossSpikes, MetricsLogger, Throughput, device_peak_tflops, load_imbalance, peak_memory_gib
from .optim import global_batch_at
from .preempt import Preemption
from .prepare import Prepared
from .step import StepResult, merge_dispatch


@dataclass
class Progress:
    """The counters a checkpoint carries, and the losses the run reports at its end."""

    step: int = 0
    tokens_seen: int = 0
    skipped: int = 0
    first_loss: float | None = None
    last_loss: float | None = None
    start_step: int = 0
    """The step this launch started from (0, or the resumed checkpoint's)."""
    changes: list[str] = field(default_factory=list)
    """What the relaunch changes from the checkpoint's run, one line each (`changes.resume_changes`)."""

    def add(self, result: StepResult) -> None:
        self.step += 1
        self.tokens_seen += result.tokens
        self.skipped += result.skipped
        self.first_loss = result.loss if self.first_loss is None else self.first_loss
        self.last_loss = result.loss


def train(prepared: Prepared, run_dir: Path, env: DistEnv) -> dict:
    """Train as `prepared.cfg` says on this rank (collective: every rank of the job calls it); returns the summary."""
    t_start = time.time()
    cfg, tokenizer = prepared.cfg, prepared.tokenizer
    device = pick_device(cfg.trainer.device, env)
    precision = cfg.trainer.precision if cfg.trainer.precision != "auto" else (
        "bf16" if device.type == "cuda" else "fp32")
    random.seed(cfg.trainer.seed)
    torch.manual_seed(cfg.trainer.seed)  # the base seed of every weight's own generator
    grid = build_grid(env, cfg.parallel.pp, cfg.expert_parallel_size(env.world_size), cfg.parallel.cp)
    if cfg.trainer.epochs is not None:
        steps_from_epochs(cfg, tokenizer, grid, device, env)
    model = build_model(cfg, grid, device, precision)
    weights = load_start_weights(cfg, model, prepared.resume)  # before DeepSpeed copies or partitions them
    trainable, selection = setup_trainable(cfg, model, tokenizer, grid, device, run_dir, env, prepared.resume)
    engine = build_engine(model, cfg, grid, env, device, precision)
    loader = build_loader(cfg.data, tokenizer, cfg.trainer.micro_batch_size, cfg.trainer.seed, grid.data_rank,
                          grid.data_size, vocab_limit=cfg.model.vocab_size)
    val_batches = held_out_batches(cfg, tokenizer, grid)
    progress = resume(prepared, engine, loader, env)
    logger = MetricsLogger(run_dir, cfg.logging, cfg.trainer.max_steps, progress.step, env.is_main,
                           config_dict(cfg), cfg.trainer.progress, prepared.resume.path if progress.step else None)
    announce(logger, run_dir, engine, weights, tokenizer, trainable, selection)
    for line in progress.changes:
        logger.print(line)
    reporter = Reporter(cfg, engine, env, device, progress.step, loader)
    if cfg.eval.every:
        reporter.start_evaluation(tokenizer, logger, progress.step)
    saver = BackgroundSaver(engine, env, cfg.parallel.timeout_s) if in_background(cfg, engine) else None
    try:
        stopped_by, checkpoint = loop(progress, engine, loader, logger, reporter, prepared, env, selection,
                                      val_batches, saver)
        exports = {}
        if stopped_by:
            logger.print(f"preempted ({stopped_by}) after step {progress.step}: "
                         f"{f'checkpoint {checkpoint} committed' if checkpoint else 'nothing new to save'}; "
                         "relaunch the same command to continue")
        else:
            exports = export(cfg, engine, tokenizer, run_dir)
        barrier(env)
    finally:
        if saver is not None and saver.in_flight:  # failing: the save in flight still commits if it can
            logger.print(f"waiting for the background checkpoint save of step {saver.job.step} to finish")
            saver.drain()
        loader.close()
        logger.close()
    return summarize(progress, checkpoint, run_dir, exports, logger.summary_line(), time.time() - t_start, env)


def export(cfg: TrainConfig, engine: Engine, tokenizer: TextTokenizer, run_dir: Path) -> dict[str, Path | None]:
    """The end-of-run exports (collective): the LoRA adapter in PEFT's format to `<run dir>/adapter`, and the
    Hugging Face model to `<run dir>/hf` (with LoRA, merged, unless `lora.export_merged=false`). Paths on rank 0."""
    current.at("export")
    exports = {}
    try:
        if cfg.lora.enabled:
            exports["adapter"] = export_adapter(engine.model, cfg.lora, cfg.model.pretrained, run_dir / "adapter",
                                                engine.grid)
        if cfg.checkpoint.export_hf and (cfg.lora.export_merged or not cfg.lora.enabled):
            exports["hf"] = engine.export(run_dir / "hf", tokenizer)
    except OSError as e:  # a full disk, a read-only directory: the run's checkpoints are committed already
        raise CheckpointError(f"exporting to {e.filename or run_dir} failed ({e.strerror or e}); the run's last "
                              "checkpoint is committed, and `launch/convert.py export <that checkpoint> <dir>` "
                              "writes the export from it") from None
    return exports


def loop(progress: Progress, engine: Engine, loader, logger: MetricsLogger, reporter: Reporter, prepared: Prepared,
         env: DistEnv, selection: dict[int, list[int]] | None, val_batches: list[dict],
         saver: BackgroundSaver | None) -> tuple[str | None, Path | None]:
    """Train to `max_steps`, checkpointing every `checkpoint.every` steps and at the end, or until a preemption
    signal: then the step just finished is checkpointed (a signal during a save ends the run after it; a save in
    the background is waited for first). Returns (the preemption signal's name or None, the checkpoint of the last
    step, None when there is none), that checkpoint committed."""
    cfg = prepared.cfg
    last_saved = progress.step if prepared.resume else None

    def checkpoint(last: bool = False) -> Path:
        nonlocal last_saved
        if last_saved != progress.step:
            current.at("save", progress.step)
            save(cfg, progress, engine, loader, env, prepared.tokenizer, selection, saver, logger)
            last_saved = progress.step
        if last and saver is not None:
            report_save(saver.wait(), logger, background=True)
        return step_dir(cfg.checkpoint.dir, progress.step)

    with Preemption(env, engine.device) as preemption:
        while progress.step < cfg.trainer.max_steps:
            current.at("step", progress.step + 1)
            step(progress, engine, loader, logger, reporter, cfg, engine.grid, val_batches)
            stopped_by = preemption.requested(saver is not None and saver.failed())
            if preemption.save_failed:
                saver.wait()  # every rank raises the failed save's error at this same step
            if cfg.checkpoint.every and progress.step % cfg.checkpoint.every == 0:
                checkpoint()
                stopped_by = stopped_by or preemption.requested()  # a signal that came during the save
            if stopped_by:
                return stopped_by, checkpoint(last=True) if progress.step > 0 else None
        return None, checkpoint(last=True)


def step(progress: Progress, engine: Engine, loader, logger: MetricsLogger, reporter: Reporter, cfg: TrainConfig,
         grid: ProcessGrid, val_batches: list[dict]) -> None:
    """One training step: its micro-batches, the engine's step, the skip policy, the log line and validation."""
    step_start = time.perf_counter()
    faults.current_step = progress.step + 1
    faults.fault("step")
    epochs = loader.source_epochs
    batches = draw_batches(progress.step, loader, cfg, grid)
    for name, epoch in loader.source_epochs.items():
        if epoch > epochs[name]:
            logger.print(f"data: {'source ' + name if cfg.data.mixture else 'the training data'} starts its epoch "
                         f"{epoch + 1} at step {progress.step + 1} (its shards wrap around one by one, each in a new "
                         "seeded order)")
    bad = BadRecords.from_state(loader.bad_records)
    result = engine.step(progress.step, batches, (bad.bad, bad.good))
    # Too many unusable records stop the run, judged on the whole job's counts (summed with the step's statistics).
    check_bad_fraction(cfg.data, bad, result.bad_records, result.good_records)
    if faults.armed("weights") and faults.fault("weights"):  # test-only: a weight turned NaN
        with torch.no_grad(), engine.full_weights(modifier_rank=0):
            next(engine.model.parameters()).view(-1)[0] = float("nan")
    progress.add(result)
    logger.advance()
    if result.skipped:
        logger.print(f"step {progress.step}: non-finite loss or gradient, update skipped ({progress.skipped} so far)")
        if progress.skipped > cfg.trainer.max_skipped_steps:
            raise NonFiniteError(f"{progress.skipped} updates skipped, more than "
                                 f"trainer.max_skipped_steps={cfg.trainer.max_skipped_steps}")
    metrics = reporter.metrics(progress, result, time.perf_counter() - step_start, val_batches)
    if metrics is not None:
        logger.log(progress.step, metrics, result.tokens_per_expert, reporter.moe_layer_ids)


def steps_from_epochs(cfg: TrainConfig, tokenizer: TextTokenizer, grid: ProcessGrid, device: torch.device,
                      env: DistEnv) -> None:
    """`trainer.epochs`: max_steps from one counted pass over the training data (read and tokenized once, the
    canonical shards shared out over the data-parallel ranks; packed rows per global batch)."""
    rows = torch.tensor(float(epoch_rows(cfg.data, tokenizer, cfg.trainer.seed, grid.data_rank, grid.data_size)),
                        device=device)
    if grid.world > 1:  # each rank counted the canonical shards it owns: the sum is the whole pass
        torch.distributed.all_reduce(rows, group=grid.dp_group)
        rows /= grid.cp  # the ranks of a context-parallel group read the same shards
    per_epoch = max(1, int(rows) // cfg.trainer.global_batch_size)
    cfg.trainer.max_steps = max(1, int(cfg.trainer.epochs * per_epoch))
    if env.is_main:
        print(f"trainer.epochs={cfg.trainer.epochs:g}: {cfg.trainer.max_steps} steps ({per_epoch} per epoch)")


def held_out_batches(cfg: TrainConfig, tokenizer: TextTokenizer, grid: ProcessGrid) -> list[dict]:
    """This rank's validation micro-batches (the same every time), or none when validation is off."""
    if not cfg.trainer.val_every:
        return []
    loader = build_loader(cfg.data, tokenizer, cfg.trainer.micro_batch_size, cfg.trainer.seed, grid.data_rank,
                          grid.data_size, split="val", vocab_limit=cfg.model.vocab_size)
    if loader is None:
        return []
    try:
        return [rank_part(next(loader), grid) for _ in range(cfg.trainer.val_batches)]
    finally:
        loader.close()


def resume(prepared: Prepared, engine: Engine, loader, env: DistEnv) -> Progress:
    """Set aside an abandoned timeline's checkpoints, then restore what the chosen checkpoint allows."""
    if env.is_main:
        for path in prepared.set_aside:
            print(f"resuming from an older checkpoint: {path} moved to {set_aside_newer(path)}")
    barrier(env)
    if prepared.resume is None:
        return Progress()
    current.at("resume")
    start = time.perf_counter()
    data_state = load_checkpoint(prepared.resume, engine, env)
    if env.is_main:
        print(f"checkpoint {prepared.resume.path.name} loaded in {time.perf_counter() - start:.1f} s", flush=True)
    if data_state is not None:
        loader.load_state_dict(data_state)
    elif not prepared.resume.weights_only and env.is_main:
        print(f"checkpoint.data_resume=reset: the data stream restarts from its beginning at step "
              f"{prepared.resume.state['step']} (documents read before the checkpoint are read again)", flush=True)
    state = prepared.resume.state
    if prepared.resume.weights_only:
        return Progress()
    changes = resume_changes(prepared.cfg, state)  # on every rank: `keep` sets the schedule's horizon
    return Progress(state["step"], state["tokens_seen"], state["skipped"], start_step=state["step"], changes=changes)


def draw_batches(step: int, loader, cfg: TrainConfig, grid: ProcessGrid) -> list[dict]:
    """This rank's micro-batches of optimizer step `step` (more of them while the batch size ramps up)."""
    accumulation = global_batch_at(step, cfg.trainer, grid.data_size) // (cfg.trainer.micro_batch_size *
                                                                          grid.data_size)
    return [rank_part(next(loader), grid) for _ in range(accumulation)]


def rank_part(batch: dict, grid: ProcessGrid) -> dict:
    """A micro-batch as this rank trains on it: whole sequences, or its zigzag chunks of them under context
    parallelism (trainer/context_parallel.py)."""
    return batch if grid.cp == 1 else split_sequences(batch, grid.cp, grid.cp_rank)


def save(cfg: TrainConfig, progress: Progress, engine: Engine, loader, env: DistEnv, tokenizer: TextTokenizer,
         selection: dict[int, list[int]] | None, saver: BackgroundSaver | None = None,
         logger: MetricsLogger | None = None) -> None:
    """A checkpoint of the current step (collective): written before it returns, or with `saver` in the background
    after the previous background save is committed (reported then)."""
    state = {"step": progress.step, "tokens_seen": progress.tokens_seen, "skipped": progress.skipped,
             "world_size": env.world_size, "layout": cfg.layout(env.world_size), "config": config_dict(cfg),
             "schedule_steps": cfg.optim.schedule_steps or cfg.trainer.max_steps, "time": time.time()}
    if selection is not None:
        state["esft_selection"] = {str(k): v for k, v in selection.items()}
    try:
        if saver is None:
            job = save_sync(cfg.checkpoint.dir, progress.step, engine, state, loader.state_dict(), env,
                              cfg.checkpoint.keep, tokenizer=tokenizer)
            if logger is not None:
                report_save(job, logger, background=False)
            return
        first = not saver.buffers
        report_save(saver.wait(), logger, background=True)
        job = saver.save(cfg.checkpoint.dir, progress.step, state, loader.state_dict(), cfg.checkpoint.keep,
                         tokenizer)
        if first and logger is not None:
            logger.print(f"checkpoint.async_save: {saver.host_bytes / 2**30:.2f} GiB of host memory holds this "
                         f"rank's copy of each save{' (pinned)' if engine.device.type == 'cuda' else ''}")
    except OSError as e:  # before the save's own guarded writes (its directory): nothing committed is touched
        raise CheckpointError(f"checkpoint.dir={cfg.checkpoint.dir}: saving step {progress.step} failed "
                              f"({e.strerror or e}: {e.filename}); the checkpoints committed before stay as they "
                              "are") from None


def report_save(job: SaveJob | None, logger: MetricsLogger | None, background: bool) -> None:
    """One log line for a committed save: its size on this rank, how long training stopped, how long it took."""
    if job is None or logger is None:
        return
    t = job.seconds
    took = t.get("write", 0.0) + t.get("commit", 0.0)
    logger.print(f"checkpoint step {job.step}: {job.nbytes / 1e9:.2f} GB per rank, training stopped "
                 f"{t['stall']:.2f} s; written, hashed and committed in {took:.1f} s"
                 f"{' in the background' if background else ''}")


class Reporter:
    """What a log step reports: the step's figures, throughput of the training steps alone, MFU on GPUs, dropped
    copies since the last log line, expert-parallel dispatch figures, and the validation loss when it is due."""

    def __init__(self, cfg: TrainConfig, engine: Engine, env: DistEnv, device: torch.device, start_step: int,
                 loader=None):
        self.cfg, self.engine, self.env, self.device, self.loader = cfg, engine, env, device, loader
        self.throughput, self.dropped = Throughput(), 0
        self.spikes = LossSpikes(cfg.trainer.loss_spike_ratio, cfg.trainer.loss_spike_window)
        self.flops_per_token = training_flops_per_token(cfg.model, cfg.data.seq_len)
        self.peak = cfg.trainer.peak_tflops or device_peak_tflops(device)
        self.moe_layer_ids = [i for i in range(cfg.model.num_hidden_layers) if cfg.model.is_moe_layer(i)]
        self.dispatch: torch.Tensor | None = None  # expert-parallel exchange figures since the last log line
        self.loop_start, self.first_step = time.time(), start_step
        self.evaluator = None  # trainer/evaluation.py: lm-eval tasks every `eval.every` steps
        self.logger: MetricsLogger | None = None

    def metrics(self, progress: Progress, result: StepResult, seconds: float, val_batches: list[dict]
                ) -> dict | None:
        """The log step's metrics (collective on log and validation steps), or None between them."""
        t, step = self.cfg.trainer, progress.step
        self.throughput.add(result.tokens, seconds)
        self.dropped += result.dropped_copies
        if result.dispatch is not None:
            self.dispatch = merge_dispatch(self.dispatch, result.dispatch)
        last = step == t.max_steps
        metrics = None
        if step % t.log_every == 0 or last:
            metrics = self.log_step(progress, result)
        if val_batches and (step % t.val_every == 0 or last):
            val_loss = self.engine.validate(val_batches)
            metrics = metrics or {"loss": result.loss}
            metrics.update(val_loss=val_loss, val_ppl=math.exp(min(val_loss, 50.0)))
        if self.evaluator is not None and self.cfg.eval.every and (step % self.cfg.eval.every == 0 or last):
            metrics = metrics or {"loss": result.loss}
            metrics.update(self.evaluate(step))
        spike = self.spikes.check(result.loss)  # every rank alike: the loss is reduced
        if spike is not None:
            metrics = metrics or {"loss": result.loss}
            metrics["loss_spike"] = spike
        return metrics

    def start_evaluation(self, tokenizer: TextTokenizer, logger: MetricsLogger, step: int) -> None:
        """Set up `eval.tasks` for the run (and evaluate the start weights with `eval.at_start` on a fresh run).
        Without lm-eval installed the run trains without them, saying so once."""
        from .evaluation import Evaluator, lm_eval_missing
        missing = lm_eval_missing()
        if missing:
            logger.print(f"note: eval.every={self.cfg.eval.every} is skipped: {missing}")
            return
        self.evaluator = Evaluator(self.engine, tokenizer, self.cfg.eval, self.cfg.data.cache_dir,
                                   self.cfg.trainer.seed)
        self.logger = logger
        if self.cfg.eval.at_start and step == 0:
            logger.log(0, self.evaluate(0))

    def evaluate(self, step: int) -> dict:
        """The eval tasks on the live model (collective): `eval/<task>/<metric>` and the seconds they took (not
        counted in throughput). A task that fails is reported on its own line; training goes on. Per-sample
        records are `launch/evaluate.py`'s (eval.log_samples), not written here."""
        from .evaluation import flat_metrics
        start = time.perf_counter()
        runs = self.evaluator.run(log_samples=False)
        metrics = {**flat_metrics(runs), "eval_s": time.perf_counter() - start}
        failed = [run for run in runs if run.error is not None]
        for run in failed:
            self.logger.print(f"eval: task {run.name} failed at step {step}: {run.error} (training goes on)")
        if failed:
            metrics["eval_failed"] = [run.name for run in failed]
        return metrics

    def log_step(self, progress: Progress, result: StepResult) -> dict:
        t, step = self.cfg.trainer, progress.step
        tokens_per_s = self.throughput.read()
        metrics = {"loss": result.loss, "aux_loss": result.aux_loss,
                   **{f"balance_{k}": v for k, v in result.balance.items()},
                   "lr": self.engine.lr(step - 1), "grad_norm": result.grad_norm, "tokens_per_s": tokens_per_s,
                   "tokens_seen": progress.tokens_seen,
                   "mfu": self.flops_per_token * tokens_per_s / (self.peak * 1e12 * self.env.world_size)
                   if self.peak else None,
                   "peak_mem_gib": peak_memory_gib(self.device), "skipped_steps": progress.skipped,
                   "bad_records": result.bad_records,
                   "global_batch": global_batch_at(step - 1, t, self.engine.grid.data_size),
                   "dropped_copies": self.dropped,
                   "eta_s": (time.time() - self.loop_start) / (step - self.first_step) * (t.max_steps - step)}
        self.dropped = 0
        if self.cfg.data.mixture and self.loader is not None:  # global rows of each source x positions per row
            metrics["tokens_by_source"] = {name: rows * self.cfg.data.seq_len
                                           for name, rows in self.loader.rows_by_source.items()}
        if result.tokens_per_expert is not None:
            metrics["load_imbalance"], metrics["load_imbalance_per_layer"] = load_imbalance(result.tokens_per_expert)
        if self.engine.grid.ep > 1:
            metrics.update(dispatch_metrics(self.dispatch, self.env, self.device))
            self.dispatch = None
        return metrics


def announce(logger: MetricsLogger, run_dir: Path, engine: Engine, weights: str, tokenizer: TextTokenizer,
             trainable: dict[str, int], selection: dict[int, list[int]] | None) -> None:
    """The start banner: where the run writes, its layout and engine, and which weights, tokenizer and data."""
    grid, d = engine.grid, engine.cfg.data
    data = {"stdlib": "the built-in corpus (this Python's standard library)",
            "files": f"data.paths={list(d.paths)}", "hub": f"the hub dataset {d.hub_path}"}[d.source]
    if d.mixture:
        data = f"a mixture of {len(d.mixture)} sources"
    logger.print(f"run dir   {run_dir}\n"
                 f"layout    {grid.world} process(es) on {engine.device} ({engine.precision}, {engine.name}), pipeline "
                 f"{grid.pp} x data-parallel {grid.dp} x expert-parallel {grid.ep}"
                 f"{f' (context-parallel {grid.cp}: sequences split over {grid.cp} ranks)' if grid.cp > 1 else ''}\n"
                 f"weights   {weights}\n"
                 f"tokenizer {tokenizer.source} ({tokenizer.vocab_size} ids)\n"
                 f"data      {'chat SFT from ' if d.kind == 'sft' else ''}{data}, {d.seq_len}-token sequences")
    if d.mixture:
        t = engine.cfg.trainer
        rows = sum(global_batch_at(s, t, grid.data_size) for s in range(t.max_steps))
        for line in describe_sources(d, rows):
            logger.print(line)
    if trainable["trainable"] != trainable["total"]:
        logger.print(f"training {trainable['trainable']:,} of {trainable['total']:,} parameters on this rank"
                     + (f" (ESFT: {sum(map(len, selection.values()))} experts over {len(selection)} MoE layers)"
                        if selection else ""))


def summarize(progress: Progress, checkpoint: Path, run_dir: Path, exports: dict[str, Path | None],
              wandb_line: str | None, seconds: float, env: DistEnv) -> dict:
    """The run's summary, printed by rank 0 as the last lines of the job."""
    hf_dir, adapter = exports.get("hf"), exports.get("adapter")
    ran = progress.step - progress.start_step
    summary = {"steps": progress.step, "steps_this_launch": ran, "first_loss": progress.first_loss,
               "last_loss": progress.last_loss,
               "checkpoint": str(checkpoint), "metrics": str(run_dir / "metrics.jsonl"),
               "hf_export": str(hf_dir) if hf_dir else None, "adapter": str(adapter) if adapter else None,
               "minutes": seconds / 60}
    if env.is_main:
        steps = (f"{ran} steps" if not progress.start_step else
                 f"{ran} steps this launch ({progress.start_step + 1}-{progress.step}; the run is at step "
                 f"{progress.step})")
        print(f"\ndone: {steps} in {seconds / 60:.1f} min; loss {progress.first_loss:.4f} -> "
              f"{progress.last_loss:.4f}" if progress.first_loss is not None
              else f"\nnothing to do: already at step {progress.step}")
        print(f"  checkpoint   {checkpoint}")
        print(f"  metrics      {run_dir / 'metrics.jsonl'}")
        print(f"  plots        python launch/plot.py {run_dir}  (PNG charts into {run_dir / 'plots'})")
        if hf_dir:
            print(f"  HF export    {hf_dir}  (loads with model.hf.load_pretrained or transformers)")
        if adapter:
            print(f"  LoRA adapter {adapter}  (loads with peft.PeftModel.from_pretrained onto the base model)")
        if wandb_line:
            print(wandb_line)
    return summary


def copy_run_config(run_dir: Path, cfg: TrainConfig) -> None:
    """The resolved config beside the metrics, for humans (checkpoints carry their own copy)."""
    (run_dir / "resolved_config.yaml").write_text(OmegaConf.to_yaml(OmegaConf.structured(cfg)))
