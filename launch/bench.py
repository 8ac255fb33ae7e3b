"""Benchmarks, measured as ratios within one run, each with a parity figure that says the two sides being timed
compute the same thing (a ratio between implementations that disagree measures nothing).

model (default): one training step (forward + backward + AdamW step) of latentmoe against transformers'
DeepseekV2ForCausalLM, same config, same weights, same batch, one process. Parity: the largest and mean absolute
logit difference and the relative loss difference of the two models on those weights and that batch, in fp32 and
eval mode (the weights cast up when the timed steps run in bf16). transformers' experts implementation is pinned
(`--hf-experts`); the JSON records it and the attention and experts kernels each side ran.

    python launch/bench.py                                  # tiny preset on CPU
    python launch/bench.py --preset v2_lite --layers 4 --batch 4 --seq 2048      # on a GPU: V2-Lite shape, depth 4

data: the streaming data pipeline's tokens/s beside the tokenizer's raw encode_batch tokens/s on the same text.
Parity: an unshuffled pipeline's rows (inputs and targets) against the raw encodings of the same documents, each
followed by EOS, concatenated and cut into rows; and the shuffled (timed) pipeline's first rows against those rows.

ep: one MoE layer under expert parallelism (the all-to-all dispatcher, `--ep` processes) against the same layer with
all experts local, on the same tokens; and the bytes each token's copies send to other ranks against the minimum
the routing requires (one row per distinct remote rank). Parity: the largest absolute difference between the
expert-parallel layer's output and the all-experts-local output on each rank's tokens.

    python launch/bench.py ep --ep 2                        # CPU processes over gloo
    python launch/bench.py ep --ep 8 --preset v2 --tokens 8192     # 8 GPUs over NCCL

    python launch/bench.py data                             # built-in corpus and BPE
    python launch/bench.py data --tokenizer /ckpt/DeepSeek-V2-Lite --paths '/data/*.jsonl'

Prints step time, tokens/s and MFU for both and the throughput ratio. MFU = model FLOPs per token
(model/flops.py: activated parameters plus causal attention) x tokens/s / peak, where the peak is given with
--peak-tflops or measured in the same run with a large matmul in the benchmark dtype.
"""

from __future__ import annotations

import argparse
import gc
import json
import statistics
import sys
import time
from collections import Counter
from itertools import chain
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from model import CausalLM, ModelConfig, next_token_labels  # noqa: E402
from model.flops import parameter_counts, training_flops_per_token  # noqa: E402
from trainer.presets import available_model_presets, model_preset  # noqa: E402


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", default="tiny", choices=available_model_presets())
    p.add_argument("--layers", type=int, default=None, help="reduce depth to this many layers (keeps the dense prefix)")
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--seq", type=int, default=256)
    p.add_argument("--steps", type=int, default=10, help="timed steps per implementation")
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--rounds", type=int, default=5,
                   help="on CPU, alternate the implementations in this many blocks of timed steps")
    p.add_argument("--device", default="auto", help="auto (cuda if available), cpu, cuda, cuda:N")
    p.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16"],
                   help="parameter and activation dtype; auto = bfloat16 on CUDA, float32 on CPU")
    p.add_argument("--peak-tflops", type=float, default=None, help="hardware peak for MFU; default: measure it")
    p.add_argument("--no-hf", action="store_true", help="benchmark latentmoe only")
    p.add_argument("--hf-experts", default="grouped_mm", choices=["grouped_mm", "batched_mm", "eager"],
                   help="transformers' experts implementation (its default and fastest is grouped_mm)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", type=Path, default=None, help="also write the results to this JSON file")
    return p.parse_args(argv)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def measure_peak_tflops(device: torch.device, dtype: torch.dtype) -> tuple[float, str]:
    """Achieved TFLOP/s of a large square matmul in `dtype`: the practical peak for MFU."""
    n = 8192 if device.type == "cuda" else 1024
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    for _ in range(3):
        a @ b
    _sync(device)
    reps = 20 if device.type == "cuda" else 5
    start = time.perf_counter()
    for _ in range(reps):
        a @ b
    _sync(device)
    seconds = (time.perf_counter() - start) / reps
    return 2 * n ** 3 / seconds / 1e12, f"measured, {n}x{n} {str(dtype).removeprefix('torch.')} matmul"


