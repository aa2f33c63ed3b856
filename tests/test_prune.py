"""`compressq prune`: the plan, unstructured and N:M pruning, refit, the CLI, and prune -> quantize."""

from __future__ import annotations

import hashlib
import json
import warnings

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from compressq.data import load_dataset, synthetic_dataset
from compressq.errors import UsageError
from compressq.graph.index import GraphIndex
from compressq.io import read_stamp
from compressq.prune import PruneConfig, prune_model
from compressq.prune.plan import plan_pruning
from compressq.runtime import create_session
from tests.conftest import SAMPLES, make_model

CNN_LAYERS = ("/features/features.0/features.0.0/Conv", "/features/features.1/features.1.0/Conv",
              "/classifier/classifier.1/Gemm", "/classifier/classifier.4/Gemm")


@pytest.fixture(scope="module")
def cnn() -> onnx.ModelProto:
    return onnx.load(str(SAMPLES / "digits_cnn.onnx"))


@pytest.fixture(scope="module")
def cnn_calibration(cnn):
    return load_dataset(SAMPLES / "digits_calib.npz", cnn)


@pytest.fixture(scope="module")
def cnn_eval() -> dict[str, np.ndarray]:
    return dict(np.load(SAMPLES / "digits_eval.npz"))


def logits(model: onnx.ModelProto, inputs: np.ndarray) -> np.ndarray:
    return create_session(model).run(None, {"input": inputs})[0]


def weight_of(model: onnx.ModelProto, node_name: str) -> np.ndarray:
    node = next(n for n in model.graph.node if n.name == node_name)
    return GraphIndex(model.graph).constant(node.input[1])


# ---------------------------------------------------------------------------------------------------
# The plan


def test_plan_keeps_first_last_and_tiny_layers_dense(cnn):
    plan = plan_pruning(cnn, PruneConfig(sparsity=0.5))
    assert [layer.node for layer in plan.layers] == list(CNN_LAYERS[1:3])
    reasons = {d.node: d.reason for d in plan.dense}
    assert reasons[CNN_LAYERS[0]].startswith("first") and reasons[CNN_LAYERS[3]].startswith("last")
    everything = plan_pruning(cnn, PruneConfig(sparsity=0.5, keep_first=False, keep_last=False))
    assert [d.reason.split(":")[0] for d in everything.dense] == ["tiny", "tiny"]  # 144 and 640 parameters
    assert len(plan_pruning(cnn, PruneConfig(0.5, keep_first=False, keep_last=False, min_parameters=0)).layers) == 4


@pytest.mark.parametrize(("pattern", "dense"), [("Gemm", CNN_LAYERS[2]), ("/features/*", CNN_LAYERS[1]),
                                                ("onnx::Conv_32", CNN_LAYERS[1])])
def test_plan_exclude_matches_node_names_op_types_and_weight_names(cnn, pattern, dense):
    plan = plan_pruning(cnn, PruneConfig(sparsity=0.5, exclude=(pattern,)))
    assert dense not in [layer.node for layer in plan.layers]
    assert f"--exclude '{pattern}'" in {d.node: d.reason for d in plan.dense}[dense]


def test_plan_records_each_weight_layout():
    rng = np.random.default_rng(0)
    shapes = {"w_conv": (4, 2, 3, 3), "w_gemm_t": (5, 16), "w_gemm": (16, 5), "w_matmul": (5, 6),
              "w_deconv": (6, 3, 2, 2)}
    nodes = [helper.make_node("Conv", ["x", "w_conv"], ["c"], name="conv"),
             helper.make_node("Flatten", ["c"], ["f"], name="flatten"),
             helper.make_node("Gemm", ["f", "w_gemm_t"], ["g1"], name="gemm_t", transB=1),
             helper.make_node("Gemm", ["f", "w_gemm"], ["g2"], name="gemm"),
             helper.make_node("MatMul", ["g1", "w_matmul"], ["m"], name="matmul"),
             helper.make_node("Reshape", ["m", "shape"], ["r"], name="reshape"),
             helper.make_node("ConvTranspose", ["r", "w_deconv"], ["y"], name="deconv")]
    initializers = [numpy_helper.from_array(rng.standard_normal(s).astype(np.float32), n) for n, s in shapes.items()]
    initializers.append(numpy_helper.from_array(np.array([1, 6, 1, 1], np.int64), "shape"))
    model = make_model(nodes, [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 2, 4, 4])],
                       [helper.make_tensor_value_info("y", TensorProto.FLOAT, None),
                        helper.make_tensor_value_info("g2", TensorProto.FLOAT, None)], initializers)
    plan = plan_pruning(model, PruneConfig(0.5, keep_first=False, keep_last=False, min_parameters=0))
    axes = {layer.node: (layer.input_axis, layer.output_axis) for layer in plan.layers}
    assert axes == {"conv": (1, 0), "gemm_t": (1, 0), "gemm": (0, 1), "matmul": (0, 1), "deconv": (0, 1)}


