"""Typed schemas of the pretraining and finetuning configs (`model`, `data`, `train`, `run`, and
finetuning's `init`) and the checks that need several keys.

`configs/pretrain/*.yaml` and `configs/finetune/*.yaml` override these defaults (and may mount a model
file with `_base_: [../model/tiny.yaml@model]`); `key=value` arguments override the file.
"""
import datetime
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import List, Optional

from omegaconf import OmegaConf

from m2r.config import choice, require
from m2r.data.config import DataConfig, check_data_settings
from m2r.data.shard_list import expand_braces
from m2r.engine.deepspeed_config import build_deepspeed_config
from m2r.models.config import (CHECKPOINT_MODES, OFFICIAL_SUFFIXES, ModelConfig, check_model_settings, model_keys,
                               require_input_side)


# The keys holding a path, in either run's config (run.resume is one process's, never read back from a saved config).
PATH_KEYS = ("data.shards", "data.val_shards", "data.root", "data.val_root", "data.list_file", "model.clip.weights",
             "init.weights", "run.dir")
SHARD_KEYS = ("data.shards", "data.val_shards")   # of PATH_KEYS, those that may be brace patterns (shard_list.py)
SEED_LIMIT = 2 ** 32   # train.seed, and with data.seed_offset the data's: see check_seed
PIXEL_LOSSES = ("l1", "charbonnier")   # train.loss; m2r/engine/loss.py computes each
PRECISIONS = ("fp32", "bf16", "fp16")  # train.precision; m2r/engine/run.py has their dtypes
COMPILE_BACKENDS = ("inductor", "aot_eager", "eager")   # train.compile_backend, the default first
FINETUNE_DATASETS = ("allweather", "cdd11", "folder")   # data.dataset; m2r/eval/datasets.py reads each


@dataclass
class TrainSettings:
    """The `train` keys pretraining and finetuning share (finetuning counts its schedule in epochs)."""
    micro_batch: int = 4             # images per GPU per forward pass
    grad_accum: int = 1              # forward passes per optimizer step
    crop: int = 224                  # training crop side (multiple of 8, at least 16)
    lr: float = 2e-4                 # peak learning rate
    min_lr: float = 0.0              # cosine floor
    weight_decay: float = 0.01       # AdamW, torch default as in the official code
    betas: List[float] = field(default_factory=lambda: [0.9, 0.999])
    eps: float = 1e-8
    grad_clip: float = 0.0           # max global grad norm; 0 disables clipping
    precision: str = choice(*PRECISIONS)  # fp32 | bf16 | fp16 (dynamic loss scaling, GPU only)
    zero_stage: int = 1              # 0, 1 or 2; native DeepSpeed MoE cannot use stage 3
    loss: str = choice(*PIXEL_LOSSES)  # l1 (official) | charbonnier: m2r/engine/loss.py
    charbonnier_eps: float = 1e-3
    # modes: M2Restore.set_activation_checkpointing; auto: bottleneck on a GPU, none on a CPU (_checkpointing_mode
    # in m2r/engine/run.py)
    activation_checkpointing: str = choice(*CHECKPOINT_MODES, "auto")
    channels_last: bool = False      # NHWC feature maps (faster bf16 convolutions on GPU)
    compile: bool = False            # torch.compile the training forward (static shapes; first steps compile)
    compile_backend: str = choice(*COMPILE_BACKENDS)  # aot_eager/eager: to debug a failing compile
    # cuDNN times its convolution algorithms once per input shape and keeps the fastest: the training
    # crop is fixed, validation adds one more shape. Off: cuDNN's heuristic choice (torch's default).
    cudnn_benchmark: bool = True
    # fp32 matrix products on tensor cores (TF32: 10-bit mantissa), as torch already does for fp32
    # convolutions; the official fp32 recipe runs 1.23x faster with it on an H100 (468 -> 382 ms/step).
    tf32_matmul: bool = False
    ema_decay: float = 0.0           # EMA of the weights every step; 0 disables it
    seed: int = 42                   # data, noise and RNG seed (model init uses model.seed)


@dataclass
class TrainConfig(TrainSettings):
    steps: int = 1000                # optimizer steps in the whole run
    warmup_steps: int = 0            # linear warmup from 0, then cosine to min_lr; stepped per iteration


