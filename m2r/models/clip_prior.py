"""The frozen CLIP degradation prior of M2Restore: DA-CLIP rebuilt on stock open_clip.

DA-CLIP ships as a fork of open_clip. Its model is a CLIP plus a copy of the vision tower (the
controller) with one zero-initialised Linear per transformer block; the controller's block outputs,
passed through those Linears, are added to the frozen main tower in reverse block order. The
controller's own embedding describes the degradation, the main tower's the content. `DaCLIP` keeps
the fork's state-dict layout, so its released checkpoints load strictly.

`CLIPPrior` is what the network calls. Official behaviour, kept on purpose:
- the network input (in [-1, 1] by default) is fed to CLIP without CLIP's mean/std
  (`model.clip.normalize` switches the normalisation on);
- the prompts' text features are re-encoded on every forward (`model.clip.cache_text_features`
  encodes them once and frees the text tower);
- degradation probabilities are softmax(100 * cos(degradation features, text features)).
"""
from __future__ import annotations

import contextlib
import copy
import os
from pathlib import Path
from typing import Dict, List, Tuple

import torch
import torch.nn.functional as F
from torch import nn

from m2r.config import ConfigError, config_error
from m2r.models.config import CLIP_KINDS, INPUT_RANGES
from m2r.models.weights_io import load_weights_file, unwrap_state_dict

# Weights only ever come from local files: without this a hub lookup retries for about 46 s.
# huggingface_hub reads the variable when open_clip first imports it.
os.environ["HF_HUB_OFFLINE"] = "1"
import open_clip  # noqa: E402
from open_clip.constants import OPENAI_DATASET_MEAN, OPENAI_DATASET_STD  # noqa: E402
from open_clip.transformer import VisionTransformer  # noqa: E402

COSINE_SCALE = 100.0      # official temperature of the prompt softmax
TINY_SEED = 0             # the tiny CLIP is random but identical in every process
TINY_PATCH_SIZE = 8


def _config_error(key: str, message: str) -> ConfigError:
    return config_error(f"model.clip.{key}", message)


# ----------------------------------------------------------------------------- DA-CLIP layout

def _zero_initialised(layer: nn.Linear) -> nn.Linear:
    with torch.no_grad():
        for param in layer.parameters():
            param.zero_()
    return layer


class ControlTransformer(nn.Module):
    """The controller's transformer: the copied blocks (`transformer`) and one zero-initialised
    Linear(width, width) per block (`zero_modules`), whose outputs are the control signals."""

    def __init__(self, transformer: nn.Module):
        super().__init__()
        self.transformer = transformer
        width = transformer.width
        self.zero_modules = nn.ModuleList(
            _zero_initialised(nn.Linear(width, width)) for _ in transformer.resblocks)

    def forward(self, tokens: torch.Tensor) -> Tuple[torch.Tensor, List[torch.Tensor]]:
        """-> (the controller's final tokens, one control signal per block, first block first)."""
        controls = []
        for block, zero_linear in zip(self.transformer.resblocks, self.zero_modules):
            tokens = block(tokens)
            controls.append(zero_linear(tokens))
        return tokens, controls


def _check_vision_tower(tower: nn.Module) -> None:
    """DaCLIP drives the tower block by block; only the plain CLS-token ViT is supported."""
    supported = (isinstance(tower, VisionTransformer) and tower.attn_pool is None
                 and getattr(tower, "pool_type", None) == "tok"
                 and getattr(tower.transformer, "batch_first", False))
    if not supported:
        raise _config_error("arch", "DA-CLIP needs a CLS-token ViT vision tower (batch-first "
                                    "open_clip >= 2.24 VisionTransformer without attentional pooling)")


