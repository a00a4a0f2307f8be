"""M2Restore (Wang et al., TIP 2025): AdaIR's Restormer U-Net with MoE adapters, a Mamba-CNN
bottleneck and a frozen CLIP prior.

Data flow (x is the network input, see `input_range`):
    clip_probs, clip_embed = CLIPPrior(x)          frozen; router prior and gate condition
    prompt = TaskPrompt(x)                         (B, prompt_dim)
    e1 = encoder_level1(DDER1(patch_embed(x)))     width C,  H   x W
    e2 = encoder_level2(DDER2(down1_2(e1)))        width 2C, H/2
    e3 = encoder_level3(DDER3(down2_3(e2)))        width 4C, H/4
    z  = AFLB1(x, bottleneck(down3_4(e3)))         width 8C, H/8, 8 MB blocks
    d3 = AFLB2(x, decoder_level3(reduce3([up4_3(z), e3])))
    d2 = AFLB3(x, decoder_level2(reduce2([up3_2(d3), e2])))
    d1 = refinement(decoder_level1([up2_1(d2), e1]))   width 2C, no channel reduction
    restored = output(d1) + x
Official input_range "minus_one_one": x = 2 * lq - 1 while the target stays in [0, 1], so the
"residual" adds 2 * lq - 1 (a quirk the network learns around); "zero_one": x = lq.

Module names follow the official code except the three renamed families (official -> ours):
mcdb{i} -> dder{i}, fre{i} -> aflb{i}, latent -> bottleneck (see `m2r.models.convert`).
"""
from dataclasses import dataclass
from typing import List, Optional

import torch
import torch.nn as nn
from torch.utils.checkpoint import checkpoint

from m2r.models.aflb import AFLB
from m2r.models.bottleneck import MB
from m2r.models.clip_prior import CLIPPrior, build_clip_prior, clip_architecture
from m2r.models.config import CHECKPOINT_MODES, INPUT_RANGES, MIN_SIZE, SIZE_MULTIPLE, check_model_settings
from m2r.models.moe import DDER
from m2r.models.restormer import Downsample, OverlapPatchEmbed, TransformerBlock, Upsample, set_depthwise_mode
from m2r.models.task_prompt import TaskPrompt


@dataclass
class RestorationOutput:
    restored: torch.Tensor          # (B, 3, H, W) in the target's [0, 1] space, unclamped
    balance_loss: torch.Tensor      # scalar, sum over the 3 DDER levels, unweighted
    expert_load: list               # per DDER level, (num_experts,) fractions (detached)
    dropped: list                   # per DDER level, fp32 scalar: fraction of assignments the capacity dropped


