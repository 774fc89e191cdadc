"""Convolutional encoder and decoder of the VQ-VAE (torch only).

The encoder halves the resolution log2(downsample) times with stride-2 convolutions, then refines with
residual blocks; the decoder mirrors it. The decoder is told the image size, so odd sizes (28 px with
downsample 8: 28 -> 14 -> 7 -> 3) come back exactly (28, not 24).
"""

from __future__ import annotations

import math

from torch import Tensor, nn


def _check_downsample(downsample: int) -> int:
    if downsample not in (2, 4, 8, 16):
        raise ValueError(f"downsample must be 2, 4, 8 or 16, got {downsample}")
    return int(math.log2(downsample))


def latent_size(image_size: int, downsample: int) -> int:
    """Side of the code grid for a square image: each k=4, s=2, p=1 conv maps s -> floor(s / 2)."""
    s = image_size
    for _ in range(_check_downsample(downsample)):
        s = s // 2
    return s


class ResBlock(nn.Module):
    """x + conv1x1(act(conv3x3(act(x)))) — the VQ-VAE paper's bottlenecked residual block."""

    def __init__(self, channels: int, res_width: int) -> None:
        super().__init__()
        self.block = nn.Sequential(
            nn.SiLU(),
            nn.Conv2d(channels, res_width, 3, padding=1),
            nn.SiLU(),
            nn.Conv2d(res_width, channels, 1),
        )

    def forward(self, x: Tensor) -> Tensor:
        return x + self.block(x)


class Encoder(nn.Module):
    """images (B, C, S, S) -> features (B, code_dim, S/f, S/f)."""

    def __init__(
        self,
        in_channels: int = 1,
        width: int = 128,
        res_blocks: int = 2,
        res_width: int = 64,
        downsample: int = 4,
        code_dim: int = 64,
    ) -> None:
        super().__init__()
        steps = _check_downsample(downsample)
        layers: list[nn.Module] = []
        c_in = in_channels
        for i in range(steps):
            # Widths grow toward the bottleneck: width / 2^(steps-1-i).
            c_out = max(width // 2 ** (steps - 1 - i), 16)
            layers += [nn.Conv2d(c_in, c_out, 4, stride=2, padding=1), nn.SiLU()]
            c_in = c_out
        layers.append(nn.Conv2d(c_in, width, 3, padding=1))
        layers += [ResBlock(width, res_width) for _ in range(res_blocks)]
        layers += [nn.SiLU(), nn.Conv2d(width, code_dim, 1)]
        self.net = nn.Sequential(*layers)

    def forward(self, images: Tensor) -> Tensor:
        return self.net(images)


class Decoder(nn.Module):
    """features (B, code_dim, s, s) -> images (B, C, S, S), S = image_size exactly."""

    def __init__(
        self,
        out_channels: int = 1,
        width: int = 128,
        res_blocks: int = 2,
        res_width: int = 64,
        downsample: int = 4,
        code_dim: int = 64,
        image_size: int = 28,
    ) -> None:
        super().__init__()
        steps = _check_downsample(downsample)
        # The sizes the encoder passed through, so each upsampling step restores the right one.
        sizes = [image_size]
        for _ in range(steps):
            sizes.append(sizes[-1] // 2)
        self.sizes = sizes[::-1][1:]  # targets of each upsampling step, smallest first
        self.stem = nn.Sequential(
            nn.Conv2d(code_dim, width, 3, padding=1),
            *[ResBlock(width, res_width) for _ in range(res_blocks)],
            nn.SiLU(),
        )
        ups = []
        c_in = width
        for i in range(steps):
            c_out = max(width // 2 ** (i + 1), 16)
            ups.append(nn.ConvTranspose2d(c_in, c_out, 4, stride=2, padding=1))
            c_in = c_out
        self.ups = nn.ModuleList(ups)
        self.act = nn.SiLU()
        self.head = nn.Conv2d(c_in, out_channels, 3, padding=1)

    def forward(self, z: Tensor) -> Tensor:
        x = self.stem(z)
        for up, size in zip(self.ups, self.sizes):
            # Transposed conv with k=4, s=2, p=1 gives 2s; output_size=7 adds the odd row (from 3).
            x = self.act(up(x, output_size=(size, size)))
        return self.head(x)
