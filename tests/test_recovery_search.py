"""The group search of the recovery (galloping + bisection, rounds over the nodes ranked before each needed one)
and the early stop of a failing candidate, against plain references."""

from __future__ import annotations

import math

import numpy as np
import pytest

from compressq.quantize.accuracy import AccuracyFallback, AccuracyProbe, AccuracyTarget, Figures, search_budget
from compressq.quantize.config import QuantizeConfig
from compressq.quantize.recovery import fewest_in_float, smallest_prefix
from compressq.quantize.static import StaticQuantizer
from tests.conftest import write_fragile


def _counting(threshold: int):
    calls: list[int] = []

    def meets(k: int) -> bool:
        calls.append(k)
        return k >= threshold

    return meets, calls


@pytest.mark.parametrize("threshold", [1, 2, 3, 5, 17, 63, 100])
def test_smallest_prefix_finds_the_threshold_in_log_of_the_answer_calls(threshold):
    meets, calls = _counting(threshold)
    assert smallest_prefix(meets, 100) == (threshold, True)
    assert 100 not in calls  # the whole prefix is known to meet: never measured
    assert len(calls) <= 2 * math.ceil(math.log2(threshold + 1)) + 1
    assert min(calls) == 1 and len(set(calls)) == len(calls)


def test_smallest_prefix_starting_at_zero_tests_the_empty_prefix_first():
    meets, calls = _counting(0)
    assert smallest_prefix(meets, 10, start=0) == (0, True)
    assert calls == [0]


def test_smallest_prefix_out_of_budget_returns_the_smallest_value_known_to_meet():
    meets, calls = _counting(40)
    assert smallest_prefix(meets, 100, budget=7) == (64, False)  # 1, 2, 4, 8, 16, 32 fail; 64 meets
    assert len(calls) == 7
    assert smallest_prefix(_counting(40)[0], 100, budget=8) == (48, False)  # bisection in (32, 64]: 48 meets
    assert smallest_prefix(_counting(40)[0], 100, budget=0) == (100, False)


def _culprits(needed: set[str]):
    """meets(S): every needed node is in float (a plain reference of a target that needs exactly these)."""
    measured: list[tuple[str, ...]] = []

    def meets(nodes: tuple[str, ...]) -> bool:
        measured.append(nodes)
        return needed <= set(nodes)

    return meets, measured


@pytest.mark.parametrize("needed_ranks", [[0], [3], [199], [0, 1], [5, 150], [0, 1, 2]])
def test_fewest_in_float_finds_exactly_the_needed_nodes_wherever_the_ranking_puts_them(needed_ranks):
    order = [f"n{i}" for i in range(200)]
    needed = {order[i] for i in needed_ranks}
    meets, measured = _culprits(needed)
    chosen = fewest_in_float(meets, order, budget=search_budget(len(order)))
    assert set(chosen) == needed
    assert len(measured) <= search_budget(len(order))
    assert tuple(order) not in measured  # everything in float is known to meet


def test_fewest_in_float_costs_a_few_evaluations_when_the_ranking_is_right():
    order = [f"n{i}" for i in range(200)]
    meets, measured = _culprits({"n0", "n1"})
    assert set(fewest_in_float(meets, order, budget=100)) == {"n0", "n1"}
    assert len(measured) <= 4  # half meets, 1 fails, 2 meets; round two: {n1} fails ({n1, n0} is known)


@pytest.mark.parametrize("budget", [0, 1, 3, 8, 12])
def test_fewest_in_float_out_of_budget_still_returns_a_set_that_meets(budget):
    order = [f"n{i}" for i in range(200)]
    needed = {"n7", "n60", "n61", "n150"}
    meets, measured = _culprits(needed)
    chosen = fewest_in_float(meets, order, budget=budget)
    assert needed <= set(chosen)
    assert len(measured) <= budget
    assert chosen == tuple(order) or set(chosen) in [set(m) for m in measured]  # measured to meet, or all (known)


def test_a_target_that_needs_most_nodes_stops_after_one_round_and_two_probes():
    order = [f"n{i}" for i in range(255)]
    meets, measured = _culprits(set(order[1:]))  # every node but the best-ranked one is needed
    assert set(fewest_in_float(meets, order, budget=search_budget(len(order)))) == set(order)
    assert len(measured) <= 8 + 2  # round one: half + bisection of the upper half; then alone, then half


