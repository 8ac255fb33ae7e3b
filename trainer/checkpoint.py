"""Training checkpoints: every stateful thing, committed by a marker written last.

    <checkpoint.dir>/step_00000400/
        model.safetensors          weights (rank 0; data-parallel replicas are identical)
        optimizer.safetensors      AdamW moments and step counts, keyed by parameter name
        train_state.json           step, tokens seen, skipped steps, world size, resolved config
        data_rank00000.json/.safetensors   each data-parallel rank's loader state
        rng_rank00000.safetensors  each rank's torch RNG states (CPU and CUDA)
        COMPLETE                   written by rank 0 after every rank finished (fsynced): the commit marker

`resume=auto` only ever considers directories holding COMPLETE, so a crash mid-save leaves something it skips (and
the next save or prune removes). Only safetensors and JSON are read back: no pickle.
"""

from __future__ import annotations

import json
import os
import random
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from .distributed import DistEnv, barrier

COMPLETE = "COMPLETE"
PREFIX = "step_"


class CheckpointNotFound(ValueError):
    pass


def step_dir(root: str | os.PathLike, step: int) -> Path:
    return Path(root) / f"{PREFIX}{step:08d}"


def _step_of(path: Path) -> int | None:
    if not path.name.startswith(PREFIX):
        return None
    try:
        return int(path.name[len(PREFIX):])
    except ValueError:
        return None


def is_complete(path: Path) -> bool:
    return (path / COMPLETE).is_file()


def list_checkpoints(root: str | os.PathLike) -> tuple[list[Path], list[Path]]:
    """(complete, incomplete) step directories under `root`, oldest first."""
    root = Path(root)
    if not root.is_dir():
        return [], []
    steps = sorted((s, p) for p in root.iterdir() if p.is_dir() and (s := _step_of(p)) is not None)
    return [p for _, p in steps if is_complete(p)], [p for _, p in steps if not is_complete(p)]


def find_resume(root: str | os.PathLike, resume: str) -> Path | None:
    """The checkpoint to resume from: `none` -> None; `auto` -> newest complete in `root` (None if there is none);
    otherwise `resume` is a checkpoint directory, which must be complete."""
    if resume == "none":
        return None
    if resume == "auto":
        complete, _ = list_checkpoints(root)
        return complete[-1] if complete else None
    path = Path(resume).expanduser()
    if not path.is_dir():
        raise CheckpointNotFound(f"checkpoint.resume={resume!r}: no such directory")
    if not is_complete(path):
        raise CheckpointNotFound(f"checkpoint.resume={resume!r}: incomplete checkpoint (no {COMPLETE} marker); "
                                 "it was interrupted while being written")
    return path


def choose_resume(root: str | os.PathLike, resume: str) -> tuple[Path | None, list[Path]]:
    """Which checkpoint a run starts from, and which newer checkpoints of `root` to set aside.

    - `auto`: the newest complete checkpoint in `root`, if any.
    - `none`: a fresh start, refused when `root` already holds checkpoints (they would mix with this run's).
    - a path outside `root` (another run, an imported HF model): used for the first launch; once `root` holds this
      run's own checkpoints, a relaunch of the same command continues from the newest of them.
    - a path inside `root`: a deliberate rollback; newer checkpoints there are set aside (moved, not deleted) so
      `auto` never returns to the abandoned timeline.
    """
    complete, _ = list_checkpoints(root)
    if resume == "none":
        if complete:
            raise ValueError(f"checkpoint.resume=none, but checkpoint.dir={root} already holds checkpoints (newest "
                             f"{complete[-1].name}); use checkpoint.resume=auto to continue that run, or another "
                             "checkpoint.dir / hydra.run.dir for a new one")
        return None, []
    chosen = find_resume(root, resume)
    if resume == "auto" or chosen is None:
        return chosen, []
    inside = chosen.resolve().parent == Path(root).resolve()
    if not inside:
        return (complete[-1] if complete else chosen), []
    return chosen, [p for p in complete if _step_of(p) > _step_of(chosen)]


def set_aside_newer(path: Path) -> Path:
    """Move a checkpoint of an abandoned timeline to `<root>/set_aside/` (kept for inspection, never resumed)."""
    target = path.parent / "set_aside" / f"{path.name}-{int(os.path.getmtime(path))}"
    target.parent.mkdir(exist_ok=True)
    os.replace(path, target)
    return target


