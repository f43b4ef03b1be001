"""The speed paths change nothing but speed: gradient accumulation, channels_last, autocast and the on-device data
path give what the plain path gives (CPU, tiny inputs), and the speed flags reject bad values with one clear line.

The speed itself is measured by benchmarks/bench.py, not here."""
from __future__ import annotations

import math
import sys
import types

import pytest
import torch

import some_define as sd
from conftest import TINY_TRAIN_SIZES, make_voc_tree, run_script
from support import data, speed, steps
from support.data import crop_batches_on_device

CPU = torch.device("cpu")
NUM_CLASSES = 5


def random_batch(n: int, hw: tuple[int, int], seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    images = torch.randint(0, 256, (n, 3, *hw), dtype=torch.uint8, generator=g)
    labels = torch.randint(0, NUM_CLASSES, (n, *hw), dtype=torch.uint8, generator=g)
    return images, labels


# ---------------------------------------------------------------------------------------------------------------------
# Gradient accumulation
# ---------------------------------------------------------------------------------------------------------------------

def grads_after_step(images, labels, reduction: str, accum_steps: int) -> tuple[list[torch.Tensor], float, int, int]:
    torch.manual_seed(0)
    # Eval mode: BatchNorm normalises with its running statistics, so each image's output does not depend on the other
    # images of its (micro-)batch, and accumulating micro-batches must give exactly the full batch's gradients. (In
    # train mode the batch statistics differ per micro-batch: accumulation then is a different, not a wrong, step.)
    net = sd.FCN(num_classes=NUM_CLASSES, pretrained="none").eval()
    optimizer = torch.optim.SGD(net.parameters(), lr=0.0)      # lr 0: the step leaves the weights alone
    step = steps.make_step(sd.SegmentationLoss(reduction, "ignore"), sd.Speed(), None, accum_steps)
    loss, correct, counted = step(net, optimizer, images, labels)
    return [p.grad.clone() for p in net.parameters()], loss, correct, counted


def assert_same_grads(a: list[torch.Tensor], b: list[torch.Tensor], rtol: float = 1e-4) -> None:
    for ga, gb in zip(a, b):
        scale = max(float(ga.abs().max()), 1e-12)
        assert float((ga - gb).abs().max()) <= rtol * scale, f"max diff {float((ga - gb).abs().max())}, scale {scale}"


def uneven_void_batch() -> tuple[torch.Tensor, torch.Tensor]:
    """8 images whose labelled pixels are spread very unevenly over the 4 micro-batches of 2."""
    images, labels = random_batch(8, (32, 32), seed=1)
    labels[0:2, :28] = sd.VOID          # micro-batch 0: only 4 of 32 rows labelled
    labels[2, :, :16] = sd.VOID         # micro-batch 1: one image half void
    labels[7, :31, :31] = sd.VOID       # micro-batch 3: one image almost all void
    return images, labels


@pytest.mark.parametrize("reduction", ["sum", "mean"])
def test_accumulated_gradients_equal_the_full_batch(reduction):
    images, labels = uneven_void_batch()
    full, loss1, correct1, counted1 = grads_after_step(images, labels, reduction, accum_steps=1)
    accum, loss4, correct4, counted4 = grads_after_step(images, labels, reduction, accum_steps=4)
    assert any(float(g.abs().max()) > 0 for g in full)
    assert_same_grads(full, accum)
    assert loss4 == pytest.approx(loss1, rel=1e-5)
    assert (correct4, counted4) == (correct1, counted1)


def test_a_naive_per_micro_batch_mean_would_differ():
    """The test above has teeth: averaging each micro-batch's own mean loss gives other gradients on this batch."""
    images, labels = uneven_void_batch()
    full, *_ = grads_after_step(images, labels, "mean", accum_steps=1)
    torch.manual_seed(0)
    net = sd.FCN(num_classes=NUM_CLASSES, pretrained="none").eval()
    targets = sd.prepare_targets(labels, "ignore")
    for x, y in zip(images.chunk(4), targets.chunk(4)):
        (sd.segmentation_loss(net(sd.normalize_images(x)), y, "mean") / 4).backward()
    naive = [p.grad for p in net.parameters()]
    with pytest.raises(AssertionError):
        assert_same_grads(full, naive, rtol=1e-3)


def test_accumulation_with_a_batch_that_does_not_split_evenly():
    """torch.chunk gives micro-batches of 3, 3, 1 for 7 images: the sum still equals the full batch."""
    images, labels = random_batch(7, (32, 32), seed=2)
    labels[6] = sd.VOID
    for reduction in ("sum", "mean"):
        full, loss1, *_ = grads_after_step(images, labels, reduction, accum_steps=1)
        accum, loss3, *_ = grads_after_step(images, labels, reduction, accum_steps=3)
        assert_same_grads(full, accum)
        assert loss3 == pytest.approx(loss1, rel=1e-5)


# ---------------------------------------------------------------------------------------------------------------------
# channels_last and autocast give the plain path's outputs
# ---------------------------------------------------------------------------------------------------------------------

@pytest.fixture(scope="module", params=["fcn", "unet"])
def model_and_input(request):
    torch.manual_seed(0)
    net = sd.build_model(request.param, NUM_CLASSES, "none").eval()
    images, _ = random_batch(2, (64, 96), seed=3)
    return request.param, net, images


def logits_of(net, images, channels_last: bool = False, amp_dtype=None) -> torch.Tensor:
    import copy
    net = copy.deepcopy(net)
    if channels_last:
        net = net.to(memory_format=torch.channels_last)
    with torch.inference_mode(), sd.autocast(CPU, amp_dtype):
        return net(sd.to_device_batch(images, CPU, channels_last)).float()


def test_channels_last_gives_the_same_logits(model_and_input):
    name, net, images = model_and_input
    plain = logits_of(net, images)
    nhwc = logits_of(net, images, channels_last=True)
    assert nhwc.shape == plain.shape == (2, NUM_CLASSES, 64, 96)
    scale = float(plain.abs().max())
    assert float((nhwc - plain).abs().max()) <= 1e-4 * scale
    preds = dict(sd.predict_full_res(net, list(images), CPU, batch_size=2))
    preds_nhwc = dict(sd.predict_full_res(net.to(memory_format=torch.channels_last), list(images), CPU,
                                          batch_size=2, speed=sd.Speed(None, True)))
    net.to(memory_format=torch.contiguous_format)
    agree = sum(int((preds[i] == preds_nhwc[i]).sum()) for i in preds) / sum(p.numel() for p in preds.values())
    assert agree >= 0.999


def test_bf16_autocast_gives_the_same_logits_within_bf16_tolerance(model_and_input):
    name, net, images = model_and_input
    plain = logits_of(net, images)
    for channels_last in (False, True):
        amp = logits_of(net, images, channels_last=channels_last, amp_dtype=torch.bfloat16)
        # bf16 keeps 8 bits of mantissa (relative error 2^-9 per rounding); through ~20 layers the logits drift by
        # about a percent of their range, far from what a real bug (wrong layout, wrong scaling) would do.
        rel = float((amp - plain).norm() / plain.norm())
        assert rel < 0.05, f"{name}, channels_last {channels_last}: relative error {rel:.3f}"
        agree = float((amp.argmax(1) == plain.argmax(1)).float().mean())
        assert agree >= 0.9, f"{name}, channels_last {channels_last}: {agree:.1%} of the predictions agree"


def test_amp_training_step_matches_the_plain_step():
    """One train_step under bf16 autocast and channels_last: the same loss as the plain step, within bf16 tolerance."""
    images, labels = random_batch(2, (32, 32), seed=4)
    losses = {}
    for amp_dtype, channels_last in ((None, False), (torch.bfloat16, False), (None, True), (torch.bfloat16, True)):
        torch.manual_seed(0)
        net = sd.FCN(num_classes=NUM_CLASSES, pretrained="none").eval()
        if channels_last:
            net = net.to(memory_format=torch.channels_last)
        optimizer = torch.optim.SGD(net.parameters(), lr=0.0)
        losses[amp_dtype, channels_last], _, _ = sd.train_step(
            net, optimizer, images, labels, sd.SegmentationLoss("mean", "ignore"), sd.Speed(amp_dtype, channels_last))
    plain = losses[None, False]
    assert losses[None, True] == pytest.approx(plain, rel=1e-4)
    assert losses[torch.bfloat16, False] == pytest.approx(plain, rel=0.02)
    assert losses[torch.bfloat16, True] == pytest.approx(plain, rel=0.02)


# ---------------------------------------------------------------------------------------------------------------------
# The on-device data path cuts the DataLoader's crops
# ---------------------------------------------------------------------------------------------------------------------

def test_on_device_path_yields_the_dataloader_crops(tmp_path):
    """crop_batches_on_device (run here on CPU tensors, as a GPU run would on device tensors) gives exactly the crops
    of the DataLoader path, with and without worker processes, for a fixed seed and every epoch."""
    voc_dir = make_voc_tree(tmp_path / "data", TINY_TRAIN_SIZES, [(32, 32)])
    dataset = data.read_split(voc_dir, "train", sd.VOC_COLORMAP, crop_size=(32, 32))
    # What train() builds for the on-device path: its own copies of the split (on the GPU there).
    device_set = sd.SegDataset([x.clone() for x in dataset.images], [y.clone() for y in dataset.labels],
                                  dataset.names, (32, 32))

    def epochs(make_batches, n: int = 2):
        sampler = sd.RandomCropBatchSampler(dataset, batch_size=2, seed=7)
        out = []
        for epoch in range(1, n + 1):
            sampler.set_epoch(epoch)
            out.append([(x.clone(), y.clone()) for x, y in make_batches(sampler)])
        return out

    def loader(workers: int):
        return lambda sampler: torch.utils.data.DataLoader(dataset, batch_sampler=sampler,
                                                           num_workers=workers)
    on_device = epochs(lambda sampler: crop_batches_on_device(device_set, sampler))
    for workers in (0, 2):
        via_loader = epochs(loader(workers))
        assert len(via_loader) == len(on_device) == 2
        for epoch_loader, epoch_device in zip(via_loader, on_device):
            assert len(epoch_loader) == len(epoch_device) == len(TINY_TRAIN_SIZES) // 2
            for (x, y), (xd, yd) in zip(epoch_loader, epoch_device):
                assert x.dtype == xd.dtype == torch.uint8 and x.shape == xd.shape == (2, 3, 32, 32)
                assert torch.equal(x, xd) and torch.equal(y, yd)
    assert not all(torch.equal(a[0], b[0]) for a, b in zip(on_device[0], on_device[1])), "epochs should differ"


# ---------------------------------------------------------------------------------------------------------------------
# Bad speed flags: one line, exit 2
# ---------------------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("flags,mentions", [(["--accum-steps", "0"], "--accum-steps"),
                                            (["--amp", "xyz"], "--amp"),
                                            (["--batch-size", "0"], "--batch-size"),
                                            (["--channels-last", "maybe"], "--channels-last")])
