"""Gradient sums of the built-in engine, overlapped with the step's last backward.

The same sums as `expert_parallel.reduce_gradients`: dense gradients over the data-parallel group, routed experts'
(ep > 1) over the expert-data-parallel group (docs/parallelism.md, "Gradients"). Gradients are cut into buckets of
about `BUCKET_BYTES` in reverse registration order, roughly the order backward produces them, each bucket holding one
kind (dense or expert). While the last micro-batch's backward runs, a post-accumulate-grad hook per parameter marks
it ready, and a bucket is launched as an asynchronous all-reduce as soon as it and every bucket before it in the
launch order are ready. After that backward, the remaining buckets are launched in the same order, a parameter
without a gradient contributing zeros (an expert no token reached, a path frozen on this rank), and `finish` waits
for all of them before clipping. When a bucket is launched, its gradients are copied into the bucket's flat buffer
and each parameter's `.grad` becomes a view of its slice (as DistributedDataParallel's gradient_as_bucket_view), so
the sums land in the gradients without a copy back and no second copy of the gradients outlives its bucket's launch.

Why a fixed launch order: hooks fire in an order that depends on the graph, which routing can change from rank to
rank, and collectives must be issued in the same order on every rank of a group, also across groups (NCCL can
deadlock on communicators used in inconsistent orders). Every rank issues a subsequence of one job-wide order: buckets
are sorted by (dense parameters met so far in the reverse walk, dense before expert, index within kind); the dense
walk is the same on every rank of the data-parallel group and an expert bucket's position within it the same on every
rank of its expert-data-parallel group, even when ESFT trains different experts on different EP ranks. All launches
happen before the step's statistics are reduced over the world group.

The sums are the same fp32 sums over the same group as `reduce_gradients`; only the bucket layout differs, so over
two ranks they are bitwise equal, over more they may round differently where a collective's summation order depends
on an element's offset in its buffer.
"""

from __future__ import annotations

import threading

import torch
import torch.distributed as dist

from . import faults
from .layout import ProcessGrid, is_expert_param

BUCKET_BYTES = 25 * 2**20
"""Bucket size, as DistributedDataParallel's default (a bucket closes once it reaches this many bytes)."""
FIRST_BUCKET_BYTES = 2**20
"""The first bucket of each kind is smaller (as DistributedDataParallel's), so the first sum starts early."""


class _Bucket:
    def __init__(self, params: list[torch.Tensor], group):
        self.params, self.group = params, group
        self.pending: set[int] = set()
        self.flat: torch.Tensor | None = None
        self.work = None


