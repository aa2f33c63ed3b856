"""The one rule for which output carries the task, and how each output is scored.

Every verdict (quantize's accuracy probe and fallback, sensitivity, the report's comparisons and gates)
asks `output_roles` what each output is and scores it with `TaskScorer`, so no two places can grade
different outputs, or grade one output two ways.

Roles, from an output's name, dtype, shape and the model's inputs:

- class scores (logits, probabilities): agreement of the arg-max class, plus cosine / SQNR;
- labels (integer outputs such as skl2onnx's `label`): exact-match rate, never cosine;
- boxes / coordinates, embeddings, plain tensors: cosine / SQNR, never an arg-max;
- recurrent state (an output shaped and typed like an input whose name pairs with it, `hn`/`h0`,
  `state_out`/`state`, `present.0.key`/`past_key_values.0.key`, or an LSTM/GRU/RNN state output):
  cosine / SQNR, and it carries the task only when nothing else does;
- stacked detector head [batch, 4 + N, anchors] (YOLOv8 exports): cosine / SQNR per slice along axis 1,
  boxes 0:4 and class scores 4: (one slice per class when N is small), the worst slice named. One scale
  sized by box coordinates (0-640) rounds every class score (0-1) to zero while the whole output's cosine
  stays near 1; only the slices show it.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np
import onnx

from compressq.errors import UsageError
from compressq.measure.metrics import ARGMAX, EXACT, OutputAgreement

CLASS_SCORES = "class scores"
LABELS = "labels"
BOXES = "boxes"
STATE = "recurrent state"
EMBEDDING = "embedding"
DETECTOR = "detector head"
TENSOR = "tensor"

# How an output is scored
TOP1 = "top-1 agreement"
EXACT_MATCH = "exact match"
COSINE = "cosine/SQNR"
PER_SLICE = "cosine/SQNR per slice"

BOX_COORDINATES = 4
DETECTOR_ANCHOR_FACTOR = 8  # anchors >= 8 x channels: a head, not a [batch, positions, classes] tagger
PER_CLASS_SLICES_UP_TO = 4  # this many classes or fewer: one slice per class channel

_CLASS_WORDS = ("logit", "prob", "score", "softmax", "class", "cls")
_BOX_WORDS = ("box", "bbox", "coord", "loc", "keypoint", "landmark")
_EMBEDDING_WORDS = ("embed", "pooler", "pooled", "feature", "hidden_state", "sentence", "vector", "encoding")
_STATE_OPS = {"LSTM": (1, 2), "GRU": (1,), "RNN": (1,)}  # outputs Y_h, Y_c: the state, not the sequence
_PAIR_NOISE = {"out", "output", "outputs", "in", "input", "inputs", "new", "next", "prev", "previous", "old",
               "past", "present", "cur", "current", "n"}


@dataclass(frozen=True)
class TensorFacts:
    name: str
    dtype: np.dtype
    shape: tuple[int | None, ...]  # concrete where a batch was seen; None for a symbolic axis


@dataclass(frozen=True)
class Slice:
    """A part of an output along axis 1 that is scored on its own (detector heads)."""

    output: str
    start: int
    stop: int
    role: str

    @property
    def label(self) -> str:
        index = str(self.start) if self.stop == self.start + 1 else f"{self.start}:{self.stop}"
        return f"{self.output}[{index}]"

    def describe(self) -> str:
        return f"{self.label} ({self.role})"


@dataclass(frozen=True)
class OutputRole:
    name: str
    role: str
    task: bool  # carries the task: gates, targets and warnings score it
    metric: str
    slices: tuple[Slice, ...] = ()

    def describe(self) -> str:
        return f"{self.name} ({self.role})"

    @property
    def agreement(self) -> str | None:
        """How a prediction is read from this output for agreement figures, if it has one."""
        return ARGMAX if self.role == CLASS_SCORES else EXACT if self.role == LABELS else None


# ---------------------------------------------------------------------------------------------------
# The rule


def output_roles(inputs: Sequence[TensorFacts], outputs: Sequence[TensorFacts],
                 state_outputs: frozenset[str] = frozenset(), task_outputs: Sequence[str] = ()) -> list[OutputRole]:
    """Each output's role and metric, and which outputs carry the task.

    `state_outputs`: outputs a recurrent op (LSTM/GRU/RNN) produces as its state. `task_outputs`: the
    user's choice (`--output NAME`); empty means class scores, labels, boxes and detector heads carry the
    task, else embeddings and plain tensors, else recurrent state.
    """
    _check_task_outputs(task_outputs, [o.name for o in outputs])
    roles = [_role(output, inputs, state_outputs) for output in outputs]
    chosen = set(task_outputs) or {outputs[index].name for index in _default_task(roles)}
    return [OutputRole(output.name, role, output.name in chosen, _METRICS[role], _slices(output, role))
            for output, role in zip(outputs, roles)]


_METRICS = {CLASS_SCORES: TOP1, LABELS: EXACT_MATCH, DETECTOR: PER_SLICE, BOXES: COSINE, STATE: COSINE,
            EMBEDDING: COSINE, TENSOR: COSINE}


def _check_task_outputs(task_outputs: Sequence[str], names: list[str]) -> None:
    unknown = [name for name in task_outputs if name not in names]
    if unknown:
        raise UsageError(f"--output '{unknown[0]}' is not an output of the model",
                         hint=f"outputs: {', '.join(names)}")


def _default_task(roles: list[str]) -> set[int]:
    for wanted in ({CLASS_SCORES, LABELS, BOXES, DETECTOR}, {EMBEDDING, TENSOR}, {STATE}):
        if any(role in wanted for role in roles):
            return {index for index, role in enumerate(roles) if role in wanted}
    return set()


def _role(output: TensorFacts, inputs: Sequence[TensorFacts], state_outputs: frozenset[str]) -> str:
    name = output.name.lower()
    if output.name in state_outputs or _feeds_back(output, inputs):
        return STATE
    if np.issubdtype(output.dtype, np.integer) or np.issubdtype(output.dtype, np.bool_):
        return LABELS
    if not np.issubdtype(output.dtype, np.floating):
        return TENSOR
    shape = output.shape
    scores_shape = len(shape) in (2, 3) and (shape[-1] is None or shape[-1] > 1)
    if any(word in name for word in _BOX_WORDS):
        return BOXES
    if any(word in name for word in _EMBEDDING_WORDS):
        return EMBEDDING
    if any(word in name for word in _CLASS_WORDS):
        return CLASS_SCORES if scores_shape else TENSOR
    if _is_detector_head(shape):
        return DETECTOR
    return CLASS_SCORES if scores_shape else TENSOR


def _is_detector_head(shape: tuple[int | None, ...]) -> bool:
    if len(shape) != 3 or shape[1] is None or shape[2] is None:
        return False
    channels, anchors = shape[1], shape[2]
    return channels > BOX_COORDINATES and anchors >= DETECTOR_ANCHOR_FACTOR * channels


def _slices(output: TensorFacts, role: str) -> tuple[Slice, ...]:
    if role != DETECTOR:
        return ()
    channels = output.shape[1]
    assert channels is not None, "_is_detector_head names a detector head only when its channels are known"
    boxes = Slice(output.name, 0, BOX_COORDINATES, BOXES)
    if channels - BOX_COORDINATES <= PER_CLASS_SLICES_UP_TO:
        return (boxes, *(Slice(output.name, c, c + 1, CLASS_SCORES) for c in range(BOX_COORDINATES, channels)))
    return boxes, Slice(output.name, BOX_COORDINATES, channels, CLASS_SCORES)


def _feeds_back(output: TensorFacts, inputs: Sequence[TensorFacts]) -> bool:
    stem = _pairing_stem(output.name)
    return bool(stem) and any(spec.shape == output.shape and spec.dtype == output.dtype
                              and _pairing_stem(spec.name) == stem for spec in inputs)


def _pairing_stem(name: str) -> tuple[str, ...]:
    """`hn`, `h_0` -> (h,); `state_out`, `state` -> (state,); `present.0.key`, `past_key_values.0.key` -> (0, key)."""
    words = re.split(r"[^a-z0-9]+", name.lower().replace("past_key_values", "past"))
    kept = [w for w in words if w and w not in _PAIR_NOISE]
    kept = [w[0] if len(w) == 2 and w[0].isalpha() and w[1] in "n0" else w for w in kept]
    if len(kept) > 1 and kept[-1] == "0" and len(kept[-2]) == 1:  # h_0 / h_n
        kept = kept[:-1]
    return tuple(kept)


# ---------------------------------------------------------------------------------------------------
# Facts from a model and one batch


def model_state_outputs(model: onnx.ModelProto) -> frozenset[str]:
    """Graph outputs that an LSTM/GRU/RNN node produces as its state (Y_h, Y_c)."""
    names = {o.name for o in model.graph.output}
    return frozenset(node.output[index] for node in model.graph.node if node.op_type in _STATE_OPS
                     for index in _STATE_OPS[node.op_type] if index < len(node.output)
                     and node.output[index] in names)


def facts_of(values: Mapping[str, np.ndarray]) -> list[TensorFacts]:
    return [TensorFacts(name, np.asarray(value).dtype, tuple(np.shape(value))) for name, value in values.items()]


def roles_for_batch(model: onnx.ModelProto, feed: Mapping[str, np.ndarray], outputs: Mapping[str, np.ndarray],
                    task_outputs: Sequence[str] = ()) -> list[OutputRole]:
    """The rule applied to one batch: concrete shapes, so a state output is paired with its input."""
    return output_roles(facts_of(feed), facts_of(outputs), model_state_outputs(model), task_outputs)


# ---------------------------------------------------------------------------------------------------
# Predictions against labels (accuracy): one rule for the report and for quantize


def label_output(roles: Sequence[OutputRole], shapes: Mapping[str, tuple], labels_shape: tuple) -> OutputRole | None:
    """The task output that predicts these labels: class scores shaped [*labels, classes] first, else an
    integer label output shaped like the labels."""
    task = [role for role in roles if role.task]
    for role in task:
        if role.role == CLASS_SCORES and tuple(shapes[role.name][:-1]) == tuple(labels_shape):
            return role
    for role in task:
        if role.role == LABELS and tuple(shapes[role.name]) == tuple(labels_shape):
            return role
    return None


def predicted_classes(role: OutputRole, values: np.ndarray) -> np.ndarray:
    return np.argmax(values, axis=-1) if role.role == CLASS_SCORES else np.asarray(values)


def correct_samples(role: OutputRole, values: np.ndarray, labels: np.ndarray) -> np.ndarray:
    """Per sample: every position's predicted class equals its label."""
    predictions = predicted_classes(role, values)
    same = predictions == np.asarray(labels).reshape(predictions.shape)
    return same.reshape(len(same), -1).all(axis=1) if same.ndim > 1 else same


