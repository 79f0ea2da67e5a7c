"""``TAESD``: one variant's encoder and/or decoder (the literal lists of ``taesd.nn.arch``) with
the checks around them: images and latents in, tiled when asked or when memory is short.

``run_part`` is the single place that executes the network; the executors in ``taesd.runtime``
(fast CPU path, ONNX Runtime) change how it runs, never what it computes. Tiling
(``taesd.tiling``) asks the executor (``model.executor``) only for alignment and memory overhead.
"""
from __future__ import annotations

import operator

import torch
import torch.nn as nn

from taesd import tiling
from taesd.errors import TaesdError
from taesd.io.images import pad_to_multiple
from taesd.nn.arch import build_decoder, build_encoder
from taesd.registry import VARIANTS, Variant, get_variant
from taesd.value_checks import check_values


def count_parameters(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


class TAESD(nn.Module):
    """A TAESD encoder and/or decoder for one variant.

    ``encode``: images N x (3|4) x H x W in [0, 1] -> latents in TAESD's convention.
    ``decode``: latents -> images clamped to [0, 1].
    Either part may be absent (``parts=("encoder",)``), e.g. when only one weight file exists.
    """

    # How the parts run (taesd.runtime); None: the plain modules. Tiling asks it for
    # ``tile_alignment(conv)`` and ``memory_overhead``.
    executor = None

    def __init__(self, variant: str | Variant, parts=("encoder", "decoder")):
        super().__init__()
        self.variant = get_variant(variant)
        parts = (parts,) if isinstance(parts, str) else tuple(parts)
        self.encoder = build_encoder(self.variant) if "encoder" in parts else None
        self.decoder = build_decoder(self.variant) if "decoder" in parts else None
        # Where the weights came from (filled by taesd.load): path -> sha256, format.
        self.weights_info: dict = {}

    @property
    def parts(self) -> tuple[str, ...]:
        return tuple(p for p in ("encoder", "decoder") if getattr(self, p) is not None)

    @property
    def device(self) -> torch.device:
        return next(self.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        return next(self.parameters()).dtype

    @property
    def compute_dtype(self) -> torch.dtype:
        """The dtype the layers compute in (the executor's choice; inputs and outputs stay ``dtype``)."""
        executor = getattr(self, "executor", None)
        return self.dtype if executor is None else executor.compute_dtype(self)

    @property
    def layerwise(self) -> bool:
        """Whether tiling may run the part's layers one by one: the executor says so (ONNX Runtime
        runs a part as a whole, so tiling calls its ``run_part`` on each tile plus its margin); with
        no executor, when ``run_part`` is this class's (the PyTorch modules)."""
        executor = getattr(self, "executor", None)
        if executor is not None:
            return executor.layerwise
        return type(self).run_part is TAESD.run_part and "run_part" not in vars(self)

    def part(self, part: str) -> nn.Sequential:
        """The encoder or decoder module; a one-line error when it was not loaded."""
        module = getattr(self, part)
        if module is None:
            raise TaesdError(f"this {self.variant.name} model has no {part} loaded; "
                             f"load it with parts including {part!r}")
        return module

    def prepare_images(self, images: torch.Tensor) -> torch.Tensor:
        """Check an image batch and bring it to the encoder's channel count, dtype and device."""
        if not isinstance(images, torch.Tensor) or images.ndim not in (3, 4):
            raise TaesdError("images must be a tensor N x C x H x W (or C x H x W) with values in [0, 1]")
        if images.ndim == 3:
            images = images[None]
        want, got = self.variant.image_channels, images.shape[1]
        if got == 3 and want == 4:  # RGB into the RGBA variant: alpha 1
            images = torch.cat([images, torch.ones_like(images[:, :1])], 1)
        elif got != want:
            raise TaesdError(f"{self.variant.name} encodes {want}-channel images, got {got} channels")
        check_image_values(images)
        d = self.variant.downscale
        if images.shape[-2] % d or images.shape[-1] % d:
            raise TaesdError(f"image size {images.shape[-2]}x{images.shape[-1]} is not a multiple of "
                             f"{d}; pad it first (taesd.io.images.pad_to_multiple)")
        return images.to(device=self.device, dtype=self.dtype)

    def prepare_latents(self, latents: torch.Tensor) -> torch.Tensor:
        if not isinstance(latents, torch.Tensor) or latents.ndim not in (3, 4):
            raise TaesdError("latents must be a tensor N x C x h x w (or C x h x w)")
        if latents.ndim == 3:
            latents = latents[None]
        want, got = self.variant.latent_channels, latents.shape[1]
        if got != want:
            raise TaesdError(f"{self.variant.name} decodes {want}-channel latents, got {got} channels"
                             f"{_guess_variant_hint(got)}")
        if latents.numel() == 0:
            shape = "x".join(map(str, latents.shape))
            raise TaesdError(f"the latents are empty ({shape}); nothing to decode")
        if not (latents.is_floating_point() and not latents.is_complex()):
            raise TaesdError(f"latents must be floating point, got {latents.dtype}")
        check_values(latents, "latents")   # NaN/Inf; no host sync on a GPU (taesd.value_checks)
        return latents.to(device=self.device, dtype=self.dtype)

    def _apply(self, fn, *args, **kwargs):
        # .to() / .half() / .cuda(): the executor's class swaps and packed weights belong to the old
        # tensors. Undo it, move, and set up the executor the new device gets ("fast" follows the
        # device: the CUDA executor after .cuda(), the CPU one after .cpu()).
        executor = getattr(self, "executor", None)
        if executor is None or not executor.layerwise:   # ONNX Runtime: its sessions stay as they are
            return super()._apply(fn, *args, **kwargs)
        executor.undo(self)
        super()._apply(fn, *args, **kwargs)
        executor.for_device(self.device).apply(self)
        return self

    def run_part(self, part: str, x: torch.Tensor) -> torch.Tensor:
        """Run one part on a prepared batch. The single place that executes the network: faster
        executors and other backends replace this; tiling calls it per tile."""
        return self.part(part)(x)

    def encode(self, images: torch.Tensor, tile_size=None, max_memory=None) -> torch.Tensor:
        """``tile_size`` (latent pixels) / ``max_memory`` (bytes or "1GiB"): seam-exact tiling; with
        neither, tiling switches on when the untiled pass would not fit (see taesd.tiling).
        Image sides must be multiples of the variant's downscale; ``encode_image`` pads any size."""
        self.part("encoder")
        with torch.inference_mode():
            # contiguous: the fast executor works channels_last; callers get the standard layout
            x = self.prepare_images(images)
            y = tiling.run(self, "encoder", x.to(self.compute_dtype), tile_size, max_memory)
            return standard(y, self.dtype)

    def decode(self, latents: torch.Tensor, tile_size=None, max_memory=None,
               size: "tuple[int, int] | None" = None) -> torch.Tensor:
        """Latents -> images in [0, 1]; tiling options as in ``encode``. ``size`` (h, w): crop the
        images to it (the size ``encode_image`` returned for a padded image)."""
        self.part("decoder")
        with torch.inference_mode():
            z = self.prepare_latents(latents)
            if size is not None:
                size = self._check_size(size, z)
            images = tiling.run(self, "decoder", z.to(self.compute_dtype), tile_size, max_memory, clamp=False)
            if size is not None:
                images = images[..., :size[0], :size[1]]
            return standard(images, self.dtype).clamp_(0, 1)   # its own fresh tensor

    def _check_size(self, size, z: torch.Tensor) -> tuple[int, int]:
        """``size`` as (h, w) within what the latents ``z`` decode to, else a one-line error."""
        full_h, full_w = (n * self.variant.downscale for n in z.shape[-2:])
        try:
            h, w = (operator.index(n) for n in size)   # whole numbers only (numpy's too)
        except (TypeError, ValueError):
            h = w = 0
        if isinstance(size, (str, bytes)) or not (0 < h <= full_h and 0 < w <= full_w):
            raise TaesdError(f"size must be (height, width) in pixels, at most the decoded "
                             f"{full_h}x{full_w}; got {size!r}")
        return h, w

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """Round trip: encode then decode (differentiable, for training)."""
        return self.part("decoder")(self.part("encoder")(images))


def check_image_values(images: torch.Tensor) -> None:
    """One line for an image batch that is empty, not floating point (a uint8 0-255 batch), not
    finite, or far outside [0, 1]."""
    if images.numel() == 0:
        raise TaesdError(f"the images are empty ({'x'.join(map(str, images.shape))}); nothing to encode")
    if images.dtype == torch.bool or not images.is_floating_point():
        raise TaesdError(f"images must be float tensors in [0, 1], got {images.dtype}; "
                         f"convert with images.float() / 255 for 8-bit (0-255) pixels")
    check_values(images, "images")   # NaN/Inf, far outside [0, 1]; no host sync on a GPU


def _guess_variant_hint(channels: int) -> str:
    names = [v.name for v in VARIANTS.values() if v.latent_channels == channels]
    return f" (those fit {'/'.join(names)})" if names else ""


def standard(x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """x in ``dtype`` and the standard (NCHW-contiguous) layout that callers get. A channels_last map
    in another dtype converts and reorders in one copy, not two (a 1024² bf16 decode's RGB: 1.4 ms
    instead of 2.7 ms, measured)."""
    if x.dtype == dtype or x.is_contiguous():
        return x.to(dtype).contiguous()
    return torch.empty(x.shape, dtype=dtype, device=x.device).copy_(x)


def encode_image(model: TAESD, image: torch.Tensor, tile_size=None, max_memory=None
                 ) -> tuple[torch.Tensor, tuple[int, int]]:
    """Encode an image (C x H x W) or batch (N x C x H x W) of any size: padded at the bottom/right
    with edge pixels to the variant's downscale multiple. Returns (latents N x C x h x w, (H, W));
    ``model.decode(latents, size=(H, W))`` gives back images of the original size."""
    if not isinstance(image, torch.Tensor) or image.ndim not in (3, 4):
        raise TaesdError("images must be a tensor N x C x H x W (or C x H x W) with values in [0, 1]")
    padded, size = pad_to_multiple(image if image.ndim == 4 else image[None], model.variant.downscale)
    return model.encode(padded, tile_size=tile_size, max_memory=max_memory), (int(size[0]), int(size[1]))


def create(variant: str | Variant, parts=("encoder", "decoder"), device=None,
           dtype=None, seed: int | None = None) -> TAESD:
    """A freshly initialised TAESD of the given variant (PyTorch's default init)."""
    if seed is not None:
        torch.manual_seed(seed)
    model = TAESD(variant, parts).eval()
    if device is not None or dtype is not None:
        model.to(device=device, dtype=dtype)
    return model
