"""Everything about a run that can fail on bad input, checked before any process group exists: the model a
`model.pretrained` directory defines, the config, the data files, the tokenizer, and which checkpoint to resume
(its state file read once). Each failure is a ValueError naming the key or file and what to do."""

from __future__ import annotations

import dataclasses
import json
import os
import time
from dataclasses import dataclass
from pathlib import Path

from data.loader import build_tokenizer, check_inputs
from data.sources import expand_globs
from data.tokenizer import TextTokenizer, load_tokenizer
from model import ModelConfig
from model.hf import load_config

from model.hf import CheckpointError

from .changes import check_fixed
from .checkpoint import REJECTED, Resume, choose_resume, gather_problems, list_checkpoints, plan_resume, step_of
from .config import ConfigError, TrainConfig, config_dict, to_train_config
from .distributed import DistEnv, barrier
from .integrity import MANIFEST, verify


@dataclass
class Prepared:
    """The checked inputs of a run: config (model fitted to the tokenizer), tokenizer, the checkpoint to resume."""

    cfg: TrainConfig
    tokenizer: TextTokenizer
    resume: Resume | None
    """What the chosen checkpoint restores; None for a fresh start, and until verification when the checkpoint's
    state file could not be read (a damaged one is then set aside, see `verify_resume`)."""
    set_aside: list[Path]
    """Newer checkpoints of an abandoned timeline, moved aside before training (a rollback)."""
    candidate: Path | None = None
    """The checkpoint chosen, before verification."""

    def shared(self) -> dict:
        """What rank 0 broadcasts so that every rank trains with the same settings (the tokenizer each rank built)."""
        return {"cfg": config_dict(self.cfg), "resume": self.resume.to_dict() if self.resume else None,
                "set_aside": [str(p) for p in self.set_aside],
                "candidate": str(self.candidate) if self.candidate else None}

    @classmethod
    def from_shared(cls, shared: dict, tokenizer: TextTokenizer) -> "Prepared":
        resume = Resume.from_dict(shared["resume"]) if shared["resume"] else None
        candidate = Path(shared["candidate"]) if shared["candidate"] else None
        return cls(to_train_config(shared["cfg"]), tokenizer, resume, [Path(p) for p in shared["set_aside"]],
                   candidate)


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
    require_pretrained_tokenizer(cfg)
    cfg.validate(env.world_size)
    for key, _, patterns in cfg.data.inputs():  # a wrong glob fails before the built-in BPE is trained
        expand_globs(patterns, key)
    if env.is_main and cfg.data.source != "stdlib" and not cfg.data.tokenizer:
        print("note: data.tokenizer is not set: using the built-in BPE trained on this Python's standard library, "
              "not on your data; set data.tokenizer=<tokenizer.json or model directory> to use your own", flush=True)
    tokenizer = build_tokenizer(cfg.data)
    cfg.model = fit_model_to_tokenizer(cfg.model, tokenizer, f"data.tokenizer={cfg.data.tokenizer}")
    check_inputs(cfg.data, tokenizer, cfg.model.vocab_size)
    path, set_aside = choose_resume(cfg.checkpoint.dir, cfg.checkpoint.resume)
    try:
        resume = plan(cfg, path, env, tokenizer)
    except ValueError:
        if not (cfg.checkpoint.verify and (path / MANIFEST).is_file()):
            raise
        resume = None  # verification decides: a damaged state file fails it, a sound one fails here again
    if env.is_main and cfg.esft.enabled and not cfg.model.pretrained and path is None:
        print("warning: esft.enabled on randomly initialised weights: the experts' scores say nothing about your "
              "data; set model.pretrained=<released model directory>", flush=True)
    return Prepared(cfg, tokenizer, resume, set_aside, path)


def plan(cfg: TrainConfig, path: Path | None, env: DistEnv, tokenizer: TextTokenizer) -> Resume | None:
    """What resuming from `path` restores; a checkpoint this layout, model or tokenizer cannot resume fails here,
    naming the key to set."""
    if path is None:
        return None
    resume = plan_resume(path, cfg.layout(env.world_size), env.world_size, cfg.checkpoint.optimizer_resume,
                         cfg.checkpoint.data_resume)
    check_checkpoint_model(resume, cfg.model)
    check_fixed(cfg, resume.state)
    check_tokenizer(resume, tokenizer)
    return resume


