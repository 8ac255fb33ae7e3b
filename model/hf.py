"""Hugging Face checkpoint I/O: the released DeepSeek-V2 directory layout (docs/model.md §6), safetensors only.

Our module names are the checkpoint's names except for the routed experts, which we keep stacked:

    model.layers.N.mlp.experts.gate_up_proj [E, 2I, D]  <->  model.layers.N.mlp.experts.{e}.gate_proj.weight [I, D]
                                                              model.layers.N.mlp.experts.{e}.up_proj.weight   [I, D]
    model.layers.N.mlp.experts.down_proj    [E, D, I]   <->  model.layers.N.mlp.experts.{e}.down_proj.weight [D, I]

Loading builds the model on the meta device, allocates it once in the target dtype, validates every shard's header
(names, shapes, offsets) before reading any data, then reads one tensor at a time with plain file reads straight into
its parameter (through a small reused buffer when the dtype or device differs), so the checkpoint is never held
twice and a rank needs no more host memory than the part of the model it holds: a memory
map would keep every touched page of a shard resident beside the model. No pickle is ever read and no remote code
is run.
"""

from __future__ import annotations

import json
import math
import os
import re
import struct
from collections.abc import Iterator
from pathlib import Path

import torch
from safetensors.torch import save_file

from .config import ModelConfig
from .lora import has_lora, is_lora_param, merged
from .moe import RoutedExperts
from .transformer import CausalLM

CONFIG_NAME = "config.json"
SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"
_MAX_HEADER_BYTES = 100 * 1024 * 1024
_DTYPES = {"BOOL": torch.bool, "U8": torch.uint8, "I8": torch.int8, "F8_E4M3": torch.float8_e4m3fn,
           "F8_E5M2": torch.float8_e5m2, "I16": torch.int16, "U16": torch.uint16, "F16": torch.float16,
           "BF16": torch.bfloat16, "I32": torch.int32, "U32": torch.uint32, "F32": torch.float32, "I64": torch.int64,
           "U64": torch.uint64, "F64": torch.float64}
_WEIGHT_DTYPES = {"F16", "BF16", "F32", "F64"}
_IGNORED = re.compile(r".*rotary_emb\.inv_freq$")  # non-persistent in the released code; some old exports hold it


class CheckpointError(ValueError):
    """A checkpoint directory or file that cannot be loaded as-is; the message names the file and/or tensor."""


# ---------------------------------------------------------------------------------------------------- name mapping
def _hf_slots(model: CausalLM, merge_lora: bool = False) -> Iterator[tuple[str, torch.Tensor]]:
    """(HF tensor name, view of our parameter that holds it), in checkpoint order, for the experts this model owns.
    LoRA factors are not checkpoint tensors; `merge_lora` (exports) gives each adapted tensor with its update
    added (a new fp32 tensor, model/lora.py `merged`) instead of the frozen base."""
    experts = {name: module for name, module in model.named_modules() if isinstance(module, RoutedExperts)}
    adapted = merge_lora and has_lora(model)
    for name, param in model.state_dict(keep_vars=True).items():  # (syncs ESFT's trainable expert copies first)
        if name.endswith("_trainable") or is_lora_param(name):
            continue
        prefix, _, leaf = name.rpartition(".")
        tensor = merged(model.get_submodule(prefix), leaf) if adapted else None  # LoRA merged in (fp32)
        tensor = param.detach() if tensor is None else tensor
        module = experts.get(prefix)
        if module is None:
            yield name, tensor
            continue
        inter = module.intermediate_size
        for local in range(module.n_experts):
            e = module.expert_offset + local
            if leaf == "gate_up_proj":
                yield f"{prefix}.{e}.gate_proj.weight", tensor[local, :inter]
                yield f"{prefix}.{e}.up_proj.weight", tensor[local, inter:]
            else:
                yield f"{prefix}.{e}.down_proj.weight", tensor[local]


_EXPERT_NAME = re.compile(r"(.*\.mlp\.experts)\.(\d+)\.(?:gate_proj|up_proj|down_proj)\.weight$")


def _owned_elsewhere(name: str, expert_layers: set[str], n_experts: int | None) -> bool:
    """A valid expert tensor of a layer this model holds only a shard of (expert parallelism): skip, not an error."""
    match = _EXPERT_NAME.match(name)
    return match is not None and match.group(1) in expert_layers and int(match.group(2)) < (n_experts or 0)


