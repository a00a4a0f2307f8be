"""Typed schema of the `model` config section (OmegaConf structured dataclasses).

The defaults are the official M2Restore network; `configs/model/*.yaml` override them.
Every improvement over the official code is a switch here whose default is the official behaviour.
"""
from dataclasses import dataclass, field
from typing import List, Mapping, Optional, Sequence

from omegaconf import OmegaConf

from m2r.config import choice, config_error, flatten, require

OFFICIAL_PROMPTS = ["hazy", "noisy", "raindrop", "rainy", "shadowed", "snowy"]
# The allowed values of the string keys, first the official one; the model code checks against the same.
COMBINE_MODES = ("log", "linear")
DISPATCH_MODES = ("auto", "sparse", "dense")
CLIP_KINDS = ("daclip", "openclip", "tiny")
INPUT_RANGES = ("minus_one_one", "zero_one")
SCAN_BACKENDS = ("auto", "torch", "mamba_ssm")
SCAN_MODES = ("raster", "bidirectional", "four_way")   # the orders of each: models/bottleneck.SCAN_ORDERS
AFLB_MASKS = ("official", "fixed")
DEPTHWISE_MODES = ("conv", "shifted")
CHECKPOINT_MODES = ("none", "bottleneck", "full_res", "levels_1_2", "all")   # train.activation_checkpointing
OFFICIAL_SUFFIXES = (".ckpt", ".pth", ".pt")   # official M2Restore checkpoints (torch pickles)
SIZE_MULTIPLE = 8   # input sides: three 2x downsamplings
MIN_SIZE = 16       # the task-prompt CondNet needs at least 9 px; 16 is the smallest multiple of 8


def require_input_side(key: str, side: int) -> None:
    """A training or validation crop the network takes as it is."""
    require(side % SIZE_MULTIPLE == 0 and side >= MIN_SIZE, key, side,
            f"must be a multiple of {SIZE_MULTIPLE} and at least {MIN_SIZE}")


@dataclass
class MoEConfig:
    num_experts: int = 6             # experts per DDER adapter
    top_k: int = 2                   # experts each pixel token is sent to
    ep_size: int = 1                 # expert-parallel group size; must divide num_experts
    expert_hidden_factor: float = 2.66  # expert MLP hidden width = int(factor * C)
    noisy_gating: bool = True        # Shazeer noise on router logits, training only
    clip_bias_init: float = 0.5      # initial beta of the CLIP router bias
    # Shazeer's load estimate (balance loss, training) from the logits the routing used, CLIP bias included;
    # false (official): from the logits without it, so the loss balances a routing that never ran.
    load_with_clip_bias: bool = False
    combine: str = choice(*COMBINE_MODES)  # "log" (official log-sum-exp quirk) | "linear"
    capacity_factor: float = 0.0     # 0 = no token dropped (official); >0 caps tokens per expert in training
    # The cap in evaluation (validation, export, inference). 0 keeps every token, so an image's output
    # does not depend on which other images share its batch.
    eval_capacity_factor: float = 0.0
    balance_loss_weight: float = 0.01  # weight of cv^2(importance) + cv^2(load), summed over levels
    # How tokens reach experts: "sparse" gathers each expert's tokens (memory ~ tokens * top_k; the only
    # mode for ep_size > 1); "dense" runs every expert on every token and masks by the gates (same result,
    # static shapes and no host sync, so it compiles whole; E / top_k times the expert FLOPs);
    # "auto" = dense when ep_size is 1.
    dispatch: str = choice(*DISPATCH_MODES)


@dataclass
class MambaConfig:
    d_state: int = 16
    d_conv: int = 4
    expand: int = 2
    scan: str = choice(*SCAN_MODES)  # "raster" (official) | "bidirectional" | "four_way"
    # Only matters under torch.autocast (benchmarks, evaluation with --precision bf16; the training engine's bf16
    # is DeepSpeed's bf16 weights, which every layer follows). False (official recipe): the Mamba layers
    # run in fp32 even under autocast. True: they follow it; the scan's state stays fp32 either way.
    autocast: bool = False


