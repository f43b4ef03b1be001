"""The improved model and the study: shared encoder weights, presets, fine-tuning, --study, the comparison figure."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torchvision
from PIL import Image

from conftest import train_config_of, make_voc_tree, run_script
import my_train
import some_define as sd
from support import checkpoints, cli, steps, study, training
from support.config import FIELDS, TrainConfig

TINY = ["--pretrained", "none", "--device", "cpu", "--crop", "32", "32", "--batch-size", "2", "--workers", "0"]


@pytest.fixture(scope="module")
def voc(tmp_path_factory) -> Path:
    return make_voc_tree(tmp_path_factory.mktemp("voc"), [(48, 48)] * 6, [(48, 64)] * 3)


def test_both_networks_load_the_same_resnet18_into_the_same_encoder_tensors(tmp_path):
    torch.manual_seed(7)
    weights = torchvision.models.resnet18().state_dict()
    path = tmp_path / "resnet18.pth"
    torch.save(weights, path)
    fcn, unet = sd.FCN(21, str(path)), sd.ResNetUNet(21, str(path))
    # FCN = children 0..7 of ResNet-18; the U-Net's stages hold the same modules.
    pairs = [(fcn[0], unet.layer0[0], "conv1"), (fcn[1], unet.layer0[1], "bn1"), (fcn[4], unet.layer1[1], "layer1"),
             (fcn[5], unet.layer2, "layer2"), (fcn[6], unet.layer3, "layer3"), (fcn[7], unet.layer4, "layer4")]
    for a, b, prefix in pairs:
        sa, sb = a.state_dict(), b.state_dict()
        assert sa.keys() == sb.keys() and sa
        for key in sa:
            assert torch.equal(sa[key], sb[key]), (prefix, key)
            assert torch.equal(sa[key], weights[f"{prefix}.{key}"]), (prefix, key)


def preset(name: str, *flags: str) -> TrainConfig:
    parser = my_train.arg_parser()
    finetune_epochs = my_train.FINETUNE_EPOCHS["demo" if "--demo" in flags else "full"]
    return study.preset_config(cli.given_flags(parser, list(flags)), name, Path("OUT"), my_train.PRESETS,
                               cli.script_defaults(parser), finetune_epochs)


@pytest.mark.parametrize("name, model, optimizer, lr, loss, void", [
    ("fcn-sgd-1e-3", "fcn", "sgd", 1e-3, "sum", "background"),
    ("unet-sgd-1e-3", "unet", "sgd", 1e-3, "sum", "background"),
    ("unet-adam-1e-3", "unet", "adam", 1e-3, "mean", "ignore"),
    ("unet-adam-1e-4", "unet", "adam", 1e-4, "mean", "ignore"),
    ("unet-adam-1e-4-ft-1e-5", "unet", "adam", 1e-5, "mean", "ignore"),
    ("unet-adam-1e-4-void-bg", "unet", "adam", 1e-4, "mean", "background"),
])
def test_each_preset_sets_its_network_optimizer_and_lr(name, model, optimizer, lr, loss, void):
    args = preset(name)
    assert (args.model, args.optimizer, args.lr, args.loss, args.void) == (model, optimizer, lr, loss, void)
    assert args.out == str(Path("OUT") / name)
    assert (args.batch_size, args.crop, args.wd) == (32, [320, 480], 1e-3)
    if name.endswith("ft-1e-5"):   # 30 epochs of unet-adam-1e-4, then 10 more
        assert args.finetune_from == str(Path("OUT") / "unet-adam-1e-4" / "last.pt") and args.epochs == 10
        assert preset(name, "--demo").epochs == my_train.FINETUNE_EPOCHS["demo"]
        assert preset(name, "--epochs", "150").epochs == 10   # --epochs is the base run's: 150, then 10 more
    else:
        assert args.finetune_from is None and args.epochs == 30


def test_reference_presets_differ_from_each_other_only_where_named():
    fcn, unet, mfw = preset("fcn-reference"), preset("unet-reference"), preset("unet-reference-mfw")
    assert (unet.optimizer, unet.lr, unet.wd, unet.lr_schedule, unet.hflip, unet.scale) == \
        ("adam", 1e-3, 1e-4, "poly", True, [0.5, 2.0])
    differ = lambda a, b: {k for k in FIELDS if getattr(a, k) != getattr(b, k)} - {"out"}
    assert differ(fcn, unet) == {"model"}
    assert differ(mfw, unet) == {"class_weights"}
    book = preset("fcn-sgd-1e-3")        # the book's recipe: no schedule, no augmentation beyond the crop
    assert (book.lr_schedule, book.hflip, book.scale, book.wd) == ("constant", False, [1.0, 1.0], 1e-3)


def test_user_flags_win_over_the_preset():
    args = preset("unet-adam-1e-3", "--lr", "3e-4", "--epochs", "2")
    assert (args.lr, args.epochs, args.optimizer) == (3e-4, 2, "adam")


def test_finetune_starts_from_the_saved_weights_with_a_fresh_optimizer(voc, tmp_path, monkeypatch):
    first = tmp_path / "first"
    result = run_script("my_train.py", "--voc-dir", str(voc), "--out", str(first), "--epochs", "1", *TINY)
    assert result.returncode == 0, result.stderr
    checkpoint = checkpoints.load_checkpoint(first / "last.pt")

    seen = []
    real_step = sd.train_step

    def recording_step(net, optimizer, images, labels, **kwargs):
        if not seen:
            seen.append((optimizer.param_groups[0]["lr"], len(optimizer.state), images.clone(), labels.clone()))
        loss = real_step(net, optimizer, images, labels, **kwargs)
        if len(seen) == 1:
            seen.append(loss[0])
        return loss
    monkeypatch.setattr(steps, "train_step", recording_step)
    config = train_config_of(my_train.arg_parser(), "--voc-dir", str(voc), "--out", str(tmp_path / "ft"), "--epochs",
                             "1", "--lr", "1e-5", "--finetune-from", str(first / "last.pt"), "--amp", "off",
                             *TINY)   # fp32 like below
    history = training.train(config)

    lr, optimizer_state, images, labels = seen[0]
    assert lr == 1e-5 and optimizer_state == 0          # the new lr, and no Adam moments carried over
    net = checkpoints.restore_model(checkpoint).train()
    with torch.no_grad():
        expected = sd.segmentation_loss(net(sd.normalize_images(images)), sd.prepare_targets(labels, "ignore"),
                                        "mean")
    assert seen[1] == pytest.approx(float(expected), rel=1e-5)   # the first step ran on the checkpoint's weights
    assert [h["epoch"] for h in history] == [1, 2] and history[0] == checkpoint["history"][0]


def test_study_writes_its_table_and_skips_finished_presets(tmp_path):
    # The book's preset, the fine-tune (which trains the preset it continues first) and the void-as-background one
    # that only a dataset with a background class takes; every preset's settings are checked above.
    voc = make_voc_tree(tmp_path / "voc", [(48, 48)] * 6, [(48, 64)] * 3)   # its own: the rerun removes a split
    presets = ["fcn-sgd-1e-3", "unet-adam-1e-4-ft-1e-5", "unet-adam-1e-4-void-bg"]
    flags = ["my_train.py", "--study", "--voc-dir", str(voc), "--out", str(tmp_path / "runs"), "--epochs", "1",
             "--pictures", str(tmp_path / "pics"), "--num", "2", "--presets", *presets, *TINY]
    result = run_script(*flags)
    assert result.returncode == 0, result.stderr
    table = (tmp_path / "pics" / "study.md").read_text()
    for name in presets:
        assert f"| {name} |" in table
        assert (tmp_path / "runs" / name / "eval.json").is_file()
    assert (tmp_path / "runs" / "unet-adam-1e-4" / "last.pt").is_file() and "| unet-adam-1e-4 |" not in table
    assert "| 1+10 |" in table    # the fine-tune: 10 epochs on top of unet-adam-1e-4's one (--epochs is the base's)
    assert Image.open(tmp_path / "pics" / "study.png").size[1] > 0
    (voc / "ImageSets" / "Segmentation" / "train.txt").unlink()   # every preset is measured: the rerun needs only val
    again = run_script(*flags)
    assert again.returncode == 0, again.stderr
    assert again.stdout.count("done before, skipped") == len(presets)
    assert not [line for line in again.stdout.splitlines() if "=== preset" in line and "skipped" not in line]
    assert (tmp_path / "pics" / "study.md").read_text() == table


def test_compare_figure_renders(voc, tmp_path):
    from test_predict_rules import checkpoint_file   # random-init networks: the figure does not depend on weights
    fcn_out, unet_out = tmp_path / "fcn", tmp_path / "unet"
    checkpoint_file(fcn_out / "last.pt", "fcn", voc)
    checkpoint_file(unet_out / "last.pt", "unet", voc)
    result = run_script("my_predict.py", "--checkpoint", str(unet_out / "last.pt"), "--compare",
                        str(fcn_out / "last.pt"), "--figure", str(tmp_path / "myout.png"), "--compare-figure",
                        str(tmp_path / "compare.png"), "--num", "3")
    assert result.returncode == 0, result.stderr
    mine, compare = Image.open(tmp_path / "myout.png"), Image.open(tmp_path / "compare.png")
    assert compare.size[1] > mine.size[1]   # one more row: the FCN's predictions
    result = run_script("my_predict.py", "--checkpoint", str(unet_out / "last.pt"), "--compare",
                        str(tmp_path / "absent.pt"), "--figure", str(tmp_path / "alone.png"))
    assert result.returncode == 0 and "no comparison" in result.stdout


def test_the_study_table_gives_train_mIoU_and_a_train_time_a_pause_does_not_stretch():
    history = [dict(epoch=k, seconds=s, img_per_s=10.0) for k, s in enumerate([60, 60, 3660, 60], 1)]
    config = dict(model="fcn", optimizer="sgd", lr=1e-3, wd=1e-3, loss="sum", void="ignore", epochs=4)
    row = dict(preset="fcn-sgd-1e-3", config=config, history=history, pixel_acc=0.8, mean_class_acc=0.5, miou=0.4,
               train={"miou": 0.6}, per_class_iou={"sky": 0.9})
    line = [line for line in study.study_table([row], "street").splitlines() if line.startswith("| fcn-sgd")][0]
    assert line.endswith("| 4 | 0.800 | - | 0.500 | 0.400 | 0.600 | 240 | 10.0 |")   # 4 epochs x 60 s, not 3840


@pytest.mark.parametrize("base_state", ["none", "interrupted", "finished"])
def test_a_fine_tune_starts_from_its_base_only_once_that_has_finished(tmp_path, monkeypatch, base_state):
    trained = []
    monkeypatch.setattr(study, "train", lambda config: trained.append(Path(config.out).name))
    base = tmp_path / "unet-adam-1e-4"
    if base_state != "none":
        net = sd.build_model("unet", 21, "none")
        extra = {"optimizer": {}} if base_state == "interrupted" else {}   # a finished last.pt keeps weights only
        checkpoints.save_checkpoint(base / "last.pt", checkpoints.make_checkpoint(
            net, "unet", sd.VOC_CLASSES, sd.VOC_COLORMAP, {"model": "unet"}, epoch=1, **extra))
    parser = my_train.arg_parser()
    study.train_preset(cli.given_flags(parser, ["--demo"]), "unet-adam-1e-4-ft-1e-5", tmp_path, my_train.PRESETS,
                       cli.script_defaults(parser), 4)
    first = [] if base_state == "finished" else ["unet-adam-1e-4"]
    assert trained == first + ["unet-adam-1e-4-ft-1e-5"]