# ---------------------------------------------------------------------------------------------------
# Scoring


@dataclass
class PartScore:
    """Cosine / SQNR of one slice of an output (or of the whole output)."""

    label: str
    role: str
    cosine: float
    sqnr_db: float
    max_abs_error: float
    non_finite: int

    def describe(self) -> str:
        return f"{self.label} ({self.role})"


@dataclass
class OutputScore:
    output: str
    role: str
    task: bool
    metric: str
    samples: int
    top1_agreement: float | None  # class scores only
    exact_match: float | None  # integer labels only
    cosine: float | None  # None for integer labels; NaN when values are not finite
    sqnr_db: float | None
    max_abs_error: float | None
    non_finite: int
    slices: list[PartScore] = field(default_factory=list)

    def describe(self) -> str:
        return f"{self.output} ({self.role})"

    @property
    def agreement(self) -> float | None:
        return self.top1_agreement if self.top1_agreement is not None else self.exact_match

    def cosine_parts(self) -> list[PartScore]:
        """What a cosine / SQNR verdict reads: the slices of a detector head, else the whole output."""
        if self.slices:
            return self.slices
        if self.cosine is None or self.sqnr_db is None or self.max_abs_error is None:  # integer labels
            return []
        return [PartScore(self.output, self.role, self.cosine, self.sqnr_db, self.max_abs_error, self.non_finite)]