def test_bad_speed_flags_are_one_line_errors(tmp_path, flags, mentions):
    result = run_script("origin_train.py", "--demo", *flags, "--out", str(tmp_path / "out"), timeout=120)
    assert result.returncode == 2, f"exit {result.returncode}\nstderr:\n{result.stderr}"
    assert "Traceback" not in result.stderr
    lines = result.stderr.splitlines()
    assert len(lines) == 1, f"{len(lines)} stderr lines:\n{result.stderr[:2000]}"
    assert lines[0].startswith("error: ") and mentions in lines[0], lines[0]
    assert not (tmp_path / "out").exists()


# ---------------------------------------------------------------------------------------------------------------------
# Threads from the load of other programs
# ---------------------------------------------------------------------------------------------------------------------

class FakeClock:
    """Readings of (wall, busy core-seconds of all our cores, our own CPU seconds) that a test advances."""

    def __init__(self):
        self.wall = self.busy = self.own = 0.0

    def advance(self, wall: float, others: float, own: float) -> None:
        self.wall += wall
        self.busy += (others + own) * wall
        self.own += own * wall

    def __call__(self):
        return self.wall, self.busy, self.own


def test_threads_follow_the_cores_other_programs_leave_free(monkeypatch):
    monkeypatch.setattr(speed.time, "sleep", lambda s: clock.advance(s, others, 0.0))
    before = torch.get_num_threads()
    clock, lines = FakeClock(), []
    try:
        torch.set_num_threads(1)                        # left so by an earlier run in this process
        others = 2.0                                    # two cores taken when training starts
        reads = []
        read = lambda: reads.append(clock.wall) or clock()
        load = speed.ThreadsForLoad(interval=10, read=read, log=lines.append, cores=4, clock=lambda: clock.wall)
        assert load.threads == 2 == torch.get_num_threads()
        assert lines == ["other programs keep 2.0 of 4 cores busy: 2 thread(s) now (--threads N to choose)"]
        clock.advance(5, others=0.0, own=2.0)           # they stop, but not 10 s have passed: no change yet
        load.update()
        assert torch.get_num_threads() == 2 and reads == [0.0, 0.2]   # nor a look at /proc/stat
        clock.advance(6, others=0.0, own=2.0)           # our own busy threads do not count as others'
        load.update()
        assert load.threads == 4 == torch.get_num_threads()
        clock.advance(10, others=3.6, own=0.4)          # nearly all cores taken: still one thread
        load.update()
        assert load.threads == 1 == torch.get_num_threads()
        clock.advance(10, others=0.4, own=3.6)          # less than half a core elsewhere is not a core
        load.update()
        assert load.threads == 4 and len(lines) == 4   # one line per change
    finally:
        torch.set_num_threads(before)


