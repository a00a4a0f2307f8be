"""Task prompt generator: one global prompt vector per image, a soft pick from a learnt dictionary.

CondNet (two stride-3 3x3 convs, three 1x1 convs, LeakyReLU(0.1) between) reads the whole network
input; its global average feeds a linear layer whose softmax weighs `atoms` dictionary rows of
width `prompt_dim`; GELU of the weighted sum is the prompt. Names follow the official code.
"""
import torch
import torch.nn as nn
import torch.nn.functional as F

LEAKY_SLOPE = 0.1


class TaskPrompt(nn.Module):
    """(B, in_channels, H, W) image -> (B, prompt_dim) task prompt. Needs H, W >= 9."""

    def __init__(self, in_channels: int = 3, cond_channels: int = 64, atoms: int = 32,
                 prompt_dim: int = 256):
        super().__init__()
        # The official width before the atom logits is a fixed 32, i.e. cond_channels // 2 at 64.
        summary_channels = cond_channels // 2
        self.CondNet = nn.Sequential(
            nn.Conv2d(in_channels, cond_channels, 3, stride=3), nn.LeakyReLU(LEAKY_SLOPE, True),
            nn.Conv2d(cond_channels, cond_channels, 3, stride=3), nn.LeakyReLU(LEAKY_SLOPE, True),
            nn.Conv2d(cond_channels, cond_channels, 1), nn.LeakyReLU(LEAKY_SLOPE, True),
            nn.Conv2d(cond_channels, cond_channels, 1), nn.LeakyReLU(LEAKY_SLOPE, True),
            nn.Conv2d(cond_channels, summary_channels, 1))
        self.lastOut = nn.Linear(summary_channels, atoms)
        self.dictionary = nn.Parameter(torch.randn(atoms, prompt_dim))

    def forward(self, image):
        summary = self.CondNet(image).mean((2, 3))
        atom_weights = self.lastOut(summary).softmax(dim=-1)
        return F.gelu(atom_weights @ self.dictionary)