@dataclass
class ClipConfig:
    kind: str = choice(*CLIP_KINDS)  # "daclip" | "openclip" | "tiny"
    arch: str = "ViT-B-32"           # open_clip architecture name (or tiny config name)
    weights: Optional[str] = None    # local checkpoint file; required for daclip/openclip
    prompts: List[str] = field(default_factory=lambda: list(OFFICIAL_PROMPTS))
    normalize: bool = False          # apply CLIP mean/std (official: no)
    cache_text_features: bool = False  # encode prompts once (official: every forward)
    # on CUDA under fp16 autocast, as the official code (configs/model/m2restore.yaml); false (the default, which
    # configs written before this key ran): fp32 in training (the engine keeps the prior's weights fp32), the
    # caller's autocast in inference
    fp16_autocast: bool = False
    image_size: int = 224            # CLIP input resolution


@dataclass
class ModelConfig:
    dim: int = 48
    num_blocks: List[int] = field(default_factory=lambda: [4, 6, 6, 8])
    num_refinement_blocks: int = 4
    heads: List[int] = field(default_factory=lambda: [1, 2, 4, 8])
    ffn_expansion_factor: float = 2.66
    bias: bool = False
    prompt_dim: int = 256            # task-prompt dictionary width
    prompt_atoms: int = 32           # task-prompt dictionary size
    cond_channels: int = 64          # task-prompt CondNet width
    aflb_heads: int = 4
    aflb_mask: str = choice(*AFLB_MASKS)  # "official" (degenerate h//128 box) | "fixed"
    input_range: str = choice(*INPUT_RANGES)  # "minus_one_one" (official) | "zero_one" (true residual)
    scan_backend: str = choice(*SCAN_BACKENDS)  # "auto" | "torch" | "mamba_ssm"
    # 3x3 depthwise convolutions: "conv" (cuDNN) | "shifted" (nine shifted multiply-adds, same result;
    # for train.compile, which fuses them with their neighbours; slower eagerly)
    depthwise: str = choice(*DEPTHWISE_MODES)
    seed: int = 0                    # init seed; experts also use their global id
    moe: MoEConfig = field(default_factory=MoEConfig)
    mamba: MambaConfig = field(default_factory=MambaConfig)
    clip: ClipConfig = field(default_factory=ClipConfig)


# Keys that say how the network is run or trained, not what its weights compute: a checkpoint may be
# loaded into a run that sets them differently. Every other key changes the function.
RUNTIME_KEYS = frozenset({
    "scan_backend", "depthwise", "seed", "mamba.autocast", "clip.weights", "clip.cache_text_features",
    "clip.fp16_autocast",
    "moe.ep_size", "moe.dispatch", "moe.noisy_gating", "moe.capacity_factor", "moe.eval_capacity_factor",
    "moe.balance_loss_weight", "moe.clip_bias_init", "moe.load_with_clip_bias"})


def check_model_settings(model, prefix: str = "model.") -> None:
    """What the network needs of its keys together (one key's type and choices are the schema's): every
    entry point calls this while it checks its config, so a mistake stops it with one error naming the
    key, before any rank builds the network. `prefix`: how the caller's user writes the model keys
    (the inference tools take them bare: `--set heads=...`)."""
    blocks, heads, moe = list(model.num_blocks), list(model.heads), model.moe
    require(len(blocks) == 4 and min(blocks) >= 0, f"{prefix}num_blocks", blocks,
            "needs 4 counts >= 0: encoder levels 1-3 (mirrored by the decoder) and the bottleneck")
    require(len(heads) >= 3 and min(heads) > 0, f"{prefix}heads", heads,
            "needs a positive head count for each of the 3 attention levels")
    require(model.dim > 0, f"{prefix}dim", model.dim, "must be positive")
    _check_layer_sizes(model, prefix)
    widths = [model.dim * 2 ** level for level in range(4)]
    # (width, heads) of every attention: encoder levels 1-3; decoder level 1 and refinement at width 2*dim
    for width, count in ((widths[0], heads[0]), (widths[1], heads[0]), (widths[1], heads[1]), (widths[2], heads[2])):
        require(width % count == 0, f"{prefix}heads", heads,
                f"does not divide the attention widths: {width} channels (from {prefix}dim={model.dim}) "
                f"cannot split into {count} heads")
    require(model.aflb_heads > 0 and all(width % model.aflb_heads == 0 for width in widths[1:]),
            f"{prefix}aflb_heads", model.aflb_heads, f"must divide the AFLB widths {widths[1:]}")
    require(len(model.clip.prompts) > 0, f"{prefix}clip.prompts", list(model.clip.prompts), "must name at least one")
    require(moe.num_experts >= 1, f"{prefix}moe.num_experts", moe.num_experts, "must be positive")
    require(1 <= moe.top_k <= moe.num_experts, f"{prefix}moe.top_k", moe.top_k,
            f"must be in [1, {prefix}moe.num_experts={moe.num_experts}]")
    require(moe.ep_size >= 1 and moe.num_experts % moe.ep_size == 0, f"{prefix}moe.ep_size", moe.ep_size,
            f"must divide {prefix}moe.num_experts={moe.num_experts}")
    for key in ("capacity_factor", "eval_capacity_factor"):
        require(getattr(moe, key) >= 0, f"{prefix}moe.{key}", getattr(moe, key), "must be >= 0 (0: no token dropped)")
    require(moe.dispatch != "dense" or moe.ep_size == 1, f"{prefix}moe.dispatch", moe.dispatch,
            f"needs ep_size 1 ({prefix}moe.ep_size={moe.ep_size}): expert parallelism exchanges tokens sparsely "
            "('auto' picks that)")


