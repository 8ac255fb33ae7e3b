"""Packing token sequences into fixed-length training rows, and the seeded shuffle buffer over rows.

A row is a dict of equal-length int arrays. Pretraining rows are `{"tokens": (seq_len + 1,)}`: documents (each
already carrying the tokenizer's BOS and our EOS) are concatenated and cut, and the model sees `tokens[:-1]` with
targets `tokens[1:]`. SFT rows are `{"input_ids", "labels", "position_ids", "document_ids"}` of `seq_len`: whole
conversations placed greedily, positions restarting at 0 in each, padding with its own document id, so attention
never crosses a conversation. Every packer and the buffer expose their exact state for checkpoints.
"""

from __future__ import annotations

from collections import deque

import numpy as np

from model.loss import IGNORE_INDEX

PAD_DOCUMENT = np.iinfo(np.int32).max


class ConcatPacker:
    """Concatenate documents and cut rows of `seq_len + 1` tokens (no token is used twice, none is dropped).

    Its state does not hold the tokens of the documents it is cutting, which may be many (one huge document, or a
    chunk of long ones): the pipeline calls `mark()` before adding each chunk of documents, and the state is what
    the packer held then (less than one row) and how many tokens it has cut since. Resuming re-reads the chunk from
    the position before it (the pipeline's state) and `load_state` drops the tokens already cut."""

    def __init__(self, seq_len: int):
        self.width = seq_len + 1
        self.pending: deque[np.ndarray] = deque()
        self.head = 0  # tokens of pending[0] already emitted
        self.available = 0
        self.carry = np.zeros(0, np.int32)  # what was held at the last mark()
        self.consumed = 0  # tokens cut (or skipped on resume) since the last mark()
        self.skip = 0  # tokens still to drop after load_state

    def mark(self) -> None:
        """The next documents start a new chunk: remember what is held (less than a row once `rows()` is drained)
        and count the tokens cut from here."""
        self.carry = self._rest()
        self.consumed = 0

    def add(self, example: np.ndarray) -> None:
        if self.skip:
            dropped = min(self.skip, len(example))
            example, self.skip = example[dropped:], self.skip - dropped
            self.consumed += dropped
        if len(example):
            self.pending.append(example)
            self.available += len(example)

    def rows(self):
        while self.available >= self.width:
            parts, need = [], self.width
            while need:
                first = self.pending[0]
                take = min(need, len(first) - self.head)
                parts.append(first[self.head:self.head + take])
                self.head += take
                need -= take
                if self.head == len(first):
                    self.pending.popleft()
                    self.head = 0
            self.available -= self.width
            self.consumed += self.width
            yield {"tokens": np.concatenate(parts)}

    def _rest(self) -> np.ndarray:
        if not self.pending:
            return np.zeros(0, np.int32)
        return np.concatenate([self.pending[0][self.head:], *list(self.pending)[1:]]).astype(np.int32)

    def snapshot(self) -> tuple:
        return self.carry, self.consumed

    @staticmethod
    def state_from(snapshot: tuple) -> dict:
        carry, consumed = snapshot
        return {"carry": np.asarray(carry, np.int32), "consumed": int(consumed)}

    def load_state(self, state: dict) -> None:
        """Hold the state's carry and drop its `consumed` tokens: first of the carry, then of the documents added
        next (the re-read chunk)."""
        self.pending, self.head, self.available = deque(), 0, 0
        carry = np.asarray(state["carry"], np.int32)
        dropped = min(len(carry), int(state["consumed"]))
        self.carry, self.consumed, self.skip = carry, dropped, int(state["consumed"]) - dropped
        if len(carry) > dropped:
            self.pending.append(carry[dropped:])
            self.available = len(carry) - dropped