# ---------------------------------------------------------------------------------------------------- reading
def _read_json(path: Path) -> dict:
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except FileNotFoundError:
        raise CheckpointError(f"{path}: file not found") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{path}: not valid JSON ({e})") from None


def read_safetensors_header(path: Path) -> tuple[dict[str, dict], int]:
    """Parse and check a safetensors header without reading tensor data: ({name: {dtype, shape, data_offsets}},
    byte position where the data region starts).

    Catches truncated and padded files, absurd header lengths, bad JSON, byte counts that disagree with dtype and
    shape, offsets outside the data region and overlapping tensors, each reported with the file name.
    """
    size = path.stat().st_size
    if size < 8:
        raise CheckpointError(f"{path}: truncated safetensors file ({size} bytes; the 8-byte header length is missing)")
    with open(path, "rb") as f:
        (header_len,) = struct.unpack("<Q", f.read(8))
        if header_len > min(size - 8, _MAX_HEADER_BYTES):
            raise CheckpointError(f"{path}: corrupt or truncated safetensors file (header length {header_len} bytes, "
                                  f"file has {size - 8} bytes after the length field)")
        raw = f.read(header_len)
    try:
        header = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CheckpointError(f"{path}: corrupt safetensors header, not UTF-8 JSON ({e})") from None
    if not isinstance(header, dict):
        raise CheckpointError(f"{path}: corrupt safetensors header (not a JSON object)")
    header.pop("__metadata__", None)
    data_len = size - 8 - header_len
    spans = []
    for name, info in header.items():
        try:
            dtype, shape, (begin, end) = info["dtype"], info["shape"], info["data_offsets"]
            itemsize = _DTYPES[dtype].itemsize
            numel = math.prod(int(s) for s in shape)
        except (KeyError, TypeError, ValueError):
            raise CheckpointError(f"{path}: corrupt safetensors header entry for tensor {name!r}: {info!r}") from None
        if any(int(s) < 0 for s in shape) or not 0 <= begin <= end:
            raise CheckpointError(f"{path}: tensor {name!r} has invalid shape {shape} or offsets [{begin}, {end})")
        if end - begin != numel * itemsize:
            raise CheckpointError(f"{path}: tensor {name!r} ({dtype}, shape {shape}) needs {numel * itemsize} bytes "
                                  f"but its offsets span {end - begin}")
        if end > data_len:
            raise CheckpointError(f"{path}: truncated safetensors file: tensor {name!r} ends at byte {end} of the "
                                  f"data region, which holds only {data_len} bytes")
        spans.append((begin, end, name))
    spans.sort()
    for (_, e0, n0), (b1, _, n1) in zip(spans, spans[1:]):
        if b1 < e0:
            raise CheckpointError(f"{path}: corrupt safetensors file: tensors {n0!r} and {n1!r} overlap")
    covered = spans[-1][1] if spans else 0
    if covered != data_len:
        raise CheckpointError(f"{path}: corrupt safetensors file: {data_len - covered} bytes after the last tensor")
    return header, 8 + header_len


def _shard_map(directory: Path) -> dict[Path, list[str]]:
    """{shard file: tensor names it should hold}, from the index or the single-file layout."""
    index_path = directory / INDEX_FILE
    if index_path.exists():
        index = _read_json(index_path)
        weight_map = index.get("weight_map")
        if not isinstance(weight_map, dict) or not weight_map:
            raise CheckpointError(f"{index_path}: has no 'weight_map' object")
        shards: dict[Path, list[str]] = {}
        for name, shard in weight_map.items():
            shards.setdefault(directory / shard, []).append(name)
        for shard, names in shards.items():
            if not shard.is_file():
                raise CheckpointError(f"{shard}: shard listed in {INDEX_FILE} (for {len(names)} tensors, e.g. "
                                      f"{names[0]!r}) is missing")
        return shards
    single = directory / SINGLE_FILE
    if single.is_file():
        return {single: list(read_safetensors_header(single)[0])}
    if any(directory.glob("*.bin")) or any(directory.glob("*.pt")) or any(directory.glob("*.pth")):
        raise CheckpointError(f"{directory}: only pickle weights (.bin/.pt) found; they are never loaded. "
                              "Convert them to safetensors first.")
    raise CheckpointError(f"{directory}: neither {INDEX_FILE} nor {SINGLE_FILE} found")


