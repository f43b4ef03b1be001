"""--export-onnx: a checkpoint's network as an ONNX file (any batch and image size, classes and colours in its
metadata), checked against PyTorch with ONNX Runtime on the CPU before it is written."""
from __future__ import annotations

import contextlib
import io
import json
import os
from pathlib import Path
from types import ModuleType
from typing import TYPE_CHECKING, Callable, Sequence

import torch
from torch import nn

from some_define import IMAGENET_MEAN, IMAGENET_STD, UsageError, normalize_images, read_image

from .data import is_voc_dir, pair_list_files, voc_split_files
from .files import atomic_write

if TYPE_CHECKING:
    import onnx
    import onnxruntime

OPSET = 18
MIN_AGREEMENT = 0.999   # of pixels whose argmax class ONNX Runtime and PyTorch agree on, or the export fails
GENERATED_HW = [(256, 320), (200, 301)]   # sample sizes when no dataset is at hand: one not a multiple of 32
PADDING_NOTE = ("any H x W: the model pads the image to a multiple of 32 inside (zeros after normalisation, at the "
                "bottom and right) and crops its logits back to H x W")


def onnx_modules() -> tuple[ModuleType, ModuleType]:
    """onnx and onnxruntime (and onnxscript, which torch's exporter uses), or one line saying how to install them."""
    try:
        import onnx
        import onnxruntime
        import onnxscript  # noqa: F401  (torch.onnx.export imports it)
    except ImportError:
        raise UsageError("--export-onnx needs onnx, onnxscript and onnxruntime: pip install -r requirements-onnx.txt")
    if torch.torch_version.TorchVersion(torch.__version__) < (2, 6):
        raise UsageError("--export-onnx needs PyTorch 2.6 or newer (pip install -U torch)")
    return onnx, onnxruntime


def model_metadata(checkpoint: dict) -> dict[str, str]:
    """What a user of the file needs besides the graph: classes, colours, the input's normalisation, padding."""
    return {"model": checkpoint["model"], "class_names": json.dumps(checkpoint["class_names"]),
            "colormap": json.dumps([list(c) for c in checkpoint["colormap"]]),
            "input": "image: float32 N x 3 x H x W, RGB scaled to 0..1, then (x - mean) / std per channel",
            "mean": json.dumps(list(IMAGENET_MEAN)), "std": json.dumps(list(IMAGENET_STD)),
            "output": "logits: float32 N x C x H x W; argmax over C gives the class index of each pixel",
            "padding": PADDING_NOTE}


def onnx_model(net: nn.Module, checkpoint: dict) -> onnx.ModelProto:
    """The ONNX ModelProto of ``net`` (on the CPU, in eval mode): dynamic batch, height and width, opset 18."""
    dims = {0: torch.export.Dim("batch"), 2: torch.export.Dim("height"), 3: torch.export.Dim("width")}
    example = torch.zeros(1, 3, 64, 96)
    with contextlib.redirect_stdout(io.StringIO()):   # the exporter reports its steps; the scripts say one line
        program = torch.onnx.export(net, (example,), dynamo=True, verbose=False, opset_version=OPSET,
                                    input_names=["image"], output_names=["logits"], dynamic_shapes=(dims,))
    model = program.model_proto
    for axis, name in ((2, "height"), (3, "width")):   # the exporter writes the crop back as a formula of H, W
        model.graph.output[0].type.tensor_type.shape.dim[axis].dim_param = name
    model.doc_string = (f"{checkpoint['model']} for semantic segmentation, {checkpoint['num_classes']} classes "
                        f"(metadata: class_names, colormap, mean, std, padding)")
    del model.metadata_props[:]
    for key, value in model_metadata(checkpoint).items():
        model.metadata_props.add(key=key, value=value)
    return model


def sample_images(find_split: Callable[[], tuple[Path, str]], count: int = 4
                  ) -> tuple[list[torch.Tensor], str]:
    """The first ``count`` images of the checkpoint's split (``find_split``: its dataset folder and split name) when
    that is readable, else two generated ones (smooth random colours); and what they are, for the report."""
    try:
        folder, split = find_split()
        files = voc_split_files(folder, split) if is_voc_dir(folder) else pair_list_files(folder, split)
        return [read_image(image) for _, image, _ in files[:count]], f"images of the {split} split of {folder}"
    except UsageError:
        g = torch.Generator().manual_seed(0)
        coarse = [torch.rand(1, 3, h // 16, w // 16, generator=g) for h, w in GENERATED_HW]
        images = [torch.nn.functional.interpolate(c, size=hw, mode="bilinear")[0].mul(255).to(torch.uint8)
                  for c, hw in zip(coarse, GENERATED_HW)]
        return images, "generated images"


def compare_with_pytorch(session: onnxruntime.InferenceSession, net: nn.Module, images: Sequence[torch.Tensor]
                         ) -> tuple[float, float, int]:
    """Max |logit difference| and the share of pixels whose argmax agrees, ONNX Runtime against PyTorch (fp32,
    one image at a time, at its own size); and the pixels compared."""
    max_diff, agree, pixels = 0.0, 0, 0
    for image in images:
        x = normalize_images(image[None])
        with torch.no_grad():
            expected = net(x)
        got = torch.from_numpy(session.run(["logits"], {"image": x.numpy()})[0])
        max_diff = max(max_diff, float((got - expected).abs().max()))
        agree += int((got.argmax(1) == expected.argmax(1)).sum())
        pixels += expected[:, 0].numel()
    return max_diff, agree / pixels, pixels


def export_onnx(net: nn.Module, checkpoint: dict, path: str | os.PathLike, samples: tuple[list[torch.Tensor], str]
                ) -> None:
    """Write ``net`` (moved to the CPU, fp32) as ONNX at ``path`` once ONNX Runtime reproduces PyTorch's logits on
    the sample images; below MIN_AGREEMENT pixel agreement nothing is written."""
    onnx, onnxruntime = onnx_modules()
    net = net.float().cpu().eval()
    model = onnx_model(net, checkpoint)
    images, what = samples

    def write_checked(tmp: str) -> None:
        onnx.save(model, tmp)
        session = onnxruntime.InferenceSession(tmp, providers=["CPUExecutionProvider"])
        max_diff, agreement, pixels = compare_with_pytorch(session, net, images)
        sizes = ", ".join(sorted({f"{im.shape[1]}x{im.shape[2]}" for im in images}))
        print(f"ONNX Runtime (CPU) against PyTorch on {len(images)} {what} ({sizes}): max |logit difference| "
              f"{max_diff:.2e}, argmax agreement {100 * agreement:.3f} % of {pixels:,} pixels")
        if agreement < MIN_AGREEMENT:
            raise UsageError(f"--export-onnx {path}: ONNX Runtime agrees with PyTorch on only {100 * agreement:.3f} "
                             f"% of the pixels (at least {100 * MIN_AGREEMENT:g} % needed); nothing written")
    atomic_write(path, write_checked)
    print(f"wrote {path}: opset {OPSET}, input 'image' N x 3 x H x W (normalised), output 'logits' "
          f"N x {checkpoint['num_classes']} x H x W, any H x W (padded to a multiple of 32 inside)")
