"""Counting host syncs on CPU, where torch's CUDA sync debug mode does not apply: every op that must read a tensor's
values on the host to go on (`.item()`, `.tolist()`, `nonzero`, `bincount`, boolean indexing, `repeat_interleave`
without `output_size`, ...) is counted where it enters the dispatcher, plus the Python-level reads."""

from __future__ import annotations

import contextlib
from collections import Counter

import torch
from torch.utils._python_dispatch import TorchDispatchMode

SYNCING_OPS = ("aten.nonzero", "aten._local_scalar_dense", "aten.masked_select", "aten.bincount", "aten.unique",
               "aten._unique", "aten.histc", "aten.argwhere", "aten.masked_scatter", "aten.item")


class SyncCounter(TorchDispatchMode):
    """Counts host syncs by name: ops in SYNCING_OPS, `repeat_interleave` without `output_size`, indexing with a
    boolean mask, and Tensor.tolist / Tensor.item / Tensor.__bool__ calls."""

    def __init__(self):
        super().__init__()
        self.counts: Counter[str] = Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        name = str(func.overloadpacket)
        if name in SYNCING_OPS:
            self.counts[name] += 1
        elif func is torch.ops.aten.repeat_interleave.Tensor and kwargs.get("output_size") is None:
            self.counts["repeat_interleave without output_size"] += 1
        elif name in ("aten.index", "aten.index_put", "aten.index_put_") and any(
                isinstance(i, torch.Tensor) and i.dtype == torch.bool for i in (args[1] or ())):
            self.counts["boolean indexing"] += 1
        return func(*args, **kwargs)

    @contextlib.contextmanager
    def python_reads(self):
        """Also count the Python-level reads of tensor values (they do not all reach the dispatcher)."""
        originals = {name: getattr(torch.Tensor, name) for name in ("tolist", "item", "__bool__")}

        def counted(name):
            def read(t, *a, **k):
                self.counts[f"Tensor.{name}"] += 1
                return originals[name](t, *a, **k)
            return read

        for name in originals:
            setattr(torch.Tensor, name, counted(name))
        try:
            with self:
                yield self
        finally:
            for name, fn in originals.items():
                setattr(torch.Tensor, name, fn)

    @property
    def total(self) -> int:
        return sum(self.counts.values())
