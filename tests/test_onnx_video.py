"""ONNX export of TAEHV steps with the temporal state as graph inputs/outputs: onnxruntime, stepping
the graph over a clip and feeding each step's state back, gives the PyTorch whole-clip result (fp32,
<= 1e-4; fresh seeded weights), for MemBlock, _super (patch 2) and LTX (patch 4, 8x time) layouts;
and `taesd export onnx` writes them for a TAEHV variant."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from taesd.video import TAEHV

pytest.importorskip("onnx")
ort = pytest.importorskip("onnxruntime")

TOL = 1e-4


def _model(name: str) -> TAEHV:
    torch.manual_seed(0)
    return TAEHV(name).eval()


@pytest.mark.parametrize("name", ["taew2_1", "taehv1_5_super", "taeltx2_3"])
@torch.no_grad()
def test_stepping_the_decoder_graph_equals_the_whole_clip(name):
    from taesd.export.onnx_video import OnnxVideoStepper, video_step_to_onnx
    model = _model(name)
    proto = video_step_to_onnx(model, "decoder")
    names = [i.name for i in proto.graph.input]
    assert names[0] == "latent" and names[1:] == [f"state_{k}" for k in range(len(names) - 1)] and len(names) > 9
    g = torch.Generator().manual_seed(1)
    latents = torch.randn(1, 5, model.variant.latent_channels, 3, 5, generator=g)
    whole = model.decode(latents)
    for chunk in (1, 2):                      # any number of latents per step
        stepper = OnnxVideoStepper(proto)
        out = np.concatenate([stepper.step(latents[:, t:t + chunk].numpy())
                              for t in range(0, latents.shape[1], chunk)], 1)
        got = torch.from_numpy(out)[:, stepper.drop:]
        assert got.shape == whole.shape
        assert (got - whole).abs().max().item() <= TOL, (name, chunk)


@torch.no_grad()
def test_stepping_the_encoder_graph_equals_the_whole_clip():
    from taesd.export.onnx_video import OnnxVideoStepper, video_step_to_onnx
    model = _model("taew2_1")
    stepper = OnnxVideoStepper(video_step_to_onnx(model, "encoder"))
    frames = torch.rand(1, 12, 3, 24, 40, generator=torch.Generator().manual_seed(2))
    t = model.time_downscale
    out = np.concatenate([stepper.step(frames[:, k:k + t].numpy()) for k in range(0, 12, t)], 1)
    assert (torch.from_numpy(out) - model.encode(frames)).abs().max().item() <= TOL


def test_cli_exports_a_taehv_variant(tmp_path, capsys):
    from taesd.cli import main
    weights = tmp_path / "taew2_1.pth"
    torch.save(_model("taew2_1").state_dict(), weights)
    assert main(["export", "onnx", "--variant", "taew2_1", "-w", str(weights), "--part", "decoder",
                 "-o", str(tmp_path / "onnx")]) == 0
    path = tmp_path / "onnx" / "taew2_1_decoder_step.onnx"
    assert path.is_file() and "state_0" in capsys.readouterr().out
    assert main(["info", str(path)]) == 0
    assert "taesd.state_shapes" in capsys.readouterr().out
