"""The book's pieces for "FCN vs U-Net", in the order of d2l's chapters, to read beside them.

d2l section                             here
Semantic Segmentation and the Dataset   VOC_CLASSES, VOC_COLORMAP, read_voc_images, voc_colormap2label,
                                        voc_label_indices, voc_rand_crop, VOCSegDataset, load_data_voc
Transposed Convolution                  bilinear_kernel
Fully Convolutional Networks            FCN, SegmentationLoss, train_step / train_epoch (the book's
                                        train_batch_ch13 / train_ch13), predict, label2image
then the project's own: ResNetUNet (a U-Net from the same ResNet-18), SegMetrics, evaluate, and the figures.

The machinery (data folders and downloads, demo data, speed flags, distributed, checkpoints, the command line, the
training run, prediction for the scripts) lives in support/. This file imports nothing from the project.
"""
from __future__ import annotations

import os
from contextlib import nullcontext
from pathlib import Path
from typing import Callable, Iterable, Iterator, NamedTuple, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageOps
from torch import nn


class UsageError(Exception):
    """A problem the user can fix (a file, a flag, a value): the scripts print it as one line and exit with 2."""


# ---------------------------------------------------------------------------------------------------------------------
# Semantic Segmentation and the Dataset: labels and colormap
# ---------------------------------------------------------------------------------------------------------------------

VOC_CLASSES = ['background', 'aeroplane', 'bicycle', 'bird', 'boat', 'bottle', 'bus', 'car', 'cat', 'chair', 'cow',
               'diningtable', 'dog', 'horse', 'motorbike', 'person', 'potted plant', 'sheep', 'sofa', 'train',
               'tv/monitor']

VOC_COLORMAP = [[0, 0, 0], [128, 0, 0], [0, 128, 0], [128, 128, 0], [0, 0, 128], [128, 0, 128], [0, 128, 128],
                [128, 128, 128], [64, 0, 0], [192, 0, 0], [64, 128, 0], [192, 128, 0], [64, 0, 128], [192, 0, 128],
                [64, 128, 128], [192, 128, 128], [0, 64, 0], [128, 64, 0], [0, 192, 0], [128, 192, 0], [0, 64, 128]]

VOID = 255                      # "difficult" or object-boundary pixels: no class
VOID_COLOR = (224, 224, 192)    # how VOC draws them


def voc_colormap2label(colormap: Sequence[Sequence[int]] = VOC_COLORMAP) -> torch.Tensor:
    """A lookup table from an RGB colour to its class index."""
    # Unlike the book: unknown colours (and VOC's boundary colour) map to VOID rather than 0, and the table is uint8
    # (16 MB) rather than int64 (128 MB).
    colormap2label = torch.full((256 ** 3,), VOID, dtype=torch.uint8)
    for i, colormap_ in enumerate(colormap):
        colormap2label[(colormap_[0] * 256 + colormap_[1]) * 256 + colormap_[2]] = i
    return colormap2label


def voc_label_indices(colormap: torch.Tensor, colormap2label: torch.Tensor) -> torch.Tensor:
    """Map an RGB label image (3 x H x W, as read_voc_images returns it) to class indices (H x W)."""
    colormap = colormap.long()
    idx = (colormap[0] * 256 + colormap[1]) * 256 + colormap[2]
    return colormap2label[idx]


def colormap_lut(colormap: Sequence[Sequence[int]]) -> torch.Tensor:
    """256 x 3 uint8 colours by label value: the classes' colours, then VOC's boundary colour for void and the rest."""
    lut = torch.tensor([*colormap] + [VOID_COLOR] * (256 - len(colormap)), dtype=torch.uint8)
    lut[VOID] = torch.tensor(VOID_COLOR, dtype=torch.uint8)
    return lut


def label2image(pred: torch.Tensor, colormap: Sequence[Sequence[int]] = VOC_COLORMAP) -> torch.Tensor:
    """Class indices (H x W) -> RGB image (H x W x 3, uint8); VOID is drawn in VOC's boundary colour."""
    return colormap_lut(colormap)[pred.long().cpu()]


# ---------------------------------------------------------------------------------------------------------------------
# Semantic Segmentation and the Dataset: reading the data
# ---------------------------------------------------------------------------------------------------------------------

def read_image(path: str | os.PathLike, upright: bool = False) -> torch.Tensor:
    """An image file as uint8 (3 x H x W); grayscale, RGBA, CMYK and 16-bit images become RGB. ``upright`` applies
    a phone photo's EXIF orientation, as viewers do (dataset labels follow the stored pixels)."""
    try:
        with Image.open(path) as im:
            im = ImageOps.exif_transpose(im) if upright else im
            if im.mode.startswith("I;16"):   # PIL would clip 16-bit values at 255; keep the top 8 bits instead
                gray = torch.from_numpy((np.array(im, dtype=np.uint16) >> 8).astype(np.uint8))
                return gray.expand(3, *gray.shape).contiguous()
            return torch.from_numpy(np.array(im.convert("RGB"))).permute(2, 0, 1).contiguous()
    except FileNotFoundError:
        raise UsageError(f"{path}: file not found")
    except (OSError, Image.DecompressionBombError) as e:
        raise UsageError(f"{path}: cannot read the image ({e})")


