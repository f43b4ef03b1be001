"""The original repository's .pth files: ``torch.save`` of a whole nn.DataParallel model (or its state_dict), opened
without running their pickle, recognised by their weights and rebuilt as this project's network."""
from __future__ import annotations

import os
from pathlib import Path

import torch
from torch import nn

from some_define import UsageError, VOC_CLASSES, build_model

from .distributed import env_rank

# The classes a pickle of the original repository's U-Net or FCN names, and no others.
ORIGINAL_CLASSES = (
    "some_define.ResNetUNet", "torch.nn.parallel.data_parallel.DataParallel",
    "torchvision.models.resnet.ResNet", "torchvision.models.resnet.BasicBlock",
    "torch.nn.modules.container.Sequential", "torch.nn.modules.conv.Conv2d", "torch.nn.modules.conv.ConvTranspose2d",
    "torch.nn.modules.batchnorm.BatchNorm2d", "torch.nn.modules.activation.ReLU",
    "torch.nn.modules.pooling.MaxPool2d", "torch.nn.modules.pooling.AdaptiveAvgPool2d",
    "torch.nn.modules.linear.Linear", "torch.nn.modules.upsampling.Upsample")

# This project's network for each original one: the key of its classifier (whose first dimension is the number of
# classes) and its name.
ORIGINAL_NETWORKS = {"unet": ("conv_last.weight", "U-Net"), "fcn": ("final_conv.weight", "FCN")}

MAX_DEPTH = 16   # the original models nest 5 deep; a deeper (or cyclic) tree is not one of them


class PickledLayer:
    """An inert stand-in for one pickled layer: torch's safe unpickler creates it with ``__new__`` and hands it the
    layer's saved ``__dict__`` (parameters, buffers, sub-layers, plain settings); none of the layer's code runs."""
    pickled_as = ""

    def __setstate__(self, state) -> None:
        self.state = state


# One stand-in class per name, registered under that name, so torch resolves the file's globals to these without
# importing anything (the file's some_define is not this project's).
STAND_INS = [(type(name.rsplit(".", 1)[1], (PickledLayer,), {"pickled_as": name}), name) for name in ORIGINAL_CLASSES]


def open_pickled_model(path: Path) -> object:
    """What a whole-model pickle holds, its layers as PickledLayer stand-ins; a global outside ORIGINAL_CLASSES and
    torch's tensor rebuilders refuses the file before anything is unpickled."""
    if torch.torch_version.TorchVersion(torch.__version__) < (2, 6):
        raise UsageError(f"{path}: a whole pickled model; reading it safely needs PyTorch 2.6 or newer "
                         f"(pip install -U torch)")
    with torch.serialization.safe_globals(STAND_INS):
        try:
            unknown = sorted(torch.serialization.get_unsafe_globals_in_checkpoint(path))
        except Exception:   # not torch's zip format (or unreadable): torch.load below says what it refuses
            unknown = []
        if unknown:
            which = "which is" if len(unknown) == 1 else "which are"
            raise UsageError(f"{path}: refused: it names {', '.join(unknown)}, {which} not a tensor, a plain value "
                             f"or a layer of the original repository's models; nothing from the file was run")
        try:
            return torch.load(path, map_location="cpu", weights_only=True)
        except Exception as e:
            reason = (str(e).split("WeightsUnpickler error: ", 1)[-1].strip().splitlines() or [type(e).__name__])[0]
            raise UsageError(f"{path}: refused: torch's safe loader cannot read it ({reason}); nothing from the "
                             f"file was run")


def layer_tensors(layer: PickledLayer, prefix: str = "", depth: int = 0) -> dict[str, torch.Tensor]:
    """The state_dict a stand-in's layer would have: its parameters and persistent buffers, then its sub-layers'."""
    state = getattr(layer, "state", None)
    if depth > MAX_DEPTH or not isinstance(state, dict):
        raise ValueError(f"{prefix or 'the model'} is not a layer")
    non_persistent = state.get("_non_persistent_buffers_set") or set()
    tensors = {}
    for group in ("_parameters", "_buffers"):
        for name, value in (state.get(group) or {}).items():
            if value is None or (group == "_buffers" and name in non_persistent):
                continue
            if not isinstance(value, torch.Tensor):
                raise ValueError(f"{prefix}{name} is not a tensor")
            tensors[prefix + name] = value.detach()
    for name, child in (state.get("_modules") or {}).items():
        if child is not None:
            if not isinstance(child, PickledLayer):
                raise ValueError(f"{prefix}{name} is not a layer")
            tensors.update(layer_tensors(child, f"{prefix}{name}.", depth + 1))
    return tensors