def check_tokenizer(resume: Resume, tokenizer: TextTokenizer) -> None:
    """The run's tokenizer must be the one the checkpoint was trained with, vocabulary and merges included (a
    permuted vocabulary of the same size and BOS/EOS would train on remapped ids). Every checkpoint of a run holds
    its tokenizer.json; a weights-only start point (an imported model) has none to compare."""
    saved = resume.path / "tokenizer.json"
    if resume.weights_only or not saved.is_file():
        return
    theirs = load_tokenizer(saved)
    if theirs.tokenizer.to_str() == tokenizer.tokenizer.to_str():
        return
    mine, other = tokenizer.tokenizer.get_vocab(), theirs.tokenizer.get_vocab()
    moved = next((t for t in sorted(other, key=other.get) if mine.get(t) != other[t]), None)
    what = (f"{len(other)} against {len(mine)} ids" if len(other) != len(mine) else
            f"token {moved!r} is id {other[moved]} there and {mine.get(moved)} here" if moved is not None else
            "the same vocabulary, other merges or normalisation")
    raise CheckpointError(f"{saved}: the checkpoint was trained with another tokenizer than this run's "
                          f"({tokenizer.source}): {what}; resume with the checkpoint's own tokenizer "
                          f"(data.tokenizer={saved}), or start a new run from its weights")


def named(cfg: TrainConfig, path: Path | None) -> bool:
    """`path` is the checkpoint `checkpoint.resume=<path>` names (not one `auto` or a relaunch picked)."""
    return path is not None and cfg.checkpoint.resume not in ("auto", "none") and \
        Path(cfg.checkpoint.resume).expanduser().resolve() == path.resolve()


def verify_resume(prepared: Prepared, env: DistEnv) -> Prepared:
    """Verify the checkpoint a run resumes from against its manifest, every rank hashing its share of the files
    (collective; docs/reliability.md), then plan the resume from it.

    A checkpoint named by `checkpoint.resume=<path>` that fails stops the run, naming the file and the reason. One
    that `auto` (or a relaunch) picked is passed over for the next newest, and once one verifies, those that failed
    are moved to `<checkpoint.dir>/rejected/` with a line saying why. When none verifies nothing is moved and the run
    stops, listing the reasons (so checkpoints written before manifests existed stay where they are)."""
    cfg = prepared.cfg
    path, rejected = prepared.candidate, {}
    while path is not None and cfg.checkpoint.verify:
        start = time.perf_counter()
        problems = gather_problems(verify(path, step_of(path), env.rank, env.world_size), env)
        if not problems:
            if env.is_main:
                gb = sum(f.stat().st_size for f in path.rglob("*") if f.is_file()) / 1e9
                print(f"checkpoint {path.name} verified: {gb:.2f} GB in {time.perf_counter() - start:.1f} s over "
                      f"{env.world_size} rank(s)", flush=True)
            break
        if named(cfg, path):
            raise CheckpointError(f"checkpoint.resume={cfg.checkpoint.resume}: failed verification: "
                                  f"{_listed(problems)}; resume from another checkpoint (checkpoint.verify=false "
                                  "skips verification, for checkpoints written before manifests existed)")
        rejected[path] = problems
        path = next_candidate(cfg, list(rejected))
    if rejected and path is None:
        old = any("integrity.json: missing" in p for problems in rejected.values() for p in problems)
        raise CheckpointError("no checkpoint verifies: " + "; ".join(
            f"{p}: {_listed(problems, 2)}" for p, problems in rejected.items()) +
            ("; checkpoints written before manifests existed resume with checkpoint.verify=false" if old else ""))
    barrier(env)  # every rank is done reading before anything moves
    if env.is_main:
        for bad, problems in rejected.items():
            target = Path(cfg.checkpoint.dir) / REJECTED / f"{bad.name}-{int(bad.stat().st_mtime)}"
            target.parent.mkdir(exist_ok=True)
            os.replace(bad, target)
            print(f"checkpoint {bad} failed verification: {_listed(problems)}; moved to {target}; resuming from "
                  f"{path}", flush=True)
    if path is None or (prepared.resume is not None and prepared.resume.path == path):
        return prepared
    try:
        resume = plan(cfg, path, env, prepared.tokenizer)
    except ValueError as e:
        raise ConfigError(str(e)) from None
    return dataclasses.replace(prepared, resume=resume, candidate=path)


