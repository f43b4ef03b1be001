"""Datasets as folders of 'image mask' pair lists (SegNet/CamVid layout), class weights, the void rule, and the study
on such a dataset."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import origin_train
import some_define as sd
from conftest import train_config_of, run_script
from support import checkpoints, cli, data, prediction, study

CLASSES = "sky 128 128 128\nroad 128 64 128\ncar 64 0 128\n"   # class 0 is not a background, as in CamVid
UNLABELLED = 3                                                  # CamVid's 'unlabelled' value, void via --ignore-index


def pair_label(h: int, w: int, k: int) -> np.ndarray:
    """Sky on top, road below, a car (rows of k % 3 + 1 height) in the middle, an unlabelled border row."""
    label = np.zeros((h, w), dtype=np.uint8)
    label[h // 2:] = 1
    label[h // 2 - 2:h // 2 + 2 + k % 3, w // 4:w // 2] = 2
    label[-1] = UNLABELLED
    return label


def make_pair_list_dataset(root: Path, splits: dict[str, int], hw: tuple[int, int] = (40, 56),
                           absolute_prefix: str | None = None) -> Path:
    """train/, trainannot/ (8-bit masks of indices) and SPLIT.txt lists, as the SegNet tutorial ships CamVid.
    With ``absolute_prefix`` the lists name absolute paths of another machine, as the tutorial's do."""
    for split, count in splits.items():
        (root / split).mkdir(parents=True)
        (root / f"{split}annot").mkdir()
        lines = []
        for k in range(count):
            label = pair_label(*hw, k)
            image = np.stack([label * 60 + 20, 120 - label * 30, np.full(hw, 70)], -1).astype(np.uint8)
            Image.fromarray(image).save(root / split / f"{split}{k}.png")
            Image.fromarray(label).save(root / f"{split}annot" / f"{split}{k}.png")
            prefix = absolute_prefix or ""
            lines.append(f"{prefix}{split}/{split}{k}.png {prefix}{split}annot/{split}{k}.png")
        (root / f"{split}.txt").write_text("\n".join(lines) + "\n")
    (root / "classes.txt").write_text(CLASSES)
    return root


@pytest.mark.parametrize("prefix", [None, "/SegNet/CamVid/"])
def test_pair_lists_are_read_without_conversion(tmp_path, prefix):
    root = make_pair_list_dataset(tmp_path / "camvid", {"train": 3, "val": 2}, absolute_prefix=prefix)
    assert data.recognise_layout(root) == root
    names, colormap = data.read_classes(root / "classes.txt")
    split = data.read_split(root, "train", colormap, ignore_index=UNLABELLED)
    assert split.names == ["train0", "train1", "train2"]
    for k, label in enumerate(split.labels):
        expected = torch.from_numpy(pair_label(40, 56, k))
        assert torch.equal(label, expected.masked_fill(expected == UNLABELLED, sd.VOID))
        assert split.images[k].shape == (3, 40, 56)


def test_an_existing_absolute_path_is_used_as_it_is(tmp_path):
    root = make_pair_list_dataset(tmp_path / "a", {"train": 1})
    elsewhere = make_pair_list_dataset(tmp_path / "b", {"train": 1})
    (elsewhere / "train" / "train0.png").unlink()   # only the absolute path can make this readable
    (elsewhere / "train.txt").write_text(f"{root / 'train' / 'train0.png'} trainannot/train0.png\n")
    assert data.pair_list_files(elsewhere, "train")[0][1] == root / "train" / "train0.png"
    assert len(data.read_split(elsewhere, "train", data.read_classes(root / "classes.txt")[1], UNLABELLED)) == 1


def test_pair_list_errors_name_the_file(tmp_path):
    root = make_pair_list_dataset(tmp_path / "d", {"train": 2})
    colormap = data.read_classes(root / "classes.txt")[1]
    (root / "trainannot" / "train1.png").unlink()
    with pytest.raises(sd.UsageError, match=r"trainannot/train1\.png: label file not found"):
        data.read_split(root, "train", colormap, UNLABELLED)
    Image.fromarray(pair_label(41, 56, 1)).save(root / "trainannot" / "train1.png")
    with pytest.raises(sd.UsageError, match=r"train1\.png: label is \(41, 56\) but its image is \(40, 56\)"):
        data.read_split(root, "train", colormap, UNLABELLED)
    (root / "train.txt").write_text("train/train0.png\n")
    with pytest.raises(sd.UsageError, match=r"train\.txt, line 1: expected 'image mask'"):
        data.read_split(root, "train", colormap, UNLABELLED)
    with pytest.raises(sd.UsageError, match=r"val\.txt: split file not found"):
        data.read_split(root, "val", colormap, UNLABELLED)


def test_median_frequency_weights_by_hand():
    # Image A: 6 pixels of class 0, 2 of class 1. Image B: 4 of class 0, 4 of class 2. Class 3 never; void left out.
    a = torch.tensor([[0, 0, 0, 0], [0, 0, 1, 1], [255, 255, 255, 255]], dtype=torch.uint8)
    b = torch.tensor([[0, 0, 2, 2], [0, 0, 2, 2]], dtype=torch.uint8)
    # freq(0) = 10 / 16, freq(1) = 2 / 8, freq(2) = 4 / 8; median(0.625, 0.25, 0.5) = 0.5.
    weights = data.median_frequency_weights([a, b], 4)
    assert weights == pytest.approx([0.5 / 0.625, 0.5 / 0.25, 1.0, 0.0])
    softer = data.median_frequency_weights([a, b], 4, power=0.5)
    assert softer == pytest.approx([0.8 ** 0.5, 2.0 ** 0.5, 1.0, 0.0])


