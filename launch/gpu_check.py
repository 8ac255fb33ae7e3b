"""The one-shot GPU check (docs/benchmarks.md#the-one-shot-gpu-check): what this code does on one GPU, in one JSON
file of figures, section by section, inside 8 minutes on an H200.

    python launch/bench.py gpu --out gpu_check.json          # or: python launch/gpu_check.py --out ...
    python launch/gpu_check.py --device cpu --quick          # the CPU-runnable sections at small shapes (a test)

Sections, in order (each gets a status ok / failed / skipped with a reason, its elapsed time against its budget,
and its figures; a failed section does not stop the next; the JSON is rewritten after every section):

  1 versions      torch, CUDA, cuDNN, NCCL, device, sm, memory; which packages launch/pretrain.py and DeepSpeed need
                  are missing
  2 grouped_gemm  model.moe.RoutedExperts "grouped" against "loop" at V2-Lite shapes (D 2048, I 1408, 64 experts,
                  16K copies, several experts without tokens), fp32 and bf16 autocast: errors and time
  3 attention     each SDPA backend (flash, cuDNN, efficient, math) at S 4096 and MLA widths (q/k 192, v 128, 16
                  heads, bf16), causal and packed documents, against the math backend in fp32; model.attention's
                  own path too: errors, time, the backends that cannot run
  4 numerics      model.loss.cross_entropy against F.cross_entropy (fp32 on bf16 logits), model.moe.combine against
                  a plain weighted index_add, model/balance.py on the device against the CPU and the paper's
                  formulas in float64
  5 moe_layer     one V2-Lite MoE layer at 16K tokens, forward + backward: host syncs counted under
                  torch.cuda.set_sync_debug_mode("warn"), the top-10 kernels by time from torch.profiler
  6 all_to_all    a one-rank process group (NCCL on CUDA, gloo on CPU): the all-to-all dispatcher against the local
                  one on the same MoE layer, outputs and gradients
  7 model_bench   launch/bench.py's model benchmark at V2-Lite widths in bf16: ours with and without compile and
                  activation checkpointing, transformers with grouped_mm and eager experts, one measured peak
  8 resume        launch/pretrain.py for 20 steps saving every 10, then resumed from step 10: losses and gradient
                  norms of steps 11-20 compared bitwise
  9 deepspeed     5 steps of DeepSpeed ZeRO-1 in bf16 through launch/pretrain.py
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import gc
import importlib.metadata
import importlib.util
import inspect
import json
import os
import platform
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
import warnings
from pathlib import Path

import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

TOTAL_BUDGET_S = 450
"""The whole check on one H200 (8 minutes with the process start), each section within its own budget as well."""
PRETRAIN_NEEDS = ("hydra", "omegaconf", "antlr4", "tokenizers", "safetensors", "numpy", "yaml", "tqdm")
DEEPSPEED_NEEDS = ("deepspeed", "hjson", "pydantic", "einops", "msgpack", "psutil", "cpuinfo", "ninja")
REPORTED_PACKAGES = ("transformers", "wandb", "datasets", "PIL")

# Tolerances: fp32 comparisons of the same arithmetic in another order, and bf16 against an fp32 reference.
FP32_REL_TOL = 1e-5
BF16_REL_TOL = 2e-2
ATTENTION_REL_TOL = 2e-2
BALANCE_REL_TOL = 1e-5


class Skip(Exception):
    """A section that cannot run here (the reason is its message)."""


class OverBudget(Exception):
    """Raised by the alarm when a section runs past its budget."""


def shapes(quick: bool) -> dict:
    """The check's sizes: V2-Lite's on a GPU, small ones with --quick."""
    if quick:
        return dict(D=64, I=32, E=8, copies=384, zero_experts=2, S=128, heads=2, ce_rows=256, vocab=1024,
                    moe_batch=2, moe_seq=64, a2a_tokens=128, preset="tiny", bench=["--batch", "2", "--seq", "32",
                    "--steps", "1", "--warmup", "1", "--rounds", "1"], steps=4, every=2, reps=1)
    return dict(D=2048, I=1408, E=64, copies=16384, zero_experts=6, S=4096, heads=16, ce_rows=8192, vocab=102400,
                moe_batch=4, moe_seq=4096, a2a_tokens=4096, preset="v2_lite",
                bench=["--batch", "4", "--seq", "2048", "--steps", "6", "--warmup", "3"], steps=20, every=10, reps=5)


def preset_config(name: str, **overrides):
    """conf/model/<name>.yaml as a ModelConfig, read with PyYAML: the GPU image has no omegaconf."""
    import yaml

    from model import ModelConfig

    values = yaml.safe_load((ROOT / "conf" / "model" / f"{name}.yaml").read_text())
    return ModelConfig(**{**values, **overrides})


def moe_config(quick: bool):
    """V2-Lite's MoE layer (64 routed experts of width 1408, 2 shared, top-6, D 2048), or a small one."""
    if quick:
        return preset_config("v2_lite", hidden_size=64, moe_intermediate_size=32, intermediate_size=128,
                             n_routed_experts=8, num_hidden_layers=2, vocab_size=512)
    return preset_config("v2_lite")


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


REPS = {"n": 5}
"""Timed repetitions of `timed` (1 with --quick)."""


