"""The Hydra entry point behind `launch/pretrain.py`.

It runs under plain `python` (one process), `torchrun` and the `deepspeed` launcher (whose `--local_rank` argument is
accepted and dropped: the rank comes from the environment). The configuration is composed, typed and validated on
every rank before any process group exists; rank 0's resolved config and run directory are then broadcast, so all
ranks train with the same settings even if their clocks put Hydra's default run directories a second apart.
"""

from __future__ import annotations

import contextlib
import dataclasses
import difflib
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

from omegaconf import DictConfig, OmegaConf

from model import ModelConfig

from .config import TrainConfig, register_configs, to_train_config
from .prepare import ModelChoices, resolve_pretrained
from .presets import CONF_DIR
from .runlock import lock_run
from .distributed import (
    DistEnv,
    broadcast_object,
    collective_errors,
    current,
    env_from_launcher,
    init_process_group,
    pick_device,
    shutdown,
)



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


def dry_run(cfg: TrainConfig, env: DistEnv, choices: ModelChoices | None = None) -> None:
    """`trainer.dry_run=true`: validate for the planned world (`parallel.world_size`, else the launched one) and
    print the layout and memory plan. Runs before `prepare`, whose launched-world guard would refuse a plan for a
    bigger job, and creates no process group and no tokenizer; files the run would read need not exist yet."""
    from .plan import GPU_GIB, format_plan, plan, smallest_fit, trainable_slot_params

    world = cfg.parallel.world_size or env.world_size
    cfg.model = resolve_pretrained(cfg, choices, planning=True)
    cfg.validate(world, planning=True)
    partial = trainable_slot_params(cfg, cfg.expert_parallel_size(world))
    configured = plan(cfg, world, partial)
    report = format_plan(configured)
    if partial is not None:  # the same run training everything, for comparison, then as configured
        full = format_plan(plan(cfg, world)).replace("memory per rank", "full fine-tuning, memory per rank", 1)
        what = (f"ESFT (assuming {cfg.esft.plan_fraction:.0%} of the experts selected)" if cfg.esft.enabled
                else f"LoRA (rank {cfg.lora.rank} on {', '.join(cfg.lora.targets)})" if cfg.lora.enabled
                else "trainer.trainable")
        report = full + "\n" + report[report.index("memory per rank"):].replace("memory per rank",
                                                                                 f"{what}, memory per rank", 1)
    if configured.peak.total_bytes > GPU_GIB * 1024 ** 3:
        report += "\n" + smallest_fit(cfg)
    if env.is_main:
        print(report, flush=True)


def _task(cfg: DictConfig) -> None:
    from hydra.core.hydra_config import HydraConfig

    from .prepare import Prepared, prepare, verify_resume
    from .train import copy_run_config, train

    env = env_from_launcher()
    with user_errors():  # every input error surfaces here, before any process group exists
        train_cfg = to_train_config(cfg)
        choices = model_choices(cfg, HydraConfig.get())
        if train_cfg.trainer.dry_run:
            return dry_run(train_cfg, env, choices)
        run_dir = Path(HydraConfig.get().runtime.output_dir)
        if env.is_main:  # held until this process ends (trainer/runlock.py)
            lock = lock_run(run_dir, train_cfg.checkpoint.dir)  # noqa: F841
        prepared = prepare(train_cfg, env, choices)
    device = pick_device(prepared.cfg.trainer.device, env)
    init_process_group(env, device, prepared.cfg.parallel.backend, prepared.cfg.parallel.timeout_s,
                       single=prepared.cfg.uses_deepspeed)  # DeepSpeed wants a group even for one process
    try:
        # Rank 0's resolved config, run dir and resume choice for everyone: the ranks cannot disagree.
        shared = broadcast_object((prepared.shared(), str(run_dir)) if env.is_main else None, env)
        prepared, run_dir = Prepared.from_shared(shared[0], prepared.tokenizer), Path(shared[1])
        if env.is_main:
            run_dir.mkdir(parents=True, exist_ok=True)
            copy_run_config(run_dir, prepared.cfg)
        with user_errors(config=False), collective_errors(env):
            current.at("verify")
            prepared = verify_resume(prepared, env)
            train(prepared, run_dir, env)
    finally:
        shutdown()


LAUNCHED_RANK_GRACE_S = 3.0
"""How long a launched worker other than rank 0 waits before reporting an input error: when rank 0 finds the same
error, torchrun has ended the job by then and the message is printed once (docs/configuration.md, "Errors")."""