def test_threads_for_load_only_where_nobody_chose(monkeypatch):
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    cpu = torch.device("cpu")
    assert speed.threads_for_load(2, cpu) is None                          # --threads given
    assert speed.threads_for_load(None, torch.device("cuda")) is None      # the GPU does the work
    assert speed.threads_for_load(None, cpu, world_size=2) is None         # the siblings are not "other programs"
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    assert speed.threads_for_load(None, cpu) is None


@pytest.mark.parametrize("amx, avx512_bf16, machine, arm_bf16, expected", [
    (True, True, "x86_64", True, "AMX"),                # Sapphire Rapids and later
    (False, True, "x86_64", True, "AVX512-BF16"),       # AMD Zen 4/5, Intel Cooper Lake
    (False, False, "x86_64", True, None),               # AVX-512 without BF16: oneDNN emulates bf16, fp32 is faster
    (False, False, "aarch64", True, "ARM BF16"),        # Graviton 3/4, Apple M2 and later under Linux
    (False, False, "aarch64", False, None)])
def test_bf16_by_default_exactly_where_the_cpu_computes_it_natively(monkeypatch, amx, avx512_bf16, machine, arm_bf16,
                                                                    expected):
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: amx)
    monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: avx512_bf16)
    monkeypatch.setattr(speed.platform, "machine", lambda: machine)
    monkeypatch.setattr(speed, "mkldnn_bf16", lambda: arm_bf16)
    cpu = torch.device("cpu")
    assert speed.cpu_native_bf16() == expected
    assert speed.resolve_amp("auto", cpu) == (torch.bfloat16 if expected else None)
    assert speed.resolve_speed("auto", "auto", "auto", cpu, 1)[0].channels_last == bool(expected)
    assert speed.resolve_amp("off", cpu) is None and speed.resolve_amp("bf16", cpu) == torch.bfloat16


