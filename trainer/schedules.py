"""torch.distributed.pipelining's schedules by our names, and what they need of a layout, checked without a process
group: the schedule classes are built on stand-in stages, so their own checks and their action lists are what the
config validation and the dry run see (docs/parallelism.md, "Pipeline schedules")."""

from __future__ import annotations

import contextlib
import functools
from dataclasses import dataclass
from functools import cache


def schedule_class(name: str) -> type:
    """The torch schedule class for `parallel.pp_schedule=name` (not `deepspeed`)."""
    from torch.distributed.pipelining import schedules as s
    return {"1f1b": s.Schedule1F1B, "interleaved_1f1b": s.ScheduleInterleaved1F1B,
            "zbv": s.ScheduleZBVZeroBubble, "interleaved_zb": s.ScheduleInterleavedZeroBubble,
            "dualpipev": s.ScheduleDualPipeV}[name]


def torch_schedule(name: str) -> str:
    """The torch schedule whose action list stands for `name`: DeepSpeed's PipelineEngine trains with 1F1B."""
    return "1f1b" if name == "deepspeed" else name


@cache
def schedule_actions(name: str, pp: int, per_rank: int, micro_batches: int) -> list[list]:
    """Each pipeline rank's list of compute actions (torch's `_Action`s; None for an idle slot where the schedule
    inserts one), as the schedule class computes it for `pp` ranks, `per_rank` stages each and `micro_batches`.
    Raises ValueError where the schedule refuses the combination."""
    from torch.distributed.pipelining._schedule_visualizer import get_schedule_ops
    with linear_lowering():
        return get_schedule_ops(schedule_class(name), pp, micro_batches, num_stages_per_rank=per_rank)


# ------------------------------------------------------------------------------------ building a schedule
# torch's multi-stage schedules lower their action lists in `__init__` (every engine start). One pass,
# `_add_unshard_reshard` (FSDP's prefetch actions), looks ahead from every action over the rest of the rank's list
# for the next 3 distinct stages; a rank holding fewer stages than that never stops early, so the pass is quadratic
# in micro-batches (zbv at pp 16: 21 s for 1152 micro-batches). `linear_lowering` swaps in the same pass computed
# backwards in one sweep; tests/trainer/test_schedules.py checks it returns torch's exact lists.

def _unshard_reshard(original, compute_actions: list, max_active_stages: int = 3) -> list:
    """torch's `_add_unshard_reshard(compute_actions, max_active_stages)`, in time linear in the list."""
    from torch.distributed.pipelining import schedules as s
    if any(a is not None and a.computation_type == s.OVERLAP_F_B for a in compute_actions):
        return original(compute_actions, max_active_stages)  # overlapped pairs count their stages differently
    ahead: list[list[int] | None] = [None] * len(compute_actions)
    following: list[int] = []  # the first max_active_stages distinct stages from position i on, in order
    for i in range(len(compute_actions) - 1, -1, -1):
        action = compute_actions[i]
        if action is not None:
            following = [action.stage_index, *(x for x in following if x != action.stage_index)]
            following = following[:max_active_stages]
            ahead[i] = following
    active: set[int] = set()
    out = []
    for action, next_n in zip(compute_actions, ahead):
        if action is None:
            continue
        fetch = [stage for stage in next_n if stage not in active]
        for stage in [stage for stage in active if stage not in next_n]:
            active.remove(stage)
            out.append(s._Action(stage, s.RESHARD, None))
        for stage in fetch:
            active.add(stage)
            out.append(s._Action(stage, s.UNSHARD, None))
        out.append(action)
    for stage in list(active):
        out.append(s._Action(stage, s.RESHARD, None))
    return out


@contextlib.contextmanager
def linear_lowering():
    """Inside, torch's schedules lower their action lists with `_unshard_reshard` (the same lists, linear time)."""
    from torch.distributed.pipelining import schedules as s
    original = s._add_unshard_reshard
    s._add_unshard_reshard = functools.partial(_unshard_reshard, original)
    try:
        yield
    finally:
        s._add_unshard_reshard = original


