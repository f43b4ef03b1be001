"""Your own images and data: --images inference to palette PNGs and overlays, --classes / --ignore-index / split
names for VOC-layout datasets, class-carrying checkpoints, and --download (on tars served locally, no network)."""
from __future__ import annotations

import hashlib
import http.server
import io
import json
import re
import os
import subprocess
import sys
import tarfile
import threading
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from conftest import make_voc_tree  # noqa: E402
import some_define as sd  # noqa: E402
from support import checkpoints, cli, data, download, export, prediction, speed
from support.data import voc_palette

# One thread: on a small shared machine, several OpenMP threads spin-waiting on each other make steps far slower.
torch.set_num_threads(1)
ENV = dict(os.environ, OMP_NUM_THREADS="1")

CLASSES_WITH_COLOURS = "sky 10 20 30\nroad 200 100 0\npotted plant 0 250 5\n"
NAMES = ["sky", "road", "potted plant"]
COLOURS = [[10, 20, 30], [200, 100, 0], [0, 250, 5]]
TRAIN_FLAGS = ["--pretrained", "none", "--epochs", "1", "--crop", "32", "32", "--batch-size", "2", "--device", "cpu"]


# ---------------------------------------------------------------------------------------------------------------------
# Helpers: a tiny dataset in VOC layout, scripts as subprocesses, local tar servers
# ---------------------------------------------------------------------------------------------------------------------


def toy_label(h: int, w: int, k: int, num_classes: int) -> np.ndarray:
    """Class 0 around a rectangle of class 1 + k % (num_classes - 1), with a 1-pixel void border."""
    label = np.zeros((h, w), dtype=np.uint8)
    label[h // 4 - 1:3 * h // 4 + 1, w // 4 - 1:3 * w // 4 + 1] = sd.VOID
    label[h // 4:3 * h // 4, w // 4:3 * w // 4] = 1 + k % (num_classes - 1)
    return label


def toy_image(label: np.ndarray) -> np.ndarray:
    image = np.full((*label.shape, 3), 90, dtype=np.uint8)
    image[label == 1] = (220, 40, 40)
    image[label == 2] = (40, 220, 40)
    return image


def write_mask(path: Path, label: np.ndarray, kind: str, colormap=COLOURS) -> None:
    """'palette': a P image (indices, VOC palette); 'gray': an 8-bit L image (indices); 'rgb': the class colours."""
    if kind == "rgb":
        Image.fromarray(sd.colormap_lut(colormap)[torch.from_numpy(label).long()].numpy()).save(path)
        return
    im = Image.fromarray(label)
    if kind == "palette":
        im.putpalette(voc_palette())
    im.save(path)


def make_dataset(root: Path, splits: dict[str, int], kind: str = "rgb", num_classes: int = 3,
                 size: tuple[int, int] = (48, 64)) -> dict[str, np.ndarray]:
    """A VOC-layout folder; returns every written label by name."""
    for sub in ("JPEGImages", "SegmentationClass", "ImageSets/Segmentation"):
        (root / sub).mkdir(parents=True, exist_ok=True)
    labels = {}
    for split, count in splits.items():
        names = [f"{split}_{k}" for k in range(count)]
        for k, name in enumerate(names):
            labels[name] = toy_label(*size, k, num_classes)
            Image.fromarray(toy_image(labels[name])).save(root / "JPEGImages" / f"{name}.jpg", quality=95)
            write_mask(root / "SegmentationClass" / f"{name}.png", labels[name], kind)
        (root / "ImageSets" / "Segmentation" / f"{split}.txt").write_text("\n".join(names) + "\n")
    return labels


def run_script(script: str, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, script, *map(str, args)], cwd=ROOT, env=ENV, capture_output=True,
                          text=True, timeout=300)


def assert_ok(result: subprocess.CompletedProcess) -> None:
    assert result.returncode == 0, f"exit {result.returncode}\nstdout:\n{result.stdout}\nstderr:\n{result.stderr}"


def error_line(result: subprocess.CompletedProcess) -> str:
    """Exit 2, no traceback; the last stderr line is 'error: ...' (progress bars may come before it)."""
    assert result.returncode == 2, f"exit {result.returncode}\nstdout:\n{result.stdout}\nstderr:\n{result.stderr}"
    assert "Traceback" not in result.stderr
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith("error: "), result.stderr
    return last


def make_voc_tar(path: Path, tree_root: Path) -> str:
    """A small VOCtrainval-like tar (VOCdevkit/VOC2012/...) with a 2-image train and val split; returns its MD5."""
    make_dataset(tree_root / "VOCdevkit" / "VOC2012", {"train": 2, "val": 2}, kind="palette", num_classes=21,
                 size=(64, 64))
    with tarfile.open(path, "w") as tar:
        tar.add(tree_root / "VOCdevkit", arcname="VOCdevkit")
    return hashlib.md5(path.read_bytes()).hexdigest()


class TarHandler(http.server.BaseHTTPRequestHandler):
    """Serves one file. Honours Range when ``ranges`` is set, else sends everything with 200 (as many servers do);
    ``cut_after`` bytes into a body, it closes the connection as a dropped download would."""
    data, ranges, cut_after, seen_ranges = b"", True, None, []

    def do_GET(self):
        wanted = self.headers.get("Range")
        self.seen_ranges.append(wanted)
        start = int(wanted.split("=")[1].split("-")[0]) if wanted and self.ranges else 0
        body = self.data[start:]
        self.send_response(206 if start else 200)
        if start:
            self.send_header("Content-Range", f"bytes {start}-{len(self.data) - 1}/{len(self.data)}")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body if self.cut_after is None else body[:self.cut_after])

    def log_message(self, *args):
        pass


