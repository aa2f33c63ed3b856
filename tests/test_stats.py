"""compressq.stats: streaming observers and THE collect loop, against numpy on every tensor of tiny models."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from compressq.data import load_dataset
from compressq.runtime import create_session, with_outputs
from compressq.stats import collect as collect_module
from compressq.stats.collect import Request, collect, collect_range_candidates, collect_ranges
from compressq.stats.observers import (
    ChannelAbsMaxObserver,
    ChannelMeanObserver,
    FirstRowsObserver,
    HistogramObserver,
    MinMaxObserver,
    range_observer,
)
from compressq.stats.subgraphs import split_by_scope
from tests.conftest import make_model

TENSORS = ("x", "conv", "relu", "scaled", "flat", "y")


def conv_model(opset: int = 13) -> onnx.ModelProto:
    """x [N,3,5,5] -> Conv 1x1 (6 ch) -> Relu -> Mul -> Flatten -> MatMul [150, 4] -> y."""
    rng = np.random.default_rng(0)
    weight = numpy_helper.from_array(rng.normal(size=(6, 3, 1, 1)).astype(np.float32), "w")
    factor = numpy_helper.from_array(np.array(1.5, np.float32), "k")
    dense = numpy_helper.from_array(rng.normal(size=(150, 4)).astype(np.float32), "d")
    nodes = [helper.make_node("Conv", ["x", "w"], ["conv"], name="c"),
             helper.make_node("Relu", ["conv"], ["relu"], name="r"),
             helper.make_node("Mul", ["relu", "k"], ["scaled"], name="m"),
             helper.make_node("Flatten", ["scaled"], ["flat"], name="f"),
             helper.make_node("MatMul", ["flat", "d"], ["y"], name="mm")]
    inputs = [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 3, 5, 5])]
    outputs = [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 4])]
    return make_model(nodes, inputs, outputs, [weight, factor, dense], opset=opset)


@pytest.fixture
def data(tmp_path: Path):
    def make(model: onnx.ModelProto, samples: int = 37, scale: float = 1.0):
        rng = np.random.default_rng(1)
        path = tmp_path / "calib.npz"
        np.savez(path, x=(rng.normal(size=(samples, 3, 5, 5)) * scale).astype(np.float32))
        return load_dataset(path, model), path
    return make


def every_tensor(model: onnx.ModelProto, path: Path) -> dict[str, np.ndarray]:
    """The numpy reference: each tensor over all samples, fetched at once."""
    with np.load(path) as archive:
        feed = {"x": archive["x"]}
    session = create_session(with_outputs(model, TENSORS))
    return dict(zip(TENSORS, session.run(list(TENSORS), feed)))


@pytest.mark.parametrize("opset", [13, 18])
def test_in_graph_ranges_and_channel_statistics_match_numpy(data, opset):
    model = conv_model(opset)
    dataset, path = data(model)
    reference = every_tensor(model, path)
    ranges = {t: MinMaxObserver() for t in TENSORS}
    absmax = {t: ChannelAbsMaxObserver(axis=1) for t in ("conv", "scaled")}
    means = {"conv": ChannelMeanObserver(axis=1), "flat": ChannelMeanObserver(axis=-1)}
    requests = [Request(t, o) for group in (ranges, absmax, means) for t, o in group.items()]
    collect(model, dataset, requests, batch_size=8)
    for tensor, values in reference.items():
        assert ranges[tensor].result().low == pytest.approx(values.min(), rel=1e-6)
        assert ranges[tensor].result().high == pytest.approx(values.max(), rel=1e-6)
    for tensor, observer in absmax.items():
        expected = np.abs(reference[tensor]).max(axis=(0, 2, 3))
        np.testing.assert_allclose(observer.result(), expected, rtol=1e-6)
    np.testing.assert_allclose(means["conv"].result(), reference["conv"].mean(axis=(0, 2, 3)), rtol=1e-4)
    np.testing.assert_allclose(means["flat"].result(), reference["flat"].mean(axis=0), rtol=1e-4, atol=1e-6)


def test_only_reductions_leave_onnxruntime_for_in_graph_statistics(data, monkeypatch):
    """MinMax and channel statistics: each run hands back scalars and per-channel vectors, never a map."""
    model = conv_model()
    dataset, _ = data(model)
    fetched = spy_on_runs(monkeypatch)
    requests = [Request(t, MinMaxObserver()) for t in TENSORS] + [Request("conv", ChannelMeanObserver(axis=1))]
    collect(model, dataset, requests, batch_size=8)
    assert fetched and max(max(sizes) for sizes in fetched) <= 6


def test_histograms_are_fetched_in_budget_sized_chunks_and_do_not_depend_on_the_budget(data, monkeypatch):
    model = conv_model()
    dataset, _ = data(model)
    generous = collect_ranges(model, dataset, TENSORS, method="percentile", percentile=99.0, batch_size=8)
    fetched = spy_on_runs(monkeypatch)
    one_sample_of_conv = 6 * 5 * 5 * 4
    tight = collect_ranges(model, dataset, TENSORS, method="percentile", percentile=99.0, batch_size=8,
                           budget=one_sample_of_conv)
    assert tight == generous  # exact range first, then one binning: batching cannot change the counts
    maps = [size for sizes in fetched for size in sizes if size > 6]
    assert maps and max(maps) * 4 <= one_sample_of_conv


def test_a_session_exposes_only_one_chunk(data, monkeypatch):
    """onnxruntime keeps every graph output alive to the end of a run, fetched or not: chunks are sessions."""
    model = conv_model()
    dataset, _ = data(model)
    exposed = []
    real = collect_module.create_session

    def recording(model, *args, **kwargs):
        exposed.append([o.name for o in model.graph.output if o.name in TENSORS and o.name != "y"])
        return real(model, *args, **kwargs)

    monkeypatch.setattr(collect_module, "create_session", recording)
    collect_ranges(model, dataset, TENSORS, method="entropy", batch_size=8, budget=6 * 5 * 5 * 4)
    assert exposed[0] == []  # the reductions' pass returns no activation map
    assert all(len(names) <= 1 for names in exposed[1:]) and len(exposed) > 3


def test_percentile_from_collect_follows_numpy(data):
    model = conv_model()
    dataset, path = data(model, samples=64)
    reference = every_tensor(model, path)
    ranges = collect_ranges(model, dataset, ["conv"], method="percentile", percentile=99.0, batch_size=16)
    values = reference["conv"]
    # The range cuts ~1 % of the values off each end (to within the mass of a bin or two)
    assert np.mean(values > ranges["conv"].high) == pytest.approx(0.01, abs=0.002)
    assert np.mean(values < ranges["conv"].low) == pytest.approx(0.01, abs=0.002)


def test_fixed_range_histogram_equals_one_histogram_of_everything():
    rng = np.random.default_rng(3)
    batches = [rng.normal(scale=1 + i, size=5000).astype(np.float32) for i in range(3)]
    everything = np.concatenate(batches)
    whole = MinMaxObserver()
    whole.update(everything)
    streamed = HistogramObserver("percentile", 99.0)
    streamed.fix_range(whole)
    for batch in batches:
        streamed.update(batch)
    counts, _ = np.histogram(everything, bins=streamed.bins, range=(float(everything.min()), float(everything.max())))
    np.testing.assert_array_equal(streamed.counts, counts)


@pytest.mark.parametrize("observer", [lambda: ChannelAbsMaxObserver(axis=1), lambda: ChannelMeanObserver(axis=1)])
def test_reduced_and_whole_tensor_updates_agree(observer):
    rng = np.random.default_rng(4)
    batches = [rng.normal(size=(3, 4, 2, 2)).astype(np.float32) for _ in range(3)]
    whole, reduced = observer(), observer()
    for batch in batches:
        whole.update(batch)
        if isinstance(reduced, ChannelMeanObserver):
            reduced.update_reduced(batch.sum(axis=(0, 2, 3)), batch.size)
        else:
            reduced.update_reduced(batch.min(axis=(0, 2, 3)), batch.max(axis=(0, 2, 3)))
    np.testing.assert_allclose(whole.result(), reduced.result(), rtol=1e-6)


def test_sentinels_found_in_the_graph_mark_the_tensor_not_finite(tmp_path):
    mask = numpy_helper.from_array(np.array([0.0, np.finfo(np.float32).min], np.float32), "mask")
    nodes = [helper.make_node("Add", ["x", "mask"], ["masked"], name="a"),
             helper.make_node("Relu", ["x"], ["y"], name="r")]
    model = make_model(nodes, [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 2])],
                       [helper.make_tensor_value_info("masked", TensorProto.FLOAT, ["N", 2]),
                        helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 2])], [mask])
    dataset = _dataset(model, {"x": np.ones((4, 2), np.float32)}, tmp_path)
    for method in ("minmax", "percentile"):
        ranges = collect_ranges(model, dataset, ["masked", "y"], method=method, batch_size=2)
        assert ranges["masked"].finite is False
        assert ranges["y"].finite and ranges["y"].high == 1.0


def test_float16_tensors_are_reduced_in_float32(tmp_path):
    nodes = [helper.make_node("Cast", ["x"], ["half"], name="c", to=TensorProto.FLOAT16),
             helper.make_node("Cast", ["half"], ["y"], name="back", to=TensorProto.FLOAT)]
    model = make_model(nodes, [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 3])],
                       [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 3])])
    values = np.array([[-2.5, 0.0, 7.0], [1.0, 3.0, -1.0]], np.float32)
    ranges = collect_ranges(model, _dataset(model, {"x": values}, tmp_path), ["half"], batch_size=1)
    assert (ranges["half"].low, ranges["half"].high) == (-2.5, 7.0)


def test_auto_candidates_come_from_one_histogram(data):
    model = conv_model()
    dataset, path = data(model)
    candidates = collect_range_candidates(model, dataset, ["y"], batch_size=8)["y"]
    reference = every_tensor(model, path)["y"]
    assert set(candidates) == {"minmax", "p99.999", "p99.99", "mse"}
    assert candidates["minmax"].high == pytest.approx(reference.max(), rel=1e-6)
    assert all(c.high <= candidates["minmax"].high for c in candidates.values())


def test_outputs_are_identical_run_to_run(data):
    model = conv_model()
    dataset, _ = data(model)
    first = collect_ranges(model, dataset, TENSORS, method="mse", batch_size=8)
    assert collect_ranges(model, dataset, TENSORS, method="mse", batch_size=8) == first


def test_a_batch_is_split_into_runs_that_fit_the_budget(data, monkeypatch):
    """One sample's tensors weigh ~2.7 KB here: a 4 KB budget runs batches of 8 one sample at a time."""
    model = conv_model()
    dataset, _ = data(model, samples=16)
    rows = []
    original = collect_module._slice
    monkeypatch.setattr(collect_module, "_slice", lambda feed, start, count: rows.append(count) or
                        original(feed, start, count))
    ranges = collect_ranges(model, dataset, TENSORS, batch_size=8, budget=4096)
    assert rows == [1] * 16
    rows.clear()
    assert collect_ranges(model, dataset, TENSORS, batch_size=8) == ranges
    assert rows == []  # the default budget holds whole batches of 8


