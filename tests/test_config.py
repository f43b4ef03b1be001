"""The run configuration: built once from DEFAULTS and flags, stored as plain values, older checkpoints' keys mapped."""
from __future__ import annotations

import dataclasses

import pytest
import torch

from conftest import make_voc_tree, run_script
import my_train
import origin_train
import some_define as sd
from support import checkpoints, cli, config


def test_flags_win_then_demo_then_the_scripts_defaults():
    parse = lambda *argv: vars(my_train.parse_args(list(argv)))
    c = cli.train_config(parse(), my_train.DEFAULTS)
    assert (c.model, c.optimizer, c.lr, c.epochs, c.crop, c.data_dir) == ("unet", "adam", 1e-4, 30, [320, 480], "VOC2012")
    c = cli.train_config(parse("--demo"), my_train.DEFAULTS)
    assert (c.epochs, c.crop, c.batch_size, c.pretrained, c.device) == (12, [64, 64], 8, "none", "cpu")
    c = cli.train_config(parse("--demo", "--epochs", "3", "--voc-dir", "elsewhere"), my_train.DEFAULTS)
    assert (c.epochs, c.crop, c.data_dir) == (3, [64, 64], "elsewhere")
    assert cli.train_config(parse(), origin_train.DEFAULTS).model == "fcn"
    with pytest.raises(dataclasses.FrozenInstanceError):
        c.lr = 1.0   # built once: nothing below main changes it


def test_a_checkpoint_stores_the_configuration_as_plain_values(tmp_path):
    c = cli.train_config(vars(my_train.parse_args(["--demo", "--out", str(tmp_path)])), my_train.DEFAULTS)
    net = sd.build_model("fcn", 2, "none")
    checkpoints.save_checkpoint(tmp_path / "c.pt", checkpoints.make_checkpoint(net, "fcn", ["a", "b"],
                                                                                [[0, 0, 0], [9, 9, 9]], c.plain()))
    stored = torch.load(tmp_path / "c.pt", weights_only=True)["config"]
    assert stored == dataclasses.asdict(c) and set(stored) == set(config.FIELDS)


def test_an_older_checkpoints_keys_are_mapped_once_when_it_is_loaded(tmp_path):
    voc = make_voc_tree(tmp_path / "d", [(48, 48)] * 2, [(48, 64)] * 2)
    net = sd.build_model("unet", 21, "none")
    # What checkpoints held before TrainConfig: the training script's whole argparse namespace.
    old = {"voc_dir": str(voc), "demo": False, "val_split": "val", "ignore_index": None, "model": "unet",
           "debug": False, "num": 4, "study": False, "class_weight_values": [1.0] * 21}
    path = tmp_path / "old.pt"
    torch.save(checkpoints.make_checkpoint(net, "unet", sd.VOC_CLASSES, sd.VOC_COLORMAP, old, epoch=3), path)
    loaded = checkpoints.load_checkpoint(path)["config"]
    assert loaded["data_dir"] == str(voc) and "voc_dir" not in loaded
    assert not {"debug", "num", "study", "class_weight_values"} & set(loaded)
    result = run_script("my_predict.py", "--checkpoint", str(path), "--compare", "none.pt", "--eval",
                        "--metrics", str(tmp_path / "m.json"))
    assert result.returncode == 0, result.stderr   # prediction finds the data the old checkpoint names
    assert "2 images of the val split" in result.stdout