def test_plan_leaves_shared_and_quantized_weights_dense():
    weight = numpy_helper.from_array(np.ones((4, 4), np.float32), "w")
    int_weight = numpy_helper.from_array(np.ones((4, 4), np.int8), "q")
    nodes = [helper.make_node("MatMul", ["x", "w"], ["a"], name="first"),
             helper.make_node("MatMul", ["a", "w"], ["b"], name="second"),
             helper.make_node("MatMulInteger", ["b_int", "q"], ["c"], name="integer")]
    model = make_model(nodes[:2], [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4])],
                       [helper.make_tensor_value_info("b", TensorProto.FLOAT, [1, 4])], [weight, int_weight])
    model.graph.node.append(helper.make_node("MatMul", ["b", "q"], ["c"], name="integer_weight"))
    plan = plan_pruning(model, PruneConfig(0.5, keep_first=False, keep_last=False, min_parameters=0))
    reasons = {d.node: d.reason for d in plan.dense}
    assert reasons["first"] == reasons["second"] == "weight is shared by 2 nodes"
    assert "int8" in reasons["integer_weight"] and not plan.layers


# ---------------------------------------------------------------------------------------------------
# Unstructured and N:M


@pytest.mark.parametrize("scope", ["local", "global"])
def test_unstructured_sparsity_matches_the_request_within_a_point(cnn, scope):
    result = prune_model(cnn, PruneConfig(sparsity=0.7, scope=scope))
    pruned = [weight_of(result.model, name) for name in CNN_LAYERS[1:3]]
    overall = sum(np.count_nonzero(w == 0) for w in pruned) / sum(w.size for w in pruned)
    assert abs(overall - 0.7) <= 0.01 and abs(result.summary.achieved_sparsity - overall) < 1e-9
    per_layer = [layer.sparsity for layer in result.summary.layers]
    if scope == "local":
        assert all(abs(s - 0.7) <= 0.01 for s in per_layer)
    else:
        assert max(per_layer) - min(per_layer) > 0.05  # one threshold: the layers end up different
    np.testing.assert_array_equal(weight_of(result.model, CNN_LAYERS[0]), weight_of(cnn, CNN_LAYERS[0]))


def test_prune_model_does_not_touch_its_input(cnn):
    before = cnn.SerializeToString()
    prune_model(cnn, PruneConfig(sparsity=0.5))
    assert cnn.SerializeToString() == before