# ------------------------------------------------------------------------------------ nested state <-> files
def split_arrays(obj: Any, prefix: str = "", arrays: dict | None = None) -> tuple[Any, dict[str, torch.Tensor]]:
    """Replace numpy arrays / tensors inside a nested dict/list by references, returning (JSON-able obj, arrays)."""
    arrays = {} if arrays is None else arrays
    if isinstance(obj, (np.ndarray, torch.Tensor)):
        key = prefix or "root"
        tensor = torch.from_numpy(np.ascontiguousarray(obj)) if isinstance(obj, np.ndarray) else obj
        arrays[key] = tensor.detach().cpu().contiguous()
        return {"__array__": key, "numpy": isinstance(obj, np.ndarray)}, arrays
    if isinstance(obj, dict):
        return {k: split_arrays(v, f"{prefix}/{k}", arrays)[0] for k, v in obj.items()}, arrays
    if isinstance(obj, (list, tuple)):
        return [split_arrays(v, f"{prefix}/{i}", arrays)[0] for i, v in enumerate(obj)], arrays
    return obj, arrays


def join_arrays(obj: Any, arrays: dict[str, torch.Tensor]) -> Any:
    if isinstance(obj, dict):
        if "__array__" in obj:
            tensor = arrays[obj["__array__"]]
            return tensor.numpy() if obj.get("numpy") else tensor
        return {k: join_arrays(v, arrays) for k, v in obj.items()}
    if isinstance(obj, list):
        return [join_arrays(v, arrays) for v in obj]
    return obj


def _write_json(path: Path, obj: Any) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(obj, f, indent=1)
    os.replace(tmp, path)


def save_state(directory: Path, stem: str, state: Any) -> None:
    """A nested state as `<stem>.json` plus `<stem>.safetensors` for its arrays."""
    meta, arrays = split_arrays(state)
    save_file(arrays, str(directory / f"{stem}.safetensors"))
    _write_json(directory / f"{stem}.json", meta)


def load_state(directory: Path, stem: str) -> Any:
    meta = json.loads((directory / f"{stem}.json").read_text(encoding="utf-8"))
    return join_arrays(meta, load_file(str(directory / f"{stem}.safetensors")))


# ------------------------------------------------------------------------------------ RNG
def rng_state() -> dict:
    state = {"torch_cpu": torch.get_rng_state(), "python": list(random.getstate()[1]),
             "python_version": random.getstate()[0], "python_gauss": random.getstate()[2]}
    if torch.cuda.is_available():
        state["torch_cuda"] = [torch.cuda.get_rng_state(i) for i in range(torch.cuda.device_count())]
    return state


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch_cpu"])
    random.setstate((state["python_version"], tuple(state["python"]), state["python_gauss"]))
    if torch.cuda.is_available() and "torch_cuda" in state:
        for i, s in enumerate(state["torch_cuda"][:torch.cuda.device_count()]):
            torch.cuda.set_rng_state(s, i)