def _embed_patches(tower: VisionTransformer, image: torch.Tensor) -> torch.Tensor:
    """The tokens entering the tower's first block: patches, class token, positions, ln_pre."""
    patches = tower.conv1(image).flatten(2).transpose(1, 2)  # (B, grid*grid, width)
    class_token = tower.class_embedding.to(patches.dtype).expand(patches.shape[0], 1, -1)
    tokens = torch.cat([class_token, patches], dim=1) + tower.positional_embedding.to(patches.dtype)
    return tower.ln_pre(tower.patch_dropout(tokens))


def _pool_and_project(tower: VisionTransformer, tokens: torch.Tensor) -> torch.Tensor:
    return tower.ln_post(tokens[:, 0]) @ tower.proj


class DaCLIP(nn.Module):
    """DA-CLIP with the fork's parameter names: `clip`, `visual` (alias of `clip.visual`, so the
    main tower appears twice in the state dict), `visual_control` and `logit_scale`."""

    def __init__(self, clip: open_clip.CLIP):
        super().__init__()
        _check_vision_tower(clip.visual)
        self.clip = clip
        self.visual = clip.visual
        self.visual_control = copy.deepcopy(clip.visual)
        self.visual_control.transformer = ControlTransformer(self.visual_control.transformer)
        self.logit_scale = nn.Parameter(clip.logit_scale.detach().clone())

    def encode_image(self, image: torch.Tensor, control: bool = False):
        """control=False: plain CLIP image features. control=True: (image_features,
        degra_features), the main tower steered by the controller, and the controller's own."""
        if not control:
            return self.clip.encode_image(image)
        tokens, controls = self.visual_control.transformer(_embed_patches(self.visual_control, image))
        degra_features = _pool_and_project(self.visual_control, tokens)
        tokens = _embed_patches(self.visual, image)
        for block in self.visual.transformer.resblocks:
            tokens = block(tokens) + controls.pop()  # main block i gets controller block L-1-i
        return _pool_and_project(self.visual, tokens), degra_features

    def encode_text(self, text: torch.Tensor) -> torch.Tensor:
        return self.clip.encode_text(text)


# ----------------------------------------------------------------------------- building, loading

def _tiny_architecture(image_size: int) -> Dict:
    """About 1.8 M parameters (mostly the real 49408-token embedding) for tests and smoke runs."""
    if image_size % TINY_PATCH_SIZE:
        raise _config_error("image_size", f"{image_size} is not a multiple of the tiny CLIP's "
                                          f"patch size {TINY_PATCH_SIZE}")
    return dict(
        embed_dim=32,
        vision_cfg=dict(image_size=image_size, patch_size=TINY_PATCH_SIZE, width=64, layers=2,
                        head_width=32),
        text_cfg=dict(context_length=77, vocab_size=49408, width=32, heads=2, layers=2),
    )


def clip_architecture(cfg) -> Dict:
    """The open_clip model config (embed_dim, vision_cfg, text_cfg) that `cfg` (ClipConfig) names."""
    if cfg.kind not in CLIP_KINDS:
        raise _config_error("kind", f"'{cfg.kind}' is not one of {list(CLIP_KINDS)}")
    if cfg.kind == "tiny":
        return _tiny_architecture(int(cfg.image_size))
    architecture = open_clip.get_model_config(cfg.arch)
    if architecture is None:
        raise _config_error("arch", f"'{cfg.arch}' is not an open_clip architecture")
    tower_size = architecture["vision_cfg"].get("image_size")
    if tower_size != cfg.image_size:
        raise _config_error("image_size", f"{cfg.image_size} differs from {cfg.arch}'s input size "
                                          f"{tower_size}")
    return architecture


def _build_clip(architecture: Dict) -> open_clip.CLIP:
    try:
        return open_clip.CLIP(**architecture)
    except TypeError as exc:  # custom-text / HF / timm towers take other constructors
        raise _config_error("arch", f"not a plain open_clip CLIP: {exc}") from None


def build_daclip(architecture: Dict) -> DaCLIP:
    """A randomly initialised DA-CLIP; works under `torch.device("meta")` to inspect a layout."""
    return DaCLIP(_build_clip(architecture))


