"""The chapter's own calls, with the book's argument layout, against the project's internal path."""
from __future__ import annotations

import ast
import copy

import torch
from torch import nn

import some_define as sd
from conftest import REPO_ROOT, TINY_TRAIN_SIZES, TINY_VAL_SIZES, make_voc_tree
from support import data, speed


def test_some_define_imports_nothing_from_the_project_and_stays_short():
    source = (REPO_ROOT / "some_define.py").read_text()
    allowed = {"__future__", "os", "sys", "concurrent", "contextlib", "pathlib", "typing", "numpy", "torch",
               "torchvision", "PIL", "matplotlib"}
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            roots = {alias.name.split(".")[0] for alias in node.names}
        elif isinstance(node, ast.ImportFrom):
            roots = {(node.module or "").split(".")[0]}
            assert node.level == 0, "a relative import"
        else:
            continue
        assert roots <= allowed, roots
    assert len(source.splitlines()) <= 750


def test_read_voc_images_and_voc_label_indices_as_the_chapter_calls_them(tmp_path):
    voc_dir = make_voc_tree(tmp_path, TINY_TRAIN_SIZES, TINY_VAL_SIZES, label_mode="RGB")
    train_features, train_labels = sd.read_voc_images(voc_dir, True)
    internal = data.read_split(voc_dir, "train", sd.VOC_COLORMAP)
    assert len(train_features) == len(train_labels) == len(TINY_TRAIN_SIZES)
    for k, (feature, label) in enumerate(zip(train_features, train_labels)):
        assert feature.shape == label.shape == (3, *TINY_TRAIN_SIZES[k]) and label.dtype == torch.uint8
        y = sd.voc_label_indices(label, sd.voc_colormap2label())
        assert torch.equal(y, internal.labels[k]) and torch.equal(feature, internal.images[k])
    val_features, _ = sd.read_voc_images(voc_dir, False)
    assert len(val_features) == len(TINY_VAL_SIZES)


def test_voc_rand_crop_cuts_the_same_window_of_feature_and_rgb_label(tmp_path):
    voc_dir = make_voc_tree(tmp_path, TINY_TRAIN_SIZES, TINY_VAL_SIZES)
    features, labels = sd.read_voc_images(voc_dir, True)
    internal = data.read_split(voc_dir, "train", sd.VOC_COLORMAP, crop_size=(16, 24))
    table = sd.voc_colormap2label()
    for k in range(len(features)):
        g = torch.Generator().manual_seed(k)
        feature, label = sd.voc_rand_crop(features[k], labels[k], 16, 24, generator=g)
        assert feature.shape == label.shape == (3, 16, 24)
        top, left = sd.rand_crop_window(features[k].shape[-2:], (16, 24), torch.Generator().manual_seed(k))
        image_crop, label_crop = internal[(k, top, left)]
        assert torch.equal(feature, image_crop)
        assert torch.equal(sd.voc_label_indices(label, table), label_crop)
    torch.manual_seed(0)
    imgs = []
    for _ in range(3):   # the chapter's loop, on the global random generator
        imgs += sd.voc_rand_crop(features[0], labels[0], 20, 30)
    assert [tuple(img.shape) for img in imgs] == [(3, 20, 30)] * 6


def test_voc_seg_dataset_and_load_data_voc_as_the_chapter_builds_them(tmp_path):
    voc_dir = make_voc_tree(tmp_path, TINY_TRAIN_SIZES, TINY_VAL_SIZES)
    crop_size = (32, 32)
    voc_train, voc_test = sd.VOCSegDataset(True, crop_size, voc_dir), sd.VOCSegDataset(False, crop_size, voc_dir)
    internal = data.read_split(voc_dir, "train", sd.VOC_COLORMAP, crop_size=crop_size)
    assert len(voc_train) == 6 and len(voc_test) == 3   # small images padded, not dropped
    assert all(torch.equal(a, b) for a, b in zip(voc_train.labels, internal.labels))
    train_iter = torch.utils.data.DataLoader(voc_train, 4, shuffle=True, drop_last=True)
    X, Y = next(iter(train_iter))
    assert X.shape == (4, 3, 32, 32) and Y.shape == (4, 32, 32)
    # load_data_voc's batches are the ones the training run cuts with the same seed.
    train_iter, val_set = sd.load_data_voc(2, crop_size, voc_dir, seed=3)
    sampler = sd.RandomCropBatchSampler(internal, 2, seed=3)
    for (X, Y), keys in zip(train_iter, sampler):
        expected = torch.utils.data.default_collate([internal[key] for key in keys])
        assert torch.equal(X, expected[0]) and torch.equal(Y, expected[1])
    assert len(val_set) == 3 and [tuple(x.shape[1:]) for x in val_set.images] == TINY_VAL_SIZES


def test_fcn_is_the_books_and_the_speed_code_keeps_its_weights():
    torch.manual_seed(0)
    net = sd.FCN(num_classes=5, pretrained="none").eval()
    assert type(net.transpose_conv) is nn.ConvTranspose2d   # plain, as the book builds it
    x = sd.normalize_images(torch.randint(0, 256, (1, 3, 64, 96), dtype=torch.uint8))
    with torch.no_grad():
        before = net(x)
        state = {k: v.clone() for k, v in net.state_dict().items()}
        speed.use_cpu_kernels(net)
        assert type(net.transpose_conv) is speed.CPUFloat32ConvTranspose2d
        assert torch.equal(net(x), before)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            assert net.transpose_conv(before.bfloat16()).dtype == torch.float32   # kept in fp32 under autocast
    assert state.keys() == net.state_dict().keys()


def test_predict_and_label2image_as_the_chapter_calls_them():
    torch.manual_seed(0)
    net = sd.FCN(num_classes=21, pretrained="none").eval()
    X = torch.randint(0, 256, (3, 64, 96), dtype=torch.uint8)
    pred = sd.predict(X, net)
    assert pred.shape == (64, 96)
    ((_, expected),) = list(sd.predict_full_res(net, [X], torch.device("cpu")))
    assert torch.equal(pred, expected)
    image = sd.label2image(pred)
    assert image.shape == (64, 96, 3) and image.dtype == torch.uint8
    assert torch.equal(image[0, 0], torch.tensor(sd.VOC_COLORMAP[int(pred[0, 0])], dtype=torch.uint8))


def test_the_unets_cpu_upsampling_gives_the_same_gradients():
    torch.manual_seed(0)
    plain = sd.ResNetUNet(num_classes=3, pretrained="none")
    fast = speed.use_cpu_kernels(copy.deepcopy(plain))
    assert type(fast.upsample) is speed.ChannelsLastGradUpsample and type(plain.upsample) is nn.Upsample
    x = torch.randn(2, 3, 64, 64).contiguous(memory_format=torch.channels_last)
    grads = []
    for net in (plain, fast):
        net = net.to(memory_format=torch.channels_last)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            net(x).float().square().mean().backward()
        grads.append([p.grad for p in net.parameters()])
    assert all(torch.equal(a, b) for a, b in zip(*grads))   # only the gradient's memory layout changed
    assert plain.state_dict().keys() == fast.state_dict().keys()
