"""ONNX export and the ONNX Runtime backend: op sets, parity with PyTorch, dynamic shapes, fp16, CLI."""
import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch

import taesd
from conftest import photo
from taesd.cli import main
from taesd.errors import TaesdError
from taesd.evaluation.metrics import psnr
from taesd.export.onnx import op_counts, read_metadata, save_onnx, simplify, to_onnx
from taesd.runtime.executors.onnxruntime import OnnxPart, OnnxTAESD

# The published claim, written out here rather than read from the module under test.
BASE_ENCODER_OPS = {"Add", "Constant", "Conv", "Div", "Mul", "Relu"}
BASE_DECODER_OPS = {"Add", "Constant", "Conv", "Div", "Mul", "Relu", "Resize", "Tanh"}
EXTRA_OPS = {  # what the non-base architectures may add, as documented in docs/onnx.md
    "taef2": {"Reshape", "Shape", "InstanceNormalization"},
    "taesana": set(),
    "taeqi2_1": {"SpaceToDepth", "DepthToSpace"},
}
SIZES = [(64, 64), (96, 128)]  # photo sizes for the published weights: dynamic height and width
LATENT_SIZES = [(2, 2, 2), (1, 3, 4)]  # batch, h, w for fresh weights: small keeps the test fast
CPU = ["CPUExecutionProvider"]


