"""Benchmarks, measured as ratios within one run, each with a parity figure that says the two sides being timed
compute the same thing (a ratio between implementations that disagree measures nothing).

model (default): one training step of latentmoe as the trainer runs it against transformers' DeepseekV2ForCausalLM,
same config, same weights, same batch, one process. Our side is `trainer.build.build_model` and the built-in
engine's `step` (the trainer's precision, compile default, activation checkpointing, clipping, statistics: exactly
what a run times); transformers' side is a plain forward + backward + AdamW step, one row per pinned experts
implementation (`--hf-experts`, default grouped_mm and eager). Parity first, on those weights and that batch in fp32
and eval mode (no balance loss, no token dropping): logits, the cross-entropy and every parameter's gradient of it;
the run stops with exit code 1 before timing anything if a figure breaks its stated tolerance (PARITY_TOLERANCES).

    python launch/bench.py                                  # tiny preset on CPU
    python launch/bench.py --preset v2_lite                 # on a GPU: V2-Lite widths, the depth chosen below
    python launch/bench.py --preset v2_lite --compile off --activation-checkpointing

data (data/benchmark.py): the streaming data pipeline's tokens/s beside the tokenizer's raw encode_batch tokens/s on
the same text.
Parity: an unshuffled pipeline's rows (inputs and targets) against the raw encodings of the same documents, each
followed by EOS, concatenated and cut into rows; and the shuffled (timed) pipeline's first rows against those rows.
Then the same documents pre-tokenized (written once, in a temporary folder, as .bin/.idx files): their pipeline's
tokens/s, its rows against the on-the-fly pipeline's (unshuffled and shuffled, exact) and the line
`ratio pretokenized / on-the-fly tokens/s: N.NNx`; a 3-source mixture (JSON Lines 0.5, two indexed sources 0.3 and
0.2), its tokens/s and its rows per source against the largest-deficit-first counts; what the pre-tokenized loader
sustains per process, also in rows/s of 4096 tokens; and data.shards 1, 8 and 32 (the first --shard-mb of the
documents as JSON Lines and as .bin/.idx files, same global order): tokens/s and time to the first micro-batch.

ep: one MoE layer under expert parallelism (the all-to-all dispatcher, `--ep` processes) against the same layer with
all experts local, on the same tokens; and the bytes each token's copies send to other ranks against the minimum
the routing requires (one row per distinct remote rank). Parity: the largest absolute difference between the
expert-parallel layer's output and the all-experts-local output on each rank's tokens.

    python launch/bench.py ep --ep 2                        # CPU processes over gloo
    python launch/bench.py ep --ep 8 --preset v2 --tokens 8192     # 8 GPUs over NCCL

    python launch/bench.py data                             # built-in corpus and BPE
    python launch/bench.py data --tokenizer /ckpt/DeepSeek-V2-Lite --paths '/data/*.jsonl'

eval (trainer/eval_bench.py): lm-eval tasks through our backend against lm-eval's hf backend (transformers) on one
Hugging Face directory, one process. Parity first (every request: log-likelihoods within 1e-4, the same greedy flags,
identical generations), then seconds for each and the line `ratio hf / ours seconds: N.NNx`.

    python launch/bench.py eval --hf outputs/<date>/<time>/hf            # the built-in tasks

checkpoint (trainer/checkpoint_bench.py): the training stall of a checkpoint save, synchronous against background
(`checkpoint.async_save`), on a model whose state passes 1 GB; save, verify and load seconds per GB; resumed against
fresh memory.

    python launch/bench.py checkpoint --json checkpoint.json

cp (trainer/cp_bench.py): context parallelism's exchange counted at torch.distributed's calls, MLA's latent against
what a full-heads exchange would send; prints `ratio full-heads / latent bytes (<preset>): N.Nx` per preset.

    python launch/bench.py cp --cp 2 --seq 4096

gpu: the one-shot GPU check (launch/gpu_check.py, docs/benchmarks.md#the-one-shot-gpu-check).

    python launch/bench.py gpu --out gpu_check.json

The model benchmark prints step time, tokens/s, MFU and peak memory of every row and the throughput ratios. MFU =
model FLOPs per token (model/flops.py: activated parameters plus causal attention) x tokens/s / one peak for every
row: --peak-tflops, or a large matmul in the benchmark dtype measured in the same run. Default depth: the preset's,
or the fewest layers at which the output head is under 15% of the FLOPs (on a GPU, no more than whose training
state fits 60% of its memory); the head's share is printed.
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import json
import statistics
import sys
import time
from pathlib import Path

import torch
from torch.utils._python_dispatch import TorchDispatchMode

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

if __name__ == "__main__" and sys.argv[1:2] == ["gpu"]:  # before the imports that need omegaconf (GPU images lack it)
    import runpy

    sys.argv = [str(Path(__file__).with_name("gpu_check.py")), *sys.argv[2:]]
    runpy.run_path(sys.argv[0], run_name="__main__")
    raise SystemExit(0)

from model import CausalLM, ModelConfig, next_token_labels  # noqa: E402
from model.flops import parameter_counts, training_flops_per_token  # noqa: E402
from trainer.presets import available_model_presets, model_preset  # noqa: E402

HEAD_SHARE_TARGET = 0.15
"""Default depth: the fewest layers at which the output head is under this share of the model FLOPs per token."""
STATE_BYTES_PER_PARAM = 16
"""The trainer's training state per parameter: fp32 weight and gradient, AdamW's two fp32 moments."""
GPU_MEMORY_FOR_STATE = 0.6
"""On a GPU the default depth keeps that state within this share of its memory (the rest: activations)."""
PARITY_TOLERANCES = {"logits_rel": 1e-4, "loss_rel": 1e-5, "grad_global_rel": 1e-4, "grad_tensor_rel": 1e-3}
"""fp32, same weights and batch: max |logit diff| / max |logit|; |loss diff| / loss; |grad diff| / |grad| over
all parameters together (global norms) and for the worst single tensor."""
HF_EXPERTS = ("grouped_mm", "batched_mm", "eager")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", default="tiny", choices=available_model_presets())
    p.add_argument("--layers", type=int, default=None,
                   help="depth (keeps the dense prefix); default: see above, the head's FLOPs share is printed")
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--seq", type=int, default=256)
    p.add_argument("--steps", type=int, default=10, help="timed steps per implementation")
    p.add_argument("--warmup", type=int, default=3, help="untimed steps first (they cover torch.compile)")
    p.add_argument("--rounds", type=int, default=5,
                   help="on CPU, alternate the implementations in this many blocks of timed steps")
    p.add_argument("--device", default="auto", help="auto (cuda if available), cpu, cuda, cuda:N")
    p.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16"],
                   help="auto = bfloat16 on CUDA, float32 on CPU: transformers' weights and the peak matmul; ours "
                        "runs trainer.precision (auto/fp32/bf16: fp32 weights, bf16 autocast)")
    p.add_argument("--compile", default="auto", choices=["auto", "on", "off"],
                   help="trainer.compile: auto (null, the trainer's default for the device), on, off")
    p.add_argument("--activation-checkpointing", action="store_true", help="trainer.activation_checkpointing=true")
    p.add_argument("--peak-tflops", type=float, default=None, help="hardware peak for MFU; default: measure it")
    p.add_argument("--no-hf", action="store_true", help="benchmark latentmoe only (no parity either)")
    p.add_argument("--hf-experts", nargs="+", default=["grouped_mm", "eager"], choices=HF_EXPERTS,
                   help="transformers' experts implementations, one row each (the first ratio line is the first)")
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


class PeakRSS:
    """Peak resident memory of this process over a span of steps, on Linux: VmHWM, reset to the current resident
    size by writing 5 to /proc/self/clear_refs. Unavailable elsewhere (then `read` gives None)."""

    def reset(self) -> bool:
        try:
            Path("/proc/self/clear_refs").write_text("5")
            return True
        except OSError:
            return False

    def read_gib(self) -> float | None:
        try:
            for line in Path("/proc/self/status").read_text().splitlines():
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 2**20  # kB
        except OSError:
            pass
        return None


class Side:
    """One row of the benchmark: `step_fn()` runs one training step and returns its loss; `step()` times it."""

    def __init__(self, name: str, step_fn, device: torch.device, kernels: dict):
        self.name, self.step_fn, self.device, self.kernels = name, step_fn, device, kernels
        self.times: list[float] = []
        self.first_step_s: float | None = None
        self.loss = float("nan")
        self.peak_mem_gib: float | None = None

    def step(self, timed: bool) -> None:
        _sync(self.device)
        start = time.perf_counter()
        self.loss = self.step_fn()
        _sync(self.device)
        elapsed = time.perf_counter() - start
        if self.first_step_s is None:
            self.first_step_s = elapsed  # includes torch.compile's compilation when it is on
        if timed:
            self.times.append(elapsed)

    def result(self, tokens: int) -> dict:
        step = statistics.median(self.times)
        return {"step_s": step, "tokens_per_s": tokens / step, "peak_mem_gib": self.peak_mem_gib,
                "first_step_s": self.first_step_s, "last_loss": self.loss, "timed_steps": len(self.times),
                **self.kernels}


def run_alone(side: Side, args: argparse.Namespace) -> None:
    """Warm-up then all timed steps with nothing else on the device: the peak memory is this implementation's."""
    if side.device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(side.device)
    for i in range(args.warmup + args.steps):
        side.step(timed=i >= args.warmup)
    if side.device.type == "cuda":
        side.peak_mem_gib = torch.cuda.max_memory_allocated(side.device) / 2**30