def fail(message: str, code: int, before_group: bool = True) -> None:
    """Report what the user can fix as one line on stderr and exit with `code` (2: input, 1: a run stopped on
    purpose). Under a launcher, before any process group (`before_group`: every rank checks the same inputs),
    rank 0 reports at once and the other ranks only after `LAUNCHED_RANK_GRACE_S`, with their rank: if rank 0
    failed too the launcher has stopped them by then, so the message appears once; if only they failed (a file
    missing on one node) it still appears. Under torchrun the line is also written to the worker's error file, so
    torchrun's closing report shows it as the root cause instead of a link to its docs."""
    rank = int(os.environ.get("RANK", 0))
    if before_group and rank > 0:
        time.sleep(LAUNCHED_RANK_GRACE_S)
    line = message if rank == 0 or not before_group else f"{message} (rank {rank})"
    sys.stdout.flush()
    print(line, file=sys.stderr, flush=True)
    error_file = os.environ.get("TORCHELASTIC_ERROR_FILE")
    if error_file:
        with contextlib.suppress(OSError):
            # torchrun's own record format: its report shows `py_callstack` as the failure's "traceback"
            Path(error_file).write_text(json.dumps({"message": {"message": line, "extraInfo": {
                "py_callstack": line, "timestamp": str(int(time.time()))}}}))
    raise SystemExit(code)


@contextlib.contextmanager
def user_errors(config: bool = True):
    """One line instead of a traceback for what the user can fix: a wrong data file or checkpoint (exit 2), a run
    stopped on purpose by non-finite values (exit 1), and with `config` (the checks before any process group, all
    ValueErrors naming a key) a wrong setting (exit 2). During training other errors keep their traceback."""
    from data.sources import DataError
    from model.hf import CheckpointError

    from .config import ConfigError, NonFiniteError
    from .distributed import CollectiveError, end_local_peers
    try:
        yield
    except CollectiveError as e:
        sys.stdout.flush()
        print(f"distributed error: {e}", file=sys.stderr, flush=True)
        end_local_peers()
        os._exit(3)  # no teardown: destroying a group whose peer is gone can block
    except (DataError, CheckpointError) as e:
        fail(f"{'data' if isinstance(e, DataError) else 'checkpoint'} error: {e}", 2, before_group=config)
    except NonFiniteError as e:
        fail(f"training stopped: {e}", 1, before_group=False)
    except ValueError as e:
        if not (config or isinstance(e, ConfigError)):
            raise
        fail(f"config error: {e}", 2, before_group=config)


def model_choices(cfg: DictConfig, hydra_cfg) -> ModelChoices:
    """The model settings the user made: `model.<field>=` (or a sub-key of it) on the command line, every field of a
    preset chosen on the command line (`model=<name>`), and fields an experiment sets (those that differ from the
    preset). Fields that only come from the default preset are not counted: `model.pretrained` replaces them."""
    task = [o.lstrip("+~") for o in hydra_cfg.overrides.task]
    preset = hydra_cfg.runtime.choices.get("model")
    preset_values = OmegaConf.to_container(OmegaConf.load(CONF_DIR / "model" / f"{preset}.yaml")) if preset else {}
    defaults = {f.name: f.default for f in dataclasses.fields(ModelConfig)}
    chosen = next((o for o in task if o.split("=")[0] in ("model", "/model")), None)
    experiment = hydra_cfg.runtime.choices.get("experiment")
    explicit = {}
    for name in defaults:
        given = next((o for o in task if o.split("=")[0] == f"model.{name}"
                      or o.split("=")[0].startswith(f"model.{name}.")), None)
        value = cfg.model.get(name)
        value = OmegaConf.to_container(value) if OmegaConf.is_config(value) else value
        if given:
            explicit[name] = given
        elif chosen and name in preset_values:
            explicit[name] = chosen
        elif experiment and value != preset_values.get(name, defaults[name]):
            explicit[name] = f"experiment={experiment}"
    return ModelChoices(explicit, preset=bool(chosen or experiment))


def check_overrides(args: list[str]) -> None:
    """Command-line overrides checked against the schema before Hydra composes them: an unknown key, group or
    preset, a value of the wrong type, each stop with one `config error:` line naming it (exit 2), not Hydra's
    advice to append keys with `+`. Sweeps (`-m`) and configs from other directories are left to Hydra."""
    if any(a in ("-m", "--multirun") or a.startswith(("--config-dir", "-cd", "--config-path", "-cp"))
           or "hydra.searchpath" in a for a in args):
        return
    overrides = [a for a in args if "=" in a and not a.startswith("-") and not a.lstrip("+~").startswith("hydra")]
    for override in overrides:
        key, value = override.split("=", 1)
        problem = _unknown(key.lstrip("+~"), value.strip("'\""))
        if problem:
            fail(f"config error: {problem}", 2)
    from hydra import compose, initialize_config_dir
    from hydra.errors import HydraException
    try:
        with initialize_config_dir(config_dir=str(CONF_DIR), version_base=None):
            compose("config", overrides=overrides)
    except (HydraException, ValueError) as e:
        what = next(iter(str(e).removeprefix("Error merging override ").strip().splitlines()), type(e).__name__)
        cause = next((line for line in str(e.__cause__ or "").splitlines() if line.strip()), "")
        fail(f"config error: {what}: {cause}" if cause else f"config error: {what}", 2)


