"""The run configuration: built once from DEFAULTS and flags, stored as plain values, older checkpoints' keys mapped."""
from __future__ import annotations

import dataclasses

import pytest
import torch

from conftest import make_voc_tree, run_script, train_config_of
import my_train
import origin_train
import some_define as sd
from support import checkpoints, cli, config


def test_flags_win_then_demo_then_the_scripts_defaults():
    parse = lambda *argv: train_config_of(my_train.arg_parser(), *argv)
    c = parse()
    assert (c.model, c.optimizer, c.lr, c.epochs, c.crop, c.data_dir) == ("unet", "adam", 1e-4, 30, [320, 480], "VOC2012")
    c = parse("--demo")
    assert (c.epochs, c.crop, c.batch_size, c.pretrained, c.device) == (12, [64, 64], 8, "none", "cpu")
    c = parse("--demo", "--epochs", "3", "--voc-dir", "elsewhere")
    assert (c.epochs, c.crop, c.data_dir) == (3, [64, 64], "elsewhere")
    assert train_config_of(origin_train.arg_parser()).model == "fcn"
    with pytest.raises(dataclasses.FrozenInstanceError):
        c.lr = 1.0   # built once: nothing below main changes it


def test_a_checkpoint_stores_the_configuration_as_plain_values(tmp_path):
    c = train_config_of(my_train.arg_parser(), "--demo", "--out", str(tmp_path))
    net = sd.build_model("fcn", 2, "none")
    checkpoints.save_checkpoint(tmp_path / "c.pt", checkpoints.make_checkpoint(net, "fcn", ["a", "b"],
                                                                                [[0, 0, 0], [9, 9, 9]], c.plain()))
    stored = torch.load(tmp_path / "c.pt", weights_only=True)["config"]
    assert stored == {key: getattr(c, key) for key in config.FIELDS} and set(stored) == set(config.FIELDS)


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


def test_one_merge_in_order_defaults_demo_preset_checkpoint_flags_and_where_each_came_from():
    defaults = {"crop": [320, 480], "epochs": 30, "lr": 1e-3, "batch_size": 32, "demo": False, "out": "runs/my"}
    start = config.Start("resume", "runs/x/last.pt", {"lr": 5e-4, "epochs": 7, "demo": True, "device": "cuda",
                                                       "out": "runs/old-name"})
    values, origins = config.merge_settings(defaults, {"epochs": 9}, ("p", {"lr": 2e-3, "batch_size": 4}), start)
    # the checkpoint's demo makes this a demo run: the demo's crop; its lr beats the preset's; the flag beats all
    assert values["crop"] == [64, 64] and origins["crop"] == "--demo"
    assert (values["lr"], origins["lr"]) == (5e-4, "checkpoint")
    assert (values["batch_size"], origins["batch_size"]) == (4, "preset p")
    assert (values["epochs"], origins["epochs"]) == (9, "flag")
    # a demo run started on a GPU goes on there, writing beside the last.pt it resumes
    assert values["device"] == "cuda" and origins["device"] == "checkpoint" and values["out"] == "runs/x"
    finetune = config.Start("finetune", "base.pt", {"lr": 5e-4, "data_dir": "camvid", "ignore_index": 11})
    values, origins = config.merge_settings(defaults, {}, None, finetune)
    assert (values["lr"], values["data_dir"], values["ignore_index"]) == (1e-3, "camvid", 11)   # its data only
    assert "lr" not in origins


def test_help_shows_every_default_and_describes_every_flag():
    for parser in (my_train.arg_parser(), origin_train.arg_parser()):
        for action in parser._actions:   # read only, to check the help
            if action.dest == "help":
                continue
            assert action.help, action.dest
        text = " ".join(parser.format_help().split())   # unwrapped
        assert "(default: 30)" in text and "(default: [320, 480])" in text and "(default: auto)" in text
    assert "(default: 0.0001)" in " ".join(my_train.arg_parser().format_help().split())   # the script's DEFAULTS
