"""Our AMX 3x3 kernel (bf16 compute on AMX CPUs): the sums of F.conv2d on the same bf16 values, the
upsampled input read on the fly, bits that do not depend on where a pixel sits in the map (so tiles
stay exact), and the decoder's Upsample + conv pairs running it. Skipped off AMX, with the reason."""
import copy

import pytest
import torch
import torch.nn.functional as F

import taesd
from taesd.runtime import amx
from taesd.runtime.executors import CpuExecutor

pytestmark = pytest.mark.skipif(not amx.available(), reason=f"no AMX kernel here: {amx.load_error()}")


def bf16(*shape):
    return torch.randn(*shape).to(torch.bfloat16).contiguous(memory_format=torch.channels_last)


def reference(x, weight, bias=None, res=None, relu=False, upsample=False):
    x = x.double()
    if upsample:
        x = F.interpolate(x, scale_factor=2)
    y = F.conv2d(x, weight.to(torch.bfloat16).double(), None if bias is None else bias.double(), padding=1)
    if res is not None:
        y = y + res.double()
    return F.relu(y) if relu else y


@pytest.mark.parametrize("shape", [(1, 64, 64, 64, 64), (2, 32, 37, 53, 32), (1, 96, 9, 70, 64)])
@pytest.mark.parametrize("upsample", [False, True])
def test_kernel_matches_the_convolution_of_the_same_bf16_values(shape, upsample):
    """Partial 32-pixel groups at the right edge, batches, 1-3 input-channel blocks; bias, residual and
    ReLU fused. Sums in fp32, one rounding to bf16 at the end: within a bf16 step of the exact result."""
    n, ci, h, w, co = shape
    x, weight, bias = bf16(n, ci, h, w), torch.randn(co, ci, 3, 3) / (3 * ci ** 0.5), torch.randn(co)
    oh, ow = (2 * h, 2 * w) if upsample else (h, w)
    res = bf16(n, co, oh, ow)
    packed = amx.pack_weight(weight)
    for b, r, relu in ((bias, None, False), (None, res, True), (bias, res, True)):
        y = amx.conv3x3(x, packed, co, b, residual=r, relu=relu, upsample=upsample)
        ref = reference(x, weight, b, r, relu, upsample)
        assert y.shape == ref.shape and y.dtype == torch.bfloat16
        assert y.is_contiguous(memory_format=torch.channels_last)
        assert ((y.double() - ref).abs() <= ref.abs() / 128 + 1e-2).all()


@pytest.mark.parametrize("shape", [(1, 64, 64, 64, 64), (2, 32, 37, 53, 32), (1, 64, 5, 70, 64)])
def test_stride_2_matches_the_convolution(shape):
    """The encoder's downsampling convs: odd sizes (the last output row and column read the zero pad)."""
    n, ci, h, w, co = shape
    x, weight, bias = bf16(n, ci, h, w), torch.randn(co, ci, 3, 3) / (3 * ci ** 0.5), torch.randn(co)
    y = amx.conv3x3(x, amx.pack_weight(weight), co, bias, stride=2)
    ref = F.conv2d(x.double(), weight.to(torch.bfloat16).double(), bias.double(), padding=1, stride=2)
    assert y.shape == ref.shape and ((y.double() - ref).abs() <= ref.abs() / 128 + 1e-2).all()
    crop = amx.conv3x3(x[:, :, 2:, 4:], amx.pack_weight(weight), co, bias, stride=2)   # even offsets
    assert torch.equal(crop[:, :, 1:, 1:], y[:, :, 2:, 3:])


