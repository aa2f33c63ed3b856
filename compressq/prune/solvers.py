"""Pure numpy: masked ridge least squares for every output channel of a layer at once.

One layer, normal equations shared by all its outputs: G = X^T X (features x features), C = X^T Y
(features x outputs). Output o keeps the columns `keep[o]` (the rest stay exactly zero) and solves

    minimise  ||X w - y_o||^2 + s_o ||w - w0_o||^2   over w with w[~keep[o]] = 0,
    i.e.      (G[k, k] + s_o I) w[k] = C[k, o] + s_o w0_o[k]   for k = keep[o],

with s_o = ridge x mean(diag G[k, k]) and w0_o the pruned weights. The ridge term pulls towards w0, so
the unregularised error at the solution is never above the error at w0.

Two ways to the same solution, chosen by their cost:
  * direct: outputs that share one pattern (N:M with few patterns, channel refit: all dense) share one
    factorisation with many right-hand sides;
  * iterative: with unstructured sparsity every output has its own pattern, and one factorisation per output
    (k^3 for k kept weights) is what made refit slow. Instead, conjugate gradients run on all outputs
    together: each iteration is one matrix product [outputs, features] x G, masked, with a Jacobi
    preconditioner (diag G + s_o). Started from w0, every iteration lowers each output's objective (CG
    minimises it over a growing Krylov space), so stopping early is still an improvement. It stops once an
    iteration gains less than `tolerance` of what all iterations gained so far.
Either way the result is checked per output against w0 on the unregularised error and w0 kept where the
fit is not better, so rounding can never make a layer worse.
"""

from __future__ import annotations

import numpy as np

CG_TOLERANCE = 1e-6  # stop when an iteration gains < this fraction of the total gain (gap to exact ~1e-5)
CG_MAX_ITERATIONS = 250


def squared_errors(weights: np.ndarray, gram: np.ndarray, cross: np.ndarray,
                   target_energy: np.ndarray) -> np.ndarray:
    """||X w_o - y_o||^2 for every output o (rows of `weights`), from G, C and sum(y_o^2) alone."""
    return (np.einsum("of,of->o", weights, weights @ gram) - 2 * np.einsum("of,fo->o", weights, cross)
            + target_energy)


def ridge_strengths(gram: np.ndarray, keep: np.ndarray, ridge: float) -> np.ndarray:
    """s_o = ridge x mean(diag G[k, k]) over each output's kept columns k."""
    counts = np.maximum(keep.sum(axis=1), 1)
    return ridge * np.maximum(keep @ np.diag(gram) / counts, 1e-12)


def masked_ridge_solve(gram: np.ndarray, cross: np.ndarray, target_energy: np.ndarray, weights: np.ndarray,
                       keep: np.ndarray, ridge: float) -> tuple[np.ndarray, str]:
    """Refit rows of `weights` [outputs, features] on columns `keep` (same shape, bool); zeros elsewhere.

    Returns the fitted weights (float64) and which method ran ("direct" or "cg N iterations"). Statistics that
    overflowed (inf/NaN sums) make every fit non-finite, and never_worse then keeps `weights`: silently, the
    caller says why."""
    with np.errstate(invalid="ignore", over="ignore", divide="ignore"):
        return _masked_ridge_solve(gram, cross, target_energy, weights, keep, ridge)


def _masked_ridge_solve(gram: np.ndarray, cross: np.ndarray, target_energy: np.ndarray, weights: np.ndarray,
                        keep: np.ndarray, ridge: float) -> tuple[np.ndarray, str]:
    weights = weights.astype(np.float64)
    keep = keep.astype(bool)
    strengths = ridge_strengths(gram, keep, ridge)
    rhs = cross.T + strengths[:, None] * weights  # [outputs, features]
    patterns, inverse = np.unique(keep, axis=0, return_inverse=True)
    inverse = inverse.ravel()
    if _direct_cost(patterns, np.bincount(inverse)) <= _iterative_cost(weights.shape):
        fitted, method = _solve_by_pattern(gram, rhs, strengths, patterns, inverse), "direct"
    else:
        fitted, iterations = masked_conjugate_gradient(gram, rhs, keep, strengths, np.where(keep, weights, 0.0))
        method = f"cg {iterations} iterations"
    return never_worse(fitted, weights, gram, cross, target_energy), method


