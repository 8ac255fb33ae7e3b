"""Meta-device construction (docs/design.md, "Building the model"): each rank builds its part of the model on the
meta device and materialises only that part, directly on its device, with layout-free initial weights.

The memory checks run the build in a fresh interpreter (this file run as a script) and read its peak resident set
from /proc/self/status, so nothing the test process allocated counts."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[2]
if __name__ == "__main__":
    sys.path.insert(0, str(ROOT))

from model import CausalLM  # noqa: E402
from model.hf import load_pretrained, save_pretrained  # noqa: E402
from model.moe import RoutedExperts  # noqa: E402
from trainer.build import build_model  # noqa: E402
from trainer.config import TrainConfig  # noqa: E402
from trainer.layout import ProcessGrid  # noqa: E402
from trainer.presets import model_preset  # noqa: E402

MiB = 2**20
# Peak host memory a rank may add while building (or building and loading) its part, relative to the bytes of the
# parameters it holds. Every parameter is allocated exactly once (to_empty) and initialised or read in place, so
# the only extra is allocator rounding, a tensor-sized read buffer when the checkpoint's dtype differs (one matrix
# or one expert, a few MiB here) and the Python objects of the module tree: 10% plus 32 MiB covers that (measured:
# +0.5% and +10 MiB), while a whole V2-Lite-shaped model needs more than twice the shard.
SLACK, ALLOWANCE = 1.10, 32 * MiB
SUBPROCESS_ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}


def param_bytes(model: torch.nn.Module) -> int:
    return sum(p.numel() * p.element_size() for p in model.parameters())


def meta_bytes(config, **part) -> int:
    """fp32 parameter bytes of a model (or part) with this config, counted without allocating it."""
    with torch.random.fork_rng(devices=[]), torch.device("meta"):
        return param_bytes(CausalLM(config, **part))


def train_config(model, **overrides) -> TrainConfig:
    cfg = TrainConfig()
    cfg.model = model_preset(model, **overrides)
    return cfg


# ------------------------------------------------------------------------------------------- measured in a subprocess
def _status_bytes(key: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1]) * 1024
    raise RuntimeError(f"/proc/self/status has no {key}")


def _reset_peak() -> None:
    """Reset VmHWM to the current RSS (Linux >= 4.0); where that is refused, the earlier peak only inflates the
    growth measured after it, so a bound on the growth still holds."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        pass


def _worker(args: dict) -> dict:
    """Build one expert-parallel rank's model on the CPU (and load a checkpoint into it when asked); report the
    growth of peak RSS over the RSS before the build, and what the rank holds."""
    cfg = train_config(args["preset"], **args["overrides"])
    grid = ProcessGrid(rank=args["rank"], world=args["ep"], ep=args["ep"])
    # The first normal_ on a meta tensor imports torch._dynamo (about 80 MiB of Python modules, once per process,
    # whatever the model's size): do it before the baseline so that only the model is measured.
    with torch.random.fork_rng(devices=[]), torch.device("meta"):
        CausalLM(model_preset("tiny"))
    _reset_peak()
    base = _status_bytes("VmRSS")
    torch.manual_seed(0)
    model = build_model(cfg, grid, torch.device("cpu"))
    if args.get("load"):
        load_pretrained(args["load"], model=model)
    growth = _status_bytes("VmHWM") - base
    out = {"growth": growth, "shard_bytes": param_bytes(model), "devices": sorted({str(p.device)
                                                                                   for p in model.parameters()})}
    if args.get("load"):
        out["wrong"] = [name for name, ok in checkpoint_values_ok(model) if not ok]
    return out


