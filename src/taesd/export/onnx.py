"""ONNX export of TAESD parts: a small, clean graph with dynamic batch/height/width and metadata.

The legacy TorchScript exporter (``dynamo=False``) is used: for TAESD it already emits the
published operator set (Conv, Relu, Add, Resize with constant scales, Div/Tanh/Mul for the clamp);
``simplify`` then removes the little it leaves behind (Identity aliases of shared initializers,
unused constants). FLUX.2's GroupNorm (pool branch) comes out as the exporter's own Reshape ->
InstanceNormalization -> Reshape(Shape) -> Mul -> Add. One lowering is ours, so that no op set grows
more than it must: Qwen Image 2.1's pixel-unshuffle becomes one SpaceToDepth, with the next conv's
input channels permuted to match (SpaceToDepth orders channels block-first, pixel-unshuffle
channel-first).
"""
from __future__ import annotations

import io
import os
import warnings
from collections import Counter
from pathlib import Path

import torch
import torch.nn as nn

from taesd.errors import TaesdError
from taesd.extras import needs_extra
from taesd.io.files import atomic_path
from taesd.nn.arch import build_part
from taesd.registry import Arch, get_variant

DEFAULT_OPSET = 17
MIN_OPSET, MAX_OPSET = 11, 20   # Resize with constant scales needs 11; the legacy exporter stops at 20

# The operator sets each architecture's export uses (checked by the tests, listed in docs/onnx.md).
_BASE_ENCODER = {"Add", "Constant", "Conv", "Div", "Mul", "Relu"}
_BASE_DECODER = {"Add", "Constant", "Conv", "Div", "Mul", "Relu", "Resize", "Tanh"}
_GROUPNORM = {"Reshape", "Shape", "InstanceNormalization"}
ALLOWED_OPS = {
    (Arch.BASE, "encoder"): _BASE_ENCODER,
    (Arch.BASE, "decoder"): _BASE_DECODER,
    (Arch.F32, "encoder"): _BASE_ENCODER,
    (Arch.F32, "decoder"): _BASE_DECODER,
    (Arch.BASE_POOL, "encoder"): _BASE_ENCODER | _GROUPNORM,
    (Arch.BASE_POOL, "decoder"): _BASE_DECODER | _GROUPNORM,
    (Arch.F16, "encoder"): _BASE_ENCODER | {"SpaceToDepth"},
    (Arch.F16, "decoder"): _BASE_DECODER | {"DepthToSpace"},
}

IMAGE_NAME, LATENT_NAME = "image", "latent"
IMAGE_RANGE = "[0, 1]"


# ---------------------------------------------------------------- torch side: what gets traced

