"""Forward-only passes of the model as an engine holds it, for evaluation (docs/evaluation.md): per-token scores of
given sequences, and batched generation against MLA's latent cache.

It runs on the training engine's own modules, whatever the layout: the whole model, an expert shard whose MoE layers
exchange tokens with the other expert-parallel ranks, pipeline stages (DeepSpeed's one per rank, or the virtual
stages of torch's schedules), or ZeRO-3 partitions that DeepSpeed gathers around each module. No weight is copied.

What every call asks of the ranks: the ranks of one pipeline (one data-parallel rank on every stage) pass the same
batch, hidden states travel stage to stage, and the last stage's results (scores, the picked tokens) are broadcast
back along the pipeline, so every rank returns them. Layers whose forward is collective (expert-parallel dispatch,
ZeRO-3 gathers) need every rank to run as many forwards as the others: callers pass a batch on every rank, and
`generate` keeps all ranks stepping until the last sequence of the whole job has stopped.
"""

from __future__ import annotations

from typing import Callable

import torch
import torch.distributed as dist

from model.generation import next_token


class ForwardRunner:
    """Forward-only passes over this rank's part of the model (collective: every rank of the job calls each method
    the same number of times)."""

    def __init__(self, engine):
        self.engine, self.grid, self.device = engine, engine.grid, engine.device
        stages, self.owners = engine.eval_stages()
        self.stages = dict(stages)  # stage index -> CausalLM part held here
        self.n_stages = len(self.owners)
        self.me = self.grid.stage
        self.hidden = engine.cfg.model.hidden_size
        self.wire_dtype = next(engine.model.parameters()).dtype
        self.lockstep = self.grid.world > 1

    # ---------------------------------------------------------------- one pass
    def _peer(self, pipeline_rank: int) -> int:
        return pipeline_rank * self.grid.dp + self.grid.dp_rank  # the global rank of that stage in this pipeline

    def _last_rank(self) -> int:
        return self._peer(self.owners[-1])

    def _forward(self, input_ids: torch.Tensor, position_ids: torch.Tensor | None = None,
                 attention_mask: torch.Tensor | None = None, caches: dict | None = None) -> torch.Tensor | None:
        """Logits (B, S, V) on the rank holding the last stage; None on the others."""
        B, S = input_ids.shape
        x = input_ids
        for s in range(self.n_stages):
            if self.owners[s] != self.me:
                continue
            if s > 0 and self.owners[s - 1] != self.me:
                x = torch.empty(B, S, self.hidden, device=self.device, dtype=self.wire_dtype)
                dist.recv(x, src=self._peer(self.owners[s - 1]), group=self.grid.pp_group)
            start = {"input_ids": x} if s == 0 else {"hidden_states": x}
            with self.engine.autocast():
                out = self.stages[s](**start, position_ids=position_ids, attention_mask=attention_mask,
                                     cache=caches[s] if caches is not None else None)
            x = out.logits if out.logits is not None else out.hidden_states
            if s < self.n_stages - 1 and self.owners[s + 1] != self.me:
                dist.send(x.to(self.wire_dtype).contiguous(), dst=self._peer(self.owners[s + 1]),
                          group=self.grid.pp_group)
        return x if self.owners[-1] == self.me else None

    def _from_last_stage(self, result: torch.Tensor | None, like: torch.Tensor) -> torch.Tensor:
        """The last stage's `result` on every rank of this pipeline (`like`: its shape and dtype elsewhere)."""
        if self.grid.pp == 1:
            return result
        if result is None:
            result = torch.empty_like(like)
        dist.broadcast(result, src=self._last_rank(), group=self.grid.pp_group)
        return result

    # ---------------------------------------------------------------- scores
    def _eval_mode(self):
        """The model and every stage part in eval mode (the parts are modules of their own around shared layers)."""
        return _EvalMode([self.engine.model, *self.stages.values()])

    @torch.no_grad()
    def score(self, input_ids: torch.Tensor, targets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(B, S) ids and the (B, S) ids that follow each position -> (log-probability of each target in fp32,
        whether it is the argmax), both (B, S). Right padding is harmless: attention is causal."""
        with self._eval_mode():
            logits = self._forward(input_ids.to(self.device))
        packed = None
        if logits is not None:
            targets = targets.to(self.device)
            packed = torch.empty(2, *input_ids.shape, device=self.device)
            for b in range(logits.shape[0]):  # one row at a time in fp32: (S, V), not (B, S, V), extra memory
                row = logits[b].float()
                packed[0, b] = row.log_softmax(-1).gather(-1, targets[b, :, None]).squeeze(-1)
                packed[1, b] = row.argmax(-1) == targets[b]
            del logits
        packed = self._from_last_stage(packed, torch.empty(2, *input_ids.shape, device=self.device))
        return packed[0].cpu(), packed[1].cpu().bool()

    # ---------------------------------------------------------------- generation
    @torch.no_grad()
    def generate(self, prompts: list[list[int]], max_new_tokens: int, pad_id: int,
                 stopped: Callable[[int, list[int]], bool], temperature: float = 0.0, top_p: float = 1.0,
                 generator: torch.Generator | None = None) -> list[list[int]]:
        """New tokens for each prompt, left-padded into one batch and decoded position by position against the latent
        cache (MLA; the ablation baselines recompute the whole sequence each step). A row stops when
        `stopped(row, its new tokens)` says so (EOS, a stop string) or after `max_new_tokens`. Returns each row's new
        tokens, the one that stopped it included."""
        B, L = len(prompts), max(len(p) for p in prompts)
        ids = torch.full((B, L), pad_id, dtype=torch.long)
        mask = torch.zeros(B, L, dtype=torch.bool)
        for i, p in enumerate(prompts):
            ids[i, L - len(p):] = torch.tensor(p)
            mask[i, L - len(p):] = True
        ids, mask = ids.to(self.device), mask.to(self.device)
        positions = (mask.long().cumsum(1) - 1).clamp(min=0)
        mla = self.engine.cfg.model.attention_type == "mla"
        caches = {s: part.new_cache() for s, part in self.stages.items()} if mla else None
        new: list[list[int]] = [[] for _ in range(B)]
        running = [True] * B
        with self._eval_mode():
            step_ids, step_pos = ids, positions
            for _ in range(max_new_tokens):
                logits = self._forward(step_ids, step_pos, mask, caches)
                token = next_token(logits[:, -1], temperature, top_p, generator) if logits is not None else None
                token = self._from_last_stage(token, torch.empty(B, dtype=torch.long, device=self.device))
                for i, t in enumerate(token.tolist()):
                    if running[i]:
                        new[i].append(t)
                        running[i] = not stopped(i, new[i])
                if not self._any_running(any(running)):
                    break
                mask = torch.cat((mask, torch.ones(B, 1, dtype=torch.bool, device=self.device)), dim=1)
                if mla:
                    step_ids, step_pos = token[:, None], step_pos[:, -1:] + 1
                else:  # no cache: the whole sequence again
                    step_ids = torch.cat((step_ids, token[:, None]), dim=1)
                    step_pos = (mask.long().cumsum(1) - 1).clamp(min=0)
        return new

    def _any_running(self, mine: bool) -> bool:
        """Whether any sequence of the job still runs (this rank's alone without collective layers to keep fed)."""
        if not self.lockstep:
            return mine
        flag = torch.tensor([float(mine)], device=self.device)
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        return bool(flag.item())


class _EvalMode:
    """Eval mode for the duration of a pass, and back to what each module was."""

    def __init__(self, modules: list[torch.nn.Module]):
        self.modules = modules

    def __enter__(self):
        self.was = [m.training for m in self.modules]
        for m in self.modules:
            m.eval()
        # Compiled layers (trainer.compile) run eagerly here: request shapes change from batch to batch, and each new
        # one would be another compilation of a graph the training steps do not use.
        self.stance = torch.compiler.set_stance("force_eager")
        self.stance.__enter__()

    def __exit__(self, *exc):
        self.stance.__exit__(*exc)
        for m, was in zip(self.modules, self.was):
            m.train(was)