def _read_state_dict(path: Path) -> Dict[str, torch.Tensor]:
    """A plain state dict, a training checkpoint {"state_dict": {"module.*": ...}} or .safetensors."""
    try:
        checkpoint = load_weights_file(path)
    except Exception as exc:  # torch and safetensors raise several types for unreadable files
        raise _config_error("weights", f"cannot read {path}: {type(exc).__name__}: {exc}") from None
    return unwrap_state_dict(checkpoint, "module.")


def _existing_file(weights: str) -> Path:
    path = Path(weights)
    if not path.is_file():
        raise _config_error("weights", f"file not found: {path}")
    return path


def load_clip_weights(model: nn.Module, weights: str) -> None:
    """Load `weights` into `model` strictly; every mismatch is a ConfigError naming the file."""
    path = _existing_file(weights)
    state = _read_state_dict(path)
    try:
        result = model.load_state_dict(state, strict=False)
    except RuntimeError as exc:  # shape mismatches raise even when not strict
        raise _config_error("weights", f"{path} does not fit the model: {exc}") from None
    missing, unexpected = result.missing_keys, result.unexpected_keys
    if missing or unexpected:
        raise _config_error("weights", f"{path} does not fit the model: {len(missing)} missing keys "
                                       f"{missing[:3]}, {len(unexpected)} unexpected keys {unexpected[:3]}")


def _build_backbone(cfg) -> Tuple[nn.Module, int]:
    """-> (DaCLIP or plain CLIP with its weights, text context length)."""
    architecture = clip_architecture(cfg)
    if cfg.weights:
        _existing_file(cfg.weights)  # fail before spending seconds on a large random init
    elif cfg.kind != "tiny":
        raise _config_error("weights", f"kind '{cfg.kind}' needs a local checkpoint file")
    with torch.random.fork_rng(devices=[]):  # seeded without touching the caller's RNG
        torch.manual_seed(TINY_SEED)  # the tiny CLIP keeps this init; loaded weights replace it
        clip = _build_clip(architecture)
        backbone = clip if cfg.kind == "openclip" else DaCLIP(clip)
    if cfg.weights:
        load_clip_weights(backbone, cfg.weights)
    return backbone, clip.context_length


# ----------------------------------------------------------------------------- the prior

TEXT_TOWER = ("transformer", "token_embedding", "positional_embedding", "ln_final", "text_projection", "attn_mask")


def _drop_text_tower(clip: open_clip.CLIP) -> None:
    """With the prompts encoded once, the text tower is never called again: free it (a quarter of
    DA-CLIP ViT-B/32's weights, 0.25 GB in fp32, on every GPU)."""
    for name in TEXT_TOWER:
        delattr(clip, name)


def _resize_shorter_side(image: torch.Tensor, size: int) -> torch.Tensor:
    """torchvision's Resize(size, antialias=True) on tensors: bilinear, longer side truncated. In fp32
    whatever the input's dtype: the CPU has no bf16 antialiased kernel (a bf16 run would stop there)."""
    height, width = image.shape[-2:]
    short, long = min(height, width), max(height, width)
    if short == size:
        return image
    scaled = (size, int(size * long / short))
    new_size = scaled if height <= width else scaled[::-1]
    resized = F.interpolate(image.float(), size=new_size, mode="bilinear", align_corners=False, antialias=True)
    return resized.to(image.dtype)


def _center_crop(image: torch.Tensor, size: int) -> torch.Tensor:
    height, width = image.shape[-2:]
    top, left = round((height - size) / 2), round((width - size) / 2)
    return image[..., top:top + size, left:left + size]