def test_samples_per_run_follows_the_budget(data):
    model = conv_model()
    dataset, _ = data(model)
    one_sample = 4 * (75 + 4 * 150 + 4)
    assert collect_module.samples_per_run(model, dataset, 8, budget=3 * one_sample) == 3
    assert collect_module.samples_per_run(model, dataset, 8, budget=one_sample // 2) == 1
    assert collect_module.samples_per_run(model, dataset, 8) == 8


def test_one_sample_weight_counts_every_tensor_of_the_graph(data):
    model = conv_model()
    _, path = data(model, samples=2)
    with np.load(path) as archive:
        feed = {"x": archive["x"][:1]}
    types, weight = collect_module._one_sample_types(model, feed)
    assert types["conv"].shape == (1, 6, 5, 5)
    assert weight == 4 * (75 + 4 * 150 + 4)  # x, conv, relu, scaled, flat, y


def test_the_callers_model_is_left_as_it_was(data, monkeypatch):
    model = conv_model()
    dataset, _ = data(model)
    before = model.SerializeToString()
    collect_ranges(model, dataset, TENSORS, method="percentile", batch_size=8)
    assert model.SerializeToString() == before

    def failing(*args, **kwargs):
        raise RuntimeError("onnxruntime refused it")

    monkeypatch.setattr(collect_module, "create_session", failing)
    with pytest.raises(RuntimeError):
        collect_ranges(model, dataset, TENSORS, batch_size=8)
    assert model.SerializeToString() == before


def test_main_graph_tensors_names_what_collect_cannot_tap_yet():
    body = helper.make_graph([helper.make_node("Relu", ["x"], ["inner"], name="br")], "then", [],
                             [helper.make_tensor_value_info("inner", TensorProto.FLOAT, ["N", 2])])
    nodes = [helper.make_node("If", ["cond"], ["out"], name="if", then_branch=body, else_branch=body)]
    model = make_model(nodes, [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 2]),
                               helper.make_tensor_value_info("cond", TensorProto.BOOL, [])],
                       [helper.make_tensor_value_info("out", TensorProto.FLOAT, ["N", 2])])
    assert split_by_scope(model, ["x", "out", "inner"]) == (["out", "x"], ["inner"])


