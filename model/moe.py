"""DeepSeekMoE (docs/model.md §4): fp32 softmax router, greedy or group-limited top-k, stacked routed experts
computed with a grouped GEMM, shared experts as one fused MLP, and explicit routing statistics for the balance losses.

Shape legend: B batch, S sequence, T = B*S tokens, D model width, E routed experts, K experts per token,
G routing groups, I expert width, N = T*K token copies.

The MoE layer hands `(tokens, expert ids, weights)` to a pluggable token dispatcher. `LocalDispatcher` (here)
sorts copies by expert and runs the experts in one process; the expert-parallel all-to-all dispatcher lives in
`trainer/`, so this file never touches torch.distributed.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Protocol

import torch
import torch.nn.functional as F
from torch import nn

from .config import ModelConfig
from .layers import MLP, low_rank


@dataclass
class RoutingStats:
    """What one MoE layer reports about routing one micro-batch. Balance losses are pure functions of this record
    and the static group layout (model/balance.py), so they read the same at any parallel layout."""

    expert_counts: torch.Tensor
    """(B, E) float: token copies sent to each expert, per sequence. No gradient."""
    expert_probs: torch.Tensor
    """(B, E) fp32: router probability of each expert averaged over the sequence's tokens. Carries the gradient."""
    group_tokens: torch.Tensor
    """(B, G) float: tokens of each sequence with at least one copy in routing group g. No gradient."""
    dropped: torch.Tensor | None = None
    """() float: token copies dropped by the capacity limit in this micro-batch (None when dropping is off)."""
    dispatch: torch.Tensor | None = None
    """What the dispatcher reports about its exchange (expert parallelism; None for the local dispatcher): see
    `trainer/expert_parallel.py` `DISPATCH_FIELDS`. No gradient."""

    @property
    def tokens_per_expert(self) -> torch.Tensor:
        """(E,) token copies per expert over the micro-batch."""
        return self.expert_counts.sum(0)


