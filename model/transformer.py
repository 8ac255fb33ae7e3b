"""The DeepSeek-V2 causal LM: embeddings, decoder layers (attention + dense MLP or MoE), final norm, untied head.

Module names equal the Hugging Face checkpoint names (`model.layers.N.self_attn.kv_b_proj`, `lm_head`, ...), so
`model/hf.py` is a table plus the per-expert stacking.

Shape legend: B batch, S sequence, D model width, V vocabulary.
"""

from __future__ import annotations

import zlib
from dataclasses import dataclass, field

import torch
import torch.utils.checkpoint
from torch import nn

from .attention import ContextMask, LatentCache, build_attention, document_causal_mask, rope_dim
from .balance import BALANCE_TERMS, balance_coefficients, balance_losses
from .config import ModelConfig
from .layers import MLP, RMSNorm
from .loss import IGNORE_INDEX, cross_entropy
from .moe import MoE, MoEGate, RoutedExperts, RoutingStats, exempt_sequences
from .rope import RotaryEmbedding


@dataclass
class CausalLMOutput:
    logits: torch.Tensor | None
    """(B, S, V) in the activation dtype; None for a part of the model without the head (a pipeline stage)."""
    loss: torch.Tensor | None = None
    """Mean next-token cross-entropy in fp32 over labels != -100 (only when labels are given). Excludes aux_loss."""
    aux_loss: torch.Tensor | None = None
    """Sum over MoE layers of coefficient * balance term, for the terms whose coefficient is > 0 (training only)."""
    balance: dict[str, torch.Tensor] = field(default_factory=dict)
    """Unweighted balance terms summed over MoE layers, detached, for metrics (training only)."""
    routing: list[RoutingStats] = field(default_factory=list)
    """One record per MoE layer, in layer order."""
    hidden_states: torch.Tensor | None = None
    """(B, S, D) output of the last layer, given only by a part of the model without the head."""


class ModelCache(dict):
    """The inference cache of a model or of a part of it: layer index -> that layer's LatentCache, and the positions
    seen so far (kept here too, so that a part holding no layer, such as a pipeline stage of only the head, knows
    them)."""

    length: int = 0


class DecoderLayer(nn.Module):
    def __init__(self, config: ModelConfig, layer_idx: int, expert_shard: tuple[int, int] | None = None):
        super().__init__()
        self.self_attn = build_attention(config)
        if config.is_moe_layer(layer_idx):
            self.mlp: nn.Module = MoE(config, expert_shard)
        else:
            self.mlp = MLP(config.hidden_size, config.intermediate_size)
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.checkpointing = False
        """Recompute this layer in backward instead of keeping its activations (inside the layer, so a compiled
        layer compiles the recomputation with it, docs/performance.md)."""

    @property
    def is_moe(self) -> bool:
        return isinstance(self.mlp, MoE)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, mask: torch.Tensor | None = None,
                exempt: torch.Tensor | None = None, cache=None) -> tuple[torch.Tensor, RoutingStats | None]:
        if self.checkpointing and self.training and torch.is_grad_enabled() and cache is None:
            return torch.utils.checkpoint.checkpoint(self.layer, x, cos, sin, mask, exempt, use_reentrant=False)
        return self.layer(x, cos, sin, mask, exempt, cache)

    def layer(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, mask: torch.Tensor | None = None,
              exempt: torch.Tensor | None = None, cache=None) -> tuple[torch.Tensor, RoutingStats | None]:
        h = self.input_layernorm(x)
        x = x + (self.self_attn(h, cos, sin, mask) if cache is None else self.self_attn(h, cos, sin, mask, cache))
        h = self.post_attention_layernorm(x)
        if self.is_moe:
            h, stats = self.mlp(h, exempt)
        else:
            h, stats = self.mlp(h), None
        return x + h, stats


class LayerStack(nn.ModuleDict):
    """Decoder layers under their global index (`model.layers.<i>`), so a part of the model that holds only some of
    them (a pipeline stage) names every tensor as the whole model does. `stack[i]` takes an int."""

    def __getitem__(self, index: int | str) -> DecoderLayer:
        return super().__getitem__(str(index))