def read_label(path: str | os.PathLike, colormap2label: torch.Tensor, num_classes: int,
               ignore_index: int | None = None) -> torch.Tensor:
    """A label PNG as class indices (uint8, H x W, VOID = 255); ``ignore_index`` is void as well. Palette and
    grayscale PNGs already hold indices; RGB ones go through the colormap."""
    try:
        with Image.open(path) as im:
            if im.mode in ("P", "L") or im.mode.startswith("I"):   # indices, 8- or 16-bit
                label = torch.from_numpy(np.array(im).astype(np.int64))
            else:
                rgb = torch.from_numpy(np.array(im.convert("RGB"))).permute(2, 0, 1)
                label = voc_label_indices(rgb, colormap2label)
    except FileNotFoundError:
        raise UsageError(f"{path}: label file not found")
    except OSError as e:
        raise UsageError(f"{path}: cannot read the label ({e})")
    if ignore_index is not None:
        label = label.masked_fill(label == ignore_index, VOID)
    bad = (label >= num_classes) & (label != VOID)
    if bad.any():
        raise UsageError(f"{path}: label value {int(label[bad][0])} is not a class index (0..{num_classes - 1}) "
                         f"or void ({VOID})")
    return label.to(torch.uint8)


def voc_split_files(voc_dir: str | os.PathLike, split: str) -> list[tuple[str, Path, Path]]:
    """(name, image file, label file) of every example listed in ImageSets/Segmentation/SPLIT.txt."""
    voc_dir = Path(voc_dir)
    split_file = voc_dir / "ImageSets" / "Segmentation" / f"{split}.txt"
    if not split_file.is_file():
        raise UsageError(f"{split_file}: split file not found")
    names = split_file.read_text().split()
    if not names:
        raise UsageError(f"{split_file}: the split is empty")
    return [(n, voc_dir / "JPEGImages" / f"{n}.jpg", voc_dir / "SegmentationClass" / f"{n}.png") for n in names]


def read_voc_images(voc_dir: str | os.PathLike, is_train: bool = True, split: str | None = None
                    ) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """The book's reader: all images and RGB label images (both 3 x H x W uint8) of the train or val split."""
    files = voc_split_files(voc_dir, split or ("train" if is_train else "val"))
    return [read_image(image) for _, image, _ in files], [read_image(label) for _, _, label in files]


# ---------------------------------------------------------------------------------------------------------------------
# Semantic Segmentation and the Dataset: random crops and the dataset
# ---------------------------------------------------------------------------------------------------------------------

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
# Pad images with the mean colour: after normalisation it is zero, the same as the padding used at inference.
PAD_RGB = tuple(round(255 * m) for m in IMAGENET_MEAN)


def pad_to_at_least(image: torch.Tensor, label: torch.Tensor, height: int, width: int
                    ) -> tuple[torch.Tensor, torch.Tensor]:
    """Pad (bottom/right) an image smaller than the crop with the mean colour, its label with VOID."""
    # The book drops such images instead (350 of 1464 train and 371 of 1449 val images).
    h, w = label.shape[-2:]
    if h >= height and w >= width:
        return image, label
    H, W = max(h, height), max(w, width)
    padded_image = torch.tensor(PAD_RGB, dtype=image.dtype, device=image.device).view(3, 1, 1).repeat(1, H, W)
    padded_image[:, :h, :w] = image
    padded_label = torch.full((*label.shape[:-2], H, W), VOID, dtype=label.dtype, device=label.device)
    padded_label[..., :h, :w] = label
    return padded_image, padded_label


def rand_crop_window(image_hw: tuple[int, int], crop_hw: tuple[int, int],
                     generator: torch.Generator | None = None) -> tuple[int, int]:
    """Top-left corner of a random crop_hw window inside an image of image_hw (after padding)."""
    h, w = max(image_hw[0], crop_hw[0]), max(image_hw[1], crop_hw[1])
    top = int(torch.randint(0, h - crop_hw[0] + 1, (1,), generator=generator))
    left = int(torch.randint(0, w - crop_hw[1] + 1, (1,), generator=generator))
    return top, left


def crop_window(feature: torch.Tensor, label: torch.Tensor, top: int, left: int, height: int, width: int
                ) -> tuple[torch.Tensor, torch.Tensor]:
    """The same window of image and label (padded first if smaller)."""
    feature, label = pad_to_at_least(feature, label, height, width)
    return feature[:, top:top + height, left:left + width], label[..., top:top + height, left:left + width]


