"""Image quality metrics on tensors in [0, 1]: PSNR and SSIM (Wang et al. 2004, Gaussian
window 11 / sigma 1.5, per channel, the same definition as scikit-image's with
``gaussian_weights=True, use_sample_covariance=False, data_range=1``)."""
from __future__ import annotations

import torch
import torch.nn.functional as F

from taesd.errors import TaesdError

SSIM_WINDOW = 11


def psnr(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Per-image PSNR in dB for batches N x C x H x W (or one image C x H x W)."""
    a, b = _batch(a), _batch(b)
    mse = (a.double() - b.double()).pow(2).flatten(1).mean(1)
    return (10 * torch.log10(1 / mse.clamp_min(1e-20))).float()


def check_ssim_size(x: torch.Tensor) -> None:
    """SSIM's 11 x 11 window needs images at least that big: refuse smaller ones in one line."""
    h, w = x.shape[-2:]
    if h < SSIM_WINDOW or w < SSIM_WINDOW:
        raise TaesdError(f"the image is {w}x{h} pixels; SSIM needs at least {SSIM_WINDOW}x{SSIM_WINDOW}")


def _gaussian_window(size: int = SSIM_WINDOW, sigma: float = 1.5) -> torch.Tensor:
    x = torch.arange(size, dtype=torch.float64) - (size - 1) / 2
    g = torch.exp(-x ** 2 / (2 * sigma ** 2))
    return g / g.sum()


def ssim(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Per-image mean SSIM for batches N x C x H x W."""
    a, b = _batch(a).double(), _batch(b).double()
    check_ssim_size(a)
    n, c = a.shape[:2]
    g = _gaussian_window()
    wx = g.view(1, 1, 1, -1).repeat(c, 1, 1, 1)
    wy = g.view(1, 1, -1, 1).repeat(c, 1, 1, 1)

    def blur(x):
        return F.conv2d(F.conv2d(x, wx, groups=c), wy, groups=c)

    mu_a, mu_b = blur(a), blur(b)
    var_a = blur(a * a) - mu_a ** 2
    var_b = blur(b * b) - mu_b ** 2
    cov = blur(a * b) - mu_a * mu_b
    c1, c2 = 0.01 ** 2, 0.03 ** 2
    s = ((2 * mu_a * mu_b + c1) * (2 * cov + c2)) / ((mu_a ** 2 + mu_b ** 2 + c1) * (var_a + var_b + c2))
    return s.flatten(1).mean(1).float()


def _batch(x: torch.Tensor) -> torch.Tensor:
    return x[None] if x.ndim == 3 else x
