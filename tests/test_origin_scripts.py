"""origin_train.py and origin_predict.py end to end, with tiny settings, as subprocesses from the repository root."""
from __future__ import annotations

import csv
import json

import pytest
import torch

import some_define as sd
from support import checkpoints, data, demo
from conftest import TINY_TRAIN_SIZES, TINY_VAL_SIZES, make_voc_tree, run_script

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
HISTORY_COLUMNS = ["epoch", "lr", "train_loss", "train_acc", "val_acc", "val_miou", "img_per_s", "seconds"]
METRICS_KEYS = {"num_images", "pixel_acc", "mean_class_acc", "miou", "per_class_iou", "d2l_pixel_acc",
                "confusion_matrix"}


def assert_ok(result):
    assert result.returncode == 0, f"exit {result.returncode}\nstdout:\n{result.stdout}\nstderr:\n{result.stderr}"


def assert_one_line_error(result) -> str:
    """Exit code 2 and exactly one stderr line 'error: ...', no traceback; returns that line."""
    assert result.returncode == 2, f"exit {result.returncode}\nstderr:\n{result.stderr}"
    assert "Traceback" not in result.stderr
    lines = result.stderr.splitlines()
    assert len(lines) == 1, f"{len(lines)} stderr lines:\n{result.stderr[:2000]}"
    assert lines[0].startswith("error: ")
    return lines[0]


def read_history(path):
    with open(path, newline="") as f:
        reader = csv.DictReader(f)
        return reader.fieldnames, list(reader)


# ---------------------------------------------------------------------------------------------------------------------
# --demo: train, then predict and evaluate the checkpoint
# ---------------------------------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def demo_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("origin_demo")
    result = run_script("origin_train.py", "--demo", "--epochs", "2", "--crop", "32", "64", "--batch-size", "8",
                        "--out", str(out))
    return out, result


def test_train_demo_writes_history_curves_and_checkpoint(demo_run):
    out, result = demo_run
    assert_ok(result)
    fieldnames, rows = read_history(out / "history.csv")
    assert fieldnames == HISTORY_COLUMNS
    assert [int(r["epoch"]) for r in rows] == [1, 2]
    for r in rows:
        assert float(r["lr"]) == 1e-3
        assert 0 <= float(r["train_acc"]) <= 1 and 0 <= float(r["val_acc"]) <= 1 and 0 <= float(r["val_miou"]) <= 1
        assert float(r["train_loss"]) > 0
    assert (out / "curves.png").read_bytes()[:8] == PNG_MAGIC
    checkpoint = torch.load(out / "last.pt", map_location="cpu", weights_only=True)
    assert checkpoint["model"] == "fcn" and checkpoint["num_classes"] == 21 and checkpoint["epoch"] == 2
    assert checkpoint["class_names"] == sd.VOC_CLASSES and checkpoint["colormap"] == sd.VOC_COLORMAP
    config = checkpoint["config"]
    assert config["demo"] is True and config["crop"] == [32, 64] and config["batch_size"] == 8
    assert config["epochs"] == 2 and config["pretrained"] == "none" and config["device"] == "cpu"
    assert [h["epoch"] for h in checkpoint["history"]] == [1, 2]
    assert checkpoint["history"][-1]["val_miou"] == pytest.approx(float(rows[-1]["val_miou"]), rel=1e-12)
    checkpoints.restore_model(checkpoint)      # the weights fit the model they name
    assert {"curves.png", "history.csv", "last.pt"} <= {p.name for p in out.iterdir()}
    assert not [p.name for p in out.iterdir() if p.name.endswith(".tmp")]     # no temporary file left behind


def test_predict_demo_writes_the_figure(demo_run, tmp_path):
    out, result = demo_run
    assert_ok(result)
    figure = tmp_path / "figs" / "x.png"
    predicted = run_script("origin_predict.py", "--checkpoint", str(out / "last.pt"), "--figure", str(figure),
                           "--num", "2")
    assert_ok(predicted)
    assert figure.read_bytes()[:8] == PNG_MAGIC
    assert str(figure) in predicted.stdout


