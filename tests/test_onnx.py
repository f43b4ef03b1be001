"""--export-onnx: both networks as ONNX files that ONNX Runtime runs at any batch and image size with PyTorch's
logits, classes and colours in the metadata; a failed check writes nothing; without the extras, one line."""
from __future__ import annotations

import contextlib
import io
import json
import re
import sys
from pathlib import Path

import pytest
import torch

from conftest import make_voc_tree, run_script
import origin_predict
import some_define as sd
from support import checkpoints, onnx_export
from support.errors import run_main

SIZES = [(64, 96), (50, 70)]   # a multiple of 32, and not
NAMES, COLORS = ["background", "cat", "dog", "sky"], [[0, 0, 0], [250, 10, 10], [10, 250, 10], [10, 10, 250]]
EXTRAS = "requirements-onnx.txt is not installed (.ci/run installs it)"


def onnx_and_runtime():
    return pytest.importorskip("onnx", reason=EXTRAS), pytest.importorskip("onnxruntime", reason=EXTRAS)


@pytest.fixture(scope="module")
def voc(tmp_path_factory) -> Path:
    return make_voc_tree(tmp_path_factory.mktemp("voc"), [(64, 64)] * 2, SIZES)


def checkpoint_of(model: str, voc: Path, seed: int) -> tuple[torch.nn.Module, dict]:
    """A random-init network of 4 classes and its checkpoint, trained (it says) on ``voc``."""
    torch.manual_seed(seed)
    net = sd.build_model(model, len(NAMES), "none").eval()
    return net, checkpoints.make_checkpoint(net, model, NAMES, COLORS, {"data_dir": str(voc), "val_split": "val"})


@pytest.fixture(scope="module")
def exported(voc, tmp_path_factory) -> dict[str, tuple[Path, torch.nn.Module, str]]:
    """The FCN exported by origin_predict.py --export-onnx, the U-Net by export_onnx itself; and what each printed."""
    pytest.importorskip("onnxscript", reason=EXTRAS)
    onnx_and_runtime()
    folder = tmp_path_factory.mktemp("onnx")
    fcn, fcn_checkpoint = checkpoint_of("fcn", voc, 0)
    checkpoints.save_checkpoint(folder / "fcn.pt", fcn_checkpoint)
    result = run_script("origin_predict.py", "--checkpoint", str(folder / "fcn.pt"), "--export-onnx",
                        str(folder / "fcn.onnx"))
    assert result.returncode == 0, result.stderr
    unet, unet_checkpoint = checkpoint_of("unet", voc, 1)
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        samples = onnx_export.sample_images(lambda: (voc, "val"))
        onnx_export.export_onnx(unet, unet_checkpoint, folder / "unet.onnx", samples)
    return {"fcn": (folder / "fcn.onnx", fcn, result.stdout), "unet": (folder / "unet.onnx", unet, printed.getvalue())}


@pytest.mark.parametrize("model", ["fcn", "unet"])
def test_export_reports_its_check_on_the_checkpoint_s_split(exported, voc, model):
    path, _, printed = exported[model]
    line = next(line for line in printed.splitlines() if line.startswith("ONNX Runtime"))
    pixels = 64 * 96 + 50 * 70
    match = re.fullmatch(rf"ONNX Runtime \(CPU\) against PyTorch on 2 images of the val split of {re.escape(str(voc))} "
                         rf"\(50x70, 64x96\): max \|logit difference\| (\S+), argmax agreement (\S+) % of "
                         rf"{pixels:,} pixels", line)
    assert match, line
    assert float(match[1]) < 1e-3 and float(match[2]) >= 99.9
    assert f"wrote {path}: opset 18" in printed


