"""The ONNX Runtime executor ("onnxruntime"): a ``TAESD`` whose parts run in ORT sessions.

Unlike the other executors it does not transform a model in place: ``apply`` returns a new
``OnnxTAESD`` (the parts exported in memory), and exported .onnx files load as one directly
(``from_onnx_files``). Only ``run_part`` changes, so everything built on ``encode``/``decode``
(input checks, latent files, batching, tiling) works the same as on the PyTorch path. Tensors
cross the boundary on the CPU; the model's ``dtype`` is the export's (float16 for an fp16 export,
else float32).
"""
from __future__ import annotations

import dataclasses
import os
import re
from pathlib import Path

import torch

from taesd.errors import TaesdError
from taesd.export.onnx import DEFAULT_OPSET, load_onnx_file, read_metadata, to_onnx
from taesd.model import TAESD
from taesd.nn.arch import build_part
from taesd.registry import get_variant, normalize_parts
from taesd.runtime.executors.base import Executor
from taesd.tiling.receptive import is_global

_ORT_DTYPES = {"tensor(float)": torch.float32, "tensor(float16)": torch.float16}


def providers_for(device) -> list:
    """ORT execution providers for a torch-style device name (None: the CPU)."""
    import onnxruntime as ort
    available = ort.get_available_providers()
    try:
        dev = torch.device("cpu" if device is None else device)
    except RuntimeError as e:
        raise TaesdError(f"unknown device {device!r}; use cpu or cuda[:N]") from e
    if dev.type == "cpu":
        return ["CPUExecutionProvider"]
    if dev.type == "cuda" and "CUDAExecutionProvider" in available:
        return [("CUDAExecutionProvider", {"device_id": dev.index or 0}), "CPUExecutionProvider"]
    raise TaesdError(f"onnxruntime cannot run on {device}: this onnxruntime offers "
                     f"{', '.join(available)}; use --device cpu or install onnxruntime-gpu")


class OnnxPart:
    """One exported part in an ORT InferenceSession: torch tensor in, torch tensor out (CPU)."""

    def __init__(self, proto_or_path, providers: list, threads: int | None = None):
        import onnxruntime as ort
        options = ort.SessionOptions()
        options.log_severity_level = 3  # warnings about CPU fallbacks of fp16 nodes are expected
        if threads:
            options.intra_op_num_threads = threads
        source = (str(proto_or_path) if isinstance(proto_or_path, (str, os.PathLike))
                  else proto_or_path.SerializeToString())
        self.session = ort.InferenceSession(source, options, providers=providers)
        inp = self.session.get_inputs()[0]
        self.input_name, self.output_name = inp.name, self.session.get_outputs()[0].name
        self.dtype = _ORT_DTYPES[inp.type]
        self.metadata = dict(self.session.get_modelmeta().custom_metadata_map)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        feed = x.detach().to(device="cpu", dtype=self.dtype).contiguous().numpy()
        (y,) = self.session.run([self.output_name], {self.input_name: feed})
        import numpy as np  # with onnxruntime (an extra), as onnxruntime itself is
        return torch.from_numpy(np.asarray(y))


class OnnxTAESD(TAESD):
    """Same API as ``TAESD``; ``run_part`` runs the exported graphs in ONNX Runtime.

    ``encoder``/``decoder`` still hold the PyTorch layers, so tools that read the network's
    structure (tiling's receptive-field analysis) see the exact layer list: with the weights the
    export was made from, or on the meta device (structure only) when loaded from .onnx files.
    """

    def __init__(self, variant, sessions: dict[str, OnnxPart], state_dicts: dict | None = None):
        if not sessions:
            raise TaesdError("an onnxruntime model needs an encoder or a decoder session")
        dtypes = {s.dtype for s in sessions.values()}
        if len(dtypes) > 1:
            raise TaesdError("the encoder and decoder exports differ in precision; "
                             "export both with or without --fp16")
        with torch.device("meta"):  # structure without allocating or initialising weights
            super().__init__(variant, parts=tuple(sessions))
        self._dtype = dtypes.pop()
        for part, sd in (state_dicts or {}).items():
            module = getattr(self, part)
            module.load_state_dict({k: t.to(self._dtype) for k, t in sd.items()}, assign=True)
        self.sessions = dict(sessions)
        self.executor = OnnxRuntimeExecutor()
        self.eval().requires_grad_(False)

    @property
    def device(self) -> torch.device:
        return torch.device("cpu")  # inputs and outputs live on the CPU; ORT may compute elsewhere

    @property
    def dtype(self) -> torch.dtype:
        return self._dtype

    def run_part(self, part: str, x: torch.Tensor) -> torch.Tensor:
        self.part(part)
        return self.sessions[part](x)


def onnx_files(weights) -> list[Path] | None:
    """The .onnx files among ``weights`` (a path, a list or a dict of paths); None if there are none."""
    if weights is None:
        return None
    items = list(weights.values()) if isinstance(weights, dict) else (
        list(weights) if isinstance(weights, (list, tuple)) else [weights])
    paths = [Path(p) for p in items]
    onnx_paths = [p for p in paths if p.suffix == ".onnx"]
    if onnx_paths and len(onnx_paths) != len(paths):
        raise TaesdError("mix of .onnx and other weight files; "
                         "pass either the exported .onnx files or torch weights")
    return onnx_paths or None