def test_2_of_4_on_the_transformer_keeps_two_of_every_four_along_the_input_dimension():
    model = onnx.load(str(SAMPLES / "digits_transformer.onnx"))
    result = prune_model(model, PruneConfig.from_options(None, "2:4"))
    assert result.summary.requested_sparsity == 0.5 and result.summary.layers
    for layer in result.summary.layers:
        weight = weight_of(result.model, layer.node)  # MatMul weights are [in, out]
        groups = (weight != 0).reshape(weight.shape[0] // 4, 4, weight.shape[1])
        assert np.all(groups.sum(axis=1) == 2), layer.node


def test_random_criterion_is_seeded(cnn):
    def zeros(seed):
        model = prune_model(cnn, PruneConfig(sparsity=0.5, criterion="random", seed=seed)).model
        return weight_of(model, CNN_LAYERS[2]) == 0

    assert np.array_equal(zeros(1), zeros(1)) and not np.array_equal(zeros(1), zeros(2))


@pytest.mark.parametrize(("options", "message"), [
    (dict(sparsity=1.5), "between 0 and 1"),
    (dict(sparsity=0.3, pattern="2:4"), "exactly 50%"),
    (dict(sparsity=0.5, pattern="3:2"), "unknown --pattern"),
    (dict(sparsity=0.5, pattern="channel", scope="global"), "--scope global"),
    (dict(sparsity=0.5, criterion="taylor"), "--criterion"),
])
def test_config_rejects_contradictions(options, message):
    with pytest.raises(UsageError, match=message):
        PruneConfig(**options)


def test_nothing_to_prune_is_an_error_not_a_silent_copy(cnn):
    with pytest.raises(UsageError, match="nothing to prune"):
        prune_model(cnn, PruneConfig(sparsity=0.5, exclude=("Conv", "Gemm")))


# ---------------------------------------------------------------------------------------------------
# Refit


def relative_error(got: np.ndarray, reference: np.ndarray) -> float:
    return float(np.linalg.norm(got - reference) / np.linalg.norm(reference))


def test_refit_reduces_output_error_on_held_out_data_and_keeps_the_zeros(cnn, cnn_calibration, cnn_eval):
    config = PruneConfig(sparsity=0.8)
    plain = prune_model(cnn, config)
    refit = prune_model(cnn, config, cnn_calibration)
    dense = logits(cnn, cnn_eval["input"])
    assert relative_error(logits(refit.model, cnn_eval["input"]), dense) < \
        0.6 * relative_error(logits(plain.model, cnn_eval["input"]), dense)
    for name in CNN_LAYERS[1:3]:
        np.testing.assert_array_equal(weight_of(refit.model, name) == 0, weight_of(plain.model, name) == 0)
    assert [r.node for r in refit.summary.refit] == list(CNN_LAYERS[1:3])
    assert all(r.error_after < r.error_before for r in refit.summary.refit)


def test_channel_refit_reconstructs_the_next_layers(cnn, cnn_calibration, cnn_eval):
    config = PruneConfig(sparsity=0.3, pattern="channel")
    plain = prune_model(cnn, config)
    refit = prune_model(cnn, config, cnn_calibration)
    assert [r.node for r in refit.summary.refit] == list(CNN_LAYERS[1:])  # conv2, fc1 and the last layer
    dense = logits(cnn, cnn_eval["input"])
    assert relative_error(logits(refit.model, cnn_eval["input"]), dense) < \
        0.6 * relative_error(logits(plain.model, cnn_eval["input"]), dense)


def test_refit_keeps_the_2_of_4_pattern_of_a_matmul_with_its_bias_add():
    rng = np.random.default_rng(0)
    w1, b1, w2 = rng.standard_normal((8, 16)), rng.standard_normal(16), rng.standard_normal((16, 4))
    nodes = [helper.make_node("MatMul", ["x", "w1"], ["m1"], name="fc1"),
             helper.make_node("Add", ["b1", "m1"], ["a1"], name="fc1.bias"),
             helper.make_node("Tanh", ["a1"], ["t"], name="tanh"),
             helper.make_node("MatMul", ["t", "w2"], ["y"], name="fc2")]
    initializers = [numpy_helper.from_array(v.astype(np.float32), n) for n, v in (("w1", w1), ("b1", b1), ("w2", w2))]
    model = make_model(nodes, [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 8])],
                       [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", 4])], initializers)
    dataset = synthetic_dataset(model, samples=64, seed=0)
    config = PruneConfig(sparsity=0.5, pattern="2:4", keep_last=True, min_parameters=0, keep_first=False)
    result = prune_model(model, config, dataset)
    weight = weight_of(result.model, "fc1")
    assert np.all((weight != 0).reshape(2, 4, 16).sum(axis=1) == 2)
    bias = GraphIndex(result.model.graph).constant("b1")
    assert not np.allclose(bias, b1)  # the bias took part in the fit
    record = result.summary.refit[0]
    assert record.node == "fc1" and record.error_after < record.error_before


# ---------------------------------------------------------------------------------------------------
# CLI


def test_cli_writes_the_default_output_and_leaves_the_input_alone(run_cli, tmp_path):
    source = tmp_path / "digits_cnn.onnx"
    source.write_bytes((SAMPLES / "digits_cnn.onnx").read_bytes())
    digest = hashlib.sha256(source.read_bytes()).hexdigest()
    result = run_cli("prune", source, "--sparsity", "0.5", "--calibration-data", SAMPLES / "digits_calib.npz")
    assert result.exit_code == 0, result.stderr
    output = tmp_path / "digits_cnn.pruned.onnx"
    assert output.exists() and hashlib.sha256(source.read_bytes()).hexdigest() == digest
    assert "Left dense" in result.stdout and "last weighted layer" in result.stdout
    stamp = read_stamp(onnx.load(str(output)))
    assert stamp["command"] == "prune" and json.loads(stamp["settings"])["sparsity"] == 0.5


def test_cli_json_is_the_only_thing_on_stdout(run_cli, tmp_path):
    output = tmp_path / "out.onnx"
    result = run_cli("prune", SAMPLES / "digits_cnn.onnx", "--pattern", "channel", "-s", "0.3", "-o", output, "--json")
    assert result.exit_code == 0, result.stderr
    summary = json.loads(result.stdout)
    assert summary["output"] == str(output) and summary["output_bytes"] < summary["input_bytes"]
    assert {layer["node"] for layer in summary["layers"]} == set(CNN_LAYERS[1:3])
    assert all(d["reason"] for d in summary["dense_layers"])


def test_cli_refuses_to_overwrite_its_input_and_bad_options(run_cli, tmp_path):
    source = tmp_path / "m.onnx"
    source.write_bytes((SAMPLES / "digits_cnn.onnx").read_bytes())
    assert run_cli("prune", source, "-s", "0.5", "-o", source).exit_code == 2
    result = run_cli("prune", source, "--pattern", "2:4", "-s", "0.3")
    assert result.exit_code == 2 and "2:4" in result.stderr and not result.stdout


# ---------------------------------------------------------------------------------------------------
# Pairs with quantize


def test_prune_then_quantize_keeps_every_pruned_zero_exactly_zero(cnn, cnn_calibration):
    from compressq.evaluate.summary import summarize
    from compressq.quantize.api import quantize_model
    from compressq.quantize.config import QuantizeConfig

    pruned = prune_model(cnn, PruneConfig(sparsity=0.5)).model
    quantized = quantize_model(pruned, cnn_calibration, QuantizeConfig(speed_check=False)).model
    int8 = [numpy_helper.to_array(t) for t in quantized.graph.initializer if t.data_type == TensorProto.INT8]
    for name in CNN_LAYERS[1:3]:
        zeros = weight_of(pruned, name) == 0
        matches = [q for q in int8 if q.shape == zeros.shape and np.all(q[zeros] == 0)]
        assert matches, f"no int8 weight keeps the zeros of {name}"
    summary = summarize(quantized, SAMPLES / "digits_cnn.onnx")
    sparse = [i for i in summary.initializers if i.dtype == "int8" and i.parameters > 1000]
    assert sparse and all(i.zero_fraction >= 0.5 for i in sparse)


@pytest.mark.parametrize("attributes", [
    dict(pads=[1, 1, 1, 1]),
    dict(strides=[2, 2], dilations=[2, 2], pads=[0, 1, 2, 1]),
    dict(auto_pad="SAME_UPPER", strides=[2, 2]),
    dict(auto_pad="SAME_LOWER", strides=[2, 1], group=2),
    dict(auto_pad="VALID", group=4),
])
def test_conv_rows_reproduce_the_convolution(attributes):
    """im2col rows times the weight matrix give onnxruntime's Conv output at the sampled positions."""
    from compressq.prune.refit import ConvView

    rng = np.random.default_rng(5)
    group = attributes.get("group", 1)
    weight = rng.standard_normal((8, 4 // group, 3, 3)).astype(np.float32)
    bias = rng.standard_normal(8).astype(np.float32)
    node = helper.make_node("Conv", ["x", "w", "b"], ["y"], name="conv", **attributes)
    model = make_model([node], [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 4, 7, 6])],
                       [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)],
                       [numpy_helper.from_array(weight, "w"), numpy_helper.from_array(bias, "b")])
    x = rng.standard_normal((2, 4, 7, 6)).astype(np.float32)
    y = create_session(model).run(None, {"x": x})[0]
    view = ConvView(model.graph, model.graph.node[0])
    rows = view.rows(x, y, np.random.default_rng(0), limit=20)
    for matrix, (inputs, targets) in zip(view.matrices(), rows):
        np.testing.assert_allclose(inputs @ matrix.T, targets, rtol=1e-4, atol=1e-4)


