"""Confusion matrix and the metrics derived from it, against numbers worked out by hand."""
from __future__ import annotations

from fractions import Fraction as Fr

import pytest
import torch

import some_define as sd
from support import figures, prediction

V = sd.VOID
NAMES = ["background", "c1", "c2", "c3", "c4"]

# Five classes; class 3 is predicted once but never in the ground truth; class 4 appears nowhere.
TARGET = torch.tensor([[0, 0, 1, 1, V],
                       [2, 2, 1, V, 0]], dtype=torch.uint8)
PRED = torch.tensor([[0, 1, 1, 1, 0],
                     [2, 0, 1, 2, 3]])
# Labelled pixels (target -> pred): 0->0, 0->1, 1->1, 1->1, 2->2, 2->0, 1->1, 0->3. Void pixels predict 0 and 2.
EXPECTED_CM = [[1, 1, 0, 1, 0],     # ground truth 0: predicted 0, 1, 3
               [0, 3, 0, 0, 0],     # ground truth 1: predicted 1 three times
               [1, 0, 1, 0, 0],     # ground truth 2: predicted 2, 0
               [0, 0, 0, 0, 0],
               [0, 0, 0, 0, 0]]


def test_confusion_matrix_by_hand():
    cm = sd.confusion_matrix(PRED, TARGET, 5)
    assert cm.dtype == torch.int64 and cm.tolist() == EXPECTED_CM


def test_metrics_by_hand():
    m = sd.SegMetrics(5)
    m.update(PRED, TARGET)
    r = m.compute(NAMES)
    assert r["confusion_matrix"] == EXPECTED_CM
    # 5 of the 8 labelled pixels are right.
    assert r["pixel_acc"] == pytest.approx(float(Fr(5, 8)))
    # Per-class accuracy over the classes present in the ground truth: 1/3, 3/3, 1/2.
    assert r["mean_class_acc"] == pytest.approx(float((Fr(1, 3) + 1 + Fr(1, 2)) / 3))
    # IoU = tp / (gt + pred - tp): c0 1/(3+2-1), c1 3/(3+4-3), c2 1/(2+1-1), c3 0/(0+1-0); c4 absent -> None.
    assert r["per_class_iou"] == pytest.approx({"background": 0.25, "c1": 0.75, "c2": 0.5, "c3": 0.0, "c4": None})
    assert r["per_class_iou"]["c4"] is None
    assert list(r["per_class_iou"]) == NAMES
    # mIoU over the four classes that are not absent.
    assert r["miou"] == pytest.approx((0.25 + 0.75 + 0.5 + 0.0) / 4)
    # The book's accuracy counts void as background: of the 2 void pixels 1 is predicted 0 -> (5 + 1) / (8 + 2).
    assert r["d2l_pixel_acc"] == pytest.approx(0.6)


def test_metrics_accumulate_over_updates():
    """Two updates (the example and its mirror image) add up; the results match a naive pixel loop."""
    m = sd.SegMetrics(5)
    m.update(PRED, TARGET)
    m.update(PRED.flip(-1), TARGET.flip(-1))
    r = m.compute(NAMES)
    assert r["confusion_matrix"] == [[2 * v for v in row] for row in EXPECTED_CM]
    assert m.void_pixels == 4 and m.void_as_background == 2
    assert r["pixel_acc"] == pytest.approx(0.625)
    assert r["miou"] == pytest.approx(0.375)
    assert r["d2l_pixel_acc"] == pytest.approx(0.6)


def naive_metrics(pairs, num_classes):
    cm = [[0] * num_classes for _ in range(num_classes)]
    void = void_bg = 0
    for pred, target in pairs:
        for p, t in zip(pred.flatten().tolist(), target.flatten().tolist()):
            if t == V:
                void += 1
                void_bg += p == 0
            else:
                cm[t][p] += 1
    return cm, void, void_bg


