"""Pipeline schedules as the dry run sees them: the bubble simulated from torch's own action lists, the activations
each schedule keeps in flight, both checked against the lists themselves, and the schedule table the dry run prints
for the paper's layout and for V2-Lite on 8 GPUs (docs/parallelism.md, "Pipeline schedules")."""

from __future__ import annotations

import re

import pytest
from hydra import compose, initialize_config_dir

from trainer.cli import CONF_DIR, to_train_config
from trainer.config import TrainConfig, register_configs
from trainer.layout import rank_stages, stage_boundaries
from trainer.plan import format_plan, plan
from trainer.schedules import (
    analyse,
    in_flight,
    problem,
    schedule_actions,
    schedule_ops,
    schedule_problem,
    simulate,
)

register_configs()
PAPER = ["model=v2", "parallel.pp=16", "parallel.ep=8", "parallel.zero_stage=1", "parallel.world_size=128",
         "data.seq_len=4096", "trainer.micro_batch_size=1", "trainer.global_batch_size=9216"]
V2_LITE_8 = ["model=v2_lite", "parallel.pp=4", "parallel.ep=2", "parallel.zero_stage=1", "parallel.world_size=8",
             "data.seq_len=4096", "trainer.micro_batch_size=1", "trainer.global_batch_size=64"]
TORCH = {"1f1b": 1, "interleaved_1f1b": 2, "zbv": 2, "interleaved_zb": 2, "dualpipev": 2}
TABLE = ("deepspeed, 1f1b", "interleaved_1f1b", "zbv", "interleaved_zb", "dualpipev")


def compose_config(*overrides: str) -> TrainConfig:
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base=None):
        return to_train_config(compose("config", overrides=["checkpoint.dir=/tmp/unused", *overrides]))


def _passes(actions: list[list]) -> list[list[tuple[int, str, int]]]:
    """Torch's `_Action`s of each rank as (stage, F|B|I|W, micro-batch), overlapped pairs taken apart: written
    out here again, without `schedules.compute_ops`."""
    out = []
    for rank in actions:
        out.append([])
        for a in rank:
            for part in (() if a is None else a.sub_actions or (a,)):
                if part.computation_type.name in ("FORWARD", "FULL_BACKWARD", "BACKWARD_INPUT", "BACKWARD_WEIGHT"):
                    out[-1].append((part.stage_index, part.computation_type.value, part.microbatch_index))
    return out


def _recount(ops: list[tuple[int, str, int]], stage_bytes: list[int]) -> tuple[int, int]:
    """Peak (micro-batch, stage) activations and their bytes, recounted prefix by prefix: after each action, the
    forwards run so far whose B or W has not run yet."""
    best = (0, 0)
    for i in range(len(ops) + 1):
        done = ops[:i]
        freed = {(s, mb) for s, k, mb in done if k in "BW"}
        live = {(s, mb) for s, k, mb in done if k == "F"} - freed
        best = (max(best[0], len(live)), max(best[1], sum(stage_bytes[s] for s, _ in live)))
    return best


@pytest.mark.parametrize("p,m", [(2, 2), (2, 7), (4, 4), (4, 9), (8, 24), (16, 16)])
def test_1f1b_simulation_gives_the_1f1b_bubble(p, m):
    """With B = 2F every rank of 1F1B idles (p - 1)(F + B) of a step of (m + p - 1)(F + B): the warm-up forwards
    and cool-down backwards of the other p - 1 stages."""
    sim = simulate(schedule_ops("1f1b", p, 1, m))
    assert sim.busy == [3.0 * m] * p
    assert sim.bubble == pytest.approx([(p - 1) / (m + p - 1)] * p, abs=1e-12)
    assert analyse("deepspeed", p, 1, m).bubble == pytest.approx(sim.bubble, abs=1e-12)