def run_interleaved(sides: list[Side], args: argparse.Namespace) -> None:
    """Alternate blocks of steps between implementations so that drift in machine speed (a shared CPU) hits all.
    Peak memory: the process's peak resident size over each implementation's own blocks (all models resident)."""
    rss = PeakRSS()

    def block(side: Side, n: int, timed: bool) -> None:
        reset = rss.reset()
        for _ in range(n):
            side.step(timed)
        peak = rss.read_gib() if reset else None
        if peak is not None:
            side.peak_mem_gib = max(side.peak_mem_gib or 0.0, peak)

    for side in sides:
        block(side, args.warmup, timed=False)
    rounds = max(1, min(args.rounds, args.steps))
    for r in range(rounds):
        for side in sides:
            block(side, args.steps // rounds + (r < args.steps % rounds), timed=True)


@contextlib.contextmanager
def exact_fp32():
    """fp32 matmuls without TF32 for the parity figures, whatever the process set."""
    before = torch.get_float32_matmul_precision()
    torch.set_float32_matmul_precision("highest")
    try:
        yield
    finally:
        torch.set_float32_matmul_precision(before)


def _grad_parity(ours: dict[str, torch.Tensor], theirs: dict[str, torch.Tensor]) -> dict:
    """Per-tensor and global relative differences of two {name: gradient} sets (a missing gradient is zero)."""
    diff_sq = ref_sq = 0.0
    worst, worst_name = 0.0, ""
    for name, g in ours.items():
        ref = theirs.get(name)
        ref = torch.zeros_like(g) if ref is None else ref.to(g.dtype)
        d, r = (g - ref).double().norm().item(), ref.double().norm().item()
        diff_sq, ref_sq = diff_sq + d * d, ref_sq + r * r
        rel = d / r if r > 0 else (0.0 if d == 0 else float("inf"))
        if rel > worst:
            worst, worst_name = rel, name
    return {"grad_global_rel_diff": diff_sq ** 0.5 / max(ref_sq ** 0.5, 1e-30), "grad_tensor_max_rel_diff": worst,
            "grad_worst_tensor": worst_name, "grad_tensors": len(ours)}


def parity(config: ModelConfig, state: dict[str, torch.Tensor], build_theirs, experts: list[str],
           input_ids: torch.Tensor) -> dict[str, dict]:
    """Both implementations holding `state`, in fp32 and eval mode, one at a time on the batch's device: logits,
    the next-token cross-entropy and the gradient of that loss alone for every parameter, for each transformers
    experts implementation in `experts`. fp32 whatever dtype the steps are timed in, so the figures are the
    implementations' disagreement and not bf16 rounding; eval mode, so no balance loss or token dropping enters."""
    device = input_ids.device
    with exact_fp32():
        with torch.device(device):
            ours = CausalLM(config)
        ours.load_state_dict(state, strict=True)
        out = ours.eval()(input_ids, labels=next_token_labels(input_ids))
        out.loss.backward()
        logits, loss = out.logits.detach(), out.loss.item()  # (B, S, V)
        grads = {n: p.grad for n, p in ours.named_parameters() if p.grad is not None}
        del ours, out
        results = {}
        for impl in experts:
            theirs = build_theirs(impl, torch.float32).eval()
            reference = theirs(input_ids, labels=input_ids)  # transformers shifts the labels itself
            reference.loss.backward()
            diff = (logits - reference.logits.detach()).abs()  # (B, S, V)
            ref_loss = reference.loss.item()
            results[impl] = {
                "dtype": "float32", "mode": "eval", "logits_max_abs_diff": diff.max().item(),
                "logits_mean_abs_diff": diff.mean().item(),
                "logits_max_abs": reference.logits.detach().abs().max().item(), "loss": loss,
                "loss_rel_diff": abs(loss - ref_loss) / abs(ref_loss),
                **_grad_parity(grads, {n: p.grad for n, p in theirs.named_parameters() if p.grad is not None})}
            del theirs, reference, diff
            gc.collect()
    return results


def parity_failures(figures: dict, tolerances: dict = PARITY_TOLERANCES) -> list[str]:
    """The figures of one parity check that break their tolerance, as readable lines (empty: parity holds)."""
    checks = [("logits max |diff| / max |logit|",
               figures["logits_max_abs_diff"] / max(figures["logits_max_abs"], 1e-30), tolerances["logits_rel"]),
              ("loss relative diff", figures["loss_rel_diff"], tolerances["loss_rel"]),
              ("gradient global relative diff", figures["grad_global_rel_diff"], tolerances["grad_global_rel"]),
              (f"gradient relative diff of {figures['grad_worst_tensor']}", figures["grad_tensor_max_rel_diff"],
               tolerances["grad_tensor_rel"])]
    return [f"{what} {value:.2e} > {tol:.0e}" for what, value, tol in checks if not value <= tol]


def experts_kernel(model: CausalLM, dtype: torch.dtype) -> str:
    """What the routed experts run in the compute dtype `dtype` on the model's device: torch's grouped GEMM, or the
    per-expert loop that RoutedExperts falls back to where torch has none for them (e.g. fp32 on CUDA)."""
    from model.moe import _GROUPED_MM, _grouped_mm_supported

    if not model.moe_layers():
        return "none"
    experts = model.moe_layers()[0].experts
    rows = experts.gate_up_proj.new_empty(0, experts.gate_up_proj.shape[-1], dtype=dtype)  # dtype and device only
    grouped = experts.impl == "grouped" and _GROUPED_MM is not None and _grouped_mm_supported(
        rows, experts.intermediate_size)
    return "grouped_mm" if grouped else "loop"


def attention_kernel(config: ModelConfig, device: torch.device, dtype: torch.dtype) -> str:
    """The attention kernel our model runs on this batch (plain causal, no packing), as model.attention names it."""
    import model.attention

    name = getattr(model.attention, "attention_kernel", None)
    if name is None or config.attention_type != "mla":
        return "sdpa"
    return name(config.qk_nope_head_dim + config.qk_rope_head_dim, config.v_head_dim, device, dtype, False)


def head_flops_share(config: ModelConfig, seq: int) -> float:
    """The output head's share of the model FLOPs per training token (model/flops.py counts it as a matmul of
    vocab_size x hidden_size activated parameters)."""
    return 6 * config.vocab_size * config.hidden_size / training_flops_per_token(config, seq)


def with_depth(preset: str, layers: int) -> ModelConfig:
    base = model_preset(preset)
    return model_preset(preset, num_hidden_layers=layers,
                        first_k_dense_replace=min(base.first_k_dense_replace, layers))


def default_depth(preset: str, seq: int, device: torch.device) -> tuple[int, str]:
    """(layers, why): the preset's depth, or the fewest layers (one MoE layer at least) at which the head is under
    HEAD_SHARE_TARGET of the FLOPs; on CUDA no more than whose training state fits GPU_MEMORY_FOR_STATE of the
    device's memory."""
    base = model_preset(preset)
    depths = range(min(base.num_hidden_layers, base.first_k_dense_replace + 1), base.num_hidden_layers + 1)
    depth = next((n for n in depths if head_flops_share(with_depth(preset, n), seq) < HEAD_SHARE_TARGET), None)
    why = (f"the preset's depth: no depth puts the head under {HEAD_SHARE_TARGET:.0%}" if depth is None else
           f"the fewest layers putting the head under {HEAD_SHARE_TARGET:.0%} of the FLOPs")
    depth = base.num_hidden_layers if depth is None else depth
    if device.type == "cuda":
        budget = GPU_MEMORY_FOR_STATE * torch.cuda.get_device_properties(device).total_memory
        fits = [n for n in depths if n <= depth and STATE_BYTES_PER_PARAM * parameter_counts(
            with_depth(preset, n)).total <= budget]
        capped = fits[-1] if fits else depths[0]
        if capped < depth:
            depth, why = capped, (f"capped: the most layers whose training state ({STATE_BYTES_PER_PARAM} bytes per "
                                  f"parameter) fits {GPU_MEMORY_FOR_STATE:.0%} of the GPU's memory")
    return depth, why


def trainer_config(args: argparse.Namespace, config: ModelConfig, device: torch.device):
    """The TrainConfig of a one-process run of `config` on this batch: trainer defaults except the batch, the
    benchmark's flags (precision, compile, activation checkpointing) and the optimizer the transformers side runs
    (AdamW lr 1e-4, betas 0.9/0.95, weight decay 0.1, constant learning rate)."""
    from trainer.config import Schedule, TrainConfig

    cfg = TrainConfig()
    cfg.model = config
    cfg.data.seq_len = args.seq
    t = cfg.trainer
    t.micro_batch_size = t.global_batch_size = args.batch
    t.max_steps, t.seed, t.device = args.warmup + args.steps, args.seed, str(device)
    t.precision = {"auto": "auto", "float32": "fp32", "bfloat16": "bf16"}[args.dtype]
    t.compile = {"auto": None, "on": True, "off": False}[args.compile]
    t.activation_checkpointing = args.activation_checkpointing
    cfg.optim.lr, cfg.optim.betas, cfg.optim.weight_decay = 1e-4, [0.9, 0.95], 0.1
    cfg.optim.warmup_steps, cfg.optim.schedule = 0, Schedule.constant
    cfg.validate(1, planning=True)
    return cfg


def trainer_precision(cfg, device: torch.device) -> str:
    """trainer.precision as the trainer resolves it (trainer/train.py): auto is bf16 autocast on GPUs, else fp32."""
    return cfg.trainer.precision if cfg.trainer.precision != "auto" else ("bf16" if device.type == "cuda" else "fp32")


def our_side(cfg, state: dict[str, torch.Tensor], device: torch.device, batch: dict) -> tuple[Side, dict]:
    """The trainer's model and built-in engine holding `state`, as a benchmark row, and how the trainer set it up."""
    from trainer.build import build_model
    from trainer.distributed import DistEnv
    from trainer.engines import build_engine
    from trainer.layout import ProcessGrid

    grid, precision = ProcessGrid(), trainer_precision(cfg, device)
    model = build_model(cfg, grid, device)
    model.load_state_dict(state, strict=True)
    engine = build_engine(model, cfg, grid, DistEnv(), device, precision)  # compiles as trainer.compile says
    compiled = any(getattr(layer, "_compiled_call_impl", None) is not None for layer in model.model.layers.values())
    compute = torch.bfloat16 if precision == "bf16" else torch.float32
    kernels = {"attention": attention_kernel(cfg.model, device, compute), "experts": experts_kernel(model, compute)}
    setup = {"precision": precision, "compile": cfg.trainer.compile, "compiled": compiled,
             "activation_checkpointing": cfg.trainer.activation_checkpointing, "engine": engine.name}
    step = iter(range(10**9))
    return Side("latentmoe", lambda: engine.step(next(step), [batch]).loss, device, kernels), setup


def hf_side(build_theirs, impl: str, dtype: torch.dtype, input_ids: torch.Tensor) -> Side:
    """transformers' model with experts implementation `impl`, weights in `dtype`: forward, backward, AdamW."""
    model = build_theirs(impl, dtype).train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, betas=(0.9, 0.95), weight_decay=0.1)

    def step() -> float:
        loss = model(input_ids, labels=input_ids).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return float(loss.detach())

    kernels = {"attention": model.config._attn_implementation, "experts": model.config._experts_implementation}
    return Side(f"transformers {impl}", step, input_ids.device, kernels)


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    device = resolve_device(args.device)
    dtype = {"auto": torch.bfloat16 if device.type == "cuda" else torch.float32,
             "float32": torch.float32, "bfloat16": torch.bfloat16}[args.dtype]
    layers, depth_why = (args.layers, "--layers") if args.layers else default_depth(args.preset, args.seq, device)
    config = with_depth(args.preset, layers)
    if args.seq > config.max_position_embeddings:
        raise SystemExit(f"--seq {args.seq} exceeds max_position_embeddings={config.max_position_embeddings}")
    input_ids = torch.randint(0, config.vocab_size, (args.batch, args.seq),
                              generator=torch.Generator().manual_seed(args.seed)).to(device)
    batch = {"input_ids": input_ids, "labels": next_token_labels(input_ids)}
    cfg = trainer_config(args, config, device)

    counts = parameter_counts(config)
    flops_per_token = training_flops_per_token(config, args.seq)
    head_share = head_flops_share(config, args.seq)
    peak, peak_source = ((args.peak_tflops, "given") if args.peak_tflops is not None else
                         measure_peak_tflops(device, dtype))
    print(f"config: {args.preset} ({config.num_hidden_layers} layers: {depth_why}; {counts.total / 1e6:.1f}M "
          f"params, {counts.active / 1e6:.1f}M activated) | {device} | batch {args.batch} x {args.seq} tokens | "
          f"median of {args.steps} steps after {args.warmup} warm-up")
    print(f"model FLOPs/token: {flops_per_token / 1e6:.1f} MFLOP, output head {head_share:.1%} of them | peak "
          f"{peak:.2f} TFLOP/s ({peak_source}), the one peak of every MFU below | KV cache "
          f"{config.kv_cache_elements_per_token()} elements/token ({config.attention_type})")
    results = {"config": args.preset, "layers": config.num_hidden_layers, "depth_choice": depth_why,
               "device": str(device), "dtype": str(dtype), "batch": args.batch, "seq": args.seq,
               "peak_tflops": peak, "peak_source": peak_source, "flops_per_token": flops_per_token,
               "head_flops_share": head_share, "kv_cache_elements_per_token": config.kv_cache_elements_per_token()}

    from trainer.build import build_model
    from trainer.layout import ProcessGrid

    torch.manual_seed(args.seed)  # the base seed of every weight's own generator, as the trainer sets it
    # The trainer's initial weights, kept on the CPU so the device holds only the model being checked or timed.
    initial = {k: v.detach().cpu().clone() for k, v in build_model(cfg, ProcessGrid(), device).state_dict().items()}
    _free(device)
    hf = None if args.no_hf else _import_transformers()

    def build_theirs(impl: str, dtype: torch.dtype) -> torch.nn.Module:
        """transformers' model holding `initial`, our weights: both sides name the routed experts gate_up_proj
        (E, 2I, D, gate rows first) and down_proj (E, D, I), so a strict load sets every tensor of theirs."""
        hf_config = hf.DeepseekV2Config(**config.to_hf_config())
        hf_config._attn_implementation = "sdpa"
        hf_config._experts_implementation = impl  # pinned: by default transformers picks at build time
        with torch.device(device):
            model = hf.DeepseekV2ForCausalLM(hf_config).to(dtype)
        model.load_state_dict(initial, strict=True)
        return model

    if hf is not None:
        results["parity"] = check_parity(config, initial, build_theirs, args.hf_experts, input_ids)
        _free(device)
    tokens = args.batch * args.seq
    makers = [lambda: our_side(cfg, initial, device, batch)]
    makers += [(lambda impl=impl: (hf_side(build_theirs, impl, dtype, input_ids), None))
               for impl in (args.hf_experts if hf is not None else [])]
    sides = []
    if device.type == "cuda":  # one at a time, so each peak memory is its own
        for make in makers:
            side, setup = make()
            results["trainer"] = setup or results.get("trainer")
            run_alone(side, args)
            sides.append(side)
            side.step_fn = None  # drop the model and its optimizer before the next one is built
            _free(device)
    else:
        built = [make() for make in makers]
        results["trainer"] = built[0][1]
        sides = [side for side, _ in built]
        run_interleaved(sides, args)
    report(results, sides, tokens, flops_per_token, peak, args.hf_experts)
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))
    return results