@dataclass
class RunOutputConfig:
    """What pretraining and finetuning runs share: where they write, how they resume and report."""
    dir: str = "runs/default"        # checkpoints, TensorBoard, config.yaml, metrics.jsonl
    resume: str = "latest"           # latest | none | <checkpoint dir or tag dir>
    keep_last: int = 2               # checkpoints kept (>= 2: see CheckpointManager._publish)
    log_every: int = 10              # optimizer steps between console lines and TensorBoard scalars
    progress_bar: bool = True        # tqdm bar when stdout is a terminal
    tensorboard: bool = True         # TensorBoard event files under run.dir/tensorboard (metrics.jsonl always)
    stop_after_steps: int = 0        # leave after this many steps in this process (checkpoint first); 0 = never
    # How long a rank waits in a collective before the job fails (NCCL's watchdog, gloo): longer than a
    # first compiled step or a checkpoint save on a slow filesystem, short enough to free a hung job.
    collective_timeout_minutes: int = 30


@dataclass
class RunConfig(RunOutputConfig):
    save_every: int = 1000           # steps between checkpoints (also at the end and on SIGTERM/SIGUSR1)
    image_every: int = 500           # steps between degraded | restored | clean image grids; 0 disables
    val_every: int = 1000            # steps between validations (also before the first and after the last)
    demo_summary: bool = False       # print "demo: val PSNR before <a> dB, after <b> dB" at the end


@dataclass
class PretrainConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    run: RunConfig = field(default_factory=RunConfig)


def validate_pretrain_config(cfg, world_size: int) -> None:
    """Checks that need several keys or the world size; single-key types are checked by the schema."""
    train, run = cfg.train, cfg.run
    require_input_side("train.crop", train.crop)
    require(train.steps > 0 and train.micro_batch > 0 and train.grad_accum > 0,
            "train.steps/micro_batch/grad_accum", (train.steps, train.micro_batch, train.grad_accum),
            "must all be positive")
    require(0 <= train.warmup_steps < train.steps, "train.warmup_steps", train.warmup_steps,
            f"must be >= 0 and below train.steps ({train.steps}), the schedule's length, or the learning rate never "
            "leaves its warmup (for a short run of a recipe keep train.steps and set run.stop_after_steps)")
    check_optimizer_settings(train)
    check_run_output_settings(run)
    require(run.save_every > 0 and run.val_every > 0, "run.save_every/val_every", (run.save_every, run.val_every),
            "must both be positive")
    check_loader_settings(cfg.data)
    check_data_settings(cfg.data)
    check_seed("train.seed", train.seed, train.seed)
    check_seed("data.seed_offset", cfg.data.seed_offset, train.seed + cfg.data.seed_offset)   # the data's seed
    require(run.image_every >= 0, "run.image_every", run.image_every, "must be >= 0 (0: no image grids)")
    check_network_for_world(cfg.model, world_size)


def check_seed(key: str, value: int, seed: int) -> None:
    """`key`'s `value` gives `seed`: one numpy's generators take (they refuse negative ones) and torch's take
    once multiplied per rank and step (m2r.engine.rng.rank_seed). Else the run fails at its first batch,
    after the whole start-up."""
    made = "" if seed == value else f"gives the seed {seed}, which "
    require(0 <= seed < SEED_LIMIT, key, value, f"{made}must be in [0, 2**32)")


def collective_timeout(run) -> datetime.timedelta:
    """`run.collective_timeout_minutes`, checked (before the process group starts, so before the other checks)."""
    require(run.collective_timeout_minutes > 0, "run.collective_timeout_minutes", run.collective_timeout_minutes,
            "must be positive")
    return datetime.timedelta(minutes=run.collective_timeout_minutes)


def check_run_output_settings(run) -> None:
    """The `run` keys pretraining and finetuning share, beyond their types."""
    require(run.keep_last >= 2, "run.keep_last", run.keep_last,
            "must be >= 2 (a crash while a step is saved again leaves only the older checkpoints)")
    require(run.log_every > 0, "run.log_every", run.log_every, "must be positive")
    # a negative limit counts as reached at once: the run would leave with status 0 having trained nothing
    for key in ("stop_after_steps", "stop_after_epochs"):
        if key in run:   # stop_after_epochs: finetuning only
            require(run[key] >= 0, f"run.{key}", run[key], "must be >= 0 (0: never)")


def check_loader_settings(data) -> None:
    """The `data` keys pretraining and finetuning share, beyond their types."""
    require(data.workers >= 0, "data.workers", data.workers, "must be >= 0 (0: load in the training process)")
    require(data.val_batch_size > 0, "data.val_batch_size", data.val_batch_size, "must be positive")


