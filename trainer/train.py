"""The training loop, read top to bottom: build everything, resume, then step / log / validate / checkpoint.

`prepare` does everything that can fail on bad input (paths, tokenizer, vocabulary, which checkpoint to resume) before
any process group exists. One optimizer step: draw the step's micro-batches, backpropagate each one's share of the
loss (its summed cross-entropy over the supervised tokens of the whole step on all ranks, plus its share of the
balance losses), sum gradients over the data-parallel ranks, clip, and apply the update only if the loss and the
gradient norm are finite (identical on every rank, since both come from reduced values, so all ranks decide alike).
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import random
import time
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path

import torch
from omegaconf import OmegaConf

from data.loader import build_loader, build_tokenizer, epoch_rows
from data.sources import expand_globs
from data.tokenizer import TextTokenizer
from model import CausalLM, ModelConfig
from model.flops import training_flops_per_token
from model.hf import hf_tensors, remove_weights, save_pretrained, write_metadata, write_shard
from model.loss import IGNORE_INDEX

from .checkpoint import (choose_resume, load_checkpoint, load_model_weights, resume_plan, save_checkpoint,
                         set_aside_newer)
from .config import NonFiniteError, TrainConfig, stop_if_non_finite
from .deepspeed_engine import (DeepSpeedStep, gathered, initialize, load_engine_state, partitioned,
                               refresh_master_weights, save_engine_state)
from .distributed import DistEnv, all_reduce_sum, barrier, init_process_group, pick_device
from .expert_parallel import (ProcessGrid, attach_dispatchers, broadcast_replicas, build_grid, clip_grad_norm,
                              reduce_gradients)
from .metrics import MetricsLogger, Throughput, device_peak_tflops, load_imbalance, peak_memory_gib
from .esft import apply_trainable
from .optim import build_optimizer, global_batch_at, lr_at
from .pipeline import build_pipeline, pipeline_step, pipeline_validate

MODEL_INPUTS = ("input_ids", "position_ids", "document_ids")


@dataclass
class StepResult:
    loss: float
    aux_loss: float
    balance: dict[str, float]
    grad_norm: float
    skipped: bool
    tokens: int
    tokens_per_expert: torch.Tensor | None  # (MoE layers, experts), summed over ranks
    bad_records: int  # skipped input records so far, summed over ranks
    dropped_copies: int  # token copies dropped by the capacity limit this step, summed over ranks


def config_dict(cfg: TrainConfig) -> dict:
    return OmegaConf.to_container(OmegaConf.structured(cfg), resolve=True, enum_to_str=True)


def fit_model_to_tokenizer(model_cfg: ModelConfig, tokenizer: TextTokenizer, tokenizer_key: str) -> ModelConfig:
    """The model's embedding must cover every id the tokenizer produces; BOS/EOS ids follow the tokenizer."""
    if tokenizer.vocab_size > model_cfg.vocab_size:
        raise ValueError(f"model.vocab_size={model_cfg.vocab_size} is smaller than the tokenizer's vocabulary "
                         f"({tokenizer.vocab_size} ids, {tokenizer_key}); use a larger model.vocab_size")
    return model_cfg.replace(bos_token_id=tokenizer.bos_id, eos_token_id=tokenizer.eos_id)


@dataclass
class Prepared:
    """The checked inputs of a run: config (model fitted to the tokenizer), tokenizer, checkpoint to resume."""

    cfg: TrainConfig
    tokenizer: TextTokenizer
    resume: Path | None
    set_aside: list[Path]
    esft_selection: dict[int, list[int]] | None = None
    """The experts an ESFT run trains, as stored in the checkpoint it resumes (else chosen before training)."""


