"""Models, the bilinear transposed convolution, loss, a training step, deterministic prediction, checkpoints."""
from __future__ import annotations

import argparse

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import some_define as sd
from support import checkpoints, steps


@pytest.fixture(scope="module")
def fcn5() -> sd.FCN:
    torch.manual_seed(0)
    return sd.FCN(num_classes=5, pretrained="none").eval()


# ---------------------------------------------------------------------------------------------------------------------
# Bilinear transposed convolution
# ---------------------------------------------------------------------------------------------------------------------

def test_bilinear_kernel_values():
    # kernel 4: factor 2, centre 1.5 -> 1-D weights (1 - |k - 1.5| / 2) = 0.25, 0.75, 0.75, 0.25
    w = sd.bilinear_kernel(3, 3, 4)
    assert w.shape == (3, 3, 4, 4)
    one_d = torch.tensor([0.25, 0.75, 0.75, 0.25])
    for c in range(3):
        assert torch.allclose(w[c, c], one_d[:, None] * one_d[None, :])
    off_diagonal = w.clone()
    off_diagonal[range(3), range(3)] = 0
    assert off_diagonal.abs().max() == 0
    # kernel 3 (odd): factor 2, centre 1 -> 0.5, 1, 0.5
    assert torch.allclose(sd.bilinear_kernel(1, 1, 3)[0, 0, 1], torch.tensor([0.5, 1.0, 0.5]))


@pytest.mark.parametrize("stride,kernel,padding,in_hw", [(2, 4, 1, (7, 9)), (32, 64, 16, (3, 5))])
def test_transposed_conv_with_bilinear_kernel_is_bilinear_upsampling(stride, kernel, padding, in_hw):
    torch.manual_seed(1)
    channels = 3
    x = torch.randn(2, channels, *in_hw)
    conv = nn.ConvTranspose2d(channels, channels, kernel_size=kernel, stride=stride, padding=padding, bias=False)
    conv.weight.data.copy_(sd.bilinear_kernel(channels, channels, kernel))
    with torch.no_grad():
        y = conv(x)
    expected = F.interpolate(x, scale_factor=stride, mode="bilinear", align_corners=False)
    assert y.shape == expected.shape == (2, channels, in_hw[0] * stride, in_hw[1] * stride)
    # Away from the borders (where interpolate clamps to the edge pixel) the two agree.
    p = padding
    assert torch.allclose(y[..., p:-p, p:-p], expected[..., p:-p, p:-p], atol=1e-5)


def test_fcn_transposed_conv_is_initialised_to_bilinear(fcn5):
    conv = fcn5.transpose_conv
    assert (conv.kernel_size, conv.stride, conv.padding) == ((64, 64), (32, 32), (16, 16))
    assert torch.equal(conv.weight.data, sd.bilinear_kernel(5, 5, 64))
    torch.manual_seed(2)
    x = torch.randn(1, 5, 3, 4)
    with torch.no_grad():
        y = conv(x) - conv.bias.view(1, -1, 1, 1)
    expected = F.interpolate(x, scale_factor=32, mode="bilinear", align_corners=False)
    assert y.shape == (1, 5, 96, 128)
    assert torch.allclose(y[..., 16:-16, 16:-16], expected[..., 16:-16, 16:-16], atol=1e-5)


# ---------------------------------------------------------------------------------------------------------------------
# Output shapes
# ---------------------------------------------------------------------------------------------------------------------

SIZES = [(64, 96), (65, 97), (100, 33)]


@pytest.mark.parametrize("name", ["fcn", "unet"])
def test_output_shape_equals_input_shape(name):
    torch.manual_seed(0)
    net = sd.build_model(name, 7, pretrained="none").eval()
    with torch.no_grad():
        for h, w in SIZES:
            assert net(torch.randn(2, 3, h, w)).shape == (2, 7, h, w)


def test_fcn_pads_bottom_right_and_crops_back(fcn5):
    torch.manual_seed(3)
    x = torch.randn(1, 3, 65, 97)
    with torch.no_grad():
        y = fcn5(x)
        padded = fcn5(F.pad(x, (0, 31, 0, 31)))        # 65 x 97 -> 96 x 128
    assert padded.shape == (1, 5, 96, 128)
    assert torch.allclose(y, padded[..., :65, :97], atol=1e-5)