def check_optimizer_settings(train) -> None:
    """The `train` keys pretraining and finetuning share, beyond their types."""
    build_deepspeed_config(train, world_size=1)   # refuses what DeepSpeed cannot do (ZeRO stage, precision)
    require(train.lr > 0 and 0 <= train.min_lr <= train.lr, "train.lr/min_lr", (train.lr, train.min_lr),
            "must satisfy 0 < lr and 0 <= min_lr <= lr")
    require(train.weight_decay >= 0 and train.grad_clip >= 0 and train.eps > 0,
            "train.weight_decay/grad_clip/eps", (train.weight_decay, train.grad_clip, train.eps),
            "must be >= 0, >= 0 (0: no clipping) and > 0")
    require(len(train.betas) == 2 and all(0 <= beta < 1 for beta in train.betas), "train.betas", list(train.betas),
            "must be two values in [0, 1)")
    require(0.0 <= train.ema_decay < 1.0, "train.ema_decay", train.ema_decay, "must be in [0, 1)")
    # sqrt(d^2 + eps^2) has no gradient where d = 0 when eps is 0
    require(train.charbonnier_eps > 0, "train.charbonnier_eps", train.charbonnier_eps, "must be positive")
    # the backend only applies to a compiled forward: set alone, the eager run would look like the debugged one
    require(train.compile or train.compile_backend == COMPILE_BACKENDS[0], "train.compile_backend",
            train.compile_backend, f"is used only by train.compile=true (here false): set train.compile=true to "
            f"compile with it, or leave train.compile_backend at its default ({COMPILE_BACKENDS[0]})")


def check_network_for_world(model, world_size: int) -> None:
    """The model keys together, and ep_size dividing the world size."""
    check_model_settings(model)
    # a training-only key (a stored network is not refused for it): negative weights reward imbalance
    require(model.moe.balance_loss_weight >= 0, "model.moe.balance_loss_weight", model.moe.balance_loss_weight,
            "must be >= 0 (0: no balance loss)")
    require(world_size % model.moe.ep_size == 0, "model.moe.ep_size", model.moe.ep_size,
            f"must divide the world size {world_size}")


@dataclass
class FinetuneDataConfig:
    dataset: str = choice(*FINETUNE_DATASETS)  # layouts: m2r/eval/datasets.py (DATASETS)
    root: str = ""                   # dataset root; layouts in m2r/eval/datasets.py
    # training list (AllWeather, folder): one input name or path a line; None = AllWeather's found under root, if
    # any (a folder's is never looked for): m2r/eval/datasets.py
    list_file: Optional[str] = None
    val_root: Optional[str] = None   # root of the validation sets; None = root
    # AllWeather test sets / CDD-11 types / a folder's set subfolders (m2r/eval/datasets.py); empty = all
    val_sets: List[str] = field(default_factory=list)
    val_images_per_set: int = 4      # first N images of each validation set
    val_crop: int = 256              # validation centre crop (multiple of 8, at least 16; same shape on every rank)
    val_batch_size: int = 4
    workers: int = 2                 # DataLoader workers per rank
    augment: bool = False            # random flip + rot90 of training crops (official: off)


@dataclass
class FinetuneTrainConfig(TrainSettings):
    epochs: int = 200
    warmup_epochs: int = 15
    schedule_epochs: int = 0         # the cosine reaches min_lr here (and goes on past it); 0 = epochs
    activation_checkpointing: str = choice("auto", *CHECKPOINT_MODES)   # finetuning's default: auto


@dataclass
class InitConfig:
    # pretraining checkpoint dir | .safetensors | official .ckpt/.pth/.pt; None = scratch
    weights: Optional[str] = None
    # Model keys (e.g. [clip.prompts]) this run may set otherwise than the network the weights were
    # saved from; any other difference that changes what the weights compute stops the run.
    allow_model_changes: List[str] = field(default_factory=list)
    # With a pretraining checkpoint directory as init.weights: start from its EMA weights (train.ema_decay > 0 in
    # that run; what its validation scored) instead of its trained weights.
    use_ema: bool = False


@dataclass
class FinetuneRunConfig(RunOutputConfig):
    dir: str = "runs/finetune"       # checkpoints are saved every epoch
    best_metrics: List[str] = field(default_factory=lambda: ["psnr", "ssim"])
    stop_after_epochs: int = 0       # leave after this many epochs in this process; 0 = never


@dataclass
class FinetuneConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    data: FinetuneDataConfig = field(default_factory=FinetuneDataConfig)
    train: FinetuneTrainConfig = field(default_factory=FinetuneTrainConfig)
    init: InitConfig = field(default_factory=InitConfig)
    run: FinetuneRunConfig = field(default_factory=FinetuneRunConfig)


# How far past its end (in decay lengths) the finetune cosine may go: to 1.5 its LR is back at mid-height.
MOST_PAST_SCHEDULE = 1.5