def _import_transformers():
    try:
        import transformers
        transformers.DeepseekV2ForCausalLM  # noqa: B018 (5.x has it natively)
        return transformers
    except (ImportError, AttributeError):
        print("transformers with DeepseekV2ForCausalLM is not installed (pip install -e '.[test]'); benchmarking "
              "latentmoe only")
        return None


def _free(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def check_parity(config: ModelConfig, initial: dict, build_theirs, experts: list[str],
                 input_ids: torch.Tensor) -> dict:
    """The parity figures of every transformers row, printed; SystemExit (exit code 1) if any breaks tolerance."""
    figures = parity(config, initial, build_theirs, experts, input_ids)
    broken = []
    for impl, p in figures.items():
        print(f"parity with transformers ({impl} experts; fp32, eval, same weights and batch): logits max |diff| "
              f"{p['logits_max_abs_diff']:.2e}, mean {p['logits_mean_abs_diff']:.2e} (largest |logit| "
              f"{p['logits_max_abs']:.2f}); loss {p['loss']:.4f}, relative diff {p['loss_rel_diff']:.2e}; gradients "
              f"of the loss over {p['grad_tensors']} tensors: global relative diff {p['grad_global_rel_diff']:.2e}, "
              f"worst tensor {p['grad_tensor_max_rel_diff']:.2e} ({p['grad_worst_tensor']})")
        broken += [f"{impl}: {line}" for line in parity_failures(p)]
    if broken:
        raise SystemExit("parity with transformers broken (tolerances " + json.dumps(PARITY_TOLERANCES) + "): "
                         + "; ".join(broken))
    return {**figures, "tolerances": PARITY_TOLERANCES}


def report(results: dict, sides: list[Side], tokens: int, flops_per_token: float, peak: float,
           hf_experts: list[str]) -> None:
    """The table, the ratio lines (the first: `ratio latentmoe / transformers (<first experts impl> experts)
    tokens/s: N.NNx`) and the kernels, into `results` too."""
    print(f"{'':26s}{'step ms':>10s}{'tokens/s':>12s}{'MFU':>8s}{'peak mem':>10s}  attention / experts")
    for side in sides:
        r = side.result(tokens)
        r["mfu"] = flops_per_token * r["tokens_per_s"] / (peak * 1e12)
        mem = f"{r['peak_mem_gib']:.2f}G" if r["peak_mem_gib"] is not None else "n/a"
        print(f"{side.name:26s}{r['step_s'] * 1e3:10.1f}{r['tokens_per_s']:12.0f}{r['mfu'] * 100:7.2f}%{mem:>10s}"
              f"  {r['attention']} / {r['experts']}")
        if side.name == "latentmoe":
            results["latentmoe"] = r
        else:
            results.setdefault("transformers", {})[side.name.split()[-1]] = r
    mem_kind = "max_memory_allocated" if sides and sides[0].device.type == "cuda" else "process peak RSS (VmHWM)"
    print(f"peak mem: {mem_kind}")
    t = results.get("trainer") or {}
    print(f"latentmoe ran the trainer's path: {t.get('engine')}, precision {t.get('precision')}, trainer.compile "
          f"{t.get('compile')} (compiled: {t.get('compiled')}), activation checkpointing "
          f"{t.get('activation_checkpointing')}")
    results["ratios"] = {}
    for impl in hf_experts:
        if impl in results.get("transformers", {}):
            ratio = results["latentmoe"]["tokens_per_s"] / results["transformers"][impl]["tokens_per_s"]
            results["ratios"][impl] = ratio
            print(f"ratio latentmoe / transformers ({impl} experts) tokens/s: {ratio:.2f}x")
    if results["ratios"]:
        results["ratio"] = next(iter(results["ratios"].values()))


class A2ABytes(TorchDispatchMode):
    """Counts the bytes every all-to-all call sends to other ranks, at torch.distributed's functional all-to-all op
    (what the dispatcher's exchanges, forward and backward, go through)."""

    def __init__(self, rank: int):
        super().__init__()
        self.rank, self.bytes = rank, 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if "all_to_all_single" in str(func):
            x, in_splits = args[0], args[2]
            row = x[0].numel() * x.element_size() if x.shape[0] else 0
            if in_splits is None:  # even split over the group
                in_splits = [x.shape[0] // dist_world(args[3])] * dist_world(args[3])
            self.bytes += sum(n for r, n in enumerate(in_splits) if r != self.rank) * row
        return func(*args, **(kwargs or {}))

    def take(self) -> int:
        counted, self.bytes = self.bytes, 0
        return counted


def dist_world(group_name: str) -> int:
    import torch.distributed as dist
    from torch.distributed.distributed_c10d import _resolve_process_group

    return dist.get_world_size(_resolve_process_group(group_name))


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
    sharded.dispatcher = AllToAllDispatcher(grid, config.n_routed_experts, config.num_experts_per_tok)
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
    # Bytes counted at torch.distributed's all-to-all calls (every exchange, routing lists and split sizes
    # included), outside the dispatcher's own accounting: one forward, then its backward.
    counter = A2ABytes(grid.ep_rank)
    with counter:
        y, stats = sharded(x)
    forward_bytes = counter.take()
    with counter:
        y.float().square().mean().backward()
    backward_bytes = counter.take()
    ids, _, _ = sharded.gate(x.view(-1, config.hidden_size))
    ranks = ids // count
    distinct_remote = sum(len(set(row.tolist()) - {grid.ep_rank}) for row in ranks)
    row_bytes = config.hidden_size * x.element_size()
    own_bytes = float(stats.dispatch[3]) / args.tokens  # what the dispatcher reports (DISPATCH_FIELDS)
    with torch.no_grad():  # parity: the same tokens through both layers (every rank takes part in the all-to-all)
        y_local, y_ep = local(x)[0].float(), sharded(x)[0].float()  # (1, tokens, D) each
    queue.put({"rank": rank, "local_s": t_local, "ep_s": t_ep, "bytes_per_token": forward_bytes / args.tokens,
               "backward_bytes_per_token": backward_bytes / args.tokens, "reported_bytes_per_token": own_bytes,
               "min_bytes_per_token": 2 * distinct_remote * row_bytes / args.tokens,
               "dtype": str(dtype), "output_max_abs_diff": (y_ep - y_local).abs().max().item(),
               "output_max_abs": y_local.abs().max().item()})
    dist.destroy_process_group()


def ep_main(argv: list[str]) -> list[dict]:
    from trainer.distributed import spawn_local

    p = argparse.ArgumentParser(prog="bench.py ep", description="MoE layer: expert parallel vs local")
    p.add_argument("--ep", type=int, default=2)
    p.add_argument("--preset", default="tiny", choices=available_model_presets())
    p.add_argument("--tokens", type=int, default=2048, help="tokens per rank")
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--json", type=Path, default=None)
    args = p.parse_args(argv)
    results = spawn_local(_ep_worker, args.ep, args)
    slowest = max(r["ep_s"] for r in results)
    local = statistics.median(r["local_s"] for r in results)
    sent = statistics.mean(r["bytes_per_token"] for r in results)
    back = statistics.mean(r["backward_bytes_per_token"] for r in results)
    reported = statistics.mean(r["reported_bytes_per_token"] for r in results)
    minimum = statistics.mean(r["min_bytes_per_token"] for r in results)
    ratio = sent / max(minimum, 1e-9)
    print(f"MoE layer of {args.preset}, {args.tokens} tokens per rank, forward + backward, median of {args.steps}")
    print(f"  all experts local (each rank, same tokens): {local * 1e3:8.2f} ms")
    print(f"  expert parallel, ep={args.ep} (slowest rank): {slowest * 1e3:8.2f} ms   ratio {slowest / local:.2f}")
    print(f"  forward bytes sent to other ranks per token, counted at the all-to-all calls: {sent:,.1f} (the "
          f"dispatcher reports {reported:,.1f}); minimum for this routing {minimum:,.1f} (one row per token and "
          f"distinct remote rank, each way); ratio {ratio:.3f}; backward {back:,.1f}")
    diff = max(r["output_max_abs_diff"] for r in results)
    scale = max(r["output_max_abs"] for r in results)
    print(f"  parity: expert parallel vs all experts local, max |output diff| {diff:.2e} over all ranks "
          f"({results[0]['dtype'].removeprefix('torch.')}; largest |output| {scale:.2e})")
    summary = {"local_s": local, "ep_s": slowest, "ratio": slowest / local, "bytes_per_token": sent,
               "backward_bytes_per_token": back, "reported_bytes_per_token": reported,
               "min_bytes_per_token": minimum, "bytes_ratio": ratio, "output_max_abs_diff": diff,
               "output_max_abs": scale, "dtype": results[0]["dtype"], "per_rank": results}
    if args.json:
        args.json.write_text(json.dumps(summary, indent=2))
    return results


if __name__ == "__main__":
    if sys.argv[1:2] == ["data"]:
        from data.benchmark import main as data_main

        data_main(sys.argv[2:])
    elif sys.argv[1:2] == ["ep"]:
        ep_main(sys.argv[2:])
    elif sys.argv[1:2] == ["cp"]:
        from trainer.cp_bench import main as cp_main

        cp_main(sys.argv[2:])
    elif sys.argv[1:2] == ["checkpoint"]:
        from trainer.checkpoint_bench import main as checkpoint_main

        checkpoint_main(sys.argv[2:])
    elif sys.argv[1:2] == ["eval"]:
        from trainer.eval_bench import main as eval_main

        eval_main(sys.argv[2:])
    else:
        main(sys.argv[1:] if sys.argv[1:2] != ["model"] else sys.argv[2:])
