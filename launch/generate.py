"""A completion from a checkpoint or a Hugging Face directory, for eyeballing a fine-tuned model.

    python launch/generate.py <run dir>/hf --prompt "What is MLA?"              # chat template (default)
    python launch/generate.py checkpoints/step_00000400 --prompt "def f(" --raw --temperature 0.7 --top-p 0.9

The directory's tokenizer.json is used (our checkpoints and exports carry the run's). MLA models decode against the
compressed latent cache.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from data.chat import encode_prompt  # noqa: E402
from data.tokenizer import load_tokenizer  # noqa: E402
from model import CausalLM, ModelConfig  # noqa: E402
from model.generation import generate  # noqa: E402
from model.hf import load_pretrained  # noqa: E402
from trainer.checkpoint import load_model_weights  # noqa: E402


def load_model(path: Path, dtype: torch.dtype | None, device: str) -> CausalLM:
    """A released-layout directory (config.json) or one of our checkpoints (train_state.json)."""
    if (path / "config.json").is_file():
        return load_pretrained(path, dtype=dtype, device=device)
    state_file = path / "train_state.json"
    if not state_file.is_file():
        raise SystemExit(f"{path}: neither config.json (Hugging Face layout) nor train_state.json (a checkpoint)")
    fields = json.loads(state_file.read_text())["config"]["model"]
    model = load_model_weights(path, CausalLM(ModelConfig(**fields)))
    return model.to(device=device, dtype=dtype or torch.float32)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("path", type=Path, help="HF directory or checkpoint directory (step_N)")
    p.add_argument("--prompt", required=True)
    p.add_argument("--system", default=None, help="system message (chat template)")
    p.add_argument("--raw", action="store_true", help="no chat template: continue the prompt text")
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--temperature", type=float, default=0.0, help="0: greedy")
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--dtype", default=None, help="float32 / bfloat16 (default: the checkpoint's)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--json", action="store_true", help="print prompt/completion ids and text as JSON")
    args = p.parse_args(argv)

    tokenizer = load_tokenizer(args.path)
    model = load_model(args.path, getattr(torch, args.dtype) if args.dtype else None, args.device)
    if args.raw:
        prompt = ([tokenizer.bos_id] if tokenizer.bos_id is not None else []) + tokenizer.encode(args.prompt)
    else:
        messages = ([{"role": "system", "content": args.system}] if args.system else []) + \
            [{"role": "user", "content": args.prompt}]
        prompt = encode_prompt(tokenizer, messages)
    ids = torch.tensor([prompt], device=args.device)
    out, _ = generate(model, ids, args.max_new_tokens, args.temperature, args.top_p, tokenizer.eos_id,
                      torch.Generator(device=args.device).manual_seed(args.seed))
    completion = out[0, len(prompt):].tolist()
    text = tokenizer.decode([t for t in completion if t != tokenizer.eos_id])
    if args.json:
        print(json.dumps({"prompt_ids": prompt, "completion_ids": completion, "completion": text}))
    else:
        print(text)


if __name__ == "__main__":
    main()
