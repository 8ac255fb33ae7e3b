"""Charts of a run from its metrics.jsonl, as PNGs (needs the `plot` extra: pip install -e ".[plot]").

    python launch/plot.py outputs/<date>/<time>              # writes outputs/<date>/<time>/plots/*.png
    python launch/plot.py outputs/<date>/<time> --out /tmp/p  # somewhere else

Loss and validation loss, learning rate, gradient norm, tokens/s, the three balance terms, and each MoE layer's
expert load over time; a run still in progress can be plotted at any time (docs/configuration.md, "Plots").
"""

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from trainer.plots import plot_run  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("run_dir", type=Path, help="a run directory (holds metrics.jsonl)")
    parser.add_argument("--out", type=Path, default=None, help="where the PNGs go (default: <run_dir>/plots)")
    args = parser.parse_args()
    files = plot_run(args.run_dir, args.out)
    print(f"{len(files)} charts in {files[0].parent}: {', '.join(f.name for f in files)}")


if __name__ == "__main__":
    main()