def next_candidate(cfg: TrainConfig, rejected: list[Path]) -> Path | None:
    """The checkpoint to try after `rejected` failed: the newest other complete one of `checkpoint.dir`, then a start
    point named outside it (another run's checkpoint, an imported model)."""
    passed = {p.resolve() for p in rejected}
    complete = [p for p in list_checkpoints(cfg.checkpoint.dir)[0] if p.resolve() not in passed]
    if complete:
        return complete[-1]
    if cfg.checkpoint.resume not in ("auto", "none"):
        start = Path(cfg.checkpoint.resume).expanduser()
        return start if start.resolve() not in passed else None
    return None


def resolve_pretrained(cfg: TrainConfig, choices: ModelChoices | None,
                       planning: bool = False) -> ModelConfig:
    """With `model.pretrained=<dir>`, the directory's config.json defines the architecture. Model fields the user set
    (`choices.explicit`; None counts every field as set) must agree with it on the architecture, else ValueError
    naming each field and both values. Training fields (dtype, balance-loss coefficients, RoPE/YaRN, context length)
    are kept where the user set them, and where config.json does not carry them (the device and communication
    balance coefficients are ours) if a preset was picked. `data.tokenizer` defaults to the directory's
    tokenizer.json. Without `model.pretrained` the config is returned as it is. A directory that is not there, or
    has no config.json, fails naming the path, in the dry run (`planning`) too."""
    if not cfg.model.pretrained:
        return cfg.model
    directory = Path(os.path.expanduser(cfg.model.pretrained))
    if not (directory / "config.json").is_file():
        # The dry run too: planning another model than the one named would print a plan for the wrong model.
        plan_hint = ("; to plan without the files, drop model.pretrained and pick the preset of that shape "
                     "(model=v2_lite, model=v2)") if planning else ""
        if not directory.is_dir():
            raise ValueError(f"model.pretrained={cfg.model.pretrained}: no such directory{plan_hint}")
        raise ValueError(f"model.pretrained={cfg.model.pretrained}: no config.json there (a released-layout "
                         f"directory is expected: config.json + safetensors){plan_hint}")
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


def require_pretrained_tokenizer(cfg: TrainConfig) -> None:
    """A model from `model.pretrained` trains and is judged with its own tokenizer: a directory without
    tokenizer.json (an export stopped before it, or one that never had it) stops the run instead of falling back to
    the built-in BPE, unless `data.tokenizer` names one."""
    if cfg.model.pretrained and not cfg.data.tokenizer:
        raise ValueError(f"model.pretrained={cfg.model.pretrained}: no tokenizer.json there (an export stopped "
                         "before writing it, or a directory that never had one), and the model's token ids mean "
                         "nothing to another tokenizer; name its tokenizer with data.tokenizer=<tokenizer.json or "
                         "its directory>")


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
    try:
        theirs = ModelConfig.from_hf_config(saved) if resume.weights_only else ModelConfig(**saved)
    except (TypeError, ValueError, KeyError) as e:
        raise ValueError(f"{resume.path / 'train_state.json'}: its model config does not read ({e})") from None
    diffs = model_cfg.architecture_differences(theirs)
    if diffs:
        listed = _listed([f"model.{f}={ours!r} but the checkpoint has {value!r}" for f, ours, value in diffs])
        raise ValueError(f"checkpoint.resume={resume.path}: {listed}; resume with the model config it was trained "
                         "with (for an imported HF model, start from model.pretrained=<its directory>)")
