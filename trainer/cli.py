"""The Hydra entry point behind `launch/pretrain.py`.

It runs under plain `python` (one process), `torchrun` and the `deepspeed` launcher (whose `--local_rank` argument is
accepted and dropped: the rank comes from the environment). The configuration is composed, typed and validated on
every rank before any process group exists; rank 0's resolved config and run directory are then broadcast, so all
ranks train with the same settings even if their clocks put Hydra's default run directories a second apart.
"""

from __future__ import annotations

import dataclasses
import os
import shutil
import sys
import tempfile
from pathlib import Path

from omegaconf import DictConfig, OmegaConf

from .config import TrainConfig, register_configs
from .distributed import (
    DistEnv,
    broadcast_object,
    env_from_launcher,
    init_process_group,
    pick_device,
    shutdown,
)

CONF_DIR = Path(__file__).resolve().parent.parent / "conf"


def strip_launcher_args(argv: list[str]) -> list[str]:
    """Drop `--local_rank N` / `--local_rank=N` (and the dash spelling) that the deepspeed launcher appends."""
    out, skip = [], False
    for i, arg in enumerate(argv):
        if skip:
            skip = False
            continue
        if arg in ("--local_rank", "--local-rank"):
            skip = True
            if i + 1 < len(argv):
                os.environ.setdefault("LOCAL_RANK", argv[i + 1])
            continue
        if arg.startswith(("--local_rank=", "--local-rank=")):
            os.environ.setdefault("LOCAL_RANK", arg.split("=", 1)[1])
            continue
        out.append(arg)
    return out


def to_train_config(cfg: DictConfig | dict) -> TrainConfig:
    """The typed config (interpolations resolved, enums and nested dataclasses built, ModelConfig validated)."""
    if not isinstance(cfg, DictConfig):
        cfg = OmegaConf.merge(OmegaConf.structured(TrainConfig), cfg)
    _reject_unknown_keys(cfg, TrainConfig, "")
    return OmegaConf.to_object(cfg)


def _reject_unknown_keys(node: DictConfig, schema: type, prefix: str) -> None:
    """Hydra's `+key=value` appends even to typed nodes, and to_object would then drop the key silently."""
    fields = {f.name: f for f in dataclasses.fields(schema)}
    for key in node:
        if key not in fields:
            raise ValueError(f"{prefix}{key}: unknown key; allowed: {', '.join(sorted(fields))}")
        kind = fields[key].default_factory if fields[key].default_factory is not dataclasses.MISSING else None
        if dataclasses.is_dataclass(kind) and isinstance(node[key], DictConfig):
            _reject_unknown_keys(node[key], kind, f"{prefix}{key}.")


def dry_run(cfg: TrainConfig, env: DistEnv) -> None:
    """`trainer.dry_run=true`: validate for the planned world (`parallel.world_size`, else the launched one) and
    print the layout and memory plan. Runs before `prepare`, whose launched-world guard would refuse a plan for a
    bigger job, and creates no process group and no tokenizer."""
    from .plan import format_plan, plan, trainable_slot_params

    world = cfg.parallel.world_size or env.world_size
    cfg.validate(world)
    report = format_plan(plan(cfg, world))
    partial = trainable_slot_params(cfg, cfg.expert_parallel_size(world))
    if partial is not None:  # the same run training everything, for comparison, then as configured
        full = report.replace("memory per rank", "full fine-tuning, memory per rank", 1)
        what = (f"ESFT (assuming {cfg.esft.plan_fraction:.0%} of the experts selected)" if cfg.esft.enabled
                else "trainer.trainable")
        mine = format_plan(plan(cfg, world, partial))
        report = full + "\n" + mine[mine.index("memory per rank"):].replace("memory per rank",
                                                                           f"{what}, memory per rank", 1)
    if env.is_main:
        print(report, flush=True)


def _task(cfg: DictConfig) -> None:
    from hydra.core.hydra_config import HydraConfig

    from .train import Prepared, config_dict, copy_run_config, prepare, train

    env = env_from_launcher()
    try:  # every input error surfaces here, before any process group exists
        train_cfg = to_train_config(cfg)
        if train_cfg.trainer.dry_run:
            return dry_run(train_cfg, env)
        prepared = prepare(train_cfg, env)
    except ValueError as e:
        print(f"config error: {e}", file=sys.stderr)
        raise SystemExit(2) from None
    run_dir = Path(HydraConfig.get().runtime.output_dir)
    device = pick_device(prepared.cfg.trainer.device, env)
    init_process_group(env, device, prepared.cfg.parallel.backend, prepared.cfg.parallel.timeout_s)
    try:
        # Rank 0's resolved config, run dir and resume choice for everyone: the ranks cannot disagree.
        shared = (config_dict(prepared.cfg), str(run_dir), str(prepared.resume or ""),
                  [str(p) for p in prepared.set_aside]) if env.is_main else None
        resolved, run_dir, resume, set_aside = broadcast_object(shared, env)
        run_dir = Path(run_dir)
        prepared = Prepared(to_train_config(resolved), prepared.tokenizer, Path(resume) if resume else None,
                            [Path(p) for p in set_aside])
        if env.is_main:
            run_dir.mkdir(parents=True, exist_ok=True)
            copy_run_config(run_dir, prepared.cfg)
        train(prepared, run_dir, env)
    finally:
        shutdown()


def main(argv: list[str] | None = None) -> None:
    import hydra

    register_configs()
    sys.argv = [sys.argv[0]] + strip_launcher_args(sys.argv[1:] if argv is None else argv)
    env = env_from_launcher()
    scratch = None
    if env.rank > 0:
        # Only rank 0 writes the run directory; the others compose in a scratch directory removed at exit.
        scratch = tempfile.mkdtemp(prefix="latentmoe-hydra-")
        sys.argv += [f"hydra.run.dir={scratch}", "hydra.output_subdir=null", "hydra/job_logging=disabled",
                     "hydra/hydra_logging=disabled"]
    try:
        hydra.main(config_path=str(CONF_DIR), config_name="config", version_base=None)(_task)()
    finally:
        if scratch:
            shutil.rmtree(scratch, ignore_errors=True)