def test_predict_eval_writes_metrics_of_the_whole_split(demo_run, tmp_path):
    out, result = demo_run
    assert_ok(result)
    metrics_path = tmp_path / "m.json"
    evaluated = run_script("origin_predict.py", "--checkpoint", str(out / "last.pt"), "--eval", "--metrics",
                           str(metrics_path), "--batch-size", "8")
    assert_ok(evaluated)
    metrics = json.loads(metrics_path.read_text())
    assert set(metrics) == METRICS_KEYS
    voc_dir = demo.make_demo_voc()
    split_data = data.read_split(voc_dir, "val", sd.VOC_COLORMAP)
    _, val_labels, val_names = split_data.images, split_data.labels, split_data.names
    assert metrics["num_images"] == len(val_names) == demo.DEMO_SPLITS["val"]
    cm = metrics["confusion_matrix"]
    assert len(cm) == 21 and all(len(row) == 21 for row in cm)
    # Full resolution: every labelled pixel of every val image is counted once.
    assert sum(map(sum, cm)) == sum(int((label != sd.VOID).sum()) for label in val_labels)
    assert list(metrics["per_class_iou"]) == sd.VOC_CLASSES
    present = [v for v in metrics["per_class_iou"].values() if v is not None]
    assert metrics["miou"] == pytest.approx(sum(present) / len(present))
    assert metrics["pixel_acc"] == pytest.approx(sum(cm[c][c] for c in range(21)) / sum(map(sum, cm)))
    # Validation during training is deterministic: the last epoch's val numbers are the checkpoint's metrics.
    _, rows = read_history(out / "history.csv")
    assert metrics["pixel_acc"] == pytest.approx(float(rows[-1]["val_acc"]), rel=1e-12)
    assert metrics["miou"] == pytest.approx(float(rows[-1]["val_miou"]), rel=1e-12)
    assert f"{len(val_names)} images" in evaluated.stdout


# ---------------------------------------------------------------------------------------------------------------------
# A tiny VOC tree given with --voc-dir
# ---------------------------------------------------------------------------------------------------------------------

def test_train_and_eval_on_a_tiny_voc_tree(tmp_path):
    make_voc_tree(tmp_path / "data", TINY_TRAIN_SIZES, TINY_VAL_SIZES)      # data/VOC2012/...
    out = tmp_path / "run"
    trained = run_script("origin_train.py", "--voc-dir", str(tmp_path / "data"), "--pretrained", "none",
                         "--device", "cpu", "--epochs", "1", "--crop", "32", "32", "--batch-size", "2",
                         "--out", str(out))
    assert_ok(trained)
    # Every training image is used, including the one smaller than the crop.
    assert f"read {len(TINY_TRAIN_SIZES)} training and {len(TINY_VAL_SIZES)} validation examples" in trained.stdout
    _, rows = read_history(out / "history.csv")
    assert [int(r["epoch"]) for r in rows] == [1]
    assert (out / "curves.png").read_bytes()[:8] == PNG_MAGIC
    # Without --voc-dir, origin_predict.py evaluates on the data the checkpoint was trained on.
    evaluated = run_script("origin_predict.py", "--checkpoint", str(out / "last.pt"), "--eval")
    assert_ok(evaluated)
    metrics = json.loads((out / "metrics_val.json").read_text())
    assert set(metrics) == METRICS_KEYS
    assert metrics["num_images"] == len(TINY_VAL_SIZES)
    split_data = data.read_split(tmp_path / "data" / "VOC2012", "val", sd.VOC_COLORMAP)
    _, labels, _ = split_data.images, split_data.labels, split_data.names
    assert sum(map(sum, metrics["confusion_matrix"])) == sum(int((l != sd.VOID).sum()) for l in labels)
    assert metrics["pixel_acc"] == pytest.approx(float(rows[-1]["val_acc"]), rel=1e-12)


# ---------------------------------------------------------------------------------------------------------------------
# Errors: one line on stderr, exit code 2
# ---------------------------------------------------------------------------------------------------------------------

