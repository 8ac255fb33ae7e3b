"""Pretraining / continued pretraining / SFT entry point (Hydra). See README.md.

    python launch/pretrain.py                                        # one process
    torchrun --standalone --nproc_per_node=2 launch/pretrain.py      # data parallel over 2 processes
    deepspeed --num_gpus 8 launch/pretrain.py model=v2_lite ...      # the deepspeed launcher
    python launch/pretrain.py --cfg job                              # print the composed config and exit
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from trainer.cli import main  # noqa: E402

if __name__ == "__main__":
    main()
