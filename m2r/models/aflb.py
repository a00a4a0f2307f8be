"""AFLB, the adaptive frequency learning block of AdaIR (its code calls it FreModule).

The block splits features of the input image into low and high frequencies with a box mask in the
centred 2-D spectrum, lets each band attend to the decoder features, fuses them and adds the result
to the decoder features through a learnable per-channel weight that starts at zero (identity).

Mask rules (`aflb_mask`):
- "official": half-sizes int((h // 128) * t_h), int((w // 128) * t_w), with t = sigmoid(rate_conv(
  pooled features)). The integer division makes the box empty below 256 px and the truncation
  stops every gradient to `rate_conv`, so "low" is usually zero and "high" = |conv1(x)|.
- "fixed": a soft box whose half-size is r = t * n / 4 bins along an axis of n bins (so the box
  grows from the DC bin up to half the spectrum). The weight of a bin at distance d from DC is
  clamp(r + 1 - d, 0, 1): bins within r are 1, the bin on the fractional edge gets the fraction,
  DC is always kept. The fractional edge carries a gradient to `rate_conv`, so the split is learnt.
  The 2-D mask is the product of the two axis masks.

Unused layers kept for strict loading of official checkpoints: `conv` and `score_gen` are never
called; `rate_conv` gets no gradient under the official mask.
"""
import torch
import torch.nn as nn
import torch.nn.functional as F

from m2r.models.config import AFLB_MASKS
from m2r.models.restormer import DepthwiseConv3x3, memory_layout, transposed_attention

OFFICIAL_MASK_STEP = 128  # the official code divides the feature size by this before scaling


class ChannelCrossAttention(nn.Module):
    """Transposed attention whose queries come from `x` and keys/values from `y` (same shape)."""

    def __init__(self, dim: int, num_heads: int, bias: bool):
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"AFLB width {dim} is not divisible by its {num_heads} heads")
        self.num_head = num_heads
        self.temperature = nn.Parameter(torch.ones(num_heads, 1, 1))
        self.q = nn.Conv2d(dim, dim, kernel_size=1, bias=bias)
        self.q_dwconv = DepthwiseConv3x3(dim, bias)
        self.kv = nn.Conv2d(dim, dim * 2, kernel_size=1, bias=bias)
        self.kv_dwconv = DepthwiseConv3x3(dim * 2, bias)
        self.project_out = nn.Conv2d(dim, dim, kernel_size=1, bias=bias)

    def forward(self, x, y):
        q = self.q_dwconv(self.q(x))
        k, v = self.kv_dwconv(self.kv(y)).chunk(2, dim=1)
        return self.project_out(transposed_attention(q, k, v, self.num_head, self.temperature))


class SpatialGate(nn.Module):
    """CBAM spatial gate: sigmoid(7x7 conv([channel max, channel mean]))."""

    def __init__(self):
        super().__init__()
        self.spatial = nn.Conv2d(2, 1, kernel_size=7, padding=3, bias=False)

    def forward(self, x):
        pooled = torch.cat([x.amax(1, keepdim=True), x.mean(1, keepdim=True)], dim=1)
        return torch.sigmoid(self.spatial(pooled))


