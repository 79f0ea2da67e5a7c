"""Running a TAEHV layer list over a clip, a chunk of frames at a time, with its temporal state.

One function, ``run_layers``, does every mode: the whole clip is one chunk, bounded memory is
fixed-size chunks, streaming is whatever chunk arrives. The state is a dict of plain tensors keyed by
layer index, so a chunk computes exactly what the whole clip would for those frames:

- a memory block's state is its last input frame (``N x C x H x W``; zeros before the first frame);
- a ``TPool``'s state is the frames waiting for a full group (``N x k x C x H x W``, ``k < stride``).

A decoder drops its first output frames (``taesd.video.runs``). ``leading_drops`` finds, layer by
layer, the leading frames that no kept frame and no state depends on, and ``run_layers`` skips them:
the layers after the last memory block, and that block's own first output, run on fewer frames.

Tensors are ``N x T x C x H x W`` (TAEHV's NTCHW). Non-temporal layers see all ``N*T`` frames as one
batch, so a chunk is as fast as the batch it forms.
"""
from __future__ import annotations

import torch
import torch.nn as nn

from taesd.nn.taehv import MEMORY_BLOCKS, TGrow, TPool

State = dict[int, torch.Tensor]


def _flat(x: torch.Tensor) -> torch.Tensor:
    return x.flatten(0, 1)       # flatten/unflatten, not reshape: an ONNX trace keeps one op each


def _unflat(y: torch.Tensor, n: int) -> torch.Tensor:
    return y.unflatten(0, (n, -1))


