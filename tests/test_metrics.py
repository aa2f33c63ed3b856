"""Metrics against plain numpy references, and the streaming reducers against the one-shot metrics."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from compressq.measure import metrics

seeds = st.integers(min_value=0, max_value=2**31 - 1)


def random_logits(seed: int, samples: int = 40, classes: int = 7) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    # distinct values per row: argmax and top-k are then unambiguous for the references too
    logits = np.stack([rng.permutation(classes) for _ in range(samples)]).astype(np.float32) + rng.random((samples, 1))
    return logits, rng.integers(0, classes, size=samples)


@settings(max_examples=40, deadline=None)
@given(seeds)
def test_top1_accuracy_matches_numpy(seed):
    logits, labels = random_logits(seed)
    assert metrics.top1_accuracy(logits, labels) == pytest.approx(np.mean(np.argmax(logits, axis=1) == labels))


@settings(max_examples=40, deadline=None)
@given(seeds, st.integers(min_value=1, max_value=7))
def test_top_k_accuracy_matches_sorting(seed, k):
    logits, labels = random_logits(seed)
    best_k = np.argsort(-logits, axis=1)[:, :k]
    expected = np.mean([label in row for label, row in zip(labels, best_k)])
    assert metrics.top_k_accuracy(logits, labels, k) == pytest.approx(expected)


def test_top_k_beyond_the_number_of_classes_counts_everything():
    logits, labels = random_logits(3, classes=3)
    assert metrics.top_k_accuracy(logits, labels, 5) == 1.0


@settings(max_examples=40, deadline=None)
@given(seeds)
def test_top1_agreement_on_class_scores(seed):
    a, _ = random_logits(seed)
    b, _ = random_logits(seed + 1)
    assert metrics.top1_agreement(a, b) == pytest.approx(np.mean(a.argmax(1) == b.argmax(1)))
    assert metrics.top1_agreement(a, a) == 1.0


def test_sequence_agreement_needs_every_position_to_match():
    a = np.zeros((2, 3, 4), dtype=np.float32)
    a[:, :, 1] = 1.0  # every position predicts class 1
    b = a.copy()
    b[0, 2, 3] = 5.0  # sample 0 changes its last position only
    assert metrics.top1_agreement(a, b) == 0.5


@settings(max_examples=40, deadline=None)
@given(seeds)
def test_cosine_sqnr_and_max_error_match_formulas(seed):
    rng = np.random.default_rng(seed)
    reference = rng.standard_normal((8, 5))
    test = reference + rng.standard_normal((8, 5)) * 0.1
    x, y = reference.ravel(), test.ravel()
    assert metrics.cosine_similarity(reference, test) == pytest.approx(x @ y / np.linalg.norm(x) / np.linalg.norm(y))
    assert metrics.sqnr_db(reference, test) == pytest.approx(10 * np.log10(np.sum(x**2) / np.sum((x - y) ** 2)))
    assert metrics.max_abs_error(reference, test) == pytest.approx(np.max(np.abs(x - y)))


def test_identical_outputs_are_capped_not_infinite():
    values = np.arange(6, dtype=np.float32)
    assert metrics.sqnr_db(values, values) == metrics.SQNR_CAP_DB
    assert metrics.cosine_similarity(values, values) == pytest.approx(1.0)
    assert metrics.cosine_similarity(np.zeros(3), np.zeros(3)) == 1.0
    assert metrics.max_abs_error(values, values) == 0.0


@settings(max_examples=25, deadline=None)
@given(seeds, st.integers(min_value=1, max_value=13))
def test_streaming_agreement_equals_one_shot(seed, batch):
    rng = np.random.default_rng(seed)
    reference = rng.standard_normal((30, 6)).astype(np.float32)
    test = reference + rng.standard_normal((30, 6)).astype(np.float32) * 0.3
    reducer = metrics.OutputAgreement(metrics.ARGMAX)
    for start in range(0, 30, batch):
        reducer.update(reference[start:start + batch], test[start:start + batch])
    result = reducer.result()
    assert result.samples == 30
    assert result.cosine == pytest.approx(metrics.cosine_similarity(reference, test), abs=1e-9)
    assert result.sqnr_db == pytest.approx(metrics.sqnr_db(reference, test), abs=1e-6)
    assert result.max_abs_error == pytest.approx(metrics.max_abs_error(reference, test))
    assert result.agreement == pytest.approx(metrics.top1_agreement(reference, test))
    assert result.non_finite == 0


def test_agreement_is_only_computed_when_asked():
    # Whether an output is class scores is decided by compressq.measure.task, never guessed from a shape here.
    layer = metrics.OutputAgreement()
    layer.update(np.eye(4, 3), np.eye(4, 3)[::-1])
    assert layer.result().agreement is None


def test_exact_match_counts_samples_whose_labels_are_all_equal():
    reference = np.array([[1, 2], [3, 4], [5, 6], [7, 8]], dtype=np.int64)
    test = np.array([[1, 2], [3, 0], [5, 6], [0, 0]], dtype=np.int64)
    assert metrics.exact_match(reference, test) == 0.5
    reducer = metrics.OutputAgreement(metrics.EXACT)
    reducer.update(reference[:3], test[:3])
    reducer.update(reference[3:], test[3:])
    assert reducer.result().agreement == 0.5


def test_nan_outputs_never_read_as_exact():
    reducer = metrics.OutputAgreement()
    nan = np.full((4, 3), np.nan, dtype=np.float32)
    reducer.update(nan, nan)
    result = reducer.result()
    assert result.non_finite == 12
    assert np.isnan(result.sqnr_db) and np.isnan(result.cosine) and np.isnan(result.max_abs_error)


def test_matching_infinities_agree_and_the_finite_rest_is_measured():
    reference = np.array([[1.0, -np.inf, 2.0], [np.inf, 3.0, 4.0]])
    test = reference.copy()
    test[1, 2] = 4.5
    reducer = metrics.OutputAgreement()
    reducer.update(reference, test)
    result = reducer.result()
    finite_ref, finite_test = np.array([1.0, 2.0, 3.0, 4.0]), np.array([1.0, 2.0, 3.0, 4.5])
    assert result.non_finite == 0
    assert result.sqnr_db == pytest.approx(metrics.sqnr_db(finite_ref, finite_test))
    assert result.max_abs_error == pytest.approx(0.5)


def test_an_infinity_in_only_one_output_is_not_finite():
    reducer = metrics.OutputAgreement()
    reducer.update(np.array([[1.0, np.inf]]), np.array([[1.0, -np.inf]]))
    assert reducer.result().non_finite == 1


def test_streaming_top_k_equals_one_shot():
    logits, labels = random_logits(11, samples=50)
    counter = metrics.TopKCounter((1, 5))
    for start in range(0, 50, 7):
        counter.update(logits[start:start + 7], labels[start:start + 7])
    assert counter.accuracy(1) == pytest.approx(metrics.top1_accuracy(logits, labels))
    assert counter.accuracy(5) == pytest.approx(metrics.top_k_accuracy(logits, labels, 5))


def test_mismatched_shapes_are_refused():
    with pytest.raises(ValueError, match="shapes differ"):
        metrics.OutputAgreement().update(np.ones((2, 3)), np.ones((2, 4)))