@pytest.mark.parametrize("count", [0, 1])
def test_fewer_than_two_nodes_need_no_evaluation(count):
    meets, measured = _culprits(set())
    assert fewest_in_float(meets, [f"n{i}" for i in range(count)], budget=10) == tuple(f"n{i}" for i in range(count))
    assert measured == []


def test_search_budget_grows_with_the_log_of_the_nodes():
    assert search_budget(1) >= 6
    assert search_budget(255) == 24
    assert search_budget(4095) == 36


def _figures(agreement=None, accuracy=None, reference=None, non_finite=0) -> Figures:
    return Figures(agreement=agreement, accuracy=accuracy, reference_accuracy=reference, min_cosine=None,
                   min_sqnr_db=None, non_finite=non_finite)


@pytest.mark.parametrize(("agreeing", "scored", "total", "target", "hopeless"), [
    (7, 8, 32, 0.9, False),   # best case 31/32 = 0.97
    (4, 8, 32, 0.9, True),    # best case 28/32 = 0.875
    (5, 8, 32, 0.9, False),   # best case 29/32 = 0.906
    (0, 31, 32, 0.01, False),  # best case 1/32 = 0.031
])
def test_out_of_reach_assumes_every_sample_not_scored_agrees(agreeing, scored, total, target, hopeless):
    figures = _figures(agreement=agreeing / scored)
    assert AccuracyTarget(min_agreement=target).out_of_reach(figures, scored, total) is hopeless
    assert ((agreeing + total - scored) / total < target) is hopeless


def test_out_of_reach_on_max_drop_and_on_non_finite_values():
    # reference 0.9 over 100 samples; 40 scored at 0.5 accuracy: best 0.2 + 0.6 = 0.8 -> drop 10 points
    assert AccuracyTarget(max_drop=5.0).out_of_reach(_figures(accuracy=0.5, reference=0.9), 40, 100)
    assert not AccuracyTarget(max_drop=11.0).out_of_reach(_figures(accuracy=0.5, reference=0.9), 40, 100)
    assert AccuracyTarget(min_agreement=0.1).out_of_reach(_figures(agreement=1.0, non_finite=3), 1, 100)


@pytest.fixture
def fragile_quantizer(tmp_path):
    fragile = write_fragile(tmp_path, samples=128, first_activation="Relu")
    config = QuantizeConfig(speed_check=False, per_channel=False)
    return fragile.model, fragile.data, StaticQuantizer(fragile.model, fragile.data, config)


def test_a_failing_candidate_stops_early_and_its_figures_match_numpy_on_the_samples_scored(fragile_quantizer):
    model, data, quantizer = fragile_quantizer
    every_node_int8 = quantizer.attempt(quantizer.base_keep_float).model
    probe = AccuracyProbe(model, data)
    full = probe.measure(every_node_int8)
    with probe.stopping_early(AccuracyTarget(min_agreement=0.99)):
        stopped = probe.measure(every_node_int8)
    assert full.samples_scored is None and full.agreement < 0.9
    assert stopped.samples_scored is not None and stopped.samples_scored < probe.samples
    assert probe.stop_for is None  # only inside the block

    from compressq.runtime import create_session

    x = np.concatenate([feed["x"] for feed in data.batches(128)])[:stopped.samples_scored]
    reference = create_session(model).run(None, {"x": x})[0]
    candidate = create_session(every_node_int8).run(None, {"x": x})[0]
    assert stopped.agreement == pytest.approx(np.mean(reference.argmax(1) == candidate.argmax(1)))


def test_the_search_finds_the_fragile_node_within_its_budget(fragile_quantizer):
    model, data, quantizer = fragile_quantizer
    current = quantizer.fused_attempt(quantizer.base_keep_float)
    fallback = AccuracyFallback(AccuracyTarget(min_agreement=0.97), AccuracyProbe(model, data))
    result = fallback.enforce(quantizer, current, [])
    assert fallback.returned_to_float == ["fc2"]
    assert "fc2" not in result.plan.compute and "fc3" in result.plan.compute
    assert len(fallback.search) <= search_budget(len(fallback.node_errors))
    assert fallback.final_figures.agreement >= 0.97 and fallback.final_figures.samples_scored is None
