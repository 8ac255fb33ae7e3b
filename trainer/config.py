"""The typed training configuration. Hydra composes `conf/` YAML over these dataclasses (registered in its
ConfigStore), and the entry point turns the result into `TrainConfig` at once; every component then receives only
its own section. `validate()` checks what types alone cannot, before any process group starts, and names the key.
"""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass, field
from enum import Enum

from omegaconf import DictConfig, OmegaConf

from data.config import DataConfig
from model.config import ModelConfig
from model.lora import DEFAULT_TARGETS as DEFAULT_LORA_TARGETS, TARGETS as LORA_TARGETS

from .layout import (PP_SCHEDULES, SPLIT_BACKWARD, V_SCHEDULES, resolve_ep, slot_kinds, stage_boundaries,
                     stages_per_rank, validate_layout)


class WandbMode(str, Enum):
    offline = "offline"
    online = "online"
    disabled = "disabled"


class Schedule(str, Enum):
    step = "step"      # the paper's warmup then x0.316 at 60% and 90% of training
    cosine = "cosine"
    constant = "constant"


class ConfigError(ValueError):
    """A setting that turns out wrong once the run is under way (e.g. a `trainer.trainable` pattern matching no
    parameter of the built model): reported as a config error like those found before start."""


class NonFiniteError(RuntimeError):
    """A non-finite loss or gradient norm with trainer.non_finite=stop, or too many skipped updates."""


class NonFinite(str, Enum):
    skip = "skip"      # drop the update, count it, go on
    stop = "stop"      # end the run on every rank with an error naming the step


def stop_if_non_finite(skipped: bool, step: int, loss: float, norm: float, policy: NonFinite) -> None:
    """With trainer.non_finite=stop, a skipped update ends the run (on every rank: the values are reduced)."""
    if skipped and policy == NonFinite.stop:
        raise NonFiniteError(f"step {step + 1}: non-finite loss ({loss}) or gradient norm ({norm}); no update was "
                             "applied (trainer.non_finite=stop)")


@dataclass
class OptimConfig:
    lr: float = 3e-3
    """Peak learning rate (the paper: 2.4e-4 for V2, 4.2e-4 for V2-Lite)."""
    betas: list[float] = field(default_factory=lambda: [0.9, 0.95])
    weight_decay: float = 0.1
    """Applied to matrices and embeddings; never to norms."""
    eps: float = 1e-8
    grad_clip: float = 1.0
    """Max global gradient norm (0 disables clipping)."""
    schedule: Schedule = Schedule.step
    warmup_steps: int = 20
    decay_at: list[float] = field(default_factory=lambda: [0.6, 0.9])
    """`step` schedule: fractions of max_steps where the LR is multiplied by `decay_factor`."""
    decay_factor: float = 0.316
    min_lr_ratio: float = 0.1
    """`cosine` schedule: final LR as a fraction of `lr`."""
    schedule_steps: int | None = None
    """Steps the LR schedule spans (its decay points, the cosine's end); null: trainer.max_steps."""
    schedule_resume: str = "stretch"
    """A resume that changes trainer.max_steps: `stretch` the schedule over the new max_steps, or `keep` the
    checkpoint's schedule (past its end the LR stays at the end value). Either way one line says what happens."""


@dataclass
class ParallelConfig:
    backend: str = "auto"
    """torch.distributed backend: auto (nccl on GPUs, gloo on CPU), nccl or gloo."""
    timeout_s: int = 600
    """Process-group timeout: a rank stuck this long in a collective ends the job instead of hanging it."""
    ep: int | None = None
    """Expert-parallel size: routed experts sharded over `ep` consecutive data-parallel ranks and replicated over
    dp / ep. Must divide the data-parallel size and model.n_routed_experts. Default (null): the largest size dividing
    both, and model.n_group under device-limited routing (1 turns expert parallelism off)."""
    cp: int = 1
    """Context parallelism (docs/parallelism.md, "Context parallelism"): each sequence split over `cp` consecutive
    data-parallel ranks, zigzag, MLA exchanging its latent. They count as data-parallel ranks for gradients and
    expert parallelism; the loader reads dp / cp different sequences at once. Built-in engine, MLA, pp=1."""
    pp: int = 1
    """Pipeline ranks (world = pp x dp), through the engine `pp_schedule` names (needs zero_stage 0 or 1; null picks
    1, the paper's ZeRO-1)."""
    pp_schedule: str = "deepspeed"
    """The pipeline engine and its schedule (pp > 1): `deepspeed` (DeepSpeed's PipelineEngine, 1F1B), or one of
    torch.distributed.pipelining's: `1f1b`, `interleaved_1f1b`, `zbv` (zero-bubble, two stages per rank in a V, as
    the paper trained V2), `interleaved_zb`, `dualpipev`. When to pick which: docs/parallelism.md, "Pipeline
    schedules"."""
    pp_stages_per_rank: int | None = None
    """Virtual stages per pipeline rank for interleaved_1f1b and interleaved_zb (null: 2); zbv and dualpipev hold
    exactly 2, 1f1b and deepspeed 1. The model is cut into pp x this many stages by `pp_partition`."""
    pp_partition: str = "parameters"
    """How layers are spread over pipeline stages: `parameters` (balanced by each rank's parameter count, experts
    counted per EP shard), `uniform` (equal numbers of pipeline layers) or `type:moe` (equal numbers of MoE
    layers)."""
    zero_stage: int | None = None
    """null: the built-in engine (plain data parallelism, exact gradient sums, no DeepSpeed). 0-3: DeepSpeed's engine
    with ZeRO at that stage (1: optimizer states, 2: + gradients, 3: + parameters partitioned over the data-parallel
    ranks; experts over their expert-data-parallel group). ZeRO-3 needs ep=1; pipeline needs 0 or 1."""
    deepspeed_config: str | None = None
    """Optional DeepSpeed JSON merged over the generated config (advanced keys: bucket sizes, offload, ...)."""
    world_size: int | None = None
    """Processes the layout is planned for. Default: the launched world. Set it for a dry run of a bigger job; a
    launched job whose world differs fails at once (a guard for multi-node launches)."""