class Trainee:
    """One implementation under test: its model, an AdamW optimizer and a loss closure; `step()` times one step."""

    def __init__(self, name: str, model: torch.nn.Module, loss_fn, device: torch.device):
        self.name, self.model, self.loss_fn, self.device = name, model, loss_fn, device
        self.optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, betas=(0.9, 0.95), weight_decay=0.1)
        self.times: list[float] = []
        self.loss = float("nan")

    def step(self, timed: bool) -> None:
        _sync(self.device)
        start = time.perf_counter()
        loss = self.loss_fn()
        loss.backward()
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        _sync(self.device)
        if timed:
            self.times.append(time.perf_counter() - start)
        self.loss = float(loss.detach())

    def result(self, args: argparse.Namespace, peak_mem_gib: float | None) -> dict:
        step = statistics.median(self.times)
        return {"step_s": step, "tokens_per_s": args.batch * args.seq / step, "peak_mem_gib": peak_mem_gib,
                "last_loss": self.loss, "timed_steps": len(self.times)}


def run_alone(trainee: Trainee, args: argparse.Namespace) -> dict:
    """Warm-up then all timed steps with nothing else on the device: the peak memory is this implementation's."""
    if trainee.device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(trainee.device)
    for i in range(args.warmup + args.steps):
        trainee.step(timed=i >= args.warmup)
    peak = torch.cuda.max_memory_allocated(trainee.device) / 2**30 if trainee.device.type == "cuda" else None
    return trainee.result(args, peak)