@pytest.mark.parametrize("upsample", [False, True])
def test_a_pixel_gets_the_same_bits_wherever_it_sits(upsample):
    """The convolution of a crop equals the map's convolution inside the crop's border, bit for bit
    (what seam-exact tiling needs), and a changed pixel moves only its neighbourhood."""
    x, weight, bias = bf16(1, 64, 40, 72), torch.randn(64, 64, 3, 3) / 24, torch.randn(64)
    packed = amx.pack_weight(weight)
    whole = amx.conv3x3(x, packed, 64, bias, relu=True, upsample=upsample)
    crop = amx.conv3x3(x[:, :, 7:29, 13:50], packed, 64, bias, relu=True, upsample=upsample)
    s = 2 if upsample else 1
    assert torch.equal(crop[:, :, s:-s, s:-s], whole[:, :, 7 * s + s:29 * s - s, 13 * s + s:50 * s - s])
    x2 = x.clone()
    x2[0, :, 20, 30] += 1
    diff = (amx.conv3x3(x2, packed, 64, bias, upsample=upsample).float() - amx.conv3x3(
        x, packed, 64, bias, upsample=upsample).float()).abs().sum(1)[0]
    rows, cols = slice(20 * s - 1, 21 * s + 1), slice(30 * s - 1, 31 * s + 1)   # what the 3x3 reaches
    assert diff[rows, cols].min() > 0
    diff[rows, cols] = 0
    assert diff.max() == 0


@pytest.mark.parametrize("shape", [(1, 64, 37, 53), (2, 32, 20, 70), (1, 64, 3, 40)])
def test_the_fused_block_gives_the_bits_of_its_three_convolutions(shape):
    """One pass through relu(conv2(relu(conv1(relu(conv0 x)))) + x) with the intermediate rows in
    rings: the same bits as the three convolutions one after the other (each rounds to bf16), at
    partial widths, in batches and on maps shorter than the rows it recomputes at range edges."""
    n, c, h, w = shape
    x = bf16(n, c, h, w)
    weights, biases = [torch.randn(c, c, 3, 3) / (3 * c ** 0.5) for _ in range(3)], [torch.randn(c) / 4 for _ in range(3)]
    packed = [amx.pack_weight(wt) for wt in weights]
    h1 = amx.conv3x3(x, packed[0], c, biases[0], relu=True)
    h2 = amx.conv3x3(h1, packed[1], c, biases[1], relu=True)
    separate = amx.conv3x3(h2, packed[2], c, biases[2], residual=x, relu=True)
    for threads in (1, 2, 3):
        with torch.inference_mode():
            before = torch.get_num_threads()
            torch.set_num_threads(threads)
            try:
                fused = amx.block(x, packed, biases)
            finally:
                torch.set_num_threads(before)
        assert torch.equal(fused, separate), threads
    ref = reference(reference(reference(x, weights[0], biases[0], relu=True).to(torch.bfloat16), weights[1],
                              biases[1], relu=True).to(torch.bfloat16), weights[2], biases[2], x, relu=True)
    assert ((fused.double() - ref).abs() <= ref.abs() / 64 + 2e-2).all()


@pytest.mark.parametrize("shape", [(1, 64, 37, 53), (2, 32, 20, 70), (1, 64, 5, 40), (1, 64, 64, 64)])
@pytest.mark.parametrize("kind", ["upsample+block", "block+stride2"])
def test_a_chain_gives_the_bits_of_its_layers_one_by_one(shape, kind):
    """``amx.chain``: an upsample + conv and the block after it, or a block and the stride-2 conv after
    it, in one pass (rings of rows, each range's edge rows recomputed): the same bits as the layers
    run one after the other, at partial widths, odd heights, in batches, on maps shorter than the rows
    a range recomputes, at 1-3 threads."""
    n, c, h, w = shape
    x = bf16(n, c, h, w)
    weights = [torch.randn(c, c, 3, 3) / (3 * c ** 0.5) for _ in range(4)]
    biases = [torch.randn(c) / 4 for _ in range(4)]
    packed = [amx.pack_weight(wt) for wt in weights]
    block = [amx.ChainStage(p, c, b, relu=True) for p, b in zip(packed[1:], biases[1:])]
    if kind == "upsample+block":
        block[2] = amx.ChainStage(packed[3], c, biases[3], relu=True, skip=1)
        stages, up = [amx.ChainStage(packed[0], c, biases[0])] + block, True
        separate = amx.block(amx.conv3x3(x, packed[0], c, biases[0], upsample=True), packed[1:], biases[1:])
    else:
        block[2] = amx.ChainStage(packed[3], c, biases[3], relu=True, skip=0)
        stages, up = block + [amx.ChainStage(packed[0], c, None, stride=2)], False
        separate = amx.conv3x3(amx.block(x, packed[1:], biases[1:]), packed[0], c, None, stride=2)
    for threads in (1, 2, 3):
        before = torch.get_num_threads()
        torch.set_num_threads(threads)
        try:
            chained = amx.chain(x, stages, upsample=up)
        finally:
            torch.set_num_threads(before)
        assert torch.equal(chained, separate), threads