@dataclass
class MoEConfig:
    capacity_factor: float | None = None
    """Device-level token dropping for training (paper §2.2.4), off when null: in each micro-batch, each routing
    group (the paper's device) keeps at most capacity_factor x (its share of the micro-batch's token copies), the
    highest-affinity ones (the paper: 1.0); see docs/model.md §5.5. Evaluation never drops."""
    no_drop_fraction: float = 0.1
    """Fraction of training sequences (chosen by a hash of their tokens) whose tokens are never dropped."""


@dataclass
class TrainerConfig:
    max_steps: int = 300
    micro_batch_size: int = 8
    """Sequences per data-parallel rank per forward/backward."""
    global_batch_size: int = 16
    """Sequences per optimizer step over all ranks; gradient accumulation = global / (micro x data-parallel ranks)."""
    batch_ramp_start: int | None = None
    """Optional batch-size ramp (the paper's 2304 -> 9216): global batch at step 0, growing linearly to
    `global_batch_size` over `batch_ramp_steps` (rounded down to a multiple of micro x ranks)."""
    batch_ramp_steps: int = 0
    seed: int = 1234
    log_every: int = 10
    val_every: int = 100
    """Validation loss and perplexity every this many steps (and at the end); 0 disables."""
    val_batches: int = 4
    """Micro-batches per rank in one validation pass (the same held-out batches every time)."""
    device: str = "auto"
    """auto (cuda:LOCAL_RANK if available, else cpu), cpu or cuda."""
    precision: str = "auto"
    """auto (bf16 autocast on GPUs, fp32 on CPU), fp32 or bf16."""
    non_finite: NonFinite = NonFinite.skip
    max_skipped_steps: int = 20
    """With non_finite=skip, stop once this many updates were skipped."""
    loss_spike_ratio: float = 2.0
    """Flag (in the log line and metrics.jsonl as `loss_spike`, never stopping) a step whose loss exceeds this
    multiple of the median of the last `loss_spike_window` steps; 0 disables."""
    loss_spike_window: int = 32
    peak_tflops: float | None = None
    """Hardware peak for MFU on GPUs; default from the device name (H100/H200: 989 bf16 dense)."""
    progress: bool = True
    """Show a progress bar with ETA on rank 0."""
    epochs: float | None = None
    """Train for this many passes over the training data instead of `max_steps` (SFT): the steps of one epoch are
    counted before training by reading the data once (the smallest count over data-parallel ranks), and
    max_steps = epochs x that (rounded down, at least 1) for the schedule and the progress."""
    trainable: list[str] | None = None
    """Partial fine-tuning: only parameters whose CausalLM name matches one of these regexes (re.search) train, the
    rest are frozen and kept out of the optimizer. Routed experts match per expert as
    `model.layers.<L>.mlp.experts.<E>`. null: everything trains."""
    activation_checkpointing: bool = False
    """Recompute each decoder layer in the backward pass instead of keeping its activations (long context)."""
    compile: bool | None = None
    """torch.compile each decoder layer (after activation checkpointing) and the loss (docs/performance.md).
    null: the measured default for the device (`trainer.compile.compile_default`)."""
    dry_run: bool = False
    """Print the resolved layout (pp/dp/ep/edp groups, experts per rank, layers per stage) and the per-rank memory
    estimate, then exit without starting training (no process group, nothing downloaded)."""


