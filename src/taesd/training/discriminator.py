"""A latent-conditioned patch discriminator and the adversarial losses (hinge, least squares).

The discriminator sees an image together with the latents it was decoded from, and scores each
8x8 patch real or fake. Conditioning on the latents is what makes the decoder keep to the latent's
content while the adversarial term sharpens texture (the published recipe).
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F


class PatchDiscriminator(nn.Module):
    def __init__(self, latent_channels: int, width: int = 64, downscale: int = 8):
        super().__init__()
        steps = downscale.bit_length() - 1  # 2x-strided convs down to the latent grid
        layers: list[nn.Module] = [nn.Conv2d(3, width, 3, padding=1), nn.LeakyReLU(0.2)]
        for _ in range(steps):
            layers += [nn.Conv2d(width, width, 4, stride=2, padding=1), nn.LeakyReLU(0.2)]
        self.image = nn.Sequential(*layers)
        self.head = nn.Sequential(
            nn.Conv2d(width + latent_channels, width, 3, padding=1), nn.LeakyReLU(0.2),
            nn.Conv2d(width, 1, 1))

    def forward(self, images: torch.Tensor, latents: torch.Tensor) -> torch.Tensor:
        """images N x 3 x H x W in [0, 1], latents N x C x H/8 x W/8 -> logits N x 1 x H/8 x W/8."""
        feats = self.image(images * 2 - 1)
        latents = torch.tanh(latents / 3)  # the decoder's soft clamp, rescaled to (-1, 1)
        if latents.shape[-2:] != feats.shape[-2:]:
            latents = F.interpolate(latents, size=feats.shape[-2:], mode="nearest")
        return self.head(torch.cat([feats, latents.to(feats.dtype)], 1))


def discriminator_loss(real: torch.Tensor, fake: torch.Tensor, kind: str) -> torch.Tensor:
    if kind == "hinge":
        return F.relu(1 - real).mean() + F.relu(1 + fake).mean()
    return (real - 1).pow(2).mean() + fake.pow(2).mean()   # least squares


def generator_loss(fake: torch.Tensor, kind: str) -> torch.Tensor:
    if kind == "hinge":
        return -fake.mean()
    return (fake - 1).pow(2).mean()