def test_missing_dataset_is_a_one_line_error(tmp_path):
    missing = tmp_path / "nonexistent"
    line = assert_one_line_error(run_script("origin_train.py", "--voc-dir", str(missing), "--out",
                                            str(tmp_path / "out")))
    for tried in (missing, missing / "VOC2012", missing / "VOCdevkit" / "VOC2012"):
        assert str(tried) in line
    assert "--demo" in line
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("flags,mentions", [(["--crop", "100", "100"], "--crop 100 100"),
                                            (["--lr", "-1"], "--lr"),
                                            (["--epochs", "0"], "--epochs")])
def test_bad_flags_are_one_line_errors(tmp_path, flags, mentions):
    line = assert_one_line_error(run_script("origin_train.py", "--demo", *flags, "--out", str(tmp_path / "out")))
    assert mentions in line
    assert not (tmp_path / "out").exists()


def test_bad_pretrained_file_is_a_one_line_error(tmp_path):
    """A --pretrained file that is a state_dict of something else: still one line, exit 2."""
    bad = tmp_path / "not_resnet18.pth"
    torch.save({"a": torch.zeros(2)}, bad)
    line = assert_one_line_error(run_script("origin_train.py", "--demo", "--pretrained", str(bad), "--epochs", "1",
                                            "--crop", "32", "64", "--batch-size", "8",
                                            "--out", str(tmp_path / "out")))
    assert f"--pretrained {bad}" in line


def test_predict_missing_checkpoint_is_a_one_line_error(tmp_path):
    line = assert_one_line_error(run_script("origin_predict.py", "--checkpoint", str(tmp_path / "none.pt")))
    assert str(tmp_path / "none.pt") in line


def test_val_every_validates_every_nth_and_the_last_epoch(tmp_path):
    make_voc_tree(tmp_path / "data", TINY_TRAIN_SIZES, TINY_VAL_SIZES)
    out = tmp_path / "run"
    trained = run_script("origin_train.py", "--voc-dir", str(tmp_path / "data"), "--pretrained", "none",
                         "--device", "cpu", "--epochs", "3", "--crop", "32", "32", "--batch-size", "2",
                         "--val-every", "2", "--out", str(out))
    assert_ok(trained)
    _, rows = read_history(out / "history.csv")
    assert [r["val_miou"] != "" for r in rows] == [False, True, True]   # epochs 2 and 3 (the last) validated
    lines = [line for line in trained.stdout.splitlines() if line.startswith("epoch ")]
    assert "val mIoU" not in lines[0] and "val mIoU" in lines[1] and "val mIoU" in lines[2]
    best = checkpoints.load_checkpoint(out / "best.pt")
    assert best["epoch"] in (2, 3) and best["history"][-1]["val_miou"] is not None
    assert (out / "curves.png").read_bytes()[:8] == PNG_MAGIC


def test_poly_schedule_lowers_the_lr_each_epoch_and_augmented_crops_train(tmp_path):
    make_voc_tree(tmp_path / "data", TINY_TRAIN_SIZES, TINY_VAL_SIZES)
    out = tmp_path / "run"
    trained = run_script("origin_train.py", "--voc-dir", str(tmp_path / "data"), "--pretrained", "none",
                         "--device", "cpu", "--epochs", "3", "--crop", "32", "32", "--batch-size", "2",
                         "--lr", "0.01", "--lr-schedule", "poly", "--scale", "0.5", "2", "--hflip",
                         "--val-every", "3", "--out", str(out))
    assert_ok(trained)
    _, rows = read_history(out / "history.csv")
    assert [float(r["lr"]) for r in rows] == pytest.approx([0.01, 0.01 * (2 / 3) ** 0.9, 0.01 * (1 / 3) ** 0.9])
    config = checkpoints.load_checkpoint(out / "last.pt")["config"]
    assert config["lr_schedule"] == "poly" and config["scale"] == [0.5, 2.0] and config["hflip"] is True


@pytest.mark.parametrize("flags, mentions", [(["--scale", "2", "1"], "--scale 2 1"),
                                             (["--scale", "0", "1"], "--scale 0 1")])
def test_bad_scale_is_a_one_line_error(tmp_path, flags, mentions):
    line = assert_one_line_error(run_script("origin_train.py", "--demo", "--out", str(tmp_path / "r"), *flags))
    assert mentions in line
