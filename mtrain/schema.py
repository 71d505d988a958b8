"""The typed schema of every config group, stored in Hydra's ConfigStore on ``import mtrain``.

Hydra sets the struct flag, so a misspelled key or a wrong type under any group (model, rl, trainer, task, data,
logger) is refused at compose time with its name. Each ``conf/<group>/<option>.yaml`` starts from its schema
(``defaults: [/schema/<group>/<option>@_here_]``; a logger's at ``@<name>``); ``model`` schemas are made from the
model-family registry, so a new family gets its typed ``model.arch`` without an edit here.

**Defaults have one home: here.** A yaml of ``conf/`` sets only what its option changes from this schema
(``tests/test_config.py`` fails on a yaml value that restates the schema's, and on a runtime settings class whose
default disagrees with the field of the same name here).

**Choices.** A closed choice (``task.routing_replay``, ``task.rollout_correction.old_logprobs``,
``task.rollout_format``, ...) is a :class:`Choice` (an enum of strings): ``--cfg job``, tab completion and a bad
value at compose time know its values. A choice among registered pieces (``task.advantage``, ``task.loss``,
``task.loss_agg``, ``task.kl_estimator``, ``task.rollout_correction.mode``, ``task.reward``, ``task.engine``) is a
plain string, because a registry stays open (:mod:`mtrain.registry`: a name registered at runtime, or a dotted path,
must be selectable); the task's config check refuses an unknown name in one line listing the registered ones, before
Lightning is imported. Each such piece's own options go in one free-form node per kind (``task.advantage_args``,
``task.loss_args``, ``task.loss_agg_args``, ``task.kl_estimator_args``, ``task.rollout_correction.args``,
``task.reward_args``: :func:`options`), open to new keys from the command line without ``+``
(``task.loss_args.my_option=3``); the config check refuses a key the chosen piece does not take.
"""

from __future__ import annotations

import dataclasses
import enum
from dataclasses import dataclass, field, make_dataclass
from typing import Any, ClassVar, Dict, List, Optional

from hydra.core.config_store import ConfigStore
from omegaconf import MISSING, DictConfig, OmegaConf

from mtrain.data.config import DataConfig
from mtrain.data.rollout_formats import DTYPES as LAYOUT_DTYPES
from mtrain.data.rollout_formats import ENCODINGS, FORMATS, LAYER_SETS, ORDERS
from mtrain.models.registry import FAMILIES, ModelFamily
from mtrain.rl.choices import OLD_LOGPROBS, REPLAY_MODES


# -- choices --------------------------------------------------------------------------------------------------------
class Choice(str, enum.Enum):
    """A closed choice of the config: its members' names are their values (strings), so OmegaConf refuses any other
    value at compose time, and a member compares and prints as its string."""

    def __str__(self) -> str:
        return str(self.value)

    def __format__(self, spec: str) -> str:
        return format(str(self.value), spec)


def choice(name: str, values: tuple[str, ...]) -> type[Choice]:
    """A :class:`Choice` named ``name`` (importable as ``mtrain.schema.<name>``: a pickled config refers to it)."""
    made = Choice(name, {v: v for v in values}, module=__name__, qualname=name)  # type: ignore[call-overload]
    globals()[name] = made
    return made


ReplayMode = choice("ReplayMode", REPLAY_MODES)
OldLogprobs = choice("OldLogprobs", OLD_LOGPROBS)
RolloutFormat = choice("RolloutFormat", (*FORMATS, "custom"))
LayoutEncoding = choice("LayoutEncoding", ENCODINGS)
LayoutDtype = choice("LayoutDtype", LAYOUT_DTYPES)
LayoutLayers = choice("LayoutLayers", LAYER_SETS)
LayoutOrder = choice("LayoutOrder", ORDERS)
EvalSplit = choice("EvalSplit", ("auto", "val", "train"))
Device = choice("Device", ("auto", "cpu", "cuda"))

_OPEN = "mtrain_open"  # field metadata: a free-form node (struct off) for a piece's own options


def options() -> Any:
    """A field for one kind's free-form options node (``task.loss_args``, ...): any keys, set from the command line
    without ``+``; the config check refuses a key the chosen piece does not take."""
    return field(default_factory=dict, metadata={_OPEN: True})


