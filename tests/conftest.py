import os
from pathlib import Path

import numpy as np
import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]


# The suites that start many subprocesses or train: deselected by `bash test.sh` (the fast suite a
# user runs), run by `bash test.sh --all` (CI, .ci/run).
SLOW_FILES = {"test_hostile.py", "test_training_cli.py", "test_train.py", "test_pipelines.py",
              "test_core_install.py", "test_download.py", "test_memory.py", "test_onnx.py", "test_eval.py",
              "test_onnx_web.py"}


def pytest_collection_modifyitems(config, items):
    for item in items:
        if item.path.name in SLOW_FILES:
            item.add_marker(pytest.mark.slow)
    # Without a GPU the Triton kernel tests run in test_cuda_kernels' interpreter child process (Triton
    # reads TRITON_INTERPRET once per process): the parent leaves them out rather than skipping them.
    if not torch.cuda.is_available() and os.environ.get("TAESD_KERNEL_CHILD") != "1":
        in_child = [item for item in items if item.get_closest_marker("triton_child")]
        if in_child:
            config.hook.pytest_deselected(items=in_child)
            items[:] = [item for item in items if not item.get_closest_marker("triton_child")]


def weights_dir() -> Path:
    """The published weights, found the one way every test uses: $TAESD_WEIGHTS, else
    ../shared/weights beside the checkout."""
    env = os.environ.get("TAESD_WEIGHTS")
    return Path(env) if env else ROOT.parent / "shared" / "weights"


# A fresh clone with nothing set runs as CI does (.ci/run exports the same two): the published weights
# beside the checkout, and never the network (download tests unset these and serve on 127.0.0.1).
if (weights_dir() / "taef2_encoder.pth").is_file():
    os.environ.setdefault("TAESD_WEIGHTS", str(weights_dir()))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
# fp32 models compute in fp32 on every CPU, so exactness tests hold on AMX machines too; the automatic
# bf16 (AMX) is tested with this unset (tests/test_cpu_precision.py).
os.environ.setdefault("TAESD_CPU_BF16", "0")


def require_weights() -> Path:
    """The weights folder, or skip the calling test with the reason (a fresh clone has none)."""
    d = weights_dir()
    if not (d / "taef2_encoder.pth").is_file():
        pytest.skip(f"needs the published taef2 weights: none in {d} (set TAESD_WEIGHTS to a folder "
                    f"holding taef2_encoder.pth and taef2_decoder.pth)")
    return d


@pytest.fixture(scope="session")
def weights() -> Path:
    return require_weights()


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
