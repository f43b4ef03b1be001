"""Write a file as the original repository does (``torch.save`` of the whole nn.DataParallel model), with this
folder's replica importable as ``some_define``; also the replica's logits on a fixed input, as a plain tensor file.

    python save_original.py unet|fcn OUT.pth LOGITS.pt [--payload system|exec|unknown --marker PATH] [--state-dict]
"""
import argparse
import builtins
import os

import torch
from torch import nn

import some_define   # this folder's replica: the pickle names some_define.ResNetUNet, as the real files do


class RunsShell:
    def __init__(self, command):
        self.command = command

    def __reduce__(self):
        return (os.system, (self.command,))


class RunsPython:
    def __init__(self, source):
        self.source = source

    def __reduce__(self):
        return (builtins.exec, (self.source,))


def payload(kind, marker):
    return {"system": lambda: RunsShell(f"touch {marker}"),
            "exec": lambda: RunsPython(f"open({marker!r}, 'w').close()"),
            "unknown": lambda: some_define.Gadget(marker)}[kind]()


def tag_storages_as_cuda0(storage):
    """The real files were saved from a GPU: their storages say cuda:0 (restored on the CPU with map_location)."""
    return "cuda:0"


def randomise_batchnorm_statistics(net):
    """Trained-looking running statistics, so that a converter that dropped the buffers would give other logits."""
    for module in net.modules():
        if isinstance(module, nn.BatchNorm2d):
            module.running_mean.uniform_(-0.2, 0.2)
            module.running_var.uniform_(0.5, 1.5)
            module.num_batches_tracked.fill_(1234)


def main():
    p = argparse.ArgumentParser()
    p.add_argument("kind", choices=["unet", "fcn"])
    p.add_argument("out")
    p.add_argument("logits")
    p.add_argument("--classes", type=int, default=21)
    p.add_argument("--payload", choices=["system", "exec", "unknown"])
    p.add_argument("--marker")
    p.add_argument("--state-dict", action="store_true", help="save net.state_dict() instead of the whole module")
    args = p.parse_args()
    torch.manual_seed(0)
    model = some_define.ResNetUNet(args.classes) if args.kind == "unet" else some_define.fcn(args.classes)
    with torch.no_grad():
        randomise_batchnorm_statistics(model)
    net = nn.DataParallel(model)
    if not torch.cuda.is_available():   # DataParallel on a GPU machine records these
        net.device_ids, net.output_device, net.src_device_obj = [0], 0, torch.device("cuda", 0)
    x = torch.randn(2, 3, 64, 96, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        logits = model.eval()(x)
    torch.save({"input": x, "logits": logits, "state_dict_entries": len(net.state_dict())}, args.logits)
    if args.payload:
        model.payload = payload(args.payload, args.marker)
    torch.serialization.register_package(0, tag_storages_as_cuda0, lambda storage, location: None)
    torch.save(net.state_dict() if args.state_dict else net, args.out)


if __name__ == "__main__":
    main()