def load_config(path: str | os.PathLike, **overrides) -> ModelConfig:
    """The ModelConfig of a Hugging Face checkpoint directory."""
    return ModelConfig.from_hf_config(_read_json(Path(path) / CONFIG_NAME), **overrides)


def load_pretrained(path: str | os.PathLike, dtype: torch.dtype | None = None, device: str | torch.device = "cpu",
                    check_finite: bool = True, model: CausalLM | None = None, **config_overrides) -> CausalLM:
    """Load a released-layout DeepSeek-V2 directory (config.json + safetensors shards) into a CausalLM.

    `dtype` defaults to the config's `torch_dtype` (bf16 for the released weights). `model` may be given to load into
    an already built (e.g. expert-sharded) model, or a part of one (a pipeline stage); then only the
    tensors it holds are read, and the others must still be valid tensors of its config. Raises CheckpointError
    naming the file or tensor for any missing, unexpected, mis-shaped, truncated, corrupt or non-finite tensor.
    """
    directory = Path(path)
    if not directory.is_dir():
        raise CheckpointError(f"{directory}: not a directory")
    if model is None:
        config = load_config(directory, **config_overrides)
        if dtype is None:
            dtype = getattr(torch, config.torch_dtype or "float32")
        with torch.device("meta"):
            model = CausalLM(config)
        model = model.to(dtype).to_empty(device=device)
    config = model.config
    shards = _shard_map(directory)

    # Pass 1: headers only. Every naming and shape problem is reported before any tensor data is read.
    plan = dict(_hf_slots(model))
    expert_layers = {n for n, m in model.named_modules() if isinstance(m, RoutedExperts)}
    elsewhere = _whole_model_names(config) if model.is_partial else set()  # other pipeline stages
    located: dict[str, Path] = {}
    headers: dict[Path, tuple[dict[str, dict], int]] = {}
    for shard, names in shards.items():
        header, _ = headers[shard] = read_safetensors_header(shard)
        unlisted = sorted(set(header) - set(names))
        if unlisted:  # the index must account for every tensor of its shards
            raise CheckpointError(f"{shard}: unexpected tensor {unlisted[0]!r} (in the shard but not in {INDEX_FILE}"
                                  f"{f', and {len(unlisted) - 1} more' if len(unlisted) > 1 else ''})")
        for name in names:
            if name not in header:
                raise CheckpointError(f"{shard}: tensor {name!r} is listed in {INDEX_FILE} but absent from the shard")
            if _IGNORED.match(name):
                continue
            if name not in plan:
                if _owned_elsewhere(name, expert_layers, config.n_routed_experts) or name in elsewhere:
                    continue
                raise CheckpointError(f"{shard}: unexpected tensor {name!r} (no such parameter in a "
                                      f"{config.attention_type} model with this config.json)")
            expected, found = tuple(plan[name].shape), tuple(header[name]["shape"])
            if expected != found:
                raise CheckpointError(f"{shard}: tensor {name!r} has shape {list(found)}, the model expects "
                                      f"{list(expected)}")
            if header[name]["dtype"] not in _WEIGHT_DTYPES:
                raise CheckpointError(f"{shard}: tensor {name!r} has dtype {header[name]['dtype']}; weights must be "
                                      f"one of {sorted(_WEIGHT_DTYPES)} (quantized checkpoints are not supported)")
            located[name] = shard
    missing = [name for name in plan if name not in located]
    if missing:
        raise CheckpointError(f"{directory}: {len(missing)} tensors missing from the checkpoint, e.g. {missing[:5]}")

    # Pass 2: the data, one tensor at a time.
    with torch.no_grad():
        for shard, names in shards.items():
            header, data_start = headers[shard]
            with open(shard, "rb") as f:
                for name in names:
                    if name in located:
                        _read_into(f, shard, name, header[name], data_start, plan[name], check_finite)
    return model


def _whole_model_names(config: ModelConfig) -> set[str]:
    """Every HF tensor name of a model with this config (built on the meta device: no memory, no init)."""
    with torch.random.fork_rng(devices=[]), torch.device("meta"):
        return {name for name, _ in _hf_slots(CausalLM(config))}


_CHUNK = 2**20  # elements per read buffer and per finiteness check: under 10 MiB of transient host memory