def timed(fn, device: torch.device, reps: int = 5, warmup: int = 1) -> float:
    """Median seconds of `fn()` after `warmup` calls (at most REPS["n"] repetitions)."""
    reps = min(reps, REPS["n"])
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(reps):
        sync(device)
        start = time.perf_counter()
        fn()
        sync(device)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def rel_err(value: torch.Tensor, reference: torch.Tensor) -> float:
    """max |value - reference| / max |reference| (0 when both are zero)."""
    diff = (value.double() - reference.double()).abs().max().item()
    scale = reference.double().abs().max().item()
    return diff / scale if scale > 0 else (0.0 if diff == 0 else float("inf"))


def over(figures: dict, checks: list[tuple[str, float, float]]) -> list[str]:
    """Record each (name, value, tolerance) under figures["tolerances"]; the lines of those above tolerance."""
    figures.setdefault("tolerances", {}).update({name: tol for name, _, tol in checks})
    return [f"{name} {value:.2e} > {tol:.0e}" for name, value, tol in checks if not value <= tol]


# ------------------------------------------------------------------------------------------------ 1 versions
def _version(module: str) -> str | None:
    if importlib.util.find_spec(module) is None:
        return None
    names = {"yaml": "PyYAML", "PIL": "pillow", "hydra": "hydra-core", "antlr4": "antlr4-python3-runtime",
             "cpuinfo": "py-cpuinfo"}
    try:
        return importlib.metadata.version(names.get(module, module))
    except importlib.metadata.PackageNotFoundError:
        return "present"


def section_versions(ctx: dict) -> tuple[dict, list[str]]:
    device = ctx["device"]
    f = ctx["figures"]
    f.update(python=platform.python_version(), torch=torch.__version__, cuda=torch.version.cuda,
             cudnn=torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None,
             device_type=device.type)
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        nccl = torch.cuda.nccl.version()
        f.update(nccl=".".join(map(str, nccl)) if isinstance(nccl, tuple) else str(nccl), device=props.name,
                 sm=f"sm_{props.major}{props.minor}", memory_gib=props.total_memory / 2**30,
                 multiprocessors=props.multi_processor_count)
    else:
        f.update(device=platform.processor() or platform.machine(), cpu_threads=torch.get_num_threads())
    f["packages"] = {m: _version(m) for m in PRETRAIN_NEEDS + DEEPSPEED_NEEDS + REPORTED_PACKAGES}
    f["pretrain_missing"] = [m for m in PRETRAIN_NEEDS if f["packages"][m] is None]
    f["deepspeed_missing"] = [m for m in DEEPSPEED_NEEDS if f["packages"][m] is None]
    ctx["missing"] = f["pretrain_missing"]
    return f, []


# ------------------------------------------------------------------------------------------------ 2 grouped GEMM
def _expert_counts(E: int, n: int, zero: int) -> torch.Tensor:
    """(E,) int64 copies per expert summing to n, uneven, the first `zero` experts of a random order empty."""
    g = torch.Generator().manual_seed(0)
    probs = torch.rand(E, generator=g) + 0.1
    probs[torch.randperm(E, generator=g)[:zero]] = 0
    counts = torch.bincount(torch.multinomial(probs, n, replacement=True, generator=g), minlength=E)
    return counts


def _experts_pass(experts, x: torch.Tensor, counts: torch.Tensor, probe: torch.Tensor, autocast: bool):
    """Forward + backward of the experts on x: (output fp32, dx, d gate_up, d down)."""
    experts.zero_grad(set_to_none=True)
    x = x.detach().requires_grad_()
    with torch.autocast(x.device.type, dtype=torch.bfloat16, enabled=autocast):
        y = experts(x, counts)
    (y.float() * probe).sum().backward()
    return y.detach().float(), x.grad, experts.gate_up_proj.grad.clone(), experts.down_proj.grad.clone()


def section_grouped_gemm(ctx: dict) -> tuple[dict, list[str]]:
    from model.moe import _GROUPED_MM, RoutedExperts, _grouped_mm_supported

    device, s = ctx["device"], ctx["shapes"]
    counts = _expert_counts(s["E"], s["copies"], s["zero_experts"]).to(device)
    empty = (counts == 0).nonzero().squeeze(1)
    g = torch.Generator(device).manual_seed(1)
    x = torch.randn(s["copies"], s["D"], device=device, generator=g)
    probe = torch.randn(s["copies"], s["D"], device=device, generator=g)
    experts = RoutedExperts(s["E"], s["D"], s["I"]).to(device)
    with torch.no_grad():
        experts.gate_up_proj.normal_(0, 0.02, generator=g)
        experts.down_proj.normal_(0, 0.02, generator=g)
    experts.impl = "loop"
    reference = _experts_pass(experts, x, counts, probe, autocast=False)  # fp32, one matmul chain per expert
    ctx["figures"]["torch_grouped_mm_fp32"] = _probe_grouped_mm_fp32(device)
    f = ctx["figures"]
    f.update(experts=s["E"], hidden=s["D"], intermediate=s["I"], copies=s["copies"],
             experts_without_tokens=empty.tolist())
    problems = []
    for label, autocast, tol in (("fp32", False, FP32_REL_TOL), ("bf16", True, BF16_REL_TOL)):
        dtype = torch.bfloat16 if autocast else torch.float32
        for impl in ("grouped", "loop"):
            experts.impl = impl
            out = _experts_pass(experts, x, counts, probe, autocast)
            errors = {name: rel_err(a, b) for name, a, b in zip(("output", "dx", "d_gate_up", "d_down"), out,
                                                                  reference, strict=True)}
            kernel = "grouped_mm" if impl == "grouped" and _GROUPED_MM is not None and _grouped_mm_supported(
                x.to(dtype), s["I"]) else "loop"
            entry = {"kernel": kernel, "rel_err_vs_fp32_loop": errors,
                     "empty_experts_grad_zero": bool(out[2][empty].eq(0).all() and out[3][empty].eq(0).all()),
                     "finite": all(bool(t.isfinite().all()) for t in out),
                     "fwd_bwd_ms": 1e3 * timed(lambda: _experts_pass(experts, x, counts, probe, autocast), device)}
            f[f"{label}_{impl}"] = entry
            problems += over(f, [(f"{label} {impl} {k}", v, tol) for k, v in errors.items()])
            if not (entry["empty_experts_grad_zero"] and entry["finite"]):
                problems.append(f"{label} {impl}: non-finite values or non-zero gradients of experts without tokens")
    return f, problems


