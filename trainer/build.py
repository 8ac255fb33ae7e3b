"""This rank's model before an engine takes it: its pipeline stage and expert shard with layout-free initial weights,
the released weights when the run starts from them, and which parameters train (partial fine-tuning, ESFT)."""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch

from data.loader import build_loader
from data.tokenizer import TextTokenizer
from model import CausalLM
from model.hf import load_pretrained

from .checkpoint import Resume, load_model_weights
from .config import TrainConfig
from .context_parallel import LatentExchange
from .distributed import DistEnv
from .esft import apply_trainable, esft_selection
from .expert_parallel import attach_dispatchers
from .layout import ProcessGrid, stage_part, virtual_stages
from .lora import apply_lora


def build_model(cfg: TrainConfig, grid: ProcessGrid, device: torch.device, precision: str = "fp32") -> CausalLM:
    """This rank's part of the model on its device: its pipeline stage (a cut of CausalLM, layers under their global
    names) and its expert shard, with the all-to-all dispatcher under expert parallelism, token dropping and
    activation checkpointing as configured. Every weight is seeded by its name (and global expert), so the same
    seed gives the same weights at every layout (on one device type: CUDA generators draw other numbers than CPU
    ones). The part is built on the meta device and materialised directly on `device`, never whole on the host.
    With LoRA under bf16 `precision` it is materialised in bf16: the frozen base is held once, in the training
    dtype (`trainer/lora.py`)."""
    part = {}
    if grid.pp > 1:
        stages = [stage_part(cfg.model, parts, s) for parts, s in virtual_stages(cfg, grid.pp, grid.ep, grid.stage)]
        part = {"layers": sorted(i for st in stages for i in st.layers),
                "embedding": any(st.embedding for st in stages), "head": any(st.head for st in stages)}
    shard = grid.expert_shard(cfg.model.n_routed_experts) if grid.ep > 1 else None
    # Built on the meta device (no memory, and CausalLM skips its init there), then allocated once on this rank's
    # device and initialised in place: no rank ever holds more than its own part (docs/design.md, "Building the
    # model"). The init seed is still drawn from the global RNG inside CausalLM.__init__.
    with torch.device("meta"):
        model = CausalLM(cfg.model, expert_shard=shard, **part)
    if cfg.lora.enabled and precision == "bf16":
        model = model.to(torch.bfloat16)
    model = model.to_empty(device=device)
    model.init_weights()
    if grid.ep > 1:
        attach_dispatchers(model, grid)
    if grid.cp > 1:  # sequences split over the group; MLA exchanges its latent (trainer/context_parallel.py)
        model.context = LatentExchange(grid.cp_group, grid.cp, grid.cp_rank)
    model.set_token_dropping(cfg.moe.capacity_factor, cfg.moe.no_drop_fraction)
    model.activation_checkpointing = cfg.trainer.activation_checkpointing
    model.train()
    return model


def load_start_weights(cfg: TrainConfig, model: CausalLM, resume: Resume | None) -> str:
    """The released weights of `model.pretrained` into this rank's part of the model (only the tensors it holds),
    unless the run resumes from a checkpoint of its own. Returns where the weights come from, for the start line."""
    if resume is not None:
        return f"resumed from {resume.path} at step {0 if resume.weights_only else resume.state['step']}"
    if cfg.model.pretrained:
        load_pretrained(os.path.expanduser(cfg.model.pretrained), model=model)
        return f"released weights from {cfg.model.pretrained}"
    return f"fresh start (initialised from trainer.seed={cfg.trainer.seed})"


def setup_trainable(cfg: TrainConfig, model: CausalLM, tokenizer: TextTokenizer, grid: ProcessGrid,
                    device: torch.device, run_dir: Path, env: DistEnv, resume: Resume | None
                    ) -> tuple[dict[str, int], dict[int, list[int]] | None]:
    """Freeze what does not train: everything but the adapters under LoRA, `trainer.trainable` patterns and, for
    ESFT, every expert outside the selection. A resumed ESFT run keeps the selection its checkpoint holds; otherwise
    the experts are scored on the data with the weights training starts from. Returns ({trainable, total}
    parameters on this rank, the ESFT selection)."""
    if cfg.lora.enabled:
        return apply_lora(cfg.lora, model, cfg.trainer.seed), None
    selection = None
    if cfg.esft.enabled:
        selection = resume.esft_selection if resume is not None else None
        if selection is None:
            if resume is not None:  # score the weights training starts from, not the initial ones
                load_model_weights(resume.path, model)
            selection = choose_experts(cfg, model, tokenizer, grid, device, run_dir, env)
    return apply_trainable(model, cfg.trainer.trainable, selection), selection


def choose_experts(cfg: TrainConfig, model: CausalLM, tokenizer: TextTokenizer, grid: ProcessGrid,
                   device: torch.device, run_dir: Path, env: DistEnv) -> dict[int, list[int]]:
    """ESFT: score the experts on the first `esft.sample_batches` micro-batches of each rank's training data; the
    selection and the scores go to `<run dir>/esft_selection.json`."""
    loader = build_loader(cfg.data, tokenizer, cfg.trainer.micro_batch_size, cfg.trainer.seed, grid.dp_rank, grid.dp)
    try:
        batches = [next(loader) for _ in range(cfg.esft.sample_batches)]
    finally:
        loader.close()
    selection, relevance = esft_selection(model, batches, cfg.esft, device, grid.dp_group)
    if env.is_main:
        (run_dir / "esft_selection.json").write_text(json.dumps(
            {"score": cfg.esft.score, "threshold": cfg.esft.threshold, "selection": selection,
             "relevance": relevance}, indent=1))
    return selection
