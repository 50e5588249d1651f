"""The networks of the latent diffusion prior (vae/diffusion_prior.py): (u_t, t) -> the predicted v.

Two designs, each registered under the name its fitted state stores in "architecture":
  flat   residual blocks at the latent's own resolution (every checkpoint fitted before the U-Net has this one)
  unet   a small U-Net: residual blocks at the latent's resolution, at half and at a quarter of it, with
         self-attention at the coarsest level and skip connections back up (Ronneberger et al. 2015; the
         layout of DDPM's network, Ho et al. 2020, shrunk to an 8x8 or 16x16 latent)

On a 16x16 latent the flat network spends all its FLOPs on 256 positions; the U-Net spends most of its on 64 and
16, with twice and four times the channels there, so each step costs less and the coarse levels see the whole
flower. A dense latent (D,) is a (D, 1, 1) map: no level can halve it, so both designs are MLPs of 1x1
convolutions there.
"""

import math

import torch
from torch import nn
from torch.nn import functional as F

DENOISERS = {}  # "architecture" of a fitted state -> network class


def register_denoiser(name):
    def add(cls):
        cls.architecture = name
        DENOISERS[name] = cls
        return cls
    return add


def build_denoiser(architecture, channels, spatial_size, **options):
    """The registered network `architecture` for a (channels, *spatial_size) map."""
    return DENOISERS[architecture](channels, spatial_size, **options)


class TimeEmbedding(nn.Module):
    """t in [0, 1] -> a vector of `width`: sinusoids of 1000 t at geometric frequencies, then a small MLP."""

    def __init__(self, width):
        super().__init__()
        self.width = width
        self.mlp = nn.Sequential(nn.Linear(width, width), nn.SiLU(), nn.Linear(width, width))

    def forward(self, t):
        half = self.width // 2
        frequencies = torch.exp(-math.log(10_000) * torch.arange(half, device=t.device) / half)
        angles = 1000 * t[:, None] * frequencies[None]
        return self.mlp(torch.cat([angles.sin(), angles.cos()], dim=1))