def test_build_model_rejects_unknown_name():
    with pytest.raises(sd.UsageError, match="unknown model 'vgg'"):
        sd.build_model("vgg", 21)


# ---------------------------------------------------------------------------------------------------------------------
# Loss and targets
# ---------------------------------------------------------------------------------------------------------------------

def loss_inputs():
    torch.manual_seed(4)
    logits = torch.randn(3, 4, 5, 6)
    targets = torch.randint(0, 4, (3, 5, 6))
    targets[0, 0, :4] = sd.VOID
    targets[1, 2:, 3:] = sd.VOID
    return logits, targets


def test_sum_loss_is_per_image_mean_summed():
    logits, targets = loss_inputs()
    expected = sum(F.cross_entropy(logits[i:i + 1], targets[i:i + 1], ignore_index=255) for i in range(3))
    assert torch.allclose(sd.segmentation_loss(logits, targets, "sum"), expected, atol=1e-6)
    # By hand: -log softmax at the target, averaged over each image's labelled pixels.
    log_p = F.log_softmax(logits, dim=1)
    total = 0.0
    for i in range(3):
        values = [-log_p[i, targets[i, y, x], y, x] for y in range(5) for x in range(6) if targets[i, y, x] != 255]
        total += sum(values) / len(values)
    assert torch.allclose(sd.segmentation_loss(logits, targets, "sum"), torch.as_tensor(total), atol=1e-5)


def test_sum_loss_of_an_all_void_image_is_zero():
    logits, targets = loss_inputs()
    targets[2] = sd.VOID
    expected = sum(F.cross_entropy(logits[i:i + 1], targets[i:i + 1], ignore_index=255) for i in range(2))
    loss = sd.segmentation_loss(logits, targets, "sum")
    assert torch.isfinite(loss) and torch.allclose(loss, expected, atol=1e-6)


def test_mean_loss_is_mean_over_labelled_pixels():
    logits, targets = loss_inputs()
    log_p = F.log_softmax(logits, dim=1)
    values = [-log_p[i, targets[i, y, x], y, x]
              for i in range(3) for y in range(5) for x in range(6) if targets[i, y, x] != 255]
    assert len(values) == 3 * 30 - 4 - 9
    expected = sum(values) / len(values)
    assert torch.allclose(sd.segmentation_loss(logits, targets, "mean"), torch.as_tensor(expected), atol=1e-5)
    # Micro-batches with the batch's num_valid add up to the batch's mean.
    n = int((targets != 255).sum())
    parts = sd.segmentation_loss(logits[:1], targets[:1], "mean", n) + \
        sd.segmentation_loss(logits[1:], targets[1:], "mean", n)
    assert torch.allclose(parts, torch.as_tensor(expected), atol=1e-5)


def test_prepare_targets():
    labels = torch.tensor([[0, 3, 255], [20, 255, 1]], dtype=torch.uint8)
    background = sd.prepare_targets(labels, "background")
    ignore = sd.prepare_targets(labels, "ignore")
    assert background.dtype == ignore.dtype == torch.int64
    assert background.tolist() == [[0, 3, 0], [20, 0, 1]]
    assert ignore.tolist() == [[0, 3, 255], [20, 255, 1]]


# ---------------------------------------------------------------------------------------------------------------------
# Training step
# ---------------------------------------------------------------------------------------------------------------------

def tiny_batch():
    """Two 64 x 64 uint8 images: a red left half (class 1) and a blue right half (class 2), void in between."""
    images = torch.zeros(2, 3, 64, 64, dtype=torch.uint8)
    images[:, 0, :, :32] = 220
    images[:, 2, :, 32:] = 220
    images[1] = images[1].flip(-1)
    labels = torch.full((2, 64, 64), 2, dtype=torch.uint8)
    labels[0, :, :32] = 1
    labels[1, :, 32:] = 1
    labels[:, :, 31:33] = sd.VOID
    return images, labels


