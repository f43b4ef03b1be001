"""DistributedDataParallel on the CPU (gloo, 2 processes): same step as one process on the global batch, every
validation pixel counted once, one set of outputs."""
from __future__ import annotations

import os
import socket
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp

from conftest import make_voc_tree, run_script
import some_define as sd
from support import checkpoints, distributed, steps

B, CROP = 4, (96, 96)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def fixed_batch() -> tuple[torch.Tensor, torch.Tensor]:
    """A global batch whose void pixels are spread unevenly, so a per-process mean would weigh pixels wrongly."""
    g = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (B, 3, *CROP), dtype=torch.uint8, generator=g)
    labels = torch.randint(0, 4, (B, *CROP), dtype=torch.uint8, generator=g)
    labels[0, :20] = sd.VOID
    labels[3, :, :5] = sd.VOID
    return images, labels


def three_steps(net: torch.nn.Module, images, labels, reduction: str, world_size: int) -> None:
    optimizer = torch.optim.SGD(net.parameters(), lr=2e-4)   # small enough that 3 steps lower the loss smoothly
    for _ in range(3):
        steps.make_step(sd.SegmentationLoss(reduction, "ignore"), sd.Speed(), None, 1, world_size)(
            net, optimizer, images, labels)


def val_set() -> sd.SegDataset:
    """Three images (an odd count: a padded sampler would count one twice), of two sizes."""
    g = torch.Generator().manual_seed(1)
    sizes = [(40, 50), (64, 64), (40, 50)]
    images = [torch.randint(0, 256, (3, h, w), dtype=torch.uint8, generator=g) for h, w in sizes]
    labels = [torch.randint(0, 4, (h, w), dtype=torch.uint8, generator=g) for h, w in sizes]
    labels[1][:10] = sd.VOID
    return sd.SegDataset(images, labels, ["a", "b", "c"], CROP)


def rank_worker(rank: int, world_size: int, port: int, out: str, reduction: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world_size),
                      LOCAL_RANK=str(rank))
    torch.set_num_threads(1)
    ctx = distributed.DistributedContext("cpu")
    torch.manual_seed(0)
    net = sd.build_model("fcn", 4)
    # Before training, so with the same weights as the reference: each process evaluates its share, then the sums.
    metrics = sd.evaluate(net, val_set().shard(ctx.rank, ctx.world_size), ctx.device, 4, 2)
    metrics.reduce_from_all_processes(ctx.device)
    net = distributed.wrap_for_training(net, ctx, channels_last=False, sync_bn=True, compile_model=False)
    net.train()
    images_b, labels_b = fixed_batch()
    per = B // world_size
    shard = slice(rank * per, (rank + 1) * per)     # how RandomCropBatchSampler splits a global batch
    three_steps(net, images_b[shard], labels_b[shard], reduction, world_size)
    torch.save({"state_dict": checkpoints.unwrap(net).state_dict(), "confusion": metrics.confusion,
                "void": [metrics.void_pixels, metrics.void_as_background]}, Path(out) / f"rank{rank}.pt")
    torch.distributed.destroy_process_group()


@pytest.mark.parametrize("reduction", ["sum", "mean"])
def test_two_ranks_take_the_single_process_step(reduction, tmp_path):
    mp.spawn(rank_worker, args=(2, free_port(), str(tmp_path), reduction), nprocs=2, join=True)
    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in range(2)]

    torch.manual_seed(0)
    reference = sd.build_model("fcn", 4)
    start = {k: v.clone() for k, v in reference.state_dict().items()}
    metrics = sd.evaluate(reference, val_set(), torch.device("cpu"), 4, 2)
    reference.train()
    three_steps(reference, *fixed_batch(), reduction, world_size=1)

    for key, value in reference.state_dict().items():
        assert torch.equal(ranks[0]["state_dict"][key], ranks[1]["state_dict"][key]), key
        # The distributed step equals the single-process one up to float32 rounding: compare the change each
        # tensor went through (measured: relative differences around 1e-5; a wrong loss scale or unsynced
        # BatchNorm statistics give differences of order 1). A larger lr makes these 3 steps chaotic on random data:
        # then a 1e-6 change of one weight already moves the result by percents.
        change, reference_change = ranks[0]["state_dict"][key] - start[key], value - start[key]
        if value.is_floating_point():   # + float32 rounding of weights near 1 (about 6e-8 each)
            error = (change - reference_change).norm()
            assert error <= 2e-3 * reference_change.norm() + 1e-6 * value.numel() ** 0.5, (key, float(error))
        else:
            assert torch.equal(change, reference_change), key
    for r in ranks:   # every val pixel exactly once: the summed matrices equal the single-process one
        assert torch.equal(r["confusion"], metrics.confusion)
        assert r["void"] == [metrics.void_pixels, metrics.void_as_background]


def test_torchrun_trains_and_writes_one_set_of_files(tmp_path):
    voc = make_voc_tree(tmp_path / "d", [(48, 48)] * 8, [(48, 64)] * 3)
    out = tmp_path / "out"
    flags = ["my_train.py", "--voc-dir", str(voc), "--epochs", "2", "--batch-size", "4", "--crop", "32", "32",
             "--pretrained", "none", "--device", "cpu", "--workers", "0", "--amp", "off"]
    result = run_script("-m", "torch.distributed.run", "--nproc_per_node=2", f"--master_port={free_port()}",
                        *flags, "--out", str(out))
    assert result.returncode == 0, result.stderr[-3000:]
    single = run_script(*flags, "--out", str(tmp_path / "single"))
    assert single.returncode == 0, single.stderr[-3000:]
    assert result.stdout.count("epoch 1/2:") == 1 and result.stdout.count("epoch 2/2:") == 1   # rank 0 alone logs
    assert "x 2 process(es)" in result.stdout
    assert sorted(p.name for p in out.iterdir()) == ["best.pt", "curves.png", "history.csv", "last.pt"]
    checkpoint = checkpoints.load_checkpoint(out / "last.pt")
    assert checkpoint["epoch"] == 2 and len(checkpoint["history"]) == 2
    # The logged loss and accuracy are the global batch's, as a single process with the same batch logs them.
    first, reference = checkpoint["history"][0], checkpoints.load_checkpoint(tmp_path / "single" / "last.pt")["history"][0]
    assert first["train_loss"] == pytest.approx(reference["train_loss"], rel=1e-3)
    assert first["train_acc"] == pytest.approx(reference["train_acc"], abs=1e-3)
    checkpoints.restore_model(checkpoint)    # SyncBN layers save plain BatchNorm weights


def test_a_global_batch_that_does_not_divide_is_refused(tmp_path):
    voc = make_voc_tree(tmp_path / "d", [(48, 48)] * 4, [(48, 48)] * 2)
    result = run_script("-m", "torch.distributed.run", "--nproc_per_node=2", f"--master_port={free_port()}",
                        "origin_train.py", "--voc-dir", str(voc), "--out", str(tmp_path / "o"), "--batch-size", "3",
                        "--crop", "32", "32", "--pretrained", "none", "--device", "cpu")
    assert result.returncode != 0
    assert "--batch-size 3 is the global batch and must divide evenly over 2 processes" in result.stderr
