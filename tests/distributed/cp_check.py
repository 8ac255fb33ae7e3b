"""Run under torchrun: context parallelism (every rank one part of the group) against the whole sequences in one
process, every rank checking its own share.

    torchrun --standalone --nproc_per_node=4 tests/distributed/cp_check.py --seq 64 --out result.json

For each case (plain causal sequences; packed documents whose boundaries fall inside chunks, positions restarting per
document; the same with activation checkpointing) the tiny model in fp32, in training mode with its three balance
losses, runs the global batch once whole and once split zigzag over the ranks (`trainer.context_parallel`). Each
rank's logits must equal the whole run's at its tokens, the summed loss the whole loss, and every gradient summed
over the ranks the whole gradient, within 1e-5 relative (plus 1e-7 absolute for values near zero). Bytes each rank
hands to all_gather are counted at torch.distributed's boundary. Rank 0 writes the measured differences to --out.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
import torch.distributed as dist

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from model import CausalLM, next_token_labels  # noqa: E402
from tests.distributed.torchrun import finish, init_gloo  # noqa: E402
from trainer.context_parallel import LatentExchange, chunk_index, split_sequences  # noqa: E402
from trainer.presets import model_preset  # noqa: E402

RTOL, ATOL = 1e-5, 1e-7


def packed(L: int, B: int, g: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """(document_ids, position_ids) of B rows of L tokens holding documents of random lengths (positions restart)."""
    docs, positions = torch.zeros(B, L, dtype=torch.long), torch.zeros(B, L, dtype=torch.long)
    for b in range(B):
        start, doc = 0, 0
        while start < L:
            n = int(torch.randint(3, max(4, L // 3), (1,), generator=g))
            docs[b, start:start + n], positions[b, start:start + n] = doc, torch.arange(min(n, L - start))
            start, doc = start + n, doc + 1
    return docs, positions


def loss_of(out, labels: torch.Tensor, tokens: int) -> torch.Tensor:
    """Summed cross-entropy over the supervised tokens / the whole batch's count, plus the balance losses."""
    ce = torch.nn.functional.cross_entropy(out.logits.flatten(0, 1), labels.flatten(), reduction="sum",
                                           ignore_index=-100)
    return ce / tokens, out.aux_loss


def relative(a: torch.Tensor, b: torch.Tensor) -> float:
    """The largest difference relative to the largest value."""
    return float((a - b).abs().max() / b.abs().max().clamp(min=1e-30))


def run_case(name: str, cp: int, rank: int, L: int, checkpointing: bool, documents: bool, worst: dict,
             tile: int, B: int) -> None:
    torch.manual_seed(0)
    whole = CausalLM(model_preset("tiny")).train()
    split = CausalLM(model_preset("tiny")).train()
    split.load_state_dict(whole.state_dict())
    whole.activation_checkpointing = split.activation_checkpointing = checkpointing
    split.context = LatentExchange(dist.group.WORLD, cp, rank, tile=tile)
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(3, whole.config.vocab_size, (B, L), generator=g)
    batch = {"input_ids": ids, "labels": next_token_labels(ids)}
    if documents:
        batch["document_ids"], batch["position_ids"] = packed(L, B, g)
    tokens = int((batch["labels"] != -100).sum())

    ce, aux = loss_of(whole(**{k: v for k, v in batch.items() if k != "labels"}), batch["labels"], tokens)
    (ce + aux).backward()
    part = split_sequences(batch, cp, rank)
    out = split(**{k: v for k, v in part.items() if k != "labels"})
    ce_part, aux_part = loss_of(out, part["labels"], tokens)
    # Every rank computes the whole sequences' balance losses (their statistics are summed over the group): each
    # contributes 1/cp of them, so the gradients summed over the ranks are the whole batch's.
    (ce_part + aux_part / cp).backward()

    whole_logits = whole(**{k: v for k, v in batch.items() if k != "labels"}).logits.detach()
    index = chunk_index(cp, rank, L // (2 * cp))
    worst["logits"] = max(worst.get("logits", 0.0), relative(out.logits.detach(), whole_logits[:, index]))
    total = ce_part.detach().clone()
    dist.all_reduce(total)
    ce, aux, aux_part = float(ce.detach()), float(aux.detach()), float(aux_part.detach())
    worst["loss"] = max(worst.get("loss", 0.0), abs(float(total) - ce) / abs(ce))
    worst["aux"] = max(worst.get("aux", 0.0), abs(aux_part - aux) / abs(aux))
    grads = 0
    for (n, p), (_, q) in zip(whole.named_parameters(), split.named_parameters(), strict=True):
        if p.grad is None:
            continue
        summed = q.grad.clone()
        dist.all_reduce(summed)
        worst[f"grad:{name}"] = max(worst.get(f"grad:{name}", 0.0), relative(summed, p.grad))
        if not torch.allclose(summed, p.grad, rtol=RTOL, atol=ATOL):
            raise AssertionError(f"{name}: gradient of {n} differs: {relative(summed, p.grad):.2e}")
        grads += 1
    for key in ("logits", "loss", "aux"):
        if worst[key] > RTOL:
            raise AssertionError(f"{name}: {key} differs by {worst[key]:.2e} relative")
    worst[f"grads_checked:{name}"] = grads


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--seq", type=int, default=64)
    p.add_argument("--batch", type=int, default=2)
    p.add_argument("--cases", default="causal,documents,checkpointing")
    p.add_argument("--tile", type=int, default=1024, help="tokens per attention tile (smaller: more, partial tiles)")
    p.add_argument("--out", required=True)
    args = p.parse_args()
    env = init_gloo(timeout_s=60)
    cp, rank = env.world_size, env.rank
    sent = {"bytes": 0}
    original = dist.all_gather

    def counting(outputs, tensor, group=None, async_op=False):  # the exchange's collective, counted as sent
        if tensor.is_floating_point():
            sent["bytes"] += tensor.numel() * tensor.element_size() * (len(outputs) - 1)
        return original(outputs, tensor, group=group, async_op=async_op)
    dist.all_gather = counting
    worst: dict = {}
    cases = {"causal": (False, False), "documents": (False, True), "checkpointing": (True, True)}
    for name in args.cases.split(","):
        checkpointing, documents = cases[name]
        run_case(name, cp, rank, args.seq, checkpointing=checkpointing, documents=documents, worst=worst,
                 tile=args.tile, B=args.batch)
    dist.all_gather = original
    worst["floating_bytes_sent_rank0"] = sent["bytes"]
    finish(env, args.out, worst)


if __name__ == "__main__":
    main()
