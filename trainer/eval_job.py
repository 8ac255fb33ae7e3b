"""`launch/evaluate.py`: lm-eval tasks on a training checkpoint (`checkpoint.resume=<step dir>`) or a Hugging Face
directory (`model.pretrained=<dir>`), with the model built as training builds it at the launched layout (ep, pp,
either pipeline engine, ZeRO). The config tree is training's, plus the `eval` node (docs/evaluation.md)."""

from __future__ import annotations

import json
from pathlib import Path

from omegaconf import DictConfig

from data.loader import build_tokenizer
from data.tokenizer import TextTokenizer
from model import ModelConfig

from .build import build_model, load_start_weights
from .checkpoint import load_model_weights
from .cli import model_choices, user_errors
from .config import LoRAConfig, TrainConfig, to_train_config
from .distributed import (DistEnv, barrier, broadcast_object, collective_errors, current, env_from_launcher,
                          init_process_group, pick_device, shutdown)
from .engines import build_engine
from .evaluation import Evaluator, report, require_lm_eval
from .expert_parallel import build_grid
from .lora import apply_lora, lora_settings
from .prepare import ModelChoices, fit_model_to_tokenizer, require_pretrained_tokenizer, resolve_pretrained


def prepare_eval(cfg: TrainConfig, world_size: int, choices: ModelChoices | None
                 ) -> tuple[TrainConfig, TextTokenizer, Path | None]:
    """The model config, tokenizer and checkpoint to evaluate; ValueError naming the key on bad input."""
    require_lm_eval()
    checkpoint = None
    if cfg.checkpoint.resume not in ("auto", "none"):
        if cfg.model.pretrained:
            raise ValueError("model.pretrained and checkpoint.resume both name a model to evaluate: give one")
        checkpoint = Path(cfg.checkpoint.resume).expanduser()
        state_file = checkpoint / "train_state.json"
        if not state_file.is_file():
            raise ValueError(f"checkpoint.resume={cfg.checkpoint.resume}: no train_state.json there (a training "
                             "checkpoint directory, <run dir>/checkpoints/step_N, is expected)")
        state = json.loads(state_file.read_text())
        saved = state["config"]["model"]
        cfg.model = ModelConfig.from_hf_config(saved) if state.get("weights_only") else ModelConfig(**saved)
        cfg.lora = lora_settings(state) or LoRAConfig()  # a LoRA run's checkpoint holds its adapters
        if not cfg.data.tokenizer and (checkpoint / "tokenizer.json").is_file():
            cfg.data.tokenizer = str(checkpoint / "tokenizer.json")  # the run's own tokenizer travels with it
    elif cfg.model.pretrained:
        cfg.model = resolve_pretrained(cfg, choices)
        require_pretrained_tokenizer(cfg)
        cfg.lora = LoRAConfig()  # a merged LoRA export is a plain model
    else:
        raise ValueError("launch/evaluate.py evaluates a trained model: set model.pretrained=<Hugging Face directory> "
                         "or checkpoint.resume=<training checkpoint directory>")
    if not cfg.eval.tasks:
        raise ValueError("eval.tasks: name the tasks to run, e.g. eval.tasks=[stdlib_docstrings] or "
                         "eval.tasks=[hellaswag,arc_easy]")
    # No training step is taken: one micro-batch per rank makes any launched layout a valid batch layout.
    cfg.trainer.global_batch_size = cfg.trainer.micro_batch_size * cfg.data_parallel_size(world_size)
    cfg.trainer.batch_ramp_start = None
    cfg.trainer.compile = False  # request shapes vary from batch to batch: compiling would recompile
    cfg.validate(world_size)
    tokenizer = build_tokenizer(cfg.data)
    cfg.model = fit_model_to_tokenizer(cfg.model, tokenizer, f"data.tokenizer={cfg.data.tokenizer}")
    return cfg, tokenizer, checkpoint


