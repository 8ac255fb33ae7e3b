"""Hydra composition of every preset and experiment, and readable rejection of bad keys and values."""

from __future__ import annotations

import re
from enum import Enum

import pytest
from hydra import compose, initialize_config_dir
from hydra.errors import ConfigCompositionException
from omegaconf import OmegaConf

from trainer.cli import CONF_DIR, strip_launcher_args, to_train_config
from trainer.config import Schedule, TrainConfig, WandbMode, register_configs
from trainer.optim import global_batch_at, lr_at
from trainer.presets import model_preset

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
    assert cfg.eval.tasks == ["stdlib_docstrings", "stdlib_lines"] and cfg.eval.every == 100 and cfg.eval.at_start


@pytest.mark.parametrize("model", _group("model"))
def test_every_model_preset_composes_to_its_yaml_field_for_field(model):
    """What Hydra composes for `model=<name>` is exactly the preset file (no key dropped, renamed or retyped)."""
    cfg = compose_config(f"model={model}", "data.seq_len=64")
    assert cfg.model == model_preset(model)
    for key, value in OmegaConf.to_container(OmegaConf.load(CONF_DIR / "model" / f"{model}.yaml")).items():
        ours = getattr(cfg.model, key)
        if key == "rope_scaling" and value:  # spelled `type` or `rope_type` in YAML, `type` once validated
            ours, value = ({k: v for k, v in d.items() if k not in ("type", "rope_type")} for d in (ours, value))
        assert ours == value, key


@pytest.mark.parametrize("group,name", [(g, n) for g in ("data", "optim", "parallel", "trainer", "eval")
                                        for n in _group(g)])
def test_every_group_option_composes_to_its_yaml(group, name):
    """Every option of every config group composes, and each key of its file lands in the typed config."""
    extra = {"files": ["data.paths=[/tmp/*.jsonl]"], "sft": ["data.paths=[/tmp/*.jsonl]"],
             "hub": ["data.hub_path=some/dataset"]}.get(name, [])
    section = getattr(compose_config(f"{group}={name}", *extra), group)
    for key, value in OmegaConf.to_container(OmegaConf.load(CONF_DIR / group / f"{name}.yaml")).items():
        if key == "defaults" or f"{group}.{key}=" in " ".join(extra):
            continue  # Hydra's own list / what this test overrides
        ours = getattr(section, key)
        assert (ours.value if isinstance(ours, Enum) else ours) == value, (group, name, key)


@pytest.mark.parametrize("experiment", _group("experiment"))
def test_every_experiment_composes(experiment):
    """Fine-tuning experiments read the user's files: they compose once given some."""
    needs_files = experiment.startswith(("cpt_", "sft_", "esft_", "lora_", "long_context_"))
    cfg = compose_config(f"experiment={experiment}", *(["data.paths=[/data/*.jsonl]"] if needs_files else []))
    if experiment.startswith(("sft_", "esft_", "lora_")):
        assert cfg.data.kind == "sft" and cfg.trainer.epochs == 2
    if experiment.startswith("lora_"):  # the built-in engine, every default target
        assert cfg.lora.enabled and cfg.parallel.zero_stage is None and cfg.parallel.pp == 1
        assert "experts" in cfg.lora.targets and "gate" not in cfg.lora.targets
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
    (["eval.tasks=[]"], r"eval\.every=100: name the tasks to run in eval\.tasks"),
    (["eval.limit=2.5"], r"eval\.limit=2\.5: a count of documents \(>= 1\) or a fraction in \(0, 1\)"),
    (["eval.include_path=/nonexistent/tasks"], r"eval\.include_path=/nonexistent/tasks: no such directory"),
    (["eval.max_length=4096"], r"eval\.max_length=4096: must be in \[2, model\.max_position_embeddings=1024\]"),
])
def test_bad_values_fail_naming_the_key(overrides, message):
    with pytest.raises(ValueError, match=message):
        compose_config(*overrides)


def test_global_batch_must_divide_across_ranks():
    compose_config("trainer.global_batch_size=16", world_size=2)
    with pytest.raises(ValueError, match=r"8 x 3 = 24"):
        compose_config("trainer.global_batch_size=16", world_size=3)


def test_deepspeed_launcher_local_rank_is_accepted(monkeypatch):
    monkeypatch.setenv("LOCAL_RANK", "0")  # recorded first, so teardown removes what strip_launcher_args sets
    monkeypatch.delenv("LOCAL_RANK")
    assert strip_launcher_args(["--local_rank=3", "model=tiny", "--local_rank", "2", "x=1"]) == ["model=tiny", "x=1"]
    import os
    assert os.environ["LOCAL_RANK"] == "3"