def test_simulation_waits_for_inputs_and_refuses_a_deadlock():
    """Two ranks, one micro-batch, hand-timed: F on 0 (0-1), F on 1 (1-2), B on 1 (2-4), B on 0 (4-6); a split
    backward runs W only after its I and keeps the activations until W; a list whose backward comes before its
    forward never finishes."""
    sim = simulate([[(0, "F", 0), (0, "B", 0)], [(1, "F", 0), (1, "B", 0)]])
    assert (sim.busy, sim.makespan, sim.bubble) == ([3.0, 3.0], 6.0, [0.5, 0.5])
    split = simulate([[(0, "F", 0), (0, "I", 0), (0, "W", 0)], [(1, "F", 0), (1, "B", 0)]], {"F": 2, "I": 1, "W": 3})
    assert split.makespan == 2 + 2 + 4 + 1 + 3 and split.busy == [6.0, 6.0]
    # a split backward frees a micro-batch's activations at its W, not its I
    ops = [[(0, "F", 0), (0, "F", 1), (0, "I", 0), (0, "F", 2), (0, "W", 0), (0, "I", 1), (0, "W", 1), (0, "B", 2)]]
    assert in_flight(ops, [5]) == ([3], [15])
    with pytest.raises(ValueError, match="deadlock"):
        simulate([[(0, "B", 0), (0, "F", 0)], [(1, "F", 0), (1, "B", 0)]])


@pytest.mark.parametrize("name", TORCH)
@pytest.mark.parametrize("p,m", [(2, 4), (4, 8), (3, 12)])
def test_figures_are_counted_from_the_schedules_action_list(name, p, m):
    """Every rank runs each of its stages' forward, input gradient and weight gradient once per micro-batch, holds
    the stages `layout.rank_stages` places on it, and keeps as much in flight as a recount of its list says."""
    per_rank = TORCH[name]
    if problem(name, p, per_rank, m):
        pytest.skip(problem(name, p, per_rank, m))
    raw = _passes(schedule_actions(name, p, per_rank, m))
    stage_bytes = [10 ** s for s in range(p * per_rank)]
    fig = analyse(name, p, per_rank, m, stage_bytes)
    assert fig.simulated == m and fig.actions == [len(r) for r in raw]
    for r, ops in enumerate(raw):
        stages = rank_stages(p, per_rank, name, r)
        assert sorted({s for s, _, _ in ops}) == stages
        for s in stages:
            assert sum(k == "F" and st == s for st, k, _ in ops) == m
            assert sum(k in "BI" and st == s for st, k, _ in ops) == m
            assert sum(k in "BW" and st == s for st, k, _ in ops) == m
        if name != "1f1b":  # torch's 1F1B list numbers its last rank's forwards from 1 (see _in_run_order)
            assert (fig.in_flight[r], fig.in_flight_bytes[r]) == _recount(ops, stage_bytes)
    fixed = schedule_ops(name, p, per_rank, m)
    assert [(fig.in_flight[r], fig.in_flight_bytes[r]) for r in range(p)] == \
        [_recount(ops, stage_bytes) for ops in fixed]


@pytest.mark.parametrize("p,m", [(16, 16), (4, 8), (2, 2)])
def test_zero_bubble_v_idles_less_than_1f1b(p, m):
    zbv, one = analyse("zbv", p, 2, m), analyse("1f1b", p, 1, m)
    assert zbv.bubble_max < one.bubble_max
    assert zbv.bubble_mean < one.bubble_mean