def test_n_m_leaves_layers_without_whole_groups_dense(cnn):
    plan = plan_pruning(cnn, PruneConfig(0.5, pattern="2:4", keep_first=False, min_parameters=0))
    reasons = {d.node: d.reason for d in plan.dense}
    assert "input dimension 1 is not a multiple of 4" in reasons[CNN_LAYERS[0]]  # a 1-channel input
    assert CNN_LAYERS[1] in [layer.node for layer in plan.layers]


# ---------------------------------------------------------------------------------------------------
# Refit cost: shared Gram matrix, row budget, graph prefixes, progress


def masked_ridge_reference(gram, cross, weights, free, ridge):
    """One output channel at a time: (G[k,k] + s I) w = C[k,o] + s w0[k], s = ridge x mean diag G[k,k]."""
    fitted = np.zeros_like(weights)
    for output in range(weights.shape[0]):
        kept = np.flatnonzero((weights[output] != 0) | free)
        block = gram[np.ix_(kept, kept)]
        strength = ridge * np.mean(np.diag(block))
        fitted[output, kept] = np.linalg.solve(block + strength * np.eye(kept.size),
                                               cross[kept, output] + strength * weights[output, kept])
    return fitted


def test_shared_gram_solves_equal_the_per_channel_reference():
    from compressq.prune.refit import NormalEquations

    rng = np.random.default_rng(0)
    features, outputs = 24, 40
    inputs = rng.standard_normal((300, features))
    targets = inputs @ rng.standard_normal((features, outputs)) + 0.1 * rng.standard_normal((300, outputs))
    equations = NormalEquations(features, outputs)
    equations.update(inputs[:170], targets[:170])
    equations.update(inputs[170:], targets[170:])
    weights = rng.standard_normal((outputs, features))
    weights[rng.random(weights.shape) < 0.6] = 0  # unstructured: (nearly) every row its own pattern
    weights[:6] = np.where(np.arange(features) % 3 == 0, 0.5, 0.0)  # six rows sharing one pattern
    free = np.zeros(features, dtype=bool)
    free[-1] = True  # a bias column
    got = equations.solve(weights, free, 0.01)
    expected = masked_ridge_reference(equations.gram, equations.cross, weights, free, 0.01)
    np.testing.assert_allclose(got, expected, rtol=1e-6, atol=1e-8)
    assert not np.any(got[(weights == 0) & ~free[None, :]])