def test_resolved_config_round_trips_for_the_rank_broadcast():
    from trainer.config import config_dict
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
    (2, ["parallel.zero_stage=2", "checkpoint.async_save=true"],
     "DeepSpeed writes its own checkpoint files in the training thread"),
])
def test_combinations_deepspeed_cannot_run_are_refused_with_what_to_use(world, overrides, message):
    with pytest.raises(ValueError, match=re.escape(message)):
        compose_config(*overrides, world_size=world)


@pytest.mark.parametrize("world,overrides,message", [
    (4, ["parallel.pp=2", "parallel.pp_schedule=zbv", "parallel.zero_stage=2"],
     "use parallel.zero_stage=1 (ZeRO-1) or 0, or parallel.pp=1 for ZeRO-2/3"),
    (2, ["parallel.pp=2", "parallel.pp_schedule=zbv", "trainer.compile=true"],
     "use parallel.pp_schedule=interleaved_1f1b or 1f1b to compile"),
    (2, ["parallel.pp=2", "parallel.pp_schedule=dualpipev", "trainer.micro_batch_size=2",
         "trainer.global_batch_size=4"],
     "DualPipeV requires at least as many microbatches as stages, but got 2 microbatches and 4 stages.; give it "
     "more micro-batches per step"),
    (2, ["parallel.pp=2", "parallel.pp_schedule=1f1b", "trainer.micro_batch_size=2", "trainer.global_batch_size=2"],
     "must be greater than or equal to the number of stages (2)"),
    (4, ["parallel.pp=4", "parallel.pp_schedule=zbv", "model=tiny_lite"],
     "8 stages (2 per rank), but the model has 5 pipeline slots"),
    (2, ["parallel.pp=2", "parallel.pp_schedule=zbv", "parallel.pp_stages_per_rank=3"],
     "a V schedule holds exactly 2 stages per rank"),
    (1, ["parallel.pp_schedule=zbv"], "needs pipeline stages: set parallel.pp >= 2"),
    (2, ["parallel.pp=2", "parallel.pp_schedule=gpipe"], "parallel.pp_schedule='gpipe': allowed: deepspeed, 1f1b"),
    (2, ["parallel.pp=2", "parallel.pp_schedule=zbv", "trainer.batch_ramp_start=4", "trainer.batch_ramp_steps=5"],
     "the schedule is built for a fixed number of micro-batches per step"),
])
def test_pipeline_schedules_refuse_what_they_cannot_run_with_what_to_use(world, overrides, message):
    with pytest.raises(ValueError, match=re.escape(message)):
        compose_config(*overrides, world_size=world)


def test_torch_pipeline_schedules_are_their_own_engine():
    cfg = compose_config("parallel.pp=2", "parallel.pp_schedule=zbv", world_size=4)
    assert cfg.torch_pipeline and not cfg.uses_deepspeed and cfg.resolved_zero_stage() == 1
    assert cfg.pipeline_stages() == 4 and cfg.layout(4)["engine"] == "pipelining"
    interleaved = compose_config("parallel.pp=2", "parallel.pp_schedule=interleaved_1f1b",
                                 "parallel.pp_stages_per_rank=3", "model=tiny", world_size=2)
    assert interleaved.pipeline_stages() == 6
    assert compose_config("parallel.pp=2", world_size=2).uses_deepspeed  # the default stays DeepSpeed's


@pytest.mark.parametrize("args,message", [
    (["trainer.max_step=3"], "config error: trainer.max_step: unknown key (did you mean trainer.max_steps?)"),
    (["+model.hidden_sise=8"], "config error: model.hidden_sise: unknown key (did you mean model.hidden_size?)"),
    (["max_steps=3"], "config error: max_steps: no such config group; groups: data, eval, experiment, model"),
    (["model=tiny_lyte"], "config error: model=tiny_lyte: no such preset (did you mean tiny_lite?)"),
    (["trainer.micro_batch_size=two"], "config error: trainer.micro_batch_size=two: Value 'two' of type 'str' "
                                       "could not be converted to Integer"),
    (["logging.wandb=sometimes"], "config error: logging.wandb=sometimes: Invalid value 'sometimes', expected one "
                                  "of [offline, online, disabled]"),
])
def test_command_line_mistakes_get_one_line_naming_the_key(capsys, args, message):
    """Before Hydra composes anything: one `config error:` line and exit 2, not Hydra's advice to append with `+`."""
    from trainer.cli import check_overrides
    with pytest.raises(SystemExit) as info:
        check_overrides(args)
    err = capsys.readouterr().err
    assert info.value.code == 2 and err.startswith(message) and len(err.strip().splitlines()) == 1, err
    assert "+trainer" not in err