class MoEGate(nn.Module):
    """The router: logits and softmax in fp32 (paper Eq. 22), then greedy or group-limited top-k
    (docs/model.md §4.2)."""

    def __init__(self, config: ModelConfig):
        super().__init__()
        self.n_experts, self.top_k = config.n_routed_experts, config.num_experts_per_tok
        self.n_group, self.topk_group = config.n_group, config.topk_group
        self.group_limited = config.topk_method == "group_limited_greedy"
        self.norm_topk_prob, self.scaling = config.norm_topk_prob, config.routed_scaling_factor
        self.weight = nn.Parameter(torch.empty(self.n_experts, config.hidden_size))

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """x (T, D) -> expert ids (T, K) int64, gate weights (T, K) fp32, scores (T, E) fp32."""
        with torch.autocast(x.device.type, enabled=False):  # fp32 even inside a bf16 autocast region
            logits = F.linear(x.float(), self.weight.float())  # (T, E)
            if "lora_A" in self._parameters:  # LoRA on the router (model/lora.py), in fp32 as the router is
                logits = logits + low_rank(x.float(), self.lora_A.float(), self.lora_B.float(), self.lora_scale)
            scores = logits.softmax(dim=-1)
        if self.group_limited:
            # Device-limited routing (paper §2.2.2): score each group by its best expert, keep topk_group groups.
            group_scores = scores.view(-1, self.n_group, self.n_experts // self.n_group).amax(dim=-1)  # (T, G)
            keep = group_scores.topk(self.topk_group, dim=-1, sorted=False).indices  # (T, topk_group)
            group_mask = torch.zeros_like(group_scores, dtype=torch.bool).scatter_(1, keep, True)
            expert_mask = group_mask.repeat_interleave(self.n_experts // self.n_group, dim=1)  # (T, E)
            weights, ids = scores.masked_fill(~expert_mask, 0.0).topk(self.top_k, dim=-1, sorted=False)
        else:
            weights, ids = scores.topk(self.top_k, dim=-1, sorted=False)
        if self.top_k > 1 and self.norm_topk_prob:
            weights = weights / (weights.sum(dim=-1, keepdim=True) + 1e-20)
        else:
            weights = weights * self.scaling
        return ids, weights, scores


class RoutedExperts(nn.Module):
    """E SwiGLU experts stored stacked: gate_up_proj (E, 2I, D) with gate rows first, down_proj (E, D, I).

    Called with token copies already sorted by expert plus per-expert counts. `impl="grouped"` runs one grouped GEMM
    per projection; `impl="loop"` is the readable per-expert reference it is tested against (and the fallback where
    no grouped GEMM kernel exists). Calls go through the module (`experts(x, counts)`), so hooks that gather
    partitioned parameters (ZeRO-3, FSDP) see them. `expert_offset` is the global id of local expert 0 (non-zero
    when experts are sharded for expert parallelism); counts are always per *local* expert.
    """

    def __init__(self, n_experts: int, hidden_size: int, intermediate_size: int, expert_offset: int = 0,
                 n_total: int | None = None):
        super().__init__()
        self.n_experts, self.intermediate_size, self.expert_offset = n_experts, intermediate_size, expert_offset
        self.n_total = n_experts if n_total is None else n_total  # experts of the layer over all shards
        self.gate_up_proj = nn.Parameter(torch.empty(n_experts, 2 * intermediate_size, hidden_size))
        self.down_proj = nn.Parameter(torch.empty(n_experts, hidden_size, intermediate_size))
        self.impl = "grouped"
        self.trainable_ids: list[int] | None = None
        self.lora_rank, self.lora_scale, self.lora_dropout = 0, 1.0, 0.0
        self.register_state_dict_pre_hook(lambda module, prefix, keep_vars: module.sync_trainable())

    # ---- expert-specialised fine-tuning: train some experts of the stack, freeze the rest
    def set_trainable_experts(self, local_ids: list[int] | None) -> None:
        """Train only these local experts (ESFT). The stacked tensors become frozen and the selected experts get
        trainable copies (`gate_up_proj_trainable`, `down_proj_trainable`), so gradients and optimizer state exist
        for them alone; the stacked tensors are refreshed from the copies whenever the state is read
        (`sync_trainable`, run by `state_dict`). None trains the whole stack again."""
        self.sync_trainable()
        self.__dict__.pop("_casts", None)
        for name in ("gate_up_proj_trainable", "down_proj_trainable"):
            self._parameters.pop(name, None)
        self.trainable_ids = None
        if local_ids is None:
            self.gate_up_proj.requires_grad_(True)
            self.down_proj.requires_grad_(True)
            return
        ids = sorted(set(int(i) for i in local_ids))
        if ids and not 0 <= ids[0] <= ids[-1] < self.n_experts:
            raise ValueError(f"trainable experts {ids}: local ids must be in [0, {self.n_experts})")
        self.gate_up_proj.requires_grad_(False)
        self.down_proj.requires_grad_(False)
        self.trainable_ids = ids
        if ids:
            index = torch.tensor(ids, device=self.gate_up_proj.device)
            self.gate_up_proj_trainable = nn.Parameter(self.gate_up_proj.detach()[index].clone())
            self.down_proj_trainable = nn.Parameter(self.down_proj.detach()[index].clone())

    # ---- LoRA (model/lora.py): a low-rank update of every expert's two projections, the stack itself frozen
    LORA_LEAVES = ("gate_up_lora_A", "gate_up_lora_B", "down_lora_A", "down_lora_B")

    def add_lora(self, rank: int, alpha: float, dropout: float = 0.0) -> None:
        """Per-expert LoRA factors, fp32 and stacked like the experts (so they shard with them under expert
        parallelism): gate_up_lora_A (E, r, D), gate_up_lora_B (E, 2I, r), down_lora_A (E, r, I), down_lora_B
        (E, D, r); expert e's gate_up_proj acts as gate_up_proj[e] + alpha / r * B[e] A[e]. B starts at zero;
        A is drawn by `model.lora.init_lora`."""
        E, two_i, D = self.gate_up_proj.shape
        device = self.gate_up_proj.device
        shapes = {"gate_up_lora_A": (E, rank, D), "gate_up_lora_B": (E, two_i, rank),
                  "down_lora_A": (E, rank, two_i // 2), "down_lora_B": (E, D, rank)}
        for name, shape in shapes.items():
            setattr(self, name, nn.Parameter(torch.zeros(shape, device=device, dtype=torch.float32)))
        self.lora_rank, self.lora_scale, self.lora_dropout = rank, alpha / rank, dropout
        self.gate_up_proj.requires_grad_(False)
        self.down_proj.requires_grad_(False)

    @property
    def stacked_leaves(self) -> tuple[str, ...]:
        """Names of the parameters stacked by expert (first dim = local expert)."""
        return ("gate_up_proj", "down_proj") + (self.LORA_LEAVES if self.lora_rank else ())

    @torch.no_grad()
    def sync_trainable(self) -> None:
        """Copy the trained experts back into the stacked tensors (what checkpoints and exports read)."""
        if getattr(self, "trainable_ids", None):
            index = torch.tensor(self.trainable_ids, device=self.gate_up_proj.device)
            self.gate_up_proj.index_copy_(0, index, self.gate_up_proj_trainable.detach().to(self.gate_up_proj.dtype))
            self.down_proj.index_copy_(0, index, self.down_proj_trainable.detach().to(self.down_proj.dtype))

    def forward(self, x: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
        """x (N, D) sorted by expert, counts (E,) -> (N, D) in the compute dtype (the autocast dtype if enabled).
        Rows beyond sum(counts) belong to no expert; their output is unspecified (`run_experts` masks them)."""
        if getattr(self, "trainable_ids", None):
            return self._forward_split(x, counts)
        lora = tuple(getattr(self, n) for n in self.LORA_LEAVES) if self.lora_rank else None
        return self._compute(x, counts, self.gate_up_proj, self.down_proj, lora)

    def _forward_split(self, x: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
        """ESFT: the copies of the selected experts go through their trainable weights, the rest through the
        frozen stack (with zero rows for the selected experts), then the rows are put back in order. Runs eagerly
        and may sync the host (trainer.compile runs it eagerly, docs/performance.md)."""
        n = int(counts.sum())
        if n < x.shape[0]:  # dropped copies at the end
            y = self._forward_split(x[:n], counts)
            return torch.cat((y, y.new_zeros(x.shape[0] - n, y.shape[-1])))
        selected = torch.zeros(self.n_experts, dtype=torch.bool, device=x.device)
        selected[self.trainable_ids] = True
        row_selected = torch.repeat_interleave(selected, counts, output_size=x.shape[0])  # (N,)
        rows_t, rows_f = row_selected.nonzero().squeeze(1), (~row_selected).nonzero().squeeze(1)
        y_frozen = self._compute(x.index_select(0, rows_f), counts.masked_fill(selected, 0), self.gate_up_proj,
                                 self.down_proj)
        y_train = self._compute(x.index_select(0, rows_t), counts[selected], self.gate_up_proj_trainable,
                                self.down_proj_trainable)
        out = y_frozen.new_empty(x.shape[0], y_frozen.shape[-1])
        return out.index_copy(0, rows_f, y_frozen).index_copy(0, rows_t, y_train.to(y_frozen.dtype))

    def _compute(self, x: torch.Tensor, counts: torch.Tensor, w_gate_up: torch.Tensor, w_down: torch.Tensor,
                 lora: tuple[torch.Tensor, ...] | None = None) -> torch.Tensor:
        """`lora`: the four LoRA factors (`LORA_LEAVES` order), each update computed with the same grouped GEMMs
        (x A^T, then B^T), never a per-expert loop or a materialised (E, out, in) delta."""
        if torch.is_autocast_enabled(x.device.type):  # grouped_mm is not autocast-aware: cast like F.linear would
            dtype = torch.get_autocast_dtype(x.device.type)
            x, w_gate_up, w_down = x.to(dtype), self._cast_once(w_gate_up, dtype), self._cast_once(w_down, dtype)
            lora = tuple(self._cast_once(t, dtype) for t in lora) if lora else None
        if self.impl == "loop" or _GROUPED_MM is None or not _grouped_mm_supported(x, self.intermediate_size,
                                                                                    self.lora_rank if lora else 0):
            return _experts_loop(x, counts, w_gate_up, w_down, self.intermediate_size, lora, self._lora_input,
                                 self.lora_scale)
        offsets = counts.cumsum(0).to(torch.int32)  # (E,) end of each expert's rows
        h = grouped_mm(x, w_gate_up.transpose(-2, -1), offsets)  # (N, 2I)
        if lora:
            h = h + self._grouped_low_rank(x, lora[0], lora[1], offsets)
        gate, up = h.split(self.intermediate_size, dim=-1)
        h = F.silu(gate) * up  # (N, I)
        y = grouped_mm(h, w_down.transpose(-2, -1), offsets)  # (N, D)
        if lora:
            y = y + self._grouped_low_rank(h, lora[2], lora[3], offsets)
        return y

    def _lora_input(self, x: torch.Tensor) -> torch.Tensor:
        return F.dropout(x, self.lora_dropout, self.training) if self.lora_dropout else x

    def _grouped_low_rank(self, x: torch.Tensor, a: torch.Tensor, b: torch.Tensor,
                          offsets: torch.Tensor) -> torch.Tensor:
        """Each row's expert's scale * x A_e^T B_e^T: (N, in) -> (N, r) -> (N, out), two grouped GEMMs."""
        low = grouped_mm(self._lora_input(x), a.transpose(-2, -1), offsets)
        return grouped_mm(low, b.transpose(-2, -1), offsets) * self.lora_scale

    def _cast_once(self, weight: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        """`weight.to(dtype)`, made once per optimizer step in eager mode and reused by every micro-batch until the
        weight changes in place (the optimizer's update moves its version counter), as autocast's cache does for
        F.linear's weights. Compiled layers cast inside the graph, where the cast fuses into its consumer."""
        if torch.compiler.is_compiling() or weight.dtype == dtype:
            return weight.to(dtype)
        casts = self.__dict__.setdefault("_casts", {})
        key = (weight._version, weight.data_ptr(), dtype, torch.is_grad_enabled(), weight.requires_grad)
        slot = casts.get(id(weight))
        if slot is None or slot[0] != key or slot[1] is not weight:
            slot = casts[id(weight)] = (key, weight, weight.to(dtype))
        return slot[2]


def _experts_loop(x: torch.Tensor, counts: torch.Tensor, w_gate_up: torch.Tensor, w_down: torch.Tensor,
                  inter: int, lora: tuple[torch.Tensor, ...] | None = None, lora_input=None,
                  lora_scale: float = 1.0) -> torch.Tensor:
    """Reference: one plain matmul chain per expert over its slice of the sorted copies (LoRA updates included)."""
    outputs = []
    sizes = counts.tolist()
    for e, chunk in enumerate(x[:sum(sizes)].split(sizes)):
        h = chunk @ w_gate_up[e].T
        if lora:
            h = h + low_rank(lora_input(chunk), lora[0][e], lora[1][e], lora_scale)
        gate, up = h.split(inter, dim=-1)
        h = F.silu(gate) * up
        y = h @ w_down[e].T
        if lora:
            y = y + low_rank(lora_input(h), lora[2][e], lora[3][e], lora_scale)
        outputs.append(y)
    outputs.append(x.new_zeros(x.shape[0] - sum(sizes), w_down.shape[1]))  # rows of no expert
    return torch.cat(outputs)


_GROUPED_MM = getattr(F, "grouped_mm", None) or getattr(torch, "_grouped_mm", None)


def grouped_mm(x: torch.Tensor, w: torch.Tensor, offsets: torch.Tensor) -> torch.Tensor:
    """x (N, K) @ w[g] (G, K, M) for the rows of each group g (rows [offsets[g-1], offsets[g])) -> (N, M).

    torch's grouped GEMM, except under torch.compile in fp32: its compile-time shape function accepts bf16 only
    while the CPU kernel runs fp32 too, so compiled fp32 code calls it through an opaque op of ours."""
    if torch.compiler.is_compiling() and x.dtype != torch.bfloat16:
        if _OPAQUE_GROUPED_MM is None:
            raise RuntimeError("compiling fp32 grouped GEMMs needs model.moe.register_compile_ops() first")
        return _OPAQUE_GROUPED_MM(x, w, offsets)
    return _GROUPED_MM(x, w, offs=offsets)


_OPAQUE_GROUPED_MM = None


def register_compile_ops() -> None:
    """Define the ops compiled fp32 code calls (`grouped_mm`); trainer.compile calls it before compiling. Not done
    at import: defining custom ops imports much of torch's compiler stack (seconds per process)."""
    global _OPAQUE_GROUPED_MM
    if _OPAQUE_GROUPED_MM is None:
        _OPAQUE_GROUPED_MM = _define_opaque_grouped_mm()


def _define_opaque_grouped_mm():
    """torch's grouped GEMM as an op of ours with its own shape function and backward."""
    @torch.library.custom_op("latentmoe::grouped_mm", mutates_args=())
    def forward(x: torch.Tensor, w: torch.Tensor, offsets: torch.Tensor) -> torch.Tensor:
        return _GROUPED_MM(x, w, offs=offsets)

    @forward.register_fake
    def _(x: torch.Tensor, w: torch.Tensor, offsets: torch.Tensor) -> torch.Tensor:
        return x.new_empty(x.shape[0], w.shape[-1])

    @torch.library.custom_op("latentmoe::grouped_mm_weight_grad", mutates_args=())
    def weight_grad(x: torch.Tensor, grad: torch.Tensor, offsets: torch.Tensor) -> torch.Tensor:
        """(G, K, M): x_g^T @ grad_g for each group's rows (zeros for an empty group)."""
        return _GROUPED_MM(x.t(), grad, offs=offsets)

    @weight_grad.register_fake
    def _(x: torch.Tensor, grad: torch.Tensor, offsets: torch.Tensor) -> torch.Tensor:
        return x.new_empty(offsets.shape[0], x.shape[1], grad.shape[1])

    def backward(ctx, grad: torch.Tensor):
        x, w, offsets = ctx.saved_tensors
        grad = grad.contiguous()
        grad_x = forward(grad, w.transpose(-2, -1), offsets) if ctx.needs_input_grad[0] else None
        grad_w = weight_grad(x, grad, offsets) if ctx.needs_input_grad[1] else None
        return grad_x, grad_w, None

    def setup_context(ctx, inputs, output) -> None:
        ctx.save_for_backward(*inputs)

    forward.register_autograd(backward, setup_context=setup_context)
    return forward


def _grouped_mm_supported(x: torch.Tensor, intermediate_size: int, lora_rank: int = 0) -> bool:
    """torch's grouped GEMM needs rows aligned to 16 bytes (CPU and CUDA: the LoRA rank too, e.g. a multiple of 8
    in bf16) and, on CUDA, bf16 on sm80+."""
    aligned = all(n * x.element_size() % 16 == 0 for n in (x.shape[-1], intermediate_size, lora_rank))
    if x.device.type == "cpu":
        return aligned
    if x.device.type == "cuda":
        return aligned and x.dtype == torch.bfloat16 and torch.cuda.get_device_capability(x.device) >= (8, 0)
    return False


class TokenDispatcher(Protocol):
    """Sends token copies to their experts and combines the results: the seam between model/ and trainer/.

    Two phases, so the MoE layer can run the shared experts while an exchange is in flight: `dispatch` starts
    sending (it may return before the rows arrive), `combine` runs the experts on what arrived and returns the
    weighted sum of their outputs. Neither may sync the host except for the split sizes an uneven all-to-all needs
    (docs/performance.md)."""

    def dispatch(self, x: torch.Tensor, expert_ids: torch.Tensor, weights: torch.Tensor, experts: RoutedExperts,
                 dropping: bool = False) -> Any:
        """x (T, D), expert_ids (T, K) global ids, weights (T, K) fp32 -> the state `combine` takes. `dropping`:
        some ids may be DROPPED (the capacity limit is on)."""
        ...

    def combine(self, pending: Any) -> tuple[torch.Tensor, torch.Tensor | None]:
        """-> (weighted sum of expert outputs (T, D) in x's dtype, dispatch statistics or None)."""
        ...


DROPPED = -1
"""Expert id of a token copy dropped by the capacity limit: dispatchers skip it (its gate weight is 0)."""


def expert_histogram(expert_ids: torch.Tensor, n_experts: int) -> torch.Tensor:
    """(n_experts,) int64 copies per expert, DROPPED ignored: a scatter on the device (CUDA's bincount syncs)."""
    flat = expert_ids.reshape(-1)
    bins = torch.where(flat >= 0, flat, n_experts)
    return torch.zeros(n_experts + 1, dtype=torch.int64, device=flat.device).scatter_add_(
        0, bins, torch.ones_like(bins))[:n_experts]


def sort_copies(expert_ids: torch.Tensor, n_experts: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Every copy's flat (token * K + slot) index sorted by expert, dropped copies last, and the copies per expert.
    No host sync: the number of rows is T * K whatever was dropped (`run_experts` masks the dropped tail)."""
    flat = expert_ids.reshape(-1)
    order = torch.where(flat >= 0, flat, n_experts).argsort(stable=True)  # (T*K,)
    return order, expert_histogram(flat, n_experts)


def run_experts(experts: RoutedExperts, rows: torch.Tensor, counts: torch.Tensor, may_drop: bool) -> torch.Tensor:
    """experts(rows, counts) where the rows beyond sum(counts) belong to no expert (dropped copies sorted last):
    the grouped GEMM leaves those output rows unwritten, so they are zeroed on the way in (their gradient) and out."""
    if not may_drop:
        return experts(rows, counts)
    valid = (torch.arange(rows.shape[0], device=rows.device) < counts.sum())[:, None]  # (N, 1)
    rows = torch.where(valid, rows, rows.new_zeros(()))
    y = experts(rows, counts)
    return torch.where(valid, y, y.new_zeros(()))


@dataclass
class _LocalPending:
    x: torch.Tensor
    expert_ids: torch.Tensor
    weights: torch.Tensor
    experts: RoutedExperts
    dropping: bool


class LocalDispatcher:
    """All experts in this process: sort copies by expert, run the experts, weighted combine. No host sync."""

    def dispatch(self, x: torch.Tensor, expert_ids: torch.Tensor, weights: torch.Tensor, experts: RoutedExperts,
                 dropping: bool = False) -> _LocalPending:
        if experts.n_experts != experts.n_total:
            raise ValueError("LocalDispatcher needs the layer's full expert set; this layer holds a shard (expert "
                             "parallelism needs its all-to-all dispatcher)")
        return _LocalPending(x, expert_ids, weights, experts, dropping)

    def combine(self, pending: _LocalPending) -> tuple[torch.Tensor, None]:
        x, expert_ids, experts = pending.x, pending.expert_ids, pending.experts
        K = expert_ids.shape[1]
        order, counts = sort_copies(expert_ids, experts.n_experts)
        token_of_copy = order // K  # (T*K,)
        y_sorted = run_experts(experts, x.index_select(0, token_of_copy), counts, may_drop=pending.dropping)
        return combine(y_sorted, pending.weights.reshape(-1)[order], token_of_copy, x.shape[0]).to(x.dtype), None

    def __call__(self, x: torch.Tensor, expert_ids: torch.Tensor, weights: torch.Tensor, experts: RoutedExperts,
                 dropping: bool = True) -> torch.Tensor:
        """Both phases at once: the weighted sum of expert outputs (T, D)."""
        return self.combine(self.dispatch(x, expert_ids, weights, experts, dropping))[0]


class _WeightedCombine(torch.autograd.Function):
    """out[t] = sum over copies c of token t of weight[c] * y[c], computed in fp32 while saving y in its own dtype
    (autograd would save an fp32 copy of y: 4 bytes per element of the largest MoE activation)."""

    @staticmethod
    def forward(ctx, y: torch.Tensor, weights: torch.Tensor, token_of_copy: torch.Tensor, n_tokens: int):
        ctx.save_for_backward(y, weights, token_of_copy)
        weighted = y.float() * weights.unsqueeze(-1)  # (N, D) fp32, freed after the scatter
        return weighted.new_zeros(n_tokens, y.shape[-1]).index_add_(0, token_of_copy, weighted)

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor):
        y, weights, token_of_copy = ctx.saved_tensors
        grad_copy = grad_out.index_select(0, token_of_copy)  # (N, D) fp32
        grad_y = (grad_copy * weights.unsqueeze(-1)).to(y.dtype) if ctx.needs_input_grad[0] else None
        grad_w = (grad_copy * y.float()).sum(-1) if ctx.needs_input_grad[1] else None
        return grad_y, grad_w, None, None


def combine(expert_out: torch.Tensor, weights: torch.Tensor, token_of_copy: torch.Tensor, n_tokens: int
            ) -> torch.Tensor:
    """Sum each token's weighted expert outputs: (N, D) x (N,) scattered onto (T, D), in fp32 as the released
    router weights are (docs/model.md §8.1: the caller casts back to the activation dtype)."""
    return _WeightedCombine.apply(expert_out, weights, token_of_copy, n_tokens)


class MoE(nn.Module):
    """DeepSeekMoE layer: y = sum_k g_k Expert_k(u) + SharedExperts(u) (paper Eq. 20), plus its routing stats.

    `expert_shard=(offset, count)` builds only experts [offset, offset + count) (expert parallelism); routing always
    covers all `n_routed_experts`. Device-level token dropping (paper §2.2.4, training only) is off until
    `capacity_factor` is set: each routing group (the paper's device) receives at most capacity_factor x its
    average share of this micro-batch's copies, the highest-affinity ones; sequences marked exempt are never
    dropped. Decided from the local micro-batch before dispatch, so it does not depend on the expert layout.
    """

    def __init__(self, config: ModelConfig, expert_shard: tuple[int, int] | None = None):
        super().__init__()
        self.n_experts, self.n_group, self.top_k = config.n_routed_experts, config.n_group, config.num_experts_per_tok
        self.gate = MoEGate(config)
        offset, count = expert_shard or (0, config.n_routed_experts)
        self.experts = RoutedExperts(count, config.hidden_size, config.moe_intermediate_size, expert_offset=offset,
                                     n_total=config.n_routed_experts)
        self.shared_experts = (
            MLP(config.hidden_size, config.shared_intermediate_size) if config.shared_intermediate_size else None
        )
        self.dispatcher: TokenDispatcher = LocalDispatcher()
        self.capacity_factor: float | None = None

    def forward(self, x: torch.Tensor, exempt: torch.Tensor | None = None) -> tuple[torch.Tensor, RoutingStats]:
        """x (B, S, D); exempt (B,) bool marks sequences whose tokens are never dropped."""
        B, S, D = x.shape
        tokens = x.reshape(-1, D)  # (T, D)
        expert_ids, weights, scores = self.gate(tokens)
        stats = self.routing_stats(expert_ids.view(B, -1), scores.view(B, S, -1))  # selections, before any drop
        if self.training and self.capacity_factor:
            keep = capacity_keep(expert_ids.view(B, -1), weights.view(B, -1), self.n_experts // self.n_group,
                                 self.n_group, self.capacity_factor, exempt)
            expert_ids = expert_ids.masked_fill(~keep.view_as(expert_ids), DROPPED)
            weights = weights.masked_fill(~keep.view_as(weights), 0.0)
            stats.dropped = (~keep).sum().float()
        dropping = stats.dropped is not None
        pending = self.dispatcher.dispatch(tokens, expert_ids, weights, self.experts, dropping)
        # Anything independent of the exchange runs while it is in flight (paper §3.1.3: shared experts overlap the all-to-all).
        shared = self.shared_experts(x) if self.shared_experts is not None else None
        y, stats.dispatch = self.dispatcher.combine(pending)
        y = y.view(B, S, D)
        return (y if shared is None else y + shared), stats

    def routing_stats(self, expert_ids: torch.Tensor, scores: torch.Tensor) -> RoutingStats:
        """expert_ids (B, S*K), scores (B, S, E) -> per-sequence counts, mean probabilities and group hits."""
        B = expert_ids.shape[0]
        with torch.no_grad():
            counts = scores.new_zeros(B, self.n_experts).scatter_add_(
                1, expert_ids, torch.ones_like(expert_ids, dtype=scores.dtype))  # (B, E)
            groups = (expert_ids // (self.n_experts // self.n_group)).view(B, scores.shape[1], -1)  # (B, S, K)
            hit = scores.new_zeros(*groups.shape[:2], self.n_group).scatter_(2, groups, 1.0)  # (B, S, G)
        return RoutingStats(expert_counts=counts, expert_probs=scores.mean(dim=1), group_tokens=hit.sum(dim=1))


@torch.no_grad()
def capacity_keep(expert_ids: torch.Tensor, weights: torch.Tensor, experts_per_group: int, n_group: int,
                  capacity_factor: float, exempt: torch.Tensor | None) -> torch.Tensor:
    """(B, S*K) bool: which token copies of this micro-batch survive the device-level budget.

    Each routing group (the paper's device) may receive capacity_factor x (B S K / n_group) copies, its average
    share; copies of exempt sequences come first and are never dropped (they use up budget), then the others by
    descending affinity; the rest are dropped."""
    B, N = expert_ids.shape
    budget = max(1, int(capacity_factor * B * N / n_group))
    bucket = (expert_ids // experts_per_group).reshape(-1)  # (B*N,) the routing group of each copy
    affinity = weights.reshape(-1).float()
    if exempt is not None:
        affinity = affinity + exempt[:, None].expand(B, N).reshape(-1).float() * (affinity.max() + 1.0)
    by_affinity = (-affinity).argsort(stable=True)
    order = by_affinity[bucket[by_affinity].argsort(stable=True)]  # group-major, affinity descending
    sorted_bucket = bucket[order]
    starts = torch.searchsorted(sorted_bucket, sorted_bucket, right=False)  # first position of each group
    rank_in_bucket = torch.arange(B * N, device=expert_ids.device) - starts
    keep = torch.empty(B * N, dtype=torch.bool, device=expert_ids.device)
    keep[order] = rank_in_bucket < budget
    keep = keep.view(B, N)
    if exempt is not None:
        keep |= exempt[:, None]
    return keep


def exempt_sequences(input_ids: torch.Tensor, fraction: float) -> torch.Tensor:
    """(B,) bool: about `fraction` of sequences, chosen by a hash of their tokens (the same on every layout)."""
    S = input_ids.shape[1]
    mix = (torch.arange(S, device=input_ids.device, dtype=torch.int64) * 2654435761 + 97) % 1000003
    return (input_ids.long() * mix).sum(-1) % 10000 < int(fraction * 10000)
