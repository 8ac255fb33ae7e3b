"""The Hugging Face export of a model sharded over experts and pipeline stages: the released layout, each rank
writing the tensors it holds."""

from __future__ import annotations

from pathlib import Path

import torch
import torch.distributed as dist

from data.tokenizer import TextTokenizer
from model import CausalLM
from model.hf import hf_tensors, remove_weights, save_pretrained, write_metadata, write_shard

from .layout import ProcessGrid


def export_hf(model: CausalLM, tokenizer: TextTokenizer, out: Path, grid: ProcessGrid) -> Path | None:
    """Hugging Face directory (collective): weights and config.json in the released layout, tokenizer.json and
    tokenizer_config.json. With experts sharded or pipeline stages, each (stage, EP rank) writes one shard
    (`model-0000k-of-0000n`): the stage's first data-parallel rank its dense tensors, the first expert-data-parallel
    replica its experts; rank 0 writes the index over all of them, so expert and pipeline parallelism never gather the
    model (ZeRO-3's partitions are gathered by the engine first). `model` is this rank's part of the CausalLM.
    Returns the directory on rank 0."""
    dtype = getattr(torch, model.config.torch_dtype or "float32")
    if grid.ep == 1 and grid.pp == 1:
        if grid.rank == 0:
            save_pretrained(model, out, dtype=dtype)
    else:
        if grid.rank == 0:
            remove_weights(out)
        dist.barrier()
        sizes = {}
        dense, experts = grid.dp_rank == 0, grid.edp_rank == 0
        if (dense or experts) and any(True for _ in hf_tensors(model, dense=dense, experts=experts)):
            index, n_files = grid.stage * grid.ep + grid.ep_rank, grid.pp * grid.ep
            filename = f"model-{index + 1:05d}-of-{n_files:05d}.safetensors"
            sizes = {name: (filename, n) for name, n in write_shard(model, out, filename, dtype, dense=dense,
                                                                    experts=experts).items()}
        parts = [None] * grid.world
        dist.all_gather_object(parts, sizes)
        if grid.rank == 0:
            merged = {name: entry for part in parts for name, entry in part.items()}
            write_metadata(model.config, out, {n: f for n, (f, _) in merged.items()},
                           sum(size for _, size in merged.values()), dtype)
    if grid.rank != 0:
        return None
    tokenizer.save_pretrained(out)
    return out
