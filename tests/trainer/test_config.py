"""Hydra composition of every preset and experiment, and readable rejection of bad keys and values."""

from __future__ import annotations

import re

import pytest
from hydra import compose, initialize_config_dir
from hydra.errors import ConfigCompositionException
from omegaconf import OmegaConf

from trainer.cli import CONF_DIR, strip_launcher_args, to_train_config
from trainer.config import Schedule, TrainConfig, WandbMode, register_configs
from trainer.optim import global_batch_at, lr_at

register_configs()


def compose_config(*overrides: str, world_size: int = 1) -> TrainConfig:
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base=None):
        cfg = compose("config", overrides=["checkpoint.dir=/tmp/unused", *overrides])
    train_cfg = to_train_config(cfg)
    train_cfg.validate(world_size)
    return train_cfg


def _group(name: str) -> list[str]:
    return sorted(p.stem for p in (CONF_DIR / name).glob("*.yaml"))


def test_default_config_is_the_tiny_main_job():
    cfg = compose_config()
    assert cfg.model.n_routed_experts == 16 and cfg.data.source == "stdlib"
    assert cfg.logging.wandb == WandbMode.offline and cfg.checkpoint.resume == "auto"
    assert cfg.optim.schedule == Schedule.step and cfg.optim.decay_at == [0.6, 0.9]


@pytest.mark.parametrize("model", _group("model"))
def test_every_model_preset_composes(model):
    cfg = compose_config(f"model={model}", "data.seq_len=64")
    assert cfg.model.attention_type == "mla"


@pytest.mark.parametrize("group,name", [(g, n) for g in ("data", "optim", "parallel", "trainer")
                                        for n in _group(g)])
def test_every_group_option_composes(group, name):
    extra = {"files": ["data.paths=[/tmp/*.jsonl]"], "sft": ["data.paths=[/tmp/*.jsonl]"],
             "hub": ["data.hub_path=some/dataset"]}.get(name, [])
    compose_config(f"{group}={name}", *extra)


@pytest.mark.parametrize("experiment", _group("experiment"))
def test_every_experiment_composes(experiment):
    """Fine-tuning experiments read the user's files: they compose once given some."""
    needs_files = experiment.startswith(("cpt_", "sft_", "esft_", "long_context_"))
    cfg = compose_config(f"experiment={experiment}", *(["data.paths=[/data/*.jsonl]"] if needs_files else []))
    if experiment.startswith(("sft_", "esft_")):
        assert cfg.data.kind == "sft" and cfg.trainer.epochs == 2
    if experiment in ("sft_v2", "sft_v2_lite"):
        assert cfg.optim.lr == 5e-6  # the paper's SFT learning rate
    if experiment.startswith("long_context_"):
        assert cfg.trainer.activation_checkpointing and cfg.model.rope_scaling["type"] == "yarn"
    if experiment == "long_context_v2_lite":
        assert cfg.data.seq_len == 32768 and cfg.model.rope_scaling["factor"] == 40


def test_public_keys_are_accepted(tmp_path):
    (tmp_path / "tokenizer.json").write_text("{}")
    cfg = compose_config("model=tiny_lite", "data=files", "data.paths=[/a/*.jsonl,/b/*.parquet]",
                         f"data.tokenizer={tmp_path}", "data.seq_len=128", "trainer.max_steps=7",
                         "trainer.micro_batch_size=2", "trainer.global_batch_size=8", "trainer.seed=3",
                         "trainer.log_every=2", "optim.lr=1e-4", "checkpoint.dir=/tmp/ck", "checkpoint.every=5",
                         "checkpoint.resume=none", "checkpoint.keep=2", "logging.wandb=disabled")
    assert (cfg.data.paths, cfg.trainer.global_batch_size, cfg.checkpoint.keep) == (["/a/*.jsonl", "/b/*.parquet"],
                                                                                     8, 2)


@pytest.mark.parametrize("override,message", [
    ("trainer.max_stepz=3", r"Key 'max_stepz' not in 'TrainerConfig'"),
    ("logging.wandb=sometimes", r"Invalid value 'sometimes', expected one of \[offline, online, disabled\]"),
    ("trainer.micro_batch_size=two", r"'two' .* could not be converted to Integer\n    full_key: "
                                     r"trainer\.micro_batch_size"),
])
def test_unknown_keys_and_wrong_types_are_named(override, message):
    with pytest.raises(ConfigCompositionException) as info:
        compose_config(override)
    assert override.split("=")[0] in str(info.value)
    assert re.search(message, str(info.value.__cause__))  # what Hydra prints under "Error merging override"


def test_appended_unknown_keys_are_not_silently_dropped():
    with pytest.raises(ValueError, match=r"model\.hidden_sise: unknown key; allowed: .*hidden_size"):
        compose_config("+model.hidden_sise=8")


