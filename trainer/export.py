"""The Hugging Face export of a model sharded over experts and pipeline stages: the released layout, each rank
writing the tensors it holds, into a staging directory put in place whole (docs/checkpoints.md)."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import torch
import torch.distributed as dist

from data.tokenizer import TextTokenizer
from model import CausalLM
from model.hf import hf_tensors, save_pretrained, write_metadata, write_shard

from .layout import ProcessGrid


def export_hf(model: CausalLM, tokenizer: TextTokenizer, out: Path, grid: ProcessGrid) -> Path | None:
    """Hugging Face directory (collective): weights and config.json in the released layout, tokenizer.json and
    tokenizer_config.json. With experts sharded or pipeline stages, each (stage, EP rank) writes one shard
    (`model-0000k-of-0000n`): the stage's first data-parallel rank its dense tensors, the first expert-data-parallel
    replica its experts; rank 0 writes the index over all of them, so expert and pipeline parallelism never gather the
    model (ZeRO-3's partitions are gathered by the engine first). `model` is this rank's part of the CausalLM.
    Everything, tokenizer included, is written to `staging_dir(out)` first and put in place by `publish`: an
    interrupted export leaves the previous `out` as it was, never a config.json without its tokenizer.
    Returns the directory on rank 0."""
    dtype = getattr(torch, model.config.torch_dtype or "float32")
    staging = staging_dir(out)
    if grid.rank == 0:
        shutil.rmtree(staging, ignore_errors=True)
        staging.mkdir(parents=True)
    if grid.ep == 1 and grid.pp == 1:
        if grid.rank == 0:
            save_pretrained(model, staging, dtype=dtype)
    else:
        dist.barrier()
        sizes = {}
        dense, experts = grid.dp_rank == 0, grid.edp_rank == 0
        if (dense or experts) and any(True for _ in hf_tensors(model, dense=dense, experts=experts)):
            index, n_files = grid.stage * grid.ep + grid.ep_rank, grid.pp * grid.ep
            filename = f"model-{index + 1:05d}-of-{n_files:05d}.safetensors"
            sizes = {name: (filename, n) for name, n in write_shard(model, staging, filename, dtype, dense=dense,
                                                                    experts=experts).items()}
        parts = [None] * grid.world
        dist.all_gather_object(parts, sizes)
        if grid.rank == 0:
            merged = {name: entry for part in parts for name, entry in part.items()}
            write_metadata(model.config, staging, {n: f for n, (f, _) in merged.items()},
                           sum(size for _, size in merged.values()), dtype)
    if grid.rank != 0:
        return None
    tokenizer.save_pretrained(staging)
    publish(staging, out)
    return out


def staging_dir(out: Path) -> Path:
    """Where an export to `out` is written before it is put in place (beside it: the rename stays on one
    filesystem)."""
    return out.parent / f".{out.name}.staging"


def publish(staging: Path, out: Path) -> None:
    """Put the complete export `staging` at `out`. A previous export is moved aside first and deleted only once the
    new one is in place; a crash in between leaves it at `.<out>.previous`."""
    previous = out.parent / f".{out.name}.previous"
    shutil.rmtree(previous, ignore_errors=True)
    if out.exists():
        os.replace(out, previous)
    os.replace(staging, out)
    shutil.rmtree(previous, ignore_errors=True)