def from_onnx_files(variant, paths, device=None, parts=None) -> OnnxTAESD:
    """An ``OnnxTAESD`` from exported files; each file's metadata says which part it is."""
    v = get_variant(variant)
    providers = providers_for(device)
    found: dict[str, Path] = {}
    protos = {}
    for path in paths:
        proto = load_onnx_file(path)
        meta = read_metadata(proto)
        if meta.get("taesd.variant") != v.name or meta.get("taesd.part") not in ("encoder", "decoder"):
            what = (f"a {meta['taesd.variant']} {meta.get('taesd.part')}" if "taesd.variant" in meta
                    else "no taesd export")
            raise TaesdError(f"{path} holds {what}, not a {v.name} part; "
                             f"export it with `taesd export onnx --variant {v.name}`")
        found[meta["taesd.part"]] = path
        protos[meta["taesd.part"]] = proto
    wanted = tuple(found) if parts is None else normalize_parts(parts)
    missing = [p for p in wanted if p not in found]
    if missing:
        raise TaesdError(f"no {v.name} {' or '.join(missing)} among the given .onnx files")
    # A part with a global layer (taef2's GroupNorm) tiles as a staged plan on the PyTorch layers:
    # give it the export's own weights, read back from the graph's initializers.
    weights = {p: state_dict_from_onnx(protos[p], v, p, found[p]) for p in wanted if _has_global(v, p)}
    model = OnnxTAESD(v, {p: OnnxPart(found[p], providers) for p in wanted}, weights)
    model.executor = OnnxRuntimeExecutor(device=None if device is None else str(device))
    model.weights_info = {p: {"path": str(found[p]), "format": "onnx"} for p in wanted}
    return model


def _has_global(variant, part: str) -> bool:
    with torch.device("meta"):
        module = build_part(variant, part)
    return any(is_global(layer) for layer in module)


# The exporter writes GroupNorm's affine weight and bias as the second input of the Mul/Add after
# its InstanceNormalization (initializers of shape C x 1 x 1, shared when equal).
_AFFINE_NODE = re.compile(r"/(\d+)/pool/pool\.1/(Mul|Add)$")


def state_dict_from_onnx(proto, variant, part: str, path) -> dict[str, torch.Tensor]:
    """The PyTorch state dict of one exported part, read from its initializers (names kept by the
    exporter; GroupNorm affine parameters found through their nodes). One line when incomplete."""
    from onnx import numpy_helper
    inits = {t.name: t for t in proto.graph.initializer}
    by_output = {}
    for node in proto.graph.node:
        for out in node.output:
            hit = _AFFINE_NODE.match(out.rsplit("_output_0", 1)[0]) if out.endswith("_output_0") else None
            if hit and len(node.input) == 2 and node.input[1] in inits:
                key = f"{hit.group(1)}.pool.1.{'weight' if hit.group(2) == 'Mul' else 'bias'}"
                by_output[key] = node.input[1]
    with torch.device("meta"):
        wanted = build_part(variant, part).state_dict()
    sd = {}
    for key, meta_t in wanted.items():
        name = key if key in inits else by_output.get(key)
        if name is None:
            raise TaesdError(f"{path}: cannot find weight {key} in the export (needed to tile this part); "
                             f"export it again with `taesd export onnx`")
        t = torch.from_numpy(numpy_helper.to_array(inits[name]).copy())
        if t.numel() != meta_t.numel():
            raise TaesdError(f"{path}: weight {key} has {tuple(t.shape)}, expected {tuple(meta_t.shape)}")
        sd[key] = t.reshape(meta_t.shape)
    return sd


def from_torch(torch_model: TAESD, fp16: bool = False, device=None, opset: int | None = None) -> OnnxTAESD:
    """An ``OnnxTAESD`` running ``torch_model``'s parts, exported in memory (fp16 or fp32)."""
    providers = providers_for(device)
    sessions = {p: OnnxPart(to_onnx(torch_model, p, fp16=fp16, opset=opset or DEFAULT_OPSET), providers)
                for p in torch_model.parts}
    plain = {p: torch_model.part(p).state_dict() for p in torch_model.parts}
    model = OnnxTAESD(torch_model.variant, sessions, plain)
    model.executor = OnnxRuntimeExecutor(device=None if device is None else str(device))
    model.weights_info = dict(torch_model.weights_info)
    return model


@dataclasses.dataclass(frozen=True)
class OnnxRuntimeExecutor(Executor):
    """Run the parts in ONNX Runtime on ``device`` (None: the CPU). ``apply`` returns a new model:
    the torch model's parts exported in memory (fp16 export for an fp16 model, else fp32)."""

    name = "onnxruntime"
    layerwise = False   # a session runs a part as a whole: tiling calls run_part per tile
    device: "str | None" = None

    def apply(self, model: TAESD) -> OnnxTAESD:
        if isinstance(model, OnnxTAESD):
            return model
        if model.dtype not in (torch.float32, torch.float16):
            raise TaesdError("onnxruntime runs fp32 or fp16 exports; use --dtype fp32 or fp16")
        providers_for(self.device)   # a missing provider fails before the export
        plain = getattr(model, "executor", None)
        if plain is not None:
            plain.undo(model)
        fp16 = model.dtype == torch.float16
        return from_torch(model.to("cpu", torch.float32), fp16=fp16, device=self.device)

    def undo(self, model: TAESD) -> TAESD:
        raise TaesdError("a model running in ONNX Runtime has no PyTorch executor to go back to; "
                         "load it again with executor='plain'")
