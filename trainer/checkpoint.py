"""Training checkpoints: every stateful thing, committed by a marker written last.

    <checkpoint.dir>/step_00000400/
        model_rank00000.safetensors      weights under CausalLM names, each expert once (`<param>.<expert>`): dense
                                         ones from each stage's first data-parallel rank, experts from their first
                                         replica, so any layout (ep, pp, engine) can read any other
        optimizer_rank00000.safetensors  AdamW state, same names (the built-in engine)
        deepspeed/                       DeepSpeed's own files (ZeRO partitions) under the DeepSpeed engines
        train_state.json           step, tokens seen, skipped steps, world size, layout, resolved config
        tokenizer.json             the run's tokenizer
        data_rank00000.json/.safetensors   each data-parallel rank's loader state
        rng_rank00000.safetensors  each rank's torch RNG states (CPU and CUDA)
        COMPLETE                   written by rank 0 after every rank finished (fsynced): the commit marker

`resume=auto` only ever considers directories holding COMPLETE, so a crash mid-save leaves something it skips (and
the next save or prune removes). Only safetensors and JSON are read back by our code: no pickle
(docs/checkpoints.md).
"""

from __future__ import annotations

import json
import os
import random
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file

from data.loader import merge_data_states
from data.tokenizer import TextTokenizer
from model.hf import CheckpointError, save_safetensors
from model.moe import RoutedExperts

from .config import NonFiniteError
from .distributed import DistEnv, barrier
from .faults import fault
from .integrity import digests, write_manifest
from .tensorfile import write_tensors

if TYPE_CHECKING:
    from .engines import Engine
    from .engines.base import ParamStates

COMPLETE = "COMPLETE"
PREFIX = "step_"
DELETING = ".deleting"
REJECTED = "rejected"
"""Where `resume=auto` moves a checkpoint that failed verification (kept for inspection, never resumed)."""


class CheckpointNotFound(ValueError):
    pass


def step_dir(root: str | os.PathLike, step: int) -> Path:
    return Path(root) / f"{PREFIX}{step:08d}"


def step_of(path: Path) -> int | None:
    """The step of a `step_<N>` checkpoint directory; None for another name (an imported model's directory)."""
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
    steps = sorted((s, p) for p in root.iterdir() if p.is_dir() and (s := step_of(p)) is not None)
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
    return chosen, [p for p in complete if step_of(p) > step_of(chosen)]


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
    save_safetensors(arrays, directory / f"{stem}.safetensors")
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


# ------------------------------------------------------------------------------------ weights and optimizer
# Stacked expert tensors are stored one expert at a time, as `<parameter>.<global expert index>`, so a checkpoint
# written with the experts sharded over any number of ranks loads into any other sharding: each rank writes the
# entries it owns (rank 0 the dense ones, the first expert-data-parallel replica the experts) and reads exactly the
# entries it holds.

def _expert_params(model: torch.nn.Module) -> dict[str, RoutedExperts]:
    return {f"{n}.{leaf}": m for n, m in model.named_modules() if isinstance(m, RoutedExperts)
            for leaf in m.stacked_leaves}


def _entries(model: torch.nn.Module, optimizer: torch.optim.Optimizer | ParamStates | None, dense: bool,
             experts: bool):
    """(entry name, parameter, index into its first dim or None, optimizer state, fp32 master or None) for the
    selected entries; the state and master are whole tensors of the parameter (`ParamStates`). Where the engine
    partitions its optimizer (DeepSpeed ZeRO) every parameter's state is gathered, selected or not, in the model's
    order, so every rank takes part in each collective. An expert trained on its own (ESFT:
    `RoutedExperts.set_trainable_experts`) is read from and written to its trainable copy, so its weights and AdamW
    moments keep the layout-independent entry names."""
    from .engines.base import param_states
    view = param_states(optimizer)

    def whole(p: torch.nn.Parameter) -> tuple[dict[str, torch.Tensor], torch.Tensor | None]:
        return (view.get(p), view.master(p)) if view is not None else ({}, None)

    stacked = _expert_params(model)
    for name, p in model.named_parameters():
        if name.endswith("_trainable"):
            continue  # entered under the stacked tensor's per-expert names below
        module = stacked.get(name)
        if module is None:
            state, master = whole(p)
            if dense:
                yield name, p, None, state, master
        else:
            copy = getattr(module, f"{name.rpartition('.')[2]}_trainable", None)
            held = {id(t): whole(t) for t in (p, copy) if t is not None}
            if not experts:
                continue
            position = {local: j for j, local in enumerate(module.trainable_ids or [])}
            for local in range(module.n_experts):
                target, index = (copy, position[local]) if local in position else (p, local)
                yield f"{name}.{module.expert_offset + local}", target, index, *held[id(target)]


