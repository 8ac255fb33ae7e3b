"""Metrics on rank 0: one log line per `log_every` steps with a fixed vocabulary, the same numbers as one JSON
object per logged step in `<run dir>/metrics.jsonl`, a progress bar with ETA, and wandb (offline by default) with an
expert-load heatmap per MoE layer from time to time."""

from __future__ import annotations

import json
import math
import resource
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .config import LoggingConfig, WandbMode

# Peak dense bf16 TFLOP/s by device name, for MFU when trainer.peak_tflops is not given.
PEAK_BF16_TFLOPS = {"H200": 989.0, "H100": 989.0, "H800": 989.0, "A100": 312.0, "A800": 312.0, "L40S": 362.0,
                    "A10": 125.0, "L4": 121.0}


def device_peak_tflops(device: torch.device) -> float | None:
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    return next((v for k, v in PEAK_BF16_TFLOPS.items() if k in name), None)


def peak_memory_gib(device: torch.device) -> float:
    """Peak CUDA memory allocated, or the process's peak resident memory on CPU."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # Linux reports KiB


def load_imbalance(tokens_per_expert: torch.Tensor) -> tuple[float, list[float]]:
    """(pooled max/mean over all layers' experts, per-layer max/mean) of a (layers, experts) count matrix."""
    counts = tokens_per_expert.double()
    per_layer = (counts.max(1).values / counts.mean(1).clamp(min=1e-12)).tolist()
    return float(counts.max() / counts.mean().clamp(min=1e-12)), per_layer


def heatmap_image(history: list[np.ndarray]) -> np.ndarray:
    """RGB uint8 image of load over time for one layer: rows = logged steps, columns = experts; white is the
    uniform share, blue under-loaded, red over-loaded (saturating at 3x)."""
    loads = np.stack(history)  # (steps, experts), each row sums to 1
    ratio = loads * loads.shape[1]  # 1.0 = uniform
    over = np.clip((ratio - 1) / 2, 0, 1)
    under = np.clip(1 - ratio, 0, 1)
    rgb = np.stack([1 - under, 1 - over - under * 0.5, 1 - over], axis=-1).clip(0, 1)
    scale = max(4, 512 // loads.shape[1])  # about 512 pixels wide whatever the expert count
    return (np.kron(rgb, np.ones((scale, scale, 1))) * 255).astype(np.uint8)


def labelled_heatmap(rows: list[tuple[int, np.ndarray]], layer: int) -> np.ndarray:
    """One layer's load over time as an RGB image with axes, labels and a colour bar (launch/plot.py's chart) when
    matplotlib is installed (the `plot` extra), else the bare `heatmap_image`. `rows`: (step, load) pairs."""
    try:
        import matplotlib
    except ImportError:
        return heatmap_image([load for _, load in rows])
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from .plots import load_heatmap
    fig = load_heatmap(plt, np.stack([load for _, load in rows]), [s for s, _ in rows], layer)
    fig.canvas.draw()
    image = np.asarray(fig.canvas.buffer_rgba())[..., :3].copy()
    plt.close(fig)
    return image


WANDB_ID_FILE = "wandb_run_id"


def wandb_run_id(run_dir: Path, resumed: bool) -> str:
    """The wandb run id of this run directory: the one its first launch chose, when resuming; a new one otherwise."""
    import secrets
    file = run_dir / WANDB_ID_FILE
    if resumed and file.is_file():
        return file.read_text().strip()
    run_id = secrets.token_hex(4)
    file.write_text(run_id + "\n")
    return run_id


class MetricsLogger:
    def __init__(self, run_dir: Path, cfg: LoggingConfig, max_steps: int, start_step: int, enabled: bool,
                 config_dict: dict, progress: bool, resumed_from: Path | None = None):
        """`resumed_from`: the checkpoint this launch continues from; metrics.jsonl gets a row saying so
        (`{"resumed_from": path, "at_step": N, "time": t}`, no `step` key), so steps redone after a crash show."""
        self.enabled, self.cfg, self.max_steps = enabled, cfg, max_steps
        self.history: dict[int, list[np.ndarray]] = {}
        self.last_heatmap = start_step
        self.bar = None
        self.wandb = None
        if not enabled:
            return
        run_dir.mkdir(parents=True, exist_ok=True)
        self.jsonl = open(run_dir / "metrics.jsonl", "a", encoding="utf-8")
        if resumed_from is not None and start_step < max_steps:
            self.jsonl.write(json.dumps({"resumed_from": str(resumed_from), "at_step": start_step,
                                         "time": round(time.time(), 3)}) + "\n")
            self.jsonl.flush()
        if progress and sys.stderr.isatty():  # a bar in a log file is only carriage returns
            try:
                from tqdm import tqdm
                self.bar = tqdm(total=max_steps, initial=start_step, desc="train", unit="step", dynamic_ncols=True,
                                file=sys.stderr)
            except ImportError:
                self.bar = None
        if cfg.wandb != WandbMode.disabled and start_step < max_steps:  # a launch with nothing to do logs nothing
            import wandb
            # silent: wandb's own banner and end-of-run summary (some 30 lines) would bury the last step line;
            # `summary_line` says where the run is instead. A relaunch continues the same wandb run (its id is kept
            # in the run directory); a fresh start in that directory begins a new one.
            self.wandb = wandb.init(project=cfg.project, dir=str(run_dir), mode=cfg.wandb.value, config=config_dict,
                                    id=wandb_run_id(run_dir, start_step > 0), resume="allow",
                                    settings=wandb.Settings(silent=True))

    def print(self, text: str) -> None:
        if not self.enabled:
            return
        if self.bar is not None:
            self.bar.write(text)
        else:
            print(text, flush=True)

    def advance(self, steps: int = 1) -> None:
        if self.bar is not None:
            self.bar.update(steps)

    def log(self, step: int, metrics: dict[str, Any], layer_load: torch.Tensor | None = None,
            layer_ids: list[int] | None = None) -> None:
        """Write one logged step: the line, the JSON object and (if on) wandb."""
        if not self.enabled:
            return
        self.print(format_line(step, self.max_steps, metrics))
        record = {"step": step, **metrics}
        if layer_load is not None:  # each MoE layer's share of token copies per expert (launch/plot.py draws it)
            record["expert_load"] = {str(layer): [round(float(x), 5) for x in row / max(float(row.sum()), 1e-12)]
                                     for layer, row in zip(layer_ids or range(len(layer_load)), layer_load)}
        self.jsonl.write(json.dumps(record) + "\n")
        self.jsonl.flush()
        if self.wandb is not None:
            flat = {k: v for k, v in metrics.items() if isinstance(v, (int, float)) and v is not None}
            by_source = metrics.get("tokens_by_source") or {}
            for name, tokens in by_source.items():  # tokens seen, and their share, per mixture source
                flat[f"tokens_by_source/{name}"] = tokens
                flat[f"share_by_source/{name}"] = tokens / max(1, sum(by_source.values()))
            if layer_load is not None:
                for layer, row in zip(layer_ids or range(len(layer_load)), layer_load):
                    total = float(row.sum())
                    if total > 0:
                        self.history.setdefault(layer, []).append((step, (row / total).numpy()))
                if self.cfg.heatmap_every and step - self.last_heatmap >= self.cfg.heatmap_every:
                    self.last_heatmap = step
                    import wandb
                    for layer, rows in self.history.items():
                        flat[f"expert_load/layer_{layer}"] = wandb.Image(
                            labelled_heatmap(rows[-64:], layer), caption="x: experts, y: logged steps")
            self.wandb.log(flat, step=step)

    def summary_line(self) -> str | None:
        """Where wandb keeps this run, for the end-of-run summary (None without wandb)."""
        if self.wandb is None:
            return None
        if self.cfg.wandb == WandbMode.offline:
            return f"  wandb        {self.wandb.settings.sync_dir}  (offline: `wandb sync <that dir>` uploads it)"
        return f"  wandb        {self.wandb.url}"

    def close(self) -> None:
        if not self.enabled:
            return
        if self.bar is not None:
            self.bar.close()
        self.jsonl.close()
        if self.wandb is not None:
            self.wandb.finish()


def format_line(step: int, max_steps: int, m: dict[str, Any]) -> str:
    def num(key: str, fmt: str) -> str:
        value = m.get(key)
        return "-" if value is None or (isinstance(value, float) and math.isnan(value)) else format(value, fmt)

    by_task: dict[str, list[str]] = {}  # eval/<task>/<metric>, stderr left to metrics.jsonl
    for key, value in m.items():
        if key.startswith("eval/") and "_stderr" not in key:
            task, metric = key.removeprefix("eval/").rsplit("/", 1)
            by_task.setdefault(task, []).append(f"{metric} {value:.4g}")
    evaluated = [", ".join(f"{task} {' '.join(values)}" for task, values in by_task.items())] if by_task else []
    if m.get("eval_s") is not None:
        evaluated.append(f"({m['eval_s']:.1f} s)")
    if "loss" not in m:  # an evaluation of its own (before the first step)
        return " | ".join([f"step {step}/{max_steps}", "eval " + " ".join(evaluated)])
    parts = [f"step {step}/{max_steps}", f"loss {num('loss', '.4f')}"]
    if "lr" not in m:  # validation, evaluation or a spike between log steps: only what was measured
        parts += [f"val {num('val_loss', '.4f')} ppl {num('val_ppl', '.1f')}"] if "val_loss" in m else []
        parts += ["eval " + " ".join(evaluated)] if evaluated else []
        parts += [f"LOSS SPIKE {m['loss_spike']:.2f}x the recent median"] if m.get("loss_spike") else []
        return " | ".join(parts)
    if "balance_expert" in m:
        parts.append(f"bal {num('balance_expert', '.3f')}/{num('balance_device', '.3f')}/{num('balance_comm', '.3f')}")
    parts += [f"lr {num('lr', '.2e')}", f"gnorm {num('grad_norm', '.3f')}", f"{num('tokens_per_s', ',.0f')} tok/s"]
    if m.get("mfu") is not None:
        parts.append(f"mfu {m['mfu'] * 100:.1f}%")
    parts.append(f"mem {num('peak_mem_gib', '.2f')}G")
    if "load_imbalance" in m:
        parts.append(f"imb {num('load_imbalance', '.2f')}")
    if "ranks_per_token_mean" in m:
        parts.append(f"ranks/token {num('ranks_per_token_mean', '.2f')} max {m['ranks_per_token_max']}")
    if m.get("dropped_copies"):
        parts.append(f"dropped {m['dropped_copies']}")
    parts.append(f"skipped {m.get('skipped_steps', 0)} bad {m.get('bad_records', 0)}")
    if m.get("tokens_by_source"):
        total = max(1, sum(m["tokens_by_source"].values()))
        parts.append("mix " + " ".join(f"{name} {tokens / total:.0%}" for name, tokens in m["tokens_by_source"].items()))
    if "val_loss" in m:
        parts.append(f"val {num('val_loss', '.4f')} ppl {num('val_ppl', '.1f')}")
    if evaluated:
        parts.append("eval " + " ".join(evaluated))
    if m.get("loss_spike"):
        parts.append(f"LOSS SPIKE {m['loss_spike']:.2f}x the recent median")
    if m.get("eta_s") is not None and step < max_steps:
        minutes, seconds = divmod(int(m["eta_s"]), 60)
        parts.append(f"eta {minutes // 60}:{minutes % 60:02d}:{seconds:02d}")
    return " | ".join(parts)


class Throughput:
    """Tokens/s of the training steps since the last reading: only time spent inside steps counts, so validation,
    checkpoints and start-up do not dilute it. Tokens are positions processed (padding included: it costs compute)."""

    def __init__(self):
        self.seconds, self.tokens = 0.0, 0

    def add(self, tokens: int, seconds: float) -> None:
        self.tokens += tokens
        self.seconds += seconds

    def read(self) -> float:
        rate = self.tokens / max(self.seconds, 1e-9)
        self.seconds, self.tokens = 0.0, 0
        return rate


class LossSpikes:
    """Flags a step whose loss exceeds `ratio` x the median loss of the previous `window` finite steps (after
    `window // 2` of them; non-fatal: the step is logged, with its size). A median over a window follows the
    falling loss of early training without flagging it and is not pulled up by one spike (docs/reliability.md)."""

    def __init__(self, ratio: float, window: int):
        self.ratio, self.window = ratio, window
        self.recent: list[float] = []

    def check(self, loss: float) -> float | None:
        """The loss over the recent median when the step is a spike, else None; then remembers the loss."""
        if not math.isfinite(loss) or self.ratio <= 0:
            return None
        spike = None
        if len(self.recent) >= max(1, self.window // 2):
            median = float(np.median(self.recent))
            if median > 0 and loss > self.ratio * median:
                spike = loss / median
        self.recent = (self.recent + [loss])[-self.window:]
        return spike
