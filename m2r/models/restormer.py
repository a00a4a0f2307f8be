"""Restormer building blocks (Zamir et al., CVPR 2022) as the M2Restore backbone uses them.

Submodule names follow the official M2Restore/AdaIR code (`body`, `attn`, `ffn`, `qkv_dwconv`, ...)
so that official checkpoints convert with a short prefix table (see `m2r.models.convert`).
Every block works on (B, C, H, W) feature maps.
"""
import torch
import torch.nn as nn
import torch.nn.functional as F

from m2r.models.config import DEPTHWISE_MODES

LAYER_NORM_EPS = 1e-5


class WithBiasLayerNorm(nn.Module):
    """Standard LayerNorm over the last dim of (..., C): Restormer writes out (x - mean) / sqrt(var + eps)
    * w + b with the biased variance, which is exactly F.layer_norm, one fused kernel instead of six."""

    def __init__(self, dim: int):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.bias = nn.Parameter(torch.zeros(dim))

    def forward(self, x):
        return F.layer_norm(x, self.weight.shape, self.weight, self.bias, LAYER_NORM_EPS)


class ChannelLayerNorm(nn.Module):
    """LayerNorm over the channels of a (B, C, H, W) map, each pixel normalised on its own.

    Only Restormer's "WithBias" kind: the one M2Restore uses. `body` keeps the official key names.
    """

    def __init__(self, dim: int):
        super().__init__()
        self.body = WithBiasLayerNorm(dim)

    def forward(self, x):
        return self.body(x.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)


class DepthwiseConv3x3(nn.Conv2d):
    """3x3 depthwise convolution with 'same' padding, computed one of two ways (`mode`):
    - "conv": the convolution kernel (cuDNN on a GPU);
    - "shifted": the same sum written out as nine shifted, per-channel scaled copies of the
      input, accumulated in at least fp32. Plain element-wise work that torch.compile fuses with its
      neighbours into one kernel, forward and backward, where cuDNN's depthwise backward is slow.
      Eagerly it is slower than the convolution and keeps an fp32 copy of its input for backward.
    Same parameters and state-dict keys either way.
    """

    def __init__(self, channels: int, bias: bool):
        super().__init__(channels, channels, kernel_size=3, padding=1, groups=channels, bias=bias)
        self.mode = "conv"

    def forward(self, x):
        if self.mode == "conv":
            return super().forward(x)
        height, width = x.shape[-2:]
        precision = torch.promote_types(x.dtype, torch.float32)
        padded = F.pad(x.to(precision), (1, 1, 1, 1))
        taps = self.weight.to(precision).view(-1, 9)      # (C, 9), kernel rows then columns
        out = 0 if self.bias is None else self.bias.to(precision).view(1, -1, 1, 1)
        for tap in range(9):
            row, col = divmod(tap, 3)
            out = out + padded[:, :, row:row + height, col:col + width] * taps[:, tap].view(1, -1, 1, 1)
        # The dtype a convolution would give: autocast casts fp32 inputs only.
        device = x.device.type
        autocast = torch.is_autocast_enabled(device) and x.dtype == torch.float32
        dtype = torch.get_autocast_dtype(device) if autocast else x.dtype
        return out.to(dtype).contiguous(memory_format=memory_layout(x))


def set_depthwise_mode(model: nn.Module, mode: str) -> None:
    """How every DepthwiseConv3x3 in `model` computes (see the class)."""
    if mode not in DEPTHWISE_MODES:
        raise ValueError(f"model.depthwise must be one of {DEPTHWISE_MODES}, got {mode!r}")
    for module in model.modules():
        if isinstance(module, DepthwiseConv3x3):
            module.mode = mode


class GatedDconvFeedForward(nn.Module):
    """GDFN: 1x1 expand to two halves, 3x3 depthwise conv, GELU(first) * second, 1x1 back."""

    def __init__(self, dim: int, expansion_factor: float, bias: bool):
        super().__init__()
        hidden = int(dim * expansion_factor)
        self.project_in = nn.Conv2d(dim, hidden * 2, kernel_size=1, bias=bias)
        self.dwconv = DepthwiseConv3x3(hidden * 2, bias)
        self.project_out = nn.Conv2d(hidden, dim, kernel_size=1, bias=bias)

    def forward(self, x):
        gate, value = self.dwconv(self.project_in(x)).chunk(2, dim=1)
        return self.project_out(F.gelu(gate) * value)


def memory_layout(x: torch.Tensor) -> torch.memory_format:
    """channels_last when the channels of a (B, C, H, W) map are innermost in memory (channel slices
    of such a map included), else contiguous."""
    return torch.channels_last if x.shape[1] > 1 and x.stride(1) == 1 else torch.contiguous_format