@pytest.mark.parametrize("model", ["fcn", "unet"])
def test_onnx_runtime_gives_pytorch_s_logits_at_any_batch_and_size(exported, model):
    _, runtime = onnx_and_runtime()
    path, net, _ = exported[model]
    session = runtime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    g = torch.Generator().manual_seed(5)
    for batch, (h, w) in zip((2, 1), SIZES):
        x = sd.normalize_images(torch.randint(0, 256, (batch, 3, h, w), dtype=torch.uint8, generator=g))
        with torch.no_grad():
            expected = net(x)
        got = torch.from_numpy(session.run(["logits"], {"image": x.numpy()})[0])
        assert got.shape == (batch, len(NAMES), h, w)
        assert (got - expected).abs().max() < 1e-3
        assert (got.argmax(1) == expected.argmax(1)).float().mean() >= 0.999


@pytest.mark.parametrize("model", ["fcn", "unet"])
def test_metadata_round_trips(exported, model):
    onnx, runtime = onnx_and_runtime()
    path = exported[model][0]
    loaded = onnx.load(str(path))
    meta = {p.key: p.value for p in loaded.metadata_props}
    assert meta == runtime.InferenceSession(str(path), providers=["CPUExecutionProvider"]).get_modelmeta() \
        .custom_metadata_map
    assert (meta["model"], json.loads(meta["class_names"]), json.loads(meta["colormap"])) == (model, NAMES, COLORS)
    assert (json.loads(meta["mean"]), json.loads(meta["std"])) == (list(sd.IMAGENET_MEAN), list(sd.IMAGENET_STD))
    assert "pads the image to a multiple of 32 inside" in meta["padding"]
    dims = lambda value: [d.dim_param or d.dim_value for d in value.type.tensor_type.shape.dim]
    assert dims(loaded.graph.input[0]) == ["batch", 3, "height", "width"]
    assert dims(loaded.graph.output[0]) == ["batch", len(NAMES), "height", "width"]
    assert [o.version for o in loaded.opset_import if o.domain == ""] == [18]


def test_an_export_that_disagrees_with_pytorch_writes_nothing(exported, voc, tmp_path, monkeypatch):
    onnx, _ = onnx_and_runtime()
    rotated, checkpoint = checkpoint_of("unet", voc, 1)   # the exported U-Net, its classes rotated by one: PyTorch's
    with torch.no_grad():                                # argmax is then never the ONNX file's
        for tensor in (rotated.conv_last.weight, rotated.conv_last.bias):
            tensor.copy_(tensor.roll(1, dims=0))
    monkeypatch.setattr(onnx_export, "onnx_model", lambda net, checkpoint: onnx.load(str(exported["unet"][0])))
    with pytest.raises(sd.UsageError, match=r"--export-onnx .*bad\.onnx: ONNX Runtime agrees with PyTorch on only "
                                            r"0\.000 % of the pixels \(at least 99\.9 % needed\); nothing written"):
        onnx_export.export_onnx(rotated, checkpoint, tmp_path / "bad.onnx",
                                onnx_export.sample_images(lambda: (voc, "val")))
    assert list(tmp_path.iterdir()) == []


def test_without_the_dataset_the_check_runs_on_generated_images():
    def no_dataset():
        raise sd.UsageError("no dataset found")
    images, what = onnx_export.sample_images(no_dataset)
    assert what == "generated images"
    assert [tuple(im.shape) for im in images] == [(3, 256, 320), (3, 200, 301)]   # 301: not a multiple of 32
    assert all(im.dtype == torch.uint8 and im.float().std() > 10 for im in images)


def test_without_the_extras_export_is_one_line(voc, tmp_path, monkeypatch, capsys):
    _, checkpoint = checkpoint_of("fcn", voc, 0)
    checkpoints.save_checkpoint(tmp_path / "fcn.pt", checkpoint)
    monkeypatch.setitem(sys.modules, "onnxruntime", None)   # import onnxruntime now fails, as when not installed
    with pytest.raises(SystemExit) as exit_info:
        run_main(origin_predict.main, ["--checkpoint", str(tmp_path / "fcn.pt"), "--threads", "1", "--export-onnx",
                                       str(tmp_path / "fcn.onnx")])
    assert exit_info.value.code == 2
    assert capsys.readouterr().err == ("error: --export-onnx needs onnx, onnxscript and onnxruntime: pip install -r "
                                       "requirements-onnx.txt\n")
    assert not (tmp_path / "fcn.onnx").exists()
