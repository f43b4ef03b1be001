"""A fine-tune's own best.pt, the data a fine-tune or a resume trains on, and the load watched while predicting."""
from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch

from conftest import make_voc_tree, run_script, train_config_of
import my_train
import some_define as sd
from support import checkpoints, cli, speed, tiles

TINY = ["--pretrained", "none", "--device", "cpu", "--crop", "32", "32", "--batch-size", "2", "--workers", "0",
        "--amp", "off"]


@pytest.fixture(scope="module")
def voc(tmp_path_factory) -> Path:
    return make_voc_tree(tmp_path_factory.mktemp("voc"), [(48, 48)] * 6, [(48, 64)] * 3)


@pytest.fixture(scope="module")
def base(voc, tmp_path_factory) -> Path:
    """A 2-epoch run on ``voc`` with label 6 as void: its folder."""
    out = tmp_path_factory.mktemp("base")
    result = run_script("my_train.py", "--voc-dir", str(voc), "--ignore-index", "6", "--out", str(out),
                        "--epochs", "2", *TINY)
    assert result.returncode == 0, result.stderr
    return out


def test_a_finetune_that_does_not_beat_its_base_still_writes_its_own_best(voc, base, tmp_path):
    # An lr this small leaves the weights as they were, so the fine-tune cannot beat the base run's best mIoU.
    out = tmp_path / "ft"
    result = run_script("my_train.py", "--finetune-from", str(base / "last.pt"), "--lr", "1e-30", "--epochs", "2",
                        "--out", str(out), *TINY)
    assert result.returncode == 0, result.stderr
    best = checkpoints.load_checkpoint(out / "best.pt")
    history = checkpoints.load_checkpoint(out / "last.pt")["history"]
    assert [h["epoch"] for h in history] == [1, 2, 3, 4]
    own = [h for h in history if h["epoch"] >= 3]
    assert best["epoch"] == max(own, key=lambda h: h["val_miou"])["epoch"]   # the fine-tune's, not the base's
    assert best["run_start"] == 3
    assert "the best of this fine-tune; its base run's best was" in result.stdout
    wrote = re.search(r"^wrote (.*)$", result.stdout, re.M).group(1)
    named = re.findall(r"(\S+\.(?:pt|csv|png))", wrote)
    assert len(named) == 4 and all(Path(p).is_file() for p in named), wrote


def test_a_finetune_and_a_resume_train_on_the_checkpoints_data(voc, base, tmp_path):
    out = tmp_path / "ft"
    result = run_script("my_train.py", "--finetune-from", str(base / "last.pt"), "--epochs", "1", "--out", str(out),
                        *TINY)
    assert result.returncode == 0, result.stderr
    assert f"note: training on the data of {base / 'last.pt'}: {voc}, classes VOC, ignore index 6" in result.stdout
    config = checkpoints.load_checkpoint(out / "last.pt")["config"]
    assert (config["data_dir"], config["ignore_index"], config["demo"]) == (str(voc), 6, False)
    # --resume reads the same from OUT/last.pt; a flag given wins over the checkpoint's.
    config = train_config_of(my_train.arg_parser(), "--resume", "--out", str(base), *TINY)
    assert (config.data_dir, config.ignore_index) == (str(voc), 6)
    config = train_config_of(my_train.arg_parser(), "--resume", "--out", str(base), "--ignore-index", "0", *TINY)
    assert (config.data_dir, config.ignore_index) == (str(voc), 0)   # each flag given wins over its own setting


def test_prediction_keeps_watching_the_load_between_images_and_rows_of_tiles(monkeypatch):
    looks = []

    class Watcher:
        def update(self) -> None:
            looks.append(1)
    monkeypatch.setattr(speed, "WATCHED", [Watcher()])
    torch.manual_seed(0)
    net = sd.build_model("fcn", 3, "none").eval()
    image = torch.randint(0, 256, (3, 160, 64), dtype=torch.uint8)
    rows = {top for top, *_ in tiles.tile_windows((160, 64), (64, 64), 0.25)}
    tiles.predict_any_size(image, net, torch.device("cpu"), (64, 64), 0.25)
    assert len(rows) == 4 and len(looks) == 1 + len(rows)   # once for the image, once per row of windows


def test_threads_for_load_is_the_watcher_that_look_at_load_updates(monkeypatch):
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    monkeypatch.setattr(speed.time, "sleep", lambda s: None)
    watcher = speed.threads_for_load(None, torch.device("cpu"), log=lambda m: None)
    assert speed.WATCHED == [watcher]
    due = []
    monkeypatch.setattr(watcher, "update", lambda: due.append(1))
    speed.look_at_load()
    assert due == [1]
    assert speed.threads_for_load(2, torch.device("cpu")) is None and speed.WATCHED == []   # --threads: no watcher
    torch.set_num_threads(1)