# -- model ----------------------------------------------------------------------------------------------------------
@dataclass
class RoutingConfig:
    """``model.routing``: MoE load balancing and a frozen router (``mtrain.models.balance.BalanceSettings``); all off."""

    load_balancing: str = "none"  # none | aux (batch) | seq_aux (per sequence) | global_aux (counts over the DP group)
    aux_loss_coef: float = 1e-3  # weight of the load-balancing loss when load_balancing is not none (transformers')
    z_loss_coef: float = 0.0  # weight of the router z-loss (mean logsumexp(router logits)^2); 0 = off
    bias_update: bool = False  # aux-loss-free balancing: update the router's selection bias after each optimizer step
    bias_update_rate: float = 1e-3  # bias += rate * sign(mean load - load_i), per layer
    freeze_router: bool = False  # the router gate (and its bias) get no updates (SFT and GRPO)


@dataclass
class ModelConfig:
    name: str = MISSING  # a registered family: glm4_moe | qwen3_moe | ...
    checkpoint: Optional[str] = None  # null = random init; else a Hugging Face model folder
    dtype: Optional[str] = None  # float32 | bfloat16 | null (= follow trainer.precision)
    moe_gate_fp32: Optional[bool] = None  # null/interpolation = decided by mtrain.config.decide_precision()
    rope_fp32: Optional[bool] = None
    routing: RoutingConfig = field(default_factory=RoutingConfig)
    arch: Any = MISSING  # the family's config dataclass


_MODEL_SCHEMAS: dict[str, tuple[ModelFamily, type]] = {}


def model_schema(family: ModelFamily) -> type:
    """``ModelConfig`` with ``name`` fixed to the family and ``arch`` typed by its config dataclass (one class per
    registered family, made once)."""
    cached = _MODEL_SCHEMAS.get(family.name)
    if cached is not None and cached[0] is family:
        return cached[1]
    name = f"{family.config.__name__}Model"
    node = make_dataclass(
        name,
        [("name", str, family.name), ("arch", family.config, field(default_factory=family.config))],
        bases=(ModelConfig,),
    )
    # importable by name, as ``mtrain.schema.<name>``: a config pickled for another process (the submitit and
    # joblib launchers send each job's config) then refers to this class instead of carrying a copy of it
    node.__module__ = __name__
    globals()[name] = node
    _MODEL_SCHEMAS[family.name] = (family, node)
    return node


def __getattr__(name: str) -> type:
    """A model schema asked for by name (unpickling a config) before this process made it."""
    for node in model_schemas().values():
        if node.__name__ == name:
            return node
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


# -- rl, trainer ----------------------------------------------------------------------------------------------------
@dataclass
class RLConfig:
    mode: str = "auto"  # on | off | auto (= follow FD_ENABLE_RL)


@dataclass
class TrainerConfig:
    """Keyword arguments of ``lightning.Trainer``."""

    accelerator: str = "cpu"
    devices: Any = 1  # int, list of ints or "auto"
    num_nodes: int = 1
    strategy: str = "auto"  # a Lightning strategy name, or fsdp2 (trainer=fsdp: mtrain.parallel, ModelParallelStrategy)
    precision: str = "32-true"
    max_steps: int = 1200
    val_check_interval: Any = 300  # int: every N training batches; float: fraction of an epoch
    check_val_every_n_epoch: Optional[int] = None  # None: val_check_interval counts steps across epochs
    log_every_n_steps: int = 10
    gradient_clip_val: Optional[float] = 1.0
    accumulate_grad_batches: int = 1
    enable_progress_bar: bool = True
    profiler: Optional[str] = None  # "simple" (host seconds per loop action) or "advanced" (cProfile per action):
    # Lightning's profilers, written to <run dir>/fit-profile.txt at the end of the fit
    fsdp_reshard_after_forward: bool = True  # trainer=fsdp only (mtrain's, not a Trainer kwarg): free each layer's
    # gathered weights after its forward and gather them again for its backward; false keeps them until the backward
    # (one all-gather per layer a step instead of two: faster, one bf16 copy of the model more per GPU)


# -- tasks ----------------------------------------------------------------------------------------------------------
@dataclass
class TaskConfig:
    name: str = MISSING
    overwrite: bool = False  # allow a job in a run dir that holds another run's results (they are replaced)


