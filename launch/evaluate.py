"""Benchmark evaluation with lm-evaluation-harness on a training checkpoint or a Hugging Face directory, with the
model built as training builds it (any layout: ep, pp, ZeRO). Same Hydra tree as launch/pretrain.py plus `eval.*`;
see docs/evaluation.md. Needs the eval extra: pip install -e ".[eval]"

    python launch/evaluate.py checkpoint.resume=outputs/<run>/checkpoints/step_00000300 eval.tasks=[stdlib_docstrings]
    python launch/evaluate.py model.pretrained=outputs/<run>/hf eval.tasks=[mine] eval.include_path=my_tasks/
    torchrun --standalone --nproc_per_node=8 launch/evaluate.py model.pretrained=/ckpt/DeepSeek-V2-Lite \\
        eval.tasks=[hellaswag,arc_easy] eval.limit=500              # the hub must be reachable for lm-eval's tasks
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from trainer.cli import main  # noqa: E402
from trainer.eval_job import eval_task  # noqa: E402

if __name__ == "__main__":
    main(task=eval_task)
