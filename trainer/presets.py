"""Model presets: `conf/model/<name>.yaml` (Hugging Face config keys) turned into a validated ModelConfig."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

from omegaconf import OmegaConf

from model.config import ModelConfig

CONF_DIR = Path(__file__).resolve().parent.parent / "conf"


def available_model_presets() -> list[str]:
    return sorted(p.stem for p in (CONF_DIR / "model").glob("*.yaml"))


def model_preset(name: str, **overrides: Any) -> ModelConfig:
    """The preset `conf/model/<name>.yaml` with `overrides` applied; unknown names and keys raise ValueError."""
    path = CONF_DIR / "model" / f"{name}.yaml"
    if not path.is_file():
        raise ValueError(f"model={name!r}: no such preset in {path.parent}; available: {available_model_presets()}")
    values = OmegaConf.to_container(OmegaConf.load(path), resolve=True)
    values.update(overrides)
    allowed = {f.name for f in dataclasses.fields(ModelConfig)}
    unknown = sorted(set(values) - allowed)
    if unknown:
        raise ValueError(f"model={name}: unknown keys {unknown}; allowed keys are the ModelConfig fields: "
                         f"{sorted(allowed)}")
    return ModelConfig(**values)
