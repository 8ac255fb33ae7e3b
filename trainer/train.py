"""The training loop, read top to bottom: build everything, resume, then step / log / validate / checkpoint.

`prepare` does everything that can fail on bad input (paths, tokenizer, vocabulary, which checkpoint to resume) before
any process group exists. One optimizer step: draw the step's micro-batches, backpropagate each one's share of the
loss (its summed cross-entropy over the supervised tokens of the whole step on all ranks, plus its share of the
balance losses), sum gradients over the data-parallel ranks, clip, and apply the update only if the loss and the
gradient norm are finite (identical on every rank, since both come from reduced values, so all ranks decide alike).
"""

from __future__ import annotations

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

from data.loader import build_loader, build_tokenizer
from data.sources import expand_globs
from data.tokenizer import TextTokenizer
from model import CausalLM, ModelConfig
from model.flops import training_flops_per_token
from model.hf import save_pretrained
from model.loss import IGNORE_INDEX

from .checkpoint import choose_resume, load_checkpoint, save_checkpoint, set_aside_newer
from .config import NonFinite, TrainConfig
from .distributed import (DistEnv, all_reduce_sum, barrier, broadcast_parameters, init_process_group, pick_device,
                          sum_gradients)
from .metrics import MetricsLogger, Throughput, device_peak_tflops, load_imbalance, peak_memory_gib
from .optim import build_optimizer, global_batch_at, lr_at

MODEL_INPUTS = ("input_ids", "position_ids", "document_ids")


class NonFiniteError(RuntimeError):
    pass


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


def prepare(cfg: TrainConfig, env: DistEnv) -> Prepared:
    """Validate everything that depends on files before any process group starts; raises ValueError naming the key.
    The built-in BPE is trained here on first use (a file lock lets one rank train it while the others wait)."""
    cfg.validate(env.world_size)
    if cfg.data.source == "files":
        expand_globs(cfg.data.paths)
    if cfg.data.val_paths:
        expand_globs(cfg.data.val_paths, "data.val_paths")
    tokenizer = build_tokenizer(cfg.data)
    cfg.model = fit_model_to_tokenizer(cfg.model, tokenizer, f"data.tokenizer={cfg.data.tokenizer}")
    resume, set_aside = choose_resume(cfg.checkpoint.dir, cfg.checkpoint.resume)
    return Prepared(cfg, tokenizer, resume, set_aside)


def _fault_scale(step: int, env: DistEnv) -> float:
    """Test-only: LATENTMOE_FAULT=nan_loss@<step>[:rank] makes that step's loss NaN on that rank."""
    where, _, rest = os.environ.get("LATENTMOE_FAULT", "").partition("@")
    if where != "nan_loss":
        return 1.0
    at_step, _, rank = rest.partition(":")
    return float("nan") if int(at_step) == step and (not rank or int(rank) == env.rank) else 1.0


