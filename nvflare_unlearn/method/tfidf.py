"""TF-IDF channel scores for one class to forget (paper Eq. 6-8 and A.2; the released code's variant as an option).

A layer is a "corpus": each class is a document, each channel a word, and the class-mean activation ``A[k, j]``
is how often word ``j`` appears in document ``k``. docs/method.md writes out every formula implemented here.
"""

from __future__ import annotations

import numbers
from typing import Any, Mapping

import numpy as np

from nvflare_unlearn._validation import check_choice, check_class_id, check_finite
from nvflare_unlearn.options import IDF_VARIANTS, TF_NORMS

# ``A[k, j] >= mean`` is decided with this relative slack so a row of equal values (whose float mean can land one
# ulp above them) still counts every channel as "at least the mean", as exact arithmetic would.
_REL_TOL = 1e-12


def _as_means(class_activations: Any) -> dict[str, np.ndarray]:
    # Accept a ClassActivationReport without importing torch-side code at module import time.
    means = getattr(class_activations, "means", None)
    if callable(means):
        class_activations = means()
    if not isinstance(class_activations, Mapping) or not class_activations:
        raise ValueError("class_activations must be a non-empty dict of layer name -> [num_classes, channels] array")
    out: dict[str, np.ndarray] = {}
    k_ref: tuple[str, int] | None = None
    for name, arr in class_activations.items():
        try:
            a = np.asarray(arr, dtype=np.float64)
        except (TypeError, ValueError):
            raise ValueError(f"layer {name!r}: class activations are not numeric") from None
        if a.ndim != 2:
            raise ValueError(f"layer {name!r}: expected a 2-D [num_classes, channels] array, got shape {a.shape}")
        if a.shape[0] < 2 or a.shape[1] < 1:
            raise ValueError(f"layer {name!r}: need >= 2 classes and >= 1 channel, got shape {a.shape}")
        if k_ref is None:
            k_ref = (str(name), a.shape[0])
        elif a.shape[0] != k_ref[1]:
            raise ValueError(
                f"inconsistent number of classes: layer {name!r} has {a.shape[0]}, layer {k_ref[0]!r} has {k_ref[1]}"
            )
        check_finite(a, f"layer {name!r} class activations")
        if np.any(a < 0):
            raise ValueError(f"layer {name!r}: class activations must be non-negative (means of ReLU outputs)")
        out[str(name)] = a
    return out


def _at_least(values: np.ndarray, mean: np.ndarray) -> np.ndarray:
    return values >= mean - _REL_TOL * np.abs(mean)


def term_frequency(a: np.ndarray, forget_class: int) -> np.ndarray:
    """Eq. 6: each channel's share of the forget class's total activation in this layer (0 if the total is 0)."""
    row = a[forget_class]
    total = row.sum()
    return row / total if total > 0 else np.zeros_like(row)


def inverse_document_frequency(a: np.ndarray, variant: str = "paper") -> np.ndarray:
    """IDF per channel. ``paper`` (Eq. 7): ``log((1+K) / (1 + #{k: A[k,j] >= mean_j' A[k,j']}))``, always >= 0.

    ``reference`` (released code): ``log(K / (1 + #{k: A[k,j] >= mean_k' A[k',j]}))``, negative when a channel is
    above its own mean for every class (e.g. an all-zero channel).
    """
    check_choice(variant, "idf", IDF_VARIANTS)
    k = a.shape[0]
    if variant == "paper":
        count = _at_least(a, a.mean(axis=1, keepdims=True)).sum(axis=0)
        return np.log((1.0 + k) / (1.0 + count))
    count = _at_least(a, a.mean(axis=0, keepdims=True)).sum(axis=0)
    return np.log(k / (1.0 + count))


def tfidf_scores(
    class_activations: Mapping[str, Any] | Any,
    forget_class: int,
    idf: str = "paper",
    tf_norm: str = "share",
    coe: float | None = None,
) -> dict[str, np.ndarray]:
    """Score every channel of every layer for ``forget_class`` (Eq. 8: TF x IDF); higher = more class-specific.

    ``class_activations`` maps layer name -> ``[K, C]`` class means (or is a ClassActivationReport).
    ``tf_norm``: ``"share"`` (paper: TF sums to 1 per layer, so it shrinks as layers widen), ``"width"`` (share x C,
    so a global threshold does not favour narrow layers), ``"balance"`` (released code: share x ``1 + ln(C/coe)``;
    needs ``coe > 0``). Returns layer name -> float64 ``[C]``; always finite.
    """
    means = _as_means(class_activations)
    check_choice(idf, "idf", IDF_VARIANTS)
    check_choice(tf_norm, "tf_norm", TF_NORMS)
    num_classes = next(iter(means.values())).shape[0]
    forget_class = check_class_id(forget_class, num_classes)
    if tf_norm == "balance":
        if not isinstance(coe, numbers.Real) or isinstance(coe, bool) or not np.isfinite(float(coe)) or coe <= 0:
            raise ValueError(
                f"tf_norm='balance' needs a positive coe (the released code's balance constant), got {coe!r}"
            )
    elif coe is not None:
        raise ValueError(
            f"coe is only used with tf_norm='balance' (got tf_norm={tf_norm!r}); drop coe or change tf_norm"
        )

    scores: dict[str, np.ndarray] = {}
    for name, a in means.items():
        c = a.shape[1]
        tf = term_frequency(a, forget_class)
        if tf_norm == "width":
            tf = tf * c
        elif tf_norm == "balance":
            tf = tf * (1.0 + np.log(c / float(coe)))
        scores[name] = tf * inverse_document_frequency(a, idf)
    return scores
