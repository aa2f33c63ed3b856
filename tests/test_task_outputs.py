"""The one rule for which output carries the task (compressq.measure.task), and scoring by role."""

from __future__ import annotations

import numpy as np
import pytest
from onnx import TensorProto, helper, numpy_helper

from compressq.errors import UsageError
from compressq.measure import metrics, task
from compressq.measure.task import TensorFacts, output_roles
from tests.conftest import make_model

F32, I64 = np.dtype(np.float32), np.dtype(np.int64)


def facts(name: str, shape: tuple, dtype: np.dtype = F32) -> TensorFacts:
    return TensorFacts(name, dtype, shape)


def roles_by_name(inputs: list[TensorFacts], outputs: list[TensorFacts], **kwargs) -> dict[str, task.OutputRole]:
    return {role.name: role for role in output_roles(inputs, outputs, **kwargs)}


IMAGE = [facts("images", (1, 3, 640, 640))]


def test_classifier_logits_are_class_scores_scored_by_top1():
    [role] = output_roles(IMAGE, [facts("logits", (8, 1000))])
    assert (role.role, role.metric, role.task) == (task.CLASS_SCORES, task.TOP1, True)


def test_sklearn_label_and_probabilities_both_carry_the_task_each_by_its_own_metric():
    roles = roles_by_name([facts("input", (16, 4))], [facts("label", (16,), I64), facts("probabilities", (16, 3))])
    assert (roles["label"].role, roles["label"].metric) == (task.LABELS, task.EXACT_MATCH)
    assert (roles["probabilities"].role, roles["probabilities"].metric) == (task.CLASS_SCORES, task.TOP1)
    assert roles["label"].task and roles["probabilities"].task


@pytest.mark.parametrize("classes, expected", [
    (80, ("output0[0:4]", "output0[4:84]")),
    (2, ("output0[0:4]", "output0[4]", "output0[5]")),
])
def test_stacked_detector_head_is_scored_per_slice(classes, expected):
    [role] = output_roles(IMAGE, [facts("output0", (1, 4 + classes, 8400))])
    assert (role.role, role.metric, role.task) == (task.DETECTOR, task.PER_SLICE, True)
    assert tuple(part.label for part in role.slices) == expected
    assert role.slices[0].role == task.BOXES and {p.role for p in role.slices[1:]} == {task.CLASS_SCORES}
    assert role.agreement is None  # no arg-max over anchors: never "top-1 agreement 0.00 %"


def test_a_tagger_named_logits_is_not_mistaken_for_a_detector():
    [role] = output_roles([facts("ids", (1, 7), I64)], [facts("logits", (1, 7, 200))])
    assert role.role == task.CLASS_SCORES


@pytest.mark.parametrize("output, state_input", [
    ("hn", "h0"), ("h_n", "h_0"), ("state_out", "state"), ("present.0.key", "past_key_values.0.key"),
])
def test_an_output_fed_back_as_an_input_is_recurrent_state(output, state_input):
    shape = (4, 1, 16)
    roles = roles_by_name([facts("x", (4, 5, 3)), facts(state_input, shape)],
                          [facts("logits", (4, 10)), facts(output, shape)])
    assert roles[output].role == task.STATE and roles[output].agreement is None
    assert not roles[output].task and roles["logits"].task


def test_state_needs_the_same_shape_and_a_paired_name():
    roles = roles_by_name([facts("h0", (4, 16))], [facts("hn", (4, 8)), facts("other", (4, 16))])
    assert roles["hn"].role == task.CLASS_SCORES  # shapes differ: not the state that feeds back
    assert roles["other"].role == task.CLASS_SCORES  # same shape, unrelated name


def test_an_autoencoder_output_is_not_state_just_because_it_matches_the_input():
    [role] = output_roles([facts("input", (4, 64))], [facts("output", (4, 64))])
    assert role.role != task.STATE and role.task


def test_only_state_outputs_then_state_carries_the_task():
    roles = roles_by_name([facts("state", (2, 8))], [facts("state_out", (2, 8))])
    assert roles["state_out"].task


@pytest.mark.parametrize("name, shape, role", [
    ("boxes", (1, 100, 4), task.BOXES),
    ("sentence_embedding", (8, 384), task.EMBEDDING),
    ("last_hidden_state", (8, 128, 768), task.EMBEDDING),
    ("value", (8, 1), task.TENSOR),
    ("depth", (1, 1, 64, 64), task.TENSOR),
])
def test_non_classifier_outputs_get_cosine_never_argmax(name, shape, role):
    [result] = output_roles(IMAGE, [facts(name, shape)])
    assert (result.role, result.metric, result.agreement) == (role, task.COSINE, None)


def test_class_scores_outrank_auxiliary_tensors_for_the_task():
    roles = roles_by_name(IMAGE, [facts("logits", (1, 10)), facts("features", (1, 512))])
    assert roles["logits"].task and not roles["features"].task


def test_output_option_overrides_the_rule():
    roles = roles_by_name(IMAGE, [facts("logits", (1, 10)), facts("features", (1, 512))],
                          task_outputs=("features",))
    assert roles["features"].task and not roles["logits"].task
    with pytest.raises(UsageError, match="'nope' is not an output") as error:
        output_roles(IMAGE, [facts("logits", (1, 10))], task_outputs=("nope",))
    assert "logits" in error.value.hint


