"""Checkpoints: a state_dict plus plain config, class names and colours, loadable with weights_only=True."""
from __future__ import annotations

import os
import random
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
from torch import nn

from some_define import VOC_CLASSES, VOC_COLORMAP, UsageError, build_model

from .config import stored_config
from .files import atomic_write
from .original import open_pickled_model, original_config, original_network, say_once
from .speed import use_cpu_kernels


def unwrap(net: nn.Module) -> nn.Module:
    """The plain module under DataParallel / DistributedDataParallel / torch.compile wrappers."""
    while True:
        if isinstance(net, (nn.DataParallel, nn.parallel.DistributedDataParallel)):
            net = net.module
        elif hasattr(net, "_orig_mod"):
            net = net._orig_mod
        else:
            return net


def make_checkpoint(net: nn.Module, model_name: str, class_names: Sequence[str], colormap: Sequence[Sequence[int]],
                    config: dict, **extra) -> dict:
    """The weights and what names them, plus ``extra`` (optimizer, scaler and random state of a resumable one), all
    with CPU tensors only: a checkpoint written on a GPU opens with weights_only=True on a machine without one."""
    return on_cpu({"model": model_name, "num_classes": len(class_names), "class_names": list(class_names),
                   "colormap": [list(c) for c in colormap], "config": config,
                   "state_dict": unwrap(net).state_dict(), **extra})


def on_cpu(value: Any) -> Any:
    """``value`` with every tensor in it (in dicts, lists and tuples, at any depth) on the CPU. Resuming needs no
    move back: Optimizer.load_state_dict casts its state to the device of the parameters."""
    if isinstance(value, torch.Tensor):
        return value.cpu()
    if isinstance(value, dict):
        copy = type(value)((key, on_cpu(item)) for key, item in value.items())
        if hasattr(value, "_metadata"):   # a state_dict's layer versions, which load_state_dict reads
            copy._metadata = value._metadata
        return copy
    if isinstance(value, (list, tuple)):
        return type(value)(on_cpu(item) for item in value)
    return value


# What only resuming reads (training.checkpoint writes them into last.pt while a run goes on).
RESUME_KEYS = ("step", "partial", "last_epoch", "optimizer", "scaler", "rng")


def half_weights(checkpoint: dict) -> dict:
    """The checkpoint with its floating-point weights stored as fp16 (half the file; load_state_dict casts them back
    into an fp32 network), without what resuming needs: the rounded weights are not the ones the run trained."""
    state = checkpoint["state_dict"]
    half = type(state)((key, value.half() if value.is_floating_point() else value) for key, value in state.items())
    if hasattr(state, "_metadata"):   # the layer versions load_state_dict reads
        half._metadata = state._metadata
    kept = {key: value for key, value in checkpoint.items() if key not in RESUME_KEYS}
    return dict(kept, state_dict=half)


def save_checkpoint(path: str | os.PathLike, checkpoint: dict) -> None:
    atomic_write(path, lambda tmp: torch.save(checkpoint, tmp))


def load_checkpoint(path: str | os.PathLike) -> dict:
    """A checkpoint file as a dict, opened with weights_only=True (a pickle of anything else is refused); a file of
    the original repository (a pickled model or a state_dict) comes back converted to this project's format."""
    path = Path(path)
    if not path.is_file():
        raise UsageError(f"{path}: checkpoint not found; train first or pass --checkpoint PATH")
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        if "Weights only load failed" not in str(e):
            raise UsageError(f"{path}: not a PyTorch checkpoint file (torch.load cannot read it); pass the best.pt "
                             f"or last.pt that a training run wrote")
        checkpoint = open_pickled_model(path)   # the original repository's whole models; anything else is refused
    if isinstance(checkpoint, dict) and "state_dict" in checkpoint and "model" in checkpoint:
        return dict(checkpoint, config=stored_config(checkpoint.get("config", {})))
    original = original_network(checkpoint, path)
    if original is None:
        raise UsageError(f"{path}: not a checkpoint of this project (no model name or state_dict)")
    model, net, read_as = original
    say_once(path, f"read {path}: {read_as}; no code in the file was run")
    return make_checkpoint(net, model, VOC_CLASSES, VOC_COLORMAP, original_config(model))


def resume_checkpoint_path(resume: str | None, out: Path) -> Path | None:
    """--resume alone means OUT/last.pt; --resume PATH names the file."""
    if not resume:
        return None
    path = out / "last.pt" if resume == "auto" else Path(resume)
    if not path.is_file():
        raise UsageError(f"--resume: {path} not found; nothing to resume (drop --resume to start afresh)")
    return path


def restore_model(checkpoint: dict, path: str | os.PathLike = "checkpoint") -> nn.Module:
    """The network a checkpoint names, with its weights (the FCN's transposed conv kept fp32 under CPU autocast)."""
    net = build_model(checkpoint["model"], checkpoint["num_classes"], pretrained="none")
    try:
        net.load_state_dict(checkpoint["state_dict"])
    except RuntimeError as e:
        raise UsageError(f"{path}: its weights do not fit a {checkpoint['model']} with {checkpoint['num_classes']} "
                         f"classes ({str(e).splitlines()[0]})")
    return use_cpu_kernels(net)


def check_checkpoint_matches(checkpoint: dict, model: str, class_names: Sequence[str], path) -> None:
    if checkpoint["model"] != model or checkpoint["num_classes"] != len(class_names):
        raise UsageError(f"{path}: it holds a {checkpoint['model']} with {checkpoint['num_classes']} classes, "
                         f"but this run asks for a {model} with {len(class_names)} classes")


def check_classes_match(class_names: Sequence[str], colormap: Sequence[Sequence[int]], checkpoint: dict,
                        classes_file: str) -> None:
    names, colors = checkpoint["class_names"], [list(c) for c in checkpoint["colormap"]]
    if len(class_names) != len(names):
        raise UsageError(f"--classes {classes_file}: {len(class_names)} classes, but the checkpoint was trained on "
                         f"{len(names)} ({', '.join(names)}); drop --classes to use the checkpoint's")
    for i, (given, color, name, trained) in enumerate(zip(class_names, colormap, names, colors)):
        if (given, list(color)) != (name, trained):
            raise UsageError(f"--classes {classes_file}: class {i} is {given!r} {list(color)}, but the checkpoint's "
                             f"is {name!r} {trained}; drop --classes to use the checkpoint's")


def rng_states() -> dict:
    return {"torch": torch.get_rng_state(), "numpy": torch.from_numpy(np.random.get_state()[1].astype(np.int64)),
            "python": torch.tensor(random.getstate()[1], dtype=torch.int64)}


def set_rng_states(states: dict) -> None:
    torch.set_rng_state(states["torch"])
    np.random.set_state(("MT19937", states["numpy"].numpy().astype(np.uint32), 624, 0, 0.0))
    random.setstate((3, tuple(int(v) for v in states["python"].tolist()), None))