class ConversationPacker:
    """Place whole (tokens, train_mask) conversations into rows of `seq_len` positions, greedily, without splitting
    one across rows; a conversation longer than a row is truncated (and counted)."""

    def __init__(self, seq_len: int, pad_id: int):
        self.seq_len, self.pad_id = seq_len, pad_id
        self.current: list[tuple[np.ndarray, np.ndarray]] = []
        self.used = 0
        self.truncated = 0
        self.ready: deque[dict] = deque()

    def add(self, example: tuple[np.ndarray, np.ndarray]) -> None:
        tokens, mask = example
        if len(tokens) > self.seq_len:
            tokens, mask = tokens[:self.seq_len], mask[:self.seq_len]
            self.truncated += 1
        if self.used + len(tokens) > self.seq_len:
            self.ready.append(self._row(self.current))
            self.current, self.used = [], 0
        self.current.append((tokens, mask))
        self.used += len(tokens)

    def rows(self):
        while self.ready:
            yield self.ready.popleft()

    def _row(self, conversations: list[tuple[np.ndarray, np.ndarray]]) -> dict:
        n = self.seq_len
        row = {"input_ids": np.full(n, self.pad_id, np.int32), "labels": np.full(n, IGNORE_INDEX, np.int32),
               "position_ids": np.zeros(n, np.int32), "document_ids": np.full(n, PAD_DOCUMENT, np.int32)}
        start = 0
        for doc, (tokens, mask) in enumerate(conversations):
            end = start + len(tokens)
            row["input_ids"][start:end] = tokens
            # Position t predicts token t + 1 of the same conversation, where that token is trained.
            targets = np.where(mask[1:], tokens[1:], IGNORE_INDEX)
            row["labels"][start:end - 1] = targets
            row["position_ids"][start:end] = np.arange(len(tokens))
            row["document_ids"][start:end] = doc
            start = end
        return row

    def snapshot(self) -> tuple:
        return tuple(self.current), tuple(self.ready), self.truncated

    @staticmethod
    def state_from(snapshot: tuple) -> dict:
        current, ready, truncated = snapshot
        lengths = np.array([len(t) for t, _ in current], np.int64)
        tokens = np.concatenate([t for t, _ in current]) if current else np.zeros(0, np.int32)
        masks = np.concatenate([m for _, m in current]) if current else np.zeros(0, bool)
        state = {"current_lengths": lengths, "current_tokens": tokens.astype(np.int32),
                 "current_masks": masks.astype(np.uint8), "truncated": truncated}
        for key in ("input_ids", "labels", "position_ids", "document_ids"):
            state[f"ready_{key}"] = (np.stack([r[key] for r in ready]) if ready else np.zeros((0, 0), np.int32))
        return state

    def load_state(self, state: dict) -> None:
        cuts = np.cumsum(state["current_lengths"])[:-1]
        tokens = np.split(np.asarray(state["current_tokens"], np.int32), cuts) if len(state["current_lengths"]) else []
        masks = np.split(np.asarray(state["current_masks"]).astype(bool), cuts) if len(state["current_lengths"]) else []
        self.current = list(zip(tokens, masks))
        self.used = int(np.sum(state["current_lengths"]))
        self.truncated = int(state["truncated"])
        n_ready = len(state["ready_input_ids"])
        self.ready = deque({key: np.asarray(state[f"ready_{key}"][i], np.int32)
                            for key in ("input_ids", "labels", "position_ids", "document_ids")}
                           for i in range(n_ready))


class ShuffleBuffer:
    """Seeded reservoir-style shuffle over rows: while filling it holds rows back; once full, each new row swaps with
    a uniformly chosen held row, which is emitted. Its random choices are drawn in blocks, each from its own seed
    and index, so the state is the count of choices made: a snapshot per micro-batch costs nothing."""

    BLOCK = 4096

    def __init__(self, size: int, seed: int | list[int]):
        self.size = size
        self.seed = list(seed) if isinstance(seed, (list, tuple)) else [seed]
        self.rows: list[dict] = []
        self.draws = 0
        self._block: np.ndarray | None = None

    def _choice(self) -> int:
        block, at = divmod(self.draws, self.BLOCK)
        if at == 0 or self._block is None:
            self._block = np.random.default_rng([*self.seed, block]).integers(self.size, size=self.BLOCK)
        self.draws += 1
        return int(self._block[at])

    def push(self, row: dict) -> dict | None:
        if self.size <= 1:
            return row
        if len(self.rows) < self.size:
            self.rows.append(row)
            return None
        i = self._choice()
        out, self.rows[i] = self.rows[i], row
        return out

    def snapshot(self) -> tuple:
        return tuple(self.rows), self.draws

    @staticmethod
    def state_from(snapshot: tuple) -> dict:
        rows, draws = snapshot
        keys = rows[0].keys() if rows else ()
        return {"rows": {k: np.stack([r[k] for r in rows]).astype(np.int32, copy=False) for k in keys},
                "count": len(rows), "draws": draws}

    def load_state(self, state: dict) -> None:
        count = state["count"]
        self.rows = [{k: np.asarray(v[i]) for k, v in state["rows"].items()} for i in range(count)]
        self.draws, self._block = int(state["draws"]), None
