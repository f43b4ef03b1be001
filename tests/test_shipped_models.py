"""The CamVid models in models/camvid/: fp16 state_dicts that open with weights_only=True into fp32 networks, predict
street photos through my_predict.py and origin_predict.py with no training, and carry the val mIoU the README gives."""
from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import run_script
from support import checkpoints

ROOT = Path(__file__).resolve().parents[1]
MODELS = {"unet": ROOT / "models" / "camvid" / "unet.pt", "fcn": ROOT / "models" / "camvid" / "fcn.pt"}
CAMVID = ["sky", "building", "pole", "road", "pavement", "tree", "sign_symbol", "fence", "car", "pedestrian",
          "bicyclist"]


def test_both_fit_in_60_MB():
    assert sum(path.stat().st_size for path in MODELS.values()) <= 60e6


@pytest.mark.parametrize("model", list(MODELS))
def test_fp16_on_disk_loads_into_an_fp32_network(model):
    raw = torch.load(MODELS[model], map_location="cpu", weights_only=True)
    assert raw["model"] == model and raw["class_names"] == CAMVID
    assert {v.dtype for v in raw["state_dict"].values() if v.is_floating_point()} == {torch.float16}
    assert "optimizer" not in raw and "rng" not in raw   # weights to use, not a run to resume
    net = checkpoints.restore_model(checkpoints.load_checkpoint(MODELS[model]), MODELS[model])
    for name, tensor in net.state_dict().items():
        if tensor.is_floating_point():
            assert tensor.dtype == torch.float32 and torch.equal(tensor, raw["state_dict"][name].float()), name


@pytest.mark.parametrize("model", list(MODELS))
def test_the_readme_gives_the_val_mIoU_of_the_shipped_epoch(model):
    """The README's table of the shipped models quotes the last validation in each file's own history."""
    history = torch.load(MODELS[model], map_location="cpu", weights_only=True)["history"]
    last = [row for row in history if row.get("val_miou") is not None][-1]
    for readme in ("README.md", "README.zh-CN.md"):
        row = [line for line in (ROOT / readme).read_text().splitlines()
               if line.startswith("| ") and f"models/camvid/{model}.pt" in line]
        assert len(row) == 1, readme
        assert re.search(rf"\| {last['val_miou']:.3f} \|", row[0]), (readme, row[0], last)
        assert f"| {last['epoch']} |" in row[0], (readme, row[0])


def test_they_predict_a_photo_with_no_training(tmp_path):
    photo = np.zeros((96, 128, 3), np.uint8)
    photo[:40], photo[40:] = (200, 205, 215), (90, 88, 92)
    Image.fromarray(photo).save(tmp_path / "street.jpg")
    palette = [value for rgb in checkpoints.load_checkpoint(MODELS["unet"])["colormap"] for value in rgb]
    for script, model in (("my_predict.py", "unet"), ("origin_predict.py", "fcn")):
        result = run_script(script, "--checkpoint", str(MODELS[model]), "--images", str(tmp_path / "street.jpg"),
                            "--save-dir", str(tmp_path / model), "--threads", "1")
        assert result.returncode == 0, result.stderr
        labels = Image.open(tmp_path / model / "street.png")
        assert labels.mode == "P" and labels.size == (128, 96)
        assert labels.getpalette()[:len(palette)] == palette and np.asarray(labels).max() < len(CAMVID)


def test_they_score_a_test_split_and_draw_the_comparison(tmp_path):
    """CamVid's layout (pair lists and index masks) with the documented classes.txt, as a user scores the shipped
    models on the test split: --eval, and the U-Net beside the FCN."""
    from test_pair_lists import make_pair_list_dataset
    root = make_pair_list_dataset(tmp_path / "CamVid", {"test": 2})
    (root / "classes.txt").write_text("".join(
        f"{name} {' '.join(map(str, rgb))}\n"
        for name, rgb in zip(CAMVID, checkpoints.load_checkpoint(MODELS["unet"])["colormap"])))
    data = ["--voc-dir", str(root), "--classes", str(root / "classes.txt"), "--split", "test", "--threads", "1"]
    result = run_script("my_predict.py", "--checkpoint", str(MODELS["unet"]), *data, "--eval",
                        "--metrics", str(tmp_path / "unet.json"))
    assert result.returncode == 0, result.stderr
    metrics = json.loads((tmp_path / "unet.json").read_text())
    assert metrics["num_images"] == 2 and list(metrics["per_class_iou"]) == CAMVID
    result = run_script("my_predict.py", "--checkpoint", str(MODELS["unet"]), *data, "--compare", str(MODELS["fcn"]),
                        "--figure", str(tmp_path / "unet.png"), "--compare-figure", str(tmp_path / "compare.png"))
    assert result.returncode == 0, result.stderr
    assert Image.open(tmp_path / "compare.png").size[1] > Image.open(tmp_path / "unet.png").size[1]   # + the FCN
