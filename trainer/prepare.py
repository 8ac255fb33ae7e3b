"""Everything about a run that can fail on bad input, checked before any process group exists: the model a
`model.pretrained` directory defines, the config, the data files, the tokenizer, and which checkpoint to resume
(its state file read once). Each failure is a ValueError naming the key or file and what to do."""

from __future__ import annotations

import dataclasses
import json
import os
from dataclasses import dataclass
from pathlib import Path

from data.loader import build_tokenizer
from data.sources import expand_globs
from data.tokenizer import TextTokenizer
from model import ModelConfig
from model.hf import load_config

from model.hf import CheckpointError

from .checkpoint import REJECTED, Resume, choose_resume, gather_problems, plan_resume, step_of
from .config import TrainConfig, config_dict, to_train_config
from .distributed import DistEnv, barrier, broadcast_object
from .integrity import verify


@dataclass
class Prepared:
    """The checked inputs of a run: config (model fitted to the tokenizer), tokenizer, the checkpoint to resume."""

    cfg: TrainConfig
    tokenizer: TextTokenizer
    resume: Resume | None
    set_aside: list[Path]
    """Newer checkpoints of an abandoned timeline, moved aside before training (a rollback)."""

    def shared(self) -> dict:
        """What rank 0 broadcasts so that every rank trains with the same settings (the tokenizer each rank built)."""
        return {"cfg": config_dict(self.cfg), "resume": self.resume.to_dict() if self.resume else None,
                "set_aside": [str(p) for p in self.set_aside]}

    @classmethod
    def from_shared(cls, shared: dict, tokenizer: TextTokenizer) -> "Prepared":
        resume = Resume.from_dict(shared["resume"]) if shared["resume"] else None
        return cls(to_train_config(shared["cfg"]), tokenizer, resume, [Path(p) for p in shared["set_aside"]])


@dataclass
class ModelChoices:
    """The model settings a user made, as the command line shows them (`trainer/cli.py` reads them from Hydra)."""

    explicit: dict[str, str]
    """{field: where it was set}: `model.<field>=` on the command line, a preset chosen there, or an experiment."""
    preset: bool
    """A preset was picked (on the command line or by an experiment), not left at the default."""


def prepare(cfg: TrainConfig, env: DistEnv, choices: ModelChoices | None = None) -> Prepared:
    """Validate everything that depends on files before any process group starts; raises ValueError naming the key.
    The built-in BPE is trained here on first use (a file lock lets one rank train it while the others wait).
    `choices`: the model settings the user made (see `resolve_pretrained`)."""
    if cfg.parallel.world_size is not None and cfg.parallel.world_size != env.world_size:
        raise ValueError(f"parallel.world_size={cfg.parallel.world_size}, but {env.world_size} process(es) were "
                         "launched; check the launcher's node and process counts (or drop the key)")
    cfg.model = resolve_pretrained(cfg, choices)
    cfg.validate(env.world_size)
    if cfg.data.source == "files":
        expand_globs(cfg.data.paths)
    if cfg.data.val_paths:
        expand_globs(cfg.data.val_paths, "data.val_paths")
    if env.is_main and cfg.data.source != "stdlib" and not cfg.data.tokenizer:
        print("note: data.tokenizer is not set: using the built-in BPE trained on this Python's standard library, "
              "not on your data; set data.tokenizer=<tokenizer.json or model directory> to use your own", flush=True)
    tokenizer = build_tokenizer(cfg.data)
    cfg.model = fit_model_to_tokenizer(cfg.model, tokenizer, f"data.tokenizer={cfg.data.tokenizer}")
    path, set_aside = choose_resume(cfg.checkpoint.dir, cfg.checkpoint.resume)
    resume = plan(cfg, path, env)
    if env.is_main and cfg.esft.enabled and not cfg.model.pretrained and resume is None:
        print("warning: esft.enabled on randomly initialised weights: the experts' scores say nothing about your "
              "data; set model.pretrained=<released model directory>", flush=True)
    return Prepared(cfg, tokenizer, resume, set_aside)


def plan(cfg: TrainConfig, path: Path | None, env: DistEnv) -> Resume | None:
    """What resuming from `path` restores; a checkpoint this layout or model cannot resume fails here, naming the
    key to set."""
    if path is None:
        return None
    resume = plan_resume(path, cfg.layout(env.world_size), env.world_size, cfg.checkpoint.optimizer_resume,
                         cfg.checkpoint.data_resume)
    check_checkpoint_model(resume, cfg.model)
    return resume