@pytest.fixture(scope="module", autouse=True)
def _one_torch_thread():
    """These are many small runs: on a shared 2-core machine under load, OpenMP threads waiting
    for each other make them several times slower than one thread (measured: 146 s -> 32 s)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def fresh_exports():
    """Every variant with fresh weights, exported once: name -> (torch model, onnx protos)."""
    out = {}
    for name in taesd.VARIANTS:
        model = taesd.create(name, seed=1)
        out[name] = model, {p: to_onnx(model, p) for p in ("encoder", "decoder")}
    return out


def _images(v, size, n=1, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.rand(n, v.image_channels, *size, generator=g)


def _max_diff(a, b) -> float:
    return (a.float() - b.float()).abs().max().item()


@pytest.mark.parametrize("name", ["taesd", "taesdxl", "taesd3", "taef1"])
def test_base_variants_use_only_the_published_op_set(fresh_exports, name):
    _, protos = fresh_exports[name]
    assert set(op_counts(protos["encoder"])) <= BASE_ENCODER_OPS
    assert set(op_counts(protos["decoder"])) <= BASE_DECODER_OPS
    # and they use the ops the design needs: the clamp and the nearest upsample are there
    assert op_counts(protos["decoder"])["Resize"] == 3
    assert {"Div", "Tanh", "Mul"} <= set(op_counts(protos["decoder"]))


@pytest.mark.parametrize("name", ["taef2", "taesana", "taeqi2_1"])
def test_other_variants_add_only_their_documented_ops(fresh_exports, name):
    _, protos = fresh_exports[name]
    extra = EXTRA_OPS[name]
    assert set(op_counts(protos["encoder"])) <= BASE_ENCODER_OPS | extra
    assert set(op_counts(protos["decoder"])) <= BASE_DECODER_OPS | extra
    if name == "taef2":  # GroupNorm lowers to InstanceNormalization, once per pool branch
        assert op_counts(protos["decoder"])["InstanceNormalization"] == 3
    if name == "taeqi2_1":  # pixel (un)shuffle as one op each, not Reshape/Transpose chains
        assert op_counts(protos["encoder"])["SpaceToDepth"] == 1
        assert op_counts(protos["decoder"])["DepthToSpace"] == 1


@pytest.mark.parametrize("name", list(taesd.VARIANTS))
def test_fresh_weights_parity_at_two_sizes_and_batch_two(fresh_exports, name):
    model, protos = fresh_exports[name]
    ort_model = OnnxTAESD(name, {p: OnnxPart(protos[p], CPU) for p in protos})
    v = model.variant
    for n, h, w in LATENT_SIZES:
        images = _images(v, (h * v.downscale, w * v.downscale), n)
        latents = model.encode(images)
        got = ort_model.encode(images)
        assert got.shape == latents.shape == (n, v.latent_channels, h, w)
        assert _max_diff(got, latents) <= 1e-4
        # the raw decoder output (before the [0, 1] clamp), so no difference hides in the clamp
        ref = model.run_part("decoder", latents)
        out = ort_model.run_part("decoder", latents)
        assert out.shape == ref.shape == images.shape
        assert _max_diff(out, ref) <= 1e-4


def test_taef2_published_weights_parity_on_a_photo(taef2, weights):
    ort_model = taesd.load("taef2", weights, executor="onnxruntime")
    assert isinstance(ort_model, OnnxTAESD) and ort_model.parts == ("encoder", "decoder")
    # exported in memory from the torch weights, which stay on the layers (for tiling's analysis)
    for key, tensor in taef2.decoder.state_dict().items():
        assert torch.equal(ort_model.decoder.state_dict()[key], tensor)
    for size in SIZES:
        image = photo("astronaut")[:, :size[0], :size[1]][None]
        latents = taef2.encode(image)
        assert _max_diff(ort_model.encode(image), latents) <= 1e-4
        assert _max_diff(ort_model.run_part("decoder", latents), taef2.run_part("decoder", latents)) <= 1e-4
        assert _max_diff(ort_model.decode(latents), taef2.decode(latents)) <= 1e-4


@pytest.fixture(scope="module")
def taef2_fp16(taef2):
    return {p: to_onnx(taef2, p, fp16=True) for p in taef2.parts}


def test_fp16_export_against_fp32(taef2, taef2_fp16):
    fp16 = OnnxTAESD("taef2", {p: OnnxPart(proto, CPU) for p, proto in taef2_fp16.items()})
    assert fp16.dtype == torch.float16
    image = photo("coffee")[:, :96, :128][None]
    latents = taef2.encode(image)
    reference = taef2.decode(latents)
    decoded = fp16.decode(latents)
    assert decoded.dtype == torch.float16
    assert psnr(decoded.float(), reference).item() >= 40
    encoded = fp16.encode(image)
    assert encoded.dtype == torch.float16
    assert psnr(taef2.decode(encoded.float()), reference).item() >= 40


def test_fp16_graph_is_float16_end_to_end(taef2_fp16):
    proto = taef2_fp16["decoder"]
    f16 = onnx.TensorProto.FLOAT16
    assert proto.graph.input[0].type.tensor_type.elem_type == f16
    assert proto.graph.output[0].type.tensor_type.elem_type == f16
    assert {t.data_type for t in proto.graph.initializer} == {f16}
    assert "Cast" not in op_counts(proto)
    assert read_metadata(proto)["taesd.dtype"] == "float16"


def test_names_dynamic_axes_and_metadata(fresh_exports):
    _, protos = fresh_exports["taesd3"]
    enc, dec = protos["encoder"], protos["decoder"]

    def dims(value_info):
        return [d.dim_param or d.dim_value for d in value_info.type.tensor_type.shape.dim]

    assert [i.name for i in enc.graph.input] == ["image"] and [o.name for o in enc.graph.output] == ["latent"]
    assert [i.name for i in dec.graph.input] == ["latent"] and [o.name for o in dec.graph.output] == ["image"]
    assert dims(enc.graph.input[0]) == ["batch", 3, "height", "width"]
    assert dims(dec.graph.input[0]) == ["batch", 16, "latent_height", "latent_width"]
    meta = read_metadata(dec)
    assert meta["taesd.variant"] == "taesd3" and meta["taesd.part"] == "decoder"
    assert meta["taesd.image_range"].startswith("[0, 1]")
    assert float(meta["taesd.vae_scale"]) == taesd.get_variant("taesd3").vae_scale
    assert float(meta["taesd.vae_shift"]) == taesd.get_variant("taesd3").vae_shift


def test_simplify_folds_the_identity_aliases_the_exporter_emits():
    # Fresh GroupNorm weights are all ones/zeros: the exporter shares them through Identity nodes.
    model = taesd.create("taef2", parts="decoder")
    import io
    import warnings
    buf = io.BytesIO()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(model.decoder, (torch.randn(1, 32, 4, 4),), buf, dynamo=False,
                          input_names=["latent"], output_names=["image"])
    raw = onnx.load_from_string(buf.getvalue())
    assert op_counts(raw)["Identity"] > 0
    x = np.random.default_rng(0).standard_normal((1, 32, 4, 4)).astype(np.float32)
    before = ort.InferenceSession(raw.SerializeToString(), providers=CPU).run(None, {"latent": x})[0]
    simple = simplify(raw)
    onnx.checker.check_model(simple, full_check=True)
    assert "Identity" not in op_counts(simple)
    after = ort.InferenceSession(simple.SerializeToString(), providers=CPU).run(None, {"latent": x})[0]
    np.testing.assert_array_equal(before, after)


def test_cli_export_info_and_onnx_backend(weights, tmp_path, capsys):
    assert main(["export", "onnx", "--variant", "taef2", "-w", str(weights), "-o", str(tmp_path)]) == 0
    enc, dec = tmp_path / "taef2_encoder.onnx", tmp_path / "taef2_decoder.onnx"
    assert enc.is_file() and dec.is_file()
    capsys.readouterr()
    assert main(["info", str(dec)]) == 0
    info = capsys.readouterr().out
    assert "input latent: float32 [batch, 32, latent_height, latent_width]" in info
    assert "Resize x3" in info and "Tanh x1" in info and "op set check: ok" in info
    assert "taesd.variant: taef2" in info

    # encode and decode with the exported files (a .onnx weight file picks onnxruntime by itself)
    from PIL import Image
    src = tmp_path / "chelsea.png"
    Image.fromarray((photo("chelsea").permute(1, 2, 0).numpy() * 255).round().astype(np.uint8)[:100, :120]).save(src)
    lat, out = tmp_path / "chelsea.taef2.png", tmp_path / "chelsea.decoded.png"
    assert main(["encode", str(src), "-v", "taef2", "-w", str(enc), "--executor", "onnxruntime",
                 "--format", "png", "-o", str(lat)]) == 0
    assert main(["decode", str(lat), "-w", str(dec), "-o", str(out)]) == 0
    via_ort = np.asarray(Image.open(out))
    assert via_ort.shape == (100, 120, 3)  # the padded size is cropped back
    ref = tmp_path / "ref.png"
    assert main(["decode", str(lat), "-w", str(weights), "-o", str(ref)]) == 0
    assert np.abs(via_ort.astype(int) - np.asarray(Image.open(ref)).astype(int)).max() <= 1


def test_load_from_exported_files_and_errors(fresh_exports, tmp_path):
    model, protos = fresh_exports["taef1"]
    paths = [save_onnx(protos["decoder"], tmp_path / "taef1_decoder.onnx")]
    loaded = taesd.load("taef1", paths[0])
    assert isinstance(loaded, OnnxTAESD) and loaded.parts == ("decoder",)
    # the layer structure stays readable (for tiling's analysis), without weights (meta device)
    assert len(loaded.decoder) == len(model.decoder) and loaded.decoder[1].weight.is_meta
    latents = torch.randn(1, 16, 8, 8)
    assert _max_diff(loaded.decode(latents), model.decode(latents)) <= 1e-4
    with pytest.raises(TaesdError, match="holds a taef1 decoder, not a taesd3 part"):
        taesd.load("taesd3", paths[0])
    with pytest.raises(TaesdError, match="no taef1 encoder"):
        taesd.load("taef1", paths, parts="encoder")
    with pytest.raises(TaesdError, match="has no encoder"):
        loaded.encode(torch.rand(1, 3, 64, 64))
    with pytest.raises(TaesdError, match="opset 9 is not supported"):
        to_onnx(model, "decoder", opset=9)
    with pytest.raises(TaesdError, match="unknown executor"):
        taesd.load("taef1", paths[0], executor="tensorrt")
    with pytest.raises(TaesdError, match="fp32 or fp16"):
        taesd.load("taef1", paths[0].parent, dtype="bf16", executor="onnxruntime")
