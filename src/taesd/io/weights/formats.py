"""The names other modules imported from here before io/weights/ was split by job; new code imports
from read.py (safe reading, hashing), layouts.py (the table of layouts), source.py (read_source) and
write.py (writers, casting)."""
from taesd.io.weights.layouts import FORMATS, Layout, from_diffusers_keys, to_diffusers_keys
from taesd.io.weights.read import (
    DIFFUSERS_WEIGHT_NAMES,
    DIFFUSERS_WEIGHTS,
    PUBLISHED_AT,
    StateDict,
    WeightSource,
    check_tensors,
    diffusers_weight_file,
    read_file,
    sha256_of,
)
from taesd.io.weights.source import read_source
from taesd.io.weights.write import (
    cast_parts,
    comfyui_extra_tensor,
    diffusers_config,
    save_combined,
    save_weights,
    state_dicts,
)

WEIGHTS_ENV = "TAESD_WEIGHTS"

__all__ = ["FORMATS", "Layout", "from_diffusers_keys", "to_diffusers_keys", "DIFFUSERS_WEIGHT_NAMES",
           "DIFFUSERS_WEIGHTS", "PUBLISHED_AT", "StateDict", "WeightSource", "check_tensors",
           "diffusers_weight_file", "read_file", "sha256_of", "read_source", "cast_parts",
           "comfyui_extra_tensor", "diffusers_config", "save_combined", "save_weights", "state_dicts",
           "WEIGHTS_ENV"]
