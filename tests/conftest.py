import os
from pathlib import Path

import numpy as np
import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]


def weights_dir() -> Path:
    """The published weights: $TAESD_WEIGHTS, else ../shared/weights beside the checkout."""
    env = os.environ.get("TAESD_WEIGHTS")
    return Path(env) if env else ROOT.parent / "shared" / "weights"


@pytest.fixture(scope="session")
def weights() -> Path:
    d = weights_dir()
    if not (d / "taef2_encoder.pth").is_file():
        pytest.fail(f"published weights not found in {d}; set TAESD_WEIGHTS")
    return d


@pytest.fixture(scope="session")
def taef2(weights):
    import taesd
    return taesd.load("taef2", weights, device="cpu")


def photo(name: str, crop: int | None = None) -> torch.Tensor:
    """A scikit-image photo as 3 x H x W in [0, 1], cropped to a multiple of 16 (or to crop)."""
    import skimage.data as data
    arr = getattr(data, name)()
    if arr.ndim == 2:
        arr = np.repeat(arr[..., None], 3, axis=2)
    h, w = arr.shape[:2]
    h, w = (crop, crop) if crop else (h - h % 16, w - w % 16)
    return torch.from_numpy(np.ascontiguousarray(arr[:h, :w, :3])).permute(2, 0, 1).float() / 255


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