def voc_rand_crop(feature: torch.Tensor, label: torch.Tensor, height: int, width: int,
                  generator: torch.Generator | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Randomly crop both feature and label images."""
    return crop_window(feature, label, *rand_crop_window(feature.shape[-2:], (height, width), generator),
                       height, width)


def scaled_crop(feature: torch.Tensor, label: torch.Tensor, top: int, left: int, height: int, width: int,
                crop_hw: tuple[int, int], hflip: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """A window resized to crop_hw (image bilinear, label nearest) and mirrored left-right if ``hflip``."""
    feature, label = crop_window(feature, label, top, left, height, width)
    if (height, width) != tuple(crop_hw):
        resize = lambda x, mode, **kw: F.interpolate(x.float(), size=tuple(crop_hw), mode=mode, **kw)
        feature = resize(feature[None], "bilinear", antialias=True)[0].round_().clamp_(0, 255).to(torch.uint8)
        label = resize(label[None, None], "nearest-exact")[0, 0].to(torch.uint8)
    return (feature.flip(-1), label.flip(-1)) if hflip else (feature, label)


class SegDataset(torch.utils.data.Dataset):
    """A split held in memory as uint8 (the book: normalised float32, ~10x the memory; normalize_images runs per
    batch on the training device instead). Items are random crops; a key (index, top, left) from
    RandomCropBatchSampler names the window, so every data path (any DataLoader workers, or crops sliced on the GPU)
    cuts exactly the same crops; a key (index, top, left, height, width, hflip) names a scaled and mirrored one."""

    def __init__(self, images: list[torch.Tensor], labels: list[torch.Tensor], names: list[str],
                 crop_size: tuple[int, int]):
        self.images, self.labels, self.names = images, labels, names
        self.crop_size = tuple(crop_size)

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, key: int | tuple[int, ...]) -> tuple[torch.Tensor, torch.Tensor]:
        if isinstance(key, int):
            return voc_rand_crop(self.images[key], self.labels[key], *self.crop_size)
        i, *window = key
        if len(window) == 2:
            return crop_window(self.images[i], self.labels[i], *window, *self.crop_size)
        return scaled_crop(self.images[i], self.labels[i], *window[:4], self.crop_size, window[4])

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.images + self.labels)

    def shard(self, rank: int, world_size: int) -> "SegDataset":
        """Every world_size-th example from ``rank``: each process's share of a split."""
        return SegDataset(self.images[rank::world_size], self.labels[rank::world_size],
                          self.names[rank::world_size], self.crop_size)


class VOCSegDataset(SegDataset):
    """The book's VOC dataset, read by the book's reader from ``voc_dir`` (labels as indices; small images padded,
    not dropped). The scripts read datasets through support/data.py: in parallel, other layouts, --skip-bad."""

    def __init__(self, is_train: bool, crop_size: tuple[int, int], voc_dir: str | os.PathLike):
        features, labels = read_voc_images(voc_dir, is_train)
        colormap2label = voc_colormap2label()
        names = [name for name, _, _ in voc_split_files(voc_dir, "train" if is_train else "val")]
        super().__init__(features, [voc_label_indices(y, colormap2label) for y in labels], names, crop_size)


class RandomCropBatchSampler(torch.utils.data.Sampler):
    """Shuffled batches of (index, top, left) keys, the same for a given seed and epoch; drops the last partial batch
    as the book's DataLoader does. ``rank``/``world_size`` shard each batch for distributed training. With
    ``scales`` other than (1, 1) or ``hflip``, keys are (index, top, left, height, width, hflip): windows of a random
    scale, mirrored half of the time."""

    def __init__(self, dataset: SegDataset, batch_size: int, seed: int = 0, rank: int = 0, world_size: int = 1,
                 scales: tuple[float, float] = (1.0, 1.0), hflip: bool = False):
        self.sizes = [tuple(label.shape) for label in dataset.labels]
        self.crop_size, self.batch_size, self.seed = dataset.crop_size, batch_size, seed
        self.scales, self.hflip = tuple(scales), hflip
        self.rank, self.world_size = rank, world_size
        self.epoch = 0
        if len(self.sizes) < batch_size:
            raise UsageError(f"a batch of {batch_size} is larger than the training split ({len(self.sizes)} images)")

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self.sizes) // self.batch_size

    def __iter__(self) -> Iterator[list[tuple[int, int, int]]]:
        g = torch.Generator().manual_seed(self.seed * 100_003 + self.epoch)
        order = torch.randperm(len(self.sizes), generator=g).tolist()
        for b in range(len(self)):
            batch = [self.window(i, g) for i in order[b * self.batch_size:(b + 1) * self.batch_size]]
            per_rank = self.batch_size // self.world_size
            yield batch[self.rank * per_rank:(self.rank + 1) * per_rank]

    def window(self, i: int, g: torch.Generator) -> tuple[int, ...]:
        if self.scales == (1.0, 1.0) and not self.hflip:   # the book's crops (and the same random draws)
            return (i, *rand_crop_window(self.sizes[i], self.crop_size, g))
        # A window of crop_size / s, s uniform in scales (the book crops at the image's own scale), mirrored or not.
        s = self.scales[0] + (self.scales[1] - self.scales[0]) * float(torch.rand((), generator=g))
        window = round(self.crop_size[0] / s), round(self.crop_size[1] / s)
        flip = self.hflip and bool(torch.rand((), generator=g) < 0.5)
        return (i, *rand_crop_window(self.sizes[i], window, g), *window, flip)


