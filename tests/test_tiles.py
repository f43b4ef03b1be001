"""Tiled prediction: the blending weights, windows that cover the image exactly, the strip accumulator against a
whole-canvas one, exact equality with whole-image prediction when one window covers the image, agreement with it on
the demo val images when the windows are smaller, and the --tile flags. CPU only, random-init or briefly trained
networks, fixed seeds."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import run_script, synthetic_image
import some_define as sd
from support import cli, demo, export, tiles
from support.prediction import open_model
from support.speed import inference_speed

CPU = torch.device("cpu")


def random_model(name: str, seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    return sd.build_model(name, len(sd.VOC_CLASSES), "none").eval()


def photo(h: int, w: int, k: int = 1) -> torch.Tensor:
    return torch.from_numpy(synthetic_image(h, w, k)).permute(2, 0, 1).contiguous()


@pytest.mark.parametrize("n", [32, 33, 64, 512])
def test_ramp_is_positive_symmetric_and_peaks_in_the_middle(n):
    w = tiles.ramp(n)
    assert w.shape == (n,) and w.dtype == torch.float32
    assert torch.equal(w, w.flip(0)), "symmetric"
    assert w.min() > 0 and w.max() <= 1, "never 0 inside, so every pixel is covered"
    assert w[n // 2] > 0.99 and w[0] < 0.01, "~1 in the middle, ~0 at the edges"
    half = w[: (n + 1) // 2]
    assert torch.all(half[1:] >= half[:-1]), "rising toward the middle"


def test_blend_weights_are_flat_where_one_window_spans_the_image():
    w = tiles.blend_weights((64, 96), (64, 192))
    assert w.shape == (64, 96)
    assert torch.equal(w, tiles.ramp(96).expand(64, 96)), "flat along H (one window), the ramp along W"
    assert torch.equal(tiles.blend_weights((64, 96), (64, 96)), torch.ones(64, 96))
    assert torch.equal(tiles.blend_weights((32, 32), (96, 96)), tiles.ramp(32)[:, None] * tiles.ramp(32)[None, :])


@pytest.mark.parametrize("image_hw, tile_hw, overlap", [((100, 130), (64, 64), 0.25), ((100, 130), (64, 96), 0.5),
                                                        ((3000, 4000), (512, 512), 0.25), ((512, 1000), (512, 512), 0),
                                                        ((31, 33), (64, 64), 0.25), ((700, 90), (96, 32), 0.9)])
def test_windows_cover_the_image_exactly(image_hw, tile_hw, overlap):
    h, w = image_hw
    windows = tiles.tile_windows(image_hw, tile_hw, overlap)
    th, tw = tiles.window_size(image_hw, tile_hw)
    weights = tiles.blend_weights((th, tw), sd.padded_size(image_hw))
    count, total = torch.zeros(h, w, dtype=torch.int32), torch.zeros(h, w)
    for top, left, wh, ww in windows:
        assert top % 32 == 0 and left % 32 == 0, "on the network's stride-32 grid"
        assert 0 < wh <= th and 0 < ww <= tw and top + wh <= h and left + ww <= w, "inside the image"
        count[top:top + wh, left:left + ww] += 1
        total[top:top + wh, left:left + ww] += weights[:wh, :ww]
    assert count.min() >= 1, "every pixel, edges included, is covered"
    assert total.min() > 0, "every pixel gets a positive weight total (the blend is a proper weighted mean)"
    assert max(top + wh for top, _, wh, _ in windows) == h and max(left + ww for _, left, _, ww in windows) == w
    last = windows[-1]
    assert (last[0] + last[2], last[1] + last[3]) == (h, w), "the last window is flush with the border"
    assert len(windows) == len(set(windows)), "no window twice"


def test_strip_accumulator_equals_a_whole_canvas_one():
    """The strip that moves down gives exactly the argmax of blended logits summed over the whole image."""
    image = photo(100, 130)
    for net, tta in ((random_model("fcn"), False), (random_model("unet"), True)):
        canvas = torch.zeros(len(sd.VOC_CLASSES), 100, 130)
        weights = tiles.blend_weights(tiles.window_size((100, 130), (64, 64)), sd.padded_size((100, 130)))
        with torch.inference_mode():
            for top, left, h, w in tiles.tile_windows((100, 130), (64, 64), 0.5):
                logits = tiles.tile_logits(net, image[:, top:top + h, left:left + w], CPU, sd.Speed(), tta)
                canvas[:, top:top + h, left:left + w] += logits * weights[:h, :w]
        assert torch.equal(tiles.predict_tiled(image, net, CPU, (64, 64), 0.5, tta=tta), canvas.argmax(0))


@pytest.mark.parametrize("name", ["fcn", "unet"])
@pytest.mark.parametrize("image_hw, tile_hw", [((70, 90), (96, 96)), ((64, 96), (64, 96)), ((50, 60), (512, 512))])
def test_tiled_equals_whole_when_one_window_covers_the_image(name, image_hw, tile_hw):
    net, image = random_model(name), photo(*image_hw)
    assert len(tiles.tile_windows(image_hw, tile_hw, 0.25)) == 1
    for tta in (False, True):
        tiled = tiles.predict_tiled(image, net, CPU, tile_hw, 0.25, tta=tta)
        assert torch.equal(tiled, sd.predict(image, net, CPU, tta=tta)), f"tta={tta}"


def test_predict_any_size_picks_whole_or_tiles(monkeypatch):
    assert tiles.chosen_tile((3000, 4000), "off") is None
    assert tiles.chosen_tile((1000, 1000), "auto") is None, "1 Mpixel goes whole"
    assert tiles.chosen_tile((3000, 4000), "auto") == tiles.DEFAULT_TILE
    assert tiles.chosen_tile((100, 130), (128, 160)) is None, "a tile that covers the image: whole"
    assert tiles.chosen_tile((100, 130), (64, 160)) == (64, 160)
    net, image = random_model("fcn"), photo(70, 90)
    monkeypatch.setattr(tiles, "DEFAULT_TILE", (32, 32))
    monkeypatch.setattr(tiles, "AUTO_TILE_PIXELS", 1000)
    assert torch.equal(tiles.predict_any_size(image, net, CPU), tiles.predict_tiled(image, net, CPU, (32, 32)))
    assert torch.equal(tiles.predict_any_size(image, net, CPU, "off"), sd.predict(image, net, CPU))


def test_images_export_goes_through_tiles(tmp_path):
    """--images --tile 32 64: the palette PNG holds the tiled prediction, at the input's size."""
    Image.fromarray(synthetic_image(70, 90, 2)).save(tmp_path / "shot.png")
    net = random_model("unet")
    checkpoint = {"class_names": sd.VOC_CLASSES, "colormap": sd.VOC_COLORMAP, "config": {}}
    export.predict_files(net, checkpoint, [str(tmp_path / "shot.png")], tmp_path / "out", CPU, tile=(32, 64),
                          overlap=0.5)
    written = np.array(Image.open(tmp_path / "out" / "shot.png"))
    expected = tiles.predict_tiled(sd.read_image(tmp_path / "shot.png"), net, CPU, (32, 64), 0.5)
    assert np.array_equal(written, expected.numpy())
    assert Image.open(tmp_path / "out" / "shot_overlay.jpg").width > 90, "the overlay and its legend"


