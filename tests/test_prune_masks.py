"""prune/masks.py: pure numpy masks checked against simple references."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays

from compressq.prune import weight_masks
from compressq.prune.config import PruneConfig
from compressq.prune.masks import (
    channel_l2_norms,
    channels_to_keep,
    global_masks,
    global_threshold,
    kept_channel_counts,
    local_mask,
    magnitude_scores,
    n_m_mask,
    pruned_count,
    strongest_channels,
)

finite = st.floats(-10, 10, allow_nan=False, width=32)
weights_2d = arrays(np.float32, st.tuples(st.integers(1, 12), st.integers(1, 12)), elements=finite)
sparsities = st.floats(0.01, 0.99)


@pytest.mark.parametrize(("size", "sparsity", "expected"), [(10, 0.25, 3), (10, 0.5, 5), (4, 0.3, 1), (3, 0.99, 3)])
def test_pruned_count_rounds_half_up(size, sparsity, expected):
    assert pruned_count(size, sparsity) == expected


@settings(max_examples=60, deadline=None)
@given(weights_2d, sparsities)
def test_local_mask_prunes_exactly_the_requested_count_of_smallest_magnitudes(weight, sparsity):
    scores = magnitude_scores(weight)
    keep = local_mask(scores, sparsity)
    assert keep.shape == weight.shape
    assert np.count_nonzero(~keep) == pruned_count(weight.size, sparsity)
    if keep.any() and (~keep).any():
        assert scores[~keep].max() <= scores[keep].min()


@settings(max_examples=60, deadline=None)
@given(st.lists(weights_2d, min_size=1, max_size=4), sparsities)
def test_global_masks_match_one_sorted_threshold_over_all_layers(layers, sparsity):
    scores = {f"layer{i}": magnitude_scores(w) for i, w in enumerate(layers)}
    masks = global_masks(scores, sparsity)
    pruned_scores = np.concatenate([scores[n][~masks[n]] for n in scores])
    kept_scores = np.concatenate([scores[n][masks[n]] for n in scores])
    total = sum(w.size for w in layers)
    assert pruned_scores.size == pruned_count(total, sparsity)
    if pruned_scores.size and kept_scores.size:
        assert pruned_scores.max() <= kept_scores.min()
        assert global_threshold(scores, sparsity) == pruned_scores.max()


def test_global_scope_prunes_the_quieter_layer_harder_while_local_treats_layers_alike():
    rng = np.random.default_rng(0)
    scores = {"loud": np.abs(rng.normal(0, 10, (32, 32))), "quiet": np.abs(rng.normal(0, 1, (32, 32)))}
    masks = global_masks(scores, 0.5)
    assert (~masks["quiet"]).mean() > 0.8 > 0.2 > (~masks["loud"]).mean()
    for score in scores.values():
        assert (~local_mask(score, 0.5)).mean() == 0.5


def reference_n_m(scores: np.ndarray, n: int, m: int) -> np.ndarray:
    """Row by row, group by group, with Python loops (groups run along the last axis)."""
    keep = np.zeros(scores.shape, dtype=bool)
    for row in range(scores.shape[0]):
        for start in range(0, scores.shape[1], m):
            group = scores[row, start:start + m]
            order = sorted(range(len(group)), key=lambda i: (-group[i], i))
            for i in order[:n]:
                keep[row, start + i] = True
    return keep


@settings(max_examples=60, deadline=None)
@given(arrays(np.float32, st.tuples(st.integers(1, 6), st.integers(1, 17)), elements=finite),
       st.sampled_from([(2, 4), (1, 4), (4, 8), (1, 2)]))
def test_n_m_mask_matches_a_loop_reference_including_partial_groups(weight, n_m):
    n, m = n_m
    scores = magnitude_scores(weight)
    np.testing.assert_array_equal(n_m_mask(scores, n, m, axis=1), reference_n_m(scores, n, m))


def test_2_of_4_keeps_exactly_two_in_every_group_along_the_conv_input_channels():
    rng = np.random.default_rng(1)
    weight = rng.standard_normal((8, 16, 3, 3))
    keep = n_m_mask(np.abs(weight), 2, 4, axis=1)
    groups = keep.transpose(0, 2, 3, 1).reshape(8, 3, 3, 4, 4)  # [out, kh, kw, group, 4 consecutive inputs]
    assert np.all(groups.sum(axis=-1) == 2)
    magnitudes = np.abs(weight).transpose(0, 2, 3, 1).reshape(8, 3, 3, 4, 4)
    assert np.all(np.where(groups, magnitudes, np.inf).min(-1) >= np.where(groups, -np.inf, magnitudes).max(-1))


def test_2_of_4_on_a_matmul_weight_groups_along_axis_0():
    weight = np.arange(32, dtype=np.float32).reshape(8, 4)  # [in, out]
    keep = n_m_mask(magnitude_scores(weight), 2, 4, axis=0)
    assert np.all(keep.reshape(2, 4, 4).sum(axis=1) == 2)
    assert keep[2:4].all() and keep[6:8].all()


def test_random_criterion_is_reproducible_with_a_seed_and_changes_with_it():
    rng = np.random.default_rng(3)
    weights = {"a": rng.standard_normal((16, 16)), "b": rng.standard_normal((8, 32))}
    axes = {"a": 0, "b": 0}

    def masks(seed):
        return weight_masks(weights, axes, PruneConfig(sparsity=0.5, criterion="random", seed=seed))

    first, again, other = masks(7), masks(7), masks(8)
    for name in weights:
        np.testing.assert_array_equal(first[name], again[name])
        assert (~first[name]).mean() == 0.5
    assert any(not np.array_equal(first[n], other[n]) for n in weights)
    magnitude = weight_masks(weights, axes, PruneConfig(sparsity=0.5))
    assert any(not np.array_equal(first[n], magnitude[n]) for n in weights)


@settings(max_examples=40, deadline=None)
@given(arrays(np.float32, st.tuples(st.integers(1, 6), st.integers(1, 5), st.integers(1, 3)), elements=finite),
       st.integers(0, 2))
def test_channel_l2_norms_match_a_loop(weight, axis):
    norms = channel_l2_norms(weight, axis)
    for channel in range(weight.shape[axis]):
        expected = np.sqrt(np.sum(np.take(weight, channel, axis=axis).astype(np.float64) ** 2))
        assert norms[channel] == pytest.approx(expected)


def test_channels_to_keep_drops_the_weakest_and_always_keeps_one():
    scores = np.array([5.0, 1.0, 4.0, 0.5, 3.0])
    np.testing.assert_array_equal(channels_to_keep(scores, 0.4), [0, 2, 4])
    np.testing.assert_array_equal(channels_to_keep(scores, 0.99), [0])
    np.testing.assert_array_equal(strongest_channels(scores, 2), [0, 2])


def test_kept_channel_counts_align_to_multiples_when_the_total_stays_within_a_point():
    widths = [64, 64, 128, 128, 256, 256, 512, 512]
    counts = kept_channel_counts(widths, 0.3, multiple=8)
    assert all(count % 8 == 0 for count in counts)
    assert abs(1 - sum(counts) / sum(widths) - 0.3) <= 0.01


def test_kept_channel_counts_fall_back_to_exact_counts_when_alignment_would_miss_the_request():
    widths = [32, 64]  # 96 channels: steps of 8 cannot land within one point of 30 %
    assert kept_channel_counts(widths, 0.3, multiple=8) == [22, 45]
    assert kept_channel_counts(widths, 0.3, multiple=1) == [22, 45]
    assert kept_channel_counts([6], 0.5, multiple=8) == [3]  # narrower than the multiple: exact