def measure(preset: str, overrides: dict, rank: int, ep: int, load: str | None = None) -> dict:
    args = {"preset": preset, "overrides": overrides, "rank": rank, "ep": ep, "load": load}
    proc = subprocess.run([sys.executable, str(Path(__file__).resolve()), json.dumps(args)], env=SUBPROCESS_ENV,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


# ------------------------------------------------------------------------------------------- a checkpoint to load
def expert_value(e: int) -> float:
    return (e + 1) / 128  # exact in bf16 for the 64 experts used here


def checkpoint_values_ok(model: CausalLM):
    """(tensor, whether it holds what `write_checkpoint` stored): 0.25 everywhere, routed expert e = expert_value(e)."""
    for name, experts in model.named_modules():
        if isinstance(experts, RoutedExperts):
            for local in range(experts.n_experts):
                value = expert_value(experts.expert_offset + local)
                for leaf in ("gate_up_proj", "down_proj"):
                    yield f"{name}.{leaf}[{local}]", bool((getattr(experts, leaf)[local] == value).all())
    for name, p in model.named_parameters():
        if ".mlp.experts." not in name:
            yield name, bool((p == 0.25).all())


def write_checkpoint(config, path: Path) -> None:
    """The whole model in the released layout (bf16), filled with values that tell the experts apart."""
    with torch.random.fork_rng(devices=[]), torch.device("meta"):
        model = CausalLM(config)
    model = model.to(torch.bfloat16).to_empty(device="cpu")
    with torch.no_grad():
        for p in model.parameters():
            p.fill_(0.25)
        for moe in model.moe_layers():
            for e in range(moe.experts.n_experts):
                moe.experts.gate_up_proj[e].fill_(expert_value(e))
                moe.experts.down_proj[e].fill_(expert_value(e))
    save_pretrained(model, path)


# ------------------------------------------------------------------------------------------- tests: memory
@pytest.mark.skipif(not Path("/proc/self/status").exists(), reason="reads peak RSS from /proc (Linux)")
def test_an_ep8_rank_of_a_v2_lite_shaped_model_holds_only_its_shard_in_host_memory():
    """One rank of ep=8 over V2-Lite's shapes (3 of its 27 layers: the dense layer 0 and two MoE layers of 64
    experts) adds no more host memory than its shard, where the whole model would need 2.4x as much."""
    overrides = {"num_hidden_layers": 3}
    config = model_preset("v2_lite", **overrides)
    got = measure("v2_lite", overrides, rank=3, ep=8)
    shard = meta_bytes(config, expert_shard=(24, 8))
    full = meta_bytes(config)
    bound = SLACK * shard + ALLOWANCE
    print(f"\nep=8 rank 3: shard {shard / MiB:.0f} MiB, peak RSS growth {got['growth'] / MiB:.0f} MiB "
          f"(bound {bound / MiB:.0f} MiB), whole model {full / MiB:.0f} MiB")
    assert got["shard_bytes"] == shard and got["devices"] == ["cpu"]
    assert got["growth"] >= shard  # the measurement sees the materialised weights at all
    assert got["growth"] <= bound, f"building one rank's part took {got['growth'] / MiB:.0f} MiB > {bound / MiB:.0f}"
    assert full > 2 * bound  # building the whole model first (the old path) would break the bound twice over


@pytest.mark.skipif(not Path("/proc/self/status").exists(), reason="reads peak RSS from /proc (Linux)")
def test_build_then_load_released_weights_reads_only_the_shard(tmp_path):
    """build_model then load_pretrained(model=...) for one rank of ep=8: the rank ends with the checkpoint's values
    for its own experts, and its peak host memory stays within its shard (no whole model on the way). The model is
    narrower than V2-Lite (same 64 experts) to keep the checkpoint on disk small."""
    overrides = {"num_hidden_layers": 2, "vocab_size": 4096, "intermediate_size": 1408, "moe_intermediate_size": 704}
    config = model_preset("v2_lite", **overrides)
    write_checkpoint(config, tmp_path / "ckpt")
    got = measure("v2_lite", overrides, rank=5, ep=8, load=str(tmp_path / "ckpt"))
    shard, full = meta_bytes(config, expert_shard=(40, 8)), meta_bytes(config)
    bound = SLACK * shard + ALLOWANCE
    print(f"\nep=8 rank 5, build + load: shard {shard / MiB:.0f} MiB, peak RSS growth {got['growth'] / MiB:.0f} MiB "
          f"(bound {bound / MiB:.0f} MiB), whole model {full / MiB:.0f} MiB")
    assert got["wrong"] == []
    assert shard <= got["growth"] <= bound
    assert full > 2 * bound


# ------------------------------------------------------------------------------------------- tests: same weights
def whole_model(cfg: TrainConfig, seed: int) -> dict[str, torch.Tensor]:
    torch.manual_seed(seed)
    return dict(build_model(cfg, ProcessGrid(), torch.device("cpu")).named_parameters())


def assert_part_matches(part: torch.nn.Module, whole: dict[str, torch.Tensor], shard: tuple[int, int] | None):
    for name, p in part.named_parameters():
        want = whole[name]
        if shard is not None and ".mlp.experts." in name:
            want = want[shard[0]:shard[0] + shard[1]]
        assert p.shape == want.shape and torch.equal(p, want), name


def test_build_model_gives_the_eagerly_built_model_bit_for_bit():
    """Seed drawn from the global RNG as before, then layout-free init: the meta-built model equals the model built
    eagerly on the CPU (the old path), so runs started from trainer.seed keep their losses."""
    cfg = train_config("tiny")
    built = whole_model(cfg, seed=11)
    torch.manual_seed(11)
    eager = CausalLM(cfg.model)
    assert_part_matches(eager, built, None)
    assert set(built) == {n for n, _ in eager.named_parameters()}
    assert not torch.equal(whole_model(cfg, seed=12)["lm_head.weight"], built["lm_head.weight"])  # seed matters


@pytest.mark.parametrize("ep", [2, 4])
def test_every_expert_parallel_rank_holds_the_one_process_weights(ep):
    cfg = train_config("tiny")
    whole = whole_model(cfg, seed=3)
    for rank in range(ep):
        grid = ProcessGrid(rank=rank, world=ep, ep=ep)
        torch.manual_seed(3)
        part = build_model(cfg, grid, torch.device("cpu"))
        offset, count = grid.expert_shard(cfg.model.n_routed_experts)
        assert all(m.experts.expert_offset == offset and m.experts.n_experts == count for m in part.moe_layers())
        assert_part_matches(part, whole, (offset, count))


def test_pipeline_stages_hold_the_one_process_weights():
    """build_model's stages (pp=2, also with ep=2 inside each stage) and a direct cut (layers 1-2, no embedding, no
    head) materialised from the meta device all hold the whole model's values."""
    cfg = train_config("tiny")
    whole = whole_model(cfg, seed=5)
    cfg.parallel.pp = 2
    for ep in (1, 2):
        covered = set()
        for rank in range(2 * ep):
            grid = ProcessGrid(rank=rank, world=2 * ep, pp=2, ep=ep)
            torch.manual_seed(5)
            part = build_model(cfg, grid, torch.device("cpu"))
            assert part.is_partial
            assert_part_matches(part, whole, grid.expert_shard(cfg.model.n_routed_experts) if ep > 1 else None)
            covered |= {n for n, _ in part.named_parameters()}
        assert covered == set(whole)
    torch.manual_seed(5)
    with torch.device("meta"):
        cut = CausalLM(cfg.model, layers=range(1, 3), embedding=False, head=False)
    cut = cut.to_empty(device="cpu")
    cut.init_weights()
    assert_part_matches(cut, whole, None)
    assert {n.split(".")[2] for n, _ in cut.named_parameters()} == {"1", "2"}


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_build_allocates_on_the_device_and_is_layout_free():
    """On a GPU the part goes straight to device memory (host memory grows by far less than the shard) and the
    CUDA generators give the same values at ep=1 and ep=2 (other values than on the CPU, which is expected)."""
    device = torch.device("cuda", torch.cuda.current_device())
    cfg = train_config("tiny")
    torch.manual_seed(3)
    whole = dict(build_model(cfg, ProcessGrid(), device).named_parameters())
    for rank in range(2):
        grid = ProcessGrid(rank=rank, world=2, ep=2)
        torch.manual_seed(3)
        assert_part_matches(build_model(cfg, grid, device), whole, grid.expert_shard(cfg.model.n_routed_experts))
    big = train_config("v2_lite", num_hidden_layers=3)
    shard = meta_bytes(big.model, expert_shard=(24, 8))
    _reset_peak()
    base = _status_bytes("VmRSS")
    part = build_model(big, ProcessGrid(rank=3, world=8, ep=8), device)
    torch.cuda.synchronize()
    growth = _status_bytes("VmHWM") - base
    assert param_bytes(part) == shard and growth < shard / 4, (growth, shard)


if __name__ == "__main__":
    print(json.dumps(_worker(json.loads(sys.argv[1]))))