@pytest.mark.parametrize("flags, message", [
    (["--tile", "30", "32"], "--tile 30 32: both sides must be positive multiples of 32"),
    (["--tile", "0", "32"], "positive multiples of 32"),
    (["--tile", "32"], "give auto, off, or H W"),
    (["--tile", "32", "32", "32"], "give auto, off, or H W"),
    (["--tile", "big"], "give auto, off, or H W"),
    (["--tile-overlap", "1"], "--tile-overlap 1.0: must be at least 0 and below 1"),
    (["--tile-overlap", "-0.1"], "must be at least 0 and below 1"),
])
def test_bad_tile_flags_are_one_line(flags, message):
    args = cli.predict_arg_parser("x", "ckpt.pt", "fig.png").parse_args(["--images", "a.jpg", *flags])
    with pytest.raises(sd.UsageError, match=message.replace("(", r"\(")) as e:
        cli.predict_config(vars(args))
    assert "\n" not in str(e.value)


def test_tile_flags_are_filled_and_checked():
    parse = lambda *flags: cli.predict_config(vars(cli.predict_arg_parser("x", "c.pt", "f.png").parse_args(list(flags))))
    args = parse("--images", "a.jpg")
    assert (args.tile, args.tile_overlap) == ("auto", tiles.DEFAULT_OVERLAP)
    args = parse("--serve", "--tile", "256", "512", "--tile-overlap", "0.5")
    assert (args.tile, args.tile_overlap) == ((256, 512), 0.5)
    assert parse("--images", "a.jpg", "--tile", "off").tile == "off"
    with pytest.raises(sd.UsageError, match="--tile and --tile-overlap apply to --images and --serve"):
        parse("--tile", "64", "64")
    with pytest.raises(sd.UsageError, match="--serve goes alone"):
        parse("--serve", "--images", "a.jpg")
    with pytest.raises(sd.UsageError, match="--port 70000: must be 0..65535"):
        parse("--serve", "--port", "70000")


def test_tiled_agrees_with_whole_on_the_demo_val_images(tmp_path):
    """A U-Net trained for one epoch on the demo data (Adam 1e-3, so that it predicts objects, not only background;
    ~20 s) agrees with its whole-image prediction on >= 99 % of the pixels of the demo val images when predicting in
    64 x 64 windows (smaller than every image used here, both ways). Random-init networks would be a weaker check:
    trained ones are what users tile."""
    result = run_script("my_train.py", "--demo", "--epochs", "1", "--lr", "1e-3", "--out", str(tmp_path))
    assert result.returncode == 0, result.stderr[-2000:]
    net, _ = open_model(tmp_path / "last.pt", CPU)
    speed = inference_speed("auto", CPU)   # what the scripts use here: bf16 on CPUs with native bf16, else fp32
    voc = demo.make_demo_voc()
    names = (voc / "ImageSets" / "Segmentation" / "val.txt").read_text().split()
    images = [sd.read_image(voc / "JPEGImages" / f"{name}.jpg") for name in names]
    images = [image for image in images if min(image.shape[1:]) > 64]
    same = objects = pixels = 0
    for image in images:
        whole = sd.predict(image, net, CPU, speed)
        tiled = tiles.predict_tiled(image, net, CPU, (64, 64), tiles.DEFAULT_OVERLAP, speed)
        same += (whole == tiled).sum().item()
        objects += (whole != 0).sum().item()
        pixels += whole.numel()
    assert len(images) >= 30
    assert objects / pixels > 0.05, "the model predicts objects, so agreement is not just background"
    assert same / pixels >= 0.99, f"{same / pixels:.4f} of the pixels agree"