def held_tensors(held: object, path: str | os.PathLike) -> tuple[dict[str, torch.Tensor], str] | None:
    """The named tensors of a pickled model or of a state_dict, and which of the two it was; None for anything
    else (this project's checkpoints included)."""
    if isinstance(held, PickledLayer):
        what = "nn.DataParallel" if held.pickled_as.endswith(".DataParallel") else held.pickled_as.rsplit(".")[-1]
        try:
            return layer_tensors(held), f"a pickled {what}"
        except (ValueError, TypeError, AttributeError) as e:   # its layers' state is not what nn.Module saves
            raise UsageError(f"{path}: not a model of the original repository ({e})")
    if isinstance(held, dict) and held and all(isinstance(k, str) and isinstance(v, torch.Tensor)
                                               for k, v in held.items()):
        return dict(held), "a state_dict"
    return None


def project_keys(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The original's keys as this project's: without DataParallel's ``module.``, and without the U-Net's
    ``base_model.*`` (the whole ResNet-18 it keeps, whose tensors its layer0..layer4 share, plus its unused fc)."""
    keys = {k.removeprefix("module."): v for k, v in tensors.items()}
    return {k: v for k, v in keys.items() if not k.startswith("base_model.")}


def weights_difference(expected: dict[str, torch.Tensor], got: dict[str, torch.Tensor]) -> str | None:
    """The first way ``got`` does not fit ``expected`` (a missing key, an extra key, a shape), or None."""
    for key in expected:
        if key not in got:
            return f"no {key}"
        if got[key].shape != expected[key].shape:
            return f"{key} is {tuple(got[key].shape)}, not {tuple(expected[key].shape)}"
    extra = next((k for k in got if k not in expected), None)
    return f"an extra {extra}" if extra else None


def original_network(held: object, path: str | os.PathLike) -> tuple[str, nn.Module, str] | None:
    """This project's network with the weights of an original U-Net or FCN (recognised by key names and shapes),
    its model name and what the file was; None if ``held`` is not such a model."""
    found = held_tensors(held, path)
    if found is None:
        return None
    tensors, what = project_keys(found[0]), found[1]
    for model, (classifier, network) in ORIGINAL_NETWORKS.items():
        if classifier not in tensors or tensors[classifier].dim() != 4:
            continue
        num_classes = tensors[classifier].shape[0]
        net = build_model(model, num_classes, "none")
        difference = weights_difference(net.state_dict(), tensors)
        if difference:
            raise UsageError(f"{path}: has the {classifier} of the original repository's {network}, but its "
                             f"weights do not fit that network ({difference})")
        if num_classes != len(VOC_CLASSES):
            raise UsageError(f"{path}: the original repository's {network} with {num_classes} classes; that "
                             f"repository trains VOC's {len(VOC_CLASSES)}, the only classes whose names and "
                             f"colours are known here (the file holds none)")
        net.load_state_dict(tensors)
        return model, net, f"the original repository's {network} ({what}), {num_classes} VOC classes"
    return None


def original_config(model: str) -> dict:
    """The config of a converted original model: where it came from, and the data the original trained on."""
    return {"model": model, "source": f"the original repository's {ORIGINAL_NETWORKS[model][1]}",
            "data_dir": "VOC2012", "val_split": "val", "demo": False, "classes": None, "ignore_index": None}


SAID: set[tuple[Path, float]] = set()   # a fine-tune opens its file twice (data flags, then weights)


def say_once(path: Path, line: str) -> None:
    """Print how a file was read, once per file and process (under torchrun, on rank 0 only)."""
    seen = (path.resolve(), path.stat().st_mtime)
    if seen not in SAID and env_rank() == 0:
        print(line)
    SAID.add(seen)