@pytest.mark.parametrize("name", TORCH)
def test_capped_lists_give_what_the_full_lists_give(name):
    """Past the cap the lists are built for fewer micro-batches and the bubble extended: the same figures as the
    full lists, and the same refusals as torch's own check on the full count."""
    per_rank = TORCH[name]
    for p, m in [(2, 24), (2, 33), (4, 40), (4, 52), (3, 45)]:
        cap = 2 * p * per_rank
        if schedule_problem(name, p, per_rank, m):
            assert problem(name, p, per_rank, m, cap=cap), (p, m)
            continue
        capped, full = analyse(name, p, per_rank, m, cap=cap), analyse(name, p, per_rank, m, cap=m)
        assert capped.simulated < m and full.simulated == m
        assert capped.bubble == pytest.approx(full.bubble, abs=1e-12), (p, m)
        assert capped.in_flight == full.in_flight, (p, m)
    for p in (2, 4):
        for m in range(1, 20):
            assert (problem(name, p, per_rank, m, cap=2 * p * per_rank) is None) == \
                (schedule_problem(name, p, per_rank, m) is None), (p, m)


def _table(out: str) -> dict[str, str]:
    """The schedule table's rows by schedule (the configured one marked '*')."""
    rows = {}
    for line in out.splitlines():
        for name in TABLE:
            if re.match(rf"[* ] {re.escape(name)}\s", line):
                rows[name] = line
    return rows