def train_step(step: int, model: CausalLM, optimizer: torch.optim.Optimizer, loader, cfg: TrainConfig,
               env: DistEnv, device: torch.device, autocast) -> StepResult:
    accumulation = global_batch_at(step, cfg.trainer, env.world_size) // (cfg.trainer.micro_batch_size *
                                                                            env.world_size)
    batches = [next(loader) for _ in range(accumulation)]
    supervised = [int((b["labels"] != IGNORE_INDEX).sum()) for b in batches]
    global_supervised = all_reduce_sum(torch.tensor(float(sum(supervised)), device=device), env).item()
    lr = lr_at(step, cfg.optim, cfg.trainer.max_steps)
    for group in optimizer.param_groups:
        group["lr"] = lr

    moe_layers = model.moe_layers()
    n_experts = moe_layers[0].n_experts if moe_layers else 0
    # Reduced once per step: [CE sum, aux loss, 3 balance terms, bad records so far, tokens per expert per MoE layer].
    stats = torch.zeros(6 + len(moe_layers) * n_experts, device=device, dtype=torch.float64)
    stats[5] = sum(loader.bad_records["counts"].values())
    fault = _fault_scale(step, env)
    for batch, n_supervised in zip(batches, supervised):
        inputs = {k: batch[k].to(device, non_blocking=True) for k in MODEL_INPUTS if k in batch}
        labels = batch["labels"].to(device, non_blocking=True)
        with autocast:
            out = model(**inputs, labels=labels)
        ce_sum = out.loss * n_supervised * fault
        # Gradients are summed over ranks: the step minimises sum(CE) over all supervised tokens / their number, plus
        # the balance losses averaged over micro-batches and ranks.
        loss = ce_sum / max(global_supervised, 1.0)
        if out.aux_loss is not None:
            loss = loss + out.aux_loss / (accumulation * env.world_size)
            stats[1] += out.aux_loss.detach().double() / accumulation / env.world_size
            for i, name in enumerate(("expert", "device", "comm")):  # logged as the mean over MoE layers
                stats[2 + i] += out.balance[name].double() / (accumulation * env.world_size * len(moe_layers))
        loss.backward()
        stats[0] += ce_sum.detach().double()
        if moe_layers:
            stats[6:] += torch.cat([s.tokens_per_expert for s in out.routing]).double()

    params = [p for p in model.parameters() if p.requires_grad]
    sum_gradients(params, env)
    all_reduce_sum(stats, env)
    max_norm = cfg.optim.grad_clip if cfg.optim.grad_clip > 0 else float("inf")
    grad_norm = float(torch.nn.utils.clip_grad_norm_(params, max_norm))
    loss_value = float(stats[0]) / max(global_supervised, 1.0)
    skipped = not (math.isfinite(loss_value) and math.isfinite(grad_norm))
    if skipped and cfg.trainer.non_finite == NonFinite.stop:
        raise NonFiniteError(f"step {step + 1}: non-finite loss ({loss_value}) or gradient norm ({grad_norm}); "
                             "no update was applied (trainer.non_finite=stop)")
    if not skipped:
        optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    tokens = int(sum(b["input_ids"].numel() for b in batches)) * env.world_size
    load = stats[6:].view(len(moe_layers), n_experts).float().cpu() if moe_layers else None
    return StepResult(loss_value, float(stats[1]), {n: float(stats[2 + i]) for i, n in
                                                     enumerate(("expert", "device", "comm"))},
                      grad_norm, skipped, tokens, load, int(stats[5]))


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


def export_hf(model: CausalLM, tokenizer: TextTokenizer, out: Path) -> Path:
    """Hugging Face directory: weights and config (model.hf), tokenizer.json and a tokenizer_config.json."""
    save_pretrained(model, out, dtype=getattr(torch, model.config.torch_dtype or "float32"))
    tokenizer.save(out / "tokenizer.json")
    names = {"bos_token": tokenizer.bos_id, "eos_token": tokenizer.eos_id, "pad_token": tokenizer.pad_id}
    (out / "tokenizer_config.json").write_text(json.dumps(
        {k: tokenizer.tokenizer.id_to_token(v) for k, v in names.items() if v is not None}, indent=2))
    return out