@dataclass
class InfoTaskConfig(TaskConfig):
    name: str = "info"


@dataclass
class ModelTaskConfig(TaskConfig):
    """What every model-running task shares: speed settings and the greedy exact-match accuracy."""

    compile: bool = True  # torch.compile each decoder layer (CUDA only; CPU stays eager)
    peak_tflops: Optional[float] = None  # per-device peak for MFU; null = from the GPU's name (H100/H200 bf16: 989), 0 = no MFU
    accuracy: Optional[bool] = None  # exact-match accuracy of greedy answers on the val examples; null = synthetic data only
    max_accuracy_examples: int = 1000  # at most this many val examples are generated for
    gen_batch_size: int = 256  # prompts decoded together
    max_new_tokens: Optional[int] = None  # null: longest reference answer + 2


@dataclass
class OptimTaskConfig(ModelTaskConfig):
    """AdamW with linear warm-up and cosine decay; checkpoints and export (steps, clipping and accumulation come from
    ``trainer``)."""

    lr: float = 3e-3  # peak learning rate
    warmup_steps: int = 50  # linear warm-up from 0 to lr over these optimizer steps
    min_lr_ratio: float = 0.1  # cosine decay to lr * min_lr_ratio at trainer.max_steps
    weight_decay: float = 0.0  # AdamW decoupled decay on matrices only (never norms, biases, router bias)
    betas: List[float] = field(default_factory=lambda: [0.9, 0.95])
    eps: float = 1e-8
    ckpt_path: Optional[str] = None  # a Lightning .ckpt to resume from (weights, optimizer, scheduler, step, data
    # position); "auto": this run dir's checkpoints/last.ckpt if it exists (a requeued job continues), else fresh
    export: bool = True  # write <run dir>/hf_model (HF format + tokenizer) at the end


@dataclass
class SFTTaskConfig(OptimTaskConfig):
    """``task=sft``: supervised fine-tuning."""

    name: str = "sft"
    accuracy_before: bool = True  # also measure accuracy before training (the random/initial model)
    save_top_k: int = 1  # best checkpoints kept by val/loss (plus last.ckpt)
    checkpoint_every_n_steps: int = 100  # last.ckpt every N optimizer steps (and at the end, and on SIGTERM); 0 = end only
    checkpoints: bool = True  # false: no checkpoints at all (a throughput run, a sweep job nobody resumes)


@dataclass
class EvalTaskConfig(ModelTaskConfig):
    """``task=eval``: mean token loss / perplexity, tokens/s, optional per-token logprobs and accuracy."""

    name: str = "eval"
    split: EvalSplit = EvalSplit.auto  # auto (val if there is one, else train) | val | train
    max_batches: Optional[int] = None  # evaluate only the first N batches
    save_logprobs: bool = False  # write <run dir>/token_logprobs.jsonl (one line per row of each batch)


@dataclass
class MismatchTaskConfig(TaskConfig):
    """``task=mismatch``: rollout profile vs trainer profile on the same weights."""

    name: str = "mismatch"
    prompts_path: Optional[str] = None  # JSONL with {"prompt": ...} per line; null = the built-in task's val prompts
    num_prompts: int = 32
    max_new_tokens: int = 32
    temperature: float = 1.0
    top_p: float = 1.0
    seed: int = 0
    engine: str = "auto"  # the rollout engine: auto (= fast) | fast | recompute (the reference: a full forward a token)
    # | yours (package.module.Class)
    engine_args: Dict[str, Any] = options()  # the engine's own options (fast: graphs)
    exact: Optional[bool] = None  # the fast engine on batch-invariant kernels (its logprobs and experts equal the
    # trainer's recompute bit for bit); null: on under rl=on
    trainer_gate_fp32: bool = True  # the trainer profile's gate (Megatron: fp32)
    trainer_rope_fp32: Optional[bool] = None  # null: the run's decision (model.rope_fp32)
    device: Device = Device.auto  # auto | cpu | cuda
    dtype: Optional[str] = "bfloat16"  # what rollout engines run; null = model.dtype


@dataclass
class ExportTaskConfig(TaskConfig):
    """``task=export``: an HF checkpoint with the gate in the decided dtype."""

    name: str = "export"
    path: Optional[str] = None  # output folder; null = <run dir>/hf_model
    max_shard_size: str = "5GB"