def schedule_problem(name: str, pp: int, per_rank: int, micro_batches: int) -> str | None:
    """Why the schedule cannot run this layout and batch (the schedule's own words, with what to change), or None."""
    if micro_batches < 1:
        return "no micro-batch per step; raise trainer.global_batch_size"
    try:
        schedule_actions(name, pp, per_rank, micro_batches)
    except (ValueError, AssertionError, RuntimeError) as e:
        need = pp * per_rank if name != "interleaved_1f1b" else pp
        return (f"{e}; give it more micro-batches per step (e.g. {need} or a multiple of {pp}: raise "
                "trainer.global_batch_size or lower trainer.micro_batch_size), or use parallel.pp_schedule=deepspeed")
    return None


# ------------------------------------------------------------------------------------ what a schedule costs
# The zero-bubble paper (Qi et al., "Zero Bubble Pipeline Parallelism", ICLR 2024) builds its handcrafted schedules
# on a forward (F), input gradient (I, its "B") and weight gradient (W) of equal time; a full backward (B) is I + W.
UNIT_COSTS = {"F": 1.0, "I": 1.0, "W": 1.0}
"""Default cost of each compute action; B costs I + W unless given."""
MAX_SIMULATED_MICRO_BATCHES = 128
"""`analyse` simulates at most this many micro-batches per step (building and simulating a list grows with them).
Past it the steady state repeats, each rank's idle time stays what it is at the cap (checked in
tests/trainer/test_schedules.py), and the fraction is extended."""

Op = tuple[int, str, int]
"""(stage, kind, micro-batch): kind F forward, B full backward, I input gradient, W weight gradient."""


def compute_ops(actions: list[list]) -> list[list[Op]]:
    """Each rank's compute actions in the order it runs them: torch's `_Action`s (or `Op`s) with the idle slots,
    communication, unshard/reshard and gradient-reduce actions dropped, and DualPipeV's overlapped F + B pairs
    (OVERLAP_F_B) taken as their two parts, one after the other."""
    out = []
    for rank in actions:
        ops: list[Op] = []
        for a in rank:
            if a is None:
                continue
            if not hasattr(a, "computation_type"):
                ops.append(tuple(a))
                continue
            for part in a.sub_actions or (a,):
                kind = part.computation_type.value  # _ComputationType: "F", "B", "I", "W", "SEND_F", ...
                if kind in ("F", "B", "I", "W"):
                    ops.append((part.stage_index, kind, part.microbatch_index))
        out.append(ops)
    return out


def _in_run_order(ops: list[list[Op]], micro_batches: int) -> list[list[Op]]:
    """The ops with each stage's forwards numbered 0, 1, ... in the order they run, where torch's list does not
    number them 0..m-1: torch's Schedule1F1B lists the last rank's forwards as micro-batches 1..m (the list is for
    display; its runtime does not read it and runs them in order). Raises ValueError unless every stage then runs
    each micro-batch's forward, input gradient (B or I) and weight gradient (B or W) once."""
    def passes(ops: list[list[Op]]) -> dict[tuple[int, str], list[int]]:
        seen: dict[tuple[int, str], list[int]] = {}
        for rank in ops:
            for s, k, mb in rank:
                for p in {"F": "F", "B": "IW", "I": "I", "W": "W"}[k]:
                    seen.setdefault((s, p), []).append(mb)
        return seen

    def whole(ops: list[list[Op]]) -> bool:
        return all(sorted(v) == list(range(micro_batches)) for v in passes(ops).values())

    if whole(ops):
        return ops
    count: dict[int, int] = {}
    out = []
    for rank in ops:
        out.append([])
        for s, k, mb in rank:
            if k == "F":
                mb = count[s] = count.get(s, -1) + 1
            out[-1].append((s, k, mb))
    if not whole(out):
        raise ValueError("the schedule's action lists do not run every micro-batch's passes once on every stage")
    return out


class _Bubbles:
    """The largest and the mean of a per-rank `bubble` list."""

    bubble: list[float]

    @property
    def bubble_max(self) -> float:
        return max(self.bubble)

    @property
    def bubble_mean(self) -> float:
        return sum(self.bubble) / len(self.bubble)