class Decoder(nn.Module):
    """`model.*` of the checkpoint: embed_tokens, layers, norm (and the rotary frequencies, which are not saved).
    A part of the model leaves out the embedding and/or the final norm (None) and holds some of the layers."""

    def __init__(self, config: ModelConfig, expert_shard: tuple[int, int] | None, layers: range, embedding: bool,
                 head: bool):
        super().__init__()
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size) if embedding else None
        self.layers = LayerStack({str(i): DecoderLayer(config, i, expert_shard) for i in layers})
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps) if head else None
        self.rotary_emb = RotaryEmbedding(rope_dim(config), config)


class CausalLM(nn.Module):
    """DeepSeek-V2 (and the MHA/GQA ablation variants) as a next-token language model.

    `expert_shard=(offset, count)` builds only those routed experts in every MoE layer (expert parallelism: the
    trainer plugs an all-to-all dispatcher into each layer); the default is all of them. `layers`, `embedding` and
    `head` build a contiguous part of the model (a pipeline stage): the decoder layers in `layers` (global indices,
    so tensor names are the whole model's), with or without the token embedding and the final norm + output head.
    A part without the embedding takes `hidden_states` instead of `input_ids`; a part without the head returns
    `hidden_states` instead of logits. Its forward is the model's forward.
    """

    loss_fn = staticmethod(cross_entropy)
    """Mean next-token cross-entropy of (N, V) logits against (N,) targets (a compiled copy under trainer.compile)."""

    def __init__(self, config: ModelConfig, expert_shard: tuple[int, int] | None = None, layers: range | None = None,
                 embedding: bool = True, head: bool = True):
        super().__init__()
        self.config = config
        self.init_seed = weight_seed()  # drawn before any submodule consumes the global RNG
        self.no_drop_fraction = 0.1  # sequences exempt from token dropping (paper: about 10%)
        self.context = None
        """Context parallelism (set from trainer/context_parallel.py): an object whose `layout(batch, seq_len,
        device, document_ids)` returns this micro-batch's `ContextMask`; None: each rank holds whole sequences."""
        layers = range(config.num_hidden_layers) if layers is None else layers
        if layers and not 0 <= layers[0] <= layers[-1] < config.num_hidden_layers:
            raise ValueError(f"layers={layers}: outside the model's {config.num_hidden_layers} layers")
        self.model = Decoder(config, expert_shard, layers, embedding, head)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False) if head else None
        if not any(p.is_meta for p in self.parameters()):
            self.init_weights()

    @property
    def activation_checkpointing(self) -> bool:
        """Recompute each decoder layer in backward instead of keeping its activations (long context)."""
        return any(layer.checkpointing for layer in self.model.layers.values())

    @activation_checkpointing.setter
    def activation_checkpointing(self, on: bool) -> None:
        for layer in self.model.layers.values():
            layer.checkpointing = on

    @property
    def is_partial(self) -> bool:
        """Whether this is only a part of the model (a pipeline stage)."""
        return (self.model.embed_tokens is None or self.lm_head is None
                or len(self.model.layers) != self.config.num_hidden_layers)

    def share_part(self, layers: range, embedding: bool, head: bool) -> CausalLM:
        """A part of this model made of its own modules (shared, not copied): the decoder layers `layers` (global
        indices, all held here) with or without the embedding and the final norm + head. Runs the model's forward
        on that part, as a pipeline stage built on its own would; several parts of one model are the virtual
        stages a rank holds under an interleaved or V-shaped pipeline schedule (docs/parallelism.md)."""
        missing = [i for i in layers if str(i) not in self.model.layers]
        if missing or (embedding and self.model.embed_tokens is None) or (head and self.lm_head is None):
            raise ValueError(f"share_part: this model does not hold layers {missing}"
                             + (" / the embedding" if embedding and self.model.embed_tokens is None else "")
                             + (" / the head" if head and self.lm_head is None else ""))
        part = CausalLM.__new__(CausalLM)
        nn.Module.__init__(part)
        decoder = Decoder.__new__(Decoder)
        nn.Module.__init__(decoder)
        decoder.embed_tokens = self.model.embed_tokens if embedding else None
        decoder.layers = LayerStack({str(i): self.model.layers[i] for i in layers})
        decoder.norm = self.model.norm if head else None
        decoder.rotary_emb = self.model.rotary_emb
        part.config, part.init_seed, part.no_drop_fraction = self.config, self.init_seed, self.no_drop_fraction
        part.context = self.context
        part.model, part.lm_head = decoder, self.lm_head if head else None
        if "loss_fn" in self.__dict__:  # a compiled loss (trainer.compile)
            part.loss_fn = self.loss_fn
        part.train(self.training)
        return part

    def init_weights(self, std: float | None = None) -> None:
        """Normal(0, std) for every matrix (std defaults to `initializer_range`), ones for norms; see
        `init_module_weights`, which makes the values independent of how the model is split over processes."""
        init_module_weights(self, self.init_seed, self.config.initializer_range if std is None else std)

    def new_cache(self) -> ModelCache:
        """An empty inference cache: one MLA latent cache per decoder layer this model (or part) holds, under the
        layer's global index (`forward(..., cache=...)` fills it; a pipeline stage keeps the cache of its layers)."""
        if self.config.attention_type != "mla":
            raise ValueError(f"the inference cache is MLA's latent cache; attention_type={self.config.attention_type}"
                             " runs without one")
        return ModelCache({int(i): LatentCache() for i in self.model.layers})

    def moe_layers(self) -> list[MoE]:
        return [layer.mlp for layer in self.model.layers.values() if layer.is_moe]

    def set_token_dropping(self, capacity_factor: float | None, no_drop_fraction: float = 0.1) -> None:
        """Device-level token dropping for training (None turns it off; evaluation never drops)."""
        self.no_drop_fraction = no_drop_fraction
        for moe in self.moe_layers():
            moe.capacity_factor = capacity_factor

    def forward(self, input_ids: torch.Tensor | None = None, position_ids: torch.Tensor | None = None,
                labels: torch.Tensor | None = None, document_ids: torch.Tensor | None = None,
                cache: ModelCache | None = None, hidden_states: torch.Tensor | None = None,
                exempt: torch.Tensor | None = None, attention_mask: torch.Tensor | None = None) -> CausalLMOutput:
        """input_ids (B, S), or hidden_states (B, S, D) for a part of the model without the embedding; position_ids
        (B, S) default 0..S-1; labels (B, S) are the *targets* of each position (the next token, already shifted,
        -100 where no loss is taken); document_ids (B, S), when given, keep attention inside each packed document
        (SFT packing); without them attention is plainly causal. exempt (B,) bool: the sequences token dropping
        spares (default: chosen from input_ids, see `exempt_sequences`); a later pipeline stage is handed the
        first stage's choice. cache: from `new_cache`, extended by this call (generation). attention_mask (B, T)
        with T = cached + new positions, True (or 1) for real tokens and False for padding (left-padded batches of
        evaluation and generation): no real token attends to padding (a padding position attends to itself only, so
        that its values stay finite)."""
        x = self.model.embed_tokens(input_ids) if self.model.embed_tokens is not None else hidden_states  # (B, S, D)
        B, S = x.shape[:2]
        past = cache.length if cache is not None else 0
        mask = None
        if self.context is not None and cache is None and attention_mask is None:
            mask = self.context.layout(B, S, x.device, document_ids)  # this rank's chunks of the sequences
            if position_ids is None:
                position_ids = mask.q_index.expand(B, S)
        if position_ids is None:
            position_ids = torch.arange(past, past + S, device=x.device).expand(B, S)
        if attention_mask is not None:
            if document_ids is not None:
                raise ValueError("give document_ids (packed documents) or attention_mask (padding), not both")
            mask = padding_causal_mask(attention_mask.bool(), past, S)
        elif mask is None and document_ids is not None:
            mask = document_causal_mask(document_ids)
        if exempt is None and self.training and any(m.capacity_factor for m in self.moe_layers()):
            if input_ids is None:
                raise ValueError("token dropping in a part without the embedding needs `exempt` from the first part")
            exempt = exempt_sequences(input_ids, self.no_drop_fraction)
        cos, sin = self.model.rotary_emb(position_ids)  # (B, S, rope/2) each
        routing = []
        for i, layer in self.model.layers.items():
            x, stats = layer(x, cos, sin, mask, exempt, cache[int(i)] if cache is not None else None)
            if stats is not None:
                routing.append(stats)
        if cache is not None:
            cache.length = past + S
        out = CausalLMOutput(logits=None, routing=routing)
        if self.lm_head is None:
            out.hidden_states = x
        else:
            out.logits = self.lm_head(self.model.norm(x))  # (B, S, V)
            if labels is not None:
                out.loss = self.loss_fn(out.logits.flatten(0, 1), labels.flatten())
        if self.training and routing:
            if isinstance(mask, ContextMask) and mask.reduce_stats is not None:
                routing = [mask.reduce_stats(stats) for stats in routing]  # whole sequences' statistics
            out.aux_loss, out.balance = self._balance(routing)
        return out

    def _balance(self, routing: list[RoutingStats]) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        per_layer = [layer_balance(stats, self.config) for stats in routing]
        aux = torch.stack([a for a, _ in per_layer]).sum()
        return aux, {name: torch.stack([t[name] for _, t in per_layer]).sum() for name in BALANCE_TERMS}


