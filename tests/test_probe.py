"""Tests for charnn.probe: the linear probe's logistic regression and its cross-validated L2 strength."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from charnn.probe import DEFAULT_C, fit_probe, fold_ids, usable_folds

sklearn = pytest.importorskip("sklearn", reason="scikit-learn (a test extra) checks the probe's solutions")
from sklearn.linear_model import LogisticRegression
from sklearn.preprocessing import StandardScaler


def blobs(n: int, d: int, classes: int, spread: float, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Gaussian clusters (features on unequal scales and offsets, as pooled LSTM features are)."""
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(classes, d))
    y = np.arange(n) % classes
    x = centres[y] + spread * rng.normal(size=(n, d))
    return (x * rng.uniform(0.1, 5, d) + rng.normal(size=d)).astype(np.float32), y


def probabilities(fit, x: np.ndarray) -> np.ndarray:
    return torch.softmax(torch.from_numpy(x) @ fit.weight.T + fit.bias, 1).numpy()


@pytest.mark.parametrize("c", [0.01, 1.0])
def test_matches_scikit_learn_logistic_regression_at_a_given_c(c):
    x, y = blobs(120, 6, 3, spread=1.5)
    fit = fit_probe(torch.from_numpy(x), y, c_grid=(c,))
    assert fit.c == c and fit.folds == 5
    scaler = StandardScaler().fit(x)
    ref = LogisticRegression(C=c, max_iter=5000, tol=1e-10).fit(scaler.transform(x), y)
    np.testing.assert_allclose(probabilities(fit, x), ref.predict_proba(scaler.transform(x)), atol=2e-4)


def test_class_weights_match_scikit_learns_balanced_weights():
    x, y = blobs(150, 5, 3, spread=2.0, seed=1)
    keep = np.flatnonzero((y != 2) | (np.arange(len(y)) % 5 == 0))  # class 2 rare
    x, y = x[keep], y[keep]
    counts = np.bincount(y)
    weights = torch.tensor(len(y) / (3 * counts), dtype=torch.float32)
    fit = fit_probe(torch.from_numpy(x), y, class_weights=weights, c_grid=(0.3,))
    scaler = StandardScaler().fit(x)
    ref = LogisticRegression(C=0.3, class_weight="balanced", max_iter=5000, tol=1e-10).fit(scaler.transform(x), y)
    np.testing.assert_allclose(probabilities(fit, x), ref.predict_proba(scaler.transform(x)), atol=2e-4)


def test_multi_label_matches_one_logistic_regression_per_class():
    x, y = blobs(100, 4, 2, spread=1.0, seed=2)
    rng = np.random.default_rng(3)
    second = (x[:, 1] + 0.5 * rng.normal(size=len(x)) > np.median(x[:, 1])).astype(np.int64)
    targets = np.stack([y, second], 1).astype(np.float32)
    fit = fit_probe(torch.from_numpy(x), targets, multi_label=True, c_grid=(0.5,))
    scaler = StandardScaler().fit(x)
    got = torch.sigmoid(torch.from_numpy(x) @ fit.weight.T + fit.bias).numpy()
    for k in range(2):
        ref = LogisticRegression(C=0.5, max_iter=5000, tol=1e-10).fit(scaler.transform(x), targets[:, k])
        np.testing.assert_allclose(got[:, k], ref.predict_proba(scaler.transform(x))[:, 1], atol=2e-4)


def test_cross_validation_regularises_noise_and_trusts_clean_signal():
    rng = np.random.default_rng(4)
    noise = rng.normal(size=(80, 40)).astype(np.float32)
    noise_fit = fit_probe(torch.from_numpy(noise), rng.integers(0, 2, 80))  # labels unrelated to the features
    clean_x, clean_y = blobs(80, 40, 2, spread=0.3, seed=5)
    clean_fit = fit_probe(torch.from_numpy(clean_x), clean_y)
    assert noise_fit.c == min(noise_fit.cv_loss)  # the strongest regularisation in the grid
    assert clean_fit.c > noise_fit.c * 100
    assert min(clean_fit.cv_loss.values()) < 0.1 < min(noise_fit.cv_loss.values())


def test_folds_are_stratified_and_reproducible():
    y = np.array([0] * 12 + [1] * 7 + [2] * 5)
    fold = fold_ids(y, False, 5, seed=7)
    np.testing.assert_array_equal(fold, fold_ids(y, False, 5, seed=7))
    for c in range(3):
        per_fold = np.bincount(fold[y == c], minlength=5)
        assert per_fold.max() - per_fold.min() <= 1, (c, per_fold)
    assert usable_folds(y, False) == 5
    assert usable_folds(np.array([0, 0, 0, 1, 1]), False) == 2


def test_a_class_too_small_to_cross_validate_falls_back_to_the_default_strength():
    x, y = blobs(7, 3, 2, spread=0.5)
    y = np.array([0, 0, 0, 0, 0, 0, 1])
    fit = fit_probe(torch.from_numpy(x), y)
    assert fit.folds == 0 and fit.c == DEFAULT_C and fit.cv_loss == {}
    assert torch.isfinite(fit.weight).all()


def test_the_head_has_every_class_even_one_absent_from_the_fitting_texts():
    x, y = blobs(40, 3, 2, spread=0.5)
    fit = fit_probe(torch.from_numpy(x), y, outputs=3)  # class 2 went wholly to validation
    assert fit.weight.shape == (3, 3) and fit.bias.shape == (3,)