def never_worse(fitted: np.ndarray, start: np.ndarray, gram: np.ndarray, cross: np.ndarray,
                target_energy: np.ndarray) -> np.ndarray:
    """`fitted`, except outputs whose unregularised error is not below or equal to that of `start` (also when
    either is not finite: statistics that overflowed prove nothing): those keep `start`."""
    with np.errstate(over="ignore", invalid="ignore"):
        fitted_error = squared_errors(fitted, gram, cross, target_energy)
        start_error = squared_errors(start, gram, cross, target_energy)
        better = (fitted_error <= start_error) & np.isfinite(fitted_error) & np.all(np.isfinite(fitted), axis=1)
    return fitted if better.all() else np.where(better[:, None], fitted, start)


# Measured on the layers of a YOLOv8n-size detector: one small LU solve per output (gather, factorise,
# substitute) runs ~8x fewer flops per second than the large matrix products of the iterative solver.
DIRECT_SLOWDOWN = 8


def _direct_cost(patterns: np.ndarray, outputs_per_pattern: np.ndarray) -> float:
    kept = patterns.sum(axis=1).astype(np.float64)
    return DIRECT_SLOWDOWN * float(np.sum(2 * kept ** 3 / 3 + 2 * kept ** 2 * outputs_per_pattern))


def _iterative_cost(shape: tuple[int, int]) -> float:
    # A typical run: ~60 iterations of one [outputs, features] x [features, features] product.
    outputs, features = shape
    return 60 * 2.0 * outputs * features ** 2


def _solve_by_pattern(gram: np.ndarray, rhs: np.ndarray, strengths: np.ndarray, patterns: np.ndarray,
                      inverse: np.ndarray) -> np.ndarray:
    fitted = np.zeros_like(rhs)
    for pattern_id, pattern in enumerate(patterns):
        outputs = np.flatnonzero(inverse == pattern_id)
        columns = np.flatnonzero(pattern)
        if not columns.size:
            continue
        system = gram[np.ix_(columns, columns)] + strengths[outputs[0]] * np.eye(columns.size)
        right = rhs[np.ix_(outputs, columns)].T
        try:
            solution = np.linalg.solve(system, right)
        except np.linalg.LinAlgError:
            solution = np.linalg.lstsq(system, right, rcond=None)[0]
        fitted[np.ix_(outputs, columns)] = solution.T
    return fitted


def masked_conjugate_gradient(gram: np.ndarray, rhs: np.ndarray, keep: np.ndarray, strengths: np.ndarray,
                              start: np.ndarray, tolerance: float = CG_TOLERANCE,
                              max_iterations: int = CG_MAX_ITERATIONS) -> tuple[np.ndarray, int]:
    """Solve (G + s_o I) w_o = rhs_o on the columns keep[o], for all outputs o together, from `start`.

    Preconditioned CG per output (Jacobi: diag G + s_o), vectorised over outputs: one masked matrix product
    per iteration. Returns the solution (zero outside `keep`) and the iterations run."""
    mask = keep.astype(np.float64)
    inverse_diagonal = mask / (np.diag(gram)[None, :] + strengths[:, None])
    solution = start * mask
    residual = (rhs - solution @ gram - strengths[:, None] * solution) * mask
    preconditioned = residual * inverse_diagonal
    direction = preconditioned.copy()
    rz = np.einsum("of,of->o", residual, preconditioned)
    total_gain = 0.0
    for iteration in range(1, max_iterations + 1):
        product = (direction @ gram + strengths[:, None] * direction) * mask
        curvature = np.einsum("of,of->o", direction, product)
        usable = curvature > 0
        step = np.where(usable, rz / np.where(usable, curvature, 1.0), 0.0)
        solution += step[:, None] * direction
        residual -= step[:, None] * product
        gain = float(np.sum(step * rz)) / 2  # the objective's decrease this iteration, over all outputs
        total_gain += gain
        preconditioned = residual * inverse_diagonal
        rz_next = np.einsum("of,of->o", residual, preconditioned)
        direction = preconditioned + np.where(rz > 0, rz_next / np.where(rz > 0, rz, 1.0), 0.0)[:, None] * direction
        rz = rz_next
        if gain <= tolerance * total_gain or not np.any(rz > 0):
            return solution, iteration
    return solution, max_iterations