def _unknown(key: str, value: str) -> str | None:
    """Why `key` is not a config key or `key=value` not a preset choice (with the closest names), or None."""
    groups = sorted(p.name for p in CONF_DIR.iterdir() if p.is_dir())
    if "." not in key:
        if key.lstrip("/") not in groups:
            return f"{key}: no such config group; groups: {', '.join(groups)} (settings take a section: trainer.{key})"
        presets = sorted(f.stem for f in (CONF_DIR / key.lstrip("/")).glob("*.yaml"))
        if value not in presets:
            return (f"{key}={value}: no such preset{_did_you_mean(value, presets)}; available: {', '.join(presets)}"
                    f" (~{key.lstrip('/')} leaves an optional group out)")
        return None
    node, path = TrainConfig, []
    for part in key.split("."):
        fields = {f.name: f for f in dataclasses.fields(node)}
        if part not in fields:
            known = [".".join([*path, name]) for name in fields]
            hint = _did_you_mean(".".join([*path, part]), known)
            return f"{key}: unknown key{hint}; allowed: {', '.join(sorted(known))}"
        path.append(part)
        kind = fields[part].default_factory if fields[part].default_factory is not dataclasses.MISSING else None
        if not dataclasses.is_dataclass(kind):
            return None  # a leaf (dict-valued fields such as model.rope_scaling take any sub-key)
        node = kind
    return None


def _schema_field(key: str) -> dataclasses.Field | None:
    """The TrainConfig field a dotted key names (None when it names none, or goes below a leaf)."""
    node, found = TrainConfig, None
    for part in key.split("."):
        if node is None:
            return None
        fields = {f.name: f for f in dataclasses.fields(node)}
        if part not in fields:
            return None
        found = fields[part]
        kind = found.default_factory if found.default_factory is not dataclasses.MISSING else None
        node = kind if dataclasses.is_dataclass(kind) else None
    return found


def listify(args: list[str]) -> list[str]:
    """A single value given to a list-of-strings key, as `data.paths=/data/a.jsonl` or `eval.tasks=hellaswag`, is
    that one-element list (Hydra would refuse it with "str is not a ListConfig")."""
    out = []
    for arg in args:
        key, sep, value = arg.partition("=")
        bare = key.lstrip("+~")
        if (sep and not arg.startswith("-") and value and value[0] not in "[{'\"" and value != "null"
                and "," not in value and not bare.startswith("hydra")):
            field = _schema_field(bare)
            if field is not None and str(field.type).replace(" | None", "") == "list[str]":
                arg = f"{key}=[{value}]"
        out.append(arg)
    return out


def _did_you_mean(word: str, choices: list[str]) -> str:
    close = difflib.get_close_matches(word, choices, n=1)
    return f" (did you mean {close[0]}?)" if close else ""


def check_run_dir(args: list[str]) -> None:
    """The run directory (`hydra.run.dir=`, else the default under ./outputs) must be writable: Hydra creates it
    before anything of ours runs and would answer a read-only or impossible path with a traceback."""
    if any(a in ("--cfg", "-c", "--help", "-h", "--hydra-help", "--info", "-m", "--multirun") for a in args):
        return  # Hydra makes no run directory for these (a sweep makes its own)
    given = [a.split("=", 1)[1] for a in args if a.lstrip("+").startswith("hydra.run.dir=")]
    target = Path(given[-1].strip("'\"")) if given else Path("outputs")
    if "${" in str(target):  # an interpolation Hydra resolves: check the part before it
        target = Path(str(target).split("${", 1)[0] or ".")
    try:
        target.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=target, prefix=".write-check-"):
            pass
    except OSError as e:
        fail(f"config error: hydra.run.dir={target}: cannot write there ({e.strerror or e}: {e.filename or target}); "
             "give a writable hydra.run.dir", 2)


def main(argv: list[str] | None = None, task=None) -> None:
    """Compose the config and run `task` (default: training) with it on this rank; `launch/evaluate.py` passes its
    own task over the same tree."""
    import hydra

    register_configs()
    sys.argv = [sys.argv[0]] + listify(strip_launcher_args(sys.argv[1:] if argv is None else argv))
    check_overrides(sys.argv[1:])
    env = env_from_launcher()
    if env.rank == 0:
        check_run_dir(sys.argv[1:])
    scratch = None
    if env.rank > 0:
        # Only rank 0 writes the run directory; the others compose in a scratch directory removed at exit.
        scratch = tempfile.mkdtemp(prefix="latentmoe-hydra-")
        sys.argv += [f"hydra.run.dir={scratch}", "hydra.output_subdir=null", "hydra/job_logging=disabled",
                     "hydra/hydra_logging=disabled"]
    try:
        hydra.main(config_path=str(CONF_DIR), config_name="config", version_base=None)(task or _task)()
    finally:
        if scratch:
            shutil.rmtree(scratch, ignore_errors=True)