def owned_tensors(model: torch.nn.Module, optimizer: torch.optim.Optimizer | ParamStates | None, dense: bool,
                  experts: bool) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """The weights and optimizer entries this rank writes, under layout-independent names. `optimizer`: the
    engine's (`Engine.optimizer`: our AdamW or DeepSpeed's `ParamStates`), or None for weights only; collective when
    that state is partitioned (every rank calls it). A weight the engine holds in lower precision (DeepSpeed bf16)
    is written as its fp32 master copy, so that any engine resumes from the exact weights."""
    weights, optim = {}, {}
    for key, p, index, state, master in _entries(model, optimizer, dense, experts):
        source = p if master is None else master
        weights[key] = (source if index is None else source[index]).detach().cpu().contiguous()
        for slot, value in state.items():
            # A scalar slot (AdamW's step) is shared by all experts of the stack: each entry gets its own copy.
            part = value.clone() if value.ndim == 0 else (value if index is None else value[index])
            optim[f"{key}::{slot}"] = part.detach().cpu().contiguous()
    return weights, optim


def _entry_index(directory: Path, stem: str) -> dict[str, Path]:
    index = {}
    for file in sorted(directory.glob(f"{stem}_rank*.safetensors")):
        with safe_open(str(file), framework="pt") as f:
            index.update(dict.fromkeys(f.keys(), file))
    return index


def load_owned_tensors(directory: Path, model: torch.nn.Module,
                       optimizer: torch.optim.Optimizer | ParamStates | None) -> None:
    """Fill this rank's weights from a checkpoint written at any expert-parallel layout, pipeline cut or engine;
    given the engine's optimizer (`Engine.optimizer`), also its state from the per-entry optimizer files and, where
    it keeps fp32 masters of lower-precision weights, those from the (fp32) weight entries. Not collective."""
    from .engines.base import param_states
    view = param_states(optimizer)
    weight_index = _entry_index(directory, "model")
    optim_index = _entry_index(directory, "optimizer") if view is not None else {}
    slots: dict[str, list[str]] = {}
    for name in optim_index:
        key, _, slot = name.rpartition("::")
        slots.setdefault(key, []).append(slot)
    wanted = list(_entries(model, None, dense=True, experts=True))
    missing = [key for key, *_ in wanted if key not in weight_index]
    if missing:
        raise CheckpointError(f"{directory}: {len(missing)} weights missing (e.g. {missing[:3]}); was it saved with "
                              "another model config?")
    handles: dict[Path, Any] = {}

    def read(index: dict[str, Path], key: str) -> torch.Tensor:
        if index[key] not in handles:
            handles[index[key]] = safe_open(str(index[key]), framework="pt")
        return handles[index[key]].get_tensor(key)

    def add(into: dict, slot: Any, value: torch.Tensor, index: int | None) -> None:
        if index is None or value.ndim == 0:
            # A tensor read by safe_open maps its file: kept as optimizer state it would hold the whole file's
            # mapping (and its copy-on-write pages) for the rest of the run. A copy lets the mapping go.
            into[slot] = value.clone()
        else:  # experts of one parameter come in local order 0, 1, ...: stacked below (a copy too)
            into.setdefault(slot, []).append(value)

    states: dict[torch.nn.Parameter, dict] = {}
    masters: dict[torch.nn.Parameter, Any] = {}
    with torch.no_grad():
        for key, p, index, *_ in wanted:
            value, target = read(weight_index, key), (p if index is None else p[index])
            if tuple(value.shape) != tuple(target.shape):
                raise CheckpointError(f"{directory}: {key} has shape {list(value.shape)}, the model expects "
                                      f"{list(target.shape)}")
            target.copy_(value)
            if not p.requires_grad:
                continue  # frozen (ESFT): the optimizer does not hold it
            if view is not None and view.keeps_masters:
                add(masters, p, value, index)
            for slot in slots.get(key, []):
                add(states.setdefault(p, {}), slot, read(optim_index, f"{key}::{slot}"), index)
    for module in model.modules():
        if isinstance(module, RoutedExperts):
            module.sync_trainable()
    if view is not None:
        def stacked(v: Any) -> torch.Tensor:
            return torch.stack(v) if isinstance(v, list) else v
        view.load({p: {k: stacked(v) for k, v in state.items()} for p, state in states.items()},
                  {p: stacked(v) for p, v in masters.items()})


