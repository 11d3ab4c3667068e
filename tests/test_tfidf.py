"""TF-IDF scores (paper Eq. 6-8 / A.2 and the released-code variant), checked against hand-worked arithmetic."""

from __future__ import annotations

import math

import numpy as np
import pytest

from nvflare_unlearn.method.activations import ClassActivationReport
from nvflare_unlearn.method.tfidf import inverse_document_frequency, term_frequency, tfidf_scores

# 3 classes x 4 channels of class-mean activations.
A = np.array(
    [
        [4.0, 2.0, 2.0, 0.0],  # class 0: sum 8, row mean 2
        [1.0, 1.0, 1.0, 1.0],  # class 1: sum 4, row mean 1
        [0.0, 3.0, 0.0, 3.0],  # class 2: sum 6, row mean 1.5
    ]
)


def test_hand_worked_paper_idf():
    # TF for class 0 = row / row sum = [4, 2, 2, 0] / 8 = [0.5, 0.25, 0.25, 0]
    tf = [0.5, 0.25, 0.25, 0.0]
    # Paper IDF counts, per channel j, classes k with A[k, j] >= mean of row k:
    #   class 0 (mean 2):   4>=2 Y, 2>=2 Y, 2>=2 Y, 0>=2 N
    #   class 1 (mean 1):   all Y
    #   class 2 (mean 1.5): 0 N, 3 Y, 0 N, 3 Y
    #   counts = [2, 3, 2, 2];  IDF = log((1 + K) / (1 + count)) = log(4/3), log(4/4)=0, log(4/3), log(4/3)
    idf = [math.log(4 / 3), 0.0, math.log(4 / 3), math.log(4 / 3)]
    expected = [tf[j] * idf[j] for j in range(4)]  # = [0.5 log(4/3), 0, 0.25 log(4/3), 0]
    got = tfidf_scores({"conv": A}, forget_class=0)["conv"]
    np.testing.assert_allclose(got, expected, rtol=0, atol=1e-15)
    np.testing.assert_allclose(term_frequency(A, 0), tf)
    np.testing.assert_allclose(inverse_document_frequency(A, "paper"), idf)


def test_hand_worked_reference_idf():
    # Released code: count classes with A[k, j] >= mean over classes of column j:
    #   column means: ch0 5/3, ch1 2, ch2 1, ch3 4/3
    #   ch0: 4 Y, 1 N, 0 N -> 1;  ch1: 2 Y, 1 N, 3 Y -> 2;  ch2: 2 Y, 1 Y, 0 N -> 2;  ch3: 0 N, 1 N, 3 Y -> 1
    #   IDF = log(K / (1 + count)) = log(3/2), log(1)=0, 0, log(3/2)
    idf = [math.log(1.5), 0.0, 0.0, math.log(1.5)]
    got = tfidf_scores({"conv": A}, forget_class=0, idf="reference")["conv"]
    np.testing.assert_allclose(got, [0.5 * idf[0], 0.0, 0.0, 0.0], atol=1e-15)
    np.testing.assert_allclose(inverse_document_frequency(A, "reference"), idf)


def test_hand_worked_other_class_and_tf_norms():
    # Class 2: TF = [0, 3, 0, 3] / 6 = [0, 0.5, 0, 0.5]; paper IDF as above -> [0, 0, 0, 0.5 log(4/3)]
    share = tfidf_scores({"conv": A}, 2)["conv"]
    np.testing.assert_allclose(share, [0, 0, 0, 0.5 * math.log(4 / 3)], atol=1e-15)
    # width: TF x C (C = 4)
    np.testing.assert_allclose(tfidf_scores({"conv": A}, 2, tf_norm="width")["conv"], share * 4)
    # balance (released code): TF x (1 + ln(C / coe)) with coe = 2 -> x (1 + ln 2)
    np.testing.assert_allclose(
        tfidf_scores({"conv": A}, 2, tf_norm="balance", coe=2)["conv"], share * (1 + math.log(2))
    )


def test_width_norm_removes_layer_size_bias():
    # Two layers with identical per-channel behaviour, one 4x wider: with "share" the narrow layer's
    # scores are 4x larger; with "width" they are equal, so a global ranking treats them alike.
    rng = np.random.default_rng(0)
    narrow = rng.random((5, 8))
    wide = np.tile(narrow, (1, 4))
    share = tfidf_scores({"n": narrow, "w": wide}, 1)
    width = tfidf_scores({"n": narrow, "w": wide}, 1, tf_norm="width")
    np.testing.assert_allclose(share["n"], 4 * share["w"][:8])
    np.testing.assert_allclose(width["n"], width["w"][:8])