def prepare(cfg: TrainConfig, env: DistEnv) -> Prepared:
    """Validate everything that depends on files before any process group starts; raises ValueError naming the key.
    The built-in BPE is trained here on first use (a file lock lets one rank train it while the others wait)."""
    if cfg.parallel.world_size is not None and cfg.parallel.world_size != env.world_size:
        raise ValueError(f"parallel.world_size={cfg.parallel.world_size}, but {env.world_size} process(es) were "
                         "launched; check the launcher's node and process counts (or drop the key)")
    cfg.validate(env.world_size)
    if cfg.model.pretrained:
        check_pretrained(cfg)
    if cfg.data.source == "files":
        expand_globs(cfg.data.paths)
    if cfg.data.val_paths:
        expand_globs(cfg.data.val_paths, "data.val_paths")
    tokenizer = build_tokenizer(cfg.data)
    cfg.model = fit_model_to_tokenizer(cfg.model, tokenizer, f"data.tokenizer={cfg.data.tokenizer}")
    resume, set_aside = choose_resume(cfg.checkpoint.dir, cfg.checkpoint.resume)
    selection = None
    if resume is not None:  # a checkpoint this layout cannot resume fails here, naming the key to set
        resume_plan(resume, run_layout(cfg, env.world_size), env.world_size, cfg.checkpoint.optimizer_resume,
                    cfg.checkpoint.data_resume)
        saved = json.loads((resume / "train_state.json").read_text(encoding="utf-8")).get("esft_selection")
        if cfg.esft.enabled and saved is not None:
            selection = {int(k): v for k, v in saved.items()}
    return Prepared(cfg, tokenizer, resume, set_aside, selection)


def check_pretrained(cfg: TrainConfig) -> None:
    """`model.pretrained`: its config.json must agree with the composed model config on the architecture (the
    preset's shapes come from the released directory), and `data.tokenizer` defaults to its tokenizer.json."""
    from model.hf import load_config
    directory = Path(os.path.expanduser(cfg.model.pretrained))
    if not (directory / "config.json").is_file():
        raise ValueError(f"model.pretrained={cfg.model.pretrained}: no config.json there (a released-layout "
                         "directory is expected: config.json + safetensors)")
    released = load_config(directory)
    diffs = cfg.model.architecture_differences(released)
    if diffs:
        listed = "; ".join(f"model.{f}={ours!r} but config.json has {theirs!r}" for f, ours, theirs in diffs[:4])
        raise ValueError(f"model.pretrained={cfg.model.pretrained}: {listed}"
                         f"{f' (and {len(diffs) - 4} more)' if len(diffs) > 4 else ''}; compose the matching "
                         "preset (e.g. model=v2_lite) and drop the conflicting overrides")
    if not cfg.data.tokenizer and (directory / "tokenizer.json").is_file():
        cfg.data.tokenizer = str(directory)