class ChannelGate(nn.Module):
    """CBAM channel gate: sigmoid(MLP(avg pool) + MLP(max pool)), MLP squeezing by 16."""

    def __init__(self, dim: int):
        super().__init__()
        self.mlp = nn.Sequential(
            nn.Conv2d(dim, dim // 16, 1, bias=False),
            nn.ReLU(),
            nn.Conv2d(dim // 16, dim, 1, bias=False))

    def forward(self, x):
        avg = self.mlp(x.mean((2, 3), keepdim=True))
        peak = self.mlp(x.amax((2, 3), keepdim=True))
        return torch.sigmoid(avg + peak)


class FrequencyRefine(nn.Module):
    """Cross-gating of the bands: high * channel gate(low) + low * spatial gate(high), then 1x1."""

    def __init__(self, dim: int):
        super().__init__()
        self.SpatialGate = SpatialGate()
        self.ChannelGate = ChannelGate(dim)
        self.proj = nn.Conv2d(dim, dim, kernel_size=1)

    def forward(self, low, high):
        mixed = high * self.ChannelGate(low) + low * self.SpatialGate(high)
        return self.proj(mixed)


def official_box_mask(rates, h: int, w: int):
    """The official hard box: (B, 1, h, w) with ones in [h//2 - a, h//2 + a) x [w//2 - b, w//2 + b).

    a = int((h // 128) * rate_h), b likewise; `.int()` truncates and cuts the graph, as official.
    """
    half_h = ((h // OFFICIAL_MASK_STEP) * rates[:, 0]).int().view(-1, 1, 1, 1)
    half_w = ((w // OFFICIAL_MASK_STEP) * rates[:, 1]).int().view(-1, 1, 1, 1)
    rows = torch.arange(h, device=rates.device).view(1, 1, h, 1)
    cols = torch.arange(w, device=rates.device).view(1, 1, 1, w)
    inside_rows = (rows >= h // 2 - half_h) & (rows < h // 2 + half_h)
    inside_cols = (cols >= w // 2 - half_w) & (cols < w // 2 + half_w)
    return (inside_rows & inside_cols).to(rates.dtype)


def soft_axis_mask(rate, n: int):
    """The "fixed" rule along one axis (module docstring): (B, n) weights of the centred bins."""
    radius = rate.view(-1, 1) * (n / 4)
    distance = (torch.arange(n, device=rate.device, dtype=rate.dtype) - n // 2).abs()
    return (radius + 1 - distance).clamp(0, 1)


class AFLB(nn.Module):
    """Adaptive frequency learning block.

    forward(image, features): image (B, 3, H0, W0) is the network input, resized bilinearly to the
    (h, w) of features (B, dim, h, w); returns features of the same shape.
    """

    def __init__(self, dim: int, num_heads: int, bias: bool, mask: str = "official",
                 in_channels: int = 3):
        super().__init__()
        if mask not in AFLB_MASKS:
            raise ValueError(f"model.aflb_mask must be one of {AFLB_MASKS}, got {mask!r}")
        self.mask_rule = mask
        self.conv = nn.Conv2d(in_channels, dim, kernel_size=3, padding=1, bias=False)  # unused
        self.conv1 = nn.Conv2d(in_channels, dim, kernel_size=3, padding=1, bias=False)
        self.score_gen = nn.Conv2d(2, 2, 7, padding=3)  # unused
        self.para1 = nn.Parameter(torch.zeros(dim, 1, 1))
        self.para2 = nn.Parameter(torch.ones(dim, 1, 1))
        # The official names are swapped: channel_cross_l attends from the HIGH band, _h from LOW.
        self.channel_cross_l = ChannelCrossAttention(dim, num_heads, bias)
        self.channel_cross_h = ChannelCrossAttention(dim, num_heads, bias)
        self.channel_cross_agg = ChannelCrossAttention(dim, num_heads, bias)
        self.frequency_refine = FrequencyRefine(dim)
        self.rate_conv = nn.Sequential(
            nn.Conv2d(dim, dim // 8, 1, bias=False),
            nn.GELU(),
            nn.Conv2d(dim // 8, 2, 1, bias=False))

    def forward(self, image, features):
        image = F.interpolate(image, size=features.shape[-2:], mode="bilinear", align_corners=False)
        high, low = self.split_frequencies(image)
        high = self.channel_cross_l(high, features)
        low = self.channel_cross_h(low, features)
        fused = self.channel_cross_agg(features, self.frequency_refine(low, high))
        return fused * self.para1 + features * self.para2

    def split_frequencies(self, image):
        """(|IFFT(spectrum outside the box)|, |IFFT(spectrum inside the box)|) of conv1(image).

        Three exact routes, two of them without complex numbers (which inductor cannot compile):
        - official mask, feature side below 128: the half-size int(0 * t) is 0, the box is empty, so
          the bands are |x| and 0 without any transform (every training crop up to 255 px);
        - soft mask: symmetric in frequency, so the masked inverse transform is a real circulant
          filter along each axis, applied as two real matrix products;
        - official mask otherwise: one FFT and one IFFT, eagerly.
        """
        x = self.conv1(image)
        h, w = x.shape[-2:]
        if self.mask_rule == "fixed":
            high, low = soft_box_split(x, self.box_rates(x))
        elif min(h, w) < OFFICIAL_MASK_STEP:
            return x.abs(), torch.zeros_like(x)
        else:
            high, low = self._official_split_by_fft(x)
        layout = memory_layout(x)
        return tuple(band.to(x.dtype).contiguous(memory_format=layout) for band in (high, low))

    def box_rates(self, x):
        """(B, 2) rates t of the box's half-sizes along rows and columns: sigmoid(rate_conv(pooled x)), in fp32:
        a half-precision sigmoid reaches 1.0 (fp16 from a logit of about 8.3, bf16 about 6.2; fp32 about 16.6), and
        at 1.0 the official box's truncated half-size grows by one where fp32 would keep it."""
        return torch.sigmoid(self.rate_conv(x.mean((2, 3), keepdim=True)).float()).flatten(1)

    # An eager island under torch.compile, for two reasons: inductor cannot generate code for complex
    # tensors, and the official box's integer half-sizes leave `rate_conv` without a gradient path:
    # compiled, its parameters would get zero gradients (weight decay would then move them), or None
    # gradients that still fire ZeRO-2's gradient hooks. Eagerly they get no gradient at all.
    @torch.compiler.disable
    def _official_split_by_fft(self, x):
        return official_box_split_by_fft(x, self.box_rates(x))


def axis_filter(axis_mask):
    """The real (B, n, n) matrix that filters a length-n axis by a mask symmetric in frequency.

    axis_mask: (B, n) over the centred frequencies f = i - n // 2. With C[i, p] = cos(2 pi f_i p / n)
    and S likewise, the inverse DFT of the masked DFT is (C^T diag(m) C + S^T diag(m) S) / n: the
    imaginary terms cancel because m(f) = m(-f). Angles come from (f * p) mod n in integers, exact
    for any n.
    """
    n = axis_mask.shape[-1]
    index = torch.arange(n, device=axis_mask.device)
    turns = torch.outer(index - n // 2, index).remainder(n)
    angle = turns.to(torch.float64) * (2 * torch.pi / n)
    cos, sin = (f(angle).to(axis_mask.dtype) for f in (torch.cos, torch.sin))
    weighted = axis_mask.unsqueeze(-1) / n
    return cos.t() @ (weighted * cos) + sin.t() @ (weighted * sin)


def soft_box_split(x, rates):
    """(|x - inner|, |inner|) with inner the soft-box low-pass of x, in at least fp32 and outside
    autocast. The soft box is a product of two symmetric axis masks, so inner = A_rows @ x @ A_cols."""
    h, w = x.shape[-2:]
    precision = torch.promote_types(x.dtype, torch.float32)
    with torch.autocast(device_type=x.device.type, enabled=False):
        signal, rates = x.to(precision), rates.to(precision)
        rows = axis_filter(soft_axis_mask(rates[:, 0], h)).unsqueeze(1)
        cols = axis_filter(soft_axis_mask(rates[:, 1], w)).unsqueeze(1)
        inner = rows @ signal @ cols          # both filters are symmetric
        return (signal - inner).abs(), inner.abs()


def official_box_split_by_fft(x, rates):
    """(|outer|, |inner|) by FFT, for the official box when it can be non-empty.

    The official code centres the spectrum, masks it twice and inverts both parts. Here the mask is
    un-centred instead (rolling the mask equals rolling the spectrum both ways), and the outer part
    is x - inner by linearity of the inverse FFT: one FFT and one IFFT, no complex rolls.
    """
    h, w = x.shape[-2:]
    mask = torch.roll(official_box_mask(rates.float(), h, w), shifts=(-(h // 2), -(w // 2)), dims=(2, 3))
    signal = x.float()   # cuFFT has no bf16 kernels: the spectrum is always computed in fp32
    inner = torch.fft.ifft2(torch.fft.fft2(signal, norm="forward") * mask, norm="forward")
    outer = torch.complex(signal - inner.real, -inner.imag)
    return outer.abs(), inner.abs()
