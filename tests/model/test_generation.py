"""Generation with MLA's latent cache: decoding one position at a time against the cache gives the logits of a full
forward pass over the same sequence, and those equal transformers' on the same weights."""

from __future__ import annotations

import pytest
import torch

from model import CausalLM
from model.generation import generate, next_token
from model.hf import load_pretrained
from tests.model.test_parity_hf import VARIANTS, _reference


@pytest.mark.parametrize("variant", ["q_lora+group_limited+yarn", "no_q_lora+greedy+yarn"])
def test_cached_decoding_matches_full_forward_and_transformers(transformers_ds, tmp_path, variant):
    """Decoding against MLA's latent cache gives, at every generated position, the logits of a full forward pass
    within 1e-5 (absolute and relative) and transformers' within 1e-4 (fp32)."""
    hf_model = _reference(transformers_ds, tmp_path, **VARIANTS[variant])
    ours = load_pretrained(tmp_path / "hf", dtype=torch.float32)
    prompt = torch.randint(3, 211, (2, 7), generator=torch.Generator().manual_seed(1))
    ids, step_logits = generate(ours, prompt, max_new_tokens=6)
    assert ids.shape == (2, 13) and len(step_logits) == 6
    with torch.no_grad():
        full = ours(ids).logits  # (B, 13, V), no cache
        theirs = hf_model(ids).logits
    for i, logits in enumerate(step_logits):  # token 7 + i was picked from the logits at position 6 + i
        torch.testing.assert_close(logits, full[:, 6 + i], rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(logits, theirs[:, 6 + i].float(), rtol=1e-4, atol=1e-4)
        assert torch.equal(ids[:, 7 + i], logits.argmax(-1))  # greedy


def test_cache_holds_the_compressed_latent_only():
    from trainer.presets import model_preset
    model = CausalLM(model_preset("tiny_lite")).eval()
    cache = model.new_cache()
    with torch.no_grad():
        model(torch.randint(0, 100, (1, 5)), cache=cache)
    c = model.config
    assert cache[0].latent.shape == (1, 5, c.kv_lora_rank) and cache[0].k_pe.shape == (1, 1, 5, c.qk_rope_head_dim)


def test_sampling_respects_top_p_and_temperature():
    logits = torch.tensor([[4.0, 3.0, -10.0, -10.0]])
    g = torch.Generator().manual_seed(0)
    picks = {int(next_token(logits, 1.0, 0.5, g)) for _ in range(50)}
    assert picks == {0}  # the nucleus of 0.5 holds only the top token (p = 0.73)
    picks = {int(next_token(logits, 1.0, 0.99, g)) for _ in range(200)}
    assert picks == {0, 1}
    assert int(next_token(logits, 0.0, 1.0)) == 0


def _decode(parts: list[CausalLM], ids: torch.Tensor, mask: torch.Tensor, steps: int) -> list[torch.Tensor]:
    """Greedy decoding through `parts` in order (a whole model, or pipeline stages each keeping its own cache) from a
    left-padded batch: the logits each new token was picked from."""
    caches = [part.new_cache() for part in parts]
    positions = (mask.long().cumsum(1) - 1).clamp(min=0)
    picked, step_ids = [], ids
    for _ in range(steps):
        x = step_ids
        for part, cache in zip(parts, caches):
            start = {"input_ids": x} if part.model.embed_tokens is not None else {"hidden_states": x}
            out = part(**start, position_ids=positions, attention_mask=mask, cache=cache)
            x = out.logits if out.logits is not None else out.hidden_states
        picked.append(x[:, -1])
        step_ids = x[:, -1].argmax(-1, keepdim=True)
        mask = torch.cat((mask, torch.ones_like(mask[:, :1])), dim=1)
        positions = positions[:, -1:] + 1
    return picked


def test_left_padded_rows_decode_as_each_alone_also_split_into_stages():
    """A left-padded batch with an attention mask decodes each row as that row alone without padding (within 1e-5),
    and pipeline stages that keep the cache of their own layers (one of them holding none) decode as the whole model
    does."""
    from trainer.presets import model_preset
    torch.manual_seed(0)
    model = CausalLM(model_preset("tiny")).eval()
    prompts = [[1, 50, 51, 52, 53, 54], [1, 70, 71], [1, 90, 91, 92]]
    L = max(map(len, prompts))
    ids = torch.zeros(len(prompts), L, dtype=torch.long)
    mask = torch.zeros(len(prompts), L, dtype=torch.bool)
    for i, p in enumerate(prompts):
        ids[i, L - len(p):], mask[i, L - len(p):] = torch.tensor(p), True
    n = model.config.num_hidden_layers
    stages = [model.share_part(range(0, 1), True, False), model.share_part(range(1, n), False, False),
              model.share_part(range(n, n), False, True)]  # the last stage holds no layer, only the head
    with torch.no_grad():
        batched = _decode([model], ids, mask, 4)
        staged = _decode(stages, ids, mask, 4)
        for i, p in enumerate(prompts):
            alone = _decode([model], torch.tensor([p]), torch.ones(1, len(p), dtype=torch.bool), 4)
            for step in range(4):
                torch.testing.assert_close(batched[step][i], alone[step][0], rtol=1e-5, atol=1e-5)
    for a, b in zip(batched, staged):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-6)
    assert not torch.equal(batched[0][0], batched[0][1])  # the rows differ: the check compares something
