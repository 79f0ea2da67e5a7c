"""Seam-exact tiling: tiled encode/decode equals the untiled pass, for every variant."""
import numpy as np
import pytest
import torch

import taesd
from conftest import photo
from taesd.cli import main
from taesd.errors import TaesdError
from taesd.settings import parse_bytes
from taesd.tiling import Pass, analyse, plan, splits

TOL = 1e-5
# Odd latent sizes, several tiles per side; f32/f16 images are 4x/2x larger per latent pixel.
SIZES = {8: (13, 19), 16: (9, 11), 32: (5, 7)}


def max_diff(a, b) -> float:
    return (a - b).abs().max().item()


@pytest.mark.parametrize("variant", list(taesd.VARIANTS))
def test_tiled_equals_untiled_fresh_weights(variant):
    model = taesd.create(variant, seed=0)
    v = model.variant
    h, w = SIZES[v.downscale]
    latents = torch.randn(2, v.latent_channels, h, w)
    images = torch.rand(2, v.image_channels, h * v.downscale, w * v.downscale)
    # Tiles much smaller than the image and than the receptive field (decoder: 19 latent pixels;
    # encoder: 24). Encoder tiles stay at 2 x 2: each re-reads its whole margin at full resolution.
    assert max_diff(model.decode(latents, tile_size=(3, 4)), model.decode(latents)) <= TOL
    tile = (-(-h // 2), -(-w // 2))
    assert max_diff(model.encode(images, tile_size=tile), model.encode(images)) <= TOL


def test_large_odd_latents_small_tiles():
    model = taesd.create("taesd", seed=0, parts="decoder")
    latents = torch.randn(1, 4, 97, 131)
    assert max_diff(model.decode(latents, tile_size=32), model.decode(latents)) <= TOL


def test_taef2_real_weights_staged_plan(taef2):
    # GroupNorm in the pool branch is global: its stage runs whole, the rest tiled.
    for part in ("encoder", "decoder"):
        stages = analyse(taef2, part).stages()
        assert [tiled for *_, tiled in stages].count(False) == 1 and len(stages) == 3
    image = photo("astronaut", 264)[None][..., :264, :200]
    latents = taef2.encode(image)
    assert max_diff(taef2.encode(image, tile_size=(17, 13)), latents) <= TOL
    assert max_diff(taef2.decode(latents, tile_size=(5, 7)), taef2.decode(latents)) <= TOL


def test_margin_is_the_true_receptive_field():
    """Perturbing a latent exactly one pixel beyond the computed margin leaves an output latent
    pixel's image region unchanged; perturbing at the margin changes it."""
    model = taesd.create("taesd", seed=0, parts="decoder")
    lo, hi = analyse(model, "decoder").margin()
    latents = torch.randn(1, 4, 4, 2 * (lo + hi) + 8)
    col = lo + 3
    base = model.decode(latents)[..., col * 8:(col + 1) * 8]

    def changed(at: int) -> bool:
        z = latents.clone()
        z[..., at] += 5
        return max_diff(model.decode(z)[..., col * 8:(col + 1) * 8], base) > 0

    assert changed(col - lo) and changed(col + hi)
    assert not changed(col - lo - 1) and not changed(col + hi + 1)


class CountingBackend(taesd.TAESD):
    """A stand-in for another backend: overrides run_part, records what it was asked to run."""

    def __init__(self, variant):
        super().__init__(variant)
        self.calls = []

    def run_part(self, part, x):
        self.calls.append(tuple(x.shape))
        return super().run_part(part, x)


def test_other_backends_tile_through_run_part_and_batches_are_not_redone():
    model = CountingBackend("taesd3")
    model.load_state_dict(taesd.create("taesd3", seed=3).state_dict())
    model.eval()
    latents = torch.randn(3, 16, 11, 14)
    reference = model.decode(latents)
    model.calls.clear()
    tiled = model.decode(latents, tile_size=5)
    assert max_diff(tiled, reference) <= TOL
    n_tiles = len(splits(11, 5)) * len(splits(14, 5))
    assert len(model.calls) == n_tiles and all(c[0] == 3 for c in model.calls)  # whole batch per tile


def test_budget_picks_tiles_and_batch_chunks_within_it():
    model = taesd.create("taef1", seed=0, parts="decoder")
    an = analyse(model, "decoder")
    budget = 64 * 2**20
    p = plan(an, Pass(4, 40, 60, 4, 3, overhead=1.2), max_memory=budget)
    assert p.tiled and p.estimate <= budget and p.tile[0] < 40
    untiled = plan(an, Pass(4, 40, 60, 4, 3, overhead=1.2))
    assert untiled.estimate > budget
    tight = plan(an, Pass(4, 40, 60, 4, 3, overhead=1.2), max_memory=24 * 2**20)
    assert tight.batch_chunk < 4 and tight.estimate <= 24 * 2**20
    latents = torch.randn(2, 16, 13, 17)
    assert max_diff(model.decode(latents, max_memory="6MiB"), model.decode(latents)) <= TOL


def test_tiling_switches_on_by_itself_when_untiled_would_not_fit():
    an = analyse(taesd.create("taesd", seed=0, parts="decoder"), "decoder")
    need = plan(an, Pass(1, 64, 64, 4, 3, overhead=1.2)).estimate
    assert not plan(an, Pass(1, 64, 64, 4, 3, overhead=1.2), available=need + 1).tiled
    auto = plan(an, Pass(1, 64, 64, 4, 3, overhead=1.2), available=need // 2)
    assert auto.tiled and auto.estimate <= need // 2


def test_parse_bytes():
    assert parse_bytes("1GiB") == 2**30
    assert parse_bytes("512 MiB") == 512 * 2**20
    assert parse_bytes("2GB") == 2 * 10**9
    assert parse_bytes("1.5g") == 1.5e9
    assert parse_bytes(4096) == 4096
    for bad in ("lots", "-1GiB", "1 parsec", 0):
        with pytest.raises(TaesdError):
            parse_bytes(bad)
    with pytest.raises(TaesdError, match="tile size"):
        taesd.create("taesd", parts="decoder").decode(torch.zeros(1, 4, 8, 8), tile_size=0)


def test_cli_tiled_decode_matches_untiled(tmp_path, weights, capsys):
    latents = torch.randn(1, 32, 11, 9)
    src = tmp_path / "z.taef2.safetensors"
    taesd.save_latents(src, latents, "taef2")
    args = ["decode", str(src), "--weights", str(weights)]
    assert main(args + ["-o", str(tmp_path / "whole.png")]) == 0
    assert main(args + ["-o", str(tmp_path / "tiled.png"), "--tile-size", "4"]) == 0
    assert main(args + ["-o", str(tmp_path / "budget.png"), "--max-memory", "4MiB"]) == 0
    whole = taesd.load_image(tmp_path / "whole.png")
    for name in ("tiled.png", "budget.png"):
        assert np.array_equal(taesd.load_image(tmp_path / name).numpy(), whole.numpy())
    assert main(args + ["--max-memory", "a lot"]) == 2
    assert "memory size" in capsys.readouterr().err


def test_cli_roundtrip_and_encode_accept_tiling(tmp_path, weights, capsys):
    src = tmp_path / "cat.png"
    taesd.save_image(photo("chelsea", 96), src)
    common = ["--variant", "taef2", "--weights", str(weights)]
    assert main(["roundtrip", str(src), *common, "--tile-size", "6", "-o", str(tmp_path / "rt.png")]) == 0
    assert "PSNR" in capsys.readouterr().out
    assert main(["encode", str(src), *common, "--max-memory", "8MiB", "-o", str(tmp_path / "a.safetensors")]) == 0
    assert main(["encode", str(src), *common, "-o", str(tmp_path / "b.safetensors")]) == 0
    a, b = taesd.load_latents(tmp_path / "a.safetensors")[0], taesd.load_latents(tmp_path / "b.safetensors")[0]
    assert max_diff(a, b) <= TOL


# ---------------------------------------------------------------- the default (fast, Winograd) path

EXACT = 1e-6
# Latent sizes whose high-resolution maps reach the Winograd threshold (48 x 48 output pixels,
# taesd.runtime.winograd.MIN_PIXELS), with tiles much smaller than the maps and odd splits.
WINOGRAD_SIZES = {8: (13, 19), 16: (7, 9), 32: (4, 5)}


def _winograd_runs(model, part, x) -> bool:
    from taesd.runtime import winograd
    convs = [m for m in model.part(part).modules() if getattr(m, "winograd", 0)]
    return bool(convs) and winograd.available()


@pytest.mark.parametrize("variant", list(taesd.VARIANTS))
def test_tiled_equals_untiled_on_the_winograd_path(variant):
    from taesd.runtime.executors.cpu import make_fast
    model = make_fast(taesd.create(variant, seed=0))
    v = model.variant
    if not _winograd_runs(model, "decoder", None):
        pytest.skip("the Winograd kernel cannot be built here")
    h, w = WINOGRAD_SIZES[v.downscale]
    latents = torch.randn(1, v.latent_channels, h, w)
    whole = model.decode(latents)
    assert whole.shape[-1] * whole.shape[-2] >= 48 * 48
    assert max_diff(model.decode(latents, tile_size=(3, 4)), whole) <= EXACT
    images = torch.rand(1, v.image_channels, h * v.downscale, w * v.downscale)
    lat = model.encode(images)
    tile = (-(-h // 2), -(-w // 2))
    assert max_diff(model.encode(images, tile_size=tile), lat) <= EXACT


def test_taef2_real_weights_winograd_tiling_is_seam_exact(taef2):
    # Before tiles followed the Winograd grid this differed by ~2e-5 (decoder) and 3e-6 (encoder).
    assert type(taef2.decoder).__name__ == "FastSequential"
    image = photo("astronaut", 256)[None][..., :256, :320 - 64]
    latents = taef2.encode(image)
    for tile in [(5, 7), (11, 13), (16, 16)]:
        assert max_diff(taef2.encode(image, tile_size=tile), latents) <= EXACT
    decoded = taef2.decode(latents)
    for tile in [(5, 7), (11, 13)]:
        assert max_diff(taef2.decode(latents, tile_size=tile), decoded) <= EXACT


def test_alignment_follows_the_winograd_grid(taef2):
    """Every crop start at a Winograd layer's input is a multiple of its tile size m."""
    from taesd.tiling.receptive import alignment_of, input_alignment
    an = analyse(taef2, "decoder")
    for i, layer in enumerate(an.module):
        m = input_alignment(layer, alignment_of(taef2))
        assert an.align[i] % m == 0
    assert max(input_alignment(layer, alignment_of(taef2)) for layer in an.module) == 4


def test_taef2_from_onnx_files_tiles(tmp_path):
    pytest.importorskip("onnxruntime")
    from taesd.export.onnx import onnx_filename, save_onnx, to_onnx
    from taesd.runtime.executors.onnxruntime import from_onnx_files
    model = taesd.create("taef2", seed=0)
    paths = [save_onnx(to_onnx(model, p), tmp_path / onnx_filename(model.variant, p, False))
             for p in model.parts]
    onnx_model = from_onnx_files("taef2", paths)
    image = torch.rand(1, 3, 128, 160)
    latents = onnx_model.encode(image)
    assert max_diff(onnx_model.encode(image, tile_size=(5, 7)), latents) <= 1e-5
    assert max_diff(onnx_model.decode(latents, tile_size=(5, 7)), onnx_model.decode(latents)) <= 1e-5