class _SpaceToDepth(torch.autograd.Function):
    """ONNX SpaceToDepth (blocksize 2): output channel (i * 2 + j) * C + c."""

    @staticmethod
    def forward(ctx, x):
        n, c, h, w = x.shape
        blocks = x.reshape(n, c, h // 2, 2, w // 2, 2).permute(0, 3, 5, 1, 2, 4)
        return blocks.reshape(n, 4 * c, h // 2, w // 2)

    @staticmethod
    def symbolic(g, x):
        return g.op("SpaceToDepth", x, blocksize_i=2)


class SpaceToDepth(nn.Module):
    def forward(self, x):
        return _SpaceToDepth.apply(x)


def _exportable(model, part: str, dtype: torch.dtype) -> nn.Sequential:
    """A plain copy of one part on the CPU in ``dtype``, rebuilt from the registry so that no
    executor's rewrite (fused kernels, compile) reaches the trace, and rewritten where the plain
    trace would add ops (see the module doc). The caller's model is never touched."""
    module = build_part(model.variant, part)
    module.load_state_dict(model.part(part).state_dict())
    module.to(device="cpu", dtype=dtype)
    if isinstance(module[0], nn.PixelUnshuffle):
        conv = module[1]
        o, c4, kh, kw = conv.weight.shape
        # pixel-unshuffle channel c * 4 + k  ==  SpaceToDepth channel k * C + c
        w = conv.weight.detach().reshape(o, c4 // 4, 4, kh, kw).transpose(1, 2).reshape(o, c4, kh, kw)
        conv.weight = nn.Parameter(w.contiguous())
        module[0] = SpaceToDepth()
    return module.eval()


def _io_names(part: str) -> tuple[str, str]:
    return (IMAGE_NAME, LATENT_NAME) if part == "encoder" else (LATENT_NAME, IMAGE_NAME)


def _example_input(variant, part: str, dtype: torch.dtype) -> torch.Tensor:
    v = get_variant(variant)
    if part == "encoder":
        return torch.rand(1, v.image_channels, 2 * v.downscale, 2 * v.downscale, dtype=dtype)
    return torch.randn(1, v.latent_channels, 2, 2, dtype=dtype)


DYNAMIC_AXES = {IMAGE_NAME: {0: "batch", 2: "height", 3: "width"},
                LATENT_NAME: {0: "batch", 2: "latent_height", 3: "latent_width"}}


def metadata(variant, part: str, fp16: bool) -> dict[str, str]:
    """What an export says about itself (ONNX metadata_props); see docs/onnx.md."""
    from taesd.version import __version__
    v = get_variant(variant)
    inp, out = _io_names(part)
    return {
        "taesd.variant": v.name,
        "taesd.part": part,
        "taesd.family": v.family,
        "taesd.arch": str(v.arch),
        "taesd.input": inp,
        "taesd.output": out,
        "taesd.dtype": "float16" if fp16 else "float32",
        "taesd.image_channels": str(v.image_channels),
        "taesd.latent_channels": str(v.latent_channels),
        "taesd.downscale": str(v.downscale),
        "taesd.image_range": IMAGE_RANGE
        + (" (decoder output unclamped: clamp to [0, 1])" if part == "decoder" else ""),
        **latent_contract(v),
        "taesd.version": __version__,
    }


# The latent contract per normalisation, as this project defines it (registry.Variant.normalization;
# integrations/diffusers/contracts.py applies it). Only scale_shift has scalar constants to state.
LATENT_CONVENTIONS = {
    "scale_shift": "TAESD latents = (raw VAE latents - vae_shift) * vae_scale",
    "batchnorm": "TAESD latents = the VAE's BatchNorm-normalised latents (128 channels at 1/16 size), "
                 "unpatchified 2x2 to 32 channels at 1/8 size; no scale or shift (the BatchNorm running "
                 "statistics are in the FLUX.2 VAE, not here)",
    "mean_std": "TAESD latents = (raw VAE latents - latents_mean) / latents_std, per channel (the VAE "
                "config's statistics); no scalar scale or shift",
}


def latent_contract(v) -> dict[str, str]:
    """The metadata stating how ``v``'s latents relate to its family's raw VAE latents."""
    meta = {"taesd.normalization": v.normalization,
            "taesd.latent_convention": LATENT_CONVENTIONS[v.normalization], "taesd.packing": v.packing}
    if v.normalization == "scale_shift":
        meta.update({"taesd.vae_scale": repr(v.vae_scale), "taesd.vae_shift": repr(v.vae_shift)})
    return meta


def check_opset(opset: int) -> int:
    if not MIN_OPSET <= int(opset) <= MAX_OPSET:
        raise TaesdError(f"opset {opset} is not supported; use {MIN_OPSET} to {MAX_OPSET} "
                         f"(default {DEFAULT_OPSET})")
    return int(opset)


@needs_extra   # a core install: one line naming taesd[onnx]
def to_onnx(model, part: str, fp16: bool = False, opset: int = DEFAULT_OPSET):
    """One part of a ``TAESD`` model as a simplified ``onnx.ModelProto`` (weights on CPU).

    fp16: weights, activations, input and output are all float16 (no casts at the boundary).
    """
    import onnx
    opset = check_opset(opset)
    dtype = torch.float16 if fp16 else torch.float32
    module = _exportable(model, part, dtype)
    inp, out = _io_names(part)
    buf = io.BytesIO()
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")  # the legacy exporter's deprecation notice
        torch.onnx.export(module, (_example_input(model.variant, part, dtype),), buf, dynamo=False,
                          input_names=[inp], output_names=[out], dynamic_axes=DYNAMIC_AXES,
                          opset_version=opset, do_constant_folding=True)
    proto = simplify(onnx.load_from_string(buf.getvalue()))
    proto.producer_name = "taesd"
    proto.doc_string = (f"TAESD {model.variant.name} {part} ({model.variant.family}). "
                        f"Images are N x {model.variant.image_channels} x H x W in [0, 1]; latents "
                        f"N x {model.variant.latent_channels} x H/{model.variant.downscale} x "
                        f"W/{model.variant.downscale} in TAESD's convention.")
    for key, value in metadata(model.variant, part, fp16).items():
        proto.metadata_props.add(key=key, value=value)
    onnx.checker.check_model(proto, full_check=True)
    return proto


# ---------------------------------------------------------------- graph simplification

def fold_identities(graph) -> int:
    """Remove Identity nodes by wiring their consumers to their input (not for graph outputs)."""
    outputs = {o.name for o in graph.output}
    alias = {}
    for node in list(graph.node):
        if node.op_type == "Identity" and node.output[0] not in outputs:
            alias[node.output[0]] = node.input[0]
            graph.node.remove(node)
    for node in graph.node:
        for i, name in enumerate(node.input):
            while name in alias:
                name = alias[name]
            node.input[i] = name
    return len(alias)


def remove_unused(graph) -> int:
    """Drop nodes whose outputs nobody reads, and initializers nobody reads (repeat until stable)."""
    removed = 0
    while True:
        used = {o.name for o in graph.output} | {i for n in graph.node for i in n.input}
        dead = [n for n in graph.node if not any(o in used for o in n.output)]
        for n in dead:
            graph.node.remove(n)
        unused = [t for t in graph.initializer if t.name not in used]
        for t in unused:
            graph.initializer.remove(t)
        removed += len(dead) + len(unused)
        if not dead and not unused:
            return removed


def simplify(proto):
    """Our own passes (no onnxsim): fold Identity aliases, then drop what is no longer read."""
    fold_identities(proto.graph)
    remove_unused(proto.graph)
    # Initializers need not be graph inputs (IR >= 4); listing them there makes them overridable.
    names = {t.name for t in proto.graph.initializer}
    for i in [i for i in proto.graph.input if i.name in names]:
        proto.graph.input.remove(i)
    return proto


# ---------------------------------------------------------------- inspecting an export

def op_counts(proto) -> Counter:
    return Counter(n.op_type for n in proto.graph.node)


def allowed_ops(variant, part: str) -> set[str]:
    return ALLOWED_OPS[(get_variant(variant).arch, part)]


def read_metadata(proto) -> dict[str, str]:
    return {p.key: p.value for p in proto.metadata_props}


def _shape(value_info) -> str:
    import onnx
    t = value_info.type.tensor_type
    dims = [d.dim_param or str(d.dim_value) for d in t.shape.dim]
    return f"{onnx.helper.tensor_dtype_to_np_dtype(t.elem_type)} [{', '.join(dims)}]"


def describe_onnx(path: str | os.PathLike) -> str:
    """Inputs, outputs, metadata and the operator set (with counts) of an .onnx file."""
    proto = load_onnx_file(path)
    opset = next((o.version for o in proto.opset_import if o.domain in ("", "ai.onnx")), "?")
    lines = [str(path), f"  format: onnx (opset {opset}, producer {proto.producer_name or '?'})"]
    lines += [f"  input {i.name}: {_shape(i)}" for i in proto.graph.input]
    lines += [f"  output {o.name}: {_shape(o)}" for o in proto.graph.output]
    meta = read_metadata(proto)
    lines += [f"  {k}: {v}" for k, v in meta.items()]
    counts = op_counts(proto)
    lines.append(f"  op set ({len(counts)} ops, {sum(counts.values())} nodes): "
                 + ", ".join(f"{op} x{n}" for op, n in sorted(counts.items())))
    if "taesd.variant" in meta and "taesd.part" in meta and meta.get("taesd.kind") != "taehv-step":
        extra = sorted(set(counts) - allowed_ops(meta["taesd.variant"], meta["taesd.part"]))
        arch = get_variant(meta["taesd.variant"]).arch
        verdict = f"unexpected {', '.join(extra)}" if extra else f"ok for the {arch} architecture"
        lines.append("  op set check: " + verdict)
    return "\n".join(lines)


def load_onnx_file(path: str | os.PathLike):
    import onnx
    path = Path(path)
    if not path.is_file():
        raise TaesdError(f"{path} does not exist")
    try:
        return onnx.load(str(path))
    except Exception as e:
        raise TaesdError(f"{path} is not a readable ONNX file ({type(e).__name__}); export it again") from e


# ---------------------------------------------------------------- writing files

def onnx_filename(variant, part: str, fp16: bool) -> str:
    return f"{get_variant(variant).name}_{part}{'.fp16' if fp16 else ''}.onnx"


def save_onnx(proto, path: str | os.PathLike) -> Path:
    import onnx
    path = Path(path)
    with atomic_path(path) as tmp:
        onnx.save(proto, str(tmp))
    return path