def test_tensors_inside_bodies_are_measured_in_the_same_pass(tmp_path, monkeypatch):
    """min/max of a tensor inside an If branch ride along with the main graph's reductions: one session."""
    then_body = helper.make_graph([helper.make_node("Relu", ["x"], ["inner"], name="relu")], "then", [],
                                  [helper.make_tensor_value_info("inner", TensorProto.FLOAT, ["N", 2])])
    else_body = helper.make_graph([helper.make_node("Neg", ["x"], ["other"], name="neg")], "else", [],
                                  [helper.make_tensor_value_info("other", TensorProto.FLOAT, ["N", 2])])
    nodes = [helper.make_node("ReduceSum", ["x"], ["total"], name="sum", keepdims=0),
             helper.make_node("Greater", ["total", "zero"], ["positive"], name="gt"),
             helper.make_node("If", ["positive"], ["out"], name="if", then_branch=then_body, else_branch=else_body),
             helper.make_node("Sigmoid", ["out"], ["y"], name="sig")]
    zero = numpy_helper.from_array(np.array(0.0, np.float32), "zero")
    model = make_model(nodes, [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 2])],
                       [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 2])], [zero])
    values = np.array([[3.0, -1.0], [0.5, 2.0], [-0.25, 4.0]], np.float32)
    dataset = _dataset(model, {"x": values}, tmp_path)
    sessions = spy_on_runs(monkeypatch)
    inner, other, out = MinMaxObserver(), MinMaxObserver(), MinMaxObserver()
    collect(model, dataset, [Request("inner", inner), Request("other", other), Request("out", out)], batch_size=1)
    assert (inner.result().low, inner.result().high) == (0.0, 4.0)
    assert other.result().finite is False  # the else branch never ran: no range, the tensor stays float
    assert (out.result().low, out.result().high) == (0.0, 4.0)
    assert len(sessions) == 3  # one pass: one run per sample, bodies and main graph together