def run_interleaved(trainees: list[Trainee], args: argparse.Namespace) -> dict[str, dict]:
    """Alternate blocks of steps between implementations so that drift in machine speed (a shared CPU) hits both."""
    for trainee in trainees:
        for _ in range(args.warmup):
            trainee.step(timed=False)
    rounds = max(1, min(args.rounds, args.steps))
    for r in range(rounds):
        for trainee in trainees:
            for _ in range(args.steps // rounds + (r < args.steps % rounds)):
                trainee.step(timed=True)
    return {t.name: t.result(args, None) for t in trainees}


def logit_parity(config: ModelConfig, state: dict[str, torch.Tensor], build_theirs,
                 input_ids: torch.Tensor) -> dict:
    """Both implementations holding `state`, in fp32 and eval mode, one at a time on the batch's device, on the batch
    `input_ids` (B, S): max and mean |logit difference|, the largest |logit| (the scale they compare against) and
    the relative difference of the next-token loss. fp32 whatever dtype the steps are timed in, so the figure is the
    implementations' disagreement and not bf16 rounding; eval mode, so no balance loss or token dropping enters."""
    with torch.device(input_ids.device):
        ours = CausalLM(config)
    ours.load_state_dict(state, strict=True)
    with torch.no_grad():
        out = ours.eval()(input_ids, labels=next_token_labels(input_ids))
    logits, loss = out.logits, out.loss.item()  # (B, S, V)
    del ours, out
    theirs = build_theirs(torch.float32).eval()
    with torch.no_grad():
        reference = theirs(input_ids, labels=input_ids)  # transformers shifts the labels itself
    diff = (logits - reference.logits).abs()  # (B, S, V)
    return {"dtype": "float32", "mode": "eval", "logits_max_abs_diff": diff.max().item(),
            "logits_mean_abs_diff": diff.mean().item(), "logits_max_abs": reference.logits.abs().max().item(),
            "loss": loss, "loss_rel_diff": abs(loss - reference.loss.item()) / abs(reference.loss.item())}


def our_experts_kernel(model: CausalLM) -> str:
    """What the routed experts run in the model's dtype on its device: torch's grouped GEMM, or the per-expert loop
    that RoutedExperts falls back to where torch has none for them (e.g. fp32 on CUDA)."""
    from model.moe import _GROUPED_MM, _grouped_mm_supported

    if not model.moe_layers():
        return "none"
    experts = model.moe_layers()[0].experts
    rows = experts.gate_up_proj.new_empty(0, experts.gate_up_proj.shape[-1])  # (0, D): dtype and device only
    grouped = experts.impl == "grouped" and _GROUPED_MM is not None and _grouped_mm_supported(
        rows, experts.intermediate_size)
    return "grouped_mm" if grouped else "loop"


def build_config(args: argparse.Namespace) -> ModelConfig:
    overrides = {}
    if args.layers is not None:
        overrides["num_hidden_layers"] = args.layers
        base = model_preset(args.preset)
        overrides["first_k_dense_replace"] = min(base.first_k_dense_replace, args.layers)
    return model_preset(args.preset, **overrides)


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    device = torch.device("cuda" if args.device == "auto" and torch.cuda.is_available() else
                          ("cpu" if args.device == "auto" else args.device))
    dtype = {"auto": torch.bfloat16 if device.type == "cuda" else torch.float32,
             "float32": torch.float32, "bfloat16": torch.bfloat16}[args.dtype]
    config = build_config(args)
    if args.seq > config.max_position_embeddings:
        raise SystemExit(f"--seq {args.seq} exceeds max_position_embeddings={config.max_position_embeddings}")
    torch.manual_seed(args.seed)
    input_ids = torch.randint(0, config.vocab_size, (args.batch, args.seq), device=device)
    labels = next_token_labels(input_ids)

    counts = parameter_counts(config)
    flops_per_token = training_flops_per_token(config, args.seq)
    if args.peak_tflops is not None:
        peak, peak_source = args.peak_tflops, "given"
    else:
        peak, peak_source = measure_peak_tflops(device, dtype)
    print(f"config: {args.preset} ({config.num_hidden_layers} layers, {counts.total / 1e6:.1f}M params, "
          f"{counts.active / 1e6:.1f}M activated) | {device} {str(dtype).removeprefix('torch.')} | "
          f"batch {args.batch} x {args.seq} tokens | median of {args.steps} steps after {args.warmup} warm-up")
    print(f"model FLOPs/token: {flops_per_token / 1e6:.1f} MFLOP | peak {peak:.2f} TFLOP/s ({peak_source}) | "
          f"KV cache {config.kv_cache_elements_per_token()} elements/token ({config.attention_type})")

    with torch.device(device):
        ours = CausalLM(config).to(dtype)
    ours.train()

    def ours_loss():
        out = ours(input_ids, labels=labels)
        return out.loss if out.aux_loss is None else out.loss + out.aux_loss

    def build_theirs(dtype: torch.dtype) -> torch.nn.Module:
        """transformers' model holding `initial`, our weights: both sides name the routed experts gate_up_proj
        (E, 2I, D, gate rows first) and down_proj (E, D, I), so a strict load sets every tensor of theirs."""
        hf_config = DeepseekV2Config(**config.to_hf_config())
        hf_config._attn_implementation = "sdpa"
        hf_config._experts_implementation = args.hf_experts  # pinned: by default transformers picks at build time
        with torch.device(device):
            model = DeepseekV2ForCausalLM(hf_config).to(dtype)
        model.load_state_dict(initial, strict=True)
        return model

    def theirs_trainee() -> Trainee:
        model = build_theirs(dtype).train()
        results["implementations"]["transformers"] = {"attention": model.config._attn_implementation,
                                                      "experts": model.config._experts_implementation}
        return Trainee("transformers", model, lambda: model(input_ids, labels=input_ids).loss, device)

    results = {"config": args.preset, "layers": config.num_hidden_layers, "device": str(device),
               "dtype": str(dtype), "batch": args.batch, "seq": args.seq, "peak_tflops": peak,
               "flops_per_token": flops_per_token, "kv_cache_elements_per_token": config.kv_cache_elements_per_token(),
               "implementations": {"latentmoe": {"attention": "sdpa", "experts": our_experts_kernel(ours)}}}
    have_hf = False
    if not args.no_hf:
        try:
            from transformers import DeepseekV2Config, DeepseekV2ForCausalLM
            have_hf = True
        except ImportError:
            print("transformers is not installed (pip install -e '.[test]'); benchmarking latentmoe only")
    # A CPU copy, so the device's peak memory holds only the model being timed.
    initial = {k: v.detach().cpu().clone() for k, v in ours.state_dict().items()} if have_hf else {}
    if have_hf:
        parity = results["parity"] = logit_parity(config, initial, build_theirs, input_ids)
        print(f"parity (fp32, eval, same weights and batch): logits max |diff| {parity['logits_max_abs_diff']:.2e}, "
              f"mean {parity['logits_mean_abs_diff']:.2e} (largest |logit| {parity['logits_max_abs']:.2f}); "
              f"loss {parity['loss']:.4f}, relative diff {parity['loss_rel_diff']:.2e}")
        gc.collect()
        if device.type == "cuda":
            torch.cuda.empty_cache()
    mine = Trainee("latentmoe", ours, ours_loss, device)
    if device.type == "cuda":  # one at a time, so each peak memory is its own
        results["latentmoe"] = run_alone(mine, args)
        del mine, ours
        gc.collect()
        torch.cuda.empty_cache()
        if have_hf:
            results["transformers"] = run_alone(theirs_trainee(), args)
    else:
        results.update(run_interleaved([mine] + ([theirs_trainee()] if have_hf else []), args))

    print(f"{'':14s}{'step ms':>10s}{'tokens/s':>12s}{'MFU':>8s}{'peak mem':>10s}")
    for name in ("latentmoe", "transformers"):
        if name not in results:
            continue
        r = results[name]
        r["mfu"] = flops_per_token * r["tokens_per_s"] / (peak * 1e12)
        mem = f"{r['peak_mem_gib']:.2f}G" if r["peak_mem_gib"] is not None else "n/a"
        print(f"{name:14s}{r['step_s'] * 1e3:10.1f}{r['tokens_per_s']:12.0f}{r['mfu'] * 100:7.2f}%{mem:>10s}")
    if "transformers" in results:
        ratio = results["latentmoe"]["tokens_per_s"] / results["transformers"]["tokens_per_s"]
        results["ratio"] = ratio
        print(f"ratio latentmoe / transformers tokens/s: {ratio:.2f}x")
    print("kernels: " + " | ".join(f"{name} attention {k['attention']}, experts {k['experts']}"
                                   for name, k in results["implementations"].items()))
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))
    return results