@pytest.mark.parametrize("shape", [(1, 3, 64, 64), (2, 3, 37, 53), (1, 1, 50, 33), (1, 2, 9, 70)])
def test_the_first_conv_gathers_its_patches_and_matches_the_convolution(shape):
    """A first conv from at most 3 channels as an im2col stage (27 inputs per pixel in one tile row):
    within a bf16 step of the exact sums, edges zero-padded, and a crop gives the same bits inside."""
    n, c, h, w = shape
    x = torch.rand(n, c, h, w).to(torch.bfloat16).contiguous(memory_format=torch.channels_last)
    weight, bias = torch.randn(64, c, 3, 3) / 3, torch.randn(64)
    stage = amx.ChainStage(amx.pack_im2col_weight(weight), 64, bias, relu=True, im2col=True)
    y = amx.chain(x, [stage])
    ref = reference(x, weight, bias, relu=True)
    assert ((y.double() - ref).abs() <= ref.abs() / 128 + 1e-2).all()
    crop = amx.chain(x[:, :, 5:, 7:].contiguous(memory_format=torch.channels_last), [stage])
    assert torch.equal(crop[:, :, 1:-1, 1:-1], y[:, :, 6:-1, 8:-1])
    block = [amx.ChainStage(amx.pack_weight(torch.randn(64, 64, 3, 3) / 24), 64, None, relu=True,
                            skip=1 if k == 2 else None) for k in range(3)]
    packed = [s.packed for s in block]
    assert torch.equal(amx.chain(x, [stage] + block), amx.block(y, packed, [None] * 3))


@pytest.mark.parametrize("shape", [(1, 64, 64, 64, 3), (2, 64, 37, 53, 3), (1, 32, 50, 70, 16), (1, 96, 9, 130, 1)])
def test_the_last_conv_runs_as_a_narrow_stage(shape):
    """A last conv to at most 16 channels on one B tile, 64 pixels a step: within a bf16 step of the
    exact sums, partial 64-pixel groups, batches, a crop gives the same bits inside, and chained after
    a block the bits of the two run one by one."""
    n, c, h, w, co = shape
    x = bf16(n, c, h, w)
    weight, bias = torch.randn(co, c, 3, 3) / (3 * c ** 0.5), torch.randn(co)
    stage = amx.ChainStage(amx.pack_narrow_weight(weight), co, bias, narrow=True)
    y = amx.chain(x, [stage])
    assert y.shape == (n, co, h, w) and y.is_contiguous(memory_format=torch.channels_last)
    ref = reference(x, weight, bias)
    assert ((y.double() - ref).abs() <= ref.abs() / 128 + 1e-2).all()
    crop = amx.chain(x[:, :, 5:, 7:].contiguous(memory_format=torch.channels_last), [stage])
    assert torch.equal(crop[:, :, 1:-1, 1:-1], y[:, :, 6:-1, 8:-1])
    packed = [amx.pack_weight(torch.randn(c, c, 3, 3) / (3 * c ** 0.5)) for _ in range(3)]
    block = [amx.ChainStage(p, c, None, relu=True, skip=0 if k == 2 else None) for k, p in enumerate(packed)]
    assert torch.equal(amx.chain(x, block + [stage]), amx.chain(amx.block(x, packed, [None] * 3), [stage]))