def layer_balance(stats: RoutingStats, config: ModelConfig) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """One MoE layer's auxiliary loss (coefficient x term, for terms whose coefficient is > 0) and its unweighted
    terms (detached, for metrics). The model's aux_loss is the sum of these over its MoE layers."""
    coeffs = balance_coefficients(config)
    terms = balance_losses(stats, config)
    aux = sum((coeffs[n] * terms[n] for n in BALANCE_TERMS if coeffs[n] > 0), torch.zeros_like(terms["expert"]))
    return aux, {name: value.detach() for name, value in terms.items()}


def weight_seed() -> int:
    """The base seed of layout-free initialisation: one draw of the global RNG (so torch.manual_seed fixes it)."""
    return int(torch.randint(0, 2**62, (1,), device="cpu"))


def init_module_weights(module: nn.Module, seed: int, std: float, prefix: str = "") -> None:
    """Initialise `module` (the whole model or any part of it, named `prefix` inside CausalLM) layout-free.

    Every weight draws from its own generator, seeded by (`seed`, its full CausalLM name, and for routed experts the
    global expert index), so a tensor gets the same initial values whichever process builds it: experts sharded over
    expert-parallel ranks and layers built by a single pipeline stage match the one-process model exactly. The
    generators live on the weights' device, so the values are layout-free per device type (CUDA generators draw
    other numbers than CPU ones); a model built on the meta device is initialised after `to_empty` (docs/design.md,
    "Building the model")."""
    def generator(name: str, offset: int, device: torch.device) -> torch.Generator:
        g = torch.Generator(device)
        g.manual_seed((seed + 1_000_003 * zlib.crc32(name.encode()) + offset) % 2**63)
        return g

    with torch.no_grad():
        for name, sub in module.named_modules():
            full = prefix + name
            if isinstance(sub, (nn.Linear, nn.Embedding, MoEGate)):
                nn.init.normal_(sub.weight, 0.0, std, generator=generator(full, 0, sub.weight.device))
            elif isinstance(sub, RoutedExperts):
                for local in range(sub.n_experts):
                    g = generator(full, sub.expert_offset + local, sub.gate_up_proj.device)
                    nn.init.normal_(sub.gate_up_proj[local], 0.0, std, generator=g)
                    nn.init.normal_(sub.down_proj[local], 0.0, std, generator=g)
            elif isinstance(sub, RMSNorm):
                sub.reset_parameters()


def next_token_labels(input_ids: torch.Tensor) -> torch.Tensor:
    """Targets for plain language modelling on a batch: labels[t] = input_ids[t + 1], last position ignored."""
    labels = torch.full_like(input_ids, IGNORE_INDEX)
    labels[:, :-1] = input_ids[:, 1:]
    return labels


def padding_causal_mask(valid: torch.Tensor, past: int, S: int) -> torch.Tensor:
    """(B, T) real-token flags -> the (B, 1, S, T) attention mask of the S new positions (absolute positions past ..
    past + S - 1): causal, never onto padding, and every position onto itself."""
    T = valid.shape[1]
    if T != past + S:
        raise ValueError(f"attention_mask covers {T} positions; the cache holds {past} and {S} are new")
    keys = torch.arange(T, device=valid.device)
    queries = past + torch.arange(S, device=valid.device)
    causal = keys[None, :] <= queries[:, None]  # (S, T)
    itself = keys[None, :] == queries[:, None]
    return ((causal[None] & valid[:, None, :]) | itself[None]).unsqueeze(1)