def _probe_grouped_mm_fp32(device: torch.device) -> str:
    """Whether torch's own grouped GEMM runs in fp32 on this device (model.moe uses the loop there if not)."""
    from model.moe import _GROUPED_MM

    if _GROUPED_MM is None:
        return "torch has no grouped_mm"
    try:
        a, w = torch.randn(32, 16, device=device), torch.randn(2, 16, 16, device=device)
        _GROUPED_MM(a, w, offs=torch.tensor([16, 32], device=device, dtype=torch.int32))
        return "runs"
    except (RuntimeError, NotImplementedError) as e:
        return f"fails: {str(e).splitlines()[0][:200]}"


# ------------------------------------------------------------------------------------------------ 3 attention
def _documents(S: int, device: torch.device) -> torch.Tensor:
    """(1, S) document ids of 6 packed documents of uneven lengths."""
    cuts = sorted(torch.randperm(S - 1, generator=torch.Generator().manual_seed(2))[:5].add(1).tolist())
    ids = torch.zeros(S, dtype=torch.long)
    for c in cuts:
        ids[c:] += 1
    return ids.to(device)[None]


def _dense_document_mask(doc: torch.Tensor) -> torch.Tensor:
    S = doc.shape[1]
    causal = torch.ones(S, S, dtype=torch.bool, device=doc.device).tril()
    return ((doc[:, :, None] == doc[:, None, :]) & causal).unsqueeze(1)  # (1, 1, S, S)


def _attention_pass(fn, q, k, v, probe):
    """fn(q, k, v) forward + backward: (output fp32, dq, dk, dv)."""
    q, k, v = (t.detach().requires_grad_() for t in (q, k, v))
    out = fn(q, k, v)
    (out.float() * probe).sum().backward()
    return out.detach().float(), q.grad, k.grad, v.grad


def _sdpa(backend, mask, scale, pad: bool):
    from torch.nn.attention import sdpa_kernel

    def run(q, k, v):
        v_dim = v.shape[-1]
        if pad:
            v = F.pad(v, (0, q.shape[-1] - v_dim))
        with sdpa_kernel([backend]):
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=mask is None, scale=scale)
        return out[..., :v_dim]
    return run


def section_attention(ctx: dict) -> tuple[dict, list[str]]:
    import model.attention as attention
    from torch.nn.attention import SDPBackend

    device, s = ctx["device"], ctx["shapes"]
    H, S, qk, vd = s["heads"], s["S"], 192, 128
    g = torch.Generator(device).manual_seed(3)
    q, k = (torch.randn(1, H, S, qk, device=device, generator=g, dtype=torch.bfloat16) for _ in range(2))
    v = torch.randn(1, H, S, vd, device=device, generator=g, dtype=torch.bfloat16)
    probe = torch.randn(1, H, S, vd, device=device, generator=g)
    scale = qk ** -0.5
    doc = _documents(S, device)
    f = ctx["figures"]
    f.update(heads=H, seq=S, qk_dim=qk, v_dim=vd, dtype="bfloat16", documents=int(doc.max()) + 1, unavailable={})
    problems = []
    backends = {"flash": SDPBackend.FLASH_ATTENTION, "cudnn": SDPBackend.CUDNN_ATTENTION,
                "efficient": SDPBackend.EFFICIENT_ATTENTION, "math": SDPBackend.MATH}
    for packed in (False, True):
        mask = _dense_document_mask(doc) if packed else None
        layout = "packed" if packed else "causal"
        ref = _attention_pass(_sdpa(SDPBackend.MATH, mask, scale, False), q.float(), k.float(), v.float(), probe)
        for name, backend in backends.items():
            entry = None
            for pad in (False, True):  # MLA's unequal widths first, then v zero-padded to the q/k width
                try:
                    run = _sdpa(backend, mask, scale, pad)
                    out = _attention_pass(run, q, k, v, probe)
                except OverBudget:
                    raise
                except Exception as e:  # noqa: BLE001 (a backend that cannot run these inputs, whatever it raises)
                    entry = {"error": str(e).splitlines()[0][:300]}
                    continue
                entry = _attention_entry(out, ref, run, q, k, v, probe, device, padded_v=pad)
                break
            if "error" in entry:
                f["unavailable"][f"{layout} {name}"] = entry["error"]
            else:
                f[f"{layout}_{name}"] = entry
        # model.attention's own path: the kernel it picks (FlexAttention for packed documents on CUDA)
        own = getattr(attention, "_causal_attention", None)
        attn_mask = attention.document_causal_mask(doc) if packed else None
        run = (lambda q_, k_, v_, m=attn_mask: own(q_, k_, v_, scale, m))
        out = _attention_pass(run, q, k, v, probe)
        entry = _attention_entry(out, ref, run, q, k, v, probe, device, padded_v=None)
        kernel = getattr(attention, "attention_kernel", None)
        entry["kernel"] = kernel(qk, vd, device, torch.bfloat16, packed) if kernel else "sdpa"
        f[f"{layout}_model_attention"] = entry
        # bf16 against fp32: within ATTENTION_REL_TOL, or twice the error of the math backend in bf16
        math_bf16 = f.get(f"{layout}_math", {}).get("rel_err_vs_fp32_math", {})
        problems += over(f, [(f"{layout} model.attention {k_}", v_, max(ATTENTION_REL_TOL, 2 * math_bf16.get(k_, 0)))
                             for k_, v_ in entry["rel_err_vs_fp32_math"].items()])
    return f, problems


