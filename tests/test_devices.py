"""What other devices need, checked on the CPU: no float64 tensor in training, validation, the metrics or prediction
(Apple's MPS has no float64 and raises at the first op that makes one), and checkpoints of CPU tensors only (a
checkpoint written on a GPU opens with ``torch.load(path, weights_only=True)`` on a machine without one)."""
from __future__ import annotations

import types

import pytest
import torch
from torch._subclasses.fake_tensor import FakeTensorMode
from torch.utils._pytree import tree_leaves
from torch.utils._python_dispatch import TorchDispatchMode

import some_define as sd
from conftest import TINY_VAL_SIZES, make_voc_tree
from support import checkpoints, data, steps, tiles, training

CPU = torch.device("cpu")
NUM_CLASSES = 3


class NoFloat64(TorchDispatchMode):
    """Fails at any op that takes or makes a float64 tensor, as MPS does. The tests run on the CPU, so the CPU stands
    in for MPS here and a float64 tensor on the CPU fails too: the code keeps its host-side arithmetic (the metrics
    from the confusion matrix, the tiles' blending weights) in Python numbers, so this strict rule needs no list of
    allowed places, and a float64 tensor that later moves to the device cannot slip through. Python numbers that
    ``.tolist()`` or ``.item()`` return are not tensors, so they pass."""

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        result = func(*args, **(kwargs or {}))
        tensors = [t for t in tree_leaves((args, kwargs, result)) if isinstance(t, torch.Tensor)]
        if any(t.dtype == torch.float64 for t in tensors):
            raise AssertionError(f"{func} takes or makes a float64 tensor, which MPS does not have")
        return result


def tiny_fcn(num_classes: int = NUM_CLASSES) -> torch.nn.Module:
    torch.manual_seed(0)
    return sd.build_model("fcn", num_classes, "none")