@pytest.mark.parametrize("reduction,optimizer,lr", [("sum", "sgd", 0.02), ("mean", "adam", 1e-3)])
def test_a_few_steps_lower_the_loss(reduction, optimizer, lr):
    torch.manual_seed(0)
    net = sd.FCN(num_classes=3, pretrained="none")
    opt = sd.make_optimizer(optimizer, net.parameters(), lr, 0.0)
    images, labels = tiny_batch()
    losses = []
    for _ in range(6):
        loss, correct, counted = sd.train_step(net, opt, images, labels, sd.SegmentationLoss(reduction, "ignore"))
        losses.append(loss)
        assert counted == 2 * 64 * 62 and 0 <= correct <= counted
    # The loss after the last update (train mode, as train_step computes it), per image for 'sum'.
    with torch.no_grad():
        final = float(sd.segmentation_loss(net(sd.normalize_images(images)), labels.long(), reduction))
    final /= len(images) if reduction == "sum" else 1
    assert losses[-1] < losses[0] and final < losses[0]
    assert min(losses) > 0


def test_accumulated_step_equals_full_batch_step():
    """accum_steps splits the batch; with BatchNorm frozen (eval) the gradients must add up to the full batch's."""
    images, labels = tiny_batch()
    images = torch.cat([images, images.flip(-2)])
    labels = torch.cat([labels, labels.flip(-2)])
    labels[3, :10] = sd.VOID         # micro-batches with different numbers of labelled pixels
    for reduction in ("sum", "mean"):
        grads, losses = [], []
        for accum in (1, 2):
            torch.manual_seed(0)
            net = sd.FCN(num_classes=3, pretrained="none").eval()
            opt = torch.optim.SGD(net.parameters(), lr=0.0)
            step = steps.make_step(sd.SegmentationLoss(reduction, "ignore"), sd.Speed(), None, accum)
            loss, _, _ = step(net, opt, images, labels)
            losses.append(loss)
            grads.append(net.final_conv.weight.grad.clone())
        assert losses[0] == pytest.approx(losses[1], rel=1e-5)
        assert torch.allclose(grads[0], grads[1], rtol=1e-4, atol=1e-6)


def test_make_optimizer():
    params = [nn.Parameter(torch.zeros(2))]
    sgd = sd.make_optimizer("sgd", params, 0.1, 0.01)
    assert isinstance(sgd, torch.optim.SGD) and sgd.defaults["momentum"] == 0 and sgd.defaults["weight_decay"] == 0.01
    assert isinstance(sd.make_optimizer("adam", params, 0.1, 0.0), torch.optim.Adam)
    with pytest.raises(sd.UsageError):
        sd.make_optimizer("rmsprop", params, 0.1, 0.0)


# ---------------------------------------------------------------------------------------------------------------------
# Deterministic validation
# ---------------------------------------------------------------------------------------------------------------------

