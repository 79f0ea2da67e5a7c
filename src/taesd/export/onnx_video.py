"""ONNX export of a TAEHV decoder (or encoder) as one step whose temporal state is graph inputs and outputs.

A stateless runtime (onnxruntime, onnxruntime-web) cannot keep a memory block's previous frame
between calls, so the graph takes it: inputs ``latent`` (or ``frames``) plus ``state_0 ..
state_{k-1}`` (one ``N x C x H x W`` tensor per memory block, zeros at a clip's start), outputs the
step's result plus ``next_state_0 ..``, fed back on the next call. This is ``TAEHV.step`` traced:

- decoder: any number of latents per step in, their raw frames out (``N x T*t_up x 3 x H x W``,
  in [0, 1]); the caller drops the clip's first ``time_upscale - 1`` frames (metadata
  ``taesd.drop_first_frames``), as ``TAEHV.decode`` does for the causal framing;
- encoder: a whole number of ``time_downscale`` groups of frames per step in, one latent per group
  out (the clip's end padded with its last frame to a whole group, as ``encode`` does).

The exporter is the legacy TorchScript one, as for images (``taesd.export.onnx``); frames, batch and
sizes are dynamic axes. Stepping the graph over a clip gives ``TAEHV.decode``/``encode``'s result
(tested with onnxruntime, <= 1e-4). H3 and CogVideoX framing are left to the caller (metadata
``taesd.framing``).
"""
from __future__ import annotations

import io
import json
import warnings
from fractions import Fraction

import torch
import torch.nn as nn

from taesd.errors import TaesdError
from taesd.export.onnx import DEFAULT_OPSET, check_opset, simplify
from taesd.extras import needs_extra


class _Step(nn.Module):
    """``TAEHV.step`` of one part as a module with flat inputs and outputs, for the tracer."""

    def __init__(self, model, part: str):
        super().__init__()
        self.model, self.part = model, part

    def forward(self, x: torch.Tensor, *state: torch.Tensor):
        y, new = self.model.step(self.part, x, tuple(state))
        return (y, *new)


def _plain(model, part: str):
    """A plain copy of ``part`` on the CPU in fp32: no executor's rewrite reaches the trace and the
    caller's model is not touched."""
    from taesd.video.model import TAEHV
    plain = TAEHV(model.variant, parts=part)
    try:
        plain.load_state_dict(model.state_dict())
    except RuntimeError as e:
        raise TaesdError(f"only the published {model.variant.name} {part} exports (no stages switched off); "
                         f"load it without time_upscale/space_upscale") from e
    return plain.float().eval().requires_grad_(False)


def _example(model, part: str) -> tuple[torch.Tensor, tuple[torch.Tensor, ...]]:
    """Two batch frames' worth (a batch of one would trace the CPU's pair-up of single frames)."""
    v, side = model.variant, 2
    if part == "encoder":
        x = torch.rand(1, 2 * model.time_downscale, 3, side * v.downscale, side * v.downscale)
        state = model.init_state(part, 1, side * v.downscale, side * v.downscale)
    else:
        x = torch.randn(1, 2, v.latent_channels, side, side)
        state = model.init_state(part, 1, side, side)
    return x, state


def io_names(part: str, n_state: int) -> tuple[list[str], list[str]]:
    x, y = ("frames", "latent") if part == "encoder" else ("latent", "frames")
    return ([x] + [f"state_{k}" for k in range(n_state)], [y] + [f"next_state_{k}" for k in range(n_state)])


def _dynamic_axes(inputs: list[str], outputs: list[str]) -> dict[str, dict[int, str]]:
    axes = {}
    for name in inputs + outputs:
        if name.startswith(("state_", "next_state_")):
            k = name.rsplit("_", 1)[1]
            axes[name] = {0: "batch", 2: f"state_{k}_height", 3: f"state_{k}_width"}
        else:
            axes[name] = {0: "batch", 1: f"{name}_count", 3: f"{name}_height", 4: f"{name}_width"}
    return axes


def video_metadata(model, part: str, x: torch.Tensor, state: tuple[torch.Tensor, ...]) -> dict[str, str]:
    """What an export says about itself; ``taesd.state_shapes``: per state [channels, its height over
    the input's] (zeros of that shape start a clip)."""
    from taesd.version import __version__
    v, dec = model.variant, part == "decoder"
    shapes = [[s.shape[1], str(Fraction(s.shape[-2], x.shape[-2]))] for s in state]
    return {"taesd.variant": v.name, "taesd.part": part, "taesd.family": v.family, "taesd.kind": "taehv-step",
            "taesd.state_count": str(len(state)), "taesd.state_shapes": json.dumps(shapes),
            "taesd.latent_channels": str(v.latent_channels), "taesd.downscale": str(v.downscale),
            "taesd.time_factor": str(model.time_upscale if dec else model.time_downscale),
            "taesd.drop_first_frames": str(model.time_upscale - 1 if dec else 0), "taesd.framing": v.trim,
            "taesd.layout": "NTCHW; frames in [0, 1]", "taesd.version": __version__}


@needs_extra
def video_step_to_onnx(model, part: str = "decoder", opset: int = DEFAULT_OPSET):
    """``part`` of the TAEHV ``model`` as an ``onnx.ModelProto`` of one step (module docstring)."""
    import onnx
    opset = check_opset(opset)
    plain = _plain(model, part)
    x, state = _example(plain, part)
    inputs, outputs = io_names(part, len(state))
    buf = io.BytesIO()
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")
        torch.onnx.export(_Step(plain, part), (x, *state), buf, dynamo=False, input_names=inputs,
                          output_names=outputs, dynamic_axes=_dynamic_axes(inputs, outputs),
                          opset_version=opset, do_constant_folding=True)
    proto = simplify(onnx.load_from_string(buf.getvalue()))
    proto.producer_name = "taesd"
    proto.doc_string = (f"TAEHV {model.variant.name} {part}, one step: feed next_state_k back as state_k "
                        f"(zeros at a clip's start).")
    for key, value in video_metadata(plain, part, x, state).items():
        proto.metadata_props.add(key=key, value=value)
    onnx.checker.check_model(proto, full_check=True)
    return proto


class OnnxVideoStepper:
    """Steps an exported graph over a clip with onnxruntime, carrying the state between calls: what
    a stateless runtime's caller does (and how the tests check an export)."""

    def __init__(self, proto_or_path, providers=("CPUExecutionProvider",)):
        import onnxruntime as ort
        data = proto_or_path.SerializeToString() if hasattr(proto_or_path, "SerializeToString") \
            else str(proto_or_path)
        self.session = ort.InferenceSession(data, providers=list(providers))
        meta = self.session.get_modelmeta().custom_metadata_map
        self.shapes = json.loads(meta["taesd.state_shapes"])
        self.drop = int(meta.get("taesd.drop_first_frames", "0"))
        self.state: list | None = None

    def step(self, x):
        """One step: ``x`` a float32 numpy array (latents or frames, NTCHW); returns its output."""
        import numpy as np
        if self.state is None:     # a clip's start: zeros, sized from the input's height and width
            h, w = x.shape[-2:]
            self.state = [np.zeros((x.shape[0], c, int(h * Fraction(r)), int(w * Fraction(r))), np.float32)
                          for c, r in self.shapes]
        feeds = {self.session.get_inputs()[0].name: x, **{f"state_{k}": s for k, s in enumerate(self.state)}}
        y, *self.state = self.session.run(None, feeds)
        return y
