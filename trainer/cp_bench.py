"""`launch/bench.py cp`: the bytes context parallelism exchanges, latent against full heads (docs/benchmarks.md,
"Context parallelism").

`--cp` CPU processes over gloo run the tiny preset's forward and backward on sequences split zigzag over them
(trainer/context_parallel.py). Every byte each rank hands torch.distributed for another rank is counted where the
exchange calls it (`all_gather` forward; `all_to_all` or `reduce_scatter` backward, the latent's gradients going
home), with the seconds spent inside those calls. A full-heads exchange of the same tokens (what torchtitan,
Megatron-Core and MaxText move for MLA) would send H x (dqk + dv) numbers a token and layer instead of r + dr; the
bench prints, per preset, `ratio full-heads / latent bytes (<preset>): N.Nx`, measured for tiny and computed from the
same formula for v2_lite and v2.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import torch

from trainer.context_parallel import per_token


def _worker(rank: int, args: argparse.Namespace, port: int, queue) -> None:
    import torch.distributed as dist

    from model import CausalLM, next_token_labels
    from trainer.context_parallel import LatentExchange, split_sequences
    from trainer.presets import model_preset

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=args.cp)
    counted = {"forward": 0, "backward": 0, "seconds": 0.0}
    calls = {name: getattr(dist, name) for name in ("all_gather", "all_to_all", "reduce_scatter")}

    def counting(name: str):
        def call(outputs, inputs, *rest, **kw):
            start = time.perf_counter()
            result = calls[name](outputs, inputs, *rest, **kw)
            counted["seconds"] += time.perf_counter() - start
            if name == "all_gather" and inputs.is_floating_point():
                counted["forward"] += inputs.numel() * inputs.element_size() * (len(outputs) - 1)
            elif name != "all_gather":
                counted["backward"] += sum(t.numel() * t.element_size() for i, t in enumerate(inputs) if i != rank)
            return result
        return call

    for name in calls:
        setattr(dist, name, counting(name))
    torch.manual_seed(0)
    config = model_preset(args.preset)
    model = CausalLM(config).train()
    model.context = LatentExchange(dist.group.WORLD, args.cp, rank)
    ids = torch.randint(3, config.vocab_size, (args.batch, args.seq), generator=torch.Generator().manual_seed(1))
    part = split_sequences({"input_ids": ids, "labels": next_token_labels(ids)}, args.cp, rank)
    start = time.perf_counter()
    out = model(part["input_ids"], position_ids=part["position_ids"])
    loss = torch.nn.functional.cross_entropy(out.logits.flatten(0, 1), part["labels"].flatten(), ignore_index=-100)
    (loss + out.aux_loss).backward()
    step_s = time.perf_counter() - start
    for name, fn in calls.items():
        setattr(dist, name, fn)
    queue.put({"rank": rank, "forward_bytes": counted["forward"], "backward_bytes": counted["backward"],
               "exchange_s": counted["seconds"], "step_s": step_s, "tokens": part["input_ids"].numel()})
    dist.barrier()
    dist.destroy_process_group()


def main(argv: list[str] | None = None) -> dict:
    from trainer.distributed import spawn_local
    from trainer.presets import model_preset

    p = argparse.ArgumentParser(prog="bench.py cp", description=__doc__.split("\n\n")[0])
    p.add_argument("--cp", type=int, default=2, help="context-parallel processes (CPU, gloo)")
    p.add_argument("--seq", type=int, default=4096, help="tokens per sequence (a multiple of 2 x cp)")
    p.add_argument("--batch", type=int, default=1, help="sequences")
    p.add_argument("--preset", default="tiny", help="the model measured (its attention must be MLA)")
    p.add_argument("--json", type=Path, default=None)
    args = p.parse_args(argv)
    results = spawn_local(_worker, args.cp, args)
    config = model_preset(args.preset)
    latent, heads = per_token(config)
    layers, element = config.num_hidden_layers, 4  # fp32 on CPU
    sent = sum(r["forward_bytes"] for r in results)
    full = sum(r["tokens"] for r in results) * heads * element * layers * (args.cp - 1)
    summary = {"preset": args.preset, "cp": args.cp, "seq": args.seq, "forward_bytes": sent,
               "backward_bytes": sum(r["backward_bytes"] for r in results),
               "latent_bytes_expected": sum(r["tokens"] for r in results) * latent * element * layers * (args.cp - 1),
               "full_heads_bytes": full, "ratio_measured": full / sent,
               "exchange_share": max(r["exchange_s"] / r["step_s"] for r in results), "per_rank": results,
               "ratios": {}}
    print(f"context parallelism cp={args.cp}, {args.preset}, {args.batch} x {args.seq} tokens, forward + backward, "
          f"fp32 over gloo: forward exchange {sent:,} bytes over all ranks (the latent: {latent} numbers a token and "
          f"layer), backward {summary['backward_bytes']:,}; a full-heads exchange would send {full:,} ({heads} "
          f"numbers); the exchange took at most {summary['exchange_share']:.1%} of a rank's step")
    summary["ratios"][args.preset] = full / sent
    print(f"ratio full-heads / latent bytes ({args.preset}): {full / sent:.1f}x")
    for name in ("tiny", "v2_lite", "v2"):
        if name != args.preset:
            lat, hd = per_token(model_preset(name))
            summary["ratios"][name] = hd / lat
            print(f"ratio full-heads / latent bytes ({name}): {hd / lat:.1f}x (computed: {hd} / {lat} numbers a "
                  "token and layer)")
    if args.json:
        args.json.write_text(json.dumps(summary, indent=2))
    return summary


if __name__ == "__main__":
    main(sys.argv[1:])
