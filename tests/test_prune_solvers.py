"""Refit's masked ridge least squares (compressq/prune/solvers.py) against a per-channel numpy reference."""

from __future__ import annotations

import numpy as np
import pytest
from numpy.lib.stride_tricks import sliding_window_view

from compressq.prune.solvers import (
    masked_conjugate_gradient,
    masked_ridge_solve,
    never_worse,
    ridge_strengths,
    squared_errors,
)


def reference(gram, cross, weights, keep, ridge):
    """One output at a time: (G[k,k] + s I) w = C[k,o] + s w0[k], s = ridge x mean diag G[k,k]."""
    fitted = np.zeros_like(weights)
    for output in range(weights.shape[0]):
        kept = np.flatnonzero(keep[output])
        block = gram[np.ix_(kept, kept)]
        strength = ridge * np.mean(np.diag(block))
        fitted[output, kept] = np.linalg.solve(block + strength * np.eye(kept.size),
                                               cross[kept, output] + strength * weights[output, kept])
    return fitted


def conv_layer(seed: int, channels: int = 12, outputs: int = 20, rows: int = 600):
    """Normal equations of a 3x3 conv on smooth images (neighbouring pixels correlate, as in real layers,
    so G is ill-conditioned), with a bias column, a teacher that is not in the model's span, and weights
    pruned to 50 % unstructured: every output its own pattern."""
    rng = np.random.default_rng(seed)
    image = rng.standard_normal((channels, 40, 40)).cumsum(axis=1).cumsum(axis=2) / 20
    patches = sliding_window_view(image, (3, 3), axis=(1, 2)).transpose(1, 2, 0, 3, 4).reshape(-1, channels * 9)
    inputs = patches[rng.choice(len(patches), rows, replace=False)]
    inputs = np.hstack([inputs, np.ones((rows, 1))])
    features = inputs.shape[1]
    dense = rng.standard_normal((outputs, features)) / np.sqrt(features)
    targets = np.tanh(inputs @ dense.T) + 0.05 * rng.standard_normal((rows, outputs))
    weights = np.where(rng.random(dense.shape) < 0.5, 0.0, dense)
    keep = weights != 0
    keep[:, -1] = True
    return inputs.T @ inputs, inputs.T @ targets, np.square(targets).sum(axis=0), weights, keep


@pytest.mark.parametrize("seed", range(4))
def test_conjugate_gradient_reaches_the_per_channel_solution_and_keeps_the_zeros(seed):
    gram, cross, energy, weights, keep = conv_layer(seed)
    ridge = 0.01
    expected = reference(gram, cross, weights, keep, ridge)
    strengths = ridge_strengths(gram, keep, ridge)
    got, iterations = masked_conjugate_gradient(gram, cross.T + strengths[:, None] * weights, keep, strengths,
                                                weights)
    assert iterations < 250
    assert np.all(got[~keep] == 0)
    # What counts is the error: the CG solution is within 0.1 % of the exact one's gain over the pruned weights.
    start, exact = squared_errors(weights, gram, cross, energy), squared_errors(expected, gram, cross, energy)
    gap = (squared_errors(got, gram, cross, energy) - exact) / (start - exact)
    assert np.all(np.abs(gap) < 1e-3)
    np.testing.assert_allclose(got, expected, atol=0.05 * np.abs(expected).max())


def test_masked_ridge_solve_picks_cg_for_per_output_patterns_and_direct_for_shared_ones():
    gram, cross, energy, weights, keep = conv_layer(7, channels=32, outputs=16)
    fitted, method = masked_ridge_solve(gram, cross, energy, weights, keep, 0.01)
    assert method.startswith("cg")
    assert np.all(fitted[~keep] == 0)
    expected = reference(gram, cross, weights, keep, 0.01)
    exact, start = squared_errors(expected, gram, cross, energy), squared_errors(weights, gram, cross, energy)
    assert np.all((squared_errors(fitted, gram, cross, energy) - exact) / (start - exact) < 1e-3)

    shared = np.broadcast_to(keep[0], keep.shape)  # channel refit: one pattern for every output
    dense_weights = np.where(shared, weights + 0.1, 0.0)
    fitted, method = masked_ridge_solve(gram, cross, energy, dense_weights, shared, 0.01)
    assert method == "direct"
    np.testing.assert_allclose(fitted, reference(gram, cross, dense_weights, shared, 0.01), rtol=1e-6, atol=1e-9)


@pytest.mark.parametrize("iterations", [1, 2, 5, 250])
def test_calibration_error_never_grows_however_early_cg_stops(iterations):
    gram, cross, energy, weights, keep = conv_layer(3)
    strengths = ridge_strengths(gram, keep, 0.01)
    got, _ = masked_conjugate_gradient(gram, cross.T + strengths[:, None] * weights, keep, strengths, weights,
                                       max_iterations=iterations)
    assert np.all(squared_errors(got, gram, cross, energy) <= squared_errors(weights, gram, cross, energy))


def test_never_worse_keeps_the_pruned_weights_of_outputs_a_fit_made_worse():
    gram, cross, energy, weights, keep = conv_layer(5)
    fitted = reference(gram, cross, weights, keep, 0.01)
    spoiled = fitted.copy()
    spoiled[3] = 10 * weights[3]  # far off: worse than the pruned weights
    result = never_worse(spoiled, weights, gram, cross, energy)
    np.testing.assert_array_equal(result[3], weights[3])
    np.testing.assert_array_equal(np.delete(result, 3, axis=0), np.delete(fitted, 3, axis=0))
    assert np.all(squared_errors(result, gram, cross, energy) <= squared_errors(weights, gram, cross, energy))


def test_a_rank_deficient_layer_with_fewer_rows_than_weights_still_solves():
    """Deep detector layers see few rows per weight (20x20 positions x a few images for 2304 weights)."""
    gram, cross, energy, weights, keep = conv_layer(2, channels=32, rows=150)
    assert np.linalg.matrix_rank(gram) < gram.shape[0]
    fitted, _ = masked_ridge_solve(gram, cross, energy, weights, keep, 0.01)
    assert np.all(fitted[~keep] == 0) and np.all(np.isfinite(fitted))
    expected = reference(gram, cross, weights, keep, 0.01)
    exact, start = squared_errors(expected, gram, cross, energy), squared_errors(weights, gram, cross, energy)
    assert np.all((squared_errors(fitted, gram, cross, energy) - exact) / (start - exact) < 1e-3)


def test_statistics_that_overflowed_leave_the_pruned_weights_in_place():
    gram, cross, energy, weights, keep = conv_layer(4)
    gram = gram.copy()
    gram[0, 0] = np.inf  # float32 batch sums of huge inputs overflow
    fitted, _ = masked_ridge_solve(gram, cross, energy, weights, keep, 0.01)
    np.testing.assert_array_equal(fitted, weights)