@pytest.fixture
def serve():
    """serve(data, ranges=True, cut_after=None) -> (url, list of Range headers received), on 127.0.0.1."""
    servers = []

    def start(data: bytes, ranges: bool = True, cut_after: int | None = None):
        seen: list = []
        handler = type("Handler", (TarHandler,), dict(data=data, ranges=ranges, cut_after=cut_after,
                                                       seen_ranges=seen))
        server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
        threading.Thread(target=server.serve_forever, daemon=True).start()
        servers.append(server)
        return f"http://127.0.0.1:{server.server_address[1]}/{download.VOC_TAR}", seen

    yield start
    for server in servers:
        server.shutdown()
        server.server_close()


# ---------------------------------------------------------------------------------------------------------------------
# Class files, mask formats, --ignore-index
# ---------------------------------------------------------------------------------------------------------------------


def test_class_file_with_colours(tmp_path):
    path = tmp_path / "classes.txt"
    path.write_text(CLASSES_WITH_COLOURS + "\n")   # a trailing blank line is fine
    assert data.read_classes(path) == (NAMES, COLOURS)


CAMVID_NAMES = ["sky", "building", "pole", "road", "pavement", "tree", "sign symbol", "fence", "car", "pedestrian",
                "bicyclist", "unlabelled"]


def min_distance(colours, space=lambda rgb: rgb) -> float:
    """The smallest distance between two of the colours (RGB, or in ``space``, e.g. data.cielab)."""
    points = space(np.array(colours, dtype=float))
    distances = np.linalg.norm(points[:, None] - points[None], axis=2)
    np.fill_diagonal(distances, np.inf)
    return float(distances.min())