# ------------------------------------------------------------------------------------ save / load
@dataclass
class SaveJob:
    """One checkpoint save: what each rank writes, and how it went. `files` holds the weight and optimizer tensors
    by file stem: live CPU tensors (or the gathered ones) while a synchronous save writes them, or the host copies
    a background save writes while training goes on (trainer/background.py)."""

    root: Path
    step: int
    files: dict[str, dict[str, torch.Tensor]]
    train_state: dict
    data_state: dict
    rng: dict
    tokenizer: TextTokenizer | None
    keep: int
    digests: dict[str, dict] = field(default_factory=dict)
    problems: list[str] = field(default_factory=list)
    non_finite: list[str] = field(default_factory=list)
    seconds: dict[str, float] = field(default_factory=dict)

    @property
    def path(self) -> Path:
        return step_dir(self.root, self.step)

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for ts in self.files.values() for t in ts.values())


def save_checkpoint(root: str | os.PathLike, step: int, engine: Engine, train_state: dict, data_state: dict,
                    env: DistEnv, keep: int, tokenizer: TextTokenizer | None = None) -> Path:
    """`save_sync`; returns the committed directory."""
    return save_sync(root, step, engine, train_state, data_state, env, keep, tokenizer).path


def save_sync(root: str | os.PathLike, step: int, engine: Engine, train_state: dict, data_state: dict,
              env: DistEnv, keep: int, tokenizer: TextTokenizer | None = None) -> SaveJob:
    """A synchronous save (collective: every rank calls it). Each rank writes the weights (and the AdamW state, in
    our per-entry layout) it owns (`engine.owns_dense`, `engine.owns_experts`), its data position and RNG, and
    whatever the engine keeps of its own (`engine.save_state`: DeepSpeed's partitions); rank 0 the train state and
    tokenizer. The commit protocol is `commit`'s; `trainer/background.py` runs the same one in a thread."""
    job = SaveJob(Path(root), step, {}, train_state, data_state, rng_state(), tokenizer, keep)
    start = time.perf_counter()
    with engine.full_weights():  # write inside: under ZeRO-3 the gathered storage is only valid here
        weights, optim = owned_tensors(engine.model, engine.optimizer, engine.owns_dense, engine.owns_experts)
        job.files = {"model": weights, "optimizer": optim} if engine.optimizer is not None else {"model": weights}
        if env.is_main:
            _fresh_dir(job)
        barrier(env)
        write_tensor_files(job, env)
    commit(job, env, engine_files=lambda: sorted(engine.save_state(job.path))[env.rank::env.world_size])
    job.seconds["stall"] = time.perf_counter() - start
    return job


def _fresh_dir(job: SaveJob) -> None:
    """Rank 0: an empty step directory (leftovers of an interrupted save of the same step removed). A failure is
    the job's problem, reported by `commit` like any other write."""
    try:
        if job.path.exists():
            shutil.rmtree(job.path)
        job.path.mkdir(parents=True)
    except OSError as e:
        job.problems.append(f"rank 0: creating {job.path} failed: {e.strerror or e}")


def write_tensor_files(job: SaveJob, env: DistEnv) -> None:
    """This rank's weight and optimizer files, each hashed and checked for NaN/Inf as it is written
    (trainer/tensorfile.py). Failures are recorded in the job, for `commit` to agree on."""
    start = time.perf_counter()
    if job.problems or not any(job.files.values()):
        return
    try:
        for stem, tensors in job.files.items():
            file = job.path / f"{stem}_rank{env.rank:05d}.safetensors"
            written = write_tensors(tensors, file, metadata={"format": "pt"})
            job.digests[file.name] = written.entry()
            if written.non_finite:
                job.non_finite.append(f"{written.non_finite} (rank {env.rank})")
            fault("save_shards", job.step)
    except (OSError, SafetensorError) as e:
        job.problems.append(_write_failure(job, env, e))
    job.seconds["write"] = time.perf_counter() - start


