"""taesd: the Tiny AutoEncoder for Stable Diffusion and its relatives.

    import taesd
    model = taesd.load("taef2")                 # published weights ($TAESD_WEIGHTS or the hub)
    latents = model.encode(images)              # N x 3 x H x W in [0, 1] -> N x C x H/8 x W/8
    images = model.decode(latents)              # -> N x 3 x H x W in [0, 1]

Layout (imports flow one way, bottom to top; tests/test_layers.py enforces it):
    errors, registry       one error type; one record per variant
    nn/                    layers and the published architectures
    io/                    files, images, latents, weight formats / identification / resolution
    value_checks           input checks (NaN/Inf, range), sync-free on a GPU
    tiling/                seam-exact tiling: receptive field, plan, run, free memory
    model                  TAESD: checks, run_part, encode/decode
    export/, runtime/      ONNX export; executors (runtime/executors: cpu, cuda, compile,
                           onnxruntime, plain; one resolve), previews
    options, loader        LoadOptions resolved once; taesd.load: resolve -> build -> executor
    integrations/, training/, evaluation/, cli/
"""
from taesd.errors import TaesdError
from taesd.io.images import load_image, pad_to_multiple, save_image
from taesd.io.latents import load_latents, save_latents
from taesd.loader import load
from taesd.model import TAESD, count_parameters, create, encode_image
from taesd.registry import VARIANTS, Variant, get_variant, list_variants
from taesd.value_checks import raise_pending as raise_input_errors
from taesd.version import __version__

__all__ = ["TAESD", "TaesdError", "VARIANTS", "Variant", "count_parameters", "create", "get_variant",
           "encode_image", "list_variants", "load", "load_image", "load_latents", "pad_to_multiple",
           "raise_input_errors",
           "save_image", "save_latents", "__version__"]


def __getattr__(name):
    # Lazy, so a core install (no diffusers) imports taesd; diffusers resolves a pipeline component
    # saved as ["taesd", "TaesdVAE"] in model_index.json by getattr(import_module("taesd"), "TaesdVAE"),
    # and picks its load method by looking up its base class there too (getattr(taesd, "ModelMixin")).
    if name in ("TaesdVAE", "TaesdEncoderOutput", "ModelMixin"):
        import importlib

        from taesd.extras import missing_extra
        try:
            module = importlib.import_module("taesd.integrations.diffusers.model")
        except ModuleNotFoundError as e:   # a core install: one line naming the extra
            raise (missing_extra(e) or e) from e
        return getattr(module, name)
    raise AttributeError(f"module 'taesd' has no attribute {name!r}")