def test_lstm_state_outputs_are_found_from_the_graph():
    nodes = [helper.make_node("LSTM", ["x", "W", "R"], ["y", "y_h", "y_c"], hidden_size=8, name="lstm")]
    weights = [numpy_helper.from_array(np.zeros((1, 32, 3), np.float32), "W"),
               numpy_helper.from_array(np.zeros((1, 32, 8), np.float32), "R")]
    model = make_model(nodes, [helper.make_tensor_value_info("x", TensorProto.FLOAT, [5, "batch", 3])],
                       [helper.make_tensor_value_info(n, TensorProto.FLOAT, None) for n in ("y", "y_h", "y_c")],
                       weights)
    assert task.model_state_outputs(model) == {"y_h", "y_c"}
    roles = {r.name: r for r in task.roles_for_batch(model, {"x": np.zeros((5, 2, 3), np.float32)},
                                                     {"y": np.zeros((5, 1, 2, 8), np.float32),
                                                      "y_h": np.zeros((1, 2, 8), np.float32),
                                                      "y_c": np.zeros((1, 2, 8), np.float32)})}
    assert roles["y_h"].role == roles["y_c"].role == task.STATE  # rank 3, last axis 8: never arg-maxed
    assert roles["y"].task and not roles["y_h"].task


# --- labels ----------------------------------------------------------------------------------------


def test_labels_are_read_from_class_scores_first_then_from_an_integer_label_output():
    roles = output_roles([facts("input", (16, 4))], [facts("label", (16,), I64), facts("probabilities", (16, 3))])
    shapes = {"label": (), "probabilities": (3,)}
    assert task.label_output(roles, shapes, ()).name == "probabilities"
    only_label = output_roles([facts("input", (16, 4))], [facts("label", (16,), I64)])
    assert task.label_output(only_label, {"label": ()}, ()).name == "label"
    assert task.label_output(only_label, {"label": ()}, (5,)) is None


def test_correct_samples_need_every_position_right():
    [role] = output_roles([facts("ids", (2, 3), I64)], [facts("logits", (2, 3, 4))])
    scores = np.zeros((2, 3, 4))
    scores[0, [0, 1, 2], [1, 2, 3]] = 1.0
    scores[1, [0, 1, 2], [1, 1, 1]] = 1.0
    labels = np.array([[1, 2, 3], [1, 1, 0]])
    assert task.correct_samples(role, scores, labels).tolist() == [True, False]


# --- scoring ---------------------------------------------------------------------------------------


def test_scorer_slices_a_detector_head_and_names_the_worst_slice():
    rng = np.random.default_rng(0)
    reference = np.concatenate([rng.uniform(0, 640, (2, 4, 400)), rng.uniform(0, 1, (2, 6, 400))], axis=1)
    damaged = reference.copy()
    damaged[:, 4:] = np.round(damaged[:, 4:] / 2.5) * 2.5  # one scale sized by the boxes: scores -> 0
    roles = output_roles(IMAGE, [facts("output0", reference.shape)])
    scorer = task.TaskScorer(roles)
    scorer.update({"output0": reference[:1]}, {"output0": damaged[:1]})
    scorer.update({"output0": reference[1:]}, {"output0": damaged[1:]})
    [score] = scorer.results()
    assert score.cosine == pytest.approx(metrics.cosine_similarity(reference, damaged)) and score.cosine > 0.999
    boxes, classes = score.slices
    assert boxes.cosine == 1.0
    assert classes.cosine == pytest.approx(metrics.cosine_similarity(reference[:, 4:], damaged[:, 4:]))
    worst = task.worst_cosine([score])
    assert worst.where == "output0[4:10] (class scores)" and worst.value == classes.cosine
    assert score.top1_agreement is None and task.worst_agreement([score]) is None


def test_scorer_gives_labels_exact_match_and_no_cosine():
    roles = output_roles([facts("input", (4, 2))], [facts("label", (4,), I64), facts("probabilities", (4, 3))])
    probabilities = np.array([[0.6, 0.3, 0.1], [0.2, 0.7, 0.1], [0.1, 0.1, 0.8], [0.5, 0.4, 0.1]])
    moved = probabilities + np.array([0.0, 0.0, 0.0, -0.06])[:, None] * np.array([1, -1, 0])
    scorer = task.TaskScorer(roles)
    scorer.update({"label": probabilities.argmax(1), "probabilities": probabilities},
                  {"label": moved.argmax(1), "probabilities": moved})
    scores = {s.output: s for s in scorer.results()}
    assert scores["label"].exact_match == 0.75 and scores["label"].cosine is None
    assert scores["probabilities"].top1_agreement == 0.75
    assert task.worst_cosine(scores.values()).where == "probabilities (class scores)"


def test_a_nan_task_output_is_the_worst_and_is_reported():
    roles = output_roles(IMAGE, [facts("logits", (2, 3))])
    scorer = task.TaskScorer(roles)
    scorer.update({"logits": np.full((2, 3), np.nan)}, {"logits": np.full((2, 3), np.nan)})
    [score] = scorer.results()
    assert score.non_finite == 6 and np.isnan(score.cosine)
    assert task.non_finite_outputs([score]) == [score]
    assert np.isnan(task.worst_cosine([score]).value)
