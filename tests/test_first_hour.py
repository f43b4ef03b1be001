"""A new user's first hour: help with defaults, no abbreviations, figures with a colour key, overlays that keep the
photo, and each message a first run showed (issue: first hour)."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import some_define as sd
from conftest import REPO_ROOT, THREADS, TINY_TRAIN_SIZES, TINY_VAL_SIZES, make_voc_tree, run_script
from support import checkpoints, download, export, figures, prediction


def checkpoint_file(path: Path, model: str, voc_dir: Path, demo: bool = False) -> Path:
    torch.manual_seed(0)
    net = sd.build_model(model, 21)
    config = {"data_dir": str(voc_dir), "demo": demo, "val_split": "val", "ignore_index": None}
    checkpoints.save_checkpoint(path, checkpoints.make_checkpoint(net, model, sd.VOC_CLASSES, sd.VOC_COLORMAP,
                                                                  config, epoch=3, history=[]))
    return path


@pytest.fixture(scope="module")
def models(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("first_hour")
    voc = make_voc_tree(root / "data", TINY_TRAIN_SIZES, TINY_VAL_SIZES)
    return {"fcn": checkpoint_file(root / "fcn" / "best.pt", "fcn", voc),
            "unet": checkpoint_file(root / "unet" / "best.pt", "unet", voc),
            "demo": checkpoint_file(root / "demo" / "best.pt", "fcn", voc, demo=True), "root": root}


def error_line(result: subprocess.CompletedProcess) -> str:
    assert result.returncode == 2 and "Traceback" not in result.stderr, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    return lines[0]


def test_help_shows_every_default_and_what_demo_changes():
    origin, mine = run_script("origin_train.py", "--help").stdout, run_script("my_train.py", "--help").stdout
    flat = lambda text: " ".join(text.split())
    assert "poly) (default: 0.001)" in flat(origin) and "poly) (default: 0.0001)" in flat(mine)   # --lr's help ends so
    assert "base run's) (default: 30)" in flat(origin) and "over the processes (default: 32)" in flat(origin)
    assert "--crop 64 64, --epochs 12, --batch-size 8, --pretrained none, --device cpu" in flat(origin)
    assert "--model" not in origin and "--model {fcn,unet}" in mine     # origin_train.py trains the FCN only
    predict = flat(run_script("my_predict.py", "--help").stdout)
    for flag in ("--checkpoint CHECKPOINT the trained model", "(default: runs/my/best.pt)", "--figure FIGURE where",
                 "--device DEVICE cuda", "--batch-size BATCH_SIZE images per forward pass (default: 8)",
                 "(default: runs/origin/best.pt)"):
        assert flag in predict, flag


def test_abbreviated_flags_are_refused():
    assert "unrecognized arguments: --epoch 3" in error_line(run_script("origin_train.py", "--demo", "--epoch", "3"))
    assert "--image" in error_line(run_script("my_predict.py", "--image", "x.jpg"))


def test_other_ranks_stay_silent_under_torchrun():
    env = dict(os.environ, RANK="1", OMP_NUM_THREADS=THREADS)
    result = subprocess.run([sys.executable, "origin_train.py", "--epoch", "3"], cwd=REPO_ROOT, env=env,
                            capture_output=True, text=True)
    assert result.returncode == 2 and result.stderr == ""


def test_a_text_file_as_checkpoint_says_what_it_is(tmp_path):
    path = tmp_path / "notes.pt"
    path.write_text("hello")
    with pytest.raises(sd.UsageError, match=r"notes\.pt: not a PyTorch checkpoint file .* pass the best\.pt"):
        checkpoints.load_checkpoint(path)


def test_a_failed_download_without_a_partial_file_says_retry(tmp_path):
    with pytest.raises(sd.UsageError) as info:
        download.download_file((tmp_path / "missing.tar").as_uri(), tmp_path / "x.tar")
    assert "run again to retry" in str(info.value) and "0 bytes" not in str(info.value)


def test_origin_predict_refuses_a_unet_and_my_predict_compares_with_an_fcn(models, tmp_path):
    line = error_line(run_script("origin_predict.py", "--checkpoint", str(models["unet"]), "--figure",
                                 str(tmp_path / "o.png")))
    assert f"holds a U-Net; show it with my_predict.py --checkpoint {models['unet']}" in line
    result = run_script("my_predict.py", "--checkpoint", str(models["unet"]), "--compare", str(models["fcn"]),
                        "--figure", str(tmp_path / "m.png"), "--compare-figure", str(tmp_path / "c.png"), "--eval",
                        "--metrics", str(tmp_path / "m.json"))
    assert result.returncode == 0, result.stderr
    assert f"using U-Net from {models['unet']}, epoch 3" in result.stdout
    assert f"compared with FCN from {models['fcn']}, epoch 3" in result.stdout


def test_eval_table_shows_whole_model_names():
    m = sd.SegMetrics(3)
    m.update(torch.tensor([[0, 1, 2]]), torch.tensor([[0, 1, 1]], dtype=torch.uint8))
    result = m.compute(["background", "a", "b"])
    table = prediction.metrics_table({"FCN (origin)": result, "U-Net (my)": result}, ["background", "a", "b"])
    assert "FCN (origin)" in table.splitlines()[0] and "U-Net (my)" in table.splitlines()[0]


def test_images_messages_and_demo_warning(models, tmp_path):
    (tmp_path / "in").mkdir()
    Image.fromarray(np.full((40, 50, 3), 120, dtype=np.uint8)).save(tmp_path / "in" / "photo.jpg")
    (tmp_path / "in" / "broken.jpg").write_text("not a jpeg")
    result = run_script("origin_predict.py", "--checkpoint", str(models["demo"]), "--images",
                        str(tmp_path / "in"), "--save-dir", str(tmp_path / "out"))
    assert "trained on the synthetic demo data" in result.stdout
    assert "wrote 1 prediction (NAME.png" in result.stdout
    assert "1 of 2 images could not be read" in result.stderr.splitlines()[-1]
    only_broken = run_script("origin_predict.py", "--checkpoint", str(models["fcn"]), "--images",
                             str(tmp_path / "in" / "broken.jpg"), "--save-dir", str(tmp_path / "out2"))
    assert "wrote 0" not in only_broken.stdout and "demo" not in only_broken.stdout
    assert f"{tmp_path / 'in' / 'broken.jpg'}: cannot read the image" in error_line(only_broken)   # the one input
    assert not (tmp_path / "out2").exists()
    blocker = tmp_path / "a_file"
    blocker.write_text("x")
    line = error_line(run_script("origin_predict.py", "--checkpoint", str(models["fcn"]), "--images",
                                 str(tmp_path / "in" / "photo.jpg"), "--save-dir", str(blocker / "sub")))
    assert f"--save-dir {blocker / 'sub'}: cannot create the folder" in line


def test_overlay_keeps_background_pixels_and_legend_colours():
    image = torch.randint(0, 256, (3, 20, 30), dtype=torch.uint8)
    pred = torch.zeros(20, 30, dtype=torch.long)
    pred[5:15, 10:20] = 8                                  # a cat on a background
    pred[0, 0] = sd.VOID
    out = export.overlay(image, pred, sd.VOC_COLORMAP, sd.VOC_CLASSES)
    photo = image.permute(1, 2, 0)
    assert torch.equal(out[pred == 0], photo[pred == 0]) and torch.equal(out[0, 0], photo[0, 0])
    inside = out[7:13, 12:18].float()                      # the cat, away from its outline: 60 % of its colour
    expected = 0.6 * torch.tensor(sd.VOC_COLORMAP[8]).float() + 0.4 * photo[7:13, 12:18].float()
    assert torch.allclose(inside, expected, atol=0.51)
    assert torch.equal(out[5, 12], torch.tensor(sd.VOC_COLORMAP[8], dtype=torch.uint8))   # the outline
    sky = export.overlay(image, pred, sd.VOC_COLORMAP, ["sky"] + sd.VOC_CLASSES[1:])     # class 0 not background
    assert not torch.equal(sky[pred == 0], photo[pred == 0])


def test_prediction_figure_has_a_colour_key_with_void_explained():
    torch.manual_seed(0)
    net = sd.build_model("fcn", 21).eval()
    label = torch.zeros(40, 50, dtype=torch.uint8)
    label[10:30, 10:30] = 8
    label[9, 10:30] = sd.VOID
    data = sd.SegDataset([torch.randint(0, 256, (3, 40, 50), dtype=torch.uint8)], [label], ["x"], (32, 32))
    fig = figures.prediction_figure([("U-Net", net)], data, sd.VOC_COLORMAP, sd.VOC_CLASSES, torch.device("cpu"),
                                    title="synthetic demo data")
    texts = [t.get_text() for t in fig.legends[0].get_texts()]
    assert "background" in texts and "cat" in texts and "void (unlabelled, not scored)" in texts
    assert fig._suptitle.get_text() == "synthetic demo data"
    assert [ax.get_ylabel() for ax in fig.axes] == ["image", "ground truth", "U-Net"]