def verify_resume(prepared: Prepared, env: DistEnv) -> Prepared:
    """Verify the checkpoint a run resumes from against its manifest, every rank hashing its share of the files
    (collective; docs/checkpoints.md). One that fails stops the run, naming the file and the reason, when it was
    named by `checkpoint.resume=<path>`; one `resume=auto` chose is moved to `<checkpoint.dir>/rejected/` and the
    newest checkpoint that verifies is taken instead."""
    cfg = prepared.cfg
    while prepared.resume is not None and cfg.checkpoint.verify:
        path = prepared.resume.path
        problems = gather_problems(verify(path, step_of(path), env.rank, env.world_size), env)
        if not problems:
            return prepared
        named = cfg.checkpoint.resume != "auto" and Path(cfg.checkpoint.resume).expanduser().resolve() == \
            path.resolve()
        if named:
            raise CheckpointError(f"checkpoint.resume={cfg.checkpoint.resume}: failed verification: "
                                  f"{_listed(problems)}; resume from another checkpoint (checkpoint.verify=false "
                                  "skips verification, for checkpoints written before manifests existed)")
        barrier(env)  # every rank is done reading it before it moves
        if env.is_main:
            target = Path(cfg.checkpoint.dir) / REJECTED / f"{path.name}-{int(path.stat().st_mtime)}"
            target.parent.mkdir(exist_ok=True)
            os.replace(path, target)
            print(f"checkpoint {path} failed verification: {_listed(problems)}; moved to {target}; trying the "
                  "next newest checkpoint", flush=True)
            chosen, _ = choose_resume(cfg.checkpoint.dir, "auto")
            resume = plan(cfg, chosen, env)
        shared = broadcast_object(resume.to_dict() if env.is_main and resume else None, env)
        prepared = dataclasses.replace(prepared, resume=Resume.from_dict(shared) if shared else None)
        if prepared.resume is None and env.is_main:
            print(f"no checkpoint in {cfg.checkpoint.dir} verifies: starting from the beginning", flush=True)
    return prepared


def resolve_pretrained(cfg: TrainConfig, choices: ModelChoices | None,
                       planning: bool = False) -> ModelConfig:
    """With `model.pretrained=<dir>`, the directory's config.json defines the architecture. Model fields the user set
    (`choices.explicit`; None counts every field as set) must agree with it on the architecture, else ValueError
    naming each field and both values. Training fields (dtype, balance-loss coefficients, RoPE/YaRN, context length)
    are kept where the user set them, and where config.json does not carry them (the device and communication
    balance coefficients are ours) if a preset was picked. `data.tokenizer` defaults to the directory's
    tokenizer.json. Without `model.pretrained` the config is returned as it is; `planning` (the dry run) also plans
    from it when the directory is not on this machine."""
    if not cfg.model.pretrained:
        return cfg.model
    directory = Path(os.path.expanduser(cfg.model.pretrained))
    if not (directory / "config.json").is_file():
        if planning:
            print(f"note: model.pretrained={cfg.model.pretrained} is not here: planning with the composed model "
                  "config", flush=True)
            return cfg.model
        raise ValueError(f"model.pretrained={cfg.model.pretrained}: no config.json there (a released-layout "
                         "directory is expected: config.json + safetensors)")
    released = load_config(directory)
    if choices is None:
        choices = ModelChoices({f.name: f"model.{f.name}={getattr(cfg.model, f.name)!r}"
                                for f in dataclasses.fields(cfg.model)}, preset=True)
    explicit = choices.explicit
    diffs = [(f, ours, theirs) for f, ours, theirs in cfg.model.architecture_differences(released) if f in explicit]
    if diffs:
        listed = _listed([f"model.{f}={ours!r} but config.json has {theirs!r}"
                          + ("" if explicit[f].startswith(f"model.{f}=") else f" (from {explicit[f]})")
                          for f, ours, theirs in diffs])
        raise ValueError(f"model.pretrained={cfg.model.pretrained}: {listed}; the directory defines the "
                         "architecture: drop those settings (model=<preset> is not needed with model.pretrained)")
    if not cfg.data.tokenizer and (directory / "tokenizer.json").is_file():
        cfg.data.tokenizer = str(directory)
    carried = set(json.loads((directory / "config.json").read_text(encoding="utf-8")))
    carried |= {"rope_scaling", "rope_theta"} if "rope_parameters" in carried else set()
    carried |= {"torch_dtype"} if "dtype" in carried else set()
    kept = {f: getattr(cfg.model, f) for f in ModelConfig.TRAINING_FIELDS
            if f in explicit or (choices.preset and f not in carried)}
    return released.replace(**kept, pretrained=cfg.model.pretrained)


def _listed(problems: list[str], shown: int = 4) -> str:
    more = f" (and {len(problems) - shown} more)" if len(problems) > shown else ""
    return "; ".join(problems[:shown]) + more


def fit_model_to_tokenizer(model_cfg: ModelConfig, tokenizer: TextTokenizer, tokenizer_key: str) -> ModelConfig:
    """The model's embedding must cover every id the tokenizer produces; BOS/EOS ids follow the tokenizer."""
    if tokenizer.vocab_size > model_cfg.vocab_size:
        raise ValueError(f"model.vocab_size={model_cfg.vocab_size} is smaller than the tokenizer's vocabulary "
                         f"({tokenizer.vocab_size} ids, {tokenizer_key}); use a larger model.vocab_size")
    return model_cfg.replace(bos_token_id=tokenizer.bos_id, eos_token_id=tokenizer.eos_id)


def check_checkpoint_model(resume: Resume, model_cfg: ModelConfig) -> None:
    """The checkpoint must hold this architecture (an imported model under the wrong preset fails here, not in a
    traceback halfway through loading)."""
    saved = resume.state.get("config", {}).get("model")
    if not saved:
        return
    theirs = ModelConfig.from_hf_config(saved) if resume.weights_only else ModelConfig(**saved)
    diffs = model_cfg.architecture_differences(theirs)
    if diffs:
        listed = _listed([f"model.{f}={ours!r} but the checkpoint has {value!r}" for f, ours, value in diffs])
        raise ValueError(f"checkpoint.resume={resume.path}: {listed}; resume with the model config it was trained "
                         "with (for an imported HF model, start from model.pretrained=<its directory>)")