def _read_into(f, shard: Path, name: str, info: dict, data_start: int, target: torch.Tensor,
               check_finite: bool) -> None:
    """Read one tensor's bytes straight into `target` when dtype and device allow, else through a reused buffer of
    at most `_CHUNK` elements (a strided target: one temporary of its size). Transient host memory stays bounded
    whatever the tensor's size (V2's embedding is 0.8 GB in fp32), so loading holds little beyond the model."""
    begin, end = info["data_offsets"]
    dtype = _DTYPES[info["dtype"]]
    if end == begin:
        return
    f.seek(data_start + begin)
    direct = target.device.type == "cpu" and target.dtype == dtype and target.is_contiguous()
    if direct or not target.is_contiguous():
        tensor = target if direct else torch.empty(info["shape"], dtype=dtype)
        _read_exact(f, shard, name, tensor.view(-1))
        if not direct:
            target.copy_(tensor)
        pieces = target.view(-1).split(_CHUNK) if direct else (target,)
    else:
        pieces = target.view(-1).split(_CHUNK)
        buffer = torch.empty(min(_CHUNK, target.numel()), dtype=dtype)
        for piece in pieces:
            chunk = buffer[:piece.numel()]
            _read_exact(f, shard, name, chunk)
            piece.copy_(chunk)  # synchronous from pageable host memory, so the buffer can be reused at once
    # Checked after the cast, so a value that overflows the target dtype (fp32 -> fp16) is caught too; piecewise,
    # because isfinite makes temporaries (an abs copy and masks) the size of what it checks.
    if check_finite and not all(bool(torch.isfinite(piece).all()) for piece in pieces):
        raise CheckpointError(f"{shard}: tensor {name!r} contains NaN or Inf"
                              f"{'' if direct else f' after conversion to {target.dtype}'}")


def _read_exact(f, shard: Path, name: str, flat: torch.Tensor) -> None:
    """Fill the contiguous 1-D CPU tensor `flat` with the next bytes of `f`."""
    if f.readinto(memoryview(flat.view(torch.uint8).numpy())) != flat.numel() * flat.element_size():
        raise CheckpointError(f"{shard}: truncated while reading tensor {name!r}")


# ---------------------------------------------------------------------------------------------------- writing
def unwrap(model: torch.nn.Module) -> CausalLM:
    """The CausalLM (or part of one) inside DDP / DeepSpeed (`.module`) or torch.compile (`._orig_mod`) wrappers."""
    while not isinstance(model, CausalLM):
        inner = getattr(model, "module", None) or getattr(model, "_orig_mod", None)
        if inner is None:
            raise TypeError(f"expected a CausalLM (possibly wrapped), got {type(model).__name__}")
        model = inner
    return model


def save_safetensors(tensors: dict[str, torch.Tensor], path: str | os.PathLike,
                     metadata: dict[str, str] | None = None) -> None:
    """`safetensors.torch.save_file` with the permissions of a normally created file (0666 minus the umask):
    safetensors creates its files 0600, which another user or a serving container could not read."""
    save_file(tensors, str(path), metadata=metadata)
    os.chmod(path, 0o666 & ~_umask())


def _umask() -> int:
    """The process's umask, read without changing it where /proc allows (os.umask can only be read by setting it,
    which would race with threads creating files)."""
    try:
        with open("/proc/self/status", encoding="ascii") as f:
            return next(int(line.split()[1], 8) for line in f if line.startswith("Umask:"))
    except (OSError, StopIteration, ValueError):
        umask = os.umask(0o022)
        os.umask(umask)
        return umask


def _parse_size(size: int | str) -> int:
    if isinstance(size, int):
        return size
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMGT]?i?B)?\s*", size, re.IGNORECASE)
    if not match:
        raise ValueError(f"max_shard_size={size!r}: expected bytes or a size like '5GB' / '500MiB'")
    unit = (match.group(2) or "B").upper()
    base = 1024 if "I" in unit else 1000
    power = {"B": 0, "K": 1, "M": 2, "G": 3, "T": 4}[unit[0]]
    return int(float(match.group(1)) * base ** power)