@dataclass
class ESFTConfig:
    """Expert-specialised fine-tuning (arXiv 2407.01906): train only the experts most relevant to the task data."""

    enabled: bool = False
    score: str = "gate"
    """`gate`: average gate score (router probability averaged over tokens); `token`: token selection ratio."""
    threshold: float = 0.2
    """Per layer, keep the top experts until their share of the layer's relevance reaches this (ESFT's p)."""
    sample_batches: int = 16
    """Micro-batches per data-parallel rank scored before training (from the start of the training data)."""
    plan_fraction: float = 0.15
    """Dry run only: fraction of routed experts assumed selected (the selection depends on the data)."""


@dataclass
class LoRAConfig:
    """LoRA (arXiv 2106.09685) on MLA, the MLPs and every routed expert: the base weights frozen and held once in the
    training dtype, only the adapters trained (docs/finetuning.md, "LoRA")."""

    enabled: bool = False
    rank: int = 16
    alpha: float = 32.0
    """The update is scaled by alpha / rank."""
    dropout: float = 0.0
    """Dropout on the adapters' input while training (the export says 0: it has no effect at inference)."""
    targets: list[str] = field(default_factory=lambda: list(DEFAULT_LORA_TARGETS))
    """Released module names: q_proj or q_a_proj / q_b_proj, kv_a_proj_with_mqa, kv_b_proj, o_proj; gate_proj,
    up_proj, down_proj of the dense and shared MLPs; `experts` (every routed expert); `gate` (the router)."""
    export_merged: bool = True
    """Also write the merged model to `<run dir>/hf` (the adapter goes to `<run dir>/adapter` either way)."""


ASYNC_SAVE_MIN_BYTES = 1 << 30
"""`checkpoint.async_save=null` saves in the background from this much checkpointed state per rank."""


@dataclass
class CheckpointConfig:
    dir: str = "${hydra:runtime.output_dir}/checkpoints"
    every: int = 100
    """Save every this many steps (and at the end); 0 saves only at the end."""
    resume: str = "auto"
    """`auto` (the newest complete checkpoint in `dir`, if any), `none`, or a checkpoint directory path."""
    keep: int = 3
    """Complete checkpoints kept; older ones are deleted (the newest complete one never is)."""
    export_hf: bool = True
    """Export the final model in Hugging Face format to `<run dir>/hf` at the end."""
    verify: bool = True
    """Check the checkpoint a run resumes from against its SHA-256 manifest (every file, the step, NaN/Inf in the
    stored tensors), the ranks sharing the hashing. `resume=auto` sets a failing checkpoint aside and takes the
    newest one that verifies; a named `resume=<path>` stops. false: for checkpoints written before manifests."""
    optimizer_resume: str = "strict"
    """Resuming under another engine or layout (ZeRO stage, pp, dp, ep): `strict` keeps the AdamW state, read from
    the checkpoint's per-entry optimizer files that every engine writes (a DeepSpeed checkpoint at its own layout
    restores from DeepSpeed's files instead); it refuses a DeepSpeed checkpoint written before those files existed,
    naming the missing file. `reset` loads the weights and step and starts the optimizer afresh."""
    async_save: bool | None = None
    """Save in the background (docs/checkpoints.md, "Background saves"): training stops only while this rank's
    state is copied to host memory (pinned on a GPU; the copy's size is logged and in the dry run), and a thread
    writes and commits it. null: on where it pays, a rank's training state of 1 GiB or more on the built-in and
    torch pipeline engines (smaller saves stall training for a second or two at most, and a synchronous save is
    committed the moment it returns); off under DeepSpeed, whose own checkpoint files DeepSpeed writes in the
    training thread (true is refused there)."""
    data_resume: str = "strict"
    """`strict` continues the data stream exactly where the checkpoint left it, at any number of processes whose
    data-parallel size divides the rows consumed so far (docs/data.md); `reset` loads weights, optimizer and step
    and restarts the data stream from its beginning (logged: documents already seen are seen again)."""


@dataclass
class LoggingConfig:
    wandb: WandbMode = WandbMode.offline
    """offline by default: nothing ever needs a network or an account."""
    project: str = "latentmoe"
    heatmap_every: int = 100
    """Log an expert-load heatmap image per MoE layer to wandb every this many steps."""


@dataclass
class EvalConfig:
    """Benchmark tasks through lm-evaluation-harness, from `launch/evaluate.py` and during training
    (docs/evaluation.md). Needs the `eval` extra: pip install -e ".[eval]"."""

    tasks: list[str] = field(default_factory=list)
    """lm-eval task names: `stdlib_docstrings` (built in, nothing to download), tasks of `include_path`, or lm-eval's
    own (hellaswag, arc_easy, mmlu, gsm8k, ...: their datasets come from the Hugging Face hub)."""
    every: int = 0
    """During training: run `tasks` on the live model every this many steps and at the end; 0: never."""
    at_start: bool = False
    """With `every`: also before the first step of a fresh run (the baseline of the figures)."""
    num_fewshot: int | None = None
    """Few-shot examples per prompt; null: each task's own default (0 where it sets none)."""
    limit: float | None = None
    """Documents per task: a count (>= 1) or a fraction (< 1); null: all."""
    batch_size: int = 16
    """Requests per forward on each data-parallel rank (length-sorted)."""
    include_path: str | None = None
    """A folder of task YAMLs (local and custom tasks, e.g. `dataset_path: json` over local files)."""
    log_samples: bool = False
    """Write lm-eval's per-sample records (`samples_<task>_<time>.jsonl`) into the run directory."""
    max_length: int | None = None
    """Longest sequence a request may use (longer contexts are cut on the left); null: the model's
    max_position_embeddings."""
    max_gen_toks: int = 256
    """Generation tasks: new tokens per request when the task sets no `max_gen_toks`."""
    bootstrap_iters: int = 1000
    """Bootstrap resamples for the standard errors of metrics without a closed form; 0 skips them."""