def _check_layer_sizes(model, prefix: str) -> None:
    """Widths, counts and factors that size a layer: zero or negative ones crash deep inside torch once every
    rank has started (negative padding, a zero-width Linear) or silently drop a part of the network."""
    positive = {"prompt_dim": model.prompt_dim, "prompt_atoms": model.prompt_atoms,
                "mamba.d_state": model.mamba.d_state, "mamba.d_conv": model.mamba.d_conv,
                "mamba.expand": model.mamba.expand, "clip.image_size": model.clip.image_size}
    for key, value in positive.items():
        require(value > 0, f"{prefix}{key}", value, "must be positive")
    # the CondNet's last convolutions are cond_channels // 2 wide
    require(model.cond_channels >= 2, f"{prefix}cond_channels", model.cond_channels, "must be at least 2")
    require(model.num_refinement_blocks >= 0, f"{prefix}num_refinement_blocks", model.num_refinement_blocks,
            "must be >= 0")
    # hidden width = int(factor x channels); the narrowest layers have `dim` channels
    for key, factor in (("ffn_expansion_factor", model.ffn_expansion_factor),
                        ("moe.expert_hidden_factor", model.moe.expert_hidden_factor)):
        require(int(factor * model.dim) >= 1, f"{prefix}{key}", factor,
                f"gives no hidden channel at the {model.dim} channels of level 1 ({prefix}dim): "
                f"int({factor} x {model.dim}) must be at least 1")


def model_defaults() -> dict:
    """Every model key (dotted) with its default."""
    return flatten(OmegaConf.to_container(OmegaConf.structured(ModelConfig)))


def model_keys() -> List[str]:
    return list(model_defaults())


def network_differences(saved_model: Mapping, run_model, allowed: Sequence[str] = ()) -> List[str]:
    """'model.<key>: checkpoint <a>, this run <b>' for each key outside RUNTIME_KEYS and `allowed`
    where the run's network differs from the one whose weights were saved (a key the saved config
    lacks, written before the key existed, counts at its default)."""
    defaults, saved = model_defaults(), flatten(saved_model)
    differences = []
    for key, value in flatten(OmegaConf.to_container(run_model, resolve=True)).items():
        if key in RUNTIME_KEYS or key in allowed:
            continue
        before = saved.get(key, defaults.get(key))
        if before != value:
            differences.append(f"model.{key}: checkpoint {before!r}, this run {value!r}")
    return differences


def require_same_network(saved_model: Mapping, run_model, key: str, source: str, remedy: str,
                         allowed: Sequence[str] = ()) -> None:
    """Weights load strictly whenever the shapes match, also into a network that would compute
    something else with them (another input range, expert combine, mask...): refuse that here."""
    differences = network_differences(saved_model, run_model, allowed)
    if differences:
        raise config_error(key, f"{source} was saved from another network than this run's: "
                                f"{'; '.join(differences)}. {remedy}")