def _write_failure(job: SaveJob, env: DistEnv, e: Exception) -> str:
    file = getattr(e, "filename", None)
    named = f" ({file})" if file and str(file) not in str(e) else ""
    return f"rank {env.rank}: writing checkpoint {job.path} failed: {e}{named}"


def commit(job: SaveJob, env: DistEnv, engine_files=None, group=None) -> None:
    """Finish a save and commit it (collective over `group`, the job's ranks; docs/checkpoints.md): every rank
    writes its states (and `engine_files()`, the engine's own, fsynced and hashed a share each) and reports its
    problems and file digests; if any rank had one, nothing is committed, the step directory is removed and every
    rank raises the same error (NonFiniteError for NaN/Inf in the weights, CheckpointError for a failed write).
    Otherwise rank 0 writes the SHA-256 manifest (`integrity.json`, fsynced), then `COMPLETE` (fsynced), and prunes;
    its outcome is shared, so every rank returns or raises alike."""
    start = time.perf_counter()
    if not job.problems:
        try:
            mine = _write_states(job, env) + (engine_files() if engine_files is not None else [])
            for file in mine:
                _fsync_file(file)
            job.digests.update(digests(job.path, mine))
        except (OSError, SafetensorError) as e:
            job.problems.append(_write_failure(job, env, e))
    everyone = gather_objects((job.problems, job.non_finite, job.digests), env, group)
    problems = [p for part in everyone for p in part[0]]
    non_finite = [p for part in everyone for p in part[1]]
    outcome = None
    if env.is_main:
        if problems or non_finite:
            shutil.rmtree(job.path, ignore_errors=True)
            outcome = _failure(job, problems, non_finite)
        else:
            try:
                _mark_complete(job, {name: entry for part in everyone for name, entry in part[2].items()})
            except OSError as e:
                outcome = ("CheckpointError", f"rank 0: committing checkpoint {job.path} failed "
                                              f"({e.strerror or e}: {e.filename}); it is not committed, and the "
                                              f"newest complete checkpoint in {job.root} is still the one to resume")
    outcome = broadcast_object(outcome, env, group)
    job.seconds["commit"] = time.perf_counter() - start
    if outcome is not None:
        kind, message = outcome
        raise (NonFiniteError if kind == "NonFiniteError" else CheckpointError)(message)


def _failure(job: SaveJob, problems: list[str], non_finite: list[str]) -> tuple[str, str]:
    if non_finite:
        return "NonFiniteError", (f"step {job.step}: the weights are not finite ({'; '.join(non_finite[:3])}); they "
                                  f"were not checkpointed (the newest checkpoint in {job.root} is the last good one)")
    more = f" (and {len(problems) - 1} more: {'; '.join(problems[1:3])})" if len(problems) > 1 else ""
    return "CheckpointError", (f"{problems[0]}; it is not committed, and the newest complete checkpoint in "
                               f"{job.root} is still the one to resume (free space, or lower checkpoint.keep){more}")


def _mark_complete(job: SaveJob, manifest: dict[str, dict]) -> None:
    """Rank 0, every rank's files durable: the manifest, then the commit marker, then retention."""
    write_manifest(job.path, job.step, manifest, fault=lambda: fault("save_manifest", job.step))
    _fsync_dir(job.path)
    fault("save_marker", job.step)
    with open(job.path / COMPLETE, "w") as f:
        f.write(f"step {job.step}\n")
        f.flush()
        os.fsync(f.fileno())
    _fsync_dir(job.path)
    prune(job.root, job.keep, protect=job.path)


def _write_states(job: SaveJob, env: DistEnv) -> list[Path]:
    """Rank 0's train state and tokenizer, and every rank's data position and RNG; returns the files written."""
    path, written = job.path, []
    if env.is_main:
        _write_json(path / "train_state.json", job.train_state)
        written.append(path / "train_state.json")
        if job.tokenizer is not None:  # the exact tokenizer of the run travels with its weights
            job.tokenizer.save(path / "tokenizer.json")
            written.append(path / "tokenizer.json")
    save_state(path, f"data_rank{env.rank:05d}", job.data_state)
    fault("save", job.step)
    save_state(path, f"rng_rank{env.rank:05d}", job.rng)
    for stem in (f"data_rank{env.rank:05d}", f"rng_rank{env.rank:05d}"):
        written += [path / f"{stem}.json", path / f"{stem}.safetensors"]
    return written