def test_prefix_model_computes_the_same_tensor_with_fewer_nodes(cnn, cnn_eval):
    from compressq.prune.refit import prefix_model
    from compressq.runtime import with_outputs

    name = next(n for n in cnn.graph.node if n.name == CNN_LAYERS[2]).input[0]
    prefix = prefix_model(cnn, [name])
    assert len(prefix.graph.node) < len(cnn.graph.node)
    assert all(n.name not in CNN_LAYERS[2:] for n in prefix.graph.node)
    feed = {"input": cnn_eval["input"][:16]}
    full = create_session(with_outputs(cnn, [name])).run([name], feed)[0]
    np.testing.assert_array_equal(create_session(prefix).run([name], feed)[0], full)


def test_row_budget_stops_reading_samples_once_the_layer_has_enough_rows():
    """A 1x1 conv on 16x16 inputs has 256 positions per sample: a budget of 512 rows spread 4x needs 8
    samples, so a batch of 8 covers it and the layer reads 1 of 16 batches; the fit stays exact."""
    from compressq.data import Dataset, Shard, model_inputs
    from compressq.prune.refit import RefitSettings, RefitTarget, refit_layers

    rng = np.random.default_rng(1)
    weight = rng.standard_normal((6, 5, 1, 1)).astype(np.float32)
    model = make_model([helper.make_node("Conv", ["x", "w"], ["y"], name="conv")],
                       [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", 5, 16, 16])],
                       [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)],
                       [numpy_helper.from_array(weight, "w")])
    pruned = onnx.ModelProto()
    pruned.CopyFrom(model)
    sparse = np.where(rng.random(weight.shape) < 0.5, 0, weight)
    pruned.graph.initializer[0].CopyFrom(numpy_helper.from_array(sparse, "w"))
    arrays = {"x": rng.standard_normal((128, 5, 16, 16)).astype(np.float32)}
    shard = Shard("memory", 128, {"x": arrays["x"].shape}, lambda keys: arrays)
    dataset = Dataset(model_inputs(model), [shard], "memory")
    settings = RefitSettings(samples=128, batch_size=8, ridge=0.0, rows_per_feature=1, min_rows=512, spread=4)
    (record,) = refit_layers(pruned, model, [RefitTarget("conv")], dataset, settings)
    assert record.rows == 512  # the budget, not 128 x 256 positions
    fitted = numpy_helper.to_array(pruned.graph.initializer[0])
    assert np.all(fitted[sparse == 0] == 0)
    assert record.error_after <= record.error_before