def test_class_file_without_colours_takes_distinct_colours(tmp_path):
    path = tmp_path / "classes.txt"
    path.write_text("\n".join(f"c{i}" for i in range(40)) + "\n")
    names, colormap = data.read_classes(path)
    assert names == [f"c{i}" for i in range(40)] and colormap == data.distinct_colours(40)
    assert [0, 0, 0] not in data.distinct_colours(255) and len({tuple(c) for c in data.distinct_colours(255)}) == 255
    # The bar: no two of the first 21 closer than VOC's own closest pair (64 apart in RGB, e.g. black and
    # (64, 0, 0)), nor closer to black or to the void colour; and in CIELAB, where distance is what the eye sees,
    # four times as far apart as VOC's closest pair (8.8), since VOC's palette was what this replaced.
    voc_rgb, voc_lab = min_distance(sd.VOC_COLORMAP), min_distance(sd.VOC_COLORMAP, data.cielab)
    assert voc_rgb == 64
    first = colormap[:21]
    assert min_distance(first) > voc_rgb
    assert min(min_distance([c, [0, 0, 0]]) for c in first) > voc_rgb
    assert min(min_distance([c, list(sd.VOID_COLOR)]) for c in first) > voc_rgb
    assert min_distance(first, data.cielab) > 4 * voc_lab


def test_voc_keeps_its_own_colours(tmp_path):
    """Without --classes a dataset is VOC's, in VOC's colours (and so is the demo data); a colour given is kept."""
    assert data.dataset_classes(None) == (sd.VOC_CLASSES, [list(c) for c in sd.VOC_COLORMAP])
    path = tmp_path / "classes.txt"
    path.write_text("sky 128 128 128\nbuilding\ncar\n")
    assert data.read_classes(path)[1] == [[128, 128, 128], *data.distinct_colours(3)[1:]]