def packed_reference(tokenizer, texts: list[str], seq: int) -> np.ndarray:
    """(R, 2 * seq) int64: the rows a correct pretraining pipeline makes of `texts` before shuffling, each as its
    inputs then its targets. Built from the raw tokenizer alone: each document's encoding (with the tokenizer's own
    special tokens) then EOS, concatenated and cut into windows of seq + 1 tokens (inputs window[:-1], targets
    window[1:]); the last partial window is left out."""
    eos = [] if tokenizer.eos_id is None else [tokenizer.eos_id]
    stream = np.fromiter(chain.from_iterable(e.ids + eos for e in tokenizer.tokenizer.encode_batch(texts)), np.int64)
    windows = stream[:len(stream) // (seq + 1) * (seq + 1)].reshape(-1, seq + 1)  # (R, seq + 1)
    return np.concatenate((windows[:, :-1], windows[:, 1:]), axis=1)


def batch_rows(batch: dict[str, torch.Tensor]) -> np.ndarray:
    """A pretraining micro-batch as (B, 2 * seq) int64 rows, inputs then targets, as `packed_reference` lays them."""
    return torch.cat((batch["input_ids"], batch["labels"]), dim=1).numpy()


def data_main(argv: list[str]) -> dict:
    from data.config import DataConfig
    from data.loader import Pipeline, build_loader, build_source, build_tokenizer
    from data.sources import Position

    p = argparse.ArgumentParser(prog="bench.py data", description="data pipeline vs raw tokenizer throughput")
    p.add_argument("--tokenizer", default=None, help="tokenizer.json or checkpoint dir (default: built-in BPE)")
    p.add_argument("--paths", nargs="*", default=[], help="JSON Lines / Parquet / text globs (default: built-in)")
    p.add_argument("--seq", type=int, default=2048)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--cache-dir", default="~/.cache/latentmoe")
    p.add_argument("--rounds", type=int, default=3, help="timed repetitions on each side (medians reported)")
    p.add_argument("--max-mb", type=float, default=64, help="text measured (the corpus's first epoch, capped)")
    p.add_argument("--json", type=Path, default=None)
    args = p.parse_args(argv)
    cfg = DataConfig(source="files" if args.paths else "stdlib", paths=list(args.paths), tokenizer=args.tokenizer,
                     seq_len=args.seq, cache_dir=args.cache_dir)
    tokenizer = build_tokenizer(cfg)
    # The documents of one epoch (up to 64 MB), in memory, for the raw measurement; the pipeline reads the same.
    texts = []
    for record in build_source(cfg, "train", seed=0, rank=0, world=1).records(Position()):
        if record.position.epoch > 0 or sum(map(len, texts)) > args.max_mb * 2**20:
            break
        texts.append(record.payload)
    # Raw: the tokenizer alone over the in-memory texts, `rounds` times. Pipeline: one loader in steady state (one
    # pass of warm-up fills the shuffle buffer and the read-ahead), then `rounds` timed passes of the same number of
    # tokens. Medians on both sides; a shared machine's slow spells move single measurements by 30% or more.
    raw: dict[str, list[float]] = {}
    fast = "encode_batch_fast" if hasattr(tokenizer.tokenizer, "encode_batch_fast") else "encode_batch"
    for _ in range(args.rounds):
        for name in dict.fromkeys(("encode_batch", fast)):
            start = time.perf_counter()
            n_tokens = sum(len(e.ids) for e in getattr(tokenizer.tokenizer, name)(texts))
            raw.setdefault(name, []).append(n_tokens / (time.perf_counter() - start))

    # Parity, exact. The same pipeline without its shuffle buffer must hand out the reference rows in order, inputs
    # and targets. The timed (shuffled) loader's first R - shuffle_buffer rows come from its first R packed rows, so
    # each must be a reference row, none more often than the reference holds it.
    reference = packed_reference(tokenizer, texts, args.seq)  # (R, 2 * seq)
    ordered = Pipeline(cfg, tokenizer, build_source(cfg, "train", seed=0, rank=0, world=1), args.batch, seed=0,
                       rank=0, shuffle=False).batches()
    mismatched = 0
    for start in range(0, len(reference), args.batch):
        expected = reference[start:start + args.batch]  # (b, 2 * seq)
        mismatched += int((batch_rows(next(ordered)[0])[:len(expected)] != expected).sum())
    ordered.close()
    loader = build_loader(cfg, tokenizer, args.batch, seed=0)
    shuffled: list[np.ndarray] = []
    wanted = max(0, len(reference) - cfg.shuffle_buffer)

    def one_pass(keep: list | None = None) -> float:
        """At least the raw side's token count and at least 3 s, so buffered tokens cannot dominate the rate. `keep`
        collects the first `wanted` rows (the warm-up pass's, untimed)."""
        start, produced = time.perf_counter(), 0
        while produced < n_tokens or time.perf_counter() - start < 3.0:
            batch = next(loader)
            produced += batch["input_ids"].numel()
            if keep is not None and len(keep) * args.batch < wanted:
                keep.append(batch_rows(batch))
        return produced / (time.perf_counter() - start)

    one_pass(shuffled)
    pipeline = [one_pass() for _ in range(args.rounds)]
    loader.close()
    available = Counter(row.tobytes() for row in reference)
    unmatched = 0
    for row in np.concatenate(shuffled)[:wanted] if shuffled else []:
        key = row.tobytes()
        unmatched += available[key] == 0
        available[key] -= 1
    parity = {"rows_compared": len(reference), "tokens_compared": len(reference) * (args.seq + 1),
              "mismatched_tokens": mismatched, "shuffled_rows_checked": min(wanted, len(shuffled) * args.batch),
              "shuffled_rows_unmatched": int(unmatched)}
    med = statistics.median
    best_raw = max(med(v) for v in raw.values())
    ratio = med(pipeline) / best_raw
    results = {"documents": len(texts), "tokens": n_tokens, "pipeline_tokens_per_s": med(pipeline),
               **{f"raw_{k}_tokens_per_s": med(v) for k, v in raw.items()}, "ratio": ratio, "parity": parity}
    print(f"data: {len(texts)} documents, {n_tokens:,} tokens, tokenizer {tokenizer.source}, "
          f"median of {args.rounds} rounds")
    for name, rates in raw.items():
        print(f"  raw tokenizer {name:18s} {med(rates):12,.0f} tokens/s")
    print(f"  pipeline (read, tokenize, pack, shuffle, batch) {med(pipeline):12,.0f} tokens/s")
    print(f"  ratio pipeline / fastest raw: {ratio:.2f}")
    print(f"  parity with the raw tokenizer: first {len(reference):,} unshuffled rows ({parity['tokens_compared']:,} "
          f"tokens), {mismatched} input or target tokens differ; first {parity['shuffled_rows_checked']:,} shuffled "
          f"rows, {unmatched} not among those rows")
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))
    return results


