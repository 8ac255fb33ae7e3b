"""lm-eval's model interface over this job's model (docs/evaluation.md, "How the requests run"): imported only where
lm-eval is installed (trainer/evaluation.py checks first)."""

from __future__ import annotations

import json
import time

import torch
import torch.distributed as dist
from lm_eval.api.model import TemplateLM

from data.tokenizer import TextTokenizer

from .inference import ForwardRunner


class LatentMoeLM(TemplateLM):
    """lm-eval's model interface over this job's model (collective: every rank calls each method with the same
    requests)."""

    backend = "causal"

    def __init__(self, runner: ForwardRunner, tokenizer: TextTokenizer, batch_size: int, max_length: int,
                 max_gen_toks: int, seed: int = 1234):
        super().__init__()
        self.runner, self.text = runner, tokenizer
        self.batch_size, self._max_length, self.max_gen_toks = batch_size, max_length, max_gen_toks
        self.grid = runner.grid
        self.generator = torch.Generator(device=runner.device).manual_seed(seed)
        self.prefix_text = self.tok_decode([self.prefix_token_id], skip_special_tokens=False)

    # ------------------------------------------------------------ tokens, as lm-eval's hf backend has them
    @property
    def eot_token_id(self) -> int:
        return self.text.eos_id

    @property
    def prefix_token_id(self) -> int:
        return self.text.bos_id if self.text.bos_id is not None else self.text.eos_id

    @property
    def max_length(self) -> int:
        return self._max_length

    @property
    def tokenizer_name(self) -> str:
        return self.text.source

    def tok_encode(self, string: str, add_special_tokens: bool | None = None, left_truncate_len: int | None = None,
                   **kwargs) -> list[int]:
        add = True if add_special_tokens is None else add_special_tokens
        if add_special_tokens is None and string.startswith(self.prefix_text):
            add = False  # the text brings its own BOS
        ids = self.text.tokenizer.encode(string, add_special_tokens=add).ids
        return ids[-left_truncate_len:] if left_truncate_len else ids

    def tok_decode(self, tokens, skip_special_tokens: bool = True) -> str:
        tokens = [tokens] if isinstance(tokens, int) else list(tokens)
        return self.text.tokenizer.decode(tokens, skip_special_tokens=skip_special_tokens)

    # ------------------------------------------------------------ the three request types
    def _loglikelihood_tokens(self, requests, disable_tqdm: bool = False, **kwargs) -> list[tuple[float, bool]]:
        """(key, context ids, continuation ids) -> (sum of the continuation's log-probabilities, whether it is the
        greedy continuation); too long: cut on the left to `max_length` + 1 tokens, as the hf backend does."""
        rows = []
        for _, context, continuation in requests:
            if not context or not continuation:
                raise ValueError("lm-eval gave an empty context or continuation")
            whole = (context + continuation)[-(self.max_length + 1):]
            rows.append((whole, len(continuation)))

        def run(batch: list[tuple[list[int], int]]) -> list[tuple[float, bool]]:
            width = max(len(w) for w, _ in batch) - 1
            ids = torch.zeros(len(batch), width, dtype=torch.long)
            targets = torch.zeros_like(ids)
            for i, (whole, _) in enumerate(batch):
                ids[i, :len(whole) - 1] = torch.tensor(whole[:-1])
                targets[i, :len(whole) - 1] = torch.tensor(whole[1:])
            logprobs, greedy = self.runner.score(ids, targets)
            out = []
            for i, (whole, n) in enumerate(batch):
                end = len(whole) - 1
                out.append((float(logprobs[i, end - n:end].double().sum()), bool(greedy[i, end - n:end].all())))
            return out

        return self._shared(rows, key=lambda row: len(row[0]), run=run, dummy=([0, 0], 1),
                            desc="loglikelihood")

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
        from lm_eval import utils

        windows, owner = [], []
        for index, (string,) in enumerate(req.args for req in requests):
            for context, continuation in map(utils.make_disjoint_window, utils.get_rolling_token_windows(
                    token_list=self.tok_encode(string), prefix_token=self.prefix_token_id,
                    max_seq_len=self.max_length, context_len=1)):
                windows.append(((None,), context, continuation))
                owner.append(index)
        scores = self._loglikelihood_tokens(windows) if windows else []
        totals = [0.0] * len(requests)
        for index, (logprob, _) in zip(owner, scores, strict=True):
            totals[index] += logprob
        return totals

    def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
        from lm_eval.models.utils import handle_stop_sequences, normalize_gen_kwargs, postprocess_generated_text

        eos = self.tok_decode(self.eot_token_id, skip_special_tokens=False)
        results: list[str | None] = [None] * len(requests)
        groups: dict[str, list[int]] = {}
        for i, req in enumerate(requests):  # one batch kind per set of generation settings, as lm-eval groups
            groups.setdefault(json.dumps(req.args[1], sort_keys=True, default=str), []).append(i)
        for indices in groups.values():
            kwargs = normalize_gen_kwargs(dict(requests[indices[0]].args[1]), self.max_gen_toks)
            until = handle_stop_sequences(kwargs.pop("until", None), eos=eos)
            max_new = int(kwargs.pop("max_gen_toks"))
            if max_new >= self.max_length:
                raise ValueError(f"max_gen_toks={max_new} leaves no room for a context within max_length="
                                 f"{self.max_length}")
            temperature = float(kwargs.pop("temperature", 0.0) or 0.0) if kwargs.pop("do_sample", False) else 0.0
            top_p = float(kwargs.pop("top_p", 1.0) or 1.0)
            prompts = [(i, self.tok_encode(requests[i].args[0], left_truncate_len=self.max_length - max_new))
                       for i in indices]

            def run(batch, until=until, max_new=max_new, temperature=temperature, top_p=top_p):
                def stopped(row: int, new: list[int]) -> bool:
                    if batch[row][0] < 0 or new[-1] == self.eot_token_id:  # a stand-in row stops at once
                        return True
                    text = self.tok_decode(new)
                    return any(stop in text for stop in until)

                new = self.runner.generate([p for _, p in batch], max_new, self.text.pad_id, stopped,
                                           temperature, top_p, self.generator)
                return [postprocess_generated_text(self.tok_decode(tokens), until, None) for tokens in new]

            texts = self._shared(prompts, key=lambda row: len(row[1]), run=run,
                                 dummy=(-1, [self.prefix_token_id]), desc="generate_until")
            for (i, _), text in zip(prompts, texts, strict=True):
                results[i] = text
        return results

    # ------------------------------------------------------------ sharing the work over the ranks
    def _shared(self, rows: list, key, run, dummy, desc: str) -> list:
        """`run` over batches of `rows` (longest first), the rows dealt round-robin over the data-parallel
        ranks; every rank runs as many batches as the busiest one (a one-row `dummy` where it has none left: the
        expert-parallel exchange and ZeRO-3's gathers need every rank in each forward). Returns every row's
        result in the order of `rows`, on every rank."""
        grid = self.grid
        order = sorted(range(len(rows)), key=lambda i: -key(rows[i]))
        mine = order[grid.dp_rank::grid.dp]
        batches = [mine[i:i + self.batch_size] for i in range(0, len(mine), self.batch_size)]
        n = len(batches)
        if grid.world > 1:
            count = torch.tensor([float(n)], device=self.runner.device)
            dist.all_reduce(count, op=dist.ReduceOp.MAX)
            n = int(count.item())
        results = {}
        progress = Progress(desc, len(rows), grid.rank == 0)
        for b in range(n):
            if b < len(batches):
                results.update(zip(batches[b], run([rows[i] for i in batches[b]]), strict=True))
            else:
                run([dummy])
            progress.update(min(len(rows), (b + 1) * self.batch_size * grid.dp))
        if grid.dp > 1:
            gathered = [None] * grid.dp
            dist.all_gather_object(gathered, results, group=grid.dp_group)
            results = {k: v for part in gathered for k, v in part.items()}
        progress.close()
        return [results[i] for i in range(len(rows))]


class Progress:
    """Rank 0's progress lines for long request lists: one every 30 s and a last one, only past 10 s."""

    def __init__(self, desc: str, total: int, enabled: bool):
        self.desc, self.total, self.enabled = desc, total, enabled
        self.start = self.shown = time.perf_counter()

    def update(self, done: int) -> None:
        now = time.perf_counter()
        if self.enabled and now - self.shown >= 30 and done < self.total:
            self.shown = now
            eta = (now - self.start) / max(done, 1) * (self.total - done)
            print(f"eval: {self.desc} {done:,}/{self.total:,} requests, {now - self.start:.0f} s, eta {eta:.0f} s",
                  flush=True)

    def close(self) -> None:
        seconds = time.perf_counter() - self.start
        if self.enabled and seconds >= 10:
            print(f"eval: {self.desc} {self.total:,} requests in {seconds:.0f} s", flush=True)
