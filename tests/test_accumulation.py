"""What --accum-steps gives in training mode, where it is used: one optimizer step on micro-batches whose losses add up
to the whole batch's. That is exact for a network without batch statistics; with BatchNorm in training mode each
micro-batch is normalised by its own statistics and updates the running statistics once, so the step is close to the
large batch's but not the same. (tests/test_speed.py checks the exact part with BatchNorm in eval mode.)"""
from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

import some_define as sd
from support import steps

NUM_CLASSES = 5
LR = 0.1


def random_batch(n: int, hw: tuple[int, int], seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Images and labels whose labelled pixels are spread unevenly over the micro-batches, so that a per-micro-batch
    normalisation of the 'mean' loss would show."""
    g = torch.Generator().manual_seed(seed)
    images = torch.randint(0, 256, (n, 3, *hw), dtype=torch.uint8, generator=g)
    labels = torch.randint(0, NUM_CLASSES, (n, *hw), dtype=torch.uint8, generator=g)
    labels[0, : hw[0] * 3 // 4] = sd.VOID
    return images, labels


def tiny_fcn() -> nn.Module:
    torch.manual_seed(0)
    return sd.build_model("fcn", NUM_CLASSES, "none")


def without_batchnorm(net: nn.Module) -> nn.Module:
    for name, child in net.named_children():
        setattr(net, name, nn.Identity()) if isinstance(child, nn.BatchNorm2d) else without_batchnorm(child)
    return net


def batchnorms(net: nn.Module) -> list[nn.BatchNorm2d]:
    return [m for m in net.modules() if isinstance(m, nn.BatchNorm2d)]


def trained_one_step(net: nn.Module, reduction: str, accum_steps: int) -> tuple[nn.Module, list[torch.Tensor]]:
    """A copy of ``net`` after one training-mode step of SGD on the batch of 4, in ``accum_steps`` micro-batches;
    and its gradients."""
    net = copy.deepcopy(net).train()
    optimizer = sd.make_optimizer("sgd", net.parameters(), LR, 0.0)
    step = steps.make_step(sd.SegmentationLoss(reduction, "ignore"), sd.Speed(), None, accum_steps)
    step(net, optimizer, *random_batch(4, (64, 64), seed=0))
    return net, [p.grad.clone() for p in net.parameters()]


def largest_relative_difference(a: list[torch.Tensor], b: list[torch.Tensor]) -> float:
    """Over the tensors: the largest difference, relative to the largest entry of its tensor in ``a``."""
    return max(float((x - y).abs().max()) / max(float(x.abs().max()), 1e-12) for x, y in zip(a, b))


@pytest.mark.parametrize("reduction", ["sum", "mean"])
def test_without_batchnorm_two_micro_batches_make_the_full_batch_step(reduction):
    """Exact (to fp32 rounding): the loss normalisation over the whole batch, the summed gradients and the single
    optimizer step."""
    net = without_batchnorm(tiny_fcn())
    assert not batchnorms(net)
    full, full_grads = trained_one_step(net, reduction, accum_steps=1)
    accum, accum_grads = trained_one_step(net, reduction, accum_steps=2)
    assert largest_relative_difference(full_grads, accum_grads) < 1e-4
    updates = lambda trained: [(after - before).detach() for after, before in zip(trained.parameters(),
                                                                                   net.parameters())]
    assert any(float(u.abs().max()) > 0 for u in updates(full))
    assert largest_relative_difference(updates(full), updates(accum)) < 1e-3   # the updates round at the weights' scale


@pytest.mark.parametrize("reduction", ["sum", "mean"])
def test_with_batchnorm_in_training_mode_the_gradients_differ(reduction):
    """Each micro-batch is normalised by its own mean and variance: other activations, other gradients, by far more
    than the rounding the test above allows."""
    net = tiny_fcn()
    _, full_grads = trained_one_step(net, reduction, accum_steps=1)
    _, accum_grads = trained_one_step(net, reduction, accum_steps=2)
    assert largest_relative_difference(full_grads, accum_grads) > 0.05


def test_with_batchnorm_the_running_statistics_differ():
    """Two micro-batches update the running statistics twice, each with its own batch's statistics: the first layer's
    running mean becomes m (1 - m) m1 + m m2 (m the momentum, m1 and m2 the micro-batches' channel means) instead of
    the full batch's m (m1 + m2) / 2."""
    net = tiny_fcn()
    full, _ = trained_one_step(net, "mean", accum_steps=1)
    accum, _ = trained_one_step(net, "mean", accum_steps=2)
    assert all(int(bn.num_batches_tracked) == 1 for bn in batchnorms(full))
    assert all(int(bn.num_batches_tracked) == 2 for bn in batchnorms(accum))

    images, _ = random_batch(4, (64, 64), seed=0)
    conv1, momentum = net[0], net[1].momentum   # the FCN's first layers: ResNet-18's conv1 and bn1
    with torch.no_grad():
        m1, m2 = (conv1(sd.normalize_images(half)).mean((0, 2, 3)) for half in images.chunk(2))
    torch.testing.assert_close(full[1].running_mean, momentum * (m1 + m2) / 2)
    torch.testing.assert_close(accum[1].running_mean, (1 - momentum) * momentum * m1 + momentum * m2)
    for a, b in zip(batchnorms(full), batchnorms(accum)):
        assert float((a.running_mean - b.running_mean).abs().max()) > 1e-3
        assert float((a.running_var - b.running_var).abs().max()) > 1e-3