def validate_finetune_config(cfg, world_size: int) -> None:
    train, data, run = cfg.train, cfg.data, cfg.run
    require(bool(data.root), "data.root", data.root, "must name the dataset root")
    require(train.epochs > 0 and train.micro_batch > 0 and train.grad_accum > 0,
            "train.epochs/micro_batch/grad_accum", (train.epochs, train.micro_batch, train.grad_accum),
            "must all be positive")
    require(0 <= train.warmup_epochs < max(train.epochs, train.schedule_epochs), "train.warmup_epochs",
            train.warmup_epochs, f"must be >= 0 and below the schedule's length (train.epochs {train.epochs}, "
            f"train.schedule_epochs {train.schedule_epochs})")
    if train.schedule_epochs:   # past it the cosine goes on, rising again (the official recipe: 200 of 180)
        most = int(train.warmup_epochs + MOST_PAST_SCHEDULE * (train.schedule_epochs - train.warmup_epochs))
        require(train.epochs <= most, "train.epochs", train.epochs,
                f"runs so far past train.schedule_epochs={train.schedule_epochs} that the cosine, which goes on "
                f"past it as the official schedule's does, climbs back over halfway to train.lr: at most {most}")
    require_input_side("train.crop", train.crop)
    require_input_side("data.val_crop", data.val_crop)
    check_optimizer_settings(train)
    check_loader_settings(data)
    require(data.val_images_per_set > 0, "data.val_images_per_set", data.val_images_per_set, "must be positive")
    require(not (data.dataset == "cdd11" and data.list_file is not None), "data.list_file", data.list_file,
            "selects AllWeather or folder training images; CDD-11 trains on every image of train/<type>: "
            "unset it (data.list_file=null)")
    check_run_output_settings(run)
    require(set(run.best_metrics) <= {"psnr", "ssim"}, "run.best_metrics", list(run.best_metrics),
            "may only hold psnr and ssim")
    check_network_for_world(cfg.model, world_size)
    check_init_weights_kind(cfg.init.weights)
    check_init_ema(cfg.init)
    check_seed("train.seed", train.seed, train.seed)
    unknown = sorted(set(allowed_model_changes(cfg.init)) - set(model_keys()))
    require(not unknown, "init.allow_model_changes", unknown, f"must be keys of the model section: {model_keys()}")


def check_init_weights_kind(weights: Optional[str]) -> None:
    """A file given as init.weights is of a kind finetuning loads. Whether it exists is checked when it is
    loaded: a resumed run does not load it (its pretraining checkpoints may be gone by then)."""
    if weights and Path(weights).is_file():
        require(Path(weights).suffix in (".safetensors", *OFFICIAL_SUFFIXES), "init.weights", weights,
                f"must be a pretraining run's checkpoint directory, a .safetensors file (m2r.export) or an official "
                f"checkpoint ({', '.join(OFFICIAL_SUFFIXES)})")


def check_init_ema(init) -> None:
    """init.use_ema picks the EMA of a pretraining checkpoint directory: a file holds one set of weights."""
    if not init.use_ema:
        return
    require(bool(init.weights), "init.use_ema", True, "needs init.weights: a pretraining checkpoint directory")
    require(not Path(init.weights).is_file(), "init.use_ema", True,
            f"applies to a pretraining checkpoint directory; init.weights={init.weights} is a file, whose weights "
            "load as they are (m2r.export --ema writes a checkpoint's EMA to a file): set init.use_ema=false")


def allowed_model_changes(init) -> List[str]:
    return [key.removeprefix("model.") for key in init.allow_model_changes]


def with_absolute_paths(cfg):
    """`cfg` (a config or the plain mapping of one) resolved, as a DictConfig, its PATH_KEYS that are relative made
    absolute against this process's working directory, as a run saves its config.yaml: `m2r.evaluate`, `m2r.export`
    and finetuning's init.weights read a checkpoint's config.yaml from any directory, where a relative
    data.val_shards or model.clip.weights would name another file."""
    absolute = OmegaConf.create(OmegaConf.to_container(cfg, resolve=True) if OmegaConf.is_config(cfg) else cfg)
    for key in PATH_KEYS:
        value = OmegaConf.select(absolute, key)
        if isinstance(value, str) and value:
            OmegaConf.update(absolute, key, absolute_pattern(value) if key in SHARD_KEYS else os.path.abspath(value))
    return absolute


def absolute_pattern(pattern: str) -> str:
    """A shard directory, .tar file or brace pattern made absolute, naming the same files. A pattern whose
    alternatives are absolute already (`{/disk1/a.tar,/disk2/b.tar}`) stays as given: a prefix would move them under
    this process's working directory. Of a relative pattern, only the folders before its first brace are normalized:
    `{a,b}/../c.tar` would fold into one path."""
    if any(os.path.isabs(path) for path in expand_braces(pattern)):
        return pattern
    if "{" not in pattern:
        return os.path.abspath(pattern)
    head, slash, _ = pattern[:pattern.index("{")].rpartition("/")
    return os.path.join(os.path.abspath(head or "."), pattern[len(head + slash):])
