"""A decoder skips the leading frames it would drop (``taesd.video.temporal.leading_drops``): every
mode (whole clip, bounded, streaming, tiled), plain and fast, gives bit for bit the frames of
computing every raw frame and trimming after, and the skipped frames really are not computed."""
from __future__ import annotations

import pytest
import torch

from taesd.video import TAEHV, make_fast
from taesd.video.runs import DecodeRun
from taesd.video.temporal import leading_drops

# (variant, latents, latent h x w, tile): causal 4x and 8x time, _super, _wide, H3's periodic trim across
# two chunks of five latents, CogVideoX (odd count: trimmed)
CASES = [("taehv1_5_super", 3, (5, 6), (2, 4)), ("taew2_1", 3, (5, 6), (3, 4)),
         ("taeltx2_3_wide", 2, (4, 5), (2, 2)), ("taeh3", 7, (4, 5), (3, 2)), ("taecvx", 3, (6, 5), 3)]


def _model(name: str, fast: bool) -> TAEHV:
    torch.manual_seed(0)
    model = TAEHV(name, parts="decoder").eval()
    return make_fast(model) if fast else model


def _modes(model: TAEHV, latents: torch.Tensor, tile) -> dict[str, torch.Tensor]:
    out = {"whole": model.decode(latents), "tiled": model.decode(latents, tile_size=tile)}
    if model.variant.trim != "cogvideox":      # its trim depends on the latent count: whole clips only
        out["chunk1"] = model.decode(latents, chunk=1)
        out["chunk2-tiled"] = model.decode(latents, chunk=2, tile_size=tile)
        stream = model.stream()
        got = [stream.decode(latents[:, t:t + 1]) for t in range(latents.shape[1])] + [stream.flush_decoder()]
        out["stream"] = torch.cat([g for g in got if g is not None], 1)
    return out


@pytest.mark.parametrize("fast", [False, True], ids=["plain", "fast"])
@pytest.mark.parametrize("name,n,size,tile", CASES, ids=[c[0] for c in CASES])
@torch.no_grad()
def test_skipping_dropped_frames_changes_no_bit(monkeypatch, name, n, size, tile, fast):
    model = _model(name, fast)
    latents = torch.randn(1, n, model.variant.latent_channels, *size, generator=torch.Generator().manual_seed(1))
    skipped = _modes(model, latents, tile)
    with monkeypatch.context() as m:
        m.setattr(DecodeRun, "_leading_drop", lambda self, n_latents: 0)   # compute every frame, trim after
        computed = _modes(model, latents, tile)
    for mode, frames in computed.items():
        assert torch.equal(skipped[mode], frames), (name, mode)
        assert torch.equal(frames, computed["whole"]), (name, mode)


@torch.no_grad()
def test_the_dropped_frames_are_not_computed():
    """taehv1_5_super (time 1x, 2x, 2x): of 3 latents' 12 raw frames the first 3 are dropped, so the
    first of the 6 frames after the second TGrow feeds nothing kept: the last memory block's output
    and every later layer skip it; the third raw frame is made (it shares a conv with the fourth)."""
    model = _model("taehv1_5_super", fast=True)
    layers = model.decoder
    drops = leading_drops(layers, 3)
    last_block = max(i for i, layer in enumerate(layers) if type(layer).__name__.endswith("SuperMemBlock"))
    assert drops[:last_block] == [0] * last_block          # input up to the last block's input: all made
    assert drops[last_block + 1:-2] == [1] * (len(layers) - last_block - 2)
    assert drops[-2:] == [1, 3]      # 1 of the 6 frames into the conv the last TGrow is folded into; 3 of 12
    seen = []
    layers[-1].register_forward_pre_hook(lambda module, args: seen.append(args[0].shape[0]))
    frames = model.decode(torch.randn(1, 3, model.variant.latent_channels, 4, 4))
    assert frames.shape[1] == 9
    assert seen == [5]       # the folded TGrow + conv on 5 of the 6 frames
    assert leading_drops(TAEHV("taew2_1", parts="encoder").encoder, 3) == [0] * 19   # a TPool: none