@pytest.mark.parametrize("kind", ["upsample+block", "first conv", "block+stride2"])
def test_a_chain_reads_a_column_strip_in_place(kind, monkeypatch):
    """A column strip of a wider channels_last map (its rows that map's rows apart) is read where it
    lies, not copied first: the bits of the strip made contiguous, in a batch; a view whose pixels are
    not channels_last is copied as before."""
    n, c = 2, (3 if kind == "first conv" else 32)
    wide = torch.randn(n, c, 19, 70).to(torch.bfloat16).contiguous(memory_format=torch.channels_last)
    strip = wide[..., 13:50]
    assert amx.rows_apart(strip) and not strip.is_contiguous(memory_format=torch.channels_last)
    co = 64 if kind == "first conv" else c
    packed = [amx.pack_weight(torch.randn(co, co, 3, 3) / (3 * co ** 0.5)) for _ in range(4)]
    block = [amx.ChainStage(p, co, None, relu=True, skip=(0 if kind == "block+stride2" else 1) if k == 2 else None)
             for k, p in enumerate(packed[1:])]
    if kind == "upsample+block":
        stages = [amx.ChainStage(packed[0], c, None)] + block
    elif kind == "first conv":
        stages = [amx.ChainStage(amx.pack_im2col_weight(torch.randn(64, 3, 3, 3)), 64, None, im2col=True)] + block
    else:
        stages = block + [amx.ChainStage(packed[0], c, None, stride=2)]
    call = amx.prepare_chain(tuple(strip.shape), stages, upsample=kind == "upsample+block")
    copies = []
    real_contiguous = torch.Tensor.contiguous
    monkeypatch.setattr(torch.Tensor, "contiguous", lambda t, *a, **k: copies.append(t.shape) or
                        real_contiguous(t, *a, **k))
    in_place = call(strip)
    assert copies == []
    assert torch.equal(in_place, call(real_contiguous(strip, memory_format=torch.channels_last)))
    call(strip.contiguous())   # NCHW: copied to channels_last first
    assert copies


def test_a_chain_refuses_what_it_cannot_run():
    x, p = bf16(1, 64, 16, 16), amx.pack_weight(torch.randn(64, 64, 3, 3))
    with pytest.raises(ValueError, match="does not fit"):
        amx.chain(x, [amx.ChainStage(amx.pack_weight(torch.randn(32, 64, 3, 3)), 64)])
    with pytest.raises(RuntimeError, match="refused"):   # a skip from a map of another size
        amx.chain(x, [amx.ChainStage(p, 64, stride=2), amx.ChainStage(p, 64, skip=0)])
    narrow = amx.ChainStage(amx.pack_narrow_weight(torch.randn(3, 64, 3, 3)), 3, narrow=True)
    with pytest.raises(ValueError, match="narrow stage comes last"):
        amx.chain(x, [narrow, amx.ChainStage(p, 64)])
    with pytest.raises(ValueError, match="im2col stage comes first"):
        amx.chain(x, [amx.ChainStage(amx.pack_im2col_weight(torch.randn(64, 3, 3, 3)), 64, im2col=True)])


def test_kernel_refuses_what_it_cannot_run():
    with pytest.raises(ValueError, match="does not fit"):
        amx.conv3x3(bf16(1, 64, 8, 8), amx.pack_weight(torch.randn(32, 64, 3, 3)), 64, None)
    assert not amx.supports(torch.nn.Conv2d(16, 64, 3, padding=1), bf16(1, 16, 64, 64))
    assert not amx.supports(torch.nn.Conv2d(64, 64, 3, padding=1), torch.zeros(1, 64, 64, 64))   # fp32