def branching_model(seed: int = 2):
    """x -> Relu -> {conv_a, conv_b} (both read one tensor) -> Mul -> conv_c: waves [a, b], [c].

    Mul, not Add: onnxruntime fuses a Conv and the Add after it into one kernel when the Conv's output is
    not a graph output, so the dense teacher (one run exposing every target's output) and a teacher asked
    for conv_c alone would differ in the last bit, which is onnxruntime's rounding, not refit's."""
    rng = np.random.default_rng(seed)
    weights = {name: rng.standard_normal((4, 4, 3, 3)).astype(np.float32) for name in ("wa", "wb", "wc")}
    conv = {"kernel_shape": [3, 3], "pads": [1, 1, 1, 1]}
    nodes = [helper.make_node("Relu", ["x"], ["r"], name="relu"),
             helper.make_node("Conv", ["r", "wa"], ["a"], name="conv_a", **conv),
             helper.make_node("Conv", ["r", "wb"], ["b"], name="conv_b", **conv),
             helper.make_node("Mul", ["a", "b"], ["s"], name="mul"),
             helper.make_node("Conv", ["s", "wc"], ["y"], name="conv_c", **conv)]
    model = make_model(nodes, [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", 4, 8, 8])],
                       [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)],
                       [numpy_helper.from_array(w, name) for name, w in weights.items()])
    pruned = onnx.ModelProto()
    pruned.CopyFrom(model)
    for tensor in pruned.graph.initializer:
        value = numpy_helper.to_array(tensor)
        tensor.CopyFrom(numpy_helper.from_array(np.where(rng.random(value.shape) < 0.5, 0, value), tensor.name))
    return model, pruned


def test_layers_reading_independent_inputs_share_one_wave_and_fit_as_if_one_by_one():
    from compressq.prune.refit import RefitSettings, RefitTarget, refit_layers, refit_waves

    model, pruned = branching_model()
    targets = [RefitTarget("conv_a"), RefitTarget("conv_b"), RefitTarget("conv_c")]
    assert [[t.node for t in wave] for wave in refit_waves(pruned.graph, targets)] == [["conv_a", "conv_b"],
                                                                                        ["conv_c"]]
    dataset = synthetic_dataset(model, samples=16)
    settings = RefitSettings(samples=16, batch_size=4)
    together = onnx.ModelProto()
    together.CopyFrom(pruned)
    records = refit_layers(together, model, targets, dataset, settings)
    assert [r.node for r in records] == ["conv_a", "conv_b", "conv_c"]
    assert all(r.error_after < r.error_before for r in records)
    for target in targets:  # one layer per call: each call is its own wave
        refit_layers(pruned, model, [target], dataset, settings)
    for a, b in zip(together.graph.initializer, pruned.graph.initializer):
        np.testing.assert_array_equal(numpy_helper.to_array(a), numpy_helper.to_array(b))