@pytest.mark.parametrize("args", [
    ["model=v2_lite", "model.rope_scaling.factor=8", "trainer.max_steps=3", "hydra.run.dir=/tmp/x", "--cfg", "job"],
    ["experiment=smoke", "parallel=dp", "model='tiny_lite'", "~model.pretrained", "data.paths=['/a=b/*.jsonl']"],
    ["-m", "model=tiny,tiny_lite", "trainer.seed=range(3)"],                    # sweeps are Hydra's to expand
    ["hydra.searchpath=[file:///elsewhere]", "experiment=mine"],              # presets from another directory
])
def test_good_overrides_pass_the_command_line_check(args):
    from trainer.cli import check_overrides
    check_overrides(args)


def test_an_optional_group_set_to_null_gets_one_line_not_a_traceback(capsys):
    from trainer.cli import check_overrides
    with pytest.raises(SystemExit):
        check_overrides(["experiment=null"])
    err = capsys.readouterr().err
    assert err.startswith("config error: experiment=null: no such preset") and "~experiment" in err


def _hydra(task: list[str], model: str = "tiny", experiment: str | None = None):
    from types import SimpleNamespace
    return SimpleNamespace(overrides=SimpleNamespace(task=task),
                           runtime=SimpleNamespace(choices={"model": model, "experiment": experiment}))


def test_model_choices_name_what_the_user_set_and_where():
    """The fields `model.pretrained` must not override: set on the command line (also through a sub-key), by a
    preset chosen there, or by an experiment; the default preset's fields are not the user's."""
    from trainer.cli import model_choices
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base=None):
        plain = compose("config", overrides=["model.pretrained=/x", "model.rope_scaling.factor=8"])
        picked = compose("config", overrides=["model=v2_lite", "model.pretrained=/x"])
        recipe = compose("config", overrides=["experiment=long_context_tiny", "model.pretrained=/x"])
    choices = model_choices(plain, _hydra(["model.pretrained=/x", "model.rope_scaling.factor=8"]))
    assert choices.explicit == {"pretrained": "model.pretrained=/x", "rope_scaling": "model.rope_scaling.factor=8"}
    assert not choices.preset
    choices = model_choices(picked, _hydra(["model=v2_lite", "model.pretrained=/x"], model="v2_lite"))
    assert choices.preset and choices.explicit["hidden_size"] == "model=v2_lite"
    choices = model_choices(recipe, _hydra(["experiment=long_context_tiny", "model.pretrained=/x"], "tiny_lite",
                                           "long_context_tiny"))
    assert choices.preset and "hidden_size" not in choices.explicit
    assert choices.explicit["rope_scaling"] == choices.explicit["max_position_embeddings"] == \
        "experiment=long_context_tiny"


def test_a_pretrained_directory_keeps_the_users_training_fields_and_refuses_other_shapes(tmp_path):
    from model.config import ModelConfig
    from trainer.prepare import ModelChoices, resolve_pretrained
    released = ModelConfig.from_hf_config({**model_preset("tiny_lite").to_hf_config(), "hidden_size": 64})
    hf = released.to_hf_config()
    del hf["device_aux_loss_alpha"]  # released config.json files do not carry our coefficients
    (tmp_path / "config.json").write_text(__import__("json").dumps(hf))
    cfg = compose_config("model=tiny", f"model.pretrained={tmp_path}", "model.comm_aux_loss_alpha=0.5")
    resolved = resolve_pretrained(cfg, ModelChoices({"comm_aux_loss_alpha": "model.comm_aux_loss_alpha=0.5"},
                                                    preset=True))
    assert resolved.hidden_size == 64 and resolved.num_hidden_layers == released.num_hidden_layers
    assert resolved.comm_aux_loss_alpha == 0.5  # set by the user
    assert resolved.device_aux_loss_alpha == cfg.model.device_aux_loss_alpha  # not in config.json: the preset's
    assert resolved.rope_scaling == released.rope_scaling  # in config.json and not set: the directory's
    cfg.model = cfg.model.replace(hidden_size=96)
    with pytest.raises(ValueError, match=r"model\.hidden_size=96 but config\.json has 64;"):
        resolve_pretrained(cfg, ModelChoices({"hidden_size": "model.hidden_size=96"}, preset=False))
    assert resolve_pretrained(cfg, ModelChoices({}, preset=False)).hidden_size == 64  # the default preset's: replaced


def test_the_esft_dry_run_needs_no_data_files(capsys):
    """Planning reads no data: an experiment whose data.paths is still empty plans without them."""
    from trainer.cli import dry_run
    from trainer.distributed import DistEnv
    cfg = to_train_config_from("experiment=esft_v2_lite", "trainer.dry_run=true")
    dry_run(cfg, DistEnv())
    assert "ESFT (assuming 15% of the experts selected), memory per rank" in capsys.readouterr().out


def test_the_old_data_val_every_key_still_sets_the_holdout_share():
    with pytest.warns(UserWarning, match="data.val_every is deprecated"):
        cfg = compose_config("data.val_every=7")
    assert cfg.data.holdout_every == 7 and cfg.data.val_every is None