class TaskScorer:
    """Streams (reference, candidate) outputs by name and scores each as its role says."""

    def __init__(self, roles: Sequence[OutputRole]) -> None:
        self.roles = list(roles)
        self.whole = {role.name: OutputAgreement(role.agreement) for role in self.roles}
        self.parts = {(role.name, part): OutputAgreement() for role in self.roles for part in role.slices}

    def update(self, reference: Mapping[str, np.ndarray], candidate: Mapping[str, np.ndarray]) -> None:
        for role in self.roles:
            self.whole[role.name].update(reference[role.name], candidate[role.name])
            for part in role.slices:
                self.parts[(role.name, part)].update(reference[role.name][:, part.start:part.stop],
                                                     candidate[role.name][:, part.start:part.stop])

    def results(self) -> list[OutputScore]:
        return [self._score(role) for role in self.roles]

    def _score(self, role: OutputRole) -> OutputScore:
        whole = self.whole[role.name].result()
        labels = role.role == LABELS
        slices = []
        for part in role.slices:
            result = self.parts[(role.name, part)].result()
            slices.append(PartScore(part.label, part.role, result.cosine, result.sqnr_db, result.max_abs_error,
                                    result.non_finite))
        return OutputScore(
            role.name, role.role, role.task, role.metric, whole.samples,
            top1_agreement=whole.agreement if role.role == CLASS_SCORES else None,
            exact_match=whole.agreement if labels else None,
            cosine=None if labels else whole.cosine, sqnr_db=None if labels else whole.sqnr_db,
            max_abs_error=None if labels else whole.max_abs_error, non_finite=whole.non_finite, slices=slices)