# ------------------------------------------------------------------------------------ optimizer
def optimizer_tensors(model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> dict[str, torch.Tensor]:
    names = {p: n for n, p in model.named_parameters()}
    out = {}
    for p, state in optimizer.state.items():
        for key, value in state.items():
            out[f"{names[p]}::{key}"] = value.detach().cpu().contiguous()
    return out


def load_optimizer_tensors(model: torch.nn.Module, optimizer: torch.optim.Optimizer,
                           tensors: dict[str, torch.Tensor]) -> None:
    params = dict(model.named_parameters())
    by_param: dict[str, dict[str, torch.Tensor]] = {}
    for key, value in tensors.items():
        name, _, slot = key.rpartition("::")
        if name not in params:
            raise ValueError(f"optimizer state for unknown parameter {name!r} (the model changed since the save)")
        by_param.setdefault(name, {})[slot] = value
    optimizer.state.clear()
    for name, state in by_param.items():
        p = params[name]
        optimizer.state[p] = {k: (v.to(p.device) if k != "step" else v) for k, v in state.items()}


# ------------------------------------------------------------------------------------ save / load
def _fault(site: str, step: int, env: DistEnv) -> None:
    """Test-only fault injection: LATENTMOE_FAULT=<site>@<step>[:rank] ends the process abruptly at that point."""
    spec = os.environ.get("LATENTMOE_FAULT", "")
    if not spec:
        return
    where, _, rest = spec.partition("@")
    at_step, _, rank = rest.partition(":")
    if where == site and int(at_step) == step and (not rank or int(rank) == env.rank):
        os._exit(137)


def save_checkpoint(root: str | os.PathLike, step: int, model: torch.nn.Module, optimizer: torch.optim.Optimizer,
                    train_state: dict, data_state: dict, env: DistEnv, keep: int, tokenizer=None) -> Path:
    """Collective: every rank calls it. Each rank fsyncs its own files before the commit barrier; rank 0 then writes
    and fsyncs COMPLETE. Returns the committed directory."""
    path = step_dir(root, step)
    if env.is_main:
        if path.exists():
            shutil.rmtree(path)  # leftovers of an interrupted save of the same step
        path.mkdir(parents=True)
    barrier(env)
    written = []
    if env.is_main:
        save_file({k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()},
                  str(path / "model.safetensors"), metadata={"format": "pt"})
        save_file(optimizer_tensors(model, optimizer), str(path / "optimizer.safetensors"))
        _write_json(path / "train_state.json", train_state)
        written += ["model.safetensors", "optimizer.safetensors", "train_state.json"]
        if tokenizer is not None:  # the exact tokenizer of the run travels with its weights
            tokenizer.save(str(path / "tokenizer.json"))
            written.append("tokenizer.json")
    save_state(path, f"data_rank{env.rank:05d}", data_state)
    _fault("save", step, env)
    save_state(path, f"rng_rank{env.rank:05d}", rng_state())
    for stem in (f"data_rank{env.rank:05d}", f"rng_rank{env.rank:05d}"):
        written += [f"{stem}.json", f"{stem}.safetensors"]
    for name in written:
        _fsync_file(path / name)
    barrier(env)
    if env.is_main:
        with open(path / COMPLETE, "w") as f:
            f.write(f"step {step}\n")
            f.flush()
            os.fsync(f.fileno())
        _fsync_dir(path)
        prune(root, keep)
    barrier(env)
    return path


def _fsync_file(path: Path) -> None:
    with open(path, "rb+") as f:
        os.fsync(f.fileno())


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def prune(root: str | os.PathLike, keep: int) -> list[Path]:
    """Delete all but the newest `keep` complete checkpoints, and incomplete ones older than the newest complete.
    The newest complete checkpoint is never deleted."""
    complete, incomplete = list_checkpoints(root)
    newest = _step_of(complete[-1]) if complete else None
    doomed = complete[:-keep] if keep > 0 else []
    doomed += [p for p in incomplete if newest is not None and _step_of(p) < newest]
    for p in doomed:
        shutil.rmtree(p, ignore_errors=True)
    return doomed


def load_checkpoint(path: Path, model: torch.nn.Module, optimizer: torch.optim.Optimizer | None,
                    env: DistEnv) -> tuple[dict, dict | None]:
    """Restore weights, optimizer and this rank's RNG; returns (train_state, this rank's data state or None)."""
    train_state = json.loads((path / "train_state.json").read_text(encoding="utf-8"))
    weights = load_file(str(path / "model.safetensors"))
    missing, unexpected = model.load_state_dict(weights, strict=False)
    if missing or unexpected:
        raise ValueError(f"{path}/model.safetensors does not fit the configured model: missing {missing[:5]}, "
                         f"unexpected {unexpected[:5]} (was it saved with another model config?)")
    if train_state.get("weights_only"):
        return train_state, None
    saved_world = train_state["world_size"]
    if saved_world != env.world_size:
        raise ValueError(f"{path}: saved with {saved_world} data-parallel ranks, resuming with {env.world_size}; "
                         "the data position is per rank, so resume with the same number of processes (or start "
                         "from its weights: launch/convert.py weights-only)")
    if optimizer is not None:
        load_optimizer_tensors(model, optimizer, load_file(str(path / "optimizer.safetensors")))
    set_rng_state(load_state(path, f"rng_rank{env.rank:05d}"))
    return train_state, load_state(path, f"data_rank{env.rank:05d}")


def write_weights_only(path: Path, model: torch.nn.Module, config: dict) -> Path:
    """A committed checkpoint holding only weights (an imported HF model): training starts from it at step 0."""
    path.mkdir(parents=True, exist_ok=True)
    save_file({k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()},
              str(path / "model.safetensors"), metadata={"format": "pt"})
    _write_json(path / "train_state.json", {"weights_only": True, "step": 0, "config": config})
    (path / COMPLETE).write_text("weights only\n")
    return path