def refit_branching(targets, samples: int, batch_size: int) -> onnx.ModelProto:
    from compressq.prune.refit import RefitSettings, refit_layers

    model, pruned = branching_model()
    settings = RefitSettings(samples=samples, batch_size=batch_size, min_rows=50, rows_per_feature=1)
    refit_layers(pruned, model, targets, synthetic_dataset(model, samples=samples), settings)
    return pruned


def test_the_dense_teacher_runs_once_for_all_waves(monkeypatch):
    """One teacher session for every wave, one student session per wave (both waves read a computed tensor),
    each a single collect() pass with no range pass before it."""
    import compressq.prune.refit as refit
    from compressq.stats import collect as collect_module

    sessions = []
    real = collect_module.create_session

    def counted(model, *args, **kwargs):
        sessions.append(sorted(o.name for o in model.graph.output))
        return real(model, *args, **kwargs)

    monkeypatch.setattr(collect_module, "create_session", counted)
    targets = [refit.RefitTarget("conv_a"), refit.RefitTarget("conv_b"), refit.RefitTarget("conv_c")]
    refit_branching(targets, samples=16, batch_size=4)
    assert len(refit.refit_waves(branching_model()[1].graph, targets)) == 2
    assert len(sessions) == 3
    assert sessions[0] == ["a", "b", "y"]


@pytest.mark.parametrize(("samples", "batch_size"), [(23, 6), (16, 16), (9, 1)])
@pytest.mark.parametrize("budget", [1, 4 * 2**20])  # 1 byte: one sample a run
def test_refit_is_the_same_run_to_run_and_changes_every_layer(monkeypatch, samples, batch_size, budget):
    import compressq.prune.refit as refit

    monkeypatch.setattr(refit, "REFIT_BUDGET", budget)
    targets = [refit.RefitTarget("conv_a"), refit.RefitTarget("conv_b"), refit.RefitTarget("conv_c")]
    first, second = refit_branching(targets, samples, batch_size), refit_branching(targets, samples, batch_size)
    assert first.SerializeToString(deterministic=True) == second.SerializeToString(deterministic=True)
    changed = [np.abs(numpy_helper.to_array(a) - numpy_helper.to_array(b)).max() > 1e-3
               for a, b in zip(first.graph.initializer, branching_model()[1].graph.initializer)]
    assert all(changed)


def sequence_matmul(seq_first: bool) -> tuple[onnx.ModelProto, onnx.ModelProto]:
    """x [n, s, 8] -> (Transpose to [s, n, 8]) -> MatMul [8, 8]: dense, and with half of each output's inputs
    pruned."""
    rng = np.random.default_rng(0)
    weight = rng.standard_normal((8, 8)).astype(np.float32)
    nodes = [helper.make_node("Transpose", ["x"], ["t"], name="tr", perm=[1, 0, 2])] if seq_first else []
    nodes.append(helper.make_node("MatMul", ["t" if seq_first else "x", "w"], ["y"], name="mm"))
    inputs = [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", "s", 8])]
    outputs = [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)]
    dense = make_model(nodes, inputs, outputs, [numpy_helper.from_array(weight, "w")])
    kept = np.arange(8)[:, None] % 2 == 0  # every output keeps 4 of its 8 inputs
    pruned = make_model(nodes, inputs, outputs, [numpy_helper.from_array(np.where(kept, weight, 0), "w")])
    return dense, pruned


def sequence_dataset(model: onnx.ModelProto, tmp_path, layout: str, lengths: list[int]):
    """Four samples per sequence length (stack layout: one complete feed [1, s, 8] per sample), whose 8 features
    mix 3 sources: the kept weights can then stand in exactly for the pruned ones."""
    rng = np.random.default_rng(1)
    mixing = rng.standard_normal((3, 8))

    def features(*shape: int) -> np.ndarray:
        return (rng.standard_normal((*shape, 3)) @ mixing).astype(np.float32)

    if layout == "batch":
        np.savez(tmp_path / "seq.npz", x=features(4 * len(lengths), lengths[0]))
        return load_dataset(tmp_path / "seq.npz", model)
    folder = tmp_path / "feeds"
    folder.mkdir()
    for number, length in enumerate(length for length in lengths for _ in range(4)):
        np.savez(folder / f"{number:03d}.npz", x=features(1, 1, length))
    return load_dataset(folder, model, layout="stack")