def test_the_benchmark_compares_a_step_with_the_ceiling_of_its_own_precision():
    from benchmarks.train_step import ModelRun, VariantRun
    run = ModelRun({"batch_size": 8, "flops_per_image": 1e9}, steps=1, rounds=1, bf16_peak=None)
    run.variants["plain"] = VariantRun({"amp_dtype": "None"}, 0.0, {}, [0.1])       # 8 images in 0.1 s: 80 GFLOP/s
    run.variants["fast"] = VariantRun({"amp_dtype": "bfloat16"}, 0.0, {}, [0.04])   # 200 GFLOP/s
    stats = run.stats({"gflops": 100.0, "bf16_gflops": 400.0})
    assert stats["plain"]["fraction_of_precision_ceiling"] == pytest.approx(0.8)    # of the fp32 ceiling
    assert stats["fast"]["fraction_of_precision_ceiling"] == pytest.approx(0.5)     # of the bf16 one, not 200 %
    assert stats["fast"]["fraction_of_peak"] == pytest.approx(2.0)                  # the fp32 fraction stays in the JSON


@pytest.mark.parametrize("name, capability, amp", [
    ("Tesla T4", (7, 5), torch.float16),                    # Colab: fp16 tensor cores, no bf16 units
    ("Tesla V100-SXM2-16GB", (7, 0), torch.float16),
    ("NVIDIA GeForce RTX 2080", (7, 5), torch.float16),
    ("NVIDIA A100-SXM4-40GB", (8, 0), torch.bfloat16),
    ("NVIDIA GeForce RTX 4070 Laptop GPU", (8, 9), torch.bfloat16),
    ("NVIDIA H100 80GB HBM3", (9, 0), torch.bfloat16),
    ("NVIDIA H200", (9, 0), torch.bfloat16),
    ("Tesla P100-PCIE-16GB", (6, 0), None)])                # Pascal: fp32
def test_each_gpu_gets_the_precision_its_hardware_computes(monkeypatch, name, capability, amp):
    asked = []
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda d=None: asked.append(d) or capability)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda d=None: name)
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda d=None: types.SimpleNamespace(total_memory=16 << 30))
    gpu = torch.device("cuda", 1)
    assert speed.resolve_amp("auto", gpu) == amp
    assert asked == [gpu]                                   # GPU 1's own capability, not GPU 0's
    s, on_device = speed.resolve_speed("auto", "auto", "auto", gpu, 1 << 20)
    assert s == sd.Speed(amp, True) and on_device
    assert (speed.bf16_peak_flops(gpu) is None) == (amp != torch.bfloat16)   # a bf16 peak only where bf16 runs


