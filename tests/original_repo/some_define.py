"""A replica of the original repository's two networks, for tests only: the U-Net (``ResNetUNet``) and the book's
FCN exactly as that repository builds them, so that a pickle of them names the same classes as its files do
(this module must be imported as ``some_define``, as there). Random init instead of resnet18-f37072fd.pth."""
import torch
import torchvision
from torch import nn


def convrelu(in_channels, out_channels, kernel, padding):
    return nn.Sequential(nn.Conv2d(in_channels, out_channels, kernel, padding=padding), nn.ReLU(inplace=True))


# The original's decoder as it lists it (3x3 conv + ReLU each): name -> (channels in, channels out).
DECODER = {"conv_up3": (256 + 512, 512), "conv_up2": (128 + 512, 256), "conv_up1": (64 + 256, 256),
           "conv_up0": (64 + 256, 128), "conv_original_size0": (3, 64), "conv_original_size1": (64, 64),
           "conv_original_size2": (64 + 128, 64)}


class ResNetUNet(nn.Module):
    """The original U-Net: a whole ResNet-18 kept as ``base_model`` (``fc`` included), its children in a plain list,
    the stages built from that list (so their tensors are shared with ``base_model``), and no padding in forward."""

    def __init__(self, n_class):
        super().__init__()
        self.base_model = torchvision.models.resnet18()
        self.base_layers = list(self.base_model.children())
        self.layer0 = nn.Sequential(*self.base_layers[:3])
        self.layer0_1x1 = convrelu(64, 64, 1, 0)
        self.layer1 = nn.Sequential(*self.base_layers[3:5])
        self.layer1_1x1 = convrelu(64, 64, 1, 0)
        self.layer2 = self.base_layers[5]
        self.layer2_1x1 = convrelu(128, 128, 1, 0)
        self.layer3 = self.base_layers[6]
        self.layer3_1x1 = convrelu(256, 256, 1, 0)
        self.layer4 = self.base_layers[7]
        self.layer4_1x1 = convrelu(512, 512, 1, 0)
        self.upsample = nn.Upsample(scale_factor=2, mode='bilinear', align_corners=True)
        for name, (in_channels, out_channels) in DECODER.items():   # registered in the original's order
            setattr(self, name, convrelu(in_channels, out_channels, 3, 1))
        self.conv_last = nn.Conv2d(64, n_class, 1)

    def forward(self, x):
        original = self.conv_original_size1(self.conv_original_size0(x))
        skips = [x]
        for stage in (self.layer0, self.layer1, self.layer2, self.layer3, self.layer4):
            skips.append(stage(skips[-1]))
        layer0, layer1, layer2, layer3, layer4 = skips[1:]
        x = self.upsample(self.layer4_1x1(layer4))
        x = self.conv_up3(torch.cat([x, self.layer3_1x1(layer3)], dim=1))
        x = self.upsample(x)
        x = self.conv_up2(torch.cat([x, self.layer2_1x1(layer2)], dim=1))
        x = self.upsample(x)
        x = self.conv_up1(torch.cat([x, self.layer1_1x1(layer1)], dim=1))
        x = self.upsample(x)
        x = self.conv_up0(torch.cat([x, self.layer0_1x1(layer0)], dim=1))
        x = self.upsample(x)
        x = self.conv_original_size2(torch.cat([x, original], dim=1))
        return self.conv_last(x)


def fcn(num_classes):
    """The book's FCN as the original origin_train.py builds it: a plain nn.Sequential."""
    net = nn.Sequential(*list(torchvision.models.resnet18().children())[:-2])
    net.add_module('final_conv', nn.Conv2d(512, num_classes, kernel_size=1))
    net.add_module('transpose_conv', nn.ConvTranspose2d(num_classes, num_classes, kernel_size=64, padding=16,
                                                        stride=32))
    return net


class Gadget:
    """A class the safe loader does not know: unpickled for real, its __setstate__ would create the marker file."""

    def __init__(self, marker):
        self.marker = marker

    def __setstate__(self, state):
        open(state["marker"], "w").close()