def to_train_config_from(*overrides: str) -> TrainConfig:
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base=None):
        return to_train_config(compose("config", overrides=["checkpoint.dir=/tmp/unused", *overrides]))


TWINS = {"cpt_v2_lite": "cpt_tiny", "sft_v2_lite": "sft_tiny", "sft_v2": "sft_tiny_v2",
         "long_context_v2_lite": "long_context_tiny", "esft_v2_lite": "esft_tiny", "lora_v2_lite": "lora_tiny",
         "long_context_v2": "long_context_tiny_v2"}


def test_every_full_size_experiment_has_a_tiny_twin_with_the_same_recipe():
    """Each recipe for the released sizes has a toy twin the tests can run: same data kind, schedule, epochs or
    steps, ESFT, LoRA and its targets, activation checkpointing, and the same attention layout (query compression
    or not)."""
    full_size = [e for e in _group("experiment") if compose_config(
        f"experiment={e}", "data.paths=[/d/*.jsonl]").model.hidden_size >= 2048]
    assert sorted(full_size) == sorted(TWINS)
    for big, small in TWINS.items():
        a, b = (compose_config(f"experiment={e}", "data.paths=[/d/*.jsonl]") for e in (big, small))
        assert (a.data.kind, a.optim.schedule, a.trainer.epochs is None, a.esft.enabled, a.lora.enabled,
                a.lora.targets, a.trainer.activation_checkpointing, a.model.q_lora_rank is None) == \
               (b.data.kind, b.optim.schedule, b.trainer.epochs is None, b.esft.enabled, b.lora.enabled,
                b.lora.targets, b.trainer.activation_checkpointing, b.model.q_lora_rank is None), (big, small)


def test_a_single_value_for_a_list_key_is_a_one_element_list():
    """`data.paths=/x.jsonl` without brackets is the list of that one path (Hydra alone refuses it with "str is not a
    ListConfig"); lists, other keys, several values, null and Hydra's own keys are left as given."""
    from trainer.cli import check_overrides, listify
    given = ["data.paths=/d/a.jsonl", "data.val_paths=/v/*.jsonl", "eval.tasks=hellaswag", "trainer.trainable=gate",
             "+data.paths=/y", "data.paths=[/a]", "data.paths=a,b", "data.paths=null", "trainer.max_steps=3",
             "optim.betas=0.9", "model=tiny", "hydra.run.dir=/x", "--cfg", "job"]
    assert listify(given) == ["data.paths=[/d/a.jsonl]", "data.val_paths=[/v/*.jsonl]", "eval.tasks=[hellaswag]",
                              "trainer.trainable=[gate]", "+data.paths=[/y]", *given[5:]]
    check_overrides(listify(["data=files", "data.paths=/d/*.jsonl"]))  # composes: no SystemExit
    assert compose_config(*listify(["data=files", "data.paths=/d/*.jsonl"])).data.paths == ["/d/*.jsonl"]


@pytest.mark.parametrize("world,overrides,message", [
    (3, ["parallel.cp=2"], "must be >= 1 and divide the data-parallel size 3"),
    (2, ["parallel.cp=2", "model.attention_type=mha"], "exchanges MLA's latent; the MHA/GQA baselines have none"),
    (4, ["parallel.cp=2", "parallel.pp=2"], "context parallelism runs without a pipeline (parallel.pp=1)"),
    (2, ["parallel.cp=2", "data.seq_len=6"], "does not split into 2 x parallel.cp = 4 equal chunks"),
    (2, ["parallel.cp=2", "moe.capacity_factor=1.0"], "token dropping decides per rank"),
    (2, ["parallel.cp=2", "trainer.compile=true"], "the context-parallel attention runs eagerly"),
    (2, ["parallel.cp=2", "esft.enabled=true"], "expert scoring reads whole sequences"),
    (4, ["parallel.cp=2", "trainer.global_batch_size=6", "trainer.micro_batch_size=2"],
     "must be a multiple of trainer.micro_batch_size x data-parallel ranks = 2 x 2 = 4"),
])
def test_context_parallelism_refuses_what_it_cannot_run_with_the_reason(world, overrides, message):
    with pytest.raises(ValueError, match=re.escape(message)):
        compose_config(*overrides, world_size=world)


def test_context_parallel_batches_count_sequences_not_ranks():
    """With parallel.cp=2 on 4 processes, 2 ranks read different sequences: a global batch of 4 at micro-batch 2
    is valid (it would not be at dp 4), and the layout checkpoints record cp."""
    cfg = compose_config("parallel.cp=2", "trainer.global_batch_size=4", "trainer.micro_batch_size=2", world_size=4)
    assert cfg.layout(4)["cp"] == 2