def load_data_voc(batch_size: int, crop_size: tuple[int, int], voc_dir: str | os.PathLike = "VOC2012",
                  seed: int = 0, num_workers: int = 0) -> tuple[torch.utils.data.DataLoader, SegDataset]:
    """The training batches and the validation split of VOC."""
    # Unlike the book, validation is the whole val split at full resolution (the book scores random crops), so
    # the second value is the dataset itself, for evaluate().
    train_set = VOCSegDataset(True, crop_size, voc_dir)
    sampler = RandomCropBatchSampler(train_set, batch_size, seed)
    train_iter = torch.utils.data.DataLoader(train_set, batch_sampler=sampler, num_workers=num_workers)
    return train_iter, VOCSegDataset(False, crop_size, voc_dir)


def normalize_images(x: torch.Tensor) -> torch.Tensor:
    """uint8 N x 3 x H x W -> float, ImageNet mean/std, done per batch on the training device."""
    mean = torch.tensor([255 * m for m in IMAGENET_MEAN], device=x.device).view(1, 3, 1, 1)
    std = torch.tensor([255 * s for s in IMAGENET_STD], device=x.device).view(1, 3, 1, 1)
    return (x - mean).div_(std)   # uint8 - float gives a new float tensor in one pass; divide it in place


# ---------------------------------------------------------------------------------------------------------------------
# Transposed Convolution
# ---------------------------------------------------------------------------------------------------------------------

def bilinear_kernel(in_channels: int, out_channels: int, kernel_size: int) -> torch.Tensor:
    """The initial weight of a transposed convolution that performs bilinear upsampling."""
    factor = (kernel_size + 1) // 2
    if kernel_size % 2 == 1:
        center = factor - 1
    else:
        center = factor - 0.5
    og = (torch.arange(kernel_size).reshape(-1, 1), torch.arange(kernel_size).reshape(1, -1))
    filt = (1 - torch.abs(og[0] - center) / factor) * (1 - torch.abs(og[1] - center) / factor)
    weight = torch.zeros((in_channels, out_channels, kernel_size, kernel_size))
    weight[range(in_channels), range(out_channels), :, :] = filt
    return weight


# ---------------------------------------------------------------------------------------------------------------------
# Fully Convolutional Networks: the model
# ---------------------------------------------------------------------------------------------------------------------

RESNET18_FILE = "resnet18-f37072fd.pth"   # torchvision's ResNet18_Weights.IMAGENET1K_V1


def resnet18_backbone(pretrained: str = "imagenet") -> nn.Module:
    """torchvision's ResNet-18: 'none' (random init), 'imagenet' (a local resnet18-f37072fd.pth if present, else
    torchvision's download into the torch hub cache), or a path to a ResNet-18 state_dict file."""
    import torchvision   # here, not at the top: its import takes seconds, and messages and --help need none of it
    net = torchvision.models.resnet18()
    if pretrained == "none":
        return net
    if pretrained == "imagenet" and not Path(RESNET18_FILE).is_file():
        weights = torchvision.models.ResNet18_Weights.IMAGENET1K_V1
        try:
            net.load_state_dict(weights.get_state_dict(progress=True))
        except Exception as e:  # network down, proxy, read-only cache, ...
            raise UsageError(f"could not download the ImageNet ResNet-18 weights ({type(e).__name__}); download "
                             f"{weights.url} by hand and put {RESNET18_FILE} in the current folder")
        return net
    path = Path(RESNET18_FILE if pretrained == "imagenet" else pretrained)
    if not path.is_file():
        raise UsageError(f"{pretrained}: no such file; a path to {RESNET18_FILE} is expected")
    try:
        net.load_state_dict(torch.load(path, map_location="cpu", weights_only=True))
    except Exception as e:
        first = str(e).splitlines()[0] if str(e) else ""
        raise UsageError(f"{pretrained}: not a ResNet-18 state_dict ({type(e).__name__}: {first})")
    return net


STRIDE = 32   # both networks downsample by 32: inputs are padded to multiples of it


def pad_to_multiple(x: torch.Tensor, multiple: int = STRIDE) -> torch.Tensor:
    """Zero-pad (bottom/right) a normalised batch so that H and W are multiples of ``multiple``."""
    h, w = x.shape[-2:]
    return F.pad(x, (0, -w % multiple, 0, -h % multiple))


