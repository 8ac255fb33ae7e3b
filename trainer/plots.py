"""Pictures of a run from its `metrics.jsonl` (`launch/plot.py`): loss with validation loss, learning rate, gradient
norm, tokens/s, the three balance terms, and each MoE layer's expert load over time as a labelled heatmap. Works on a
run still in progress (a half-written last line is skipped) and after relaunches (a step logged twice keeps its last
record: the timeline that survived). matplotlib is the optional `plot` extra (docs/configuration.md)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

PLOT_EXTRA = 'pip install -e ".[plot]"'


def read_metrics(path: Path) -> list[dict]:
    """The logged steps in step order, the last record of a step winning; a partial last line is skipped."""
    by_step: dict[int, dict] = {}
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            continue  # the line being written while we read
        if isinstance(record, dict) and "step" in record:
            by_step[int(record["step"])] = record
    return [by_step[s] for s in sorted(by_step)]


def _pyplot():
    try:
        import matplotlib
    except ImportError:
        raise SystemExit(f"launch/plot.py needs matplotlib: {PLOT_EXTRA}") from None
    matplotlib.use("Agg")  # files only, no display needed
    import matplotlib.pyplot as plt
    return plt


def _series(records: list[dict], key: str) -> tuple[list[int], list[float]]:
    points = [(r["step"], r[key]) for r in records if isinstance(r.get(key), (int, float))]
    return [s for s, _ in points], [v for _, v in points]


def load_heatmap(plt, loads: np.ndarray, steps: list[int], layer: int):
    """A figure of one MoE layer's expert load: x = expert, y = logged step, colour = the expert's share of the
    layer's token copies over the uniform share (1 = balanced), on a diverging scale from 0 to 3."""
    from matplotlib.colors import TwoSlopeNorm
    from matplotlib.ticker import MaxNLocator
    ratio = loads * loads.shape[1]
    fig, ax = plt.subplots(figsize=(max(7.0, 0.08 * loads.shape[1] + 4), 4.5))
    image = ax.imshow(ratio, aspect="auto", cmap="RdBu_r", norm=TwoSlopeNorm(vmin=0.0, vcenter=1.0, vmax=3.0),
                      interpolation="nearest", origin="lower",
                      extent=(-0.5, loads.shape[1] - 0.5, steps[0], steps[-1] if len(steps) > 1 else steps[0] + 1))
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_xlabel("routed expert")
    ax.set_ylabel("step")
    ax.set_title(f"MoE layer {layer}: expert load over training")
    fig.colorbar(image, ax=ax, label="share of token copies / uniform share")
    fig.tight_layout()
    return fig


def plot_run(run_dir: Path, out_dir: Path | None = None) -> list[Path]:
    """Write the run's charts as PNGs into `out_dir` (default `<run_dir>/plots`); returns the files written."""
    metrics = run_dir / "metrics.jsonl"
    if not metrics.is_file():
        raise SystemExit(f"{metrics}: not found (a run directory holds metrics.jsonl once its first step is logged)")
    records = read_metrics(metrics)
    if not records:
        raise SystemExit(f"{metrics}: no logged step yet")
    plt = _pyplot()
    out_dir = out_dir or run_dir / "plots"
    out_dir.mkdir(parents=True, exist_ok=True)
    written = []

    def save(fig, name: str) -> None:
        fig.savefig(out_dir / name, dpi=110)
        plt.close(fig)
        written.append(out_dir / name)

    charts = [("loss.png", "loss", [("loss", "training loss"), ("val_loss", "validation loss")], False),
              ("lr.png", "learning rate", [("lr", "lr")], False),
              ("grad_norm.png", "gradient norm (before clipping)", [("grad_norm", "global norm")], True),
              ("tokens_per_s.png", "tokens per second (training steps only)", [("tokens_per_s", "tokens/s")], False),
              ("balance.png", "balance terms (1 = balanced)",
               [("balance_expert", "expert"), ("balance_device", "device"), ("balance_comm", "communication")], False)]
    for name, title, keys, log_scale in charts:
        series = [(label, *_series(records, key)) for key, label in keys]
        series = [s for s in series if s[1]]
        if not series:
            continue
        fig, ax = plt.subplots(figsize=(7, 4))
        for label, steps, values in series:
            ax.plot(steps, values, marker="o" if len(steps) < 30 else None, markersize=3, label=label)
        ax.set_xlabel("step")
        ax.set_title(title)
        if log_scale:
            ax.set_yscale("log")
        ax.grid(alpha=0.3)
        if len(series) > 1:
            ax.legend()
        fig.tight_layout()
        save(fig, name)
    layers: dict[str, list[tuple[int, list[float]]]] = {}
    for r in records:
        for layer, row in (r.get("expert_load") or {}).items():
            layers.setdefault(layer, []).append((r["step"], row))
    for layer, rows in sorted(layers.items(), key=lambda kv: int(kv[0])):
        save(load_heatmap(plt, np.array([row for _, row in rows]), [s for s, _ in rows], int(layer)),
             f"expert_load_layer_{layer}.png")
    return written