def _attention_entry(out, ref, run, q, k, v, probe, device, padded_v) -> dict:
    errors = {name: rel_err(a, b) for name, a, b in zip(("output", "dq", "dk", "dv"), out, ref, strict=True)}
    entry = {"rel_err_vs_fp32_math": errors, "fwd_bwd_ms": 1e3 * timed(
        lambda: _attention_pass(run, q, k, v, probe), device, reps=3)}
    if padded_v is not None:
        entry["padded_v"] = padded_v
    return entry


# ------------------------------------------------------------------------------------------------ 4 numerics
def section_numerics(ctx: dict) -> tuple[dict, list[str]]:
    f, problems = ctx["figures"], []
    f["cross_entropy"] = _cross_entropy_check(ctx, problems)
    f["combine"] = _combine_check(ctx, problems)
    f["balance"] = _balance_check(ctx, problems)
    return f, problems


def _cross_entropy_check(ctx: dict, problems: list[str]) -> dict:
    from model.loss import IGNORE_INDEX, cross_entropy

    device, s = ctx["device"], ctx["shapes"]
    g = torch.Generator(device).manual_seed(4)
    logits = (3 * torch.randn(s["ce_rows"], s["vocab"], device=device, generator=g)).bfloat16()
    targets = torch.randint(0, s["vocab"], (s["ce_rows"],), device=device, generator=g)
    targets[torch.rand(s["ce_rows"], device=device, generator=g) < 0.1] = IGNORE_INDEX

    def ours():
        x = logits.detach().requires_grad_()
        loss = cross_entropy(x, targets)
        loss.backward()
        return loss.detach(), x.grad

    def reference():
        x = logits.detach().float().requires_grad_()  # the same bf16 values, upcast
        loss = F.cross_entropy(x, targets, ignore_index=IGNORE_INDEX)
        loss.backward()
        return loss.detach(), x.grad

    (loss, grad), (ref_loss, ref_grad) = ours(), reference()
    f = {"rows": s["ce_rows"], "vocab": s["vocab"], "loss_rel_diff": abs(loss.item() / ref_loss.item() - 1),
         "grad_rel_err": rel_err(grad.float(), ref_grad), "grad_dtype": str(grad.dtype).removeprefix("torch."),
         "ours_fwd_bwd_ms": 1e3 * timed(ours, device, reps=3),
         "reference_fwd_bwd_ms": 1e3 * timed(reference, device, reps=3)}
    problems += over(f, [("cross_entropy loss_rel_diff", f["loss_rel_diff"], FP32_REL_TOL),
                         ("cross_entropy grad_rel_err", f["grad_rel_err"], BF16_REL_TOL)])
    return f


def _combine_check(ctx: dict, problems: list[str]) -> dict:
    from model.moe import combine

    device, s = ctx["device"], ctx["shapes"]
    K, D = 6, s["D"]
    T = s["copies"] // K
    g = torch.Generator(device).manual_seed(5)
    token_of_copy = torch.arange(T, device=device).repeat_interleave(K)[
        torch.randperm(T * K, device=device, generator=g)]  # (N,) copies in expert order, not token order
    w = torch.rand(T * K, device=device, generator=g)
    probe = torch.randn(T, D, device=device, generator=g)
    f = {"tokens": T, "copies": T * K, "hidden": D}
    for dtype, tol in ((torch.float32, FP32_REL_TOL), (torch.bfloat16, BF16_REL_TOL)):
        y = torch.randn(T * K, D, device=device, generator=g).to(dtype)

        def ours():
            y_, w_ = y.detach().requires_grad_(), w.detach().requires_grad_()
            out = combine(y_, w_, token_of_copy, T)
            (out.float() * probe).sum().backward()
            return out.detach().float(), y_.grad, w_.grad

        def reference():
            y_, w_ = y.detach().float().requires_grad_(), w.detach().requires_grad_()
            out = y_.new_zeros(T, D).index_add(0, token_of_copy, y_ * w_[:, None])
            (out * probe).sum().backward()
            return out.detach(), y_.grad, w_.grad

        errors = {name: rel_err(a.float(), b) for name, a, b in zip(("output", "dy", "dw"), ours(), reference(),
                                                                      strict=True)}
        label = str(dtype).removeprefix("torch.")
        f[label] = {"rel_err_vs_index_add": errors, "output_dtype": str(ours()[0].dtype).removeprefix("torch."),
                    "fwd_bwd_ms": 1e3 * timed(ours, device, reps=3)}
        # the output and dw are fp32 sums of the same products; dy is rounded to y's dtype
        problems += over(f[label], [(f"combine {label} {k}", v, FP32_REL_TOL if k != "dy" else tol)
                                    for k, v in errors.items()])
    return f


