"""Pure numpy: which weights go.

A mask is a boolean array shaped like the weight: True keeps the weight, False prunes it. Scores rank
weights (higher = more important): magnitudes, or seeded random numbers as a baseline. Thresholds are
exact counts, not value cut-offs, so ties never make the achieved sparsity drift from the request.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass

import numpy as np


def magnitude_scores(weight: np.ndarray) -> np.ndarray:
    return np.abs(weight.astype(np.float64))


def random_scores(shape: tuple[int, ...], rng: np.random.Generator) -> np.ndarray:
    return rng.random(shape)


def weight_scores(weight: np.ndarray, criterion: str, rng: np.random.Generator) -> np.ndarray:
    """Scores for `criterion` ("magnitude" or "random"); `rng` is only drawn from for "random"."""
    if criterion == "random":
        return random_scores(weight.shape, rng)
    return magnitude_scores(weight)


def pruned_count(size: int, sparsity: float) -> int:
    """How many of `size` weights go at `sparsity` (rounded half up, so 2.5 -> 3)."""
    return min(size, int(math.floor(size * sparsity + 0.5)))


def lowest_scores_mask(scores: np.ndarray, prune: int) -> np.ndarray:
    """Keep everything except the `prune` lowest scores (ties broken by position: the earlier goes first).

    The same mask as pruning the first `prune` of a stable argsort, found by a partition in linear time (a
    2816x1024 layer at 50 %: 0.04 s of thread CPU instead of 0.46 s)."""
    flat = scores.reshape(-1)
    if prune <= 0:
        return np.ones(scores.shape, dtype=bool)
    if prune >= flat.size:
        return np.zeros(scores.shape, dtype=bool)
    threshold = np.partition(flat, prune - 1)[prune - 1]
    keep = flat >= threshold
    ties = np.flatnonzero(flat == threshold)
    keep[ties[: prune - (flat.size - int(np.count_nonzero(keep)))]] = False
    return keep.reshape(scores.shape)


def local_mask(scores: np.ndarray, sparsity: float) -> np.ndarray:
    """One layer pruned to `sparsity` on its own."""
    return lowest_scores_mask(scores, pruned_count(scores.size, sparsity))


def global_masks(scores: Mapping[str, np.ndarray], sparsity: float) -> dict[str, np.ndarray]:
    """One threshold across all layers: the lowest scores of the union go, wherever they live."""
    names = list(scores)
    flat = np.concatenate([scores[name].ravel() for name in names]) if names else np.zeros(0)
    keep = lowest_scores_mask(flat, pruned_count(flat.size, sparsity))
    masks, start = {}, 0
    for name in names:
        size = scores[name].size
        masks[name] = keep[start:start + size].reshape(scores[name].shape)
        start += size
    return masks


def global_threshold(scores: Mapping[str, np.ndarray], sparsity: float) -> float:
    """The score at which `global_masks` cuts (the highest score that is pruned), for reporting."""
    flat = np.concatenate([s.ravel() for s in scores.values()])
    prune = pruned_count(flat.size, sparsity)
    return float(np.sort(flat)[prune - 1]) if prune else float("-inf")


def n_m_mask(scores: np.ndarray, n: int, m: int, axis: int) -> np.ndarray:
    """Keep the `n` highest scores in every group of `m` consecutive weights along `axis`.

    `axis` is the reduction (input) dimension, as sparse tensor cores expect: for a Conv weight
    [out, in, kh, kw] the groups run along `in` at each (out, kh, kw) position. A trailing partial
    group of r < m weights keeps min(n, r) of them.
    """
    moved = np.moveaxis(scores, axis, -1)
    length = moved.shape[-1]
    padding = (-length) % m
    padded = np.pad(moved, [(0, 0)] * (moved.ndim - 1) + [(0, padding)], constant_values=-np.inf)
    groups = padded.reshape(*moved.shape[:-1], -1, m)
    ranks = np.argsort(np.argsort(-groups, axis=-1, kind="stable"), axis=-1, kind="stable")
    keep = (ranks < n).reshape(*moved.shape[:-1], -1)[..., :length]
    return np.moveaxis(keep, -1, axis)


def channel_l2_norms(weight: np.ndarray, axis: int) -> np.ndarray:
    """L2 norm of every slice of `weight` along `axis` (one value per output channel)."""
    moved = np.moveaxis(weight.astype(np.float64), axis, 0)
    return np.sqrt(np.square(moved.reshape(moved.shape[0], -1)).sum(axis=1))


def exact_kept_count(channels: int, sparsity: float) -> int:
    """Channels that stay when `sparsity` of `channels` go (at least one stays)."""
    return channels - min(pruned_count(channels, sparsity), channels - 1)


def kept_channel_counts(channel_counts: Sequence[int], sparsity: float, multiple: int = 1) -> list[int]:
    """How many channels every group keeps.

    With `multiple` > 1, groups whose width is a multiple of it (and at least twice it) keep a multiple of
    it too: CPU kernels (onnxruntime's blocked NCHWc convolutions) only run on aligned channel counts.
    Each group rounds up or down, whichever brings the running total closer to the request (error
    diffusion). When even so the overall sparsity would end up more than one point off the request
    (few, narrow groups), every group keeps its exact count instead.
    """
    exact = [exact_kept_count(c, sparsity) for c in channel_counts]
    if multiple <= 1:
        return exact
    aligned, removed, target = [], 0, 0.0
    for channels, exact_count in zip(channel_counts, exact):
        target += channels * sparsity
        if channels % multiple or channels < 2 * multiple:
            aligned.append(exact_count)
        else:
            low = (channels - exact_count) // multiple * multiple
            options = sorted({channels - min(r, channels - multiple) for r in (low, low + multiple)})
            aligned.append(min(options, key=lambda keep: abs(removed + channels - keep - target)))
        removed += channels - aligned[-1]
    total = sum(channel_counts)
    return aligned if total and abs(removed / total - sparsity) <= 0.01 else exact


def strongest_channels(scores: np.ndarray, keep: int) -> np.ndarray:
    """Sorted indices of the `keep` highest-scoring channels."""
    order = np.argsort(scores, kind="stable")
    return np.sort(order[scores.shape[0] - keep:])


def channels_to_keep(scores: np.ndarray, sparsity: float) -> np.ndarray:
    """Sorted indices of the channels that stay: the lowest-scoring ones go, at least one stays."""
    return strongest_channels(scores, exact_kept_count(scores.shape[0], sparsity))


def zero_fraction(weight: np.ndarray) -> float:
    return float(np.count_nonzero(weight == 0) / weight.size) if weight.size else 0.0


# ---------------------------------------------------------------------------------------------------
# One global threshold without holding every score: exact, a layer at a time


@dataclass(frozen=True)
class GlobalCut:
    """Where `global_masks` cuts, found without concatenating the scores: everything scored below `threshold`
    goes, and of the scores equal to it the first `ties_pruned` in layer order (global_masks' stable order)."""

    threshold: float
    ties_pruned: int


def global_cut(score_batches: Callable[[], Iterable[np.ndarray]], sparsity: float) -> GlobalCut | None:
    """The cut of `global_masks(scores, sparsity)` over non-negative scores that `score_batches()` yields a layer at
    a time, in order (called once per pass: 1 to count, 4 to find the threshold's 64 bits 16 at a time, as a radix
    select on the float64 bit patterns, which sort like the values for non-negative numbers). None: nothing goes."""
    total = sum(int(np.size(scores)) for scores in score_batches())
    rank = pruned_count(total, sparsity)  # 1-based rank of the highest score that goes
    if rank == 0:
        return None
    prefix = 0
    for shift in (48, 32, 16, 0):
        counts = np.zeros(1 << 16, np.int64)
        for scores in score_batches():
            bits = np.ascontiguousarray(scores, np.float64).reshape(-1).view(np.uint64)
            if shift < 48:
                bits = bits[(bits >> np.uint64(shift + 16)) == np.uint64(prefix)]
            counts += np.bincount(((bits >> np.uint64(shift)) & np.uint64(0xFFFF)).astype(np.intp),
                                  minlength=1 << 16)
            del scores, bits  # before the next layer's scores are made
        cumulative = np.cumsum(counts)
        digit = int(np.searchsorted(cumulative, rank, side="left"))
        rank -= int(cumulative[digit - 1]) if digit else 0
        prefix = (prefix << 16) | digit
    threshold = float(np.array([prefix], np.uint64).view(np.float64)[0])
    return GlobalCut(threshold, rank)  # the remaining rank counts the ties at the threshold that go


def cut_mask(scores: np.ndarray, cut: GlobalCut | None, ties_seen: int) -> tuple[np.ndarray, int]:
    """This layer's keep-mask under `cut`, given how many ties earlier layers held; and the ties counted so far."""
    if cut is None:
        return np.ones(scores.shape, dtype=bool), ties_seen
    keep = np.ascontiguousarray(scores >= cut.threshold)
    ties = np.flatnonzero(scores.reshape(-1) == cut.threshold)
    pruned_ties = ties[: max(0, cut.ties_pruned - ties_seen)]
    keep.reshape(-1)[pruned_ties] = False
    return keep, ties_seen + len(ties)
