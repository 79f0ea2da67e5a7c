"""onnxruntime-web (wasm backend, in Node) runs an exported TAEHV decoder step: tests/web/step_video.mjs
steps the graph over a clip one latent (or two) per call, feeding next_state_k back as state_k, and its
frames, the first ``taesd.drop_first_frames`` dropped, equal ``TAEHV.decode`` of the whole clip (fp32,
<= 1e-4; fresh seeded weights). Needs ``node`` and onnxruntime-web (``bash scripts/setup_web.sh``
installs it in .node/node_modules; or set $TAESD_NODE_MODULES); skips with the reason otherwise."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
import torch

from taesd.video import TAEHV

pytest.importorskip("onnx")

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "tests" / "web" / "step_video.mjs"
TOL = 1e-4


def _node_modules() -> Path:
    env = os.environ.get("TAESD_NODE_MODULES")
    return Path(env) if env else ROOT / ".node" / "node_modules"


@pytest.fixture(scope="module")
def node() -> str:
    exe = shutil.which("node")
    if exe is None:
        pytest.skip("needs node (v18+) on PATH to run onnxruntime-web")
    modules = _node_modules()
    if not (modules / "onnxruntime-web" / "dist" / "ort.node.min.mjs").is_file():
        pytest.skip(f"needs onnxruntime-web: none in {modules} (run `bash scripts/setup_web.sh`, or set "
                    f"TAESD_NODE_MODULES to a node_modules folder holding onnxruntime-web)")
    return exe


def _bin(path: Path, a: np.ndarray) -> dict:
    a = np.ascontiguousarray(a, dtype="<f4")
    path.write_bytes(a.tobytes())
    return {"file": path.name, "shape": list(a.shape)}


def _export(tmp: Path, model: TAEHV) -> dict[str, str]:
    """The decoder step written to tmp/decoder_step.onnx; returns its metadata."""
    import onnx

    from taesd.export.onnx_video import video_step_to_onnx
    proto = video_step_to_onnx(model, "decoder")
    onnx.save(proto, str(tmp / "decoder_step.onnx"))
    return {p.key: p.value for p in proto.metadata_props}


def _run_web(node: str, tmp: Path, model: TAEHV, latents: torch.Tensor, chunk: int) -> tuple[np.ndarray, dict]:
    """tmp/decoder_step.onnx stepped in onnxruntime-web, ``chunk`` latents per call from zero states:
    the raw frames (nothing dropped) and the script's report."""
    n, _, _, h, w = latents.shape
    states = [_bin(tmp / f"state_{k}.bin", s.numpy())
              for k, s in enumerate(model.init_state("decoder", n, h, w))]
    spec = {"model": "decoder_step.onnx", "latent": _bin(tmp / "latents.bin", latents.numpy()),
            "states": states, "chunk": chunk, "out": "frames.bin"}
    (tmp / "spec.json").write_text(json.dumps(spec))
    env = {**os.environ, "TAESD_NODE_MODULES": str(_node_modules())}
    r = subprocess.run([node, str(SCRIPT), str(tmp / "spec.json")], capture_output=True, text=True,
                       timeout=300, env=env)
    assert r.returncode == 0, r.stderr[-4000:]
    report = json.loads(r.stdout.strip().splitlines()[-1])
    frames = np.fromfile(tmp / "frames.bin", dtype="<f4").reshape(report["shape"])
    return frames, report


@pytest.mark.parametrize("name", ["taew2_1", "taehv1_5_super"])
@torch.no_grad()
def test_onnxruntime_web_stepping_equals_the_whole_clip(node, tmp_path, name):
    torch.manual_seed(0)
    model = TAEHV(name).eval()
    latents = torch.randn(1, 3, model.variant.latent_channels, 3, 5, generator=torch.Generator().manual_seed(1))
    whole = model.decode(latents)
    meta = _export(tmp_path, model)
    drop = int(meta["taesd.drop_first_frames"])
    assert drop == model.time_upscale - 1
    for chunk in (1, 2):                      # one latent per call, and two (the last call one)
        frames, report = _run_web(node, tmp_path, model, latents, chunk)
        assert report["steps"] == -(-latents.shape[1] // chunk)
        got = torch.from_numpy(frames)[:, drop:]
        assert got.shape == whole.shape, (got.shape, whole.shape)
        err = (got - whole).abs().max().item()
        assert err <= TOL, (name, chunk, err)