def _balance_reference(counts, probs, group_tokens, K: int, G: int, M: int) -> dict[str, float]:
    """The paper's balance losses (§2.2.3, Eqs. 23-31) per sequence, averaged, in float64 from the raw counts."""
    counts, probs, group_tokens = counts.double(), probs.double(), group_tokens.double()
    B, E = counts.shape
    T = counts.sum(1, keepdim=True) / K  # tokens per sequence
    f = counts * E / (K * T)
    p_group = probs.view(B, G, -1).sum(-1)
    return {"expert": (f * probs).sum(1).mean().item(),
            "device": (f.view(B, G, -1).mean(-1) * p_group).sum(1).mean().item(),
            "comm": (group_tokens * G / (M * T) * p_group).sum(1).mean().item()}


def _balance_check(ctx: dict, problems: list[str]) -> dict:
    """V2's device-limited routing (160 experts in 8 groups, top-6 within 3 groups): model/balance.py on the device
    and on the CPU against the paper's formulas."""
    from model.balance import balance_losses, groups_per_token
    from model.moe import RoutingStats

    device = ctx["device"]
    config = preset_config("v2")
    B, S, E, K, G = 4, 512, config.n_routed_experts, config.num_experts_per_tok, config.n_group
    g = torch.Generator(device).manual_seed(6)
    scores = torch.randn(B, S, E, device=device, generator=g).mul(2).softmax(-1)  # (B, S, E)
    ids = scores.topk(K, dim=-1).indices  # (B, S, K)
    counts = torch.zeros(B, E, device=device).scatter_add_(1, ids.view(B, -1), torch.ones(B, S * K, device=device))
    hit = torch.zeros(B, S, G, device=device).scatter_(2, ids // (E // G), 1.0)
    stats = RoutingStats(expert_counts=counts, expert_probs=scores.mean(1), group_tokens=hit.sum(1))
    on_device = {k: v.item() for k, v in balance_losses(stats, config).items()}
    cpu_stats = RoutingStats(*(t.cpu() for t in (stats.expert_counts, stats.expert_probs, stats.group_tokens)))
    on_cpu = {k: v.item() for k, v in balance_losses(cpu_stats, config).items()}
    paper = _balance_reference(counts.cpu(), scores.mean(1).cpu(), hit.sum(1).cpu(), K, G, groups_per_token(config))
    f = {"sequences": B, "tokens": S, "experts": E, "groups": G, "device": on_device, "cpu": on_cpu,
         "paper_float64": paper}
    problems += over(f, [(f"balance {k} device vs {name}", abs(on_device[k] / ref[k] - 1), BALANCE_REL_TOL)
                         for k in on_device for name, ref in (("cpu", on_cpu), ("paper", paper))])
    return f


# ------------------------------------------------------------------------------------------------ 5 MoE layer
def _moe_layer(config, device: torch.device):
    from model.moe import MoE

    torch.manual_seed(7)
    layer = MoE(config).to(device)
    with torch.no_grad():
        for p in layer.parameters():
            p.normal_(0, 0.02)
    return layer


def _moe_pass(layer, x: torch.Tensor, autocast: bool):
    """Forward + backward of one MoE layer (fp32 weights; bf16 autocast on CUDA, as the trainer runs it)."""
    x = x.detach().requires_grad_()
    with torch.autocast(x.device.type, dtype=torch.bfloat16, enabled=autocast):
        y, _ = layer(x)
    y.float().square().mean().backward()
    return y.detach().float(), x.grad


def section_moe_layer(ctx: dict) -> tuple[dict, list[str]]:
    from torch.profiler import ProfilerActivity, profile

    device, s, cuda = ctx["device"], ctx["shapes"], ctx["device"].type == "cuda"
    config = moe_config(ctx["quick"])
    layer = _moe_layer(config, device)
    x = torch.randn(s["moe_batch"], s["moe_seq"], config.hidden_size, device=device,
                    generator=torch.Generator(device).manual_seed(8))
    f = ctx["figures"]
    f.update(tokens=x.shape[0] * x.shape[1], experts=config.n_routed_experts, top_k=config.num_experts_per_tok,
             precision="fp32 weights, bf16 autocast" if cuda else "fp32")
    f["fwd_bwd_ms"] = 1e3 * timed(lambda: _moe_pass(layer, x, cuda), device, reps=3, warmup=2)
    problems = []
    if cuda:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            torch.cuda.set_sync_debug_mode("warn")
            try:
                _moe_pass(layer, x, cuda)
            finally:
                torch.cuda.set_sync_debug_mode(0)
            sync(device)
        syncs = [w for w in caught if "synchroniz" in str(w.message).lower()]
        f["host_syncs"] = len(syncs)
        where = {}
        for w in syncs:
            key = f"{Path(w.filename).name}:{w.lineno}"
            where[key] = where.get(key, 0) + 1
        f["host_sync_sites"] = where
        if syncs:
            problems.append(f"{len(syncs)} host syncs in one forward + backward (sites: {where})")
    else:
        f["host_syncs"] = "n/a: torch.cuda.set_sync_debug_mode needs CUDA"
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    with profile(activities=activities) as prof:
        _moe_pass(layer, x, cuda)
        sync(device)
    f["top_kernels"] = _top_events(prof, cuda)
    return f, problems


def _top_events(prof, cuda: bool, n: int = 10) -> list[dict]:
    """The n events with the most self time on the device (CUDA kernels) or on the CPU (operators)."""
    rows = []
    for e in prof.key_averages():
        self_us = (getattr(e, "self_device_time_total", None) or getattr(e, "self_cuda_time_total", 0)) if cuda \
            else e.self_cpu_time_total
        if self_us > 0:
            rows.append({"name": e.key[:120], "calls": e.count, "self_ms": self_us / 1e3})
    return sorted(rows, key=lambda r: -r["self_ms"])[:n]


# ------------------------------------------------------------------------------------------------ 6 all-to-all
def _all_to_all_dispatcher(grid, config):
    from trainer.expert_parallel import AllToAllDispatcher

    params = list(inspect.signature(AllToAllDispatcher).parameters)
    extra = [config.num_experts_per_tok] if len(params) > 2 else []  # (grid, n_experts[, top_k])
    return AllToAllDispatcher(grid, config.n_routed_experts, *extra)


def section_all_to_all(ctx: dict) -> tuple[dict, list[str]]:
    import torch.distributed as dist

    from trainer.distributed import DistEnv
    from trainer.expert_parallel import build_grid

    device, s, cuda = ctx["device"], ctx["shapes"], ctx["device"].type == "cuda"
    backend = "nccl" if cuda else "gloo"
    with tempfile.TemporaryDirectory() as tmp:
        if cuda:
            torch.cuda.set_device(device)
        dist.init_process_group(backend, store=dist.FileStore(str(Path(tmp) / "store"), 1), rank=0, world_size=1)
        try:
            grid = build_grid(DistEnv(0, 1, 0), pp=1, ep=1)
            for group in ("dp_group", "ep_group", "edp_group"):  # one process: its groups are the world
                if getattr(grid, group, None) is None:
                    setattr(grid, group, dist.group.WORLD)
            config = moe_config(ctx["quick"])
            local = _moe_layer(config, device)
            exchanged = copy.deepcopy(local)
            exchanged.dispatcher = _all_to_all_dispatcher(grid, config)
            x = torch.randn(1, s["a2a_tokens"], config.hidden_size, device=device,
                            generator=torch.Generator(device).manual_seed(9))
            f = ctx["figures"]
            f.update(backend=backend, tokens=s["a2a_tokens"], dispatcher=type(exchanged.dispatcher).__name__)
            problems = []
            for label, autocast, tol in (("fp32", False, FP32_REL_TOL), ("bf16_autocast", True, BF16_REL_TOL)):
                if autocast and not cuda:
                    continue
                errors = _compare_layers(local, exchanged, x, autocast)
                f[label] = {"rel_err_vs_local": errors,
                            "local_ms": 1e3 * timed(lambda: _moe_pass(local, x, autocast), device, reps=3),
                            "all_to_all_ms": 1e3 * timed(lambda: _moe_pass(exchanged, x, autocast), device, reps=3)}
                problems += over(f, [(f"{label} {k}", v, tol) for k, v in errors.items()])
        finally:
            dist.destroy_process_group()
    return f, problems


def _compare_layers(a, b, x: torch.Tensor, autocast: bool) -> dict[str, float]:
    """Relative errors of b against a on the same tokens: output, input gradient, every parameter gradient."""
    for layer in (a, b):
        layer.zero_grad(set_to_none=True)
    (ya, dxa), (yb, dxb) = _moe_pass(a, x, autocast), _moe_pass(b, x, autocast)
    errors = {"output": rel_err(yb, ya), "dx": rel_err(dxb, dxa)}
    grads_b = dict(b.named_parameters())
    errors["params_max"] = max(rel_err(grads_b[n].grad, p.grad) for n, p in a.named_parameters()
                               if p.grad is not None)
    return errors


# ------------------------------------------------------------------------------------------------ 7 model bench
def _load_bench():
    spec = importlib.util.spec_from_file_location("latentmoe_bench", ROOT / "launch" / "bench.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    return bench


def section_model_bench(ctx: dict) -> tuple[dict, list[str]]:
    if "omegaconf" in ctx.get("missing", []):
        raise Skip("omegaconf is not importable (trainer.config needs it): carry its wheels (docs/benchmarks.md)")
    bench = _load_bench()
    device, s, cuda = ctx["device"], ctx["shapes"], ctx["device"].type == "cuda"
    dtype = torch.bfloat16 if cuda else torch.float32
    peak, source = bench.measure_peak_tflops(device, dtype)
    f = ctx["figures"]
    f.update(peak_tflops=peak, peak_source=source, runs={})
    base = ["--preset", s["preset"], "--device", str(device), *s["bench"], "--peak-tflops", f"{peak:.6g}"]
    problems = []
    for compile_, ac in (("off", False), ("off", True), ("on", False), ("on", True)):
        name = f"compile={compile_} activation_checkpointing={str(ac).lower()}"
        if compile_ == "on" and not cuda:
            f["runs"][name] = {"status": "skipped", "reason": "compile is off by default on CPU and its warm-up "
                                                              "takes minutes on 2 cores"}
            continue
        argv = base + ["--compile", compile_] + (["--activation-checkpointing"] if ac else [])
        argv += [] if not f["runs"] else ["--no-hf"]  # transformers (and parity) once, with the first
        try:
            f["runs"][name] = {"status": "ok", **_bench_figures(bench.main(argv))}
        except OverBudget as e:  # the figures so far stay; the remaining runs do not start
            f["runs"][name] = {"status": "failed", "reason": _reason(e)}
            problems.append(f"{name}: {_reason(e)}")
            break
        except (Exception, SystemExit) as e:  # SystemExit: a parity failure
            f["runs"][name] = {"status": "failed", "reason": _reason(e)}
            problems.append(f"{name}: {_reason(e)}")
        finally:
            gc.collect()
            if cuda:
                torch.cuda.empty_cache()
    return f, problems


def _bench_figures(r: dict) -> dict:
    keep = ("layers", "depth_choice", "batch", "seq", "head_flops_share", "flops_per_token", "trainer", "parity",
            "latentmoe", "transformers", "ratios")
    return {k: r[k] for k in keep if k in r}


# ------------------------------------------------------------------------------------------------ 8 resume
def _pretrain(run_dir: Path, ctx: dict, *overrides: str, timeout: float) -> subprocess.CompletedProcess:
    args = [sys.executable, str(ROOT / "launch" / "pretrain.py"), "experiment=smoke", f"hydra.run.dir={run_dir}",
            f"data.cache_dir={ctx['cache_dir']}", "logging.wandb=disabled", "trainer.progress=false",
            f"trainer.device={ctx['device'].type}", *overrides]
    env = {**os.environ, "WANDB_MODE": "disabled", "HF_HUB_OFFLINE": "1"}
    env.pop("LATENTMOE_FAULT", None)
    proc = subprocess.run(args, capture_output=True, text=True, timeout=timeout, env=env, cwd=run_dir.parent)
    if proc.returncode != 0:
        raise RuntimeError(f"launch/pretrain.py {' '.join(overrides)} exited {proc.returncode}: "
                           f"{(proc.stderr or proc.stdout)[-1500:]}")
    return proc


def _metrics(run_dir: Path) -> dict[int, dict]:
    return {m["step"]: m for m in map(json.loads, (run_dir / "metrics.jsonl").read_text().splitlines())}


def _need_pretrain(ctx: dict) -> None:
    missing = [m for m in ctx.get("missing", []) if m in ("hydra", "omegaconf", "antlr4", "tokenizers",
                                                          "safetensors", "yaml")]
    if missing:
        raise Skip(f"launch/pretrain.py needs {', '.join(missing)}, not importable here: carry their wheels "
                   "(docs/benchmarks.md)")


def section_resume(ctx: dict) -> tuple[dict, list[str]]:
    _need_pretrain(ctx)
    s, left = ctx["shapes"], ctx["deadline"]
    steps, every = s["steps"], s["every"]
    # compile off: two compiled warm-ups would not fit the section's budget (section 7 times the compiled path)
    common = [f"trainer.max_steps={steps}", f"checkpoint.every={every}", "checkpoint.export_hf=false",
              "trainer.val_every=0", "trainer.log_every=1", "trainer.compile=false"]
    with tempfile.TemporaryDirectory() as tmp:
        straight, resumed = Path(tmp) / "straight", Path(tmp) / "resumed"
        start = time.perf_counter()
        _pretrain(straight, ctx, *common, timeout=max(1.0, left()))
        straight_s = time.perf_counter() - start
        checkpoint = straight / "checkpoints" / f"step_{every:08d}"
        _pretrain(resumed, ctx, *common, f"checkpoint.resume={checkpoint}", timeout=max(1.0, left()))
        a, b = _metrics(straight), _metrics(resumed)
    compared = list(range(every + 1, steps + 1))
    differing = [step for step in compared if (a[step]["loss"], a[step]["grad_norm"]) != (b.get(step, {}).get(
        "loss"), b.get(step, {}).get("grad_norm"))]
    f = ctx["figures"]
    f.update(model="tiny_lite (experiment=smoke)", steps=steps, checkpoint_every=every, compile=False,
             resumed_from_step=every, steps_compared=compared, bitwise_equal=not differing,
             steps_differing=differing, straight_run_s=straight_s,
             loss_max_abs_diff=max(abs(a[st]["loss"] - b[st]["loss"]) for st in compared if st in b),
             losses={st: [a[st]["loss"], b.get(st, {}).get("loss")] for st in compared})
    return f, ([f"steps {differing} differ after resuming from step {every}"] if differing else [])


# ------------------------------------------------------------------------------------------------ 9 DeepSpeed
def section_deepspeed(ctx: dict) -> tuple[dict, list[str]]:
    if ctx["device"].type != "cuda":
        raise Skip("bf16 ZeRO-1 is a GPU check (tests/distributed/test_deepspeed.py runs ZeRO on CPU)")
    _need_pretrain(ctx)
    if importlib.util.find_spec("deepspeed") is None:
        raise Skip("deepspeed is not importable here: carry its wheels (docs/benchmarks.md)")
    with tempfile.TemporaryDirectory() as tmp:
        run = Path(tmp) / "zero1"
        start = time.perf_counter()
        _pretrain(run, ctx, "parallel.zero_stage=1", "trainer.precision=bf16", "trainer.max_steps=5",
                  "trainer.compile=false",
                  "checkpoint.every=0", "checkpoint.export_hf=false", "trainer.val_every=0", "trainer.log_every=1",
                  timeout=max(1.0, ctx["deadline"]()))
        m = _metrics(run)
    losses = [m[st]["loss"] for st in sorted(m)]
    f = ctx["figures"]
    f.update(steps=sorted(m), losses=losses, run_s=time.perf_counter() - start, compile=False,
             skipped_steps=m[max(m)].get("skipped_steps"))
    finite = len(losses) == 5 and all(v == v and abs(v) != float("inf") for v in losses)
    return f, ([] if finite else [f"expected 5 finite losses, got {losses}"])


# ------------------------------------------------------------------------------------------------ runner
SECTIONS = [  # (number, name, function, budget in seconds on the GPU)
    (1, "versions", section_versions, 10),
    (2, "grouped_gemm", section_grouped_gemm, 30),
    (3, "attention", section_attention, 60),  # FlexAttention compiles for packed documents on CUDA
    (4, "numerics", section_numerics, 20),
    (5, "moe_layer", section_moe_layer, 30),
    (6, "all_to_all", section_all_to_all, 20),
    (7, "model_bench", section_model_bench, 170),
    (8, "resume", section_resume, 70),
    (9, "deepspeed", section_deepspeed, 40),
]


def _reason(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return f"{type(e).__name__}: {text[0][:500] if text else ''}" + (" ..." if len(text) > 1 else "")


@contextlib.contextmanager
def alarm(seconds: float):
    """Raise OverBudget in this (main) thread after `seconds` (between Python bytecodes: a kernel or a blocking
    call finishes first; subprocesses get the remaining time as their timeout)."""
    def handler(signum, frame):
        raise OverBudget(f"over its budget of {seconds:.0f} s")

    previous = signal.signal(signal.SIGALRM, handler)
    signal.setitimer(signal.ITIMER_REAL, max(seconds, 0.01))
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


def run_section(number: int, name: str, fn, budget: float, ctx: dict) -> dict:
    entry = {"section": number, "name": name, "status": "ok", "reason": None, "budget_s": budget}
    start = time.perf_counter()
    ctx["deadline"] = lambda: budget - (time.perf_counter() - start)
    entry["figures"] = ctx["figures"] = {}  # filled as the section goes: a section cut short keeps its figures
    try:
        with alarm(budget), warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)  # SDPA's reasons for each kernel it cannot run, etc.
            _, problems = fn(ctx)
        if problems:
            entry.update(status="failed", reason="; ".join(problems))
    except Skip as e:
        entry.update(status="skipped", reason=str(e))
    except BaseException as e:  # noqa: BLE001 (a failed section must not stop the next; Ctrl-C still does)
        if isinstance(e, KeyboardInterrupt):
            raise
        entry.update(status="failed", reason=_reason(e), traceback=traceback.format_exc()[-4000:])
    finally:
        entry["elapsed_s"] = time.perf_counter() - start
        gc.collect()
        if ctx["device"].type == "cuda":
            torch.cuda.empty_cache()
    return entry


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="bench.py gpu", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, default=Path("gpu_check.json"), help="the JSON file of figures")
    p.add_argument("--device", default="auto", help="auto (cuda if available), cuda, cuda:N, cpu")
    p.add_argument("--quick", action="store_true", help="small shapes (the CPU test)")
    p.add_argument("--skip", type=int, nargs="*", default=[], help="section numbers to leave out")
    p.add_argument("--cache-dir", default="~/.cache/latentmoe", help="the BPE cache of sections 8 and 9")
    p.add_argument("--budget-scale", type=float, default=1.0, help="multiply every section's time budget")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    device = torch.device("cuda" if args.device == "auto" and torch.cuda.is_available() else
                          ("cpu" if args.device == "auto" else args.device))
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    REPS["n"] = shapes(args.quick)["reps"]
    ctx = {"device": device, "quick": args.quick, "shapes": shapes(args.quick),
           "cache_dir": os.path.expanduser(args.cache_dir)}
    report = {"check": "latentmoe one-shot GPU check", "device": str(device), "quick": args.quick,
              "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "sections": []}
    begin = time.perf_counter()
    for number, name, fn, budget in SECTIONS:
        left = TOTAL_BUDGET_S * args.budget_scale - (time.perf_counter() - begin)
        if number in args.skip:
            entry = {"section": number, "name": name, "status": "skipped", "reason": "--skip", "elapsed_s": 0.0}
        elif left < 1:
            entry = {"section": number, "name": name, "status": "skipped", "elapsed_s": 0.0,
                     "reason": f"the check's total budget of {TOTAL_BUDGET_S * args.budget_scale:.0f} s is spent"}
        else:
            entry = run_section(number, name, fn, min(budget * args.budget_scale, left), ctx)
        report["sections"].append(entry)
        report["elapsed_s"] = time.perf_counter() - begin
        args.out.write_text(json.dumps(report, indent=1, default=str))
        budget_note = f" (budget {entry['budget_s']:.0f} s)" if "budget_s" in entry else ""
        print(f"[{number} {name}] {entry['status']} in {entry['elapsed_s']:.1f} s{budget_note}"
              + (f": {entry['reason']}" if entry["reason"] else ""), flush=True)
    failed = [e["section"] for e in report["sections"] if e["status"] == "failed"]
    print(f"gpu check: {len(report['sections'])} sections in {report['elapsed_s']:.0f} s, failed: {failed or 'none'}"
          f"; figures in {args.out}")
    return report


if __name__ == "__main__":
    main(sys.argv[1:])