@dataclass
class RolloutCorrectionConfig:
    """``task.rollout_correction``: IS weights / masks from the trainer's vs the engine's logprobs
    (mtrain.rl.corrections) and where the old policy comes from."""

    mode: str = "off"  # a registered correction: off | token_tis | token_mask (IcePop/MIS) | seq_tis | seq_mask |
    # geo_mask | k3_filter | yours (mtrain.rl.corrections.register_correction)
    old_logprobs: OldLogprobs = OldLogprobs.decoupled  # decoupled (trainer recompute + IS weight) | bypass (the
    # engine's logprobs, no recompute)
    cap: float = 2.0  # TIS truncation C; token_mask/seq_mask keep [lower, upper], default [1/C, C]
    lower: Optional[float] = None
    upper: Optional[float] = None
    geo_low: float = 0.999
    geo_high: float = 1.001
    k3_threshold: float = 0.01
    args: Dict[str, Any] = options()  # the mode's own options (a mode you registered)


@dataclass
class InjectMismatchConfig:
    """``task.inject_mismatch``: an engine stand-in; seeded noise on the engine's router / output logits only."""

    router_noise: float = 0.0  # std of Gaussian noise on each router logit (experts chosen from the noisy logits)
    logit_noise: float = 0.0  # std of Gaussian noise on each output logit (sampling and reported logprobs)


@dataclass
class RolloutLayoutConfig:
    """``task.rollout_layout``: fields of ``routed_experts``' layout in a rollout file that override the declared
    format's (mtrain.data.rollout_formats; null = the format's own)."""

    encoding: Optional[LayoutEncoding] = None  # list | base64 | npy
    dtype: Optional[LayoutDtype] = None  # int32 | int64 | uint8 | uint16 | by_experts (uint8 up to 256 experts,
    # else uint16)
    layers: Optional[LayoutLayers] = None  # all | moe
    order: Optional[LayoutOrder] = None  # positions_first | layers_first
    rows: Optional[str] = None  # seq_len-1 | padded (-1 rows after the routed positions; checked with the file)
    dense_zero: Optional[bool] = None  # layers=all: the dense layers' entries must read 0