def eval_images():
    """Four images, three of which pad to 96 x 128, one to 64 x 64; labels with void."""
    g = torch.Generator().manual_seed(5)
    sizes = [(65, 97), (96, 128), (64, 64), (70, 100)]
    images = [torch.randint(0, 256, (3, h, w), dtype=torch.uint8, generator=g) for h, w in sizes]
    labels = []
    for h, w in sizes:
        label = torch.randint(0, 5, (h, w), dtype=torch.uint8, generator=g)
        label[: h // 5] = sd.VOID
        labels.append(label)
    return images, labels


def test_predict_full_res_alone_equals_batched(fcn5):
    images, _ = eval_images()
    cpu = torch.device("cpu")
    batched = dict(sd.predict_full_res(fcn5, images, cpu, batch_size=8))
    assert sorted(batched) == [0, 1, 2, 3]
    for i, image in enumerate(images):
        ((j, alone),) = list(sd.predict_full_res(fcn5, [image], cpu, batch_size=8))
        assert j == 0
        assert alone.shape == image.shape[1:] == batched[i].shape
        assert torch.equal(alone, batched[i])
    # And the same as the network on the normalised image, without any batching.
    with torch.no_grad():
        direct = fcn5(sd.normalize_images(images[0][None])).argmax(1)[0]
    assert torch.equal(direct, batched[0])


def test_evaluate_is_deterministic(fcn5):
    images, labels = eval_images()
    cpu = torch.device("cpu")
    data = sd.SegDataset(images, labels, [str(i) for i in range(len(images))], (32, 32))
    first = sd.evaluate(fcn5, data, cpu, 5, batch_size=2)
    second = sd.evaluate(fcn5, data, cpu, 5, batch_size=8)
    assert torch.equal(first.confusion, second.confusion)
    assert first.void_pixels == second.void_pixels == sum(int((l == 255).sum()) for l in labels)
    assert first.void_as_background == second.void_as_background
    assert int(first.confusion.sum()) == sum(int((l != 255).sum()) for l in labels)
    # Equal to the metrics of the images predicted one at a time.
    manual = sd.SegMetrics(5)
    for image, label in zip(images, labels):
        ((_, pred),) = list(sd.predict_full_res(fcn5, [image], cpu))
        manual.update(pred, label)
    assert torch.equal(manual.confusion, first.confusion)
    assert first.compute(list("abcde")) == second.compute(list("abcde"))


# ---------------------------------------------------------------------------------------------------------------------
# Checkpoints
# ---------------------------------------------------------------------------------------------------------------------

def test_checkpoint_round_trip(tmp_path):
    torch.manual_seed(6)
    net = sd.FCN(num_classes=4, pretrained="none")
    # Make every tensor differ from a fresh model's: perturb weights and BatchNorm statistics.
    with torch.no_grad():
        for name, tensor in net.state_dict().items():
            if tensor.is_floating_point():
                tensor.add_(torch.rand_like(tensor) * 0.01)
            else:
                tensor.fill_(7)
    net.eval()
    config = {"crop": [64, 96], "lr": 0.001, "demo": True, "device": None, "out": str(tmp_path), "model": "fcn"}
    history = [{"epoch": 1, "train_loss": 1.5, "val_miou": 0.25}]
    names = sd.VOC_CLASSES[:4]
    checkpoint = checkpoints.make_checkpoint(net, "fcn", names, sd.VOC_COLORMAP[:4], config, epoch=1, history=history)
    path = tmp_path / "sub" / "c.pt"
    checkpoints.save_checkpoint(path, checkpoint)
    assert sorted(p.name for p in path.parent.iterdir()) == ["c.pt"]   # no temporary file left behind

    raw = torch.load(path, map_location="cpu", weights_only=True)   # plain types only
    assert raw["model"] == "fcn" and raw["num_classes"] == 4 and raw["class_names"] == names
    assert raw["colormap"] == sd.VOC_COLORMAP[:4] and raw["config"] == config
    assert raw["epoch"] == 1 and raw["history"] == history

    loaded = checkpoints.load_checkpoint(path)
    restored = checkpoints.restore_model(loaded, path).eval()
    fresh = sd.FCN(num_classes=4, pretrained="none").state_dict()
    expected = net.state_dict()
    got = restored.state_dict()
    assert list(got) == list(expected)
    for key in expected:
        assert torch.equal(got[key], expected[key]), key
        assert not torch.equal(fresh[key], expected[key]), key
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        assert torch.equal(restored(x), net(x))


def test_checkpoint_errors(tmp_path):
    with pytest.raises(sd.UsageError, match="checkpoint not found"):
        checkpoints.load_checkpoint(tmp_path / "missing.pt")
    # Not loadable with weights_only=True: refused, not executed.
    torch.save({"model": "fcn", "state_dict": {}, "extra": argparse.Namespace(a=1)}, tmp_path / "pickled.pt")
    with pytest.raises(sd.UsageError, match="refused"):
        checkpoints.load_checkpoint(tmp_path / "pickled.pt")
    torch.save({"weights": torch.zeros(1)}, tmp_path / "other.pt")
    with pytest.raises(sd.UsageError, match="no model name or state_dict"):
        checkpoints.load_checkpoint(tmp_path / "other.pt")
    net = sd.FCN(num_classes=4, pretrained="none")
    checkpoint = checkpoints.make_checkpoint(net, "fcn", sd.VOC_CLASSES[:5], sd.VOC_COLORMAP[:5], {})   # says 5 classes
    with pytest.raises(sd.UsageError, match="do not fit a fcn with 5 classes"):
        checkpoints.restore_model(checkpoint, "x.pt")