def test_quantize_reads_the_data_on_the_chosen_provider_as_few_times_as_needed(monkeypatch):
    """--provider reaches every statistics pass; --smoothquant --bias-correction reads the data twice
    (SmoothQuant's abs-max before smoothing; ranges and bias means of the smoothed graph together)."""
    from compressq.data import load_dataset as load
    from compressq.io import load_model
    from compressq.quantize.config import QuantizeConfig
    from compressq.quantize.static import StaticQuantizer
    from tests.conftest import SAMPLES

    providers = []
    real = collect_module.create_session

    def recording(model, provider="cpu", *args, **kwargs):
        providers.append(provider)
        return real(model, "cpu", *args, **kwargs)  # this machine has no GPU: run it on CPU

    monkeypatch.setattr(collect_module, "create_session", recording)
    model = load_model(SAMPLES / "digits_transformer.onnx")
    dataset = load(SAMPLES / "digits_seq_calib.npz", model)
    config = QuantizeConfig(provider="cuda", smoothquant=0.5, bias_correction=True, speed_check=False)
    quantizer = StaticQuantizer(model, dataset, config)
    assert providers == ["cuda", "cuda"]
    assert quantizer.input_mean_observers and all(o.result() is not None
                                                  for o in quantizer.input_mean_observers.values())