@dataclass
class GRPOTaskConfig(OptimTaskConfig):
    """``task=grpo``: RL fine-tuning with group-relative advantages on the embedded rollout path. The defaults are a
    short CPU run of the tiny model that learns: a random-init model is first warm-started with SFT (its exact-match
    reward would stay 0), then ``trainer.max_steps`` RL steps (``conf/task/grpo.yaml`` sets them)."""

    name: str = "grpo"
    compile: bool = False  # not yet under GRPO: rollout widths change every step (recompiles)
    max_accuracy_examples: int = 200  # held-out prompts of the greedy accuracy (and the warm start's probe)
    lr: float = 3e-4
    warmup_steps: int = 10  # RL steps
    min_lr_ratio: float = 0.1  # cosine decay to lr * 0.1 at the last RL step
    betas: List[float] = field(default_factory=lambda: [0.9, 0.999])
    # rollouts: prompts_per_step x group_size responses per RL step (trainer.max_steps = RL steps)
    prompts_per_step: int = 64
    group_size: int = 8
    temperature: float = 1.0
    top_p: float = 1.0
    engine: str = "auto"  # a registered rollout engine: auto (= fast; file with rollouts_path) | fast | recompute
    # (the reference: the trainer's full forward per token, O(length^2)) | file | yours (package.module.Class)
    engine_args: Dict[str, Any] = options()  # the engine's own options (fast: graphs)
    exact: Optional[bool] = None  # the fast engine on batch-invariant kernels (its logprobs and experts equal the
    # trainer's recompute bit for bit); null: on under rl=on
    rollout_dtype: Optional[str] = None  # the engine's dtype; null = model.dtype
    # updates
    ppo_epochs: int = 1
    num_minibatches: int = 4  # optimizer steps per epoch (each on a shuffled slice of the step's responses)
    advantage: str = "grpo"  # a registered estimator: grpo | dr_grpo | rloo | reinforce (no baseline) | yours
    # (mtrain.rl.advantages.register_advantage)
    norm_adv_by_std: bool = True  # grpo: divide by the group's std
    advantage_args: Dict[str, Any] = options()  # the estimator's own options
    loss: str = "ppo"  # a registered policy loss: ppo (token ratio) | gspo (sequence ratio) | yours
    # (mtrain.rl.losses.register_policy_loss)
    clip_low: float = 0.2
    clip_high: float = 0.28  # clip-higher (DAPO); 0.2 = classic PPO
    dual_clip: Optional[float] = None  # e.g. 3.0: cap the loss of negative-advantage tokens at 3 |A|
    loss_args: Dict[str, Any] = options()  # the policy loss's own options
    loss_agg: str = "token-mean"  # a registered aggregation: token-mean | seq-mean-token-mean |
    # seq-mean-token-sum-norm (/ max_new_tokens) | yours (mtrain.rl.losses.register_loss_agg)
    loss_agg_args: Dict[str, Any] = options()
    kl_coef: float = 0.0  # > 0: KL to a frozen reference (the policy at the start of RL) is added; 0: none is built
    kl_estimator: str = "k3"  # a registered estimator: k1 | k2 | k3 | yours (register_kl_estimator)
    kl_estimator_args: Dict[str, Any] = options()
    # rewards and prompts
    reward: str = "exact"  # a registered reward: exact | numeric | yours (mtrain.data.rewards.register_reward), or
    # a dotted path package.module.function(prompt, response, example)
    reward_args: Dict[str, Any] = options()  # the reward's own options (keyword arguments after example)
    reward_fn: Optional[Any] = None  # a Hydra node {_target_: package.module.function, ...}; wins over `reward`
    prompts_path: Optional[str] = None  # JSONL {"prompt", "answer"}; null = the synthetic task of data=
    val_prompts_path: Optional[str] = None  # JSONL held out for accuracy (synthetic: its val split)
    warm_start_steps: Optional[int] = None  # SFT steps on data= before RL at most; null: a random-init model (no
    # model.checkpoint) is warm-started (mtrain.job.warm_start.AUTO_STEPS at most), a checkpoint is not; 0: none
    warm_start_lr: float = 1e-3
    warm_start_accuracy: Optional[float] = 0.35  # stop the warm start at the first check (every 10 steps) where
    # greedy exact match on max_accuracy_examples train prompts reaches it (constant lr, not annealed); null: run
    # all warm_start_steps
    # outputs
    eval_every: int = 20  # held-out greedy accuracy every N RL steps (and before/after)
    rollouts_every: int = 10  # append a sample of prompts/responses/rewards to rollouts.jsonl every N steps
    checkpoint_every_n_steps: int = 50  # RL steps between checkpoints (last.ckpt)
    checkpoints: bool = True  # false: no checkpoints at all (a throughput run nobody resumes)
    # MoE RL against a rollout engine (mtrain.rl.grpo, mtrain.rl.corrections, mtrain.data.rollouts)
    routing_replay: ReplayMode = ReplayMode.off  # off | r3 (updates use the rollout's experts) | r2 (the
    # old-policy recompute's experts)
    rollout_correction: RolloutCorrectionConfig = field(default_factory=RolloutCorrectionConfig)
    inject_mismatch: InjectMismatchConfig = field(default_factory=InjectMismatchConfig)
    rollouts_path: Optional[str] = None  # train on an external engine's rollouts (JSONL, mtrain.data.rollouts;
    # prompts_per_step x group_size lines a step)
    rollout_format: Optional[RolloutFormat] = None  # sglang | vllm | vllm_npy | fastdeploy | mtrain | custom; null:
    # the file's header line declares it (routed_experts are refused when nothing does)
    rollout_logprob_temperature: Optional[float] = None  # the temperature the file's logprobs were taken at; null:
    # the header's, else 1.0 (required for sglang/fastdeploy)
    rollout_layout: RolloutLayoutConfig = field(default_factory=RolloutLayoutConfig)  # docs/rollout-files.md
    dump_rollouts: bool = False  # write every step's full batch to rollout_batches.jsonl (the same format)


TASK_SCHEMAS: dict[str, type] = {
    "info": InfoTaskConfig,
    "sft": SFTTaskConfig,
    "eval": EvalTaskConfig,
    "mismatch": MismatchTaskConfig,
    "export": ExportTaskConfig,
    "grpo": GRPOTaskConfig,
}