def test_the_network_runs_its_blocks_and_upsample_convs_on_it_and_tiles_stay_exact(monkeypatch):
    monkeypatch.delenv("TAESD_AMX", raising=False)
    calls = []
    conv, run = amx.conv3x3, amx.Call.__call__
    monkeypatch.setattr(amx, "conv3x3", lambda *a, **k: calls.append("up" if k.get("upsample") else "conv")
                        or conv(*a, **k))
    # blocks, chains (and pool branches) run as prepared calls, kept per layer between calls
    monkeypatch.setattr(amx.Call, "__call__", lambda c, x: calls.append(
        c.what.replace("chain of ", "chain").replace(" convs", "")) or run(c, x))
    model = CpuExecutor(bf16=True).apply(taesd.create("taesd", seed=0))
    z, x = torch.randn(1, 4, 32, 32), torch.rand(1, 3, 256, 256)
    y = model.decode(z)
    # blocks on maps of 48² and more (decided by the untiled map); every Upsample + conv pair chained
    # with the block after it, the last one with the last conv (to RGB) too
    assert calls == ["chain4", "block", "block", "chain4", "block", "block", "chain5"]
    calls.clear()
    tiled = model.decode(z, tile_size=8)   # tiles run layer by layer (the last conv alone): the same bits
    assert torch.equal(y, tiled) and "conv" in calls and "chain1" in calls and "chain4" not in calls
    calls.clear()
    lat = model.encode(x)
    # the first conv (im2col), the block and the stride-2 conv; then each stage's last block and its
    # stride-2 conv
    assert calls == ["chain5", "block", "block", "chain4", "block", "block", "chain4"]
    calls.clear()
    tiled = model.encode(x, tile_size=64)   # the first conv alone is a one-stage chain
    assert torch.equal(lat, tiled) and "conv" in calls and "chain1" in calls and "chain4" not in calls
    monkeypatch.setenv("TAESD_AMX", "0")
    calls.clear()
    off = model.decode(z)
    assert calls == []                     # oneDNN's kernels, the upsample made
    assert (off - y).abs().max().item() < 0.05    # both bf16 compute of the same network


def pool_branch(c=64, hidden=256, seed=0):
    torch.manual_seed(seed)
    pool = torch.nn.Sequential(torch.nn.Conv2d(c, hidden, 1, bias=False), torch.nn.GroupNorm(4, hidden),
                               torch.nn.ReLU(), torch.nn.Conv2d(hidden, c, 1, bias=False))
    with torch.no_grad():
        pool[1].weight.uniform_(0.5, 1.5)
        pool[1].bias.uniform_(-0.5, 0.5)
    return pool


@pytest.mark.parametrize("shape", [(1, 64, 64, 64), (2, 64, 37, 53), (1, 64, 3, 5), (3, 32, 17, 31)])
def test_the_pool_branch_matches_its_layers(shape):
    """FLUX.2's pool branch (x + 1x1 conv, GroupNorm over the whole image, ReLU, 1x1 conv) in two passes:
    as close to the exact result as PyTorch's own bf16 layers get; per image the same bits in a batch
    and for any thread count (the statistics add fixed chunks in a fixed order). Maps of fewer than 16
    pixels, and not a multiple of 16 or of a chunk, included."""
    n, c, h, w = shape
    pool = pool_branch(c, 4 * c if c % 64 == 0 else 128)
    x = (torch.randn(n, c, h, w) * 1.5 + 0.3).relu().to(torch.bfloat16).contiguous(memory_format=torch.channels_last)
    w1, w2 = (amx.pack_1x1_weight(pool[k].weight) for k in (0, 3))
    y = amx.pool(x, w1, w2, pool[1])
    exact = copy.deepcopy(pool).double()
    with torch.no_grad():
        for k in (0, 3):
            exact[k].weight.copy_(pool[k].weight.to(torch.bfloat16).double())
        ref = x.double() + exact(x.double())
        theirs = (x + copy.deepcopy(pool).to(torch.bfloat16)(x)).double()
    ours_err, their_err = (y.double() - ref).abs(), (theirs - ref).abs()
    assert y.shape == x.shape and y.dtype == torch.bfloat16 and y.is_contiguous(memory_format=torch.channels_last)
    assert ours_err.max() <= 1.25 * their_err.max() + 1e-3
    assert ours_err.square().mean().sqrt() <= 1.1 * their_err.square().mean().sqrt() + 1e-4
    assert (ours_err <= ref.abs() / 64 + 0.05).all()
    torch.set_num_threads(1)
    try:
        one = amx.pool(x, w1, w2, pool[1])
    finally:
        torch.set_num_threads(2)
    assert torch.equal(one, y)
    assert torch.equal(amx.pool(x[-1:].clone(), w1, w2, pool[1]), y[-1:])