@dataclass(frozen=True)
class Simulation(_Bubbles):
    """A step's timeline from list-scheduling every rank's actions in order, each as soon as what it needs is done."""

    busy: list[float]
    """Per rank: time spent computing."""
    makespan: float
    """The step: the last action's end on any rank (every rank waits for it before the optimizer step)."""

    @property
    def bubble(self) -> list[float]:
        """Per rank: the fraction of the step it idles."""
        return [1 - b / self.makespan for b in self.busy]


def simulate(actions: list[list], costs: dict[str, float] | None = None) -> Simulation:
    """Run each rank's action list in its order, every action as soon as its rank is free and its inputs exist:
    F(mb, s) after F(mb, s - 1); B or I(mb, s) after F(mb, s) and the input gradient (B or I) of (mb, s + 1);
    W(mb, s) after I(mb, s). Communication takes no time. `costs`: seconds per F, I, W (and B, default I + W);
    default `UNIT_COSTS`. Raises ValueError if the lists deadlock."""
    cost = {**UNIT_COSTS, **(costs or {})}
    if "B" not in (costs or {}):
        cost["B"] = cost["I"] + cost["W"]
    ops = compute_ops(actions)
    n_stages = 1 + max(s for rank in ops for s, _, _ in rank)
    done: dict[tuple[str, int, int], float] = {}  # ("F" | "grad" | "I", stage, mb) -> end time

    def needs(s: int, k: str, mb: int) -> list[tuple[str, int, int]]:
        if k == "F":
            return [("F", s - 1, mb)] if s else []
        if k == "W":
            return [("I", s, mb)]
        return [("F", s, mb)] + ([("grad", s + 1, mb)] if s + 1 < n_stages else [])

    pos, clock, busy = [0] * len(ops), [0.0] * len(ops), [0.0] * len(ops)
    left = sum(map(len, ops))
    while left:
        progress = False
        for r, rank in enumerate(ops):
            while pos[r] < len(rank):
                s, k, mb = rank[pos[r]]
                start = clock[r]
                for key in needs(s, k, mb):
                    if key not in done:
                        break
                    start = max(start, done[key])
                else:
                    clock[r] = start + cost[k]
                    busy[r] += cost[k]
                    done[("grad" if k in ("B", "I") else k, s, mb)] = clock[r]
                    if k == "I":
                        done[("I", s, mb)] = clock[r]
                    pos[r] += 1
                    left -= 1
                    progress = True
                    continue
                break
        if not progress:
            stuck = {r: rank[pos[r]] for r, rank in enumerate(ops) if pos[r] < len(rank)}
            raise ValueError(f"the action lists deadlock: each rank's next action waits on another ({stuck})")
    return Simulation(busy=busy, makespan=max(clock))


def in_flight(actions: list[list], stage_bytes: list[int] | None = None) -> tuple[list[int], list[int] | None]:
    """Per rank, the most (micro-batch, stage) activations held at once, walking its actions in order: F(mb, s)
    keeps stage s's activations of one micro-batch until the backward that frees them, B, or under a split backward
    W (torch keeps the graph for the weight gradients). With `stage_bytes` (one micro-batch's activations of each
    stage), also the peak in bytes."""
    peaks, peak_bytes = [], []
    for rank in compute_ops(actions):
        held, most, size, most_size = set(), 0, 0, 0
        for s, k, mb in rank:
            if k == "F":
                held.add((s, mb))
                size += stage_bytes[s] if stage_bytes else 0
            elif k in ("B", "W") and (s, mb) in held:
                held.discard((s, mb))
                size -= stage_bytes[s] if stage_bytes else 0
            most, most_size = max(most, len(held)), max(most_size, size)
        peaks.append(most)
        peak_bytes.append(most_size)
    return peaks, (peak_bytes if stage_bytes else None)


@dataclass(frozen=True)
class ScheduleFigures(_Bubbles):
    """What one schedule costs a layout and batch (`analyse`)."""

    name: str
    analysed_as: str
    """The torch schedule whose action list was analysed (`1f1b` for `deepspeed`: DeepSpeed's PipelineEngine trains
    with 1F1B)."""
    pp: int
    per_rank: int
    micro_batches: int
    simulated: int
    """Micro-batches the action lists were built and simulated for (`micro_batches`, or the cap)."""
    bubble: list[float]
    """Per rank, at `micro_batches` (extended from `simulated` past the cap)."""
    in_flight: list[int]
    """Per rank: the most (micro-batch, stage) activations held at once."""
    in_flight_bytes: list[int] | None
    actions: list[int]
    """Per rank: compute actions in the simulated step (F, B, I, W; an overlapped F + B counts two)."""


