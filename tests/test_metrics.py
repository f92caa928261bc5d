"""Classification metrics (pwconv_cy.metrics) against brute-force counts."""
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from pwconv_cy.metrics import classification_report, confusion_matrix


@settings(max_examples=50, deadline=None)
@given(n_classes=st.integers(1, 6), data=st.data())
def test_report_matches_brute_force_counts(n_classes, data):
    labels = st.integers(0, n_classes - 1)
    pairs = data.draw(st.lists(st.tuples(labels, labels), min_size=1, max_size=60))
    y_true = np.array([t for t, _ in pairs])
    y_pred = np.array([p for _, p in pairs])
    cm = confusion_matrix(y_true, y_pred, n_classes)
    for t in range(n_classes):
        for p in range(n_classes):
            assert cm[t, p] == sum(1 for a, b in pairs if a == t and b == p)
    report = classification_report(y_true, y_pred, n_classes)
    assert report["overall_accuracy"] == sum(a == b for a, b in pairs) / len(pairs)
    per_class = []
    for c in range(n_classes):
        members = [b for a, b in pairs if a == c]
        if members:
            per_class.append(sum(b == c for b in members) / len(members))
            assert report["per_class_accuracy"][c] == pytest.approx(per_class[-1])
        else:
            assert report["per_class_accuracy"][c] is None
    assert report["mean_class_accuracy"] == pytest.approx(sum(per_class) / len(per_class))
    assert report["n_samples"] == len(pairs) and sum(report["support"]) == len(pairs)


def test_report_example_and_errors():
    report = classification_report([0, 0, 0, 1], [0, 0, 1, 1], 3, ["a", "b", "c"])
    assert report["overall_accuracy"] == 0.75
    assert report["per_class_accuracy"] == [2 / 3, 1.0, None]
    assert report["mean_class_accuracy"] == pytest.approx((2 / 3 + 1) / 2)
    assert report["confusion_matrix"] == [[2, 1, 0], [0, 1, 0], [0, 0, 0]]
    assert report["class_names"] == ["a", "b", "c"]
    with pytest.raises(ValueError, match=r"y_pred must be in \[0, 2\], found values from 0 to 3"):
        confusion_matrix([0, 1], [0, 3], 3)
    with pytest.raises(ValueError, match="same length, got 2 and 1"):
        confusion_matrix([0, 1], [0], 3)
