"""The original repository's .pth files: whole nn.DataParallel pickles (and state_dicts) of its U-Net and FCN, written
by a replica of its classes (tests/original_repo/some_define.py) in another process, opened here without running
their pickle, converted with identical outputs, fine-tuned; files that would run code are refused."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from conftest import THREADS, make_voc_tree, run_script
import some_define as sd
from support import checkpoints, original

REPLICA = Path(__file__).resolve().parent / "original_repo"
TINY = ["--pretrained", "none", "--device", "cpu", "--crop", "32", "32", "--batch-size", "2", "--workers", "0"]


def save_original(folder: Path, name: str, kind: str, *flags: str) -> tuple[Path, dict]:
    """FOLDER/NAME.pth as the original repository writes it (its replica importable as some_define in that process
    only), and what the replica computed: its input, logits and the state_dict's number of entries."""
    path, logits = folder / f"{name}.pth", folder / f"{name}_logits.pt"
    env = dict(os.environ, OMP_NUM_THREADS=THREADS)
    result = subprocess.run([sys.executable, str(REPLICA / "save_original.py"), kind, str(path), str(logits), *flags],
                            cwd=folder, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    return path, torch.load(logits, weights_only=True)


@pytest.fixture(scope="module")
def files(tmp_path_factory) -> dict[str, tuple[Path, dict]]:
    folder = tmp_path_factory.mktemp("original")
    return {"unet": save_original(folder, "net_30_lowlr10", "unet"),
            "fcn": save_original(folder, "origin_net_30", "fcn")}


@pytest.fixture(scope="module")
def voc(tmp_path_factory) -> Path:
    return make_voc_tree(tmp_path_factory.mktemp("voc"), [(64, 64)] * 4, [(64, 96), (50, 70)])


def one_error_line(result: subprocess.CompletedProcess) -> str:
    assert result.returncode == 2, result.stderr
    lines = result.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and "Traceback" not in result.stderr, result.stderr
    return lines[0]


def test_the_replica_pickles_what_the_original_files_name(files):
    path, saved = files["unet"]
    assert saved["state_dict_entries"] == 268   # module.base_model.* beside module.layer0..4.*, as in the real file
    named = set(torch.serialization.get_unsafe_globals_in_checkpoint(path))
    assert {"some_define.ResNetUNet", "torch.nn.parallel.data_parallel.DataParallel",
            "torchvision.models.resnet.ResNet", "torchvision.models.resnet.BasicBlock"} <= named
    assert named <= set(original.ORIGINAL_CLASSES)
    assert "tests/original_repo" not in sd.__file__.replace(os.sep, "/")   # this process never imported the replica


@pytest.mark.parametrize("kind, script", [("unet", "my_predict.py"), ("fcn", "origin_predict.py")])
def test_converted_model_gives_the_original_logits(files, voc, tmp_path, kind, script):
    path, saved = files[kind]
    out = tmp_path / "converted.pt"
    result = run_script(script, "--checkpoint", str(path), "--voc-dir", str(voc), "--convert", str(out))
    assert result.returncode == 0, result.stderr
    network = {"unet": "U-Net", "fcn": "FCN"}[kind]
    assert (f"read {path}: the original repository's {network} (a pickled nn.DataParallel), 21 VOC classes; no code "
            f"in the file was run") in result.stdout
    raw = torch.load(out, map_location="cpu", weights_only=True)   # this project's format from now on
    assert (raw["model"], raw["num_classes"], raw["class_names"], raw["colormap"]) == \
        (kind, 21, sd.VOC_CLASSES, sd.VOC_COLORMAP)
    assert raw["config"]["source"] == f"the original repository's {network}"
    net = checkpoints.restore_model(checkpoints.load_checkpoint(out), out).eval()
    with torch.no_grad():
        logits = net(saved["input"])          # float32, 64 x 96: a multiple of 32, where the original needs no pad
    assert torch.equal(logits, saved["logits"])


def test_predict_scripts_evaluate_and_compare_the_original_files(files, voc, tmp_path):
    (unet, _), (fcn, _) = files["unet"], files["fcn"]
    metrics = tmp_path / "unet_metrics.json"
    result = run_script("my_predict.py", "--checkpoint", str(unet), "--compare", str(fcn), "--voc-dir", str(voc),
                        "--eval", "--metrics", str(metrics))
    assert result.returncode == 0, result.stderr
    assert f"read {unet}: the original repository's U-Net" in result.stdout
    assert f"read {fcn}: the original repository's FCN" in result.stdout
    assert json.loads(metrics.read_text())["num_images"] == 2
    assert (fcn.parent / "metrics_val.json").is_file()   # the compared FCN's, next to its file


def test_predict_images_of_the_original_unet(files, voc, tmp_path):
    unet, _ = files["unet"]
    image = voc / "JPEGImages" / "val_001.jpg"
    result = run_script("my_predict.py", "--checkpoint", str(unet), "--images", str(image), "--save-dir",
                        str(tmp_path / "pred"))
    assert result.returncode == 0, result.stderr
    assert (tmp_path / "pred" / "val_001.png").is_file() and (tmp_path / "pred" / "val_001_overlay.jpg").is_file()


def test_finetune_trains_on_from_the_original_unet(files, voc, tmp_path):
    unet, _ = files["unet"]
    out = tmp_path / "ft"
    result = run_script("my_train.py", "--voc-dir", str(voc), "--out", str(out), "--epochs", "1", "--lr", "1e-9",
                        "--finetune-from", str(unet), *TINY)
    assert result.returncode == 0, result.stderr
    assert result.stdout.count(f"read {unet}: the original repository's U-Net") == 1
    trained = checkpoints.load_checkpoint(out / "last.pt")
    assert [h["epoch"] for h in trained["history"]] == [1]
    start = checkpoints.load_checkpoint(unet)["state_dict"]
    fresh = sd.build_model("unet", 21, "none").state_dict()
    for key in ("conv_last.weight", "layer0.0.weight", "conv_up3.0.weight"):   # Adam at lr 1e-9: a step of ~1e-9
        assert torch.allclose(trained["state_dict"][key], start[key], atol=1e-6), key
        assert not torch.allclose(fresh[key], start[key], atol=1e-3), key


def test_a_state_dict_of_the_original_opens_too(tmp_path):
    path, saved = save_original(tmp_path, "fcn_state", "fcn", "--state-dict")
    net = checkpoints.restore_model(checkpoints.load_checkpoint(path), path).eval()
    with torch.no_grad():
        assert torch.equal(net(saved["input"]), saved["logits"])


def test_an_original_model_of_other_classes_is_refused(tmp_path):
    path, _ = save_original(tmp_path, "five", "fcn", "--classes", "5")
    with pytest.raises(sd.UsageError, match=r"five\.pth: the original repository's FCN with 5 classes; that "
                                            r"repository trains VOC's 21"):
        checkpoints.load_checkpoint(path)


@pytest.mark.parametrize("payload, global_name", [("system", "posix.system"), ("exec", "builtins.exec"),
                                                  ("unknown", "some_define.Gadget")])
def test_an_original_file_that_would_run_code_is_refused(tmp_path, payload, global_name):
    marker = tmp_path / "MARKER"
    path, _ = save_original(tmp_path, "evil", "fcn", "--payload", payload, "--marker", str(marker))
    with pytest.raises(sd.UsageError) as info:
        checkpoints.load_checkpoint(path)
    assert str(info.value) == (f"{path}: refused: it names {global_name}, which is not a tensor, a plain value or a "
                               f"layer of the original repository's models; nothing from the file was run")
    if payload == "system":
        line = one_error_line(run_script("origin_predict.py", "--checkpoint", str(path), "--convert",
                                         str(tmp_path / "out.pt")))
        assert line == f"error: {info.value}"
        assert not (tmp_path / "out.pt").exists()
    assert not marker.exists()


def test_stand_ins_hold_state_and_run_nothing():
    stand_in = dict((name, cls) for cls, name in original.STAND_INS)["some_define.ResNetUNet"]
    layer = stand_in.__new__(stand_in)
    layer.__setstate__({"_parameters": {"w": torch.ones(2)}, "_modules": {"a": None}})
    tensors = original.layer_tensors(layer)
    assert list(tensors) == ["w"] and torch.equal(tensors["w"], torch.ones(2))
    with pytest.raises(TypeError):   # a pickle that calls a stand-in with arguments gets nothing built
        stand_in("touch MARKER")
    nested = stand_in.__new__(stand_in)
    nested.__setstate__({"_modules": {"self": nested}})   # a cycle is not a model
    with pytest.raises(ValueError, match="not a layer"):
        original.layer_tensors(nested)