def schedule_ops(name: str, pp: int, per_rank: int, micro_batches: int) -> list[list[Op]]:
    """Each rank's compute `Op`s under schedule `name` (`deepspeed` as torch's `1f1b`), in run order."""
    actions = schedule_actions(torch_schedule(name), pp, per_rank, micro_batches)
    return _in_run_order(compute_ops(actions), micro_batches)


ROUNDS = ("interleaved_1f1b", "interleaved_zb")
"""Schedules that run micro-batches in rounds: m // pp rounds of m / rounds each, m a multiple of the rounds."""


def _simulated(name: str, pp: int, per_rank: int, micro_batches: int, cap: int) -> int:
    """Micro-batches to build and simulate the lists for: all of them up to `cap`; past it as many as `cap` allows
    but at least two per stage (the steady state starts), in whole rounds of the size the full batch runs in."""
    if micro_batches <= cap:
        return micro_batches
    least = 2 * pp * per_rank
    if name in ROUNDS:
        size = micro_batches // max(1, micro_batches // pp)
        return min(micro_batches, size * max(-(-least // size), cap // size))
    return min(micro_batches, max(cap, least))


def problem(name: str, pp: int, per_rank: int, micro_batches: int, cap: int = MAX_SIMULATED_MICRO_BATCHES
            ) -> str | None:
    """`schedule_problem` without building lists longer than `cap` micro-batches: past it, the schedule's own check
    at the simulated count, and torch's rule for the round-based schedules (a whole number of rounds) at the full
    one, the only refusal that more micro-batches can bring (tests/trainer/test_schedules.py compares the two)."""
    simulated = _simulated(torch_schedule(name), pp, per_rank, micro_batches, cap)
    why = schedule_problem(torch_schedule(name), pp, per_rank, simulated)
    rounds = max(1, micro_batches // pp)
    if why is None and name in ROUNDS and micro_batches % rounds:
        why = (f"{micro_batches} micro-batches do not make whole rounds ({rounds} rounds of {pp} or more); give it "
               f"a multiple of {pp} micro-batches per step (trainer.global_batch_size), or use "
               "parallel.pp_schedule=deepspeed")
    return why


def analyse(name: str, pp: int, per_rank: int, micro_batches: int, stage_bytes: list[int] | None = None,
            costs: dict[str, float] | None = None, cap: int = MAX_SIMULATED_MICRO_BATCHES) -> ScheduleFigures:
    """Bubble fraction and activations in flight of schedule `name` (`deepspeed` analysed as torch's `1f1b`:
    DeepSpeed's PipelineEngine trains with 1F1B) for `pp` ranks of `per_rank` stages and `micro_batches` per step,
    from torch's own action lists (`simulate`, `in_flight`). Past `cap` micro-batches the lists are built for fewer
    (`_simulated`): each rank's idle time and peak in flight stay as they are there, so only the busy time is scaled
    to `micro_batches`. Raises ValueError where the schedule refuses the layout (`problem` says why)."""
    why = problem(name, pp, per_rank, micro_batches, cap)
    if why:
        raise ValueError(why)
    simulated = _simulated(torch_schedule(name), pp, per_rank, micro_batches, cap)
    ops = schedule_ops(name, pp, per_rank, simulated)
    sim = simulate(ops, costs)
    idle = [sim.makespan - b for b in sim.busy]
    busy = [b * micro_batches / simulated for b in sim.busy]
    peaks, peak_bytes = in_flight(ops, stage_bytes)
    return ScheduleFigures(name=name, analysed_as=torch_schedule(name), pp=pp, per_rank=per_rank,
                           micro_batches=micro_batches, simulated=simulated,
                           bubble=[i / (i + b) for i, b in zip(idle, busy, strict=True)], in_flight=peaks,
                           in_flight_bytes=peak_bytes, actions=[len(r) for r in ops])
