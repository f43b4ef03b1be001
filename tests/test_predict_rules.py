"""The predict scripts' rules (issue: one configuration, merged once): each script shows its own network and refuses
the other's in one line naming the script that shows it; --compare takes an FCN; the --eval table names its metric
and explains '-'; a failed run leaves no folder it made."""
from __future__ import annotations

import io
import subprocess
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import some_define as sd
from conftest import make_voc_tree, run_script
from support import checkpoints, export, files, prediction


def checkpoint_file(path: Path, model: str, voc_dir: Path) -> Path:
    """A random-init network as a training run would save it (no training: the rules do not depend on weights)."""
    torch.manual_seed(0)
    net = sd.build_model(model, 21, "none")
    config = {"data_dir": str(voc_dir), "demo": False, "val_split": "val", "ignore_index": None}
    checkpoints.save_checkpoint(path, checkpoints.make_checkpoint(net, model, sd.VOC_CLASSES, sd.VOC_COLORMAP,
                                                                  config, epoch=1))
    return path


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("rules")
    voc = make_voc_tree(root / "data", [(32, 32)] * 2, [(32, 48)] * 2)
    return {name: checkpoint_file(root / name / "best.pt", model, voc)
            for name, model in (("origin", "fcn"), ("my", "unet"), ("my2", "unet"))}


def error_line(result: subprocess.CompletedProcess) -> str:
    """Exit 2, no traceback, and stderr is one line."""
    assert result.returncode == 2 and "Traceback" not in result.stderr, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    return lines[0]


@pytest.mark.parametrize("script, other, shown_by, holds", [
    ("my_predict.py", "origin", "origin_predict.py", "an FCN"),
    ("origin_predict.py", "my", "my_predict.py", "a U-Net")])
def test_each_predict_script_refuses_the_other_network(runs, tmp_path, script, other, shown_by, holds):
    path = runs[other]
    result = run_script(script, "--checkpoint", str(path), "--figure", str(tmp_path / "f.png"))
    assert error_line(result) == f"error: {path} holds {holds}; show it with {shown_by} --checkpoint {path}"
    assert not (tmp_path / "f.png").exists()


def test_compare_takes_an_fcn(runs, tmp_path):
    ok = run_script("my_predict.py", "--checkpoint", str(runs["my"]), "--compare", str(runs["origin"]),
                    "--figure", str(tmp_path / "m.png"), "--compare-figure", str(tmp_path / "c.png"))
    assert ok.returncode == 0, ok.stderr
    assert f"compared with FCN from {runs['origin']}, epoch 1" in ok.stdout
    assert (tmp_path / "m.png").is_file() and (tmp_path / "c.png").is_file()
    unet = runs["my2"]
    line = error_line(run_script("my_predict.py", "--checkpoint", str(runs["my"]), "--compare", str(unet), "--eval",
                                 "--metrics", str(tmp_path / "m.json")))
    assert line == (f"error: {unet} holds a U-Net, and --compare takes an FCN; show it with my_predict.py "
                    f"--checkpoint {unet}")


def test_eval_table_names_its_metric_and_explains_the_dash():
    names = ["background", "cat", "dog"]
    m = sd.SegMetrics(3)
    m.update(torch.tensor([[0, 1, 1, 2]]), torch.tensor([[0, 1, 1, sd.VOID]], dtype=torch.uint8))   # dog: on void
    table = prediction.metrics_table({"FCN": m.compute(names)}, names).splitlines()
    assert table[0].split()[:3] == ["per-class", "IoU", "FCN"]
    assert table[3].split() == ["dog", "-"]   # predicted once, on a void pixel: not scored
    assert table[-1] == ("-: no pixel of the split has this class in the ground truth or in the prediction (void "
                         "pixels aside), so its IoU is 0/0; left out of miou")
    m.update(torch.tensor([[2]]), torch.tensor([[0]], dtype=torch.uint8))   # now predicted on a scored pixel
    assert "-:" not in prediction.metrics_table({"FCN": m.compute(names)}, names)