class DenoiserBlock(nn.Module):
    """Pre-activation residual block: GroupNorm, SiLU, convolution, with the time embedding as a per-channel scale
    and shift between the two convolutions. With out_width != width, a 1x1 convolution maps the skip path."""

    def __init__(self, width, kernel_size=3, embedding_width=None, out_width=None):
        super().__init__()
        out_width = out_width or width
        self.norm1 = nn.GroupNorm(math.gcd(8, width), width)
        self.norm2 = nn.GroupNorm(math.gcd(8, out_width), out_width)
        self.conv1 = nn.Conv2d(width, out_width, kernel_size, padding=kernel_size // 2)
        self.conv2 = nn.Conv2d(out_width, out_width, kernel_size, padding=kernel_size // 2)
        self.time = nn.Linear(embedding_width or width, 2 * out_width)
        self.skip = nn.Conv2d(width, out_width, 1) if out_width != width else nn.Identity()
        nn.init.zeros_(self.conv2.weight)  # each block starts as the identity (of its skip path)
        nn.init.zeros_(self.conv2.bias)

    def forward(self, h, embedding):
        scale, shift = self.time(embedding)[:, :, None, None].chunk(2, dim=1)
        out = self.conv1(F.silu(self.norm1(h)))
        out = self.norm2(out) * (1 + scale) + shift
        return self.skip(h) + self.conv2(F.silu(out))


@register_denoiser("flat")
class Denoiser(nn.Module):
    """v-prediction network: (u_t (B, C, H, W), t (B,)) -> predicted v (B, C, H, W).

    num_blocks residual blocks of `width` channels at the latent's own resolution: on an 8x8 grid four blocks
    (eight 3x3 convolutions) see the whole grid, so every position is denoised knowing the whole flower. A dense
    latent, a (D, 1, 1) map, gets 1x1 convolutions: an MLP, with none of a 3x3 kernel's taps wasted on padding.
    """

    def __init__(self, channels, spatial_size=(8, 8), width=64, num_blocks=4):
        super().__init__()
        kernel_size = 1 if tuple(spatial_size) == (1, 1) else 3
        padding = kernel_size // 2
        self.time = TimeEmbedding(width)
        self.stem = nn.Conv2d(channels, width, kernel_size, padding=padding)
        self.blocks = nn.ModuleList(DenoiserBlock(width, kernel_size) for _ in range(num_blocks))
        self.out = nn.Sequential(nn.GroupNorm(math.gcd(8, width), width), nn.SiLU(),
                                 nn.Conv2d(width, channels, kernel_size, padding=padding))

    def forward(self, u, t):
        embedding = self.time(t)
        h = self.stem(u)
        for block in self.blocks:
            h = block(h, embedding)
        return self.out(h)


class SelfAttention(nn.Module):
    """Multi-head self-attention over the positions of a map, pre-normalised and residual (its output projection
    starts at zero, so the block starts as the identity)."""

    def __init__(self, width, heads=4):
        super().__init__()
        self.heads = heads
        self.norm = nn.GroupNorm(math.gcd(8, width), width)
        self.qkv = nn.Conv2d(width, 3 * width, 1)
        self.out = nn.Conv2d(width, width, 1)
        nn.init.zeros_(self.out.weight)
        nn.init.zeros_(self.out.bias)

    def forward(self, h):
        batch, width, height, breadth = h.shape
        q, k, v = self.qkv(self.norm(h)).reshape(batch, 3, self.heads, width // self.heads, height * breadth) \
            .transpose(-1, -2).unbind(1)
        attended = F.scaled_dot_product_attention(q, k, v)  # (B, heads, positions, width / heads)
        return h + self.out(attended.transpose(-1, -2).reshape(batch, width, height, breadth))


def unet_levels(spatial_size, most=2):
    """How many times the U-Net halves a map of spatial_size: up to `most`, while both sides stay even and the
    coarsest level keeps at least 2x2 positions."""
    levels, size = 0, tuple(spatial_size)
    while levels < most and all(side % 2 == 0 and side >= 4 for side in size):
        levels, size = levels + 1, tuple(side // 2 for side in size)
    return levels


@register_denoiser("unet")
class UNetDenoiser(nn.Module):
    """v-prediction U-Net: (u_t (B, C, H, W), t (B,)) -> predicted v (B, C, H, W).

    Level l (0: the latent's resolution) has width * multipliers[l] channels and num_blocks residual blocks on the
    way down, each of whose outputs is concatenated back in on the way up; a stride-2 convolution goes down a
    level and nearest up-sampling with a 3x3 convolution comes back. The coarsest level adds self-attention
    between two blocks, so every position sees the whole latent. unet_levels() decides how many levels a latent
    has: an 8x8 latent gets 8x8, 4x4 and 2x2; a dense one none (then the network is flat, of 1x1 convolutions).
    A condition vector, when given, joins the time embedding, so every block is scaled and shifted by both.
    """

    def __init__(self, channels, spatial_size=(8, 8), width=64, num_blocks=2, multipliers=(1, 2, 2)):
        super().__init__()
        levels = unet_levels(spatial_size, most=len(multipliers) - 1)
        kernel_size = 1 if tuple(spatial_size) == (1, 1) else 3
        padding = kernel_size // 2
        widths = [width * multiplier for multiplier in multipliers[:levels + 1]]
        self.embedding_width = embedding_width = 4 * width  # of the time embedding, and of a condition added to it
        self.time = nn.Sequential(TimeEmbedding(width), nn.Linear(width, embedding_width))
        self.stem = nn.Conv2d(channels, width, kernel_size, padding=padding)
        self.down, self.downsample = nn.ModuleList(), nn.ModuleList()
        skip_widths, current = [width], width
        for level, level_width in enumerate(widths):
            blocks = nn.ModuleList()
            for _ in range(num_blocks):
                blocks.append(DenoiserBlock(current, kernel_size, embedding_width, level_width))
                current = level_width
                skip_widths.append(current)
            self.down.append(blocks)
            if level < levels:
                self.downsample.append(nn.Conv2d(current, current, 3, stride=2, padding=1))
                skip_widths.append(current)
        self.middle = nn.ModuleList([DenoiserBlock(current, kernel_size, embedding_width),
                                     DenoiserBlock(current, kernel_size, embedding_width)])
        self.attention = SelfAttention(current) if levels > 0 else nn.Identity()
        self.up, self.upsample = nn.ModuleList(), nn.ModuleList()
        for level in reversed(range(len(widths))):
            blocks = nn.ModuleList()
            for _ in range(num_blocks + 1):
                blocks.append(DenoiserBlock(current + skip_widths.pop(), kernel_size, embedding_width,
                                            widths[level]))
                current = widths[level]
            self.up.append(blocks)
            if level > 0:
                self.upsample.append(nn.Conv2d(current, current, 3, padding=1))
        self.out = nn.Sequential(nn.GroupNorm(math.gcd(8, current), current), nn.SiLU(),
                                 nn.Conv2d(current, channels, kernel_size, padding=padding))
        nn.init.zeros_(self.out[-1].weight)  # the network starts by predicting v = 0
        nn.init.zeros_(self.out[-1].bias)

    def forward(self, u, t, condition=None):
        """condition: None, or (B, embedding_width) added to the time embedding (vae/kind_prior.py's code)."""
        embedding = self.time(t) if condition is None else self.time(t) + condition
        h = self.stem(u)
        skips = [h]
        for level, blocks in enumerate(self.down):
            for block in blocks:
                h = block(h, embedding)
                skips.append(h)
            if level < len(self.downsample):
                h = self.downsample[level](h)
                skips.append(h)
        h = self.middle[0](h, embedding)
        h = self.middle[1](self.attention(h), embedding)
        for level, blocks in enumerate(self.up):
            for block in blocks:
                h = block(torch.cat([h, skips.pop()], dim=1), embedding)
            if level < len(self.upsample):
                h = self.upsample[level](F.interpolate(h, scale_factor=2.0, mode="nearest"))
        return self.out(h)