def test_camvid_names_alone_are_drawn_in_distinct_colours_in_overlay_and_legend(tmp_path):
    """CamVid's class names without colours: sky (class 0, not a background) is no longer black, so it neither
    darkens the overlay nor vanishes in the legend; building and car are told apart. The colours are read back from
    the overlay's legend swatches and from the palette PNG that --images writes."""
    path = tmp_path / "classes.txt"
    path.write_text("\n".join(CAMVID_NAMES) + "\n")
    names, colormap = data.read_classes(path)
    assert sum(colormap[0]) > 0 and min_distance([colormap[1], colormap[8]], data.cielab) > 40
    pred = torch.tensor([[c for c in range(len(names)) for _ in range(8)]] * 40)   # every class, 8 columns each
    image = torch.full((3, *pred.shape), 128, dtype=torch.uint8)
    out = tmp_path / "overlay.png"   # lossless, so that the colours read back are the ones drawn
    export.overlay_with_legend(image, pred, colormap, names).save(out)
    export.save_label_png(pred, colormap, tmp_path / "label.png")
    with Image.open(tmp_path / "label.png") as png:
        assert png.getpalette()[:3 * len(names)] == sum(colormap, [])
    with Image.open(out) as written:
        pixels = np.asarray(written.convert("RGB")).astype(int)
    width = pred.shape[1]
    size = max(12, pred.shape[0] // 40)   # as overlay_with_legend sizes its font and its swatches
    line = round(size * 1.5)
    for row, colour in enumerate(colormap):
        x, y = width + line // 2 + size // 2, line // 2 + row * line + size // 2   # a swatch's middle
        assert pixels[y, x].tolist() == colour, names[row]
    painted = pixels[5:35, 2:6]   # sky's column, away from its outline: 60 % of its colour over the grey photo
    assert np.abs(painted - (0.6 * np.array(colormap[0]) + 0.4 * 128)).max() <= 0.5


@pytest.mark.parametrize("text, message", [("a\n\nb\n", "line 2: empty"),
                                           ("a 1 2 3\nb 1 2 3\n", "colour (1, 2, 3) is given to two classes"),
                                           ("a\na\n", "name a is given to two classes")])
def test_bad_class_files_are_refused(tmp_path, text, message):
    path = tmp_path / "classes.txt"
    path.write_text(text)
    with pytest.raises(sd.UsageError, match=re.escape(message)):
        data.read_classes(path)


RULE = ("a line is 'name' or 'name R G B' (R G B: integers 0..255); a name may hold spaces ('potted plant'), and "
        "without a colour it must not end in a number")


@pytest.mark.parametrize("line, problem", [("cat 64 0", "'cat 64 0' ends in 2 numbers, not 3"),
                                           ("class 7", "'class 7' ends in 1 number, not 3"),
                                           ("12", "'12' ends in 1 number, not 3"),
                                           ("  64 128 0", "'64 128 0' has a colour but no class name"),
                                           ("cat 1 2 300", "'cat 1 2 300': a colour value is outside 0..255"),
                                           ("cat -1 2 3", "'cat -1 2 3': a colour value is outside 0..255")])
def test_a_malformed_class_line_is_one_line_naming_file_and_line(tmp_path, line, problem):
    """A colour with a number missing would otherwise become part of the name ('cat 64 0' a class of VOC's colour)."""
    path = tmp_path / "classes.txt"
    path.write_text(f"background\npotted plant 0 64 128\n{line}\ndog\n")
    with pytest.raises(sd.UsageError) as error:
        data.read_classes(path)
    assert str(error.value) == f"{path}, line 3: {problem}; {RULE}"


def test_class_names_may_hold_spaces_and_numbers_before_the_colour(tmp_path):
    path = tmp_path / "classes.txt"
    path.write_text("potted plant\ntv monitor 0 64 128\nroad 2 lane 10 20 30\nlane 3 1 2 3\n")
    assert data.read_classes(path) == (["potted plant", "tv monitor", "road 2 lane", "lane 3"],
                                       [data.distinct_colours(4)[0], [0, 64, 128], [10, 20, 30], [1, 2, 3]])


@pytest.mark.parametrize("kind", ["palette", "rgb", "gray"])
def test_mask_formats_give_the_expected_indices(tmp_path, kind):
    labels = make_dataset(tmp_path, {"train": 3}, kind=kind)
    split_data = data.read_split(tmp_path, "train", COLOURS)
    _, read_labels, names = split_data.images, split_data.labels, split_data.names
    for name, label in zip(names, read_labels):
        assert torch.equal(label, torch.from_numpy(labels[name]))


def test_ignore_index_maps_a_label_value_to_void(tmp_path):
    (tmp_path / "SegmentationClass").mkdir()
    mask = np.array([[0, 1, 3], [3, 255, 2]], dtype=np.uint8)   # 3 is "unlabelled" in a 3-class dataset
    write_mask(tmp_path / "m.png", mask, "gray")
    table = sd.voc_colormap2label(COLOURS)
    label = sd.read_label(tmp_path / "m.png", table, 3, ignore_index=3)
    assert label.tolist() == [[0, 1, 255], [255, 255, 2]]
    with pytest.raises(sd.UsageError, match=r"m\.png: label value 3 is not a class index \(0\.\.2\)"):
        sd.read_label(tmp_path / "m.png", table, 3)


def test_too_large_mask_value_names_the_file_and_value(tmp_path):
    make_dataset(tmp_path / "data", {"train": 2, "val": 1}, kind="gray")
    bad = np.zeros((48, 64), dtype=np.uint8)
    bad[5, 5] = 7
    write_mask(tmp_path / "data" / "SegmentationClass" / "val_0.png", bad, "gray")
    (tmp_path / "classes.txt").write_text(CLASSES_WITH_COLOURS)
    result = run_script("origin_train.py", "--voc-dir", tmp_path / "data", "--classes", tmp_path / "classes.txt",
                        "--out", tmp_path / "run", *TRAIN_FLAGS)
    line = error_line(result)
    assert "val_0.png" in line and "label value 7" in line


# ---------------------------------------------------------------------------------------------------------------------
# A 3-class dataset: train, checkpoint classes, eval, --images
# ---------------------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """origin_train.py on a 3-class dataset with RGB masks, a class file with colours, and own split names."""
    root = tmp_path_factory.mktemp("own")
    make_dataset(root / "data", {"fit": 4, "check": 2}, kind="rgb")
    (root / "classes.txt").write_text(CLASSES_WITH_COLOURS)
    result = run_script("origin_train.py", "--voc-dir", root / "data", "--classes", root / "classes.txt",
                        "--train-split", "fit", "--val-split", "check", "--out", root / "run", *TRAIN_FLAGS)
    assert_ok(result)
    return root


def input_images(folder: Path) -> dict[str, tuple[int, int]]:
    """Odd sizes and every mode the issue names, as files in ``folder``; returns name -> (width, height)."""
    folder.mkdir()
    rng = np.random.RandomState(0)
    rgb = lambda w, h: Image.fromarray(rng.randint(0, 255, (h, w, 3), dtype=np.uint8))
    rgb(70, 45).save(folder / "odd.jpg")
    rgb(33, 97).convert("L").save(folder / "gray.png")
    rgb(64, 64).convert("RGBA").save(folder / "rgba.png")
    rgb(50, 40).convert("CMYK").save(folder / "cmyk.jpg")
    return {"odd": (70, 45), "gray": (33, 97), "rgba": (64, 64), "cmyk": (50, 40)}


def test_checkpoint_carries_the_dataset_classes(trained):
    checkpoint = checkpoints.load_checkpoint(trained / "run" / "last.pt")
    assert checkpoint["class_names"] == NAMES and checkpoint["colormap"] == COLOURS
    assert checkpoint["num_classes"] == 3
    assert checkpoint["config"]["train_split"] == "fit" and checkpoint["config"]["val_split"] == "check"


def test_eval_uses_the_class_names_and_val_split(trained):
    metrics_path = trained / "metrics.json"
    result = run_script("origin_predict.py", "--checkpoint", trained / "run" / "last.pt", "--eval",
                        "--metrics", metrics_path)
    assert_ok(result)
    metrics = json.loads(metrics_path.read_text())
    assert list(metrics["per_class_iou"]) == NAMES and metrics["num_images"] == 2   # the "check" split
    assert "potted plant" in result.stdout


def test_images_give_palette_pngs_of_the_input_size_and_overlays(trained, tmp_path):
    sizes = input_images(tmp_path / "in")
    (tmp_path / "in" / "broken.jpg").write_bytes(b"not an image")
    out = tmp_path / "out"
    result = run_script("origin_predict.py", "--checkpoint", trained / "run" / "last.pt", "--classes",
                        trained / "classes.txt", "--images", tmp_path / "in", "--save-dir", out)   # the same classes
    # The broken file is reported on its own line, the others are still written, and the exit code says so.
    assert f"error: {tmp_path / 'in' / 'broken.jpg'}: cannot read the image" in result.stderr
    assert "1 of 5 images could not be read" in error_line(result)
    net = checkpoints.restore_model(checkpoints.load_checkpoint(trained / "run" / "last.pt")).eval()
    for name, size in sizes.items():
        with Image.open(out / f"{name}.png") as png:
            assert png.mode == "P" and png.size == size
            assert png.getpalette()[:9] == sum(COLOURS, [])
            indices = torch.from_numpy(np.array(png))
        image = sd.read_image(tmp_path / "in" / f"{name}{'.jpg' if name in ('odd', 'cmyk') else '.png'}")
        cpu = torch.device("cpu")   # the script's defaults: bf16 where this CPU computes it natively
        _, expected = next(sd.predict_full_res(net, [image], cpu, speed=speed.inference_speed("auto", cpu)))
        assert torch.equal(indices, expected.to(torch.uint8))   # the model's own full-resolution prediction
        assert int(indices.max()) < 3
        with Image.open(out / f"{name}_overlay.jpg") as overlay:
            assert overlay.format == "JPEG" and overlay.height >= size[1] and overlay.width > size[0]
    assert not (out / "broken.png").exists()


def test_tta_and_a_glob(trained, tmp_path):
    sizes = input_images(tmp_path / "in")
    result = run_script("origin_predict.py", "--checkpoint", trained / "run" / "last.pt",
                        "--images", str(tmp_path / "in" / "*.jpg"), "--save-dir", tmp_path / "out", "--tta",
                        "--amp", "off")   # fp32, as the expectation below
    assert_ok(result)
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == [
        "cmyk.png", "cmyk_overlay.jpg", "odd.png", "odd_overlay.jpg"]
    net = checkpoints.restore_model(checkpoints.load_checkpoint(trained / "run" / "last.pt")).eval()
    image = sd.read_image(tmp_path / "in" / "odd.jpg")
    _, expected = next(sd.predict_full_res(net, [image], torch.device("cpu"), tta=True))
    with Image.open(tmp_path / "out" / "odd.png") as png:
        assert png.size == sizes["odd"] and torch.equal(torch.from_numpy(np.array(png)), expected.to(torch.uint8))


def test_mismatched_classes_are_refused(trained, tmp_path):
    (tmp_path / "voc.txt").write_text("\n".join(sd.VOC_CLASSES))
    result = run_script("origin_predict.py", "--checkpoint", trained / "run" / "last.pt", "--classes",
                        tmp_path / "voc.txt", "--eval")
    assert "21 classes, but the checkpoint was trained on 3" in error_line(result)
    checkpoint = checkpoints.load_checkpoint(trained / "run" / "last.pt")
    with pytest.raises(sd.UsageError, match="class 2 is 'tree' \\[0, 250, 5\\], but the checkpoint's is 'potted plant'"):
        checkpoints.check_classes_match(["sky", "road", "tree"], COLOURS, checkpoint, "other.txt")
    with pytest.raises(sd.UsageError, match="class 0 is 'sky' \\[0, 0, 0\\], but the checkpoint's is 'sky' \\[10, 20, 30\\]"):
        checkpoints.check_classes_match(NAMES, [[0, 0, 0], *COLOURS[1:]], checkpoint, "other.txt")


def test_predict_flags_default_to_the_training_run(tmp_path):
    voc = make_voc_tree(tmp_path, [(20, 30)], [(20, 30)])
    checkpoint = {"class_names": NAMES, "colormap": COLOURS,
                  "config": {"data_dir": str(voc), "val_split": "check", "ignore_index": 11}}
    parse = lambda *argv: cli.predict_config(vars(cli.predict_arg_parser("", "c.pt", "f.png").parse_args(list(argv))))
    assert prediction.checkpoint_data(parse(), checkpoint) == (voc, "check", 11)
    assert prediction.checkpoint_data(parse("--split", "val", "--ignore-index", "3"), checkpoint) == (voc, "val", 3)
    with pytest.raises(sd.UsageError, match="--tta applies to --images"):
        parse("--tta")
    with pytest.raises(sd.UsageError, match="--images and --eval do not go together"):
        parse("--images", "x.jpg", "--eval")


def test_outputs_must_not_clash_or_replace_inputs(tmp_path):
    a, b = tmp_path / "a" / "x.jpg", tmp_path / "b" / "x.png"
    with pytest.raises(sd.UsageError, match="would both be written as x.png"):
        export.check_prediction_paths([a, b], tmp_path / "out")
    with pytest.raises(sd.UsageError, match="would replace an input"):
        export.check_prediction_paths([b], tmp_path / "b")
    export.check_prediction_paths([a], tmp_path / "a")   # x.jpg -> x.png and x_overlay.jpg: no input replaced


# ---------------------------------------------------------------------------------------------------------------------
# --download
# ---------------------------------------------------------------------------------------------------------------------


def leftovers(root: Path) -> list[str]:
    return sorted(p.name for p in root.iterdir())


def test_download_checksum_mismatch_fails_cleanly(tmp_path):
    make_voc_tar(tmp_path / "served.tar", tmp_path / "src")
    root = tmp_path / "data"
    result = run_script("origin_train.py", "--download", "--mirror", (tmp_path / "served.tar").as_uri(),
                        "--voc-dir", root / "VOC2012", "--out", tmp_path / "run", *TRAIN_FLAGS)
    line = error_line(result)
    assert f"is not the expected {download.VOC_MD5}; removed it, run again" in line
    assert not root.exists()   # no tar, no .part, no VOCdevkit, no temporary extraction folder, nor the folder
    assert not (tmp_path / "run" / "last.pt").exists()


def test_download_extracts_then_trains(tmp_path, monkeypatch):
    import origin_train
    md5 = make_voc_tar(tmp_path / "served.tar", tmp_path / "src")
    monkeypatch.setattr(download, "VOC_MD5", md5)
    root = tmp_path / "data"
    origin_train.main(["--download", "--mirror", (tmp_path / "served.tar").as_uri(), "--voc-dir",
                       str(root / "VOC2012"), "--out", str(tmp_path / "run"), *TRAIN_FLAGS])
    assert leftovers(root) == ["VOCdevkit", download.VOC_TAR]
    assert data.is_voc_dir(root / "VOCdevkit" / "VOC2012")
    assert (tmp_path / "run" / "last.pt").is_file()
    # The checkpoint's --voc-dir finds the extracted tree, so predict needs no flags; a rerun downloads nothing.
    assert data.recognise_layout(root / "VOC2012") == root / "VOCdevkit" / "VOC2012"
    (root / download.VOC_TAR).unlink()
    assert download.find_data(str(root / "VOC2012"), demo=False, download=True, mirror=None) \
        == root / "VOCdevkit" / "VOC2012"


def test_download_resumes_a_partial_file(tmp_path, serve):
    md5 = make_voc_tar(tmp_path / "served.tar", tmp_path / "src")
    served = (tmp_path / "served.tar").read_bytes()
    root = tmp_path / "data"
    url, seen = serve(served, cut_after=len(served) // 3)   # the connection drops a third of the way
    with pytest.raises(sd.UsageError, match="run again to resume"):
        download.download_voc(root, url, md5)
    part = root / f"{download.VOC_TAR}.part"
    assert part.stat().st_size == len(served) // 3 and not (root / "VOCdevkit").exists()
    url, seen = serve(served)
    assert download.download_voc(root, url, md5) == root / "VOCdevkit" / "VOC2012"
    assert seen == [f"bytes={len(served) // 3}-"]   # only the rest was asked for
    assert (root / download.VOC_TAR).read_bytes() == served and not part.exists()


def test_download_restarts_when_the_server_ignores_range(tmp_path, serve):
    md5 = make_voc_tar(tmp_path / "served.tar", tmp_path / "src")
    served = (tmp_path / "served.tar").read_bytes()
    root = tmp_path / "data"
    root.mkdir()
    (root / f"{download.VOC_TAR}.part").write_bytes(b"x" * 1000)
    url, seen = serve(served, ranges=False)
    assert data.is_voc_dir(download.download_voc(root, url, md5))
    assert seen == ["bytes=1000-"] and (root / download.VOC_TAR).read_bytes() == served


def test_unsafe_tar_members_are_refused(tmp_path):
    tar_path = tmp_path / "evil.tar"
    with tarfile.open(tar_path, "w") as tar:
        info = tarfile.TarInfo("../evil.txt")
        info.size = 4
        tar.addfile(info, io.BytesIO(b"evil"))
    root = tmp_path / "data"
    with pytest.raises(sd.UsageError, match="cannot extract it"):
        download.download_voc(root, tar_path.as_uri(), hashlib.md5(tar_path.read_bytes()).hexdigest())
    assert not (tmp_path / "evil.txt").exists() and leftovers(root) == [download.VOC_TAR]