def truncated_jpeg(path: Path) -> Path:
    buffer = io.BytesIO()
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (64, 64, 3), dtype=np.uint8)).save(buffer, "JPEG")
    path.write_bytes(buffer.getvalue()[:len(buffer.getvalue()) // 2])
    return path


@pytest.mark.parametrize("bad", ["truncated jpeg", "text file"])
def test_a_failed_images_run_leaves_no_save_dir(runs, tmp_path, bad):
    image = tmp_path / "photo.jpg"
    truncated_jpeg(image) if bad == "truncated jpeg" else image.write_text("not a photo\n")
    save_dir = tmp_path / "fresh" / "predictions"
    line = error_line(run_script("origin_predict.py", "--checkpoint", str(runs["origin"]), "--images", str(image),
                                 "--save-dir", str(save_dir)))
    assert line.startswith(f"error: {image}: cannot read the image (")
    assert not (tmp_path / "fresh").exists()


def test_a_new_folder_goes_only_if_the_block_fails_and_leaves_it_empty(tmp_path):
    (tmp_path / "old").mkdir()
    with pytest.raises(KeyboardInterrupt):
        with files.new_folder_removed_on_failure(tmp_path / "old" / "a" / "b"):
            (tmp_path / "old" / "a" / "b").mkdir(parents=True)
            raise KeyboardInterrupt
    assert sorted(p.name for p in tmp_path.iterdir()) == ["old"] and not any((tmp_path / "old").iterdir())
    with pytest.raises(sd.UsageError):
        with files.new_folder_removed_on_failure(tmp_path / "a" / "b"):
            files.write_text("kept", tmp_path / "a" / "b" / "written.txt")
            raise sd.UsageError("failed after writing a file")
    assert (tmp_path / "a" / "b" / "written.txt").read_text() == "kept"
    with pytest.raises(sd.UsageError):
        with files.new_folder_removed_on_failure(tmp_path / "old"):   # it was there before: kept
            raise sd.UsageError("failed")
    assert (tmp_path / "old").is_dir()
    with files.new_folder_removed_on_failure(tmp_path / "done"):   # no failure: kept, even empty
        (tmp_path / "done").mkdir()
    assert (tmp_path / "done").is_dir()


def test_a_failed_atomic_write_leaves_no_folder(tmp_path):
    def fail(tmp: str) -> None:
        raise sd.UsageError("the check failed; nothing written")
    with pytest.raises(sd.UsageError):
        files.atomic_write(tmp_path / "new" / "model.onnx", fail)
    assert not (tmp_path / "new").exists()


def test_a_folder_of_images_takes_the_formats_the_page_takes(tmp_path):
    rgb = Image.fromarray(np.full((8, 8, 3), 90, dtype=np.uint8))
    for name in ("a.jpg", "b.PNG", "c.webp", "d.bmp", "e.gif", "f.tif", "g.tiff"):
        rgb.save(tmp_path / name)
    (tmp_path / "notes.txt").write_text("not an image")
    found = export.collect_image_paths([str(tmp_path)])
    assert [p.name for p in found] == ["a.jpg", "b.PNG", "c.webp", "d.bmp", "e.gif", "f.tif", "g.tiff"]
    assert all(sd.read_image(p).shape == (3, 8, 8) for p in found)


def test_half_converts_to_fp16_weights_that_load_into_an_fp32_network(runs, tmp_path):
    torch.manual_seed(0)
    net = sd.build_model("unet", 21, "none")
    source = tmp_path / "last.pt"   # a run's last.pt while it goes on: resumable
    checkpoints.save_checkpoint(source, checkpoints.make_checkpoint(
        net, "unet", sd.VOC_CLASSES, sd.VOC_COLORMAP, {"data_dir": "VOC", "demo": False}, epoch=3,
        optimizer=torch.optim.SGD(net.parameters(), 0.1).state_dict(), rng=checkpoints.rng_states()))
    out = tmp_path / "shipped.pt"
    result = run_script("my_predict.py", "--checkpoint", str(source), "--convert", str(out), "--half")
    assert result.returncode == 0, result.stderr
    assert "with fp16 weights" in result.stdout
    raw = torch.load(out, map_location="cpu", weights_only=True)
    state = raw["state_dict"]
    assert {v.dtype for v in state.values() if v.is_floating_point()} == {torch.float16}
    counters = [v.dtype for k, v in state.items() if k.endswith("num_batches_tracked")]
    assert counters and set(counters) == {torch.int64}   # BatchNorm's counters stay integers
    assert "optimizer" not in raw and "rng" not in raw and raw["epoch"] == 3
    assert out.stat().st_size < 0.55 * source.stat().st_size   # the weights are most of the file
    shipped = checkpoints.restore_model(checkpoints.load_checkpoint(out), out).eval()
    for (name, mine), theirs in zip(shipped.state_dict().items(), net.state_dict().values()):
        if theirs.is_floating_point():
            assert mine.dtype == torch.float32 and torch.equal(mine, theirs.half().float()), name
    x = torch.rand(1, 3, 64, 64)
    with torch.no_grad():
        full, half = net.eval()(x), shipped(x)
    assert (full - half).abs().max() < 1e-2 * full.abs().max()
    alone = run_script("my_predict.py", "--checkpoint", str(source), "--half")
    assert alone.returncode == 2 and alone.stderr.strip() == "error: --half goes with --convert", alone.stderr