def random_batch(n: int, hw: tuple[int, int], seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    images = torch.randint(0, 256, (n, 3, *hw), dtype=torch.uint8, generator=g)
    labels = torch.randint(0, NUM_CLASSES, (n, *hw), dtype=torch.uint8, generator=g)
    labels[:, :4] = sd.VOID
    return images, labels


# ---------------------------------------------------------------------------------------------------------------------
# No float64 tensor
# ---------------------------------------------------------------------------------------------------------------------

def test_the_mode_catches_a_float64_tensor():
    """The tests below have teeth: the mode fails on a float64 tensor made on the CPU, and lets float32 through."""
    with NoFloat64():
        torch.ones(2) * 3.0
        with pytest.raises(AssertionError, match="float64"):
            torch.zeros(2, dtype=torch.float64)
        with pytest.raises(AssertionError, match="float64"):
            torch.ones(2).double()


@pytest.mark.parametrize("reduction", ["sum", "mean"])
@pytest.mark.parametrize("accum_steps", [1, 2])
def test_a_training_step_makes_no_float64_tensor(accum_steps, reduction):
    """The book's train_step (accum_steps 1) and the accumulated step, with Adam's state and a 'mean' denominator;
    micro-batches of 2 images (training-mode BatchNorm needs more than one value per channel)."""
    net = tiny_fcn().train()
    optimizer = sd.make_optimizer("adam", net.parameters(), 1e-3, 0.0)
    step = steps.make_step(sd.SegmentationLoss(reduction, "ignore"), sd.Speed(), None, accum_steps)
    images, labels = random_batch(2 * accum_steps, (32, 32), seed=0)
    with NoFloat64():
        loss, correct, counted = step(net, optimizer, images, labels)
    assert counted == len(images) * 28 * 32 and 0 <= correct <= counted and loss > 0


def test_validation_and_its_metrics_make_no_float64_tensor(tmp_path):
    val = data.read_split(make_voc_tree(tmp_path, [], TINY_VAL_SIZES), "val", sd.VOC_COLORMAP)
    net = tiny_fcn(len(sd.VOC_CLASSES))
    with NoFloat64():
        metrics = sd.evaluate(net, val, CPU, len(sd.VOC_CLASSES), batch_size=2)
        metrics.reduce_from_all_processes(CPU)
        values = metrics.compute(sd.VOC_CLASSES)
    assert 0 <= values["miou"] <= 1 and 0 <= values["d2l_pixel_acc"] <= 1


def test_prediction_whole_and_tiled_makes_no_float64_tensor():
    net = tiny_fcn()
    image = torch.randint(0, 256, (3, 40, 70), dtype=torch.uint8, generator=torch.Generator().manual_seed(1))
    with NoFloat64():
        whole = sd.predict(image, net, CPU)
        tiled = tiles.predict_any_size(image, net, CPU, tile=(32, 32))
    assert whole.shape == tiled.shape == (40, 70)


# ---------------------------------------------------------------------------------------------------------------------
# Checkpoints hold CPU tensors only
# ---------------------------------------------------------------------------------------------------------------------

@pytest.fixture
def trained_on_fake_gpu():
    """A network and an Adam state on a CUDA device that is not there: FakeTensorMode's tensors carry a device and a
    shape but no data, so a GPU run's checkpoint can be built on this CPU-only machine (a 'meta' tensor could not
    be copied to the CPU at all). Adam's step runs on fake gradients, which fills its state as on a GPU. Returns the
    network, the optimizer and the mode (ops that move a tensor to the absent GPU run inside it)."""
    with FakeTensorMode() as mode, torch.device("cuda"):
        net = tiny_fcn()
        optimizer = torch.optim.Adam(net.parameters(), 1e-3)
        for p in net.parameters():
            p.grad = torch.ones_like(p)
        optimizer.step()
    assert next(net.parameters()).device.type == "cuda"
    assert any(t.device.type == "cuda" for t in tree_leaves(optimizer.state_dict()) if isinstance(t, torch.Tensor))
    return net, optimizer, mode


def tensor_devices(checkpoint: dict) -> set[str]:
    return {t.device.type for t in tree_leaves(checkpoint) if isinstance(t, torch.Tensor)}


def fake_run(net: torch.nn.Module, optimizer: torch.optim.Optimizer) -> types.SimpleNamespace:
    """The parts of a training Run that training.checkpoint reads."""
    config = types.SimpleNamespace(model="fcn", plain=lambda: {"model": "fcn"})
    parts = types.SimpleNamespace(net=net, optimizer=optimizer, scaler=torch.amp.GradScaler("cpu"), config=config,
                                  class_names=sd.VOC_CLASSES[:NUM_CLASSES], colormap=sd.VOC_COLORMAP[:NUM_CLASSES],
                                  class_weights=None)
    return types.SimpleNamespace(parts=parts, last_epoch=3, history=[], run_start=1)


def test_make_checkpoint_holds_cpu_tensors_only(trained_on_fake_gpu):
    net, optimizer, _ = trained_on_fake_gpu
    checkpoint = checkpoints.make_checkpoint(net, "fcn", sd.VOC_CLASSES[:NUM_CLASSES], sd.VOC_COLORMAP[:NUM_CLASSES],
                                             {}, optimizer=optimizer.state_dict())
    assert tensor_devices(checkpoint) == {"cpu"}
    # load_state_dict reads the BatchNorm layers' versions from the state_dict's metadata: the copy keeps them.
    assert checkpoint["state_dict"]._metadata == net.state_dict()._metadata


@pytest.mark.parametrize("resumable", [True, False])
def test_training_checkpoints_hold_cpu_tensors_only(trained_on_fake_gpu, resumable):
    """last.pt with optimizer, scaler and random state, and best.pt with weights only."""
    net, optimizer, _ = trained_on_fake_gpu
    checkpoint = training.checkpoint(fake_run(net, optimizer), 2, resumable)
    assert ("optimizer" in checkpoint) == resumable
    assert tensor_devices(checkpoint) == {"cpu"}


def test_resume_puts_the_optimizer_state_back_on_the_device(trained_on_fake_gpu):
    """Optimizer.load_state_dict moves a CPU checkpoint's state to its parameters' device (Adam's step count stays on
    the CPU, as Adam keeps it)."""
    net, optimizer, mode = trained_on_fake_gpu
    checkpoint = training.checkpoint(fake_run(net, optimizer), 2, True)
    assert tensor_devices(checkpoint["optimizer"]) == {"cpu"}
    resumed = torch.optim.Adam(net.parameters(), 1e-3)
    with mode:
        resumed.load_state_dict(checkpoint["optimizer"])
    state = resumed.state[next(net.parameters())]
    assert state["exp_avg"].device.type == state["exp_avg_sq"].device.type == "cuda"
    assert state["step"].device.type == "cpu"