def test_metrics_match_a_naive_loop_on_random_data():
    g = torch.Generator().manual_seed(0)
    pairs = []
    for h, w in [(7, 9), (5, 4), (8, 8)]:
        target = torch.randint(0, 4, (h, w), generator=g).to(torch.uint8)     # classes 4 and 5 never in gt
        target[torch.rand(h, w, generator=g) < 0.2] = V
        pred = torch.randint(0, 5, (h, w), generator=g)                          # class 5 never predicted
        pairs.append((pred, target))
    m = sd.SegMetrics(6)
    for pred, target in pairs:
        m.update(pred, target)
    cm, void, void_bg = naive_metrics(pairs, 6)
    names = ["background"] + [str(c) for c in range(1, 6)]
    r = m.compute(names)
    assert r["confusion_matrix"] == cm
    total = sum(map(sum, cm))
    tp = [cm[c][c] for c in range(6)]
    assert r["pixel_acc"] == pytest.approx(sum(tp) / total)
    assert r["d2l_pixel_acc"] == pytest.approx((sum(tp) + void_bg) / (total + void))
    ious = {}
    for c in range(6):
        union = sum(cm[c]) + sum(row[c] for row in cm) - tp[c]
        ious[names[c]] = tp[c] / union if union else None
    assert ious["5"] is None and ious["4"] == 0.0
    assert r["per_class_iou"] == pytest.approx(ious)
    present = [v for v in ious.values() if v is not None]
    assert r["miou"] == pytest.approx(sum(present) / len(present))
    accs = [tp[c] / sum(cm[c]) for c in range(6) if sum(cm[c])]
    assert len(accs) == 4
    assert r["mean_class_acc"] == pytest.approx(sum(accs) / len(accs))


def test_all_void_and_empty():
    m = sd.SegMetrics(3)
    m.update(torch.tensor([[0, 1]]), torch.tensor([[V, V]], dtype=torch.uint8))
    r = m.compute(["background", "b", "c"])
    assert r["confusion_matrix"] == [[0] * 3] * 3
    assert r["pixel_acc"] == 0.0 and r["miou"] == 0.0 and r["mean_class_acc"] == 0.0
    assert r["per_class_iou"] == {"background": None, "b": None, "c": None}
    assert r["d2l_pixel_acc"] == pytest.approx(0.5)       # one of the two void pixels predicted as background
    assert sd.SegMetrics(3).compute(["background", "b", "c"])["d2l_pixel_acc"] == 0.0


def test_d2l_pixel_acc_only_where_class_0_is_background():
    """The book counts void pixels as background: that means nothing where class 0 is, say, CamVid's sky."""
    m = sd.SegMetrics(5)
    m.update(PRED, TARGET)
    assert "d2l_pixel_acc" in m.compute(NAMES)
    assert "d2l_pixel_acc" not in m.compute(["sky"] + NAMES[1:])
    table = prediction.metrics_table({"unet": m.compute(["sky"] + NAMES[1:])}, ["sky"] + NAMES[1:])
    assert "d2l_pixel_acc" not in table and "miou" in table


def test_image_title():
    # mIoU over the classes present (background 0.25, c1 0.75, c2 0.5, c3 0.0), and over the non-background ones.
    assert figures.image_title(PRED, TARGET, NAMES) == f"mIoU 0.38 (non-background {(0.75 + 0.5 + 0.0) / 3:.2f})"
    everything_background = torch.zeros_like(PRED)
    assert figures.image_title(everything_background, TARGET, NAMES).endswith("(non-background 0.00)")
    assert figures.image_title(PRED, TARGET, ["sky"] + NAMES[1:]) == "mIoU 0.38"   # no background class


def test_metrics_table_shows_absent_classes_as_dash():
    m = sd.SegMetrics(5)
    m.update(PRED, TARGET)
    table = prediction.metrics_table({"fcn": m.compute(NAMES)}, NAMES)
    lines = {line.split()[0]: line.split()[1:] for line in table.splitlines()[1:]}
    assert lines["c1"] == ["0.750"] and lines["c4"] == ["-"] and lines["miou"] == ["0.375"]
    assert lines["pixel_acc"] == ["0.625"] and lines["d2l_pixel_acc"] == ["0.600"]