def test_the_paper_layout_prints_every_schedules_bubble_and_activations():
    """V2 on 128 ranks, pp 16 x ep 8, ZeRO-1, 1152 micro-batches per step, zbv. (Validation would build torch's
    1152-micro-batch zbv list, about a minute; the plan needs only the capped lists.)"""
    cfg = compose_config(*PAPER, "parallel.pp_schedule=zbv")
    p = plan(cfg, 128)
    out = format_plan(p)
    rows = _table(out)
    assert set(rows) == set(TABLE) and rows["zbv"].startswith("* zbv")
    assert "lists built for 128 micro-batches" in out
    by_name = {r.name: r for r in p.schedules}
    assert [r.name for r in p.schedules] == ["deepspeed", "interleaved_1f1b", "zbv", "interleaved_zb", "dualpipev"]
    assert by_name["zbv"].figures.bubble_max < by_name["deepspeed"].figures.bubble_max
    for name, row in by_name.items():
        f = row.figures
        assert f.micro_batches == 1152 and f"{f.bubble_max:.2%}" in rows["deepspeed, 1f1b" if name == "deepspeed"
                                                                          else name]
        assert f"{max(row.activation_bytes) / 1024**3:.2f}" in rows["deepspeed, 1f1b" if name == "deepspeed"
                                                                      else name]
    # The memory rows are per pipeline rank: the V of virtual stages, activations from the zbv list.
    zbv = by_name["zbv"]
    assert [s.virtual_stages for s in p.stages] == [[r, 31 - r] for r in range(16)]
    assert [s.in_flight for s in p.stages] == zbv.figures.in_flight
    assert [s.activation_bytes for s in p.stages] == zbv.activation_bytes
    # the torch pipeline engine keeps fp32 weights and gradients; its ZeRO-1 splits Adam's two moments over dp 8
    one = p.stages[1]
    assert (one.weight_bytes, one.grad_bytes) == (4 * one.params.total, 4 * one.params.total)
    assert one.optimizer_bytes == 8 * (-(-one.params.dense // 8) + one.params.expert)
    parts = stage_boundaries(cfg.model, 32, 8)
    assert list(p.stages[0].slots) == [*range(parts[0], parts[1]), *range(parts[31], parts[32])]
    first = next(line for line in out.splitlines() if line.startswith("    0  0-7 "))
    assert "embed + L" in first and " + head " in first and f"stages 0,31  [{zbv.figures.in_flight[0]}]" in first
    assert sum(s.params.total for s in p.stages) == sum(s.params.total for s in plan(compose_config(*PAPER), 128)
                                                        .stages)


def test_v2_lite_on_8_gpus_prints_every_schedule(capsys):
    """V2-Lite, pp 4 x ep 2, 32 micro-batches per step, through the dry run (validation included)."""
    from trainer.cli import dry_run
    from trainer.distributed import DistEnv
    for schedule in ("deepspeed", "zbv"):
        cfg = compose_config(*V2_LITE_8, f"parallel.pp_schedule={schedule}", "trainer.dry_run=true")
        dry_run(cfg, DistEnv())
        out = capsys.readouterr().out
        rows = _table(out)
        assert set(rows) == set(TABLE) and all("%" in row for row in rows.values())
        assert rows["deepspeed, 1f1b" if schedule == "deepspeed" else "zbv"].startswith("*")
        p = plan(cfg, 8)
        bubble = {r.name: r.figures.bubble_max for r in p.schedules}
        assert bubble["zbv"] < bubble["interleaved_1f1b"] < bubble["deepspeed"]
    assert "memory per pipeline rank" in out and "stages 0,7" in out


def test_schedules_that_cannot_run_the_layout_say_why():
    """V2-Lite pp 4 with 4 micro-batches: DualPipeV wants as many as its 8 stages; with 9 the interleaved schedules
    want whole rounds; tiny (6 slots) cannot be cut into pp 4 x 2 stages."""
    few = plan(compose_config(*V2_LITE_8, "trainer.global_batch_size=8"), 8)
    assert few.micro_batches_per_step == 4
    rows = _table(format_plan(few))
    assert "cannot run: DualPipeV requires at least as many microbatches as stages" in rows["dualpipev"]
    assert "%" in rows["zbv"] and "%" in rows["deepspeed, 1f1b"]
    tiny = plan(compose_config("model=tiny", "parallel.pp=4", "parallel.zero_stage=1", "parallel.world_size=4",
                               "trainer.micro_batch_size=1", "trainer.global_batch_size=8"), 4)
    rows = _table(format_plan(tiny))
    assert "%" in rows["deepspeed, 1f1b"]
    for name in ("interleaved_1f1b", "zbv", "interleaved_zb", "dualpipev"):
        assert "cannot run: needs 8 stages (2 per rank), the model has 6 pipeline slots" in rows[name]
    short = plan(compose_config("model=tiny", "parallel.pp=2", "parallel.zero_stage=1", "parallel.world_size=2",
                                "trainer.micro_batch_size=1", "trainer.global_batch_size=1"), 2)
    rows = _table(format_plan(short))
    assert "not analysed: torch's 1f1b list needs at least 2 micro-batches" in rows["deepspeed, 1f1b"]
    assert "%" in rows["zbv"]
    rounds = plan(compose_config(*V2_LITE_8, "trainer.global_batch_size=18"), 8)  # 9 micro-batches: 2 rounds of 4
    rows = _table(format_plan(rounds))
    assert "cannot run: Interleaved 1F1B requires the number of microbatches" in rows["interleaved_1f1b"]


@pytest.mark.parametrize("name,pp,per_rank,micro_batches", [
    ("zbv", 4, 2, 12), ("interleaved_1f1b", 2, 2, 8), ("interleaved_zb", 4, 2, 8), ("dualpipev", 2, 2, 8),
    ("zbv", 8, 2, 40)])
def test_the_linear_lowering_gives_torchs_exact_action_lists(name, pp, per_rank, micro_batches):
    """`linear_lowering` swaps torch's quadratic `_add_unshard_reshard` for `_unshard_reshard`: on every rank's
    compute actions of each multi-stage schedule the two return equal lists (and the swap is undone after)."""
    import functools
    from torch.distributed.pipelining import schedules as s
    from trainer.schedules import _unshard_reshard, linear_lowering
    original = s._add_unshard_reshard
    actions = schedule_actions(name, pp, per_rank, micro_batches)
    compared = 0
    for rank_actions in actions:
        for keep in (3, 1, 2):
            ours = _unshard_reshard(original, list(rank_actions), keep)
            theirs = original(list(rank_actions), keep)
            assert [str(a) for a in ours] == [str(a) for a in theirs], (name, keep)
            compared += len(theirs)
    assert compared > 0
    with linear_lowering():
        assert isinstance(s._add_unshard_reshard, functools.partial)
    assert s._add_unshard_reshard is original