def test_first_rows_keep_the_first_samples_in_order_and_refuse_values_without_a_samples_axis():
    observer = FirstRowsObserver(5)
    parts = [np.arange(12.0).reshape(3, 4), np.arange(12.0, 24.0).reshape(3, 4), np.ones((3, 4))]
    for values in parts:
        observer.update_reduced(values, 3)
    np.testing.assert_array_equal(observer.result(), np.arange(20.0).reshape(5, 4))
    batchless = FirstRowsObserver(5)
    batchless.update_reduced(np.ones((2, 4)), 3)  # a run of 3 samples whose output has 2 rows
    assert batchless.result() is None


def test_collect_keeps_the_graph_outputs_of_the_first_samples_in_the_same_pass(data, monkeypatch):
    model = conv_model()
    dataset, path = data(model, samples=16)
    passes = []
    original = collect_module._reduced_pass
    monkeypatch.setattr(collect_module, "_reduced_pass", lambda *a, **k: passes.append(1) or original(*a, **k))
    rows, middle, ranges = FirstRowsObserver(11), FirstRowsObserver(11), MinMaxObserver()
    collect(model, dataset, [Request("y", rows), Request("relu", middle), Request("conv", ranges)],
            batch_size=4, budget=4096)  # runs of one sample: rows arrive one at a time
    expected = every_tensor(model, path)
    np.testing.assert_allclose(rows.result(), expected["y"][:11], rtol=1e-6)
    np.testing.assert_allclose(middle.result(), expected["relu"][:11], rtol=1e-6)
    assert passes == [1]


def test_range_observer_names_each_method():
    assert type(range_observer("minmax")) is MinMaxObserver
    assert range_observer("entropy").method == "entropy"
    assert range_observer("auto").reduction is None


class RunsObserver:
    """Every run's whole tensor, kept in the order collect hands them over (a pairing observer's view)."""

    def __init__(self) -> None:
        self.runs: list[np.ndarray] = []

    def update(self, values: np.ndarray) -> None:
        self.runs.append(np.array(values))

    def result(self) -> np.ndarray:
        return np.concatenate(self.runs)


def recorded_sessions(monkeypatch) -> list[list[str]]:
    """The fetched outputs (tensors of TENSORS) of every session collect opens, in order."""
    exposed: list[list[str]] = []
    real = collect_module.create_session

    def recording(model, *args, **kwargs):
        model = onnx.load(str(model)) if isinstance(model, (str, Path)) else model
        exposed.append([o.name for o in model.graph.output if o.name in TENSORS and o.name != "y"])
        return real(model, *args, **kwargs)

    monkeypatch.setattr(collect_module, "create_session", recording)
    return exposed


def test_whole_tensors_of_known_shapes_need_no_range_pass_and_come_in_one_pass_when_asked(data, monkeypatch):
    """Observers that take whole tensors and no range (Gram matrices, refit rows) cost one pass, not two; with
    one_pass every tensor comes from one session, runs holding the same samples for every tensor."""
    model = conv_model()
    dataset, path = data(model)
    sessions = recorded_sessions(monkeypatch)
    observers = {"conv": RunsObserver(), "flat": RunsObserver()}
    every_tensor_of_one_sample = (75 + 4 * 150 + 4) * 4  # x, conv, relu, scaled, flat, y
    collect(model, dataset, [Request(t, o) for t, o in observers.items()], batch_size=8,
            budget=3 * every_tensor_of_one_sample, one_pass=True)
    assert sessions == [["conv", "flat"]]
    reference = every_tensor(model, path)
    for tensor, observer in observers.items():
        np.testing.assert_allclose(observer.result(), reference[tensor], rtol=1e-5, atol=1e-5)
    lengths = [len(run) for run in observers["conv"].runs]
    assert lengths == [len(run) for run in observers["flat"].runs] and max(lengths) == 3

    sessions.clear()
    chunked = {"conv": RunsObserver(), "flat": RunsObserver()}
    collect(model, dataset, [Request(t, o) for t, o in chunked.items()], batch_size=8, budget=150 * 4)
    assert sessions == [["conv"], ["flat"]]  # chunks of the budget, still no range pass before them
    for tensor, observer in chunked.items():
        np.testing.assert_array_equal(observer.result(), observers[tensor].result())