@pytest.mark.parametrize("overrides,message", [
    (["trainer.global_batch_size=12"], r"trainer\.global_batch_size=12: must be a multiple of .* 8 x 1 = 8"),
    (["model.n_group=3"], r"ModelConfig\.n_group=3: must divide n_routed_experts=16"),
    (["data.source=ftp"], r"data\.source='ftp': allowed: stdlib, files, hub"),
    (["data=files"], r"data\.paths=\[\]: data\.source=files needs data\.paths"),
    (["optim.decay_at=[0.9,0.6]"], r"optim\.decay_at"),
    (["trainer.precision=fp8"], r"trainer\.precision='fp8': allowed: auto, fp32, bf16"),
    (["data.seq_len=4096"], r"data\.seq_len=4096: exceeds model\.max_position_embeddings=1024"),
    (["checkpoint.keep=0"], r"checkpoint\.keep"),
    (["checkpoint.resume=Auto"], r"checkpoint\.resume='Auto': allowed: auto, none, or an existing checkpoint"),
    (["data.tokenizer=/nonexistent/tok.json"], r"data\.tokenizer='/nonexistent/tok\.json': no such file"),
    (["trainer.val_every=-1"], r"trainer\.val_every=-1: must be >= 0"),
])
def test_bad_values_fail_naming_the_key(overrides, message):
    with pytest.raises(ValueError, match=message):
        compose_config(*overrides)


def test_global_batch_must_divide_across_ranks():
    compose_config("trainer.global_batch_size=16", world_size=2)
    with pytest.raises(ValueError, match=r"8 x 3 = 24"):
        compose_config("trainer.global_batch_size=16", world_size=3)


def test_deepspeed_launcher_local_rank_is_accepted(monkeypatch):
    monkeypatch.delenv("LOCAL_RANK", raising=False)
    assert strip_launcher_args(["--local_rank=3", "model=tiny", "--local_rank", "2", "x=1"]) == ["model=tiny", "x=1"]
    import os
    assert os.environ["LOCAL_RANK"] == "3"


def test_resolved_config_round_trips_for_the_rank_broadcast():
    from trainer.train import config_dict
    cfg = compose_config("optim=cosine", "trainer.max_steps=9")
    assert to_train_config(config_dict(cfg)) == cfg
    assert OmegaConf.to_yaml(OmegaConf.structured(cfg))


def test_step_schedule_warms_up_then_drops_at_60_and_90_percent():
    cfg = compose_config("optim.lr=1.0", "optim.warmup_steps=10").optim
    assert lr_at(0, cfg, 100) == pytest.approx(0.1) and lr_at(9, cfg, 100) == pytest.approx(1.0)
    assert lr_at(59, cfg, 100) == 1.0 and lr_at(60, cfg, 100) == pytest.approx(0.316)
    assert lr_at(89, cfg, 100) == pytest.approx(0.316) and lr_at(90, cfg, 100) == pytest.approx(0.316 ** 2)


def test_cosine_schedule_ends_at_the_floor():
    cfg = compose_config("optim=cosine", "optim.lr=1.0", "optim.warmup_steps=0").optim
    assert lr_at(0, cfg, 101) == pytest.approx(1.0)
    assert lr_at(50, cfg, 101) == pytest.approx(0.55)  # half way: (1 + 0.1) / 2
    assert lr_at(100, cfg, 101) == pytest.approx(0.1)  # the last step of 101 runs at the floor


def test_batch_ramp_grows_in_whole_micro_batches():
    cfg = compose_config("trainer.micro_batch_size=2", "trainer.global_batch_size=16",
                         "trainer.batch_ramp_start=4", "trainer.batch_ramp_steps=10", world_size=2).trainer
    sizes = [global_batch_at(s, cfg, 2) for s in range(12)]
    assert sizes[0] == 4 and sizes[-1] == 16 and sizes == sorted(sizes)
    assert all(s % 4 == 0 for s in sizes)


@pytest.mark.parametrize("world,overrides,message", [
    (4, ["parallel.pp=2", "parallel.zero_stage=2"], "use parallel.zero_stage=1, or parallel.pp=1 for ZeRO-2/3"),
    (4, ["parallel.pp=2", "parallel.zero_stage=3"], "use parallel.zero_stage=1, or parallel.pp=1 for ZeRO-2/3"),
    (4, ["parallel.zero_stage=3", "parallel.ep=2"], "use parallel.ep=1 with ZeRO-3"),
    (2, ["parallel.zero_stage=1", "trainer.batch_ramp_start=16", "trainer.batch_ramp_steps=5",
         "trainer.global_batch_size=32"], "leave the ramp off, or use the built-in engine"),
    (4, ["parallel.pp=2", "parallel.ep=2", "parallel.pp_partition=type:head", "model=tiny_lite"],
     "stage 1 would hold no MoE layer"),
    (2, ["parallel.pp=2", "trainer.trainable=[mlp]"], "partial fine-tuning is not supported across pipeline"),
    (4, ["parallel.zero_stage=2", "parallel.ep=2", "esft.enabled=true"], "use parallel.ep=1, parallel.zero_stage=0"),
    (1, ["parallel.zero_stage=5"], "allowed: null (built-in engine), 0, 1, 2, 3"),
])
def test_combinations_deepspeed_cannot_run_are_refused_with_what_to_use(world, overrides, message):
    with pytest.raises(ValueError, match=re.escape(message)):
        compose_config(*overrides, world_size=world)