def test_peaks_name_the_card_not_a_prefix(monkeypatch):
    for name, tflops in (("NVIDIA L40", 181), ("NVIDIA L40S", 362), ("NVIDIA L4", 121)):
        monkeypatch.setattr(torch.cuda, "get_device_name", lambda d=None, n=name: n)
        assert speed.bf16_peak_flops(torch.device("cuda")) == tflops * 1e12


def test_apple_mps_trains_in_fp32_by_default():
    mps = torch.device("mps")
    assert speed.resolve_amp("auto", mps) is None and speed.resolve_speed("auto", "auto", "auto", mps, 1)[0] == \
        sd.Speed(None, False)


def test_cudnn_autotunes_the_training_steps_only():
    torch.backends.cudnn.benchmark = False
    with speed.cudnn_autotuning(torch.device("cuda")):
        assert torch.backends.cudnn.benchmark
    assert not torch.backends.cudnn.benchmark               # validation and prediction: every shape is new
    with speed.cudnn_autotuning(torch.device("cpu")):
        assert not torch.backends.cudnn.benchmark


def test_fp16_with_a_grad_scaler_skips_an_overflowing_step_then_trains():
    """The T4/V100 path, run on the CPU: fp16 autocast, the GradScaler's skipped step and its lowered scale."""
    torch.manual_seed(0)
    net = speed.use_cpu_kernels(sd.build_model("fcn", 3, "none")).train()   # as training builds it
    optimizer = sd.make_optimizer("sgd", net.parameters(), 0.1, 0.0)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0 ** 40)   # loss x 2^40 overflows fp16's 65504
    step = steps.make_step(sd.SegmentationLoss("mean", "ignore"), sd.Speed(torch.float16, False), scaler)
    images = torch.randint(0, 256, (2, 3, 32, 32), dtype=torch.uint8)
    labels = torch.randint(0, 3, (2, 32, 32), dtype=torch.uint8)
    before = [p.detach().clone() for p in net.parameters()]
    loss, _, _ = step(net, optimizer, images, labels)
    assert all(torch.equal(a, p) for a, p in zip(before, net.parameters()))   # skipped: the weights are untouched
    assert scaler.get_scale() == 2.0 ** 39 and math.isfinite(loss)
    scaler.update(16.0)   # a scale whose gradients fp16 holds here
    step(net, optimizer, images, labels)
    assert not all(torch.equal(a, p) for a, p in zip(before, net.parameters()))   # this one stepped
    assert scaler.get_scale() == 16.0


def test_fp16_training_resumes_with_its_scaler_to_the_same_weights(tmp_path):
    from test_robustness import final_state, start, wait_for_epoch_1
    voc = make_voc_tree(tmp_path / "d", [(40, 40)] * 4, [(40, 40)])
    run = lambda out, *extra: ["origin_train.py", "--voc-dir", str(voc), "--out", str(out), "--epochs", "2",
                               "--pretrained", "none", "--device", "cpu", "--crop", "32", "32", "--batch-size", "2",
                               "--amp", "fp16", "--workers", "0", *extra]
    whole = run_script(*run(tmp_path / "whole"))
    assert whole.returncode == 0, whole.stderr
    assert "amp float16" in whole.stdout
    proc = start(run(tmp_path / "cut"))
    wait_for_epoch_1(tmp_path / "cut", proc)
    proc.kill()
    proc.wait()
    saved = torch.load(tmp_path / "cut" / "last.pt", weights_only=True)
    assert saved["scaler"]["scale"] > 0                       # the GradScaler's state is in the checkpoint
    resumed = run_script("origin_train.py", "--resume", "--out", str(tmp_path / "cut"))
    assert resumed.returncode == 0, resumed.stderr
    a, b = final_state(tmp_path / "whole"), final_state(tmp_path / "cut")
    assert all(torch.equal(a[0][k], b[0][k]) for k in a[0])


def test_long_parts_show_progress_on_a_terminal_only(monkeypatch, capsys, tiny_voc):
    from support import hooks
    torch.manual_seed(0)
    net = sd.build_model("fcn", 21, "none").eval()
    val = data.read_split(tiny_voc, "val", sd.VOC_COLORMAP)
    for terminal in (False, True):
        monkeypatch.setattr(sys.stderr, "isatty", lambda: terminal)
        shown = []
        sd.evaluate(net, val, torch.device("cpu"), 21, 2,
                    progress=lambda images: hooks.progress(shown.append(1) or images, len(val), "validating"))
        err = capsys.readouterr().err
        assert shown == [1] and ("validating" in err) == terminal   # nohup ... > log: no bar frames in the log