# ---------------------------------------------------------------------------------------------------
# Verdict figures over the task outputs


@dataclass(frozen=True)
class Worst:
    value: float
    where: str  # "output0[4:84] (class scores)"


def task_scores(scores: Sequence[OutputScore]) -> list[OutputScore]:
    return [score for score in scores if score.task]


def worst_cosine(scores: Sequence[OutputScore]) -> Worst | None:
    """Lowest cosine over the task outputs' scored parts (NaN, from non-finite values, counts as worst)."""
    parts = [part for score in task_scores(scores) for part in score.cosine_parts()]
    return _worst(parts, lambda part: part.cosine)


def worst_sqnr(scores: Sequence[OutputScore]) -> Worst | None:
    parts = [part for score in task_scores(scores) for part in score.cosine_parts()]
    return _worst(parts, lambda part: part.sqnr_db)


def worst_agreement(scores: Sequence[OutputScore]) -> Worst | None:
    """Lowest top-1 agreement or label exact-match over the task outputs."""
    rated = [score for score in task_scores(scores) if score.agreement is not None]
    return _worst(rated, lambda score: score.agreement)


def non_finite_outputs(scores: Sequence[OutputScore]) -> list[OutputScore]:
    return [score for score in task_scores(scores) if score.non_finite]


def _worst(items, value) -> Worst | None:
    if not items:
        return None
    worst = min(items, key=lambda item: (not np.isnan(value(item)), value(item)))
    return Worst(float(value(worst)), worst.describe())
