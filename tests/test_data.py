"""VOC labels, reading the dataset, random crops and their sampler."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

import some_define as sd
from support import data
from support.data import crop_batches_on_device, voc_palette
from conftest import (TINY_TRAIN_SIZES, TINY_VAL_SIZES, make_voc_tree, run_script, synthetic_label,
                      write_palette_label, write_rgb_label)


# ---------------------------------------------------------------------------------------------------------------------
# Crop windows
# ---------------------------------------------------------------------------------------------------------------------

def coord_label(h: int, w: int, i: int) -> torch.Tensor:
    """A label derived from the coordinates (and the image index), with a few void pixels."""
    yy, xx = torch.meshgrid(torch.arange(h), torch.arange(w), indexing="ij")
    label = ((yy * 7 + xx * 3 + i) % 21).to(torch.uint8)
    label[(yy + xx) % 11 == 0] = sd.VOID
    return label


def coord_image(h: int, w: int, i: int) -> torch.Tensor:
    """3 x H x W uint8: channel 0 = row, channel 1 = column, channel 2 = image index."""
    yy, xx = torch.meshgrid(torch.arange(h), torch.arange(w), indexing="ij")
    return torch.stack([yy, xx, torch.full_like(yy, i)]).to(torch.uint8)


# Sizes: larger than the crop, equal to it, smaller in one direction, smaller in both.
COORD_SIZES = [(40, 50), (24, 32), (30, 20), (10, 12), (60, 33), (25, 90), (24, 40), (50, 31)]
CROP = (24, 32)


def coord_dataset(sizes=COORD_SIZES, crop=CROP) -> sd.SegDataset:
    images = [coord_image(h, w, i) for i, (h, w) in enumerate(sizes)]
    labels = [coord_label(h, w, i) for i, (h, w) in enumerate(sizes)]
    return sd.SegDataset(images, labels, [f"img{i}" for i in range(len(sizes))], crop)


def check_window(image: torch.Tensor, label: torch.Tensor, i: int, top: int, left: int, size: tuple[int, int]):
    """The crop at (top, left) of image i: in-image pixels carry their coordinates, padding is PAD_RGB / VOID."""
    ch, cw = CROP
    h, w = size
    assert image.shape == (3, ch, cw) and label.shape == (ch, cw)
    assert image.dtype == torch.uint8 and label.dtype == torch.uint8
    # The window lies inside the (padded) image.
    assert 0 <= top <= max(h, ch) - ch and 0 <= left <= max(w, cw) - cw
    full_label = torch.full((max(h, ch), max(w, cw)), sd.VOID, dtype=torch.uint8)
    full_label[:h, :w] = coord_label(h, w, i)
    assert torch.equal(label, full_label[top:top + ch, left:left + cw])
    rows = torch.arange(top, top + ch).view(-1, 1).expand(ch, cw)
    cols = torch.arange(left, left + cw).view(1, -1).expand(ch, cw)
    inside = (rows < h) & (cols < w)
    assert torch.equal(image[0][inside].long(), rows[inside])
    assert torch.equal(image[1][inside].long(), cols[inside])
    assert bool((image[2][inside] == i).all())
    for c in range(3):
        assert bool((image[c][~inside] == sd.PAD_RGB[c]).all())
    assert bool((label[~inside] == sd.VOID).all())


def test_dataset_item_is_exactly_the_window():
    ds = coord_dataset()
    # Hand-picked windows: corners and a middle one of the 40 x 50 image.
    for top, left in [(0, 0), (16, 18), (5, 7), (0, 18), (16, 0)]:
        image, label = ds[(0, top, left)]
        assert torch.equal(image[0], torch.arange(top, top + 24, dtype=torch.uint8).view(-1, 1).expand(24, 32))
        assert torch.equal(image[1], torch.arange(left, left + 32, dtype=torch.uint8).view(1, -1).expand(24, 32))
        assert torch.equal(label, coord_label(40, 50, 0)[top:top + 24, left:left + 32])
        check_window(image, label, 0, top, left, (40, 50))


def test_small_image_is_padded_not_dropped():
    ds = coord_dataset()
    assert len(ds) == len(COORD_SIZES)
    image, label = ds[(3, 0, 0)]          # the 10 x 12 image, crop 24 x 32
    assert image.shape == (3, 24, 32) and label.shape == (24, 32)
    assert torch.equal(label[:10, :12], coord_label(10, 12, 3))
    assert bool((label[10:, :] == 255).all()) and bool((label[:, 12:] == 255).all())
    pad = torch.tensor(sd.PAD_RGB, dtype=torch.uint8).view(3, 1)
    assert sd.PAD_RGB == (124, 116, 104)   # round(255 * ImageNet mean)
    assert torch.equal(image[:, 10:, :].reshape(3, -1), pad.expand(3, 14 * 32))
    assert torch.equal(image[:, :10, 12:].reshape(3, -1), pad.expand(3, 10 * 20))
    assert torch.equal(image[:, :10, :12], coord_image(10, 12, 3))
    # Smaller in one direction only: 30 x 20 -> padded on the right, any top in 0..6.
    image, label = ds[(2, 6, 0)]
    check_window(image, label, 2, 6, 0, (30, 20))
    assert bool((label[:, 20:] == 255).all())
    # The padded mean colour is zero after normalisation (the same as inference-time padding).
    normalized = sd.normalize_images(image[None])[0, :, :, 20:]
    assert normalized.abs().max() < 0.01


def test_sampler_keys_give_the_same_window_in_image_and_label():
    ds = coord_dataset()
    sampler = sd.RandomCropBatchSampler(ds, batch_size=3, seed=5)
    seen = 0
    for epoch in range(4):
        sampler.set_epoch(epoch)
        for batch in sampler:
            for i, top, left in batch:
                check_window(*ds[(i, top, left)], i, top, left, COORD_SIZES[i])
                seen += 1
    assert seen == 4 * (len(COORD_SIZES) // 3) * 3


def keys_of(sampler) -> list[list[tuple[int, int, int]]]:
    return [list(batch) for batch in sampler]


def test_sampler_is_a_function_of_seed_and_epoch():
    ds = coord_dataset()
    a = sd.RandomCropBatchSampler(ds, batch_size=3, seed=7)
    b = sd.RandomCropBatchSampler(ds, batch_size=3, seed=7)
    a.set_epoch(2)
    b.set_epoch(2)
    keys = keys_of(a)
    assert keys == keys_of(b)            # another sampler, same seed and epoch
    assert keys == keys_of(a)            # iterating again
    a.set_epoch(3)
    assert keys_of(a) != keys            # another epoch
    c = sd.RandomCropBatchSampler(ds, batch_size=3, seed=8)
    c.set_epoch(2)
    assert keys_of(c) != keys            # another seed
    # Drops the last partial batch; every index at most once per epoch; shuffled order differs between epochs.
    assert len(a) == len(COORD_SIZES) // 3 == len(keys)
    assert all(len(batch) == 3 for batch in keys)
    indices = [i for batch in keys for i, _, _ in batch]
    assert len(set(indices)) == len(indices) == 6
    epochs = [[i for batch in (a.set_epoch(e) or keys_of(a)) for i, _, _ in batch] for e in range(6)]
    assert len({tuple(e) for e in epochs}) > 1


def test_sampler_windows_vary_and_cover_the_range():
    ds = coord_dataset(sizes=[(40, 50)] * 4)
    sampler = sd.RandomCropBatchSampler(ds, batch_size=4, seed=0)
    tops, lefts = set(), set()
    for epoch in range(30):
        sampler.set_epoch(epoch)
        for batch in sampler:
            for _, top, left in batch:
                assert 0 <= top <= 16 and 0 <= left <= 18
                tops.add(top)
                lefts.add(left)
    assert len(tops) > 8 and len(lefts) > 8
    assert 0 in tops or 16 in tops


def test_sampler_rejects_batch_larger_than_split(tmp_path):
    with pytest.raises(sd.UsageError, match=r"a batch of 9 is larger than the training split \(\d+ images\)$"):
        sd.RandomCropBatchSampler(coord_dataset(), batch_size=9)   # the book's file speaks of data ...
    voc = make_voc_tree(tmp_path, [(40, 40)] * 2, [(40, 40)])
    result = run_script("my_train.py", "--voc-dir", str(voc), "--batch-size", "3", "--crop", "32", "32",
                        "--pretrained", "none", "--device", "cpu", "--out", str(tmp_path / "out"))
    assert result.returncode == 2   # ... and the script adds the flag to change
    assert "error: a batch of 3 is larger than the training split (2 images); lower --batch-size" in result.stderr


def test_dataloader_workers_give_identical_batches():
    ds = coord_dataset()

    def batches(workers: int):
        sampler = sd.RandomCropBatchSampler(ds, batch_size=2, seed=3)
        sampler.set_epoch(1)
        loader = torch.utils.data.DataLoader(ds, batch_sampler=sampler,
                                             num_workers=workers)
        return list(loader), keys_of(sampler)

    main_batches, keys = batches(0)
    worker_batches, keys2 = batches(2)
    assert keys == keys2
    assert len(main_batches) == len(worker_batches) == len(COORD_SIZES) // 2
    sampler = sd.RandomCropBatchSampler(ds, batch_size=2, seed=3)
    sampler.set_epoch(1)
    device_batches = list(crop_batches_on_device(ds, sampler))
    for (x0, y0), (x2, y2), (xd, yd), batch in zip(main_batches, worker_batches, device_batches, keys):
        assert x0.shape == (2, 3, 24, 32) and y0.shape == (2, 24, 32)
        assert torch.equal(x0, x2) and torch.equal(y0, y2)
        assert torch.equal(x0, xd) and torch.equal(y0, yd)
        for n, (i, top, left) in enumerate(batch):
            check_window(x0[n], y0[n], i, top, left, COORD_SIZES[i])


# ---------------------------------------------------------------------------------------------------------------------
# Labels: palette, colours, void
# ---------------------------------------------------------------------------------------------------------------------

def test_voc_palette_matches_colormap_and_void_colour():
    palette = voc_palette()
    assert len(palette) == 256 * 3
    colours = [palette[3 * i:3 * i + 3] for i in range(256)]
    assert colours[:21] == sd.VOC_COLORMAP
    assert tuple(colours[255]) == sd.VOID_COLOR == (224, 224, 192)


def all_classes_label() -> np.ndarray:
    label = np.arange(8 * 11, dtype=np.int64).reshape(8, 11) % 22
    label[label == 21] = 255          # every class 0..20 and void
    return label.astype(np.uint8)


def test_palette_and_rgb_labels_give_the_same_indices(tmp_path):
    label = all_classes_label()
    assert set(np.unique(label)) == set(range(21)) | {255}
    write_palette_label(tmp_path / "p.png", label)
    write_rgb_label(tmp_path / "rgb.png", label)
    with Image.open(tmp_path / "rgb.png") as im:
        assert im.mode == "RGB"
        rgb = np.array(im)
    assert tuple(rgb[0, 1]) == (128, 0, 0) and tuple(rgb[0, 0]) == (0, 0, 0)
    assert tuple(rgb[label == 255][0]) == (224, 224, 192)
    table = sd.voc_colormap2label()
    from_palette = sd.read_label(tmp_path / "p.png", table, 21)
    from_rgb = sd.read_label(tmp_path / "rgb.png", table, 21)
    assert from_palette.dtype == from_rgb.dtype == torch.uint8
    assert torch.equal(from_palette, torch.from_numpy(label))
    assert torch.equal(from_rgb, torch.from_numpy(label))
    # 8-bit grayscale files hold indices too.
    Image.fromarray(label).save(tmp_path / "l.png")       # a 2-D uint8 array is saved as mode 'L'
    with Image.open(tmp_path / "l.png") as im:
        assert im.mode == "L"
    assert torch.equal(sd.read_label(tmp_path / "l.png", table, 21), torch.from_numpy(label))


def test_void_and_unknown_colours_map_to_255(tmp_path):
    rgb = np.zeros((2, 4, 3), dtype=np.uint8)
    rgb[0, 0] = (224, 224, 192)      # VOC's boundary colour
    rgb[0, 1] = (1, 2, 3)            # unknown
    rgb[0, 2] = (255, 255, 255)      # unknown
    rgb[0, 3] = (128, 0, 1)          # one off aeroplane: unknown
    rgb[1, 0] = (128, 0, 0)          # aeroplane
    rgb[1, 1] = (0, 64, 128)         # tv/monitor
    rgb[1, 2] = (192, 128, 128)      # person
    rgb[1, 3] = (0, 0, 0)            # background
    Image.fromarray(rgb).save(tmp_path / "rgb.png")
    label = sd.read_label(tmp_path / "rgb.png", sd.voc_colormap2label(), 21)
    assert label.tolist() == [[255, 255, 255, 255], [1, 20, 15, 0]]
    # And back: void and out-of-range indices are drawn in the boundary colour.
    drawn = sd.label2image(torch.tensor([[255, 21, 1]], dtype=torch.uint8))
    assert drawn.tolist() == [[[224, 224, 192], [224, 224, 192], [128, 0, 0]]]


def test_palette_value_out_of_range_raises_naming_the_file(tmp_path):
    label = np.zeros((4, 5), dtype=np.uint8)
    label[1, 2] = 21                  # not a class of VOC's 21, not void
    label[0, 0] = 255                 # void is fine
    path = tmp_path / "bad_label.png"
    write_palette_label(path, label)
    with pytest.raises(sd.UsageError) as info:
        sd.read_label(path, sd.voc_colormap2label(), 21)
    assert str(path) in str(info.value) and "21" in str(info.value)
    # With fewer classes, a smaller value is already out of range; 255 never is.
    label[1, 2] = 5
    write_palette_label(path, label)
    assert sd.read_label(path, sd.voc_colormap2label(), 21)[1, 2] == 5
    with pytest.raises(sd.UsageError, match="label value 5"):
        sd.read_label(path, sd.voc_colormap2label(), 5)


def test_bad_label_in_a_split_names_the_file(tmp_path):
    voc_dir = make_voc_tree(tmp_path, [(20, 30), (20, 30)], [(20, 30)])
    bad = voc_dir / "SegmentationClass" / "train_001.png"
    label = synthetic_label(20, 30, 1)
    label[0, 0] = 42
    write_palette_label(bad, label)
    with pytest.raises(sd.UsageError) as info:
        data.read_split(voc_dir, "train", sd.VOC_COLORMAP)
    assert str(bad) in str(info.value)
    # A label whose size differs from its image, and a missing label, are named too.
    write_palette_label(bad, synthetic_label(21, 30, 1))
    with pytest.raises(sd.UsageError, match="train_001.png: label is"):
        data.read_split(voc_dir, "train", sd.VOC_COLORMAP)
    bad.unlink()
    with pytest.raises(sd.UsageError, match="train_001.png: label file not found"):
        data.read_split(voc_dir, "train", sd.VOC_COLORMAP)


# ---------------------------------------------------------------------------------------------------------------------
# Reading the dataset
# ---------------------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("label_mode", ["P", "RGB"])
def test_read_voc_images_returns_every_image_of_the_split(tmp_path, label_mode):
    voc_dir = make_voc_tree(tmp_path, TINY_TRAIN_SIZES, TINY_VAL_SIZES, label_mode=label_mode)
    for split, sizes in (("train", TINY_TRAIN_SIZES), ("val", TINY_VAL_SIZES)):
        split_data = data.read_split(voc_dir, split, sd.VOC_COLORMAP)
        images, labels, names = split_data.images, split_data.labels, split_data.names
        assert names == [f"{split}_{k:03d}" for k in range(len(sizes))]
        assert len(images) == len(labels) == len(sizes)       # small images are kept
        for k, ((h, w), image, label) in enumerate(zip(sizes, images, labels)):
            assert image.shape == (3, h, w) and image.dtype == torch.uint8
            assert label.dtype == torch.uint8
            assert torch.equal(label, torch.from_numpy(synthetic_label(h, w, k)))


def test_small_images_reach_training_crops(tmp_path):
    voc_dir = make_voc_tree(tmp_path, TINY_TRAIN_SIZES, TINY_VAL_SIZES)
    ds = data.read_split(voc_dir, "train", sd.VOC_COLORMAP, crop_size=(32, 32))
    sampler = sd.RandomCropBatchSampler(ds, batch_size=6, seed=0)
    (batch,) = keys_of(sampler)
    assert sorted(i for i, _, _ in batch) == list(range(6))
    k = TINY_TRAIN_SIZES.index((20, 28))
    (key,) = [key for key in batch if key[0] == k]
    assert key == (k, 0, 0)
    image, label = ds[key]
    assert torch.equal(label[:20, :28], torch.from_numpy(synthetic_label(20, 28, k)))
    assert bool((label[20:] == 255).all()) and bool((label[:, 28:] == 255).all())
    assert bool((image[:, 20:, :] == torch.tensor(sd.PAD_RGB, dtype=torch.uint8).view(3, 1, 1)).all())


@pytest.mark.parametrize("layout", ["flat", "VOC2012", "VOCdevkit"])
def test_recognise_layout_layouts(tmp_path, layout):
    voc_dir = make_voc_tree(tmp_path / "data", [(20, 30)], [(20, 30)], layout=layout)
    assert data.recognise_layout(tmp_path / "data") == voc_dir
    assert data.recognise_layout(voc_dir) == voc_dir
    assert data.recognise_layout(str(tmp_path / "data")) == voc_dir


def test_recognise_layout_missing_names_the_tried_paths(tmp_path):
    missing = tmp_path / "nothing"
    (tmp_path / "nothing" / "VOC2012" / "JPEGImages").mkdir(parents=True)   # incomplete: not a dataset
    with pytest.raises(sd.UsageError) as info:
        data.recognise_layout(missing)
    message = str(info.value)
    for tried in (missing, missing / "VOC2012", missing / "VOCdevkit" / "VOC2012"):
        assert str(tried) in message
    assert "--demo" in message and "\n" not in message


def test_split_file_missing_or_empty(tmp_path):
    voc_dir = make_voc_tree(tmp_path, [(20, 30)], [(20, 30)])
    with pytest.raises(sd.UsageError, match="test.txt: split file not found"):
        data.read_split(voc_dir, "test", sd.VOC_COLORMAP)
    (voc_dir / "ImageSets" / "Segmentation" / "val.txt").write_text("\n")
    with pytest.raises(sd.UsageError, match="val.txt: the split is empty"):
        data.read_split(voc_dir, "val", sd.VOC_COLORMAP)


# ---------------------------------------------------------------------------------------------------------------------
# Scale and mirror augmentation
# ---------------------------------------------------------------------------------------------------------------------

def test_book_sampler_keys_are_unchanged_by_the_augmentation_options():
    ds = coord_dataset()
    plain = sd.RandomCropBatchSampler(ds, batch_size=3, seed=4)
    explicit = sd.RandomCropBatchSampler(ds, batch_size=3, seed=4, scales=(1.0, 1.0), hflip=False)
    for epoch in range(3):
        plain.set_epoch(epoch)
        explicit.set_epoch(epoch)
        assert keys_of(plain) == keys_of(explicit)
        assert all(len(key) == 3 for batch in keys_of(plain) for key in batch)


def test_scaled_windows_stay_in_range_and_flip_about_half():
    ds = coord_dataset(sizes=[(40, 50)] * 6)
    sampler = sd.RandomCropBatchSampler(ds, batch_size=6, seed=1, scales=(0.5, 2.0), hflip=True)
    heights, flips = [], []
    for epoch in range(40):
        sampler.set_epoch(epoch)
        for batch in sampler:
            for i, top, left, h, w, flip in batch:
                assert 12 <= h <= 48 and 16 <= w <= 64
                assert abs(w / h - 32 / 24) < 0.1                   # one scale for both sides
                assert 0 <= top <= max(40, h) - h and 0 <= left <= max(50, w) - w
                image, label = ds[(i, top, left, h, w, flip)]
                assert image.shape == (3, 24, 32) and label.shape == (24, 32) and image.dtype == torch.uint8
                heights.append(h)
                flips.append(flip)
    assert min(heights) < 16 and max(heights) > 40                # zoomed in and out
    assert 0.4 < sum(flips) / len(flips) < 0.6


def test_mirrored_window_at_scale_one_is_the_window_flipped():
    ds = coord_dataset()
    image, label = ds[(0, 5, 7, 24, 32, True)]
    plain_image, plain_label = ds[(0, 5, 7)]
    assert torch.equal(image, plain_image.flip(-1)) and torch.equal(label, plain_label.flip(-1))
    assert torch.equal(ds[(0, 5, 7, 24, 32, False)][1], plain_label)


def test_zoomed_out_window_takes_every_second_pixel_of_label_and_image():
    ds = coord_dataset(sizes=[(60, 70)])
    top, left = 3, 5
    image, label = ds[(0, top, left, 48, 64, False)]            # a window twice the crop, shrunk by 2
    rows = top + 2 * torch.arange(24) + 1                       # nearest-exact: the second pixel of each pair
    cols = left + 2 * torch.arange(32) + 1
    assert torch.equal(label, coord_label(60, 70, 0)[rows][:, cols])
    # Bilinear with antialiasing averages each 2 x 2 block, whose mean row is 2r + 0.5 (channel 0 is the row).
    expected_rows = (top + 2 * torch.arange(24) + 0.5).view(-1, 1).expand(24, 32)
    assert (image[0].float() - expected_rows).abs().max() <= 1.0
    assert bool((image[2] == 0).all())


def test_augmented_batches_are_the_same_on_every_data_path():
    ds = coord_dataset()

    def sampler():
        s = sd.RandomCropBatchSampler(ds, batch_size=2, seed=3, scales=(0.5, 2.0), hflip=True)
        s.set_epoch(2)
        return s

    loader = torch.utils.data.DataLoader(ds, batch_sampler=sampler(), num_workers=2)
    for (x, y), (xd, yd) in zip(loader, crop_batches_on_device(ds, sampler())):
        assert torch.equal(x, xd) and torch.equal(y, yd)


def test_figure_examples_are_the_first_or_spread_over_the_split():
    images = [torch.full((3, 4, 4), i, dtype=torch.uint8) for i in range(10)]
    split = sd.SegDataset(images, [torch.zeros(4, 4, dtype=torch.uint8)] * 10, [f"f{i}" for i in range(10)], (4, 4))
    assert data.chosen_examples(split, 4).names == ["f0", "f1", "f2", "f3"]
    spread = data.chosen_examples(split, 4, spread=True)
    assert spread.names == ["f0", "f3", "f6", "f9"] and [int(x[0, 0, 0]) for x in spread.images] == [0, 3, 6, 9]
    assert data.chosen_examples(split, 12, spread=True).names == split.names   # fewer than asked: all of them
