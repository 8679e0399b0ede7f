"""Segmentation metrics from a confusion matrix: aAcc, mIoU, mAcc in percent.

IoU = TP / (TP + FP + FN) per class, averaged over classes (paper 000, 000_03ca646f856607f9.txt,
section IV-B, eq. (9)); aAcc and mAcc as in paper 003 (003_b5ba2da3aed36e6d.txt, section IV),
all on a 0-100 scale. Classes that do not count are skipped in the means (mmsegmentation's
nanmean): for IoU a class absent from both prediction and ground truth, for Acc a class absent
from the ground truth. A confusion matrix with no labelled pixel has no metrics: ValueError.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

IGNORE_INDEX = 255


def _as_numpy(array: Any, name: str) -> np.ndarray:
    """numpy view of an array-like or a torch tensor (converted without importing torch)."""
    if hasattr(array, "detach") and hasattr(array, "cpu"):
        array = array.detach().cpu().numpy()
    array = np.asarray(array)
    if array.dtype.kind not in "iub":
        raise ValueError(f"{name} must hold integer class indices, got dtype {array.dtype}")
    return array


def confusion_matrix(
    pred: Any, target: Any, num_classes: int, ignore_index: int | None = IGNORE_INDEX
) -> np.ndarray:
    """K x K int64 counts, rows = ground-truth class, columns = predicted class.

    Pixels whose target is `ignore_index` are left out. Any shape works (a batch N x H x W
    counts every image); `pred` and `target` must have the same shape.
    """
    if num_classes < 1:
        raise ValueError(f"num_classes must be at least 1, got {num_classes}")
    pred = _as_numpy(pred, "pred")
    target = _as_numpy(target, "target")
    if pred.shape != target.shape:
        raise ValueError(f"pred shape {pred.shape} differs from target shape {target.shape}")
    pred = pred.reshape(-1).astype(np.int64, copy=False)
    target = target.reshape(-1).astype(np.int64, copy=False)
    if ignore_index is not None:
        valid = target != ignore_index
        if not valid.all():
            pred, target = pred[valid], target[valid]
    if target.size == 0:
        return np.zeros((num_classes, num_classes), dtype=np.int64)
    for name, values in (("target", target), ("pred", pred)):
        low, high = int(values.min()), int(values.max())
        if low < 0 or high >= num_classes:
            bad = low if low < 0 else high
            raise ValueError(f"{name} holds class {bad}, outside 0..{num_classes - 1}")
    counts = np.bincount(target * num_classes + pred, minlength=num_classes * num_classes)
    return counts.reshape(num_classes, num_classes)


def _nanmean(values: np.ndarray) -> float:
    counted = values[~np.isnan(values)]
    return float(counted.mean()) if counted.size else math.nan


def _as_list(values: np.ndarray) -> list[float | None]:
    # None rather than NaN: the lists go into JSON reports.
    return [None if math.isnan(v) else float(v) for v in values]


def segmentation_metrics(conf: Any) -> dict[str, Any]:
    """aAcc, mIoU, mAcc (percent) and per-class `IoU`/`Acc` lists (None = class does not count).

    Raises ValueError when `conf` counts no pixel (e.g. every target pixel was ignored).
    """
    conf = _as_numpy(conf, "confusion matrix").astype(np.float64)
    if conf.ndim != 2 or conf.shape[0] != conf.shape[1] or conf.shape[0] == 0:
        raise ValueError(f"confusion matrix must be square K x K, got shape {conf.shape}")
    total = conf.sum()
    if total == 0:
        raise ValueError("no labelled pixels: every target pixel was ignore_index (or none was given)")
    tp = np.diag(conf)
    gt = conf.sum(axis=1)  # TP + FN
    predicted = conf.sum(axis=0)  # TP + FP
    union = gt + predicted - tp  # TP + FP + FN
    with np.errstate(divide="ignore", invalid="ignore"):
        iou = np.where(union > 0, tp / union, np.nan) * 100.0
        acc = np.where(gt > 0, tp / gt, np.nan) * 100.0
    return {
        "aAcc": float(tp.sum() / total * 100.0),
        "mIoU": _nanmean(iou),
        "mAcc": _nanmean(acc),
        "IoU": _as_list(iou),
        "Acc": _as_list(acc),
        "pixels": int(total),
    }


class MetricAccumulator:
    """Sums confusion matrices over batches; `compute()` gives `segmentation_metrics`."""

    def __init__(self, num_classes: int, ignore_index: int | None = IGNORE_INDEX) -> None:
        if num_classes < 1:
            raise ValueError(f"num_classes must be at least 1, got {num_classes}")
        self.num_classes = num_classes
        self.ignore_index = ignore_index
        self.confusion = np.zeros((num_classes, num_classes), dtype=np.int64)

    def update(self, pred: Any, target: Any) -> None:
        """Add a prediction/target pair (any matching shapes, e.g. N x H x W)."""
        self.confusion += confusion_matrix(pred, target, self.num_classes, self.ignore_index)

    def compute(self) -> dict[str, Any]:
        """Metrics over everything added so far (ValueError if no labelled pixel was seen)."""
        return segmentation_metrics(self.confusion)

    def reset(self) -> None:
        self.confusion[...] = 0

    def __repr__(self) -> str:
        return f"MetricAccumulator(num_classes={self.num_classes}, pixels={int(self.confusion.sum())})"
