"""Autoregressive generation with MLA's compressed latent cache (greedy, or sampled with temperature and top-p)."""

from __future__ import annotations

import torch

from .transformer import CausalLM


def next_token(logits: torch.Tensor, temperature: float, top_p: float,
               generator: torch.Generator | None = None) -> torch.Tensor:
    """(B, V) logits -> (B,) ids: argmax at temperature 0, else a sample from the top-p nucleus."""
    if temperature <= 0:
        return logits.argmax(-1)
    probs = (logits.float() / temperature).softmax(-1)
    if top_p < 1.0:
        sorted_probs, order = probs.sort(-1, descending=True)
        outside = sorted_probs.cumsum(-1) - sorted_probs > top_p  # keep the smallest prefix reaching top_p
        probs = torch.zeros_like(probs).scatter(-1, order, sorted_probs.masked_fill(outside, 0.0))
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)


@torch.no_grad()
def generate(model: CausalLM, input_ids: torch.Tensor, max_new_tokens: int, temperature: float = 0.0,
             top_p: float = 1.0, eos_id: int | None = None, generator: torch.Generator | None = None
             ) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """(ids (B, S + n), the logits each new token was picked from). MLA models run the prompt once and then one
    position per step against the latent cache; the ablation baselines recompute the whole sequence each step.
    Stops early once every sequence has produced `eos_id`."""
    was_training = model.training
    model.eval()
    cache = model.new_cache() if model.config.attention_type == "mla" else None
    ids, steps = input_ids, []
    logits = model(ids, cache=cache).logits[:, -1]
    done = torch.zeros(ids.shape[0], dtype=torch.bool, device=ids.device)
    try:
        for _ in range(max_new_tokens):
            steps.append(logits.float())
            token = next_token(logits, temperature, top_p, generator)
            if eos_id is not None:
                token = token.masked_fill(done, eos_id)
                done |= token == eos_id
            ids = torch.cat((ids, token[:, None]), dim=1)
            if bool(done.all()):
                break
            step_input = token[:, None] if cache is not None else ids
            logits = model(step_input, cache=cache).logits[:, -1]
    finally:
        model.train(was_training)
    return ids, steps
