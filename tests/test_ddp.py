"""DistributedDataParallel on the CPU (gloo, 2 processes): same step as one process on the global batch, every
validation pixel counted once, one set of outputs."""
from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp

from conftest import REPO_ROOT, THREADS, make_voc_tree, run_script
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


def test_ctrl_c_under_torchrun_stops_every_rank_after_the_same_step_and_resumes_to_the_same_weights(tmp_path):
    voc = make_voc_tree(tmp_path / "d", [(48, 48)] * 24, [(48, 64)] * 2)
    flags = lambda out: ["-m", "torch.distributed.run", "--nproc_per_node=2", f"--master_port={free_port()}",
                         "my_train.py", "--voc-dir", str(voc), "--epochs", "2", "--batch-size", "4", "--crop", "32",
                         "32", "--pretrained", "none", "--device", "cpu", "--workers", "0", "--amp", "off",
                         "--out", str(out)]
    whole = run_script(*flags(tmp_path / "whole"))
    assert whole.returncode == 0, whole.stderr[-3000:]
    env = dict(os.environ, TQDM_DISABLE="1", MPLBACKEND="Agg", OMP_NUM_THREADS=THREADS)
    proc = subprocess.Popen([sys.executable, *flags(tmp_path / "cut")], cwd=REPO_ROOT, env=env, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, start_new_session=True)
    deadline = time.time() + 180
    while not (tmp_path / "cut" / "history.csv").exists():   # epoch 1 done: the Ctrl-C lands in epoch 2
        assert proc.poll() is None and time.time() < deadline, proc.communicate()
        time.sleep(0.05)
    os.killpg(proc.pid, signal.SIGINT)   # as a terminal's Ctrl-C: torchrun and both ranks
    _, stderr = proc.communicate(timeout=60)   # every rank exits within seconds
    saved = torch.load(tmp_path / "cut" / "last.pt", weights_only=True)
    if saved["step"]:   # stopped inside epoch 2: the totals saved are both ranks' (each saw 2 images per step)
        assert saved["partial"]["seen"] == 4 * saved["step"]
    resumed = run_script("-m", "torch.distributed.run", "--nproc_per_node=2", f"--master_port={free_port()}",
                         "my_train.py", "--resume", "--out", str(tmp_path / "cut"))
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    a, b = (torch.load(tmp_path / name / "last.pt", weights_only=True) for name in ("whole", "cut"))
    assert all(torch.equal(a["state_dict"][k], b["state_dict"][k]) for k in a["state_dict"])
    assert b["history"][1]["train_loss"] == pytest.approx(a["history"][1]["train_loss"], rel=1e-6)


def test_torchrun_on_two_machines_trains_like_one_process(tmp_path):
    """Two "machines" on 127.0.0.1, one process each, met by c10d rendezvous: the README's multi-node line."""
    voc = make_voc_tree(tmp_path / "d", [(48, 48)] * 8, [(48, 64)] * 2)
    out, port = tmp_path / "out", free_port()
    flags = ["my_train.py", "--voc-dir", str(voc), "--epochs", "1", "--batch-size", "4", "--crop", "32", "32",
             "--pretrained", "none", "--device", "cpu", "--workers", "0", "--amp", "off", "--out", str(out)]
    env = dict(os.environ, TQDM_DISABLE="1", MPLBACKEND="Agg", OMP_NUM_THREADS=THREADS)
    nodes = [subprocess.Popen([sys.executable, "-m", "torch.distributed.run", "--nnodes=2", f"--node-rank={rank}",
                               "--nproc_per_node=1", "--rdzv-backend=c10d", f"--rdzv-endpoint=127.0.0.1:{port}",
                               "--rdzv-id=test", *flags], cwd=REPO_ROOT, env=env, text=True, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE) for rank in (0, 1)]
    outputs = [node.communicate(timeout=300) for node in nodes]
    assert [node.returncode for node in nodes] == [0, 0], [o[1][-2000:] for o in outputs]
    assert "x 2 process(es)" in outputs[0][0] + outputs[1][0]
    assert sorted(p.name for p in out.iterdir()) == ["best.pt", "curves.png", "history.csv", "last.pt"]
    single = run_script(*flags[:-1], str(tmp_path / "single"))
    assert single.returncode == 0, single.stderr[-3000:]
    two, one = (checkpoints.load_checkpoint(p / "last.pt")["history"][0] for p in (out, tmp_path / "single"))
    assert two["train_loss"] == pytest.approx(one["train_loss"], rel=1e-3)