def test_degenerate_inputs_are_finite_and_defined():
    acts = {
        "zero_channel": np.array([[1.0, 0.0], [2.0, 0.0], [3.0, 0.0]]),
        "zero_layer_for_class": np.array([[0.0, 0.0], [1.0, 2.0], [3.0, 1.0]]),
        "all_zero": np.zeros((3, 2)),
        "equal_values": np.full((3, 3), 0.1),  # float mean can exceed the values by one ulp
    }
    for idf in ("paper", "reference"):
        for norm, coe in (("share", None), ("width", None), ("balance", 1.0)):
            s = tfidf_scores(acts, 0, idf=idf, tf_norm=norm, coe=coe)
            assert all(np.all(np.isfinite(v)) for v in s.values())
            # class 0 has no activation in these layers: TF is 0, so every score is exactly 0
            np.testing.assert_array_equal(s["zero_layer_for_class"], 0.0)
            np.testing.assert_array_equal(s["all_zero"], 0.0)
            assert s["zero_channel"][1] == 0.0
    # equal values: every class counts for every channel -> paper IDF log(4/4) = 0
    np.testing.assert_array_equal(inverse_document_frequency(acts["equal_values"], "paper"), 0.0)
    # an all-zero channel is ">= its column mean (0)" for all K classes: reference IDF log(K/(K+1)) < 0;
    # it is below every row mean (0.5, 1, 1.5): paper IDF log((1+K)/1) = log 4. Its TF is 0 either way.
    assert inverse_document_frequency(acts["zero_channel"], "reference")[1] == pytest.approx(math.log(3 / 4))
    assert inverse_document_frequency(acts["zero_channel"], "paper")[1] == pytest.approx(math.log(4))


def test_class_without_samples_via_report():
    sums = {"c": np.array([[2.0, 4.0], [0.0, 0.0], [3.0, 3.0]])}
    report = ClassActivationReport(sums=sums, counts=np.array([2, 0, 3]))
    scores = tfidf_scores(report, 1)  # class 1 has no samples: means row of 0 -> scores 0, not NaN
    np.testing.assert_array_equal(scores["c"], 0.0)
    # forget class 0 uses means [1, 2]: TF = [1/3, 2/3]
    s0 = tfidf_scores(report, 0)["c"]
    assert np.all(np.isfinite(s0))


@pytest.mark.parametrize(
    "acts, kwargs, match",
    [
        ({"c": A}, {"forget_class": 3}, "not a class id"),
        ({"c": A}, {"forget_class": -1}, "not a class id"),
        ({"c": A}, {"forget_class": 1.0}, "integer"),
        ({"c": A[0]}, {"forget_class": 0}, "2-D"),
        ({"c": A, "d": np.ones((4, 2))}, {"forget_class": 0}, "inconsistent number of classes"),
        ({"c": np.where(A == 4, np.nan, A)}, {"forget_class": 0}, "NaN or infinite"),
        ({"c": np.where(A == 4, np.inf, A)}, {"forget_class": 0}, "NaN or infinite"),
        ({"c": -A}, {"forget_class": 0}, "non-negative"),
        ({}, {"forget_class": 0}, "non-empty"),
        ({"c": A}, {"forget_class": 0, "idf": "bm25"}, "idf must be one of"),
        ({"c": A}, {"forget_class": 0, "tf_norm": "l2"}, "tf_norm must be one of"),
        ({"c": A}, {"forget_class": 0, "tf_norm": "balance"}, "positive coe"),
        ({"c": A}, {"forget_class": 0, "tf_norm": "balance", "coe": 0}, "positive coe"),
        ({"c": A}, {"forget_class": 0, "tf_norm": "balance", "coe": "2"}, "positive coe"),
        ({"c": A}, {"forget_class": 0, "coe": 2}, "only used with tf_norm='balance'"),
        ({"c": [["a", "b"], ["c", "d"]]}, {"forget_class": 0}, "not numeric"),
    ],
)
def test_bad_inputs_raise_clear_value_error(acts, kwargs, match):
    with pytest.raises(ValueError, match=match):
        tfidf_scores(acts, **kwargs)