class M2Restore(nn.Module):
    """The restoration network. `with_clip_prior=False` builds it without the frozen CLIP prior
    (to count or convert weights when no CLIP weights file is at hand); it cannot run forward."""

    def __init__(self, cfg, with_clip_prior: bool = True):
        super().__init__()
        if cfg.input_range not in INPUT_RANGES:
            raise ValueError(f"model.input_range must be one of {INPUT_RANGES}, got {cfg.input_range!r}")
        check_model_settings(cfg)
        self.input_range = cfg.input_range
        self._compiled_forward = None
        self._memory_format = torch.contiguous_format
        # Seed only this construction (CPU generator), so dense init depends on cfg.seed alone.
        with torch.random.fork_rng(devices=[]):
            torch.random.default_generator.manual_seed(cfg.seed)
            self._build(cfg, clip_architecture(cfg.clip)["embed_dim"])
        set_depthwise_mode(self, cfg.depthwise)
        # Frozen and outside the module tree: not in parameters() or state_dict(); see _apply.
        self.__dict__["_clip_prior"] = (build_clip_prior(cfg.clip, cfg.input_range)
                                        if with_clip_prior else None)

    def _build(self, cfg, clip_dim: int) -> None:
        dim, blocks, heads = cfg.dim, list(cfg.num_blocks), list(cfg.heads)
        widths = [dim, dim * 2, dim * 4, dim * 8]

        def transformer_blocks(width, count, num_heads):
            return nn.Sequential(*[
                TransformerBlock(width, num_heads, cfg.ffn_expansion_factor, cfg.bias)
                for _ in range(count)])

        def dder(level):
            return DDER(widths[level - 1], cfg.prompt_dim, len(cfg.clip.prompts), cfg.moe,
                        layer_id=level, seed=cfg.seed)

        def aflb(width):
            return AFLB(width, cfg.aflb_heads, cfg.bias, mask=cfg.aflb_mask)

        self.patch_embed = OverlapPatchEmbed(3, dim)
        self.aflb1, self.aflb2, self.aflb3 = aflb(widths[3]), aflb(widths[2]), aflb(widths[1])
        self.encoder_level1 = transformer_blocks(widths[0], blocks[0], heads[0])
        self.down1_2 = Downsample(widths[0])
        self.encoder_level2 = transformer_blocks(widths[1], blocks[1], heads[1])
        self.down2_3 = Downsample(widths[1])
        self.encoder_level3 = transformer_blocks(widths[2], blocks[2], heads[2])
        self.down3_4 = Downsample(widths[2])
        self.bottleneck = nn.Sequential(*[
            MB(widths[3], clip_dim, cfg.ffn_expansion_factor, cfg.bias, cfg.mamba.d_state,
               cfg.mamba.d_conv, cfg.mamba.expand, cfg.mamba.scan, cfg.scan_backend, cfg.mamba.autocast)
            for _ in range(blocks[3])])
        self.up4_3 = Upsample(widths[3])
        self.reduce_chan_level3 = nn.Conv2d(widths[3], widths[2], kernel_size=1, bias=cfg.bias)
        self.decoder_level3 = transformer_blocks(widths[2], blocks[2], heads[2])
        self.up3_2 = Upsample(widths[2])
        self.reduce_chan_level2 = nn.Conv2d(widths[2], widths[1], kernel_size=1, bias=cfg.bias)
        self.decoder_level2 = transformer_blocks(widths[1], blocks[1], heads[1])
        self.up2_1 = Upsample(widths[1])
        self.decoder_level1 = transformer_blocks(widths[1], blocks[0], heads[0])
        self.refinement = transformer_blocks(widths[1], cfg.num_refinement_blocks, heads[0])
        self.output = nn.Conv2d(widths[1], 3, kernel_size=3, padding=1, bias=cfg.bias)
        self.task_prompt = TaskPrompt(3, cfg.cond_channels, cfg.prompt_atoms, cfg.prompt_dim)
        self.dder1, self.dder2, self.dder3 = dder(1), dder(2), dder(3)

    @property
    def clip_prior(self) -> Optional[CLIPPrior]:
        return self._clip_prior

    def unused_parameter_names(self) -> List[str]:
        """Parameters that never get a gradient: the AFLBs' dead `conv` and `score_gen` layers,
        and `rate_conv` under the official mask (its box size is truncated to an integer)."""
        dead = ("conv.", "score_gen.") + (("rate_conv.",) if self.aflb1.mask_rule == "official" else ())
        return [name for name, _ in self.named_parameters()
                if name.startswith("aflb") and name.split(".", 1)[1].startswith(dead)]

    def set_activation_checkpointing(self, mode: str) -> None:
        """Recompute some blocks in backward instead of storing their activations: "none";
        "bottleneck": each MB block; "full_res": the blocks at full resolution (DDER 1, encoder
        level 1, decoder level 1, refinement), which hold most of the activation memory;
        "levels_1_2": those and the half-resolution ones (DDER 2, encoder and decoder level 2);
        "all": every MB, Transformer block and DDER. torch.utils.checkpoint, non-reentrant (RNG
        state preserved)."""
        if mode not in CHECKPOINT_MODES:
            raise ValueError(f"activation checkpointing mode must be one of {CHECKPOINT_MODES}, got {mode!r}")
        if mode in ("full_res", "levels_1_2"):
            blocks = [self.dder1, *self.encoder_level1, *self.decoder_level1, *self.refinement]
            if mode == "levels_1_2":
                blocks += [self.dder2, *self.encoder_level2, *self.decoder_level2]
        else:
            types = {"none": (), "bottleneck": (MB,), "all": (MB, TransformerBlock, DDER)}[mode]
            blocks = [module for module in self.modules() if isinstance(module, types)]
        chosen = set(map(id, blocks))
        # A flag on each module, not a set of ids here: torch.compile would guard on object identity
        # and retrace for every new model instance.
        for module in self.modules():
            module.recompute_in_backward = id(module) in chosen

    def compile_training_forward(self, backend: str = "inductor") -> None:
        """torch.compile the forward used while training, for static shapes (one compilation per
        crop and batch size). Evaluation and validation, at other image sizes, stay eager. Eager
        islands between the graphs: the mamba_ssm kernels, a sparse MoE dispatch, and the official
        AFLB box's FFT from a crop of 256 px (below it the box is empty and needs no transform)."""
        self._compiled_forward = torch.compile(self._forward, backend=backend, dynamic=False)

    def use_channels_last(self) -> None:
        """Feature maps channels-last (NHWC in memory), what cuDNN's bf16 convolutions and the
        per-pixel LayerNorms and MoE tokens want. The input is converted on entry and the attention
        output is put back in the input's layout; the weights stay contiguous, as DeepSpeed needs them
        (its broadcast views them as bytes). Convolutions whose input reaches them in the other
        layout (after a pixel shuffle or a concatenation) run in that layout."""
        self._memory_format = torch.channels_last

    def _apply(self, fn, *args, **kwargs):
        # .to()/.cuda()/.bfloat16() move the held-out CLIP prior too; its params stay frozen.
        super()._apply(fn, *args, **kwargs)
        if self._clip_prior is not None:
            self._clip_prior._apply(fn)
        return self

    def forward(self, lq) -> RestorationOutput:
        """lq: (B, 3, H, W) float in [0, 1], H and W multiples of 8 (at least 16)."""
        self._check_input(lq)
        if self.training and self._compiled_forward is not None:
            for block in self.bottleneck:   # decided here, eagerly, so that the graph only reads it
                block.ssm.mamba.scan_path(lq.device)
            return self._compiled_forward(lq)
        return self._forward(lq)

    def _forward(self, lq) -> RestorationOutput:
        lq = lq.contiguous(memory_format=self._memory_format)
        x = 2 * lq - 1 if self.input_range == "minus_one_one" else lq
        clip_probs, clip_embed = self._clip_prior(x)
        prompt = self.task_prompt(x)

        balance_losses, expert_loads, dropped = [], [], []

        def adapt(dder, features):   # a DDER recomputes its experts itself, not its router (DDER.forward)
            adapted, balance_loss, load, dropped_fraction = dder(features, prompt, clip_probs)
            balance_losses.append(balance_loss)
            expert_loads.append(load)
            dropped.append(dropped_fraction)
            return adapted

        e1 = self._run(self.encoder_level1, adapt(self.dder1, self.patch_embed(x)))
        e2 = self._run(self.encoder_level2, adapt(self.dder2, self.down1_2(e1)))
        e3 = self._run(self.encoder_level3, adapt(self.dder3, self.down2_3(e2)))
        z = self._run(self.bottleneck, self.down3_4(e3), clip_embed)
        z = self.aflb1(x, z)
        d3 = self.reduce_chan_level3(torch.cat([self.up4_3(z), e3], dim=1))
        d3 = self.aflb2(x, self._run(self.decoder_level3, d3))
        d2 = self.reduce_chan_level2(torch.cat([self.up3_2(d3), e2], dim=1))
        d2 = self.aflb3(x, self._run(self.decoder_level2, d2))
        d1 = self._run(self.decoder_level1, torch.cat([self.up2_1(d2), e1], dim=1))
        d1 = self._run(self.refinement, d1)
        restored = self.output(d1) + x
        return RestorationOutput(restored, torch.stack(balance_losses).sum(), expert_loads, dropped)

    def _check_input(self, lq) -> None:
        if self._clip_prior is None:
            raise RuntimeError("this M2Restore was built with with_clip_prior=False and cannot run "
                               "forward; build it with its CLIP prior (model.clip)")
        if lq.dim() != 4 or lq.shape[1] != 3:
            raise ValueError(f"M2Restore expects lq of shape (B, 3, H, W), got {tuple(lq.shape)}")
        h, w = lq.shape[-2:]
        if h % SIZE_MULTIPLE or w % SIZE_MULTIPLE or min(h, w) < MIN_SIZE:
            raise ValueError(f"M2Restore input size {h}x{w} is not supported: H and W must be "
                             f"multiples of {SIZE_MULTIPLE} and at least {MIN_SIZE} (pad or crop)")

    def _run(self, blocks: nn.Sequential, x, *extra):
        for block in blocks:
            x = self._call(block, x, *extra)
        return x

    def _call(self, module, *args):
        if torch.is_grad_enabled() and getattr(module, "recompute_in_backward", False):
            return checkpoint(module, *args, use_reentrant=False)
        return module(*args)


def build_model(cfg, with_clip_prior: bool = True) -> M2Restore:
    return M2Restore(cfg, with_clip_prior=with_clip_prior)