def _ep_worker(rank: int, args: argparse.Namespace, port: int, queue) -> None:
    import os

    import torch.distributed as dist

    from model.moe import MoE
    from trainer.distributed import DistEnv
    from trainer.expert_parallel import AllToAllDispatcher, build_grid

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    cuda = torch.cuda.is_available() and torch.cuda.device_count() >= args.ep
    device = torch.device("cuda", rank) if cuda else torch.device("cpu")
    if cuda:
        torch.cuda.set_device(device)
    else:
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // args.ep))
    dist.init_process_group("nccl" if cuda else "gloo", rank=rank, world_size=args.ep)
    grid = build_grid(DistEnv(rank, args.ep, rank), pp=1, ep=args.ep)
    config = model_preset(args.preset)
    dtype = torch.bfloat16 if cuda else torch.float32
    torch.manual_seed(0)
    local = MoE(config).to(device, dtype)
    for p in local.parameters():
        torch.nn.init.normal_(p, 0.0, 0.02)
    offset, count = grid.expert_shard(config.n_routed_experts)
    sharded = MoE(config, expert_shard=(offset, count)).to(device, dtype)
    with torch.no_grad():
        for name, p in sharded.named_parameters():
            source = dict(local.named_parameters())[name]
            p.copy_(source[offset:offset + count] if name.startswith("experts.") else source)
    sharded.dispatcher = AllToAllDispatcher(grid, config.n_routed_experts)
    x = torch.randn(1, args.tokens, config.hidden_size, device=device, dtype=dtype,
                    generator=torch.Generator(device).manual_seed(rank))

    def timed(layer) -> float:
        times = []
        for i in range(args.warmup + args.steps):
            dist.barrier()
            _sync(device)
            start = time.perf_counter()
            y, _ = layer(x)
            y.float().square().mean().backward()
            _sync(device)
            if i >= args.warmup:
                times.append(time.perf_counter() - start)
        return statistics.median(times)

    t_local, t_ep = timed(local), timed(sharded)
    stats = sharded.dispatcher.stats
    ids, _, _ = sharded.gate(x.view(-1, config.hidden_size))
    ranks = ids // count
    distinct_remote = sum(len(set(row.tolist()) - {grid.ep_rank}) for row in ranks)
    row_bytes = config.hidden_size * x.element_size()
    runs = args.warmup + args.steps
    bytes_per_token = stats.rows_sent_remote * stats.row_bytes / (stats.tokens or 1)  # before the parity pass adds
    with torch.no_grad():  # parity: the same tokens through both layers (every rank takes part in the all-to-all)
        y_local, y_ep = local(x)[0].float(), sharded(x)[0].float()  # (1, tokens, D) each
    queue.put({"rank": rank, "local_s": t_local, "ep_s": t_ep, "bytes_per_token": bytes_per_token,
               "min_bytes_per_token": distinct_remote * row_bytes / args.tokens, "runs": runs,
               "dtype": str(dtype), "output_max_abs_diff": (y_ep - y_local).abs().max().item(),
               "output_max_abs": y_local.abs().max().item()})
    dist.destroy_process_group()