class CLIPPrior(nn.Module):
    """Frozen CLIP prior: image (B,3,H,W) in `input_range` -> (degradation_probs (B, num_prompts),
    image_embed (B, embed_dim)), both float32. Never trains: no gradients, always in eval mode."""

    def __init__(self, cfg, input_range: str):
        super().__init__()
        if input_range not in INPUT_RANGES:
            raise config_error("model.input_range", f"'{input_range}' is not one "
                               f"of {list(INPUT_RANGES)}")
        prompts = list(cfg.prompts)
        if not prompts:
            raise _config_error("prompts", "needs at least one prompt")
        self.input_range = input_range
        self.image_size = int(cfg.image_size)
        self.normalize = bool(cfg.normalize)
        self.fp16_autocast = bool(cfg.fp16_autocast)
        self.model, context_length = _build_backbone(cfg)
        self.model.requires_grad_(False)
        self.num_prompts = len(prompts)
        self.embed_dim = self.model.visual.output_dim
        self.register_buffer("prompt_tokens", open_clip.tokenize(prompts, context_length),
                             persistent=False)
        self.eval()
        cached = self._encode_prompts() if cfg.cache_text_features else None
        self.register_buffer("cached_text_features", cached, persistent=False)
        if cached is not None:
            _drop_text_tower(self.model.clip if isinstance(self.model, DaCLIP) else self.model)

    def train(self, mode: bool = True) -> "CLIPPrior":
        """The prior stays in eval mode whatever the caller asks."""
        return super().train(False)

    def preprocess(self, image: torch.Tensor) -> torch.Tensor:
        """What CLIP sees: shorter side resized to image_size (antialiased), centre crop, then
        CLIP's mean/std only if `normalize` (officially the network input goes in as is)."""
        if image.dim() != 4 or image.shape[1] != 3:
            raise ValueError(f"CLIPPrior expects images (B, 3, H, W), got {tuple(image.shape)}")
        image = _center_crop(_resize_shorter_side(image, self.image_size), self.image_size)
        if not self.normalize:
            return image
        if self.input_range == "minus_one_one":
            image = (image + 1) / 2
        mean = image.new_tensor(OPENAI_DATASET_MEAN).view(1, 3, 1, 1)
        std = image.new_tensor(OPENAI_DATASET_STD).view(1, 3, 1, 1)
        return (image - mean) / std

    def _encode_prompts(self) -> torch.Tensor:
        with torch.no_grad():
            return self.model.encode_text(self.prompt_tokens)

    def _image_and_degradation_features(self, pixels: torch.Tensor):
        if isinstance(self.model, DaCLIP):
            return self.model.encode_image(pixels, control=True)
        features = self.model.encode_image(pixels)  # plain CLIP: one embedding serves both roles
        return features, features

    @torch.no_grad()
    def forward(self, image: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        pixels = self.preprocess(image).to(self.model.visual.conv1.weight.dtype)
        # The official code runs DA-CLIP under CUDA's fp16 autocast, whatever the network's precision.
        # Otherwise the caller's autocast (if any) stays in force: `enabled=False` would switch it off
        # and run the tower in fp32 under a bf16 autocast.
        official = self.fp16_autocast and pixels.is_cuda
        with torch.autocast("cuda", dtype=torch.float16) if official else contextlib.nullcontext():
            image_features, degra_features = self._image_and_degradation_features(pixels)
            text_features = self.cached_text_features
            if text_features is None:
                text_features = self._encode_prompts()
        # Scores in fp32 whatever the caller's autocast: a bf16 cosine times COSINE_SCALE moves the logits.
        with torch.autocast(device_type=pixels.device.type, enabled=False):
            degra_directions = F.normalize(degra_features.float(), dim=-1)
            cosine = degra_directions @ F.normalize(text_features.float(), dim=-1).T
            return (COSINE_SCALE * cosine).softmax(dim=-1), image_features.float()


def build_clip_prior(cfg, input_range: str) -> CLIPPrior:
    """The frozen prior that `cfg` (ClipConfig or its DictConfig) describes."""
    return CLIPPrior(cfg, input_range)