def gather_objects(mine: Any, env: DistEnv, group=None) -> list:
    """Every rank's `mine`, in rank order, on every rank (collective over `group`, default the whole job)."""
    if not env.distributed:
        return [mine]
    everyone: list = [None] * env.world_size
    torch.distributed.all_gather_object(everyone, mine, group=group)
    return everyone


def broadcast_object(obj: Any, env: DistEnv, group=None) -> Any:
    """Rank 0's `obj` on every rank (collective over `group`)."""
    if not env.distributed:
        return obj
    box = [obj]
    torch.distributed.broadcast_object_list(box, src=0, group=group)
    return box[0]


def gather_problems(mine: list[str], env: DistEnv) -> list[str]:
    """Every rank's problems, on every rank (collective)."""
    return [p for problems in gather_objects(mine, env) for p in problems]


def _fsync_file(path: Path) -> None:
    with open(path, "rb+") as f:
        os.fsync(f.fileno())


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def prune(root: str | os.PathLike, keep: int, protect: Path | None = None) -> list[Path]:
    """Delete all but the newest `keep` complete checkpoints, and incomplete ones older than the newest complete.
    Never deleted: the newest complete checkpoint, and `protect` (the one just written and verified by its own
    save); checkpoints that failed verification were already moved to `rejected/` and do not count."""
    complete, incomplete = list_checkpoints(root)
    newest = step_of(complete[-1]) if complete else None
    doomed = complete[:-keep] if keep > 0 else []
    doomed += [p for p in incomplete if newest is not None and step_of(p) < newest]
    kept = {complete[-1].resolve()} if complete else set()
    if protect is not None:
        kept.add(Path(protect).resolve())
    doomed = [p for p in doomed if p.resolve() not in kept]
    for p in doomed:  # renamed first (atomic), so a crash mid-delete never leaves a half checkpoint marked complete
        trash = p.with_name(p.name + DELETING)
        os.replace(p, trash)
        fault("save_prune", step_of(protect) if protect is not None else None)
        shutil.rmtree(trash, ignore_errors=True)
    for trash in Path(root).glob(f"{PREFIX}*{DELETING}"):  # left by a crash mid-delete
        shutil.rmtree(trash, ignore_errors=True)
    return doomed


def describe_layout(layout: dict | None) -> str:
    if not layout:
        return "the built-in engine"
    if layout["engine"] != "deepspeed":
        return f"the built-in engine (dp {layout['dp']}, ep {layout['ep']})"
    stages = "" if layout["pp"] == 1 else f", pipeline format {layout.get('pipeline', 1)}"
    return f"DeepSpeed ZeRO-{layout['zero_stage']} (pp {layout['pp']}, dp {layout['dp']}, ep {layout['ep']}{stages})"


@dataclass
class Resume:
    """A checkpoint a run resumes from, its `train_state.json` read once, and what it restores under this run's
    layout: the optimizer state (with the engine's own), and the data position and RNG."""

    path: Path
    state: dict
    optimizer: bool
    data: bool

    @property
    def weights_only(self) -> bool:
        """Written by `launch/convert.py import` (or of another run's weights only): training starts at step 0."""
        return bool(self.state.get("weights_only"))

    @property
    def esft_selection(self) -> dict[int, list[int]] | None:
        """The experts the resumed ESFT run trains, as it chose them before its first step."""
        saved = self.state.get("esft_selection")
        return {int(k): list(v) for k, v in saved.items()} if saved is not None else None

    def to_dict(self) -> dict:
        return {"path": str(self.path), "state": self.state, "optimizer": self.optimizer, "data": self.data}

    @classmethod
    def from_dict(cls, d: dict) -> "Resume":
        return cls(Path(d["path"]), d["state"], d["optimizer"], d["data"])


def read_train_state(path: Path) -> dict:
    """A checkpoint's `train_state.json`; ValueError naming the file if it is missing or not JSON."""
    file = path / "train_state.json"
    try:
        return json.loads(file.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ValueError(f"{path}: no train_state.json (not a training checkpoint; an HF directory is started from "
                         "with model.pretrained=<dir>)") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"{file}: not valid JSON ({e})") from None