def ep_main(argv: list[str]) -> list[dict]:
    import socket

    import torch.multiprocessing as mp

    p = argparse.ArgumentParser(prog="bench.py ep", description="MoE layer: expert parallel vs local")
    p.add_argument("--ep", type=int, default=2)
    p.add_argument("--preset", default="tiny", choices=available_model_presets())
    p.add_argument("--tokens", type=int, default=2048, help="tokens per rank")
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--json", type=Path, default=None)
    args = p.parse_args(argv)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    procs = [ctx.Process(target=_ep_worker, args=(r, args, port, queue)) for r in range(args.ep)]
    for proc in procs:
        proc.start()
    results = sorted((queue.get(timeout=600) for _ in procs), key=lambda r: r["rank"])
    for proc in procs:
        proc.join()
    slowest = max(r["ep_s"] for r in results)
    local = statistics.median(r["local_s"] for r in results)
    sent = statistics.mean(r["bytes_per_token"] for r in results)
    minimum = statistics.mean(r["min_bytes_per_token"] for r in results)
    print(f"MoE layer of {args.preset}, {args.tokens} tokens per rank, forward + backward, median of {args.steps}")
    print(f"  all experts local (each rank, same tokens): {local * 1e3:8.2f} ms")
    print(f"  expert parallel, ep={args.ep} (slowest rank): {slowest * 1e3:8.2f} ms   ratio {slowest / local:.2f}")
    print(f"  bytes sent to other ranks per token: {sent:,.0f} (one row per copy); minimum for this routing "
          f"{minimum:,.0f} (one row per distinct remote rank); ratio {sent / max(minimum, 1e-9):.2f}")
    diff = max(r["output_max_abs_diff"] for r in results)
    scale = max(r["output_max_abs"] for r in results)
    print(f"  parity: expert parallel vs all experts local, max |output diff| {diff:.2e} over all ranks "
          f"({results[0]['dtype'].removeprefix('torch.')}; largest |output| {scale:.2e})")
    summary = {"local_s": local, "ep_s": slowest, "ratio": slowest / local, "bytes_per_token": sent,
               "min_bytes_per_token": minimum, "output_max_abs_diff": diff, "output_max_abs": scale,
               "dtype": results[0]["dtype"], "per_rank": results}
    if args.json:
        args.json.write_text(json.dumps(summary, indent=2))
    return results


if __name__ == "__main__":
    if sys.argv[1:2] == ["data"]:
        data_main(sys.argv[2:])
    elif sys.argv[1:2] == ["ep"]:
        ep_main(sys.argv[2:])
    else:
        main(sys.argv[1:] if sys.argv[1:2] != ["model"] else sys.argv[2:])
