"""A process that writes real checkpoints of a tiny model through `trainer.checkpoint.save_checkpoint` (the
production save path, with its test-only fault hook), for the save-phase and full-disk faults. Usage:

    python save_worker.py <root> <keep> <step> [<step> ...]

Each step trains one AdamW step first, so weights and moments change between checkpoints. With
LATENTMOE_FILE_LIMIT=<bytes>, writes after the first checkpoint fail as on a full disk (RLIMIT_FSIZE). With
LATENTMOE_BACKGROUND=1 the saves go through `trainer.background.BackgroundSaver` (`checkpoint.async_save`): each is
written while the next step trains, and the last is waited for."""

from __future__ import annotations

import contextlib
import os
import resource
import signal
import sys
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from model import CausalLM, ModelConfig  # noqa: E402
from trainer.background import BackgroundSaver  # noqa: E402
from trainer.checkpoint import save_checkpoint  # noqa: E402
from trainer.distributed import DistEnv  # noqa: E402


class Engine:
    """What save_checkpoint asks of an engine, over a real model and AdamW (the built-in engine's layout)."""

    def __init__(self):
        torch.manual_seed(0)
        self.model = CausalLM(ModelConfig(vocab_size=64, hidden_size=32, intermediate_size=48, moe_intermediate_size=16,
                                          num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=2,
                                          q_lora_rank=None, kv_lora_rank=16, qk_nope_head_dim=8, qk_rope_head_dim=8,
                                          v_head_dim=8, n_routed_experts=4, n_shared_experts=1,
                                          num_experts_per_tok=2, first_k_dense_replace=1))
        self.optimizer = torch.optim.AdamW(self.model.parameters(), lr=1e-3)
        self.owns_dense = self.owns_experts = True
        self.device = torch.device("cpu")

    def train_step(self) -> None:
        ids = torch.randint(0, 64, (2, 16))
        self.model(ids, labels=ids).loss.backward()
        self.optimizer.step()
        self.optimizer.zero_grad()

    def full_weights(self, modifier_rank=None):
        return contextlib.nullcontext()

    def save_state(self, path):
        return []


def main() -> None:
    root, keep, steps = sys.argv[1], int(sys.argv[2]), [int(s) for s in sys.argv[3:]]
    engine, env = Engine(), DistEnv()
    limit = os.environ.get("LATENTMOE_FILE_LIMIT")
    saver = BackgroundSaver(engine, env, timeout_s=60) if os.environ.get("LATENTMOE_BACKGROUND") else None
    for i, step in enumerate(steps):
        engine.train_step()
        if limit and i == 1:  # the disk fills up after the first checkpoint (committed: a background one waited for)
            if saver is not None:
                saver.wait()
            signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a write past the limit then fails with EFBIG
            resource.setrlimit(resource.RLIMIT_FSIZE, (int(limit), int(limit)))
        data = {"position": {"record": step}, "tokens": np.arange(step * 10, dtype=np.int32)}
        if saver is None:
            save_checkpoint(root, step, engine, {"step": step, "world_size": 1}, data, env, keep)
        else:
            saver.save(root, step, {"step": step, "world_size": 1}, data, keep, None)
        print(f"saved {step}", flush=True)
    if saver is not None:
        saver.wait()


if __name__ == "__main__":
    main()