def test_a_graph_input_is_read_from_the_feed_without_a_session(data, monkeypatch):
    model = conv_model()
    dataset, path = data(model)
    sessions = recorded_sessions(monkeypatch)
    observer = RunsObserver()
    collect(model, dataset, [Request("x", observer)], batch_size=8, one_pass=True)
    assert sessions == []
    with np.load(path) as archive:
        np.testing.assert_array_equal(observer.result(), archive["x"])


def test_a_model_with_mapped_weights_is_collected_from_its_files(data, tmp_path):
    """A model loaded with read_weights=False runs from its files, with the figures of the model in memory."""
    from compressq import io as model_io

    model = conv_model()
    dataset, _ = data(model)
    saved = tmp_path / "external.onnx"
    onnx.save_model(conv_model(), str(saved), save_as_external_data=True, all_tensors_to_one_file=True,
                    location="external.onnx.data", size_threshold=0)
    mapped = model_io.load_model(saved, read_weights=False)
    assert model_io.holds_mapped_weights(mapped)
    in_memory, from_files = RunsObserver(), RunsObserver()
    ranges = collect_ranges(mapped, dataset, TENSORS, batch_size=8, extra=[Request("flat", from_files)])
    collect(model, dataset, [Request("flat", in_memory)], batch_size=8)
    assert ranges == collect_ranges(model, dataset, TENSORS, batch_size=8)
    np.testing.assert_array_equal(from_files.result(), in_memory.result())


# -- helpers ----------------------------------------------------------------------------------------


def spy_on_runs(monkeypatch) -> list[list[int]]:
    """Record the element count of every array each session run of collect() returns."""
    seen: list[list[int]] = []
    real = collect_module.create_session

    def spying(*args, **kwargs):
        session = real(*args, **kwargs)

        class Spy:
            def run(self, names, feed):
                values = session.run(names, feed)
                seen.append([int(np.asarray(v).size) for v in values])
                return values
        return Spy()

    monkeypatch.setattr(collect_module, "create_session", spying)
    return seen


def _dataset(model: onnx.ModelProto, arrays: dict[str, np.ndarray], folder: Path):
    path = folder / "data.npz"
    np.savez(path, **arrays)
    return load_dataset(path, model)


def test_the_self_check_reads_fp32_outputs_from_calibration_with_the_same_figures(monkeypatch):
    """quantize's self-check compares int8 against fp32 outputs kept from the calibration pass; the figures
    are those of a separate fp32 run, and a graph whose function calibration changed runs fp32 again."""
    from compressq.io import load_model
    from compressq.quantize import static
    from compressq.quantize.api import quantize_model
    from compressq.quantize.config import QuantizeConfig
    from tests.conftest import SAMPLES

    model = load_model(SAMPLES / "digits_cnn.onnx")
    dataset = load_dataset(SAMPLES / "digits_calib.npz", model)
    config = QuantizeConfig(speed_check=False)
    reused = quantize_model(model, dataset, config)
    fewer = quantize_model(model, dataset, QuantizeConfig(samples=32, speed_check=False))
    assert "from the calibration pass" not in fewer.summary.accuracy_data  # the self-check checks 128 samples
    monkeypatch.setattr(static.StaticQuantizer, "_reference_observers", lambda self: {})
    separate = quantize_model(model, dataset, config)
    assert "from the calibration pass" in reused.summary.accuracy_data
    assert "from the calibration pass" not in separate.summary.accuracy_data
    for key in ("min_cosine", "min_sqnr_db", "agreement"):
        assert reused.summary.accuracy[key] == pytest.approx(separate.summary.accuracy[key], rel=1e-5)


def test_a_stack_feed_is_one_sample_and_a_batch_feed_counts_its_first_axis(tmp_path):
    from compressq.data import synthetic_dataset

    batch = load_dataset(_npz(tmp_path, x=np.zeros((5, 3, 5, 5), np.float32)), conv_model())
    assert [batch.samples_in(feed) for feed in batch.batches(2)] == [2, 2, 1]
    stack = synthetic_dataset(conv_model(), samples=3)
    stack.layout = "stack"
    assert stack.samples_in({"flag": np.array(True), "x": np.zeros((7, 3, 5, 5), np.float32)}) == 1
    assert batch.samples_in({"flag": np.array(True), "x": np.zeros((4, 3, 5, 5), np.float32)}) == 4