def plan_resume(path: Path, layout: dict, world_size: int, optimizer_resume: str = "strict",
                data_resume: str = "strict") -> Resume:
    """What a resume from `path` restores. Raises ValueError naming the key to set when the checkpoint cannot be
    resumed as it is; cheap, so it runs before any process group.

    Weights and optimizer state load at any layout and engine from our per-entry files (one entry per expert,
    CausalLM names), which every engine writes. At the layout that wrote it (`layout`: engine, ZeRO stage, pp, dp,
    ep, pipeline format) a DeepSpeed checkpoint restores from DeepSpeed's own partitions instead (bitwise). Under
    another layout `optimizer_resume=reset` continues from the weights with a fresh optimizer; `strict` keeps the
    optimizer, and refuses a DeepSpeed checkpoint without our optimizer files (written before they existed).
    The data position (canonical shards, docs/data.md) continues at any number of processes; `data_resume=reset`
    restarts the data stream instead (documents already seen are seen again)."""
    state = read_train_state(path)
    if state.get("weights_only"):
        return Resume(path, state, optimizer=False, data=False)
    saved = state.get("layout")
    deepspeed = saved is not None and saved.get("engine") == "deepspeed"
    same = saved == layout if deepspeed else layout.get("engine") != "deepspeed"
    per_entry = deepspeed and any(path.glob("optimizer_rank*.safetensors"))
    if deepspeed and not same and not per_entry and optimizer_resume != "reset":
        raise ValueError(f"{path}: written by {describe_layout(saved)}, resuming under {describe_layout(layout)}; "
                         f"it holds no per-parameter optimizer files ({path / 'optimizer_rank00000.safetensors'} "
                         "and the other ranks' are missing: written before DeepSpeed checkpoints carried them), and "
                         "DeepSpeed's own optimizer partitions only load into the layout (and pipeline format) that "
                         "wrote them. Resume with that layout, or set checkpoint.optimizer_resume=reset to continue "
                         "from the weights (any layout) with a fresh optimizer")
    keep = same or optimizer_resume != "reset"
    return Resume(path, state, optimizer=keep, data=data_resume != "reset")


def load_checkpoint(resume: Resume, engine: Engine, env: DistEnv) -> dict | None:
    """Restore what `resume` allows into the engine: at the layout that wrote it, DeepSpeed's own state (its
    partitions, bitwise); otherwise the optimizer state from our per-entry files (`Engine.optimizer`, any engine and
    layout); the weights from our files unless DeepSpeed's state held them (ZeRO-3); and this rank's RNG; returns
    this rank's data state, or None when the data stream restarts."""
    saved = resume.state.get("layout") or {}
    own = resume.optimizer and saved.get("engine") == "deepspeed" and saved == engine.cfg.layout(env.world_size)
    weights_restored = engine.load_state(resume.path) if own else False
    if not weights_restored:
        with engine.full_weights(modifier_rank=0):
            load_owned_tensors(resume.path, engine.model, engine.optimizer if resume.optimizer and not own else None)
    if not resume.optimizer:
        engine.weights_changed()  # e.g. ZeRO's fp32 masters were made from the initial weights
    if not resume.data:
        return None
    if resume.state.get("world_size") == env.world_size:  # RNG streams are per rank: only a same-size job has them
        set_rng_state(load_state(resume.path, f"rng_rank{env.rank:05d}"))
    # Each rank wrote the canonical data shards it owned; the shards this rank now holds come from any of them.
    files = sorted(resume.path.glob("data_rank*.json"))
    return merge_data_states([load_state(resume.path, f.stem) for f in files], names=[str(f) for f in files])


def load_model_weights(path: Path, model: torch.nn.Module) -> torch.nn.Module:
    """Only the weights of a checkpoint (any layout) into `model`."""
    load_owned_tensors(path, model, None)
    return model


def write_weights_only(path: Path, model: torch.nn.Module, config: dict) -> Path:
    """A committed checkpoint holding only weights (an imported HF model): training starts from it at step 0."""
    path.mkdir(parents=True, exist_ok=True)
    weights, _ = owned_tensors(model, None, dense=True, experts=True)
    save_safetensors(weights, path / "model_rank00000.safetensors", metadata={"format": "pt"})
    _write_json(path / "train_state.json", {"weights_only": True, "step": 0, "config": config})
    files = [path / "model_rank00000.safetensors", path / "train_state.json"]
    for file in files:
        _fsync_file(file)
    write_manifest(path, step_of(path) or 0, digests(path, files))
    (path / COMPLETE).write_text("weights only\n")
    return path
