"""What a resume changes: the settings of the checkpoint's run against the relaunch's, one line per change that
alters training, the LR schedule's horizon kept or stretched (`optim.schedule_resume`), and the changes a resume
cannot take refused (docs/checkpoints.md, "Resuming with other settings")."""

from __future__ import annotations

from typing import Any

from .config import ConfigError, TrainConfig, config_dict, to_train_config
from .optim import lr_at

# Settings that do not change what training computes (where it writes, how it logs, how it is laid out: layouts are
# checked against the checkpoint elsewhere), and `optim.schedule_resume`, which only says how to treat a change.
UNCHANGED_TRAINING = ("checkpoint.", "logging.", "eval.", "parallel.", "trainer.log_every", "trainer.val_every",
                      "trainer.val_batches", "trainer.dry_run", "trainer.progress", "trainer.device",
                      "trainer.compile", "trainer.activation_checkpointing", "data.cache_dir", "data.num_workers",
                      "optim.schedule_resume", "optim.schedule_steps", "model.pretrained", "trainer.epochs")
# A checkpoint's parameters are what these made: another value would load some tensors and silently drop others.
FIXED = ("lora.enabled", "lora.rank", "lora.targets", "esft.enabled")
SCHEDULE = ("trainer.max_steps", "optim.lr", "optim.schedule", "optim.warmup_steps", "optim.decay_at",
            "optim.decay_factor", "optim.min_lr_ratio")


def _flat(node: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(node, dict):
        out = {}
        for key, value in node.items():
            out.update(_flat(value, f"{prefix}{key}."))
        return out
    return {prefix[:-1]: node}


def _differences(saved: dict, now: dict) -> list[tuple[str, Any, Any]]:
    a, b = _flat(saved), _flat(now)
    return [(k, a.get(k), b.get(k)) for k in sorted(set(a) | set(b)) if a.get(k) != b.get(k)]


def check_fixed(cfg: TrainConfig, state: dict) -> None:
    """ConfigError naming the first setting a resume from `state` (a checkpoint's train_state.json) cannot change."""
    saved = state.get("config")
    if not saved or state.get("weights_only"):
        return
    for key, old, new in _differences(saved, config_dict(cfg)):
        if key in FIXED or any(key.startswith(f"{f}.") for f in FIXED):
            raise ConfigError(f"{key}={new!r}: the checkpoint's run trained with {old!r}, and its parameters are "
                              f"what that made; resume with {key}={old!r}, or start a new run (another "
                              "hydra.run.dir, or checkpoint.resume=none)")


def schedule_horizon(state: dict) -> int | None:
    """The number of steps the checkpoint's LR schedule spans."""
    saved = state.get("config") or {}
    return state.get("schedule_steps") or (saved.get("optim") or {}).get("schedule_steps") or \
        (saved.get("trainer") or {}).get("max_steps")


def resume_changes(cfg: TrainConfig, state: dict) -> list[str]:
    """One line per setting the relaunch changes that alters training, old -> new and what it does; applies
    `optim.schedule_resume=keep` (the schedule keeps the checkpoint's horizon) to `cfg` first. `state`: the
    checkpoint's train_state.json."""
    saved = state.get("config")
    if not saved or state.get("weights_only"):
        return []
    step, old_horizon = state["step"], schedule_horizon(state)
    if cfg.optim.schedule_resume == "keep" and cfg.optim.schedule_steps is None and old_horizon:
        cfg.optim.schedule_steps = old_horizon
    horizon = cfg.optim.schedule_steps or cfg.trainer.max_steps
    lines, schedule = [], []
    for key, old, new in _differences(saved, config_dict(cfg)):
        if old is None or key.startswith(UNCHANGED_TRAINING):
            continue  # a key the checkpoint's version did not have takes its default: not a change to report
        if key in SCHEDULE:
            schedule.append(f"{key} {old} -> {new}")
        else:
            lines.append(f"resume: {key} {old} -> {new}: applies from step {step + 1}")
    if schedule:
        lines.insert(0, _schedule_line(cfg, saved, step, old_horizon, horizon, schedule))
    return lines


def _schedule_line(cfg: TrainConfig, saved: dict, step: int, old_horizon: int | None, horizon: int,
                   changed: list[str]) -> str:
    """The LR schedule's change in one line: what changed, the horizon, and the LR of the next step then and now."""
    try:
        before = lr_at(step, to_train_config(saved).optim, old_horizon or horizon)
    except (ValueError, TypeError, KeyError):  # a checkpoint from an older schema: say what is known
        before = None
    now = lr_at(step, cfg.optim, horizon)
    if horizon == old_horizon:
        how = f"the schedule keeps its {horizon} steps"
        if cfg.optim.schedule_resume == "keep" and cfg.trainer.max_steps != horizon:
            how += f" (optim.schedule_resume=keep; steps past {horizon} stay at its end value)"
    else:
        how = f"the lr schedule is re-stretched over {horizon} steps (was {old_horizon})"
        if cfg.optim.schedule_resume == "stretch":
            how += "; optim.schedule_resume=keep keeps the checkpoint's"
    was = f" (the checkpoint's schedule gives {before:.2e} there)" if before is not None else ""
    return f"resume: {', '.join(changed)}: {how}: lr at step {step + 1} becomes {now:.2e}{was}"