def _npz(folder: Path, **arrays) -> Path:
    path = folder / "data.npz"
    np.savez(path, **arrays)
    return path


def test_every_data_pass_runs_with_its_idle_threads_asleep(data, monkeypatch):
    """Spinning pool threads cost calibration CPU time without buying wall time: both passes turn them off,
    and the ranges are numpy's all the same."""
    model = conv_model()
    dataset, path = data(model)
    created = []
    real = collect_module.create_session

    def recording(model, *args, **kwargs):
        created.append(kwargs.get("spinning", True))
        return real(model, *args, **kwargs)

    monkeypatch.setattr(collect_module, "create_session", recording)
    ranges = {name: MinMaxObserver() for name in TENSORS}
    histogram = Request("conv", HistogramObserver("entropy"))  # needs the values: a second, fetching pass
    collect(model, dataset, [*(Request(n, o) for n, o in ranges.items()), histogram], batch_size=8)
    assert len(created) == 2 and not any(created)  # the reductions' pass and the histogram's fetching pass
    reference = every_tensor(model, path)
    for name in TENSORS:
        assert (ranges[name].low, ranges[name].high) == (reference[name].min(), reference[name].max())


def test_outputs_whose_first_axis_is_not_the_batch_are_not_taken_as_samples():
    from compressq.quantize.static import _outputs_batched_like_inputs

    def model(output_shape):
        return make_model([helper.make_node("Relu", ["x"], ["y"], name="r")],
                          [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 4])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, output_shape)], [])

    assert _outputs_batched_like_inputs(model(["N", 4]))
    assert not _outputs_batched_like_inputs(model(["T", "N"]))  # time-major: rows are steps
    assert not _outputs_batched_like_inputs(model(None))  # unknown: the fp32 reference is run instead


@pytest.mark.parametrize("options", [
    dict(method="auto"),                        # the range search's judging pass
    dict(min_agreement=1.0),                    # the recovery's one-pass errors
    dict(mode="weight-only", block_size=16),    # weight-only calibration rows
])
def test_every_session_of_a_quantize_runs_on_the_chosen_provider(monkeypatch, options):
    """--provider cuda: no data pass, timing or check opens a CPU session behind the user's back (onnxruntime's
    provider-independent clean-up before quantizing is the one CPU session, on purpose)."""
    from compressq import runtime
    from compressq.data import load_dataset as load
    from compressq.graph import passes
    from compressq.io import load_model
    from compressq.quantize.api import quantize_model
    from compressq.quantize.config import QuantizeConfig
    from tests.conftest import SAMPLES

    providers = []
    real = runtime.provider_chain

    def recording(provider):
        providers.append(provider)
        return real("cpu")  # this machine has no GPU: run it on CPU

    monkeypatch.setattr(runtime, "provider_chain", recording)
    monkeypatch.setitem(passes._checks, "on", False)  # the tests' own contract checks open CPU sessions
    model = load_model(SAMPLES / "digits_transformer.onnx")
    dataset = load(SAMPLES / "digits_seq_calib.npz", model)
    quantize_model(model, dataset, QuantizeConfig(provider="cuda", samples=32, **options))
    assert providers.count("cuda") > 2 and providers.count("cpu") <= 1, providers


def test_sum_outputs_adds_up_a_tensor_over_the_data_in_one_unoptimized_pass(data, monkeypatch):
    from compressq.runtime import AS_WRITTEN
    from compressq.stats.collect import sum_outputs

    model = conv_model()
    dataset, path = data(model, samples=21)
    levels = []
    real = collect_module.create_session
    monkeypatch.setattr(collect_module, "create_session",
                        lambda *a, **k: levels.append(k.get("level")) or real(*a, **k))
    totals = sum_outputs(model, ["y", "relu"], dataset, batch_size=4)
    expected = every_tensor(model, path)
    assert totals["y"] == pytest.approx(float(expected["y"].astype(np.float64).sum()), rel=1e-5)
    assert totals["relu"] == pytest.approx(float(expected["relu"].astype(np.float64).sum()), rel=1e-5)
    assert levels == [AS_WRITTEN]  # one pass, nothing fused
