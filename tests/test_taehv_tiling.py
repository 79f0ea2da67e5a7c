"""Spatial tiling of TAEHV with the temporal state per tile: tiled equals untiled bit for bit (fp32,
fresh seeded weights) in whole-clip, bounded and streaming mode, for every layout family (MemBlock,
_super, _wide; patch sizes 1, 2, 4; 4x and 8x time; H3's chunked framing), plain and fast; and a
tile's activations are a tile's size, not a frame's."""
from __future__ import annotations

import pytest
import torch

from taesd.errors import TaesdError
from taesd.video import TAEHV, make_fast, tiling

# (variant, latents h x w, tile in latent pixels): tiles smaller than the receptive field
CASES = [("taew2_1", (7, 9), (3, 4)), ("taehv1_5", (5, 6), (2, 3)), ("taew2_2_super", (5, 6), (2, 4)),
         ("taeltx2_3_wide", (4, 5), (2, 2)), ("taeh3", (4, 5), (3, 2)), ("taecvx", (6, 5), 3)]


def _model(name: str, fast: bool) -> TAEHV:
    torch.manual_seed(0)
    model = TAEHV(name).eval()
    return make_fast(model) if fast else model


def _clips(model: TAEHV, size: tuple[int, int]):
    g = torch.Generator().manual_seed(1)
    v, (h, w) = model.variant, size
    frames = torch.rand(1, 2 * model.time_downscale + 1, 3, h * v.downscale, w * v.downscale, generator=g)
    latents = torch.randn(1, 3, v.latent_channels, h, w, generator=g)
    return frames, latents


def _stream(step, xs: torch.Tensor, flush) -> torch.Tensor:
    got = [step(xs[:, t:t + 1]) for t in range(xs.shape[1])] + [flush()]
    return torch.cat([g for g in got if g is not None], 1)


# Every layout plain; the fast executor on one layout of each block kind.
RUNS = [(*c, False) for c in CASES] + [(*c, True) for c in CASES
                                       if c[0] in ("taew2_1", "taew2_2_super", "taeltx2_3_wide")]


@pytest.mark.parametrize("split", ["large-maps", "all-layers"])
@pytest.mark.parametrize("name,size,tile,fast", RUNS, ids=[f"{r[0]}-{'fast' if r[3] else 'plain'}" for r in RUNS])
@torch.no_grad()
def test_tiled_equals_untiled_in_every_mode(name, size, tile, fast, split, monkeypatch):
    """By default only the large maps run in tiles (tiling.WHOLE_BELOW); every layer kind tiles
    exactly all the same (``all-layers``)."""
    if split == "all-layers":
        monkeypatch.setattr(tiling, "WHOLE_BELOW", 1)
    model = _model(name, fast)
    frames, latents = _clips(model, size)
    lat, out = model.encode(frames), model.decode(latents)
    assert torch.equal(model.encode(frames, tile_size=tile), lat)
    assert torch.equal(model.encode(frames, chunk=2, tile_size=tile), lat)
    assert torch.equal(model.decode(latents, tile_size=tile), out)
    stream = model.stream(tile_size=tile)
    assert torch.equal(_stream(stream.encode, frames, stream.flush_encoder), lat)
    if model.variant.trim == "cogvideox":      # its trimming depends on the latent count: whole vs bounded
        return
    assert torch.equal(model.decode(latents, chunk=1, tile_size=tile), out)
    assert torch.equal(_stream(stream.decode, latents, stream.flush_decoder), out)
    untiled = model.stream()
    _stream(untiled.decode, latents, untiled.flush_decoder)
    for i, s in untiled.state["decoder"].items():            # the tiles share the untiled state
        assert torch.equal(stream.state["decoder"][i], s)


@torch.no_grad()
def test_a_tile_holds_a_tile_not_a_frame():
    """The largest activation of a tiled decode is about a tile plus its margin (here ~1/5 of the frame)."""
    model = _model("taew2_1", fast=True)
    latents = torch.randn(1, 2, 16, 24, 24)
    biggest: list[int] = []
    hooks = [m.register_forward_hook(lambda _m, _i, y: biggest.append(y.numel())) for m in model.decoder]
    whole = model.decode(latents)
    whole_peak, biggest[:] = max(biggest), []
    tiled = model.decode(latents, tile_size=8)
    for h in hooks:
        h.remove()
    assert torch.equal(tiled, whole)
    assert max(biggest) <= 0.25 * whole_peak


def test_tiling_needs_whole_latent_pixels():
    model = _model("taew2_1", fast=False)
    with pytest.raises(TaesdError, match="multiple of 8"):
        model.encode(torch.rand(1, 1, 3, 36, 40), tile_size=2)


@torch.no_grad()
def test_tiles_follow_the_winograd_grid():
    """Maps large enough for the fast executor's Winograd kernels at every large stage: tiles lay
    their blocks on the untiled grid and pick the untiled map's algorithm, so still bit for bit."""
    from taesd.runtime import winograd
    if not winograd.available():
        pytest.skip("the Winograd kernel cannot be built here")
    model = _model("taew2_1", fast=True)
    latents = torch.randn(1, 2, 16, 20, 26, generator=torch.Generator().manual_seed(3))
    frames = torch.rand(1, 5, 3, 80, 104, generator=torch.Generator().manual_seed(4))
    whole, lat = model.decode(latents), model.encode(frames)
    assert torch.equal(model.decode(latents, chunk=1, tile_size=(7, 9)), whole)
    assert torch.equal(model.encode(frames, tile_size=(4, 5)), lat)


@torch.no_grad()
def test_wide_layers_take_the_smaller_tile_and_stay_exact(monkeypatch):
    """A _super decoder's 256 -> 512 conv (its F(4x4) weight would be 18 MiB, past the 12 MiB limit of
    a CPU with a 32 MiB L3) runs F(2x2) on a map big enough for Winograd (48x48 and more): close to
    the plain network, and tiles still give the untiled bits."""
    from taesd.runtime import isa, winograd
    if not winograd.available():
        pytest.skip("the Winograd kernel cannot be built here")
    monkeypatch.setattr(isa, "l3_cache_bytes", lambda: 32 * 2 ** 20)
    plain = _model("taew2_2_super", fast=False)
    model = _model("taew2_2_super", fast=True)
    wide = [c for c in model.decoder.modules() if isinstance(c, torch.nn.Conv2d)
            and (c.in_channels, c.out_channels, c.kernel_size) == (256, 512, (3, 3))]
    assert wide and all(c.winograd == 2 for c in wide)
    latents = torch.randn(1, 1, model.variant.latent_channels, 24, 26, generator=torch.Generator().manual_seed(5))
    whole = model.decode(latents)
    assert (whole - plain.decode(latents)).abs().max() <= 1e-4
    assert torch.equal(model.decode(latents, tile_size=(13, 10)), whole)


@torch.no_grad()
def test_diffusers_drop_in_tiles_on_enable_tiling():
    pytest.importorskip("diffusers")
    from taesd.integrations.diffusers.video import TaehvVAE
    vae = TaehvVAE.from_taehv(_model("taew2_1", fast=False))
    z = torch.randn(1, 16, 3, 6, 8, generator=torch.Generator().manual_seed(5))
    video = torch.rand(1, 3, 9, 48, 64, generator=torch.Generator().manual_seed(6)) * 2 - 1
    plain_out, plain_lat = vae.decode(z).sample, vae.encode(video).latents
    vae.enable_tiling(tile_size=3)
    assert torch.equal(vae.decode(z).sample, plain_out) and torch.equal(vae.encode(video).latents, plain_lat)
