"""taesd: the Tiny AutoEncoder for Stable Diffusion and its relatives.

    import taesd
    model = taesd.load("taef2")                 # published weights ($TAESD_WEIGHTS or the hub)
    latents = model.encode(images)              # N x 3 x H x W in [0, 1] -> N x C x H/8 x W/8
    images = model.decode(latents)              # -> N x 3 x H x W in [0, 1]
"""
from .errors import TaesdError
from .images import load_image, pad_to_multiple, save_image
from .latents import load_latents, save_latents
from .loader import load
from .model import TAESD, count_parameters, create
from .variants import VARIANTS, Variant, get_variant, list_variants

__version__ = "0.1.0"
__all__ = ["TAESD", "TaesdError", "VARIANTS", "Variant", "count_parameters", "create", "get_variant",
           "list_variants", "load", "load_image", "load_latents", "pad_to_multiple", "save_image",
           "save_latents", "__version__"]