def _call(layer: nn.Module, *xs: torch.Tensor, **kw: torch.Tensor) -> torch.Tensor:
    """``layer(*xs, **kw)`` on a batch of frames. oneDNN runs a batch of one image with other kernels
    than larger batches (results 1 ulp apart), so a single frame runs as a pair: streaming frame by
    frame then computes bit for bit what the whole clip does (on the CPU; elsewhere it only costs)."""
    if xs[0].shape[0] != 1 or xs[0].device.type != "cpu":
        return layer(*xs, **kw)
    y = layer(*(torch.cat([x, x]) for x in xs), **{k: torch.cat([v, v]) for k, v in kw.items()})
    return y[: y.shape[0] // 2]      # a TGrow makes several frames of one


def _own(part: torch.Tensor, whole: torch.Tensor) -> torch.Tensor:
    """``part`` of the chunk ``whole`` as a tensor of its own when it is less than the whole: a view
    kept in the state would keep every frame of the chunk alive until the next one."""
    return part.clone() if part.numel() < whole.numel() else part


def _past(last: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """Each frame's previous frame: ``last`` then ``x`` but its last frame. Channels_last frames (the
    fast executor's) stay channels_last, which ``cat`` would not keep (the block would transpose them
    back); an ONNX trace takes the ``cat``, whose sizes stay dynamic."""
    if torch.jit.is_tracing() or x.stride(2) != 1:
        return torch.cat([last[:, None], x[:, :-1]], 1)
    past = torch.empty_like(x)
    past[:, 0] = last
    past[:, 1:] = x[:, :-1]
    return past


def _joined(x: torch.Tensor, last: torch.Tensor | None, skip_first: bool) -> torch.Tensor:
    """``cat([frame, past], channels)`` for each frame of ``x`` (channels_last frames) written into
    one channels_last buffer, the past taken from ``x`` itself: one pass over the frames instead of
    making the past frames and then concatenating. ``last`` None: zeros; ``skip_first``: the first
    frame is only a past."""
    n, t, c, h, w = x.shape
    t_out = t - 1 if skip_first else t
    joined = torch.empty(n * t_out, 2 * c, h, w, dtype=x.dtype, device=x.device,
                         memory_format=torch.channels_last).unflatten(0, (n, t_out))
    joined[:, :, :c] = x[:, t - t_out:]
    if not skip_first:
        joined[:, 0, c:] = 0 if last is None else last
    joined[:, t_out - (t - 1):, c:] = x[:, :-1]
    return joined


def _memory(layer: nn.Module, x: torch.Tensor, state: State, i: int, skip_first: bool = False):
    """``skip_first``: the first frame's output is not needed (it is still the next frame's past).
    A block that takes its input and past already joined (``joins_past``, the fast executor's) gets
    them so for channels_last frames."""
    last = state.get(i)
    state[i] = _own(x[:, -1], x)
    n, cur = x.shape[0], x[:, 1:] if skip_first else x
    if getattr(layer, "joins_past", False) and x.stride(2) == 1 and not torch.jit.is_tracing():
        return _unflat(_call(layer, _flat(cur), joined=_flat(_joined(x, last, skip_first))), n)
    if skip_first:
        past = x[:, :-1]
    else:
        past = _past(torch.zeros_like(x[:, 0]) if last is None else last, x)
    return _unflat(_call(layer, _flat(cur), _flat(past)), n)


def _pool(layer: TPool, x: torch.Tensor, state: State, i: int) -> torch.Tensor:
    if layer.stride > 1:
        waiting = state.get(i)
        if waiting is not None and waiting.shape[1]:
            x = torch.cat([waiting, x], 1)
        whole = x.shape[1] // layer.stride * layer.stride
        state[i] = _own(x[:, whole:], x)
        x = x[:, :whole]
        if not whole:
            return x
    return _unflat(_call(layer, _flat(x)), x.shape[0])


def time_stride(layer: nn.Module) -> int:
    """Output frames per input frame: a ``TGrow``'s stride, or a layer's own ``time_stride`` (the
    fast executor folds a ``TGrow`` into the conv after it)."""
    return getattr(layer, "time_stride", layer.stride if isinstance(layer, TGrow) else 1)


def leading_drops(layers: nn.Sequential, drop: int) -> list[int]:
    """How many leading frames nothing needs when the first ``drop`` frames of the last layer's
    output are dropped: entry 0 for the input, entry ``i + 1`` for layer ``i``'s output. Walking back:
    a per-frame layer needs the frames it makes, a ``TGrow`` the frames whose group holds a needed
    frame, a memory block those plus the frame before (its past; its state is its last input, which
    is always made as long as ``drop`` leaves a frame). Layer lists with a ``TPool`` (encoders, whose
    frames are never dropped) skip nothing."""
    drops = [0] * (len(layers) + 1)
    if drop <= 0 or any(isinstance(layer, TPool) for layer in layers):
        return drops
    for i in reversed(range(len(layers))):
        drops[i + 1] = drop
        if isinstance(layers[i], MEMORY_BLOCKS):
            drop = max(drop - 1, 0)
        else:
            drop //= time_stride(layers[i])
    drops[0] = drop
    return drops


def run_layer(layer: nn.Module, i: int, x: torch.Tensor, state: State, drop: int = 0) -> torch.Tensor:
    """Layer ``i`` on the chunk ``x`` (N x T x C x H x W), updating ``state`` in place; a ``TPool``
    still waiting for frames returns zero frames. ``drop``: layer ``i``'s output entry of
    ``leading_drops``, ``x`` already cut by its input entry; the output leaves those frames out."""
    if isinstance(layer, MEMORY_BLOCKS):
        return _memory(layer, x, state, i, skip_first=drop > 0)
    if isinstance(layer, TPool):
        return _pool(layer, x, state, i)
    y = _unflat(_call(layer, _flat(x)), x.shape[0])
    cut = drop % time_stride(layer) if drop else 0
    return y[:, cut:] if cut else y       # the input was cut by whole groups; the rest of the cut here


def run_layers(layers: nn.Sequential, x: torch.Tensor, state: State, drop: int = 0) -> torch.Tensor | None:
    """Run ``layers`` on the chunk ``x`` (N x T x C x H x W), updating ``state`` in place. Returns
    the output frames, or None when a ``TPool`` still waits for frames. ``drop`` (less than the
    output's frame count): the output leaves out its first ``drop`` frames, and no layer computes
    what only they need."""
    drops = leading_drops(layers, drop)
    x = x[:, drops[0]:] if drops[0] else x
    for i in range(len(layers)):
        x = run_layer(layers[i], i, x, state, drops[i + 1])
        if x.shape[1] == 0:
            return None
    return x


# --- the functional step: fixed-shape state for CUDA graphs and torch.compile ------------------------------
def memory_indices(layers: nn.Sequential) -> list[int]:
    return [i for i, layer in enumerate(layers) if isinstance(layer, MEMORY_BLOCKS)]


def state_shapes(layers: nn.Sequential, channels: int, h: int, w: int) -> list[tuple[int, int, int]]:
    """(C, H, W) of each memory block's input for ``channels x h x w`` network input frames."""
    shapes = []
    for layer in layers:
        if isinstance(layer, MEMORY_BLOCKS):
            shapes.append((channels, h, w))
        if isinstance(layer, nn.Conv2d):
            k, s, p = layer.kernel_size[0], layer.stride[0], layer.padding[0]
            h, w = (h + 2 * p - k) // s + 1, (w + 2 * p - k) // s + 1
            channels = layer.out_channels
            up = getattr(layer, "upsample_factor", 1)    # the fast executor's upsample+conv
            h, w = h * up, w * up
        elif isinstance(layer, nn.Upsample):
            f = int(layer.scale_factor)
            h, w = h * f, w * f
        elif isinstance(layer, nn.PixelShuffle):
            r = layer.upscale_factor
            channels, h, w = channels // (r * r), h * r, w * r
    return shapes


def step(layers: nn.Sequential, x: torch.Tensor, state: tuple[torch.Tensor, ...]):
    """One step as a pure function: ``(output, new_state)``, the state one tensor per memory block
    (``N x C x H x W``, zeros at the start of a clip). Fed a whole group of frames per step (the time
    downscale for an encoder, any count for a decoder), no ``TPool`` ever holds frames back, so the
    state keeps its shapes from step to step and a compiled or graph-captured step can be replayed."""
    index = memory_indices(layers)
    carried: State = dict(zip(index, state))
    y = run_layers(layers, x, carried)
    return y, tuple(carried[i] for i in index)