def evaluate(cfg: TrainConfig, tokenizer: TextTokenizer, checkpoint: Path | None, run_dir: Path,
             env: DistEnv) -> bool:
    """Build this rank's part of the model with the weights to judge, run the tasks (collective) and, on rank 0,
    print lm-eval's table and write `eval_results.json` (and the samples). Returns whether every task ran."""
    device = pick_device(cfg.trainer.device, env)
    precision = cfg.trainer.precision if cfg.trainer.precision != "auto" else (
        "bf16" if device.type == "cuda" else "fp32")
    grid = build_grid(env, cfg.parallel.pp, cfg.expert_parallel_size(env.world_size))
    model = build_model(cfg, grid, device, precision)
    if checkpoint is not None:
        if cfg.lora.enabled:
            apply_lora(cfg.lora, model, cfg.trainer.seed)
        load_model_weights(checkpoint, model)
        weights = f"checkpoint {checkpoint}"
    else:
        weights = load_start_weights(cfg, model, None)
    engine = build_engine(model, cfg, grid, env, device, precision)
    if env.is_main:
        print(f"evaluating {weights}\nlayout    {grid.world} process(es) on {device} ({precision}, {engine.name}), "
              f"pipeline {grid.pp} x data-parallel {grid.dp} x expert-parallel {grid.ep}\n"
              f"tasks     {', '.join(cfg.eval.tasks)}", flush=True)
    current.at("eval")
    runs = Evaluator(engine, tokenizer, cfg.eval, cfg.data.cache_dir, cfg.trainer.seed).run()
    if env.is_main:
        report(runs, run_dir, cfg.eval.log_samples)
    barrier(env)
    return all(run.error is None for run in runs)


def eval_task(cfg: DictConfig) -> None:
    from hydra.core.hydra_config import HydraConfig

    env = env_from_launcher()
    with user_errors():  # every input error surfaces here, before any process group exists
        train_cfg, tokenizer, checkpoint = prepare_eval(to_train_config(cfg), env.world_size,
                                                        model_choices(cfg, HydraConfig.get()))
    run_dir = Path(HydraConfig.get().runtime.output_dir)
    device = pick_device(train_cfg.trainer.device, env)
    init_process_group(env, device, train_cfg.parallel.backend, train_cfg.parallel.timeout_s,
                       single=train_cfg.uses_deepspeed)
    try:
        run_dir = Path(broadcast_object(str(run_dir) if env.is_main else None, env))
        if env.is_main:
            run_dir.mkdir(parents=True, exist_ok=True)
        with user_errors(config=False), collective_errors(env):
            complete = evaluate(train_cfg, tokenizer, checkpoint, run_dir, env)
    finally:
        shutdown()
    if not complete:
        raise SystemExit(1)


def one_process_evaluator(hf_dir: Path, eval_overrides: dict, cache_dir: str | Path, device: str = "cpu"):
    """An `Evaluator` over the model of `hf_dir` built as training builds it, in this process (no process group):
    for tests and `launch/bench.py eval`."""
    import torch

    from .distributed import DistEnv
    from .evaluation import Evaluator
    from .prepare import ModelChoices
    cfg = to_train_config({"model": {"pretrained": str(hf_dir)}, "data": {"cache_dir": str(cache_dir)},
                           "eval": eval_overrides, "trainer": {"device": device},
                           "checkpoint": {"dir": str(Path(cache_dir) / "unused-checkpoints"), "resume": "none"},
                           "logging": {"wandb": "disabled"}})
    cfg, tokenizer, _ = prepare_eval(cfg, 1, ModelChoices({}, preset=False))
    env = DistEnv(rank=0, world_size=1, local_rank=0)
    grid = build_grid(env, 1, 1)
    model = build_model(cfg, grid, torch.device(device))
    load_start_weights(cfg, model, None)
    engine = build_engine(model, cfg, grid, env, torch.device(device), "fp32")
    return Evaluator(engine, tokenizer, cfg.eval, cfg.data.cache_dir, cfg.trainer.seed)