@dataclass
class TrainConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    moe: MoEConfig = field(default_factory=MoEConfig)
    esft: ESFTConfig = field(default_factory=ESFTConfig)
    lora: LoRAConfig = field(default_factory=LoRAConfig)
    trainer: TrainerConfig = field(default_factory=TrainerConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)

    def data_parallel_size(self, world_size: int) -> int:
        return world_size // max(1, self.parallel.pp)

    def expert_parallel_size(self, world_size: int) -> int:
        m = self.model
        if self.parallel.ep is None and self.parallel.zero_stage == 3:
            return 1  # ZeRO-3 partitions every parameter over data parallelism: experts are not sharded
        return resolve_ep(self.parallel.ep, self.data_parallel_size(world_size), m.n_routed_experts, m.n_group,
                          m.topk_method == "group_limited_greedy")

    @property
    def torch_pipeline(self) -> bool:
        """Pipeline stages on torch.distributed.pipelining (any `pp_schedule` but `deepspeed`)."""
        return self.parallel.pp > 1 and self.parallel.pp_schedule != "deepspeed"

    @property
    def uses_deepspeed(self) -> bool:
        return (self.parallel.zero_stage is not None or self.parallel.pp > 1) and not self.torch_pipeline

    def pipeline_stages(self) -> int:
        """Virtual stages the model is cut into: pp x stages per rank (1 without a pipeline)."""
        if self.parallel.pp <= 1:
            return 1
        return self.parallel.pp * stages_per_rank(self.parallel.pp_schedule, self.parallel.pp_stages_per_rank)

    def layout(self, world_size: int) -> dict:
        """What DeepSpeed's optimizer partitions depend on, recorded in every checkpoint (`pipeline`: the stage
        format, 2 since stages are cuts of CausalLM; DeepSpeed's state from older pipeline checkpoints does not
        load into them)."""
        pp = self.parallel.pp
        engine = "deepspeed" if self.uses_deepspeed else "pipelining" if self.torch_pipeline else "builtin"
        layout = {"engine": engine, "zero_stage": self.resolved_zero_stage(),
                  "pp": pp, "dp": world_size // pp, "ep": self.expert_parallel_size(world_size)}
        if self.torch_pipeline:
            layout["schedule"] = self.parallel.pp_schedule
        elif pp > 1:
            layout["pipeline"] = 2
        if self.parallel.cp > 1:
            layout["cp"] = self.parallel.cp
        return layout

    def resolved_zero_stage(self) -> int | None:
        """The ZeRO stage the run uses: the configured one, 1 for a pipeline left at null, None for the built-in
        engine."""
        if self.parallel.zero_stage is None and self.parallel.pp > 1:
            return 1
        return self.parallel.zero_stage

    def _validate_checkpoint(self) -> None:
        c = self.checkpoint
        if c.optimizer_resume not in ("strict", "reset"):
            raise ValueError(f"checkpoint.optimizer_resume={c.optimizer_resume!r}: allowed: strict, reset")
        if c.data_resume not in ("strict", "reset"):
            raise ValueError(f"checkpoint.data_resume={c.data_resume!r}: allowed: strict, reset")
        if c.async_save and self.uses_deepspeed:
            raise ValueError("checkpoint.async_save=True: DeepSpeed writes its own checkpoint files in the training "
                             "thread, so a background save would not stop it stalling training; use the built-in "
                             "engine (parallel.zero_stage=null) or a torch pipeline schedule, or "
                             "checkpoint.async_save=null")

    def _validate_context(self, world_size: int) -> None:
        """parallel.cp: what context parallelism runs with (docs/parallelism.md, "Context parallelism")."""
        cp, dp = self.parallel.cp, self.data_parallel_size(world_size)
        if cp < 1 or dp % cp:
            raise ValueError(f"parallel.cp={cp}: must be >= 1 and divide the data-parallel size {dp}")
        if cp == 1:
            return
        why = None
        if self.model.attention_type != "mla":
            why = (f"model.attention_type={self.model.attention_type}: context parallelism exchanges MLA's latent; "
                   "the MHA/GQA baselines have none (use attention_type=mla or parallel.cp=1)")
        elif self.parallel.pp > 1:
            why = ("context parallelism runs without a pipeline (parallel.pp=1): on the built-in engine or DeepSpeed "
                   "ZeRO (parallel.zero_stage), with expert parallelism and activation checkpointing for memory")
        elif self.data.seq_len % (2 * cp):
            why = (f"data.seq_len={self.data.seq_len} does not split into 2 x parallel.cp = {2 * cp} equal chunks "
                   f"(use a multiple of {2 * cp})")
        elif self.moe.capacity_factor is not None:
            why = ("moe.capacity_factor: token dropping decides per rank from the tokens it holds, which under "
                   "context parallelism are chunks of sequences; leave dropping off (null)")
        elif self.trainer.compile:
            why = "trainer.compile: the context-parallel attention runs eagerly; leave trainer.compile null or false"
        elif self.esft.enabled:
            why = "esft.enabled: expert scoring reads whole sequences on each rank; score without parallel.cp"
        if why:
            raise ValueError(f"parallel.cp={cp}: {why}")

    def _validate_engine(self, world_size: int) -> None:
        """The combinations DeepSpeed refuses, named with what to use instead."""
        par, stage, ep = self.parallel, self.resolved_zero_stage(), self.expert_parallel_size(world_size)
        if par.world_size is not None and par.world_size < 1:
            raise ValueError(f"parallel.world_size={par.world_size}: must be >= 1")
        if stage is not None and stage not in (0, 1, 2, 3):
            raise ValueError(f"parallel.zero_stage={stage}: allowed: null (built-in engine), 0, 1, 2, 3")
        self._validate_pipeline(world_size)
        if par.pp > 1 and stage not in (0, 1) and not self.torch_pipeline:
            raise ValueError(f"parallel.zero_stage={stage} with parallel.pp={par.pp}: DeepSpeed's pipeline engine "
                             "only supports ZeRO-0 and ZeRO-1 (it cannot partition gradients across micro-batches "
                             "in flight); use parallel.zero_stage=1, or parallel.pp=1 for ZeRO-2/3")
        if stage == 3 and ep > 1:
            raise ValueError(f"parallel.zero_stage=3 with parallel.ep={ep}: ZeRO-3 cannot partition expert-parallel "
                             "parameters; use parallel.ep=1 with ZeRO-3 (e.g. fine-tuning on a few GPUs), or "
                             "parallel.zero_stage=1/2 to keep expert parallelism")
        if self.trainer.compile and stage == 3:
            raise ValueError("trainer.compile=true with parallel.zero_stage=3: ZeRO-3 gathers each layer's weights "
                             "in hooks around it, which a compiled layer does not run; use trainer.compile=false "
                             "with ZeRO-3, or parallel.zero_stage=1/2")
        if stage is not None and self.trainer.batch_ramp_start is not None:
            raise ValueError(f"trainer.batch_ramp_start={self.trainer.batch_ramp_start} with the DeepSpeed engine "
                             f"(parallel.zero_stage={stage}): its accumulation boundaries follow a fixed number of "
                             "micro-batches per step; leave the ramp off, or use the built-in engine "
                             "(parallel.zero_stage=null, parallel.pp=1)")
        if (self.trainer.trainable is not None or self.esft.enabled) and par.pp > 1:
            raise ValueError("trainer.trainable / esft with parallel.pp > 1: partial fine-tuning is not supported "
                             "across pipeline stages yet; use parallel.pp=1")
        if (self.trainer.trainable is not None or self.esft.enabled) and stage in (1, 2) and ep > 1:
            raise ValueError(f"trainer.trainable / esft with parallel.zero_stage={stage} and parallel.ep={ep}: an "
                             "expert shard whose experts are all frozen would leave ZeRO's optimizer groups "
                             "unequal across ranks; use parallel.ep=1, parallel.zero_stage=0, or the built-in "
                             "engine (parallel.zero_stage=null)")
        if par.pp > 1 and self.model.num_hidden_layers < par.pp:
            raise ValueError(f"parallel.pp={par.pp}: more stages than model.num_hidden_layers="
                             f"{self.model.num_hidden_layers}")
        if par.pp_partition not in ("parameters", "uniform") and not par.pp_partition.startswith("type:"):
            raise ValueError(f"parallel.pp_partition={par.pp_partition!r}: allowed: parameters, uniform, type:moe, "
                             "type:<layer class regex>")
        if par.pp > 1 and ep > 1 and self.model.num_hidden_layers >= par.pp and not self.torch_pipeline:
            parts, kinds = stage_boundaries(self.model, par.pp, ep, par.pp_partition), slot_kinds(self.model)
            empty = [st for st in range(par.pp) if "moe_layer" not in kinds[parts[st]:parts[st + 1]]]
            if empty:
                raise ValueError(f"parallel.pp_partition={par.pp_partition}: pipeline stage {empty[0]} would hold no "
                                 f"MoE layer, which expert parallelism (parallel.ep={ep}) does not support; use "
                                 "parallel.pp_partition=type:moe, fewer stages, or parallel.ep=1")
        if par.deepspeed_config is not None:
            if stage is None or self.torch_pipeline:
                raise ValueError(f"parallel.deepspeed_config={par.deepspeed_config!r} needs the DeepSpeed engine: "
                                 "set parallel.zero_stage")
            if not os.path.isfile(os.path.expanduser(par.deepspeed_config)):
                raise ValueError(f"parallel.deepspeed_config={par.deepspeed_config!r}: no such file")

    def _validate_pipeline(self, world_size: int) -> None:
        """A `pp_schedule` the layout, the batch and the other settings allow, refused with what to use instead."""
        par, t = self.parallel, self.trainer
        if par.pp_schedule not in PP_SCHEDULES:
            raise ValueError(f"parallel.pp_schedule={par.pp_schedule!r}: allowed: {', '.join(PP_SCHEDULES)}")
        if par.pp_stages_per_rank is not None and par.pp_stages_per_rank < 1:
            raise ValueError(f"parallel.pp_stages_per_rank={par.pp_stages_per_rank}: must be >= 1")
        if not self.torch_pipeline:
            if par.pp_schedule != "deepspeed":
                raise ValueError(f"parallel.pp_schedule={par.pp_schedule} needs pipeline stages: set parallel.pp >= 2 "
                                 "(or leave parallel.pp_schedule=deepspeed)")
            return
        name, stage = par.pp_schedule, self.resolved_zero_stage()
        if stage not in (0, 1):
            raise ValueError(f"parallel.zero_stage={stage} with parallel.pp_schedule={name}: a pipeline keeps the "
                             "gradients of every micro-batch in flight whole, so only the optimizer states are "
                             "sharded; use parallel.zero_stage=1 (ZeRO-1) or 0, or parallel.pp=1 for ZeRO-2/3")
        if name in SPLIT_BACKWARD and t.compile:
            raise ValueError(f"trainer.compile=true with parallel.pp_schedule={name}: torch's split backward (input "
                             "gradients, then weight gradients) does not run through compiled modules; use "
                             "parallel.pp_schedule=interleaved_1f1b or 1f1b to compile, or trainer.compile=false")
        if t.batch_ramp_start is not None:
            raise ValueError(f"trainer.batch_ramp_start={t.batch_ramp_start} with parallel.pp_schedule={name}: the "
                             "schedule is built for a fixed number of micro-batches per step; leave the ramp off")
        per_rank = stages_per_rank(name, par.pp_stages_per_rank)
        if name in V_SCHEDULES and par.pp_stages_per_rank not in (None, 2):
            raise ValueError(f"parallel.pp_stages_per_rank={par.pp_stages_per_rank} with parallel.pp_schedule={name}"
                             ": a V schedule holds exactly 2 stages per rank; leave it null")
        n_stages, slots = par.pp * per_rank, self.model.num_hidden_layers + 2
        if n_stages > slots:
            raise ValueError(f"parallel.pp_schedule={name} with parallel.pp={par.pp}: {n_stages} stages ({per_rank} "
                             f"per rank), but the model has {slots} pipeline slots (embedding, "
                             f"{self.model.num_hidden_layers} layers, head); use fewer ranks "
                             f"(parallel.pp <= {slots // per_rank}), parallel.pp_schedule=1f1b, or "
                             "parallel.pp_schedule=deepspeed")
        micro = t.global_batch_size // max(1, t.micro_batch_size * self.data_parallel_size(world_size))
        from .schedules import problem as schedule_problem
        problem = schedule_problem(name, par.pp, per_rank, micro)
        if problem:
            raise ValueError(f"parallel.pp_schedule={name} with parallel.pp={par.pp} and {micro} micro-batches per "
                             f"step (trainer.global_batch_size / (micro_batch_size x data-parallel size)): {problem}")

    def _validate_esft(self) -> None:
        e = self.esft
        if not e.enabled:
            return
        if e.score not in ("gate", "token"):
            raise ValueError(f"esft.score={e.score!r}: allowed: gate, token")
        if not 0 < e.threshold <= 1:
            raise ValueError(f"esft.threshold={e.threshold}: must be in (0, 1]")
        if e.sample_batches < 1:
            raise ValueError(f"esft.sample_batches={e.sample_batches}: must be >= 1")
        if self.parallel.pp > 1:
            raise ValueError("esft.enabled with parallel.pp > 1: expert scoring runs the whole model in one stage; "
                             "use parallel.pp=1 (ESFT of V2-Lite fits one GPU)")
        if not self.model.n_routed_experts:
            raise ValueError("esft.enabled: the model has no routed experts")

    def _validate_lora(self) -> None:
        lo = self.lora
        if not lo.enabled:
            return
        if lo.rank < 1:
            raise ValueError(f"lora.rank={lo.rank}: must be >= 1")
        if lo.alpha <= 0:
            raise ValueError(f"lora.alpha={lo.alpha}: must be > 0")
        if not 0 <= lo.dropout < 1:
            raise ValueError(f"lora.dropout={lo.dropout}: must be in [0, 1)")
        unknown = [t for t in lo.targets if t not in LORA_TARGETS]
        if unknown or not lo.targets:
            raise ValueError(f"lora.targets: {f'unknown target {unknown[0]!r}' if unknown else 'empty'}; allowed: "
                             f"{', '.join(LORA_TARGETS)}")
        if self.esft.enabled:
            raise ValueError("lora.enabled with esft.enabled: ESFT trains the full weights of selected experts, LoRA "
                             "freezes every base weight and trains adapters; pick one (esft.enabled=false or "
                             "lora.enabled=false)")
        if self.trainer.trainable is not None:
            raise ValueError("lora.enabled with trainer.trainable: LoRA trains exactly its adapters; choose them with "
                             "lora.targets and drop trainer.trainable")
        if self.uses_deepspeed or self.torch_pipeline:
            raise ValueError("lora.enabled runs on the built-in engine (parallel.zero_stage=null, parallel.pp=1), "
                             "with expert parallelism (parallel.ep) if wanted: the frozen base needs no optimizer "
                             "state for ZeRO to partition, and LoRA of V2-Lite fits one 80 GB GPU")

    def _validate_eval(self) -> None:
        e = self.eval
        if e.every < 0:
            raise ValueError(f"eval.every={e.every}: must be >= 0 (0: no evaluation during training)")
        if e.every and not e.tasks:
            raise ValueError(f"eval.every={e.every}: name the tasks to run in eval.tasks, e.g. "
                             "eval.tasks=[stdlib_docstrings]")
        if e.batch_size < 1:
            raise ValueError(f"eval.batch_size={e.batch_size}: must be >= 1")
        if e.limit is not None and (e.limit <= 0 or (e.limit > 1 and e.limit != int(e.limit))):
            raise ValueError(f"eval.limit={e.limit}: a count of documents (>= 1) or a fraction in (0, 1)")
        if e.num_fewshot is not None and e.num_fewshot < 0:
            raise ValueError(f"eval.num_fewshot={e.num_fewshot}: must be >= 0")
        if e.include_path and not os.path.isdir(os.path.expanduser(e.include_path)):
            raise ValueError(f"eval.include_path={e.include_path}: no such directory (a folder of task YAMLs)")
        if e.max_length is not None and not 1 < e.max_length <= self.model.max_position_embeddings:
            raise ValueError(f"eval.max_length={e.max_length}: must be in [2, model.max_position_embeddings="
                             f"{self.model.max_position_embeddings}]")
        if e.max_gen_toks < 1:
            raise ValueError(f"eval.max_gen_toks={e.max_gen_toks}: must be >= 1")

    def validate(self, world_size: int = 1, planning: bool = False) -> None:
        """Checks across fields; raises ValueError naming the key and what is allowed. `planning` (the dry run):
        the files the run would read need not exist yet."""
        self.data.validate(require_paths=not planning)
        t, o = self.trainer, self.optim
        validate_layout(world_size, self.parallel.pp, self.expert_parallel_size(world_size),
                        self.model.n_routed_experts)
        self._validate_engine(world_size)
        if self.moe.capacity_factor is not None and self.moe.capacity_factor <= 0:
            raise ValueError(f"moe.capacity_factor={self.moe.capacity_factor}: must be > 0 (null turns dropping off)")
        if not 0.0 <= self.moe.no_drop_fraction <= 1.0:
            raise ValueError(f"moe.no_drop_fraction={self.moe.no_drop_fraction}: must be in [0, 1]")
        self._validate_esft()
        self._validate_lora()
        if self.trainer.epochs is not None and self.trainer.epochs <= 0:
            raise ValueError(f"trainer.epochs={self.trainer.epochs}: must be > 0 (or null to use max_steps)")
        if self.trainer.epochs is not None and self.data.mixture:
            raise ValueError("trainer.epochs counts passes over one corpus, which a mixture does not have: set "
                             "trainer.max_steps (a source's own `epochs` caps its passes)")
        if self.optim.schedule_resume not in ("stretch", "keep"):
            raise ValueError(f"optim.schedule_resume={self.optim.schedule_resume!r}: allowed: stretch, keep")
        if self.optim.schedule_steps is not None and self.optim.schedule_steps < 1:
            raise ValueError(f"optim.schedule_steps={self.optim.schedule_steps}: must be >= 1 (null: "
                             "trainer.max_steps)")
        self._validate_checkpoint()
        self._validate_context(world_size)
        world_size = self.data_parallel_size(world_size) // self.parallel.cp  # batch sizes count data ranks

        def bad(key: str, value, why: str) -> ValueError:
            return ValueError(f"{key}={value!r}: {why}")

        for key in ("max_steps", "micro_batch_size", "global_batch_size", "log_every", "val_batches"):
            if getattr(t, key) < 1:
                raise bad(f"trainer.{key}", getattr(t, key), "must be >= 1")
        per_step = t.micro_batch_size * world_size
        if t.global_batch_size % per_step:
            raise bad("trainer.global_batch_size", t.global_batch_size,
                      f"must be a multiple of trainer.micro_batch_size x data-parallel ranks = "
                      f"{t.micro_batch_size} x {world_size} = {per_step}")
        if t.batch_ramp_start is not None:
            if not per_step <= t.batch_ramp_start <= t.global_batch_size:
                raise bad("trainer.batch_ramp_start", t.batch_ramp_start,
                          f"must be in [{per_step}, trainer.global_batch_size={t.global_batch_size}]")
            if t.batch_ramp_steps < 1:
                raise bad("trainer.batch_ramp_steps", t.batch_ramp_steps, "must be >= 1 when ramping")
        if t.device not in ("auto", "cpu", "cuda") and not t.device.startswith("cuda:"):
            raise bad("trainer.device", t.device, "allowed: auto, cpu, cuda")
        if t.precision not in ("auto", "fp32", "bf16"):
            raise bad("trainer.precision", t.precision, "allowed: auto, fp32, bf16")
        if self.parallel.backend not in ("auto", "gloo", "nccl"):
            raise bad("parallel.backend", self.parallel.backend, "allowed: auto, gloo, nccl")
        if o.lr <= 0:
            raise bad("optim.lr", o.lr, "must be > 0")
        if len(o.betas) != 2 or not all(0 <= b < 1 for b in o.betas):
            raise bad("optim.betas", o.betas, "must be two numbers in [0, 1)")
        if sorted(o.decay_at) != list(o.decay_at) or not all(0 < f < 1 for f in o.decay_at):
            raise bad("optim.decay_at", o.decay_at, "must be increasing fractions in (0, 1)")
        if o.warmup_steps < 0 or o.grad_clip < 0 or o.weight_decay < 0:
            raise bad("optim.warmup_steps/grad_clip/weight_decay", (o.warmup_steps, o.grad_clip, o.weight_decay),
                      "must be >= 0")
        if t.val_every < 0:
            raise bad("trainer.val_every", t.val_every, "must be >= 0 (0 disables validation)")
        resume = self.checkpoint.resume
        if not planning and resume not in ("auto", "none") and not os.path.isdir(os.path.expanduser(resume)):
            raise bad("checkpoint.resume", resume, "allowed: auto, none, or an existing checkpoint directory")
        if not planning and self.data.tokenizer and not os.path.exists(os.path.expanduser(self.data.tokenizer)):
            raise bad("data.tokenizer", self.data.tokenizer, "no such file or directory")
        if self.checkpoint.keep < 1:
            raise bad("checkpoint.keep", self.checkpoint.keep, "must be >= 1")
        if self.checkpoint.every < 0:
            raise bad("checkpoint.every", self.checkpoint.every, "must be >= 0 (0: only at the end)")
        self._validate_eval()
        if self.data.seq_len > self.model.max_position_embeddings:
            raise bad("data.seq_len", self.data.seq_len,
                      f"exceeds model.max_position_embeddings={self.model.max_position_embeddings}")


def to_train_config(cfg: DictConfig | dict) -> TrainConfig:
    """The typed config (interpolations resolved, enums and nested dataclasses built, ModelConfig validated)."""
    if not isinstance(cfg, DictConfig):
        cfg = OmegaConf.merge(OmegaConf.structured(TrainConfig), cfg)
    _reject_unknown_keys(cfg, TrainConfig, "")
    return OmegaConf.to_object(cfg)


def _reject_unknown_keys(node: DictConfig, schema: type, prefix: str) -> None:
    """Hydra's `+key=value` appends even to typed nodes, and to_object would then drop the key silently."""
    fields = {f.name: f for f in dataclasses.fields(schema)}
    for key in node:
        if key not in fields:
            raise ValueError(f"{prefix}{key}: unknown key; allowed: {', '.join(sorted(fields))}")
        kind = fields[key].default_factory if fields[key].default_factory is not dataclasses.MISSING else None
        if dataclasses.is_dataclass(kind) and isinstance(node[key], DictConfig):
            _reject_unknown_keys(node[key], kind, f"{prefix}{key}.")


def config_dict(cfg: TrainConfig) -> dict:
    """The config as plain containers (enums as strings): what checkpoints, wandb and the rank broadcast carry."""
    return OmegaConf.to_container(OmegaConf.structured(cfg), resolve=True, enum_to_str=True)


def register_configs() -> None:
    """Register the schema Hydra composes `conf/` onto (conf/config.yaml lists it first in its defaults)."""
    from hydra.core.config_store import ConfigStore

    ConfigStore.instance().store(name="base_config", node=TrainConfig)
