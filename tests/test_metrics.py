"""Segmentation metrics: exact values on hand-computed confusion matrices."""

import math

import numpy as np
import pytest
import torch

from seglock.models.metrics import MetricAccumulator, confusion_matrix, segmentation_metrics

# Three classes, six pixels: rows of the confusion matrix are ground truth, columns prediction.
TARGET = np.array([[0, 0, 1], [1, 2, 2]])
PRED = np.array([[0, 1, 1], [1, 2, 0]])
CONF = np.array([[1, 1, 0], [0, 2, 0], [1, 0, 1]])


def test_confusion_matrix_counts_target_rows_and_predicted_columns():
    conf = confusion_matrix(PRED, TARGET, 3)
    assert conf.dtype == np.int64
    assert conf.tolist() == CONF.tolist()


def test_metrics_match_hand_computed_values():
    # TP = (1, 2, 1); TP+FN = (2, 2, 2); TP+FP = (2, 3, 1); union = (3, 3, 2).
    m = segmentation_metrics(CONF)
    assert m["aAcc"] == pytest.approx(100 * 4 / 6, rel=1e-12)
    assert m["IoU"] == pytest.approx([100 / 3, 200 / 3, 50.0], rel=1e-12)
    assert m["mIoU"] == pytest.approx(100 * (1 / 3 + 2 / 3 + 1 / 2) / 3, rel=1e-12)  # 50
    assert m["Acc"] == pytest.approx([50.0, 100.0, 50.0], rel=1e-12)
    assert m["mAcc"] == pytest.approx(100 * 2 / 3, rel=1e-12)
    assert m["pixels"] == 6


def test_perfect_prediction_scores_100():
    m = segmentation_metrics(confusion_matrix(TARGET, TARGET, 3))
    assert (m["aAcc"], m["mIoU"], m["mAcc"]) == (100.0, 100.0, 100.0)


def test_class_absent_from_prediction_and_truth_does_not_count():
    m = segmentation_metrics(confusion_matrix(PRED, TARGET, 4))
    assert m["IoU"][3] is None and m["Acc"][3] is None
    assert m["mIoU"] == pytest.approx(50.0, rel=1e-12)
    assert m["mAcc"] == pytest.approx(100 * 2 / 3, rel=1e-12)


def test_class_predicted_but_absent_from_truth_counts_in_miou_not_in_macc():
    target = np.array([0, 0, 1, 1])
    pred = np.array([0, 2, 1, 1])
    m = segmentation_metrics(confusion_matrix(pred, target, 3))
    # IoU = (1/2, 2/2, 0/1); Acc = (1/2, 2/2, absent).
    assert m["IoU"] == pytest.approx([50.0, 100.0, 0.0], rel=1e-12)
    assert m["mIoU"] == pytest.approx(50.0, rel=1e-12)
    assert m["Acc"][:2] == pytest.approx([50.0, 100.0], rel=1e-12)
    assert m["Acc"][2] is None
    assert m["mAcc"] == pytest.approx(75.0, rel=1e-12)
    assert m["aAcc"] == pytest.approx(75.0, rel=1e-12)


def test_ignore_index_pixels_are_left_out_whatever_is_predicted_there():
    target = np.array([0, 255, 1, 255])
    pred = np.array([0, 1, 1, 200])
    assert confusion_matrix(pred, target, 2).tolist() == [[1, 0], [0, 1]]


def test_ignore_index_is_configurable():
    target = np.array([0, 1, 1])
    pred = np.array([0, 0, 1])
    assert confusion_matrix(pred, target, 2, ignore_index=1).tolist() == [[1, 0], [0, 0]]


def test_all_ignored_input_gives_an_empty_matrix_and_no_metrics():
    target = np.full((2, 2), 255)
    conf = confusion_matrix(np.zeros((2, 2), int), target, 3)
    assert conf.tolist() == [[0] * 3] * 3
    with pytest.raises(ValueError, match="no labelled pixels"):
        segmentation_metrics(conf)


@pytest.mark.parametrize(
    "pred, target, which",
    [
        ([0, 1], [0, 3], "target holds class 3"),
        ([0, 5], [0, 1], "pred holds class 5"),
        ([-1, 0], [0, 1], "pred holds class -1"),
    ],
)
def test_class_index_out_of_range_is_an_error(pred, target, which):
    with pytest.raises(ValueError, match=which):
        confusion_matrix(np.array(pred), np.array(target), 3)


def test_shape_mismatch_is_an_error():
    with pytest.raises(ValueError, match="differs from target shape"):
        confusion_matrix(np.zeros((2, 3), int), np.zeros((3, 2), int), 2)


def test_float_predictions_are_rejected():
    with pytest.raises(ValueError, match="integer class indices"):
        confusion_matrix(np.zeros(3), np.zeros(3, int), 2)


def test_non_square_confusion_matrix_is_rejected():
    with pytest.raises(ValueError, match="square"):
        segmentation_metrics(np.ones((2, 3), int))


def test_torch_tensors_give_the_same_matrix_as_numpy():
    conf = confusion_matrix(torch.from_numpy(PRED), torch.from_numpy(TARGET), 3)
    assert conf.tolist() == CONF.tolist()


def test_accumulator_sums_batches_like_one_big_batch():
    rng = np.random.default_rng(0)
    target = rng.integers(0, 5, size=(4, 8, 8))
    target[0, :2] = 255
    pred = rng.integers(0, 5, size=(4, 8, 8))
    acc = MetricAccumulator(5)
    for i in range(4):
        acc.update(torch.from_numpy(pred[i : i + 1]), torch.from_numpy(target[i : i + 1]))
    assert acc.confusion.tolist() == confusion_matrix(pred, target, 5).tolist()
    assert acc.compute() == segmentation_metrics(confusion_matrix(pred, target, 5))


def test_accumulator_with_nothing_added_raises_and_reset_clears():
    acc = MetricAccumulator(3)
    with pytest.raises(ValueError, match="no labelled pixels"):
        acc.compute()
    acc.update(PRED, TARGET)
    assert acc.compute()["pixels"] == 6
    acc.reset()
    assert int(acc.confusion.sum()) == 0


def test_all_wrong_prediction_scores_zero_not_nan():
    m = segmentation_metrics(np.array([[0, 3], [0, 0]]))  # class 0 always predicted as 1
    assert m["mIoU"] == 0.0 and not math.isnan(m["mAcc"])
    assert m["IoU"] == [0.0, 0.0] and m["Acc"] == [0.0, None]