@pytest.mark.parametrize(("seq_first", "layout", "lengths", "budget"), [
    (False, "stack", [5, 7, 6, 9], None),   # feeds of different lengths: each run its own shape
    (True, "batch", [6, 6, 6, 6], 1),      # the layer's axis 0 is the sequence, not the samples; one sample a run
    (True, "batch", [6, 6, 6, 6], None),
])
def test_refit_pairs_the_teachers_runs_with_the_students_whatever_the_axes(monkeypatch, tmp_path, seq_first,
                                                                             layout, lengths, budget):
    """The dense layer's output is exactly X W, and X's features are mixtures of 3 sources: a refit that pairs
    the right rows recovers the pruned weights' contribution almost exactly; mispaired rows could not."""
    import compressq.prune.refit as refit

    if budget is not None:
        monkeypatch.setattr(refit, "REFIT_BUDGET", budget)
    dense, pruned = sequence_matmul(seq_first)
    dataset = sequence_dataset(dense, tmp_path, layout, lengths)
    settings = refit.RefitSettings(samples=16, batch_size=4, min_rows=50, rows_per_feature=1, ridge=1e-6)
    record, = refit.refit_layers(pruned, dense, [refit.RefitTarget("mm")], dataset, settings)
    assert record.rows > 0 and not record.note
    assert record.error_after < 0.05 < record.error_before


def test_progress_reports_each_stage_with_its_total(cnn, cnn_calibration):
    calls = []
    prune_model(cnn, PruneConfig(sparsity=0.5), cnn_calibration,
                progress=lambda stage, done, total: calls.append((stage, done, total)))
    stages = {stage: total for stage, _, total in calls}
    assert stages == {"pruning layers": 2, "refitting layers": 2}
    assert calls[-1] == ("refitting layers", 2, 2)
    assert all(0 <= done <= total for _, done, total in calls)


def test_cli_without_calibration_data_warns_that_the_cost_is_unmeasured(run_cli, tmp_path):
    result = run_cli("prune", SAMPLES / "digits_cnn.onnx", "-s", "0.5", "-o", tmp_path / "p.onnx")
    assert result.exit_code == 0
    warnings = [line for line in result.stderr.splitlines() if "warning" in line]
    assert len(warnings) == 1 and "unmeasured" in warnings[0] and "--calibration-data" in warnings[0]
    refit = run_cli("prune", SAMPLES / "digits_cnn.onnx", "-s", "0.5", "-o", tmp_path / "q.onnx",
                    "--calibration-data", SAMPLES / "digits_calib.npz")
    assert refit.exit_code == 0 and "unmeasured" not in refit.stderr


def test_refit_on_data_that_overflows_says_so_without_numpy_warnings(run_cli, fragile, tmp_path):
    """1e30 inputs overflow float32 statistics: the layer keeps its pruned weights, one note says why, and no
    RuntimeWarning reaches the user's terminal."""
    huge = tmp_path / "huge.npz"
    np.savez(huge, x=np.full((64, 16), 1e30, np.float32))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        result = run_cli("prune", fragile.model_path, "--sparsity", "0.5", "--prune-first", "--prune-last",
                         "--min-params", "1", "--calibration-data", huge, "-o", tmp_path / "p.onnx", "--json")
    assert result.exit_code == 0, result.stderr
    assert not [w for w in caught if issubclass(w.category, RuntimeWarning)]
    notes = json.loads(result.stdout)["notes"]
    assert any("'fc1' not refit: its inputs overflow float32" in note for note in notes)
    pruned = onnx.load(str(tmp_path / "p.onnx"))
    assert all(np.isfinite(numpy_helper.to_array(t)).all() for t in pruned.graph.initializer)
