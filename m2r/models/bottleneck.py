"""The bottleneck "MB" block: a gated Mamba / depthwise-conv pair (the paper's MCDB + DGF).

MB(x, clip_embed):  x = x + MambaLayer(LN(x), clip_embed);  x = x + GDFN(LN(x)).
MambaLayer(u, p):   prompt = MLP(p) broadcast over the map,
                    G      = sigmoid(1x1(GELU(1x1([u, prompt]))))      (B, 1, H, W), the DGF gate
                    global = LN(Mamba(LN(tokens of u))),                 tokens in `scan` order(s)
                    local  = GELU(3x3 depthwise conv(u))
                    out    = G * global + (1 - G) * local
The official code scans once, row-major ("raster"). "bidirectional" also scans the reversed
sequence, "four_way" also column-major and both reversals. Every direction uses the SAME Mamba
weights (no extra parameters, so raster checkpoints load into every mode) and the directions'
outputs, mapped back to row-major order, are averaged before the output LayerNorm.
Names follow the official code (`ssm`, `prompt_proj`, `gate_net`, `conv_path`, `norm`, `norm2`).
"""
import torch
import torch.nn as nn

from m2r.models.config import SCAN_MODES
from m2r.models.mamba import Mamba
from m2r.models.restormer import ChannelLayerNorm, DepthwiseConv3x3, GatedDconvFeedForward

SCAN_ORDERS = {
    "raster": ("row",),
    "bidirectional": ("row", "row_reversed"),
    "four_way": ("row", "row_reversed", "column", "column_reversed"),
}
assert tuple(SCAN_ORDERS) == SCAN_MODES, "model.mamba.scan's choices and the scan orders must agree"


def to_scan_order(grid, order: str):
    """(B, H, W, C) token grid -> (B, H*W, C) sequence in the given scan order."""
    if order.startswith("column"):
        grid = grid.transpose(1, 2)
    sequence = grid.flatten(1, 2)
    return sequence.flip(1) if order.endswith("reversed") else sequence


def from_scan_order(sequence, order: str, h: int, w: int):
    """Inverse of `to_scan_order`: (B, H*W, C) sequence -> (B, H, W, C) grid."""
    if order.endswith("reversed"):
        sequence = sequence.flip(1)
    if order.startswith("column"):
        return sequence.unflatten(1, (w, h)).transpose(1, 2)
    return sequence.unflatten(1, (h, w))


class MambaLayer(nn.Module):
    """Gated fusion of a Mamba branch and a depthwise-conv branch, conditioned on a CLIP embedding.

    By default it runs in the dtype of its parameters with autocast disabled (fp32 in the official
    recipe) and returns that dtype; with `follow_autocast` it runs under the caller's autocast.
    """

    def __init__(self, dim: int, clip_dim: int, d_state: int = 16, d_conv: int = 4, expand: int = 2,
                 scan: str = "raster", scan_backend: str = "auto", follow_autocast: bool = False):
        super().__init__()
        if scan not in SCAN_ORDERS:
            raise ValueError(f"model.mamba.scan must be one of {list(SCAN_ORDERS)}, got {scan!r}")
        self.scan_orders = SCAN_ORDERS[scan]
        self.follow_autocast = follow_autocast
        self.norm = nn.LayerNorm(dim)
        self.norm2 = nn.LayerNorm(dim)
        self.prompt_proj = nn.Sequential(
            nn.Linear(clip_dim, dim * 4), nn.GELU(), nn.Linear(dim * 4, dim))
        self.mamba = Mamba(d_model=dim, d_state=d_state, d_conv=d_conv, expand=expand,
                           scan_backend=scan_backend)
        self.conv_path = nn.Sequential(DepthwiseConv3x3(dim, bias=True), nn.GELU())
        self.gate_net = nn.Sequential(
            nn.Conv2d(dim * 2, dim, 1), nn.GELU(), nn.Conv2d(dim, 1, 1), nn.Sigmoid())

    def forward(self, x, clip_embed):
        if self.follow_autocast:
            # Outside autocast (DeepSpeed's bf16 weights in training) the fp32 CLIP prompt meets bf16 layers: cast it.
            return self.fuse_branches(x, clip_embed.to(self.norm.weight.dtype))
        with torch.autocast(device_type=x.device.type, enabled=False):
            dtype = self.norm.weight.dtype
            return self.fuse_branches(x.to(dtype), clip_embed.to(dtype))

    def fuse_branches(self, x, clip_embed):
        """G * global + (1 - G) * local, the DGF gate G computed from x and the CLIP prompt."""
        prompt = self.prompt_proj(clip_embed)[:, :, None, None].expand(-1, -1, *x.shape[-2:])
        gate = self.gate_net(torch.cat([x, prompt.to(x.dtype)], dim=1))
        return gate * self.global_branch(x) + (1 - gate) * self.conv_path(x)

    def global_branch(self, x):
        """LN -> Mamba over every scan order (batched, shared weights) -> mean -> LN; (B,C,H,W)."""
        b, _, h, w = x.shape
        grid = self.norm(x.permute(0, 2, 3, 1))
        sequences = torch.cat([to_scan_order(grid, order) for order in self.scan_orders], dim=0)
        scanned = self.mamba(sequences).split(b, dim=0)
        grids = [from_scan_order(seq, order, h, w) for seq, order in zip(scanned, self.scan_orders)]
        merged = grids[0] if len(grids) == 1 else torch.stack(grids).mean(0)
        return self.norm2(merged).permute(0, 3, 1, 2)


class MB(nn.Module):
    """One bottleneck block: (B, dim, H, W) features and a (B, clip_dim) CLIP embedding."""

    def __init__(self, dim: int, clip_dim: int, ffn_expansion_factor: float, bias: bool,
                 d_state: int = 16, d_conv: int = 4, expand: int = 2, scan: str = "raster",
                 scan_backend: str = "auto", follow_autocast: bool = False):
        super().__init__()
        self.norm1 = ChannelLayerNorm(dim)
        self.ssm = MambaLayer(dim, clip_dim, d_state, d_conv, expand, scan, scan_backend, follow_autocast)
        self.norm2 = ChannelLayerNorm(dim)
        self.ffn = GatedDconvFeedForward(dim, ffn_expansion_factor, bias)

    def forward(self, x, clip_embed):
        x = x + self.ssm(self.norm1(x), clip_embed)
        return x + self.ffn(self.norm2(x))