def train(prepared: Prepared, run_dir: Path, env: DistEnv) -> dict:
    t_start = time.time()
    cfg, tokenizer, model_cfg = prepared.cfg, prepared.tokenizer, prepared.cfg.model
    resume = str(prepared.resume or "")
    device = pick_device(cfg.trainer.device, env)
    init_process_group(env, device, cfg.parallel.backend, cfg.parallel.timeout_s)
    precision = cfg.trainer.precision if cfg.trainer.precision != "auto" else (
        "bf16" if device.type == "cuda" else "fp32")
    autocast = torch.autocast(device.type, dtype=torch.bfloat16) if precision == "bf16" else nullcontext()
    random.seed(cfg.trainer.seed)
    torch.manual_seed(cfg.trainer.seed)  # identical initial weights on every rank (and broadcast below)

    model = CausalLM(model_cfg).to(device)
    model.train()
    optimizer = build_optimizer(model, cfg.optim)
    loader = build_loader(cfg.data, tokenizer, cfg.trainer.micro_batch_size, cfg.trainer.seed, env.rank,
                          env.world_size)
    val_loader = build_loader(cfg.data, tokenizer, cfg.trainer.micro_batch_size, cfg.trainer.seed, env.rank,
                              env.world_size, split="val") if cfg.trainer.val_every else None
    val_batches = [next(val_loader) for _ in range(cfg.trainer.val_batches)] if val_loader else []
    if val_loader:
        val_loader.close()

    step, tokens_seen, skipped = 0, 0, 0
    if env.is_main:
        for path in prepared.set_aside:  # a rollback: newer checkpoints of the abandoned timeline are kept aside
            print(f"resuming from an older checkpoint: {path} moved to {set_aside_newer(path)}")
    barrier(env)
    if resume:
        train_state, data_state = load_checkpoint(Path(resume), model, optimizer, env)
        if data_state is not None:
            loader.load_state_dict(data_state)
            step, tokens_seen, skipped = train_state["step"], train_state["tokens_seen"], train_state["skipped"]
    else:
        broadcast_parameters(model, env)

    logger = MetricsLogger(run_dir, cfg.logging, cfg.trainer.max_steps, step, env.is_main, config_dict(cfg),
                           cfg.trainer.progress)
    logger.print(f"run dir {run_dir} | {env.world_size} process(es) on {device} ({precision}) | "
                 f"{'resumed from ' + resume if resume else 'fresh start'} at step {step} | "
                 f"tokenizer {tokenizer.source} ({tokenizer.vocab_size} ids)")
    flops_per_token = training_flops_per_token(model_cfg, cfg.data.seq_len)
    peak = cfg.trainer.peak_tflops or device_peak_tflops(device)
    throughput = Throughput()
    moe_layer_ids = [i for i, layer in enumerate(model.model.layers) if layer.is_moe]
    last_saved = step if resume else None
    first_loss = last_loss = None
    loop_start, loop_first_step = time.time(), step

    def save(at_step: int) -> Path:
        state = {"step": at_step, "tokens_seen": tokens_seen, "skipped": skipped, "world_size": env.world_size,
                 "config": config_dict(cfg), "time": time.time()}
        return save_checkpoint(cfg.checkpoint.dir, at_step, model, optimizer, state, loader.state_dict(), env,
                               cfg.checkpoint.keep, tokenizer=tokenizer.tokenizer)

    try:
        while step < cfg.trainer.max_steps:
            step_start = time.perf_counter()
            result = train_step(step, model, optimizer, loader, cfg, env, device, autocast)
            step += 1
            tokens_seen += result.tokens
            skipped += result.skipped
            throughput.add(result.tokens, time.perf_counter() - step_start)
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
                           "global_batch": global_batch_at(step - 1, cfg.trainer, env.world_size),
                           "eta_s": (time.time() - loop_start) / (step - loop_first_step) * (cfg.trainer.max_steps - step)}
                if result.tokens_per_expert is not None:
                    metrics["load_imbalance"], metrics["load_imbalance_per_layer"] = load_imbalance(
                        result.tokens_per_expert)
            if val_batches and (step % cfg.trainer.val_every == 0 or step == cfg.trainer.max_steps):
                val_loss = validate(model, val_batches, env, device, autocast)
                metrics = metrics or {"loss": result.loss}
                metrics.update(val_loss=val_loss, val_ppl=math.exp(min(val_loss, 50.0)))
            if metrics is not None:
                logger.log(step, metrics, result.tokens_per_expert, moe_layer_ids)
            if cfg.checkpoint.every and step % cfg.checkpoint.every == 0:
                save(step)
                last_saved = step
        checkpoint = save(step) if last_saved != step else Path(cfg.checkpoint.dir) / f"step_{step:08d}"
        hf_dir = None
        if cfg.checkpoint.export_hf and env.is_main:
            hf_dir = export_hf(model, tokenizer, run_dir / "hf")
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


__all__ = ["Prepared", "prepare", "train", "train_step", "validate", "export_hf", "copy_run_config"]