def _unit_rows(t):
    """F.normalize along the last dim. In fp16 (DeepSpeed's fp16 weights) its eps of 1e-12 rounds to 0, so an
    all-zero row (the AFLB's empty low band under the official mask, any band of a black zero_one input)
    would give 0 / 0 = NaN: fp16 rows are normalised in fp32. The gradient into an all-zero row is then
    1 / eps = 1e12 times the incoming one: finite in fp32, inf once back in fp16, and inf * 0 = NaN in the
    weight gradients of the layers that made the row (every step overflows, whatever the loss scale).
    A zero row has no direction: fp16 ones pass no gradient back. Other dtypes as F.normalize (whose sums
    the fp16 branch repeats with one norm: x / max(|x|, eps))."""
    if t.dtype == torch.float16:
        rows = t.float()
        norm = rows.norm(dim=-1, keepdim=True)
        rows = torch.where(norm > 0, rows, rows.detach())
        return (rows / norm.clamp_min(1e-12)).to(t.dtype)
    return F.normalize(t, dim=-1)


def transposed_attention(q, k, v, num_heads: int, temperature):
    """Channel-wise ("transposed") attention of Restormer: each head attends over its channels.

    q, k, v: (B, C, H, W); temperature: (num_heads, 1, 1). Queries and keys are L2-normalised along
    the pixels, so the (C/heads x C/heads) attention map has entries in [-1, 1] before scaling.
    """
    b, c, h, w = q.shape
    layout = memory_layout(q)
    q, k, v = (t.reshape(b, num_heads, c // num_heads, h * w) for t in (q, k, v))
    q, k = _unit_rows(q), _unit_rows(k)
    attn = (q @ k.transpose(-2, -1)) * temperature
    out = attn.softmax(dim=-1) @ v
    return out.reshape(b, c, h, w).contiguous(memory_format=layout)   # back in the input's layout


class MultiDconvHeadAttention(nn.Module):
    """MDTA: 1x1 qkv, 3x3 depthwise conv, transposed attention, 1x1 output projection."""

    def __init__(self, dim: int, num_heads: int, bias: bool):
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"attention width {dim} is not divisible by its {num_heads} heads")
        self.num_heads = num_heads
        self.temperature = nn.Parameter(torch.ones(num_heads, 1, 1))
        self.qkv = nn.Conv2d(dim, dim * 3, kernel_size=1, bias=bias)
        self.qkv_dwconv = DepthwiseConv3x3(dim * 3, bias)
        self.project_out = nn.Conv2d(dim, dim, kernel_size=1, bias=bias)

    def forward(self, x):
        q, k, v = self.qkv_dwconv(self.qkv(x)).chunk(3, dim=1)
        return self.project_out(transposed_attention(q, k, v, self.num_heads, self.temperature))


class TransformerBlock(nn.Module):
    """Restormer block: x + MDTA(LN(x)), then x + GDFN(LN(x))."""

    def __init__(self, dim: int, num_heads: int, ffn_expansion_factor: float, bias: bool):
        super().__init__()
        self.norm1 = ChannelLayerNorm(dim)
        self.attn = MultiDconvHeadAttention(dim, num_heads, bias)
        self.norm2 = ChannelLayerNorm(dim)
        self.ffn = GatedDconvFeedForward(dim, ffn_expansion_factor, bias)

    def forward(self, x):
        x = x + self.attn(self.norm1(x))
        return x + self.ffn(self.norm2(x))


class OverlapPatchEmbed(nn.Module):
    """3x3 convolution from image channels to the embedding width (no bias, as official)."""

    def __init__(self, in_channels: int = 3, embed_dim: int = 48, bias: bool = False):
        super().__init__()
        self.proj = nn.Conv2d(in_channels, embed_dim, kernel_size=3, padding=1, bias=bias)

    def forward(self, x):
        return self.proj(x)


class Downsample(nn.Module):
    """Halve the resolution, double the channels: 3x3 conv C -> C/2, then PixelUnshuffle(2)."""

    def __init__(self, channels: int):
        super().__init__()
        self.body = nn.Sequential(
            nn.Conv2d(channels, channels // 2, kernel_size=3, padding=1, bias=False),
            nn.PixelUnshuffle(2))

    def forward(self, x):
        return self.body(x)


class Upsample(nn.Module):
    """Double the resolution, halve the channels: 3x3 conv C -> 2C, then PixelShuffle(2)."""

    def __init__(self, channels: int):
        super().__init__()
        self.body = nn.Sequential(
            nn.Conv2d(channels, channels * 2, kernel_size=3, padding=1, bias=False),
            nn.PixelShuffle(2))

    def forward(self, x):
        return self.body(x)