def steps_per_epoch(cfg: TrainConfig, tokenizer: TextTokenizer, grid: ProcessGrid, device: torch.device) -> int:
    """Optimizer steps in one pass over the training data: the packed rows of each rank's pass (counted by reading
    and tokenizing it once), the smallest over data-parallel ranks, per micro-batch and accumulation step."""
    rows = torch.tensor(float(epoch_rows(cfg.data, tokenizer, cfg.trainer.seed, grid.dp_rank, grid.dp)),
                        device=device)
    if grid.world > 1:
        torch.distributed.all_reduce(rows, op=torch.distributed.ReduceOp.MIN)
    accumulation = cfg.trainer.global_batch_size // (cfg.trainer.micro_batch_size * grid.dp)
    return max(1, int(rows) // cfg.trainer.micro_batch_size // accumulation)


def choose_experts(cfg: TrainConfig, model: CausalLM, tokenizer: TextTokenizer, grid: ProcessGrid,
                   device: torch.device, run_dir: Path, env: DistEnv) -> dict[int, list[int]]:
    """ESFT: score the experts on the first `esft.sample_batches` micro-batches of each rank's training data."""
    from .esft import esft_selection
    loader = build_loader(cfg.data, tokenizer, cfg.trainer.micro_batch_size, cfg.trainer.seed, grid.dp_rank, grid.dp)
    try:
        batches = [next(loader) for _ in range(cfg.esft.sample_batches)]
    finally:
        loader.close()
    selection, relevance = esft_selection(model, batches, cfg.esft, device, grid.dp_group)
    if env.is_main:
        (run_dir / "esft_selection.json").write_text(json.dumps(
            {"score": cfg.esft.score, "threshold": cfg.esft.threshold, "selection": selection,
             "relevance": relevance}, indent=1))
    return selection


def load_pretrained_weights(cfg: TrainConfig, model: torch.nn.Module) -> None:
    """The released weights into this rank's model: only the tensors it holds (its experts, its pipeline stage)."""
    from model.hf import load_pretrained
    load_pretrained(os.path.expanduser(cfg.model.pretrained), model=model)


def run_layout(cfg: TrainConfig, world_size: int) -> dict:
    """What DeepSpeed's optimizer partitions depend on, recorded in every checkpoint."""
    pp = cfg.parallel.pp
    return {"engine": "deepspeed" if cfg.uses_deepspeed else "builtin", "zero_stage": cfg.resolved_zero_stage(),
            "pp": pp, "dp": world_size // pp, "ep": cfg.expert_parallel_size(world_size)}


def _fault_scale(step: int, env: DistEnv) -> float:
    """Test-only: LATENTMOE_FAULT=nan_loss@<step>[:rank] makes that step's loss NaN on that rank."""
    where, _, rest = os.environ.get("LATENTMOE_FAULT", "").partition("@")
    if where != "nan_loss":
        return 1.0
    at_step, _, rank = rest.partition(":")
    return float("nan") if int(at_step) == step and (not rank or int(rank) == env.rank) else 1.0


class NativeStep:
    """The built-in engine: plain data parallelism with exact gradient sums (dense over dp, experts over edp)."""

    def __init__(self, model: CausalLM, optimizer: torch.optim.Optimizer, grid: ProcessGrid, cfg: TrainConfig):
        self.model, self.optimizer, self.grid, self.cfg = model, optimizer, grid, cfg

    def forward(self, **kwargs):
        return self.model(**kwargs)

    def set_lr(self, lr: float) -> None:
        for group in self.optimizer.param_groups:
            group["lr"] = lr

    def backward(self, loss: torch.Tensor, accumulation: int) -> None:
        loss.backward()

    def finish(self, loss_value: float, step: int) -> tuple[float, bool]:
        """Reduce, clip and apply the update unless the loss or the gradient norm is non-finite (the same decision
        on every rank: both come from reduced values). Returns (norm before clipping, skipped)."""
        reduce_gradients(self.model, self.grid)
        max_norm = self.cfg.optim.grad_clip if self.cfg.optim.grad_clip > 0 else float("inf")
        grad_norm = clip_grad_norm(self.model, max_norm, self.grid)
        skipped = not (math.isfinite(loss_value) and math.isfinite(grad_norm))
        stop_if_non_finite(skipped, step, loss_value, grad_norm, self.cfg.trainer.non_finite)
        if not skipped:
            self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        return grad_norm, skipped


def draw_batches(step: int, loader, cfg: TrainConfig, grid: ProcessGrid) -> list[dict]:
    """This rank's micro-batches of optimizer step `step` (more of them while the batch size ramps up)."""
    accumulation = global_batch_at(step, cfg.trainer, grid.dp) // (cfg.trainer.micro_batch_size * grid.dp)
    return [next(loader) for _ in range(accumulation)]


def train_step(step: int, stepper, batches: list[dict], cfg: TrainConfig, env: DistEnv, grid: ProcessGrid,
               device: torch.device, autocast, bad_records: int = 0) -> StepResult:
    """One optimizer step over this rank's micro-batches, through `stepper` (NativeStep or DeepSpeedStep)."""
    accumulation = len(batches)
    supervised = [int((b["labels"] != IGNORE_INDEX).sum()) for b in batches]
    global_supervised = all_reduce_sum(torch.tensor(float(sum(supervised)), device=device), env).item()
    stepper.set_lr(lr_at(step, cfg.optim, cfg.trainer.max_steps))

    moe_layers = stepper.model.moe_layers()
    n_experts = moe_layers[0].n_experts if moe_layers else 0
    # Reduced once per step: [CE sum, aux loss, 3 balance terms, bad records so far, dropped copies,
    # tokens per expert of every MoE layer].
    stats = torch.zeros(7 + len(moe_layers) * n_experts, device=device, dtype=torch.float64)
    stats[5] = bad_records
    fault = _fault_scale(step, env)
    for batch, n_supervised in zip(batches, supervised):
        inputs = {k: batch[k].to(device, non_blocking=True) for k in MODEL_INPUTS if k in batch}
        labels = batch["labels"].to(device, non_blocking=True)
        with autocast:
            out = stepper.forward(**inputs, labels=labels)
        ce_sum = out.loss * n_supervised * fault
        # Gradients are summed over ranks: the step minimises sum(CE) over all supervised tokens / their number, plus
        # the balance losses averaged over micro-batches and ranks.
        loss = ce_sum / max(global_supervised, 1.0)
        if out.aux_loss is not None:
            loss = loss + out.aux_loss / (accumulation * grid.dp)
            stats[1] += out.aux_loss.detach().double() / accumulation / grid.dp
            for i, name in enumerate(("expert", "device", "comm")):  # logged as the mean over MoE layers
                stats[2 + i] += out.balance[name].double() / (accumulation * grid.dp * len(moe_layers))
        stepper.backward(loss, accumulation)
        stats[0] += ce_sum.detach().double()
        if moe_layers:
            dropped = [s.dropped for s in out.routing if s.dropped is not None]
            if dropped:
                stats[6] += torch.stack(dropped).sum().double()
            stats[7:] += torch.cat([s.tokens_per_expert for s in out.routing]).double()

    all_reduce_sum(stats, env)
    loss_value = float(stats[0]) / max(global_supervised, 1.0)
    grad_norm, skipped = stepper.finish(loss_value, step)
    return step_result(stats, loss_value, grad_norm, skipped, batches, grid, len(moe_layers), n_experts)


def step_result(stats: torch.Tensor, loss: float, grad_norm: float, skipped: bool, batches: list[dict],
                grid: ProcessGrid, n_moe_layers: int, n_experts: int) -> StepResult:
    """The StepResult of a step whose reduced `stats` are [CE sum, aux loss, 3 balance terms, bad records, dropped
    copies, tokens per expert of every MoE layer] (both engines' steps fill them so)."""
    tokens = int(sum(b["input_ids"].numel() for b in batches)) * grid.dp
    load = stats[7:].view(n_moe_layers, n_experts).float().cpu() if n_moe_layers else None
    return StepResult(loss, float(stats[1]), {n: float(stats[2 + i]) for i, n in
                                              enumerate(("expert", "device", "comm"))},
                      grad_norm, skipped, tokens, load, int(stats[5]), int(stats[6]))


@torch.no_grad()
def validate(model: CausalLM, batches: list[dict], env: DistEnv, device: torch.device, autocast) -> float:
    """Token-weighted mean cross-entropy over the held-out batches of every rank."""
    model.eval()
    total = torch.zeros(2, device=device, dtype=torch.float64)
    for batch in batches:
        inputs = {k: batch[k].to(device) for k in MODEL_INPUTS if k in batch}
        labels = batch["labels"].to(device)
        with autocast:
            out = model(**inputs, labels=labels)
        n = float((labels != IGNORE_INDEX).sum())
        total += torch.tensor([float(out.loss) * n, n], device=device, dtype=torch.float64)
    model.train()
    all_reduce_sum(total, env)
    return float(total[0] / total[1].clamp(min=1))


def export_hf(model: CausalLM, tokenizer: TextTokenizer, out: Path, grid: ProcessGrid) -> Path | None:
    """Hugging Face directory (collective): weights and config.json in the released layout, tokenizer.json and a
    tokenizer_config.json. With experts sharded or pipeline stages, each (stage, EP rank) writes one shard
    (`model-0000k-of-0000n`): the stage's first data-parallel rank its dense tensors, the first expert-data-parallel
    replica its experts; rank 0 writes the index over all of them. No process ever holds the whole model. `model`
    is the CausalLM, or a pipeline stage's view of its part. Returns the directory on rank 0."""
    dtype = getattr(torch, model.config.torch_dtype or "float32")
    if grid.ep == 1 and grid.pp == 1:
        if grid.rank == 0:
            save_pretrained(model, out, dtype=dtype)
    else:
        if grid.rank == 0:
            remove_weights(out)
        barrier_grid(grid)
        sizes = {}
        dense, experts = grid.dp_rank == 0, grid.edp_rank == 0
        if (dense or experts) and any(True for _ in hf_tensors(model, dense=dense, experts=experts)):
            index, n_files = (grid.rank // grid.dp) * grid.ep + grid.ep_rank, grid.pp * grid.ep
            filename = f"model-{index + 1:05d}-of-{n_files:05d}.safetensors"
            sizes = {name: (filename, n) for name, n in write_shard(model, out, filename, dtype, dense=dense,
                                                                    experts=experts).items()}
        gathered = [None] * grid.world
        torch.distributed.all_gather_object(gathered, sizes)
        if grid.rank == 0:
            merged = {name: entry for part in gathered for name, entry in part.items()}
            write_metadata(model.config, out, {n: f for n, (f, _) in merged.items()},
                           sum(size for _, size in merged.values()), dtype)
    if grid.rank != 0:
        return None
    tokenizer.save(out / "tokenizer.json")
    names = {"bos_token": tokenizer.bos_id, "eos_token": tokenizer.eos_id, "pad_token": tokenizer.pad_id}
    (out / "tokenizer_config.json").write_text(json.dumps(
        {k: tokenizer.tokenizer.id_to_token(v) for k, v in names.items() if v is not None}, indent=2))
    return out


def barrier_grid(grid: ProcessGrid) -> None:
    if grid.world > 1:
        torch.distributed.barrier()


def dispatch_metrics(dispatchers: list, env: DistEnv, device: torch.device) -> dict:
    """Distinct ranks each token's copies went to (mean and max over ranks and MoE layers) and bytes sent to other
    ranks per token, since the last log step; resets the counters. Collective: every rank calls it, also a pipeline
    stage without MoE layers (no dispatchers)."""
    sums = torch.tensor([float(sum(d.stats.tokens for d in dispatchers)),
                         float(sum(torch.as_tensor(d.stats.ranks_sum).item() for d in dispatchers)),
                         float(sum(d.stats.rows_sent_remote * d.stats.row_bytes for d in dispatchers))],
                        device=device, dtype=torch.float64)
    peak = torch.tensor(float(max((torch.as_tensor(d.stats.ranks_max).item() for d in dispatchers), default=0)),
                        device=device)
    all_reduce_sum(sums, env)
    if env.distributed:
        torch.distributed.all_reduce(peak, op=torch.distributed.ReduceOp.MAX)
    for d in dispatchers:
        d.stats.reset()
    tokens = max(float(sums[0]), 1.0)
    return {"ranks_per_token_mean": float(sums[1]) / tokens, "ranks_per_token_max": int(peak),
            "a2a_bytes_per_token": float(sums[2]) / tokens}


def train(prepared: Prepared, run_dir: Path, env: DistEnv) -> dict:
    t_start = time.time()
    cfg, tokenizer, model_cfg = prepared.cfg, prepared.tokenizer, prepared.cfg.model
    resume = str(prepared.resume or "")
    device = pick_device(cfg.trainer.device, env)
    init_process_group(env, device, cfg.parallel.backend, cfg.parallel.timeout_s, single=cfg.uses_deepspeed)
    precision = cfg.trainer.precision if cfg.trainer.precision != "auto" else (
        "bf16" if device.type == "cuda" else "fp32")
    # bf16: autocast over fp32 weights in the built-in engine; DeepSpeed keeps bf16 weights and fp32 master copies.
    autocast = torch.autocast(device.type, dtype=torch.bfloat16) if precision == "bf16" and not cfg.uses_deepspeed \
        else nullcontext()
    random.seed(cfg.trainer.seed)
    torch.manual_seed(cfg.trainer.seed)  # identical dense weights on every rank; experts seed themselves
    grid = build_grid(env, cfg.parallel.pp, cfg.expert_parallel_size(env.world_size))

    pipe, ds_engine, selection = None, None, prepared.esft_selection
    if cfg.trainer.epochs is not None:
        per_epoch = steps_per_epoch(cfg, tokenizer, grid, device)
        cfg.trainer.max_steps = max(1, int(cfg.trainer.epochs * per_epoch))
        if env.is_main:
            print(f"trainer.epochs={cfg.trainer.epochs:g}: {cfg.trainer.max_steps} steps ({per_epoch} per epoch)")
    start_pretrained = bool(model_cfg.pretrained) and not resume  # a resumed run has its own weights
    accumulation = global_batch_at(0, cfg.trainer, grid.dp) // (cfg.trainer.micro_batch_size * grid.dp)
    if grid.pp > 1:  # this rank builds only its stage's layers; `model` is the stage's view under CausalLM names
        trainable: dict = {}  # partial fine-tuning is refused with pipelines (config validation)
        pipe = build_pipeline(cfg, grid, accumulation, precision, device,
                              before_engine=(lambda view: load_pretrained_weights(cfg, view)) if start_pretrained
                              else None)
        model, ds_engine, stepper = pipe.view, pipe.engine, None
        dispatchers = [m.dispatcher for m in model.moe_layers()] if grid.ep > 1 else []
        optimizer = ds_engine.optimizer
    else:
        expert_shard = grid.expert_shard(model_cfg.n_routed_experts) if grid.ep > 1 else None
        model = CausalLM(model_cfg, expert_shard=expert_shard).to(device)
        dispatchers = attach_dispatchers(model, grid) if grid.ep > 1 else []
        model.set_token_dropping(cfg.moe.capacity_factor, cfg.moe.no_drop_fraction)
        model.train()
        if start_pretrained:  # before DeepSpeed copies (ZeRO masters) or partitions (ZeRO-3) the weights
            load_pretrained_weights(cfg, model)
        model.activation_checkpointing = cfg.trainer.activation_checkpointing
        if cfg.esft.enabled and selection is None:
            if resume:  # score the experts of the weights training starts from, not of the initial ones
                load_model_weights(Path(resume), model)
            selection = choose_experts(cfg, model, tokenizer, grid, device, run_dir, env)
        trainable = apply_trainable(model, cfg.trainer.trainable, selection if cfg.esft.enabled else None)
        if cfg.uses_deepspeed:
            ds_engine = initialize(model, cfg, grid, accumulation, precision)
            stepper = DeepSpeedStep(ds_engine, grid, cfg)
            optimizer = ds_engine.optimizer
        else:
            optimizer = build_optimizer(model, cfg.optim)
            stepper = NativeStep(model, optimizer, grid, cfg)
    loader = build_loader(cfg.data, tokenizer, cfg.trainer.micro_batch_size, cfg.trainer.seed, grid.dp_rank,
                          grid.dp)
    val_loader = build_loader(cfg.data, tokenizer, cfg.trainer.micro_batch_size, cfg.trainer.seed, grid.dp_rank,
                              grid.dp, split="val") if cfg.trainer.val_every else None
    val_batches = [next(val_loader) for _ in range(cfg.trainer.val_batches)] if val_loader else []
    if val_loader:
        val_loader.close()

    step, tokens_seen, skipped = 0, 0, 0
    if env.is_main:
        for path in prepared.set_aside:  # a rollback: newer checkpoints of the abandoned timeline are kept aside
            print(f"resuming from an older checkpoint: {path} moved to {set_aside_newer(path)}")
    barrier(env)
    layout = run_layout(cfg, env.world_size)
    if resume:
        train_state, data_state, restored = load_checkpoint(
            Path(resume), model, None if ds_engine else optimizer, env, cfg.checkpoint.data_resume, layout,
            cfg.checkpoint.optimizer_resume,
            engine_state=(lambda p: load_engine_state(ds_engine, p)) if ds_engine else None,
            engine_has_weights=partitioned(ds_engine),
            weights_context=lambda: gathered(ds_engine, model, modifier_rank=0))
        if ds_engine is not None and not restored:
            # Weights only (or a fresh optimizer): ZeRO's fp32 copies were made from the initial weights. (When
            # DeepSpeed restored its own state, its fp32 copies are exact and must not be rebuilt from bf16.)
            refresh_master_weights(ds_engine)
        if not train_state.get("weights_only"):
            step, tokens_seen, skipped = train_state["step"], train_state["tokens_seen"], train_state["skipped"]
        if data_state is not None:
            loader.load_state_dict(data_state)
    elif ds_engine is None:  # DeepSpeed's engine broadcast the replicas when it was built
        broadcast_replicas(model, grid)

    logger = MetricsLogger(run_dir, cfg.logging, cfg.trainer.max_steps, step, env.is_main, config_dict(cfg),
                           cfg.trainer.progress)
    engine_name = f"DeepSpeed ZeRO-{cfg.resolved_zero_stage()}" if ds_engine else "built-in engine"
    logger.print(f"run dir {run_dir} | {env.world_size} process(es) on {device} ({precision}, {engine_name}), "
                 f"pipeline {grid.pp} x data-parallel {grid.dp} x expert-parallel {grid.ep} | "
                 f"{'resumed from ' + resume if resume else 'fresh start'} at step {step} | "
                 f"tokenizer {tokenizer.source} ({tokenizer.vocab_size} ids)")
    if trainable.get("trainable", 0) != trainable.get("total", 0):
        logger.print(f"training {trainable['trainable']:,} of {trainable['total']:,} parameters on this rank"
                     + (f" (ESFT: {sum(map(len, selection.values()))} experts over {len(selection)} MoE layers)"
                        if selection else ""))
    flops_per_token = training_flops_per_token(model_cfg, cfg.data.seq_len)
    peak = cfg.trainer.peak_tflops or device_peak_tflops(device)
    throughput = Throughput()
    moe_layer_ids = [i for i in range(model_cfg.num_hidden_layers) if model_cfg.is_moe_layer(i)]
    last_saved = step if resume else None
    first_loss = last_loss = None
    loop_start, loop_first_step = time.time(), step
    dropped_window = 0  # token copies dropped since the last log line

    def save(at_step: int) -> Path:
        state = {"step": at_step, "tokens_seen": tokens_seen, "skipped": skipped, "world_size": env.world_size,
                 "layout": layout, "config": config_dict(cfg), "time": time.time()}
        if selection is not None:
            state["esft_selection"] = {str(k): v for k, v in selection.items()}
        with gathered(ds_engine, model):  # ZeRO-3: whole weights for the weight files
            return save_checkpoint(cfg.checkpoint.dir, at_step, model, None if ds_engine else optimizer, state,
                                   loader.state_dict(), env, cfg.checkpoint.keep, tokenizer=tokenizer.tokenizer,
                                   owns_dense=grid.dp_rank == 0, owns_experts=grid.edp_rank == 0,
                                   extra_save=(lambda p: save_engine_state(ds_engine, p)) if ds_engine else None)

    try:
        while step < cfg.trainer.max_steps:
            step_start = time.perf_counter()
            batches = draw_batches(step, loader, cfg, grid)
            bad = sum(loader.bad_records["counts"].values())
            if pipe is not None:
                result = pipeline_step(step, pipe, batches, cfg, env, grid, device, bad, _fault_scale(step, env))
            else:
                result = train_step(step, stepper, batches, cfg, env, grid, device, autocast, bad)
            step += 1
            tokens_seen += result.tokens
            skipped += result.skipped
            throughput.add(result.tokens, time.perf_counter() - step_start)
            dropped_window += result.dropped_copies
            logger.advance()
            if result.skipped:
                logger.print(f"step {step}: non-finite loss or gradient, update skipped ({skipped} so far)")
                if skipped > cfg.trainer.max_skipped_steps:
                    raise NonFiniteError(f"{skipped} updates skipped, more than trainer.max_skipped_steps="
                                         f"{cfg.trainer.max_skipped_steps}")
            first_loss = result.loss if first_loss is None else first_loss
            last_loss = result.loss
            metrics = None
            if step % cfg.trainer.log_every == 0 or step == cfg.trainer.max_steps:
                tokens_per_s = throughput.read()
                metrics = {"loss": result.loss, "aux_loss": result.aux_loss,
                           **{f"balance_{k}": v for k, v in result.balance.items()},
                           "lr": lr_at(step - 1, cfg.optim, cfg.trainer.max_steps), "grad_norm": result.grad_norm,
                           "tokens_per_s": tokens_per_s, "tokens_seen": tokens_seen,
                           "mfu": flops_per_token * tokens_per_s / (peak * 1e12 * env.world_size) if peak else None,
                           "peak_mem_gib": peak_memory_gib(device), "skipped_steps": skipped,
                           "bad_records": result.bad_records,
                           "global_batch": global_batch_at(step - 1, cfg.trainer, grid.dp),
                           "dropped_copies": dropped_window,
                           "eta_s": (time.time() - loop_start) / (step - loop_first_step) * (cfg.trainer.max_steps - step)}
                if result.tokens_per_expert is not None:
                    metrics["load_imbalance"], metrics["load_imbalance_per_layer"] = load_imbalance(
                        result.tokens_per_expert)
                if grid.ep > 1:
                    metrics.update(dispatch_metrics(dispatchers, env, device))
                dropped_window = 0
            if val_batches and (step % cfg.trainer.val_every == 0 or step == cfg.trainer.max_steps):
                val_loss = (pipeline_validate(pipe, val_batches, env, device) if pipe is not None else
                            validate(model, val_batches, env, device, autocast))
                metrics = metrics or {"loss": result.loss}
                metrics.update(val_loss=val_loss, val_ppl=math.exp(min(val_loss, 50.0)))
            if metrics is not None:
                logger.log(step, metrics, result.tokens_per_expert, moe_layer_ids)
            if cfg.checkpoint.every and step % cfg.checkpoint.every == 0:
                save(step)
                last_saved = step
        checkpoint = save(step) if last_saved != step else Path(cfg.checkpoint.dir) / f"step_{step:08d}"
        with gathered(ds_engine, model) if cfg.checkpoint.export_hf else contextlib.nullcontext():
            hf_dir = export_hf(model, tokenizer, run_dir / "hf", grid) if cfg.checkpoint.export_hf else None
        barrier(env)
    finally:
        loader.close()
        logger.close()

    summary = {"steps": step, "first_loss": first_loss, "last_loss": last_loss, "checkpoint": str(checkpoint),
               "metrics": str(run_dir / "metrics.jsonl"), "hf_export": str(hf_dir) if hf_dir else None,
               "minutes": (time.time() - t_start) / 60}
    if env.is_main:
        print(f"\ndone: {step} steps in {summary['minutes']:.1f} min; loss {first_loss} -> {last_loss}" if first_loss
              is not None else f"\nnothing to do: already at step {step}")
        print(f"  checkpoint   {checkpoint}")
        print(f"  metrics      {run_dir / 'metrics.jsonl'}")
        if hf_dir:
            print(f"  HF export    {hf_dir}  (loads with model.hf.load_pretrained or transformers)")
    return summary


def copy_run_config(run_dir: Path, cfg: TrainConfig) -> None:
    """The resolved config beside the metrics, for humans (checkpoints carry their own copy)."""
    (run_dir / "resolved_config.yaml").write_text(OmegaConf.to_yaml(OmegaConf.structured(cfg)))


__all__ = ["Prepared", "copy_run_config", "export_hf", "prepare", "train", "train_step", "validate"]