class GradReducer:
    """Bucketed, overlapped gradient sums of `model` on `grid`. Per step: `arm()` before the last micro-batch's
    backward, `launch_rest()` right after it, `finish()` before clipping; earlier backwards only accumulate.
    `finish()` alone (nothing armed) reduces everything at once, as `reduce_gradients` would."""

    def __init__(self, model: torch.nn.Module, grid: ProcessGrid, bucket_bytes: int = BUCKET_BYTES,
                 first_bucket_bytes: int = FIRST_BUCKET_BYTES):
        self.model, self.grid = model, grid
        self.bucket_bytes, self.first_bucket_bytes = bucket_bytes, min(first_bucket_bytes, bucket_bytes)
        self.buckets: list[_Bucket] = []
        self.params: list[torch.Tensor] = []
        """Every parameter that trains (gets a gradient, zeros if none arrives), reduced or not."""
        self._signature: list[tuple[str, int]] = []
        self._handles: list = []
        self._lock = threading.Lock()
        self.armed = False
        self.launched = 0
        """Buckets launched in the current round (the test of the overlap reads it from its own hooks)."""
        self._build()

    # ---------------------------------------------------------------- layout
    def _trainable(self) -> list[tuple[str, torch.Tensor]]:
        return [(n, p) for n, p in self.model.named_parameters() if p.requires_grad]

    def _build(self) -> None:
        """Buckets and hooks for the parameters that train now (rebuilt when that set changes)."""
        for handle in self._handles:
            handle.remove()
        named = self._trainable()
        self._signature = [(n, id(p)) for n, p in named]
        self.params = [p for _, p in named]
        groups = {"dense": (self.grid.dp_group, self.grid.dp), "expert": (self.grid.edp_group, self.grid.edp)}
        keyed, open_, sizes, count, dense_seen = [], {"dense": [], "expert": []}, {"dense": 0, "expert": 0}, \
            {"dense": 0, "expert": 0}, 0

        def close(kind: str) -> None:  # launch order: see the module's docstring
            keyed.append(((dense_seen, kind == "expert", count[kind]), _Bucket(open_[kind], groups[kind][0])))
            count[kind] += 1
            open_[kind], sizes[kind] = [], 0

        for name, p in reversed(named):
            kind = "expert" if is_expert_param(name) and self.grid.ep > 1 else "dense"
            dense_seen += kind == "dense"
            if groups[kind][1] <= 1:
                continue  # nothing to sum over
            if open_[kind] and open_[kind][0].dtype != p.dtype:
                close(kind)  # one dtype per flat buffer
            open_[kind].append(p)
            sizes[kind] += p.numel() * p.element_size()
            if sizes[kind] >= (self.bucket_bytes if count[kind] else self.first_bucket_bytes):
                close(kind)
        for kind in ("dense", "expert"):
            if open_[kind]:
                close(kind)
        self.buckets = [b for _, b in sorted(keyed, key=lambda kb: kb[0])]
        self._handles = [p.register_post_accumulate_grad_hook(self._hook(position))
                         for position, bucket in enumerate(self.buckets) for p in bucket.params]

    def _hook(self, position: int):
        return lambda param: self._ready(position, id(param))

    # ---------------------------------------------------------------- one step
    def arm(self) -> None:
        """The next backward is the step's last: launch each bucket as soon as it (and those before it) is ready."""
        if self._signature != [(n, id(p)) for n, p in self._trainable()]:
            self._build()  # what trains changed since the last step (freezing, ESFT copies)
        for bucket in self.buckets:
            bucket.pending = {id(p) for p in bucket.params}
            bucket.flat = bucket.work = None
        self.launched = 0
        self.armed = True

    def _ready(self, position: int, key: int) -> None:
        if not self.armed:
            return  # an earlier micro-batch: gradients only accumulate
        with self._lock:
            self.buckets[position].pending.discard(key)
            while self.launched < len(self.buckets) and not self.buckets[self.launched].pending:
                self._launch(self.buckets[self.launched])

    def _launch(self, bucket: _Bucket) -> None:
        # No gradient here: zeros keep every rank's buffer the same.
        bucket.flat = torch.cat([p.new_zeros(p.numel()) if p.grad is None else p.grad.reshape(-1)
                                 for p in bucket.params])
        offset = 0
        for p in bucket.params:  # the gradients become views of the buffer the sum is written into
            p.grad = bucket.flat[offset:offset + p.numel()].view_as(p)
            offset += p.numel()
        if faults.armed("grad_reduce"):  # test-only (trainer/faults.py)
            faults.fault("grad_reduce")
        bucket.work = dist.all_reduce(bucket.flat, op=dist.ReduceOp.SUM, group=bucket.group, async_op=True)
        self.launched += 1

    def launch_rest(self) -> None:
        """After the last backward: launch the buckets whose hooks did not all fire, in the launch order."""
        with self._lock:
            self.armed = False
            while self.launched < len(self.buckets):
                self._launch(self.buckets[self.launched])

    def finish(self) -> None:
        """Wait for every bucket (the sums are then in the gradients); parameters that train but got no gradient get
        zeros, reduced or not (as `reduce_gradients` does). Without `arm` this step, everything is reduced now."""
        if not self.armed and self.launched == 0:
            self.arm()
        self.launch_rest()
        for bucket in self.buckets:
            bucket.work.wait()
            bucket.flat = bucket.work = None  # the gradients keep the buffer alive until they are released
        for p in self.params:
            if p.grad is None:
                p.grad = torch.zeros_like(p)
        self.launched = 0
