"""The export report's deployed accuracy: computed from the artifact's own outputs, not assumed."""

from __future__ import annotations

import numpy as np

from fxquant.backends.base import top1_accuracy


def test_top1_of_the_first_output_against_labels() -> None:
    logits = np.array([[3, 1, 0], [0, 5, 2], [1, 1, 7], [9, 0, 0]], np.int64)
    assert top1_accuracy([logits], np.array([0, 1, 2, 1])) == {"top1": 75.0, "n": 4}


def test_no_accuracy_without_labels_or_for_a_non_classifier_output() -> None:
    assert top1_accuracy([np.zeros((4, 3))], None) is None
    assert top1_accuracy([np.zeros((4, 3, 2))], np.zeros(4, np.int64)) is None  # not (N, C)
    assert top1_accuracy([np.zeros((4, 3))], np.zeros(4)) is None  # float labels: a regression target