def test_the_pool_kernel_refuses_what_it_cannot_run():
    pool, x = pool_branch(), bf16(1, 64, 16, 16)
    assert amx.supports_pool(pool, x)
    assert not amx.supports_pool(pool, x.float())
    assert not amx.supports_pool(pool_branch(64, 96), x)   # hidden channels not a multiple of 64
    with_bias = pool_branch()
    with_bias[0] = torch.nn.Conv2d(64, 256, 1)
    assert not amx.supports_pool(with_bias, x)
    with pytest.raises(ValueError, match="do not fit"):
        amx.pool(x, amx.pack_1x1_weight(torch.randn(128, 64, 1, 1)), amx.pack_1x1_weight(pool[3].weight), pool[1])


def test_taef2_runs_its_pool_branches_on_it_and_tiles_stay_exact(monkeypatch):
    monkeypatch.delenv("TAESD_AMX", raising=False)
    calls = []
    run = amx.Call.__call__
    monkeypatch.setattr(amx.Call, "__call__", lambda c, x: (c.what == "pool branch" and calls.append("pool"))
                        or run(c, x))
    model = CpuExecutor(bf16=True).apply(taesd.create("taef2", seed=0))
    plain = taesd.create("taef2", seed=0)
    z = torch.randn(1, model.variant.latent_channels, 32, 32)
    y = model.decode(z)
    assert calls == ["pool"] * 3            # the three pool blocks of the lowest-resolution stage
    assert torch.equal(model.decode(z, tile_size=8), y)   # tiles run the global pool on the whole map
    assert (y - plain.decode(z)).abs().max().item() < 0.05
    x = torch.rand(1, 3, 256, 256)
    calls.clear()
    lat = model.encode(x)
    assert calls == ["pool"] * 3
    assert torch.equal(model.encode(x, tile_size=8), lat)


def test_kept_kernel_calls_follow_weight_changes_and_copies_carry_none(monkeypatch):
    """Blocks, chains and pool branches keep their prepared kernel calls between calls; a changed
    parameter (in place, or a new state_dict) or input shape prepares them again, and a copy of the
    model carries none."""
    monkeypatch.delenv("TAESD_AMX", raising=False)
    model = CpuExecutor(bf16=True).apply(taesd.create("taef2", seed=0))
    z = torch.randn(1, model.variant.latent_channels, 32, 32)
    before = model.decode(z)
    assert any("_amx_calls" in m.__dict__ for m in model.decoder.modules())
    with torch.no_grad():
        model.decoder[3].conv[0].weight.mul_(0.5)        # a pool block's body
        model.decoder[3].pool[1].weight.mul_(2.0)        # its GroupNorm
        model.decoder[-2].conv[2].bias.add_(0.25)        # the last chain's block
    changed = model.decode(z)
    fresh = CpuExecutor(bf16=True).apply(taesd.create("taef2", seed=0))
    fresh.load_state_dict(model.state_dict())
    assert not torch.equal(changed, before) and torch.equal(changed, fresh.decode(z))
    model.load_state_dict(taesd.create("taef2", seed=0).state_dict())
    assert torch.equal(model.decode(z), before)
    assert torch.equal(model.decode(z), before)   # replayed: the same kernels, the same bits
    new = copy.deepcopy(model.decoder[-2].conv[0])
    with torch.no_grad():
        new.weight.mul_(0.5)
    model.decoder[-2].conv[0] = new                 # a replaced submodule of the last chain
    model.decoder[-2].conv[2].weight = torch.nn.Parameter(model.decoder[-2].conv[2].weight * 2)   # reassigned
    replaced = model.decode(z)
    fresh.load_state_dict(model.state_dict())
    assert not torch.equal(replaced, before) and torch.equal(replaced, fresh.decode(z))
    model.load_state_dict(taesd.create("taef2", seed=0).state_dict())
    assert torch.equal(model.decode(z), before)
    assert model.decode(torch.randn(1, z.shape[1], 24, 40)).shape[-2:] == (24 * 8, 40 * 8)   # another shape
    copied = copy.deepcopy(model)
    assert not any(k in m.__dict__ for m in copied.modules() for k in ("_amx_calls", "_kept_steps"))
    assert torch.equal(copied.decode(z), before)