class FCN(nn.Sequential):
    """The book's FCN: ResNet-18 without its pooling and fully connected layer, a 1x1 conv to the classes, and a
    transposed conv (kernel 64, stride 32, padding 16) initialised to bilinear upsampling."""

    def __init__(self, num_classes: int = len(VOC_CLASSES), pretrained: str = "imagenet"):
        pretrained_net = resnet18_backbone(pretrained)
        super().__init__(*list(pretrained_net.children())[:-2])
        self.add_module('final_conv', nn.Conv2d(512, num_classes, kernel_size=1))
        self.add_module('transpose_conv', nn.ConvTranspose2d(num_classes, num_classes,
                                                             kernel_size=64, padding=16, stride=32))
        nn.init.xavier_normal_(self.final_conv.weight)   # as the original repository does
        self.transpose_conv.weight.data.copy_(bilinear_kernel(num_classes, num_classes, 64))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Unlike the book, any input size works: padded to a multiple of 32, the output cropped back.
        h, w = x.shape[-2:]
        return super().forward(pad_to_multiple(x))[..., :h, :w]


# ---------------------------------------------------------------------------------------------------------------------
# The U-Net from the same ResNet-18
# ---------------------------------------------------------------------------------------------------------------------

def convrelu(in_channels: int, out_channels: int, kernel: int, padding: int) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(in_channels, out_channels, kernel, padding=padding), nn.ReLU(inplace=True))