def test_weighted_loss_counts_each_pixel_by_its_class_weight():
    torch.manual_seed(0)
    logits = torch.randn(2, 3, 4, 5)
    targets = torch.randint(0, 3, (2, 4, 5))
    targets[0, 0] = sd.VOID
    weight = torch.tensor([0.5, 2.0, 1.0])
    pixel = torch.nn.functional.cross_entropy(logits, targets, ignore_index=sd.VOID, reduction="none")
    w = torch.where(targets == sd.VOID, torch.tensor(0.0), weight[targets.clamp(max=2)])
    assert torch.allclose(sd.segmentation_loss(logits, targets, "mean", weight=weight), (pixel * w).sum() / w.sum())
    per_image = (pixel * w).flatten(1).sum(1) / w.flatten(1).sum(1)
    assert torch.allclose(sd.segmentation_loss(logits, targets, "sum", weight=weight), per_image.sum())
    # PyTorch's own weighted mean agrees, and weights of one give the unweighted loss.
    assert torch.allclose(sd.segmentation_loss(logits, targets, "mean", weight=weight),
                          torch.nn.functional.cross_entropy(logits, targets, weight=weight, ignore_index=sd.VOID))
    assert torch.allclose(sd.segmentation_loss(logits, targets, "sum", weight=torch.ones(3)),
                          sd.segmentation_loss(logits, targets, "sum"))


def test_void_background_only_where_class_0_is_background(tmp_path, capsys):
    root = make_pair_list_dataset(tmp_path / "d", {"train": 1})
    book = dict(origin_train.DEFAULTS, epochs=1, batch_size=1, crop=[32, 32], workers=0, pretrained="none")
    parse = lambda *flags: train_config_of(cli.train_arg_parser("", book), *flags)
    classes = ["--classes", str(root / "classes.txt")]
    assert parse(*classes).void == "ignore"    # the book's default, where it means nothing
    assert "class 0 is 'sky', not 'background'" in capsys.readouterr().out
    with pytest.raises(sd.UsageError, match="--void background trains void pixels as class 0, which is 'sky'"):
        parse(*classes, "--void", "background")
    assert parse().void == "background"    # VOC: class 0 is background


def test_study_on_a_pair_list_dataset(tmp_path):
    root = make_pair_list_dataset(tmp_path / "street", {"train": 4, "val": 2}, hw=(64, 64))
    pictures = tmp_path / "pics"
    flags = ["my_train.py", "--study", "--voc-dir", str(root), "--classes", str(root / "classes.txt"),
             "--ignore-index", str(UNLABELLED), "--out", str(tmp_path / "runs"), "--pictures", str(pictures),
             "--epochs", "1", "--batch-size", "2", "--crop", "32", "32", "--pretrained", "none", "--device", "cpu",
             "--num", "2"]
    result = run_script(*flags, "--presets", "fcn-sgd-1e-3", "unet-adam-1e-4-void-bg", "unet-reference-mfw")
    assert result.returncode == 0, result.stderr
    assert "unet-adam-1e-4-void-bg: left out, class 0 is 'sky'" in result.stdout
    table = (pictures / "study.md").read_text()
    # The book's void rule is left out; the reference recipe shows its lr schedule, weight decay and augmentation.
    assert "| fcn-sgd-1e-3 | fcn | sgd | 0.001 | 0.001 | sum | ignore | none | crop | 1 |" in table
    assert ("| unet-reference-mfw | unet | adam | 0.001 poly | 0.0001 | mean | ignore | median-freq | "
            "crop, flip, scale 0.5-2 | 1 |") in table
    assert "void-bg" not in table and (pictures / "study.png").is_file() and (pictures / "study_curves.png").is_file()
    config = study.read_json(tmp_path / "runs" / "unet-reference-mfw" / "eval.json")["config"]
    weights = checkpoints.load_checkpoint(tmp_path / "runs" / "unet-reference-mfw" / "last.pt")["class_weights"]
    assert config["class_weights"] == "median-freq" and len(weights) == 3
    # The train split's own metrics: whole images of the 4 it learned from, the val split's conditions.
    folder = tmp_path / "runs" / "fcn-sgd-1e-3"
    result_json = study.read_json(folder / "eval.json")
    net, checkpoint = prediction.open_model(folder / "last.pt", torch.device("cpu"))
    train_set = data.read_split(root, "train", data.read_classes(root / "classes.txt")[1], UNLABELLED)
    fit = prediction.split_metrics(net, checkpoint, train_set, torch.device("cpu"), 8)
    assert result_json["train"]["num_images"] == 4 and result_json["train"]["miou"] == pytest.approx(fit["miou"])
    assert f"| {result_json['miou']:.3f} | {fit['miou']:.3f} |" in table
    # An eval.json without them (written before the study measured them) is measured again, not retrained.
    study.write_json({k: v for k, v in result_json.items() if k != "train"}, folder / "eval.json")
    again = run_script(*flags, "--presets", "fcn-sgd-1e-3")
    assert again.returncode == 0, again.stderr
    assert "fcn-sgd-1e-3: trained before, evaluating" in again.stdout and "epoch 1/1" not in again.stdout
    assert study.read_json(folder / "eval.json")["train"]["miou"] == pytest.approx(fit["miou"])


def test_a_study_on_other_data_goes_to_its_own_pictures_folder(tmp_path):
    root = make_pair_list_dataset(tmp_path / "CamVid", {"train": 1})
    assert study.study_pictures_dir(False, root) == Path("pictures") / "camvid"
    assert study.study_pictures_dir(True, root) == Path("pictures")            # the demo study
    voc = tmp_path / "VOC2012"
    for sub in ("JPEGImages", "SegmentationClass", "ImageSets/Segmentation"):
        (voc / sub).mkdir(parents=True)
    assert study.study_pictures_dir(False, voc) == Path("pictures")            # the VOC study