def _strips(monkeypatch, part, parts):
    """Make the chains of ``part`` run in this many column strips (0: whole) from the next call on."""
    from taesd.runtime.executors import cpu
    if parts:
        monkeypatch.setattr(cpu, "RING_LIMIT", 0)
        monkeypatch.setattr(cpu, "ring_bytes", lambda *a: parts * 1000)
        monkeypatch.setattr(cpu, "STRIP_RING_BYTES", 1000)
    else:
        monkeypatch.setattr(cpu, "RING_LIMIT", float("inf"))
    for k in ("_kept_steps", "_program"):
        part.__dict__.pop(k, None)


def test_a_wide_chain_to_rgb_runs_in_column_strips_with_the_bits_of_the_whole(monkeypatch):
    """The decoder's last chain (upsample + conv, block, conv to RGB) on a wide map runs in column strips
    with their halo (its rings then fit L2); the strips' inner edges are thrown away: the same bits."""
    from taesd.runtime.executors import cpu
    monkeypatch.delenv("TAESD_AMX", raising=False)
    model = CpuExecutor(bf16=True).apply(taesd.create("taesd", seed=0))
    z = torch.randn(2, 4, 16, 24)
    _strips(monkeypatch, model.decoder, 0)
    whole = model.decode(z)
    for parts in (6, 4, 3):   # strips of the 192-px output, unequal ones included
        _strips(monkeypatch, model.decoder, parts)
        assert torch.equal(model.decode(z), whole)
        chain = model.decoder.__dict__["_kept_steps"][1][-1]
        assert isinstance(chain._kept[1], cpu.ColumnStrips) and len(chain._kept[1].pieces) == parts


def test_a_stride_2_chain_from_rgb_runs_in_column_strips_with_the_bits_of_the_whole(monkeypatch):
    """The encoder's chains (the first conv from RGB, a block, the stride-2 conv) in column strips: each
    strip starts on an even column, reads its receptive field, and its kept outputs go straight into
    the whole output: the same bits as the whole, at 2, 3 and 5 strips, in a batch."""
    from taesd.runtime.executors import cpu
    monkeypatch.delenv("TAESD_AMX", raising=False)
    model = CpuExecutor(bf16=True).apply(taesd.create("taesd", seed=0))
    images = torch.rand(2, 3, 64, 200)
    _strips(monkeypatch, model.encoder, 0)
    whole = model.encode(images)
    for parts in (2, 3, 5):
        _strips(monkeypatch, model.encoder, parts)
        assert torch.equal(model.encode(images), whole), parts
        first = model.encoder.__dict__["_kept_steps"][1][0]
        strips = first._kept[1]
        assert isinstance(strips, cpu.ColumnStrips) and len(strips.pieces) == parts
        assert all(a0 % 2 == 0 for a0, *_ in strips.pieces)


def test_a_chain_writes_a_window_of_its_output_where_it_lies():
    """``Call.into``: the output columns asked for, written into a window of a wider map (the rest of it
    untouched); a window that does not fit is refused with the shapes."""
    x = bf16(1, 32, 20, 40)
    stages = [amx.ChainStage(amx.pack_weight(torch.randn(32, 32, 3, 3) / 17), 32, None, relu=True)]
    call = amx.prepare_chain(tuple(x.shape), stages)
    whole = call(x)
    wide = torch.zeros(1, 32, 20, 90, dtype=torch.bfloat16).contiguous(memory_format=torch.channels_last)
    call.into(x, wide[..., 50:63], 7)
    assert torch.equal(wide[..., 50:63], whole[..., 7:20])
    assert not wide[..., :50].any() and not wide[..., 63:].any()
    with pytest.raises(ValueError, match="columns 30"):
        call.into(x, wide[..., 50:63], 30)
    with pytest.raises(ValueError, match="prepared for"):
        call.into(x, wide[:, :16, :, :13], 0)