class ResNetUNet(nn.Module):
    """A U-Net whose encoder is the five stages of ResNet-18 (strides 2..32), with a 1x1 conv + ReLU on every skip,
    a decoder of (upsample x2, concatenate, 3x3 conv) steps, and a full-resolution branch on the input image."""

    def __init__(self, num_classes: int = len(VOC_CLASSES), pretrained: str = "imagenet"):
        super().__init__()
        base = list(resnet18_backbone(pretrained).children())
        self.layer0 = nn.Sequential(*base[:3])        # conv1 + bn1 + relu: stride 2, 64 channels
        self.layer1 = nn.Sequential(*base[3:5])       # maxpool + layer1:    stride 4, 64
        self.layer2, self.layer3, self.layer4 = base[5], base[6], base[7]   # strides 8, 16, 32: 128, 256, 512
        self.layer0_1x1 = convrelu(64, 64, 1, 0)
        self.layer1_1x1 = convrelu(64, 64, 1, 0)
        self.layer2_1x1 = convrelu(128, 128, 1, 0)
        self.layer3_1x1 = convrelu(256, 256, 1, 0)
        self.layer4_1x1 = convrelu(512, 512, 1, 0)
        self.upsample = nn.Upsample(scale_factor=2, mode='bilinear', align_corners=True)
        # The decoder's channel table: (coming up + skip) in, out.
        self.conv_up3 = convrelu(512 + 256, 512, 3, 1)
        self.conv_up2 = convrelu(512 + 128, 256, 3, 1)
        self.conv_up1 = convrelu(256 + 64, 256, 3, 1)
        self.conv_up0 = convrelu(256 + 64, 128, 3, 1)
        self.conv_original_size0 = convrelu(3, 64, 3, 1)
        self.conv_original_size1 = convrelu(64, 64, 3, 1)
        self.conv_original_size2 = convrelu(128 + 64, 64, 3, 1)
        self.conv_last = nn.Conv2d(64, num_classes, 1)

    def up_and_merge(self, x: torch.Tensor, skip: torch.Tensor, conv: nn.Module) -> torch.Tensor:
        return conv(torch.cat([self.upsample(x), skip], dim=1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h, w = x.shape[-2:]
        x = pad_to_multiple(x)
        x_original = self.conv_original_size1(self.conv_original_size0(x))
        layer0 = self.layer0(x)
        layer1 = self.layer1(layer0)
        layer2 = self.layer2(layer1)
        layer3 = self.layer3(layer2)
        layer4 = self.layer4(layer3)
        x = self.layer4_1x1(layer4)
        x = self.up_and_merge(x, self.layer3_1x1(layer3), self.conv_up3)
        x = self.up_and_merge(x, self.layer2_1x1(layer2), self.conv_up2)
        x = self.up_and_merge(x, self.layer1_1x1(layer1), self.conv_up1)
        x = self.up_and_merge(x, self.layer0_1x1(layer0), self.conv_up0)
        x = self.up_and_merge(x, x_original, self.conv_original_size2)
        return self.conv_last(x)[..., :h, :w]


MODELS = {"fcn": FCN, "unet": ResNetUNet}


def build_model(name: str, num_classes: int, pretrained: str = "none") -> nn.Module:
    if name not in MODELS:
        raise UsageError(f"unknown model {name!r}; choose one of {', '.join(MODELS)}")
    return MODELS[name](num_classes, pretrained)


# ---------------------------------------------------------------------------------------------------------------------
# Fully Convolutional Networks: loss
# ---------------------------------------------------------------------------------------------------------------------

def prepare_targets(labels: torch.Tensor, void: str) -> torch.Tensor:
    """uint8 labels -> int64 targets. 'background': the book trains void pixels as class 0; 'ignore': they stay
    VOID and cross_entropy skips them."""
    if void == "background":   # on the uint8 labels: a quarter of the bytes of the int64 ones
        labels = labels.masked_fill(labels == VOID, 0)
    return labels.long()


def segmentation_loss(logits: torch.Tensor, targets: torch.Tensor, reduction: str,
                      num_valid: int | torch.Tensor | None = None, weight: torch.Tensor | None = None) -> torch.Tensor:
    """'sum' is the book's loss: each image's mean pixel cross-entropy, summed over the batch (its
    ``l.sum().backward()``). 'mean' is the mean over all labelled pixels; ``num_valid`` (the labelled pixels of the
    whole optimizer batch) lets accumulated micro-batches add up to exactly that mean. With class ``weight``s each
    pixel counts its class's weight, in the loss and in the denominators (as PyTorch's weighted mean)."""
    pixel_loss = F.cross_entropy(logits.float(), targets, weight=weight, ignore_index=VOID, reduction="none")
    valid = pixel_weights(targets, weight)
    if reduction == "sum":
        per_image = pixel_loss.flatten(1).sum(1) / valid.flatten(1).sum(1).clamp(min=1e-12)
        return per_image.sum()
    num_valid = valid.sum() if num_valid is None else num_valid
    return pixel_loss.sum() / torch.as_tensor(num_valid).clamp(min=1e-12)


def pixel_weights(targets: torch.Tensor, weight: torch.Tensor | None = None) -> torch.Tensor:
    """How much each pixel counts: 1 (or its class's weight) if labelled, 0 if void."""
    valid = targets != VOID
    return valid.float() if weight is None else weight[targets.masked_fill(~valid, 0)] * valid


class SegmentationLoss:
    """The criterion, decided once: the void rule, the reduction and the class weights (torchvision's
    ``criterion(output, target)``, plus the denominator that accumulated micro-batches share)."""

    def __init__(self, reduction: str = "sum", void: str = "background", weight: torch.Tensor | None = None):
        self.reduction, self.void, self.weight = reduction, void, weight

    def targets(self, labels: torch.Tensor) -> torch.Tensor:
        return prepare_targets(labels, self.void)

    def denominator(self, targets: torch.Tensor) -> torch.Tensor | None:
        """What a 'mean' loss divides by: the (weighted) labelled pixels of ``targets``; None for 'sum'."""
        return pixel_weights(targets, self.weight).sum() if self.reduction == "mean" else None

    def __call__(self, logits: torch.Tensor, targets: torch.Tensor,
                 denominator: torch.Tensor | None = None) -> torch.Tensor:
        return segmentation_loss(logits, targets, self.reduction, denominator, self.weight)

    def per_image(self, loss: float, num_images: int) -> float:
        """The loss as the log shows it: per image for 'sum' (the book divides by the examples), as is for 'mean'."""
        return loss / num_images if self.reduction == "sum" else loss


# ---------------------------------------------------------------------------------------------------------------------
# Metrics
# ---------------------------------------------------------------------------------------------------------------------

def confusion_matrix(pred: torch.Tensor, target: torch.Tensor, num_classes: int) -> torch.Tensor:
    """Rows = ground truth, columns = prediction; VOID pixels are left out."""
    keep = target != VOID
    index = target[keep].long() * num_classes + pred[keep].long()
    return torch.bincount(index, minlength=num_classes ** 2).reshape(num_classes, num_classes).cpu()


class SegMetrics:
    """A confusion matrix, plus void pixels predicted as background for the book's pixel accuracy."""

    def __init__(self, num_classes: int):
        self.num_classes = num_classes
        self.confusion = torch.zeros(num_classes, num_classes, dtype=torch.int64)
        self.void_pixels = 0
        self.void_as_background = 0

    def update(self, pred: torch.Tensor, target: torch.Tensor) -> None:
        self.confusion += confusion_matrix(pred, target, self.num_classes)
        void = target == VOID
        self.void_pixels += int(void.sum())
        self.void_as_background += int((pred[void] == 0).sum())

    def reduce_from_all_processes(self, device: torch.device) -> None:
        """Sum the counts over the processes of a distributed run (exactly, as int64)."""
        import torch.distributed as dist
        if not (dist.is_available() and dist.is_initialized()):
            return
        counts = torch.cat([self.confusion.flatten(), torch.tensor([self.void_pixels, self.void_as_background])])
        counts = counts.to(device)
        dist.all_reduce(counts)
        counts = counts.cpu()
        self.confusion = counts[:-2].reshape(self.num_classes, self.num_classes)
        self.void_pixels, self.void_as_background = int(counts[-2]), int(counts[-1])

    def compute(self, class_names: Sequence[str]) -> dict:
        # In Python ints, exact at any count, and no float64 tensor: MPS has none (tests/test_devices.py forbids them).
        cm = self.confusion.tolist()
        tp = [cm[c][c] for c in range(self.num_classes)]
        gt, predicted = [sum(row) for row in cm], [sum(column) for column in zip(*cm)]
        union = [g + p - t for g, p, t in zip(gt, predicted, tp)]
        iou = [t / u if u > 0 else None for t, u in zip(tp, union)]
        present = [v for v in iou if v is not None]
        class_acc = [t / g for t, g in zip(tp, gt) if g > 0]
        total = sum(gt)
        metrics = {"pixel_acc": sum(tp) / total if total else 0.0,
                   "mean_class_acc": sum(class_acc) / len(class_acc) if class_acc else 0.0,
                   "miou": sum(present) / len(present) if present else 0.0,
                   "per_class_iou": dict(zip(class_names, iou)),
                   "confusion_matrix": cm}
        if class_names[0] == "background":   # the book's accuracy: void pixels labelled background, as it reads them
            metrics["d2l_pixel_acc"] = (sum(tp) + self.void_as_background) / (total + self.void_pixels) \
                if total + self.void_pixels else 0.0
        return metrics


# ---------------------------------------------------------------------------------------------------------------------
# Fully Convolutional Networks: training (the book's train_batch_ch13 and train_ch13)
# ---------------------------------------------------------------------------------------------------------------------

def make_optimizer(name: str, params: Iterable[nn.Parameter], lr: float, wd: float) -> torch.optim.Optimizer:
    if name == "sgd":   # the book: plain SGD, no momentum
        return torch.optim.SGD(params, lr=lr, weight_decay=wd)
    if name == "adam":
        return torch.optim.Adam(params, lr=lr, weight_decay=wd)
    raise UsageError(f"unknown optimizer {name!r}; choose sgd or adam")


class Speed(NamedTuple):
    """How batches run: the autocast dtype (None: fp32) and the memory format."""
    amp_dtype: torch.dtype | None = None
    channels_last: bool = False


def autocast(device: torch.device, amp_dtype: torch.dtype | None):
    return torch.autocast(device.type, dtype=amp_dtype) if amp_dtype is not None else nullcontext()


def to_device_batch(images: torch.Tensor, device: torch.device, channels_last: bool) -> torch.Tensor:
    x = normalize_images(images.to(device, non_blocking=True))
    return x.contiguous(memory_format=torch.channels_last) if channels_last else x


def forward_backward(net: nn.Module, images: torch.Tensor, targets: torch.Tensor, loss: Callable, speed: Speed,
                     scaler: torch.amp.GradScaler | None = None, denominator: torch.Tensor | None = None
                     ) -> tuple[torch.Tensor, torch.Tensor]:
    """The middle of a step: forward under autocast, the loss, backward (scaled for fp16). Returns (loss, logits)."""
    with autocast(targets.device, speed.amp_dtype):
        logits = net(to_device_batch(images, targets.device, speed.channels_last))
    l = loss(logits, targets, denominator)
    (scaler.scale(l) if scaler else l).backward()
    return l.detach(), logits


def step_totals(loss: torch.Tensor, logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """(loss, correct pixels, labelled pixels) as one float32 tensor on the device, read back once per step; the
    book's accuracy without void pixels."""
    # float32, which every device has (MPS has no float64): the loss is float32 already, and pixel counts are exact
    # up to 2**24 = 16.8 M, far more than a batch of 32 crops of 320 x 480 holds (4.9 M); above that they round by at
    # most 1 in 2**24, in the logged training accuracy only.
    valid = targets != VOID
    return torch.stack([loss.float(), ((logits.argmax(1) == targets) & valid).sum().float(), valid.sum().float()])


def optimizer_step(optimizer: torch.optim.Optimizer, scaler: torch.amp.GradScaler | None = None) -> None:
    if scaler:   # fp16: unscale, skip the step if a gradient overflowed, adapt the scale
        scaler.step(optimizer)
        scaler.update()
    else:
        optimizer.step()


def train_step(net: nn.Module, optimizer: torch.optim.Optimizer, images: torch.Tensor, labels: torch.Tensor,
               loss: SegmentationLoss, speed: Speed = Speed(), scaler: torch.amp.GradScaler | None = None
               ) -> tuple[float, int, int]:
    """The book's train_batch_ch13: move the batch, forward, loss, backward, step, count (train_epoch sets training
    mode). Returns (the loss as the log shows it, correct pixels, labelled pixels)."""
    device = next(net.parameters()).device
    targets = loss.targets(labels.to(device, non_blocking=True))
    optimizer.zero_grad(set_to_none=True)
    l, logits = forward_backward(net, images, targets, loss, speed, scaler)
    optimizer_step(optimizer, scaler)
    # One host sync per step: the loss and both counts come back together.
    l, correct, labelled = step_totals(l, logits, targets).tolist()
    return loss.per_image(l, len(images)), int(correct), int(labelled)


def train_epoch(net: nn.Module, optimizer: torch.optim.Optimizer, batches: Iterable, step: Callable = train_step,
                totals: dict | None = None, on_step: Callable[[dict, float], None] | None = None) -> dict:
    """The book's train_ch13, one epoch: ``step(net, optimizer, images, labels)`` over ``batches``; returns the
    totals (loss, correct and labelled pixels, images, steps), continuing ``totals`` if given. ``on_step(totals,
    loss)`` runs after every step (progress, stopping)."""
    totals = dict(totals or {"loss": 0.0, "correct": 0, "counted": 0, "seen": 0, "steps": 0})
    net.train()
    for images, labels in batches:
        loss, correct, counted = step(net, optimizer, images, labels)
        for key, value in (("loss", loss), ("correct", correct), ("counted", counted), ("seen", len(images)),
                           ("steps", 1)):
            totals[key] += value
        if on_step:
            on_step(totals, loss)
    return totals


# ---------------------------------------------------------------------------------------------------------------------
# Fully Convolutional Networks: prediction, and evaluation at full resolution
# ---------------------------------------------------------------------------------------------------------------------

def padded_size(image_hw: Sequence[int]) -> tuple[int, int]:
    """An image's size padded to multiples of 32, as the networks need."""
    return image_hw[0] + -image_hw[0] % STRIDE, image_hw[1] + -image_hw[1] % STRIDE


def padded_logits(net: nn.Module, images: Sequence[torch.Tensor], device: torch.device, speed: Speed = Speed(),
                  tta: bool = False) -> torch.Tensor:
    """Logits (N x C x padded H x padded W) of uint8 images of one padded_size; ``tta`` averages them with those of
    the horizontally mirrored batch (mirrored back)."""
    x = torch.stack([pad_to_multiple(to_device_batch(image[None], device, False))[0] for image in images])
    if speed.channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    with autocast(device, speed.amp_dtype):
        logits = net(x)
        if tta:
            logits = (logits + net(x.flip(-1)).flip(-1)) / 2
    return logits


@torch.inference_mode()
def predict_full_res(net: nn.Module, images: Sequence[torch.Tensor], device: torch.device, batch_size: int = 8,
                     speed: Speed = Speed(), tta: bool = False) -> Iterator[tuple[int, torch.Tensor]]:
    """Yield (index, predicted labels H x W) for every image at full resolution. Images that pad to the same
    multiple-of-32 size are batched together, so each prediction equals the one of that image alone."""
    net.eval()
    if speed.channels_last:
        net.to(memory_format=torch.channels_last)
    groups: dict[tuple[int, int], list[int]] = {}
    for i, image in enumerate(images):
        groups.setdefault(padded_size(image.shape[1:]), []).append(i)
    for indices in groups.values():
        for start in range(0, len(indices), batch_size):
            chunk = indices[start:start + batch_size]
            pred = padded_logits(net, [images[i] for i in chunk], device, speed, tta).argmax(1)
            for i, p in zip(chunk, pred):
                h, w = images[i].shape[1:]
                yield i, p[:h, :w]


def predict(img: torch.Tensor, net: nn.Module, device: torch.device | None = None, speed: Speed = Speed(),
            tta: bool = False) -> torch.Tensor:
    """The predicted classes (H x W) of one uint8 image (3 x H x W); the book's net is a global, here an argument."""
    device = device or next(net.parameters()).device
    return next(predict_full_res(net, [img], device, 1, speed, tta))[1]


def evaluate(net: nn.Module, data: SegDataset, device: torch.device, num_classes: int, batch_size: int = 8,
             speed: Speed = Speed(), progress: Callable[[Iterable], Iterable] = iter) -> SegMetrics:
    """Full-resolution, deterministic metrics over whole images (the book scores random crops); ``progress`` wraps
    the loop over the images (a progress bar)."""
    metrics = SegMetrics(num_classes)
    for i, pred in progress(predict_full_res(net, data.images, device, batch_size, speed)):
        metrics.update(pred.cpu(), data.labels[i])
    return metrics


# ---------------------------------------------------------------------------------------------------------------------
# Figures
# ---------------------------------------------------------------------------------------------------------------------

def plt_module():
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    return plt


def show_images(rows: Sequence[Sequence[torch.Tensor]], row_titles: Sequence[str],
                titles: Sequence[Sequence[str]] | None = None, scale: float = 2.0):
    """A grid of H x W x 3 uint8 images, one list per row, like d2l.show_images; returns the figure."""
    plt = plt_module()
    num_rows, num_cols = len(rows), max(len(r) for r in rows)
    fig, axes = plt.subplots(num_rows, num_cols, figsize=(num_cols * scale * 1.3, num_rows * scale), squeeze=False)
    for r, row in enumerate(rows):
        for c in range(num_cols):
            ax = axes[r][c]
            ax.set(xticks=[], yticks=[])
            ax.imshow(row[c].numpy()) if c < len(row) else ax.axis("off")
            if titles and titles[r] and c < len(titles[r]) and titles[r][c]:
                ax.set_title(titles[r][c], fontsize=8)
        axes[r][0].set_ylabel(row_titles[r])
    fig.tight_layout()
    return fig