# -- logger ---------------------------------------------------------------------------------------------------------
# ``logger=<name>`` or ``logger=[a,b]`` (mtrain.lit.loggers): each selected yaml of conf/logger/ puts its typed node
# under ``logger.<name>``. ``PACKAGES``: what it needs installed (any one of them), checked before the job starts.
@dataclass
class CSVLoggerConfig:
    """``<run dir>/csv/metrics.csv``: the step metrics (a resumed run continues the file)."""

    PACKAGES: ClassVar[tuple[str, ...]] = ()


@dataclass
class TensorBoardLoggerConfig:
    """``<run dir>/tensorboard/``: event files with the step and final metrics, the config and the plots."""

    PACKAGES: ClassVar[tuple[str, ...]] = ("tensorboard", "tensorboardX")


@dataclass
class WandbLoggerConfig:
    """Weights & Biases; its local files in ``<run dir>/wandb/`` (``WANDB_MODE=offline`` or ``offline: true``:
    nothing leaves the machine until ``wandb sync``)."""

    PACKAGES: ClassVar[tuple[str, ...]] = ("wandb",)
    project: str = "mtrain"
    entity: Optional[str] = None  # null: your default entity
    name: Optional[str] = None  # null: the run dir's name
    group: Optional[str] = None
    tags: List[str] = field(default_factory=list)
    offline: bool = False


@dataclass
class MLflowLoggerConfig:
    """MLflow tracking: the step and final metrics, the config as params, the plots as artifacts."""

    PACKAGES: ClassVar[tuple[str, ...]] = ("mlflow",)
    experiment_name: str = "mtrain"
    run_name: Optional[str] = None  # null: the run dir's name
    tracking_uri: Optional[str] = None  # null: $MLFLOW_TRACKING_URI, else MLflow's default (3.x: sqlite:///mlflow.db)
    tags: Dict[str, str] = field(default_factory=dict)


LOGGER_SCHEMAS: dict[str, type] = {
    "csv": CSVLoggerConfig,
    "tensorboard": TensorBoardLoggerConfig,
    "wandb": WandbLoggerConfig,
    "mlflow": MLflowLoggerConfig,
}


# -- root -----------------------------------------------------------------------------------------------------------
@dataclass
class MTrainConfig:
    model: ModelConfig = MISSING
    rl: RLConfig = field(default_factory=RLConfig)
    trainer: TrainerConfig = field(default_factory=TrainerConfig)
    task: Any = MISSING  # typed per task by its schema (first entry of the task yaml's defaults list)
    data: DataConfig = field(default_factory=DataConfig)
    logger: Dict[str, Any] = field(default_factory=dict)  # name -> its LOGGER_SCHEMAS node (logger=[csv,wandb])
    seed: int = 0


def model_schemas() -> dict[str, type]:
    return {name: model_schema(family) for name, family in FAMILIES.items()}


def structured(schema: type) -> DictConfig:
    """``OmegaConf.structured(schema)`` with the struct flag off on its free-form options nodes (:func:`options`),
    so the command line adds keys to them without ``+`` while every other node refuses unknown keys."""
    node = OmegaConf.structured(schema)
    _open_options(node, schema)
    return node


def _open_options(node: DictConfig, schema: type) -> None:
    for f in dataclasses.fields(schema):
        if f.metadata.get(_OPEN):
            OmegaConf.set_struct(node[f.name], False)
        elif isinstance(node.get(f.name), DictConfig) and dataclasses.is_dataclass(OmegaConf.get_type(node[f.name])):
            _open_options(node[f.name], OmegaConf.get_type(node[f.name]))


def register_schemas() -> None:
    """Store every schema in Hydra's ConfigStore (idempotent: storing again replaces)."""
    cs = ConfigStore.instance()
    cs.store(name="mtrain_schema", node=MTrainConfig)
    for name, node in model_schemas().items():
        cs.store(group="schema/model", name=name, node=node)
    for name, node in TASK_SCHEMAS.items():
        cs.store(group="schema/task", name=name, node=structured(node))
    for name, node in LOGGER_SCHEMAS.items():
        cs.store(group="schema/logger", name=name, node=node)
