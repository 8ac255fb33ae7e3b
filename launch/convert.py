"""Convert between training checkpoints and Hugging Face directories.

    python launch/convert.py export <run>/checkpoints/step_00000300 /out/hf [--dtype bfloat16]
    python launch/convert.py import /ckpt/DeepSeek-V2-Lite /out/start      # then: launch/pretrain.py ...
                                                                          #   checkpoint.resume=/out/start

`export` writes the released layout (per-expert tensors, sharded safetensors, config.json) plus the run's
tokenizer. `import` turns an HF directory into a weights-only checkpoint that training starts from at step 0 (fresh
optimizer and data position), with a model config that must match the checkpoint's config.json.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import shutil
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from data.config import DataConfig  # noqa: E402
from data.loader import build_tokenizer  # noqa: E402
from data.tokenizer import load_tokenizer  # noqa: E402
from model import CausalLM, ModelConfig  # noqa: E402
from model.hf import load_pretrained, save_pretrained  # noqa: E402
from trainer.checkpoint import find_resume, load_model_weights, write_weights_only  # noqa: E402
from trainer.export import publish, staging_dir  # noqa: E402


def export(checkpoint: Path, out: Path, dtype: str | None, max_shard_size: str) -> Path:
    checkpoint = find_resume(checkpoint.parent, str(checkpoint))  # must be complete
    state = json.loads((checkpoint / "train_state.json").read_text())
    config = state["config"]
    model = load_model_weights(checkpoint, CausalLM(ModelConfig(**config["model"])))
    torch_dtype = getattr(torch, dtype or model.config.torch_dtype or "float32")
    staging = staging_dir(out)  # written whole, then put in place: never a config.json without its tokenizer
    shutil.rmtree(staging, ignore_errors=True)
    save_pretrained(model, staging, max_shard_size=max_shard_size, dtype=torch_dtype)
    if (checkpoint / "tokenizer.json").is_file():  # the run's own tokenizer, saved with every checkpoint
        tokenizer = load_tokenizer(checkpoint / "tokenizer.json")
    elif "data" in config:  # a checkpoint from before tokenizers were saved: rebuild it from the data config
        print("warning: the checkpoint holds no tokenizer.json; rebuilding it from the run's data config")
        tokenizer = build_tokenizer(DataConfig(**config["data"]))
    else:
        publish(staging, out)
        return out
    # The special tokens the run trained with (its model config was fitted to its tokenizer), named in
    # tokenizer_config.json for transformers.
    tokenizer = dataclasses.replace(tokenizer, bos_id=model.config.bos_token_id, eos_id=model.config.eos_token_id)
    tokenizer.save_pretrained(staging)
    publish(staging, out)
    return out


def import_hf(hf_dir: Path, out: Path) -> Path:
    model = load_pretrained(hf_dir, dtype=torch.float32)
    config = {"model": model.config.to_hf_config(), "source": str(hf_dir)}
    return write_weights_only(out, model, config)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="command", required=True)
    e = sub.add_parser("export", help="training checkpoint -> Hugging Face directory")
    e.add_argument("checkpoint", type=Path)
    e.add_argument("out", type=Path)
    e.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], default=None,
                   help="default: the model config's torch_dtype")
    e.add_argument("--max-shard-size", default="5GB")
    i = sub.add_parser("import", help="Hugging Face directory -> weights-only training checkpoint")
    i.add_argument("hf_dir", type=Path)
    i.add_argument("out", type=Path)
    args = p.parse_args(argv)
    if args.command == "export":
        print(f"exported {export(args.checkpoint, args.out, args.dtype, args.max_shard_size)}")
    else:
        out = import_hf(args.hf_dir, args.out)
        print(f"imported {args.hf_dir} -> {out}\n  train from it: python launch/pretrain.py checkpoint.resume={out} "
              f"model=<a preset with the same shapes>\n  (or, simpler, from the directory itself: python "
              f"launch/pretrain.py model.pretrained={args.hf_dir})")


if __name__ == "__main__":
    main()