def save_pretrained(model: CausalLM, path: str | os.PathLike, max_shard_size: int | str = "5GB",
                    dtype: torch.dtype | None = None) -> Path:
    """Write the released layout: per-expert tensor names, `model-0000i-of-0000n.safetensors` shards plus
    `model.safetensors.index.json` (or one `model.safetensors`), and `config.json`.

    Shards are written under temporary names and renamed when all are complete; the index and config come last, so an
    interrupted save never looks like a complete checkpoint. Stale shards of an earlier save are removed.
    """
    model = unwrap(model)
    if model.is_partial:
        raise ValueError("save_pretrained: this is a part of the model (a pipeline stage); each stage writes its "
                         "tensors with write_shard, one rank the index with write_metadata")
    partial = [n for n, m in model.named_modules() if isinstance(m, RoutedExperts) and m.n_experts != m.n_total]
    if partial:
        raise ValueError(f"save_pretrained: {partial[0]} holds {model.get_submodule(partial[0]).n_experts} of "
                         f"{model.config.n_routed_experts} experts; gather the expert shards before exporting")
    directory = Path(path)
    directory.mkdir(parents=True, exist_ok=True)
    limit = _parse_size(max_shard_size)
    dtype = dtype or next(model.parameters()).dtype

    tmp_files: list[Path] = []
    current: dict[str, torch.Tensor] = {}
    current_bytes = total = 0
    weight_map: dict[str, int] = {}  # tensor name -> shard number

    def flush() -> None:
        tmp = directory / f".tmp-shard-{len(tmp_files):05d}.safetensors"
        save_safetensors(current, tmp, metadata={"format": "pt"})
        tmp_files.append(tmp)
        current.clear()

    for name, tensor in _hf_slots(model, merge_lora=True):
        t = tensor.to(device="cpu", dtype=dtype).contiguous()
        nbytes = t.numel() * t.element_size()
        if current and current_bytes + nbytes > limit:
            flush()
            current_bytes = 0
        current[name] = t
        current_bytes += nbytes
        total += nbytes
        weight_map[name] = len(tmp_files)
    flush()

    remove_weights(directory)
    n = len(tmp_files)
    final_names = [SINGLE_FILE] if n == 1 else [f"model-{i + 1:05d}-of-{n:05d}.safetensors" for i in range(n)]
    for tmp, final in zip(tmp_files, final_names):
        os.replace(tmp, directory / final)
    write_metadata(model.config, directory, {name: final_names[i] for name, i in weight_map.items()}, total, dtype)
    return directory


# ------------------------------------------------------------------------------- pieces for a distributed export
# With experts sharded over processes, each process writes the shard of the tensors it holds (`write_shard`), then
# one process writes the index and config (`write_metadata`). save_pretrained is the one-process composition.

def hf_tensors(model: CausalLM, dense: bool = True, experts: bool = True) -> Iterator[tuple[str, torch.Tensor]]:
    """(HF name, tensor) of the dense tensors and/or the routed experts this model holds."""
    for name, tensor in _hf_slots(unwrap(model), merge_lora=True):
        if (experts if _EXPERT_NAME.match(name) else dense):
            yield name, tensor


def write_shard(model: CausalLM, directory: str | os.PathLike, filename: str, dtype: torch.dtype, dense: bool,
                experts: bool) -> dict[str, int]:
    """Write the selected tensors as one safetensors file (atomically); returns {HF name: bytes}."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    tensors = {name: t.to(device="cpu", dtype=dtype).contiguous() for name, t in hf_tensors(model, dense, experts)}
    tmp = directory / f".tmp-{filename}"
    save_safetensors(tensors, tmp, metadata={"format": "pt"})
    os.replace(tmp, directory / filename)
    return {name: t.numel() * t.element_size() for name, t in tensors.items()}


def remove_weights(directory: Path) -> None:
    """Delete the weight files and index of an earlier export into `directory`."""
    for stale in list(directory.glob("model-*-of-*.safetensors")) + [directory / SINGLE_FILE, directory / INDEX_FILE]:
        if stale.exists():
            stale.unlink()


def write_metadata(config: ModelConfig, directory: str | os.PathLike, weight_map: dict[str, str], total_size: int,
                   dtype: torch.dtype) -> None:
    """The index (when there are several files), generation_config.json and, last, config.json."""
    directory = Path(directory)
    if len(set(weight_map.values())) > 1:
        _write_json(directory / INDEX_FILE, {"metadata": {"total_size": total_size}, "weight_map": weight_map})
    hf_config = config.to_hf_config()
    hf_config["torch_dtype"] = str(dtype).removeprefix("torch.")
    _write_json(directory / "generation_config.json",
                {"bos_token_id": config.bos_token_id, "eos_token_id": config.eos_token_id})
    _write_json(directory / CONFIG_NAME, hf_config)


def _write_json(path: Path, obj: dict) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(obj, f, indent=2, sort_keys=True)
        f.write("\n")
    os.replace(tmp, path)
