"""Networks inside control flow (issue 14, item 2): weights in If branches, Loop and Scan bodies (body-local
and outer-scope), an If nested in a Loop. Every command reaches them; calibration observes tensors in bodies;
the rewrite keeps the bodies valid (checker, onnxruntime) and the outputs close to a numpy reference."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from compressq.graph.index import implicit_inputs, scopes
from compressq.graph.normalize import interface, normalize
from compressq.stats.subgraphs import probe_bodies, split_by_scope
from tests.helpers import cosine

OPSET = [helper.make_opsetid("", 17)]


def _array(rng, *shape, scale=0.3) -> np.ndarray:
    return (rng.standard_normal(shape) * scale).astype(np.float32)


def _constant(name: str, value: np.ndarray) -> onnx.NodeProto:
    """A weight held in a Constant node, as the voice-activity model's exporter writes it."""
    return helper.make_node("Constant", [], [name], name=f"const_{name}", value=numpy_helper.from_array(value, name))


def _model(nodes, inputs, outputs, initializers=(), name="g") -> onnx.ModelProto:
    graph = helper.make_graph(nodes, name, inputs, outputs, list(initializers))
    model = helper.make_model(graph, opset_imports=OPSET, producer_name="tests")
    model.ir_version = 8
    onnx.checker.check_model(model, full_check=True)
    return model


# ---------------------------------------------------------------------------------------------------
# Models and their numpy references


def if_model(seed: int = 0) -> tuple[onnx.ModelProto, dict[str, np.ndarray]]:
    """The voice-activity shape: the whole network in both branches of an If on a scalar sample rate, every
    weight in a Constant node. 16 kHz: conv-relu-conv-relu-pool-matmul; else: flatten-matmul-relu-matmul."""
    rng = np.random.default_rng(seed)
    w = {"c1": _array(rng, 16, 3, 3, 3), "c1b": _array(rng, 16, scale=0.1), "c2": _array(rng, 16, 16, 3, 3, scale=0.1),
         "m1": _array(rng, 16, 8), "e1": _array(rng, 192, 32, scale=0.1), "e2": _array(rng, 32, 8)}
    then_nodes = [_constant("c1", w["c1"]), _constant("c1b", w["c1b"]), _constant("c2", w["c2"]),
                  _constant("m1", w["m1"]),
                  helper.make_node("Conv", ["x", "c1", "c1b"], ["t1"], name="then_conv1", pads=[1, 1, 1, 1]),
                  helper.make_node("Relu", ["t1"], ["t2"], name="then_relu1"),
                  helper.make_node("Conv", ["t2", "c2"], ["t3"], name="then_conv2", pads=[1, 1, 1, 1]),
                  helper.make_node("Relu", ["t3"], ["t4"], name="then_relu2"),
                  helper.make_node("GlobalAveragePool", ["t4"], ["t5"], name="then_pool"),
                  helper.make_node("Flatten", ["t5"], ["t6"], name="then_flatten"),
                  helper.make_node("MatMul", ["t6", "m1"], ["then_y"], name="then_fc")]
    else_nodes = [_constant("e1", w["e1"]), _constant("e2", w["e2"]),
                  helper.make_node("Flatten", ["x"], ["f1"], name="else_flatten"),
                  helper.make_node("MatMul", ["f1", "e1"], ["f2"], name="else_fc1"),
                  helper.make_node("Relu", ["f2"], ["f3"], name="else_relu"),
                  helper.make_node("MatMul", ["f3", "e2"], ["else_y"], name="else_fc2")]
    y_info = lambda name: helper.make_tensor_value_info(name, TensorProto.FLOAT, ["batch", 8])  # noqa: E731
    then_branch = helper.make_graph(then_nodes, "then", [], [y_info("then_y")])
    else_branch = helper.make_graph(else_nodes, "else", [], [y_info("else_y")])
    nodes = [helper.make_node("Equal", ["sr", "rate16k"], ["is16k"], name="is_16k"),
             helper.make_node("If", ["is16k"], ["y"], name="by_rate", then_branch=then_branch, else_branch=else_branch)]
    inputs = [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 3, 8, 8]),
              helper.make_tensor_value_info("sr", TensorProto.INT64, [])]
    model = _model(nodes, inputs, [y_info("y")], [numpy_helper.from_array(np.array(16000, np.int64), "rate16k")])
    return model, w


def if_reference(w, x: np.ndarray, sr: int) -> np.ndarray:
    if sr == 16000:
        h = np.maximum(_conv3x3(x, w["c1"]) + w["c1b"][None, :, None, None], 0)
        h = np.maximum(_conv3x3(h, w["c2"]), 0)
        return h.mean(axis=(2, 3)) @ w["m1"]
    return np.maximum(x.reshape(len(x), -1) @ w["e1"], 0) @ w["e2"]


def _conv3x3(x: np.ndarray, weight: np.ndarray) -> np.ndarray:
    padded = np.pad(x, ((0, 0), (0, 0), (1, 1), (1, 1)))
    height, width = x.shape[2:]
    out = np.zeros((x.shape[0], weight.shape[0], height, width), np.float64)
    for i in range(3):
        for j in range(3):
            out += np.einsum("nchw,oc->nohw", padded[:, :, i:i + height, j:j + width], weight[:, :, i, j])
    return out


def loop_model(seed: int = 0, nested_if: bool = False) -> tuple[onnx.ModelProto, dict[str, np.ndarray]]:
    """h <- tanh(h @ R + x @ U) for 3 iterations (R local to the body, U an outer-scope weight), then y = h @ H.
    With `nested_if`, iterations after the first add an If: odd ones h @ A (local to the branch), even ones
    h @ B (an outer-scope weight read two levels down)."""
    rng = np.random.default_rng(seed)
    w = {"R": _array(rng, 32, 32, scale=0.2), "U": _array(rng, 32, 32, scale=0.2), "H": _array(rng, 32, 8),
         "A": _array(rng, 32, 32, scale=0.2), "B": _array(rng, 32, 32, scale=0.2)}
    state = lambda name: helper.make_tensor_value_info(name, TensorProto.FLOAT, ["batch", 32])  # noqa: E731
    body_nodes = [helper.make_node("MatMul", ["h_in", "R"], ["hr"], name="loop_recurrent"),
                  helper.make_node("MatMul", ["x", "U"], ["xu"], name="loop_input"),
                  helper.make_node("Add", ["hr", "xu"], ["pre"], name="loop_add"),
                  helper.make_node("Tanh", ["pre"], ["h_new"], name="loop_tanh"),
                  helper.make_node("Identity", ["cond_in"], ["cond_out"], name="loop_cond")]
    body_out = "h_new"
    if nested_if:
        odd = helper.make_graph([helper.make_node("MatMul", ["h_new", "A"], ["odd_y"], name="odd_fc")], "odd", [],
                                [state("odd_y")], [numpy_helper.from_array(w["A"], "A")])
        even = helper.make_graph([helper.make_node("MatMul", ["h_new", "B"], ["even_y"], name="even_fc")], "even",
                                 [], [state("even_y")])
        body_nodes += [helper.make_node("Mod", ["i", "two"], ["parity"], name="loop_parity"),
                       helper.make_node("Equal", ["parity", "one"], ["is_odd"], name="loop_is_odd"),
                       helper.make_node("If", ["is_odd"], ["mixed"], name="odd_even", then_branch=odd,
                                        else_branch=even),
                       helper.make_node("Add", ["h_new", "mixed"], ["h_mixed"], name="loop_mix")]
        body_out = "h_mixed"
    body = helper.make_graph(
        body_nodes, "body",
        [helper.make_tensor_value_info("i", TensorProto.INT64, []),
         helper.make_tensor_value_info("cond_in", TensorProto.BOOL, []), state("h_in")],
        [helper.make_tensor_value_info("cond_out", TensorProto.BOOL, []), state(body_out)],
        [numpy_helper.from_array(w["R"], "R")])
    nodes = [helper.make_node("Loop", ["trips", "", "h0"], ["h_final"], name="recur", body=body),
             helper.make_node("MatMul", ["h_final", "H"], ["y"], name="head")]
    initializers = [numpy_helper.from_array(np.array(3, np.int64), "trips"),
                    numpy_helper.from_array(w["U"], "U"), numpy_helper.from_array(w["H"], "H")]
    if nested_if:
        initializers += [numpy_helper.from_array(w["B"], "B"), numpy_helper.from_array(np.array(2, np.int64), "two"),
                         numpy_helper.from_array(np.array(1, np.int64), "one")]
    inputs = [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 32]), state("h0")]
    model = _model(nodes, inputs, [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", 8])], initializers)
    return model, w


def loop_reference(w, x: np.ndarray, h0: np.ndarray, nested_if: bool = False) -> np.ndarray:
    h = h0.astype(np.float64)
    for i in range(3):
        h = np.tanh(h @ w["R"] + x @ w["U"])
        if nested_if:
            h = h + h @ (w["A"] if i % 2 else w["B"])
    return h @ w["H"]


def scan_model(seed: int = 0) -> tuple[onnx.ModelProto, dict[str, np.ndarray]]:
    """A recurrent cell over a sequence [T, batch, 16]: h <- tanh(x_t @ W (local) + h @ V (outer)); every h out."""
    rng = np.random.default_rng(seed)
    w = {"W": _array(rng, 16, 32, scale=0.3), "V": _array(rng, 32, 32, scale=0.2)}
    state = lambda name: helper.make_tensor_value_info(name, TensorProto.FLOAT, ["batch", 32])  # noqa: E731
    body = helper.make_graph(
        [helper.make_node("MatMul", ["x_t", "W"], ["xw"], name="cell_input"),
         helper.make_node("MatMul", ["h_prev", "V"], ["hv"], name="cell_recurrent"),
         helper.make_node("Add", ["xw", "hv"], ["cell_pre"], name="cell_add"),
         helper.make_node("Tanh", ["cell_pre"], ["h_next"], name="cell_tanh"),
         helper.make_node("Identity", ["h_next"], ["h_step"], name="cell_out")],
        "cell", [state("h_prev"), helper.make_tensor_value_info("x_t", TensorProto.FLOAT, ["batch", 16])],
        [state("h_next"), state("h_step")], [numpy_helper.from_array(w["W"], "W")])
    nodes = [helper.make_node("Scan", ["h0", "seq"], ["h_last", "hs"], name="rnn", body=body, num_scan_inputs=1,
                              scan_output_axes=[0], scan_input_axes=[0])]
    inputs = [helper.make_tensor_value_info("h0", TensorProto.FLOAT, ["batch", 32]),
              helper.make_tensor_value_info("seq", TensorProto.FLOAT, [5, "batch", 16])]
    outputs = [helper.make_tensor_value_info("h_last", TensorProto.FLOAT, ["batch", 32]),
               helper.make_tensor_value_info("hs", TensorProto.FLOAT, [5, "batch", 32])]
    return _model(nodes, inputs, outputs, [numpy_helper.from_array(w["V"], "V")]), w


def scan_reference(w, h0: np.ndarray, seq: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    h, steps = h0.astype(np.float64), []
    for x_t in seq:
        h = np.tanh(x_t @ w["W"] + h @ w["V"])
        steps.append(h)
    return h, np.stack(steps)


def _run(model_or_path, feed: dict[str, np.ndarray]) -> list[np.ndarray]:
    source = str(model_or_path) if isinstance(model_or_path, Path) else model_or_path.SerializeToString()
    session = ort.InferenceSession(source, providers=["CPUExecutionProvider"])
    return session.run(None, feed)


# ---------------------------------------------------------------------------------------------------
# Data on disk


IF_SAMPLES, BATCH_SAMPLES = 16, 32


def _if_arrays(seed: int) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {"x": rng.standard_normal((IF_SAMPLES, 1, 3, 8, 8)).astype(np.float32),
            "sr": np.tile(np.array([16000, 8000], np.int64), IF_SAMPLES // 2)}


def _loop_arrays(seed: int) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {"x": rng.standard_normal((BATCH_SAMPLES, 32)).astype(np.float32),
            "h0": (rng.standard_normal((BATCH_SAMPLES, 32)) * 0.5).astype(np.float32)}


def _scan_arrays(seed: int) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    # Scan takes the sequence on axis 0 and the batch on axis 1: stored as complete feeds (stack layout).
    return {"h0": (rng.standard_normal((8, 4, 32)) * 0.5).astype(np.float32),
            "seq": rng.standard_normal((8, 5, 4, 16)).astype(np.float32)}


CASES = {
    "if": (if_model, _if_arrays, "stack"),
    "loop": (loop_model, _loop_arrays, "batch"),
    "loop_if": (lambda: loop_model(nested_if=True), _loop_arrays, "batch"),
    "scan": (scan_model, _scan_arrays, "stack"),
}


@pytest.fixture(params=sorted(CASES))
def case(request, tmp_path: Path):
    build, arrays_of, layout = CASES[request.param]
    model, weights = build()
    path = tmp_path / f"{request.param}.onnx"
    onnx.save_model(model, str(path))
    calibration, evaluation = arrays_of(1), arrays_of(2)
    data = tmp_path / "calibration.npz"
    np.savez(data, **calibration)
    return request.param, path, data, layout, evaluation, weights


def reference(name: str, weights, evaluation: dict[str, np.ndarray], index: int | None = None) -> list[np.ndarray]:
    """fp32 numpy outputs for one stored feed (stack layout) or the whole batch."""
    if name == "if":
        return [if_reference(weights, evaluation["x"][index], int(evaluation["sr"][index]))]
    if name == "scan":
        return list(scan_reference(weights, evaluation["h0"][index], evaluation["seq"][index]))
    return [loop_reference(weights, evaluation["x"], evaluation["h0"], nested_if=name == "loop_if")]


def feeds(name: str, evaluation: dict[str, np.ndarray]) -> list[tuple[int | None, dict[str, np.ndarray]]]:
    if name in ("if", "scan"):
        count = len(next(iter(evaluation.values())))
        return [(i, {k: np.asarray(v[i]) for k, v in evaluation.items()}) for i in range(count)]
    return [(None, evaluation)]


def inner_op_types(model: onnx.ModelProto) -> set[str]:
    return {node.op_type for scope in scopes(model.graph) if not scope.is_main for node in scope.graph.node}


def inner_weights(model: onnx.ModelProto) -> dict[str, np.ndarray]:
    return {t.name: numpy_helper.to_array(t) for scope in scopes(model.graph) if not scope.is_main
            for t in scope.graph.initializer}


def unread_initializers(model: onnx.ModelProto) -> list[str]:
    unread = []
    for scope in scopes(model.graph):
        read = {name for node in scope.graph.node for name in [*node.input, *implicit_inputs(node)]}
        unread += [t.name for t in scope.graph.initializer if t.name not in read]
    return unread


def check_written(original: Path, written: Path) -> onnx.ModelProto:
    model = onnx.load(str(written))
    onnx.checker.check_model(model, full_check=True)
    assert interface(model) == interface(onnx.load(str(original)))
    return model


# ---------------------------------------------------------------------------------------------------
# The walk and the calibration probes


def test_the_references_are_the_models():
    for name, (build, arrays_of, _) in CASES.items():
        model, weights = build()
        evaluation = arrays_of(2)
        for index, feed in feeds(name, evaluation)[:4]:
            for got, want in zip(_run(model, feed), reference(name, weights, evaluation, index)):
                np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4, err_msg=name)


def test_scopes_walk_every_body_depth_first():
    model, _ = loop_model(nested_if=True)
    labels = [scope.label for scope in scopes(model.graph)]
    assert labels == ["main graph", "Loop 'recur' body", "Loop 'recur' body > If 'odd_even' else_branch",
                      "Loop 'recur' body > If 'odd_even' then_branch"]  # attributes in the order stored


def test_normalize_moves_constant_weights_of_branches_into_their_initializers():
    model, weights = if_model()
    normalized = normalize(model).model
    onnx.checker.check_model(normalized, full_check=True)
    branches = {scope.label: {t.name for t in scope.graph.initializer} for scope in scopes(normalized.graph)}
    assert branches["If 'by_rate' then_branch"] == {"c1", "c1b", "c2", "m1"}
    assert branches["If 'by_rate' else_branch"] == {"e1", "e2"}
    assert not any(node.op_type == "Constant" for scope in scopes(normalized.graph) for node in scope.graph.node)


def _probe_once(model: onnx.ModelProto, names: list[str], feed: dict[str, np.ndarray]) -> dict:
    probes = probe_bodies(model, names)
    onnx.checker.check_model(probes.model, full_check=True)
    assert interface(probes.model).inputs == interface(model).inputs
    return probes.decode(dict(zip(probes.outputs, _run_named(probes.model, probes.outputs, feed))))


def _run_named(model: onnx.ModelProto, names: list[str], feed) -> list[np.ndarray]:
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return session.run(names, feed)


def test_probes_measure_the_taken_branch_and_skip_the_other():
    model, weights = if_model()
    x = np.random.default_rng(5).standard_normal((2, 3, 8, 8)).astype(np.float32)
    main, inner = split_by_scope(model, ["x", "t1", "f2", "t6"])
    assert main == ["x"] and inner == ["f2", "t1", "t6"]
    taken = _probe_once(model, inner, {"x": x, "sr": np.array(16000, np.int64)})
    conv = _conv3x3(x, weights["c1"]) + weights["c1b"][None, :, None, None]
    assert set(taken) == {"t1", "t6"}, "the else branch did not run: no range for its tensor"
    np.testing.assert_allclose(taken["t1"], (conv.min(), conv.max()), rtol=1e-5)
    other = _probe_once(model, inner, {"x": x, "sr": np.array(8000, np.int64)})
    hidden = x.reshape(2, -1) @ weights["e1"]
    assert set(other) == {"f2"}
    np.testing.assert_allclose(other["f2"], (hidden.min(), hidden.max()), rtol=1e-5)


def test_probes_cover_every_iteration_and_nested_branches():
    model, weights = loop_model(nested_if=True)
    rng = np.random.default_rng(6)
    x, h0 = rng.standard_normal((4, 32)).astype(np.float32), rng.standard_normal((4, 32)).astype(np.float32)
    seen = _probe_once(model, ["pre", "odd_y", "even_y"], {"x": x, "h0": h0})
    h, pre, odd, even = h0.astype(np.float64), [], [], []
    for i in range(3):
        pre.append(h @ weights["R"] + x @ weights["U"])
        h = np.tanh(pre[-1])
        (odd if i % 2 else even).append(h @ (weights["A"] if i % 2 else weights["B"]))
        h = h + (odd if i % 2 else even)[-1]
    for name, values in (("pre", pre), ("odd_y", odd), ("even_y", even)):
        np.testing.assert_allclose(seen[name], (min(v.min() for v in values), max(v.max() for v in values)),
                                   rtol=1e-4, err_msg=name)


# ---------------------------------------------------------------------------------------------------
# Every command on every body


EXPECTED_PARAMETERS = {  # per graph, integer scalars (trip count, constants) included as inspect counts them
    "if": {"main graph": 1, "If 'by_rate' then_branch": 432 + 16 + 2304 + 128, "If 'by_rate' else_branch": 6144 + 256},
    "loop": {"main graph": 1024 + 256 + 1, "Loop 'recur' body": 1024},
    "loop_if": {"main graph": 1024 + 256 + 1024 + 3, "Loop 'recur' body": 1024,
                "Loop 'recur' body > If 'odd_even' then_branch": 1024,
                "Loop 'recur' body > If 'odd_even' else_branch": 0},
    "scan": {"main graph": 1024, "Scan 'rnn' body": 512},
}


def test_inspect_counts_weights_per_graph(run_cli, case):
    name, path, *_ = case
    result = run_cli("inspect", path, "--json")
    assert result.exit_code == 0, result.stderr
    summary = json.loads(result.stdout)
    assert {g["graph"]: g["parameters"] for g in summary["graphs"]} == EXPECTED_PARAMETERS[name]
    assert summary["parameters"] == sum(EXPECTED_PARAMETERS[name].values())
    text = run_cli("inspect", path)
    assert text.exit_code == 0, text.stderr
    assert "Weights per graph" in text.stdout
    for label, count in EXPECTED_PARAMETERS[name].items():
        assert (label in text.stdout) == (count > 0 or label == "main graph"), label
        if count:
            assert f"{count:,}" in text.stdout


def _close_to_reference(name: str, written: Path, weights, evaluation, minimum_cosine: float) -> None:
    for index, feed in feeds(name, evaluation):
        for got, want in zip(_run(written, feed), reference(name, weights, evaluation, index)):
            assert got.shape == want.shape
            assert cosine(got, want) > minimum_cosine, (name, index)


@pytest.mark.parametrize("mode", ["static", "dynamic", "weight-only"])
def test_quantize_reaches_inner_nodes(run_cli, case, tmp_path, mode):
    name, path, data, layout, evaluation, weights = case
    out = tmp_path / f"{mode}.onnx"
    args = ["quantize", path, "-o", out, "--json", "--no-speed-check"]
    if mode == "static":
        args += ["-d", data, "--data-layout", layout]
    else:
        args += ["--mode", mode] + (["--bits", "8"] if mode == "weight-only" else [])
    result = run_cli(*args)
    assert result.exit_code == 0, result.stderr
    model = check_written(path, out)
    inner = inner_op_types(model)
    expected = {"static": "DequantizeLinear", "dynamic": "DynamicQuantizeMatMul", "weight-only": "MatMulNBits"}[mode]
    assert expected in inner, inner
    if mode != "static":
        assert "MatMul" not in inner, "every inner MatMul with a constant weight is replaced"
    assert not unread_initializers(model), "no float copy of a replaced weight is left behind"
    if mode != "static":  # static adds scales and zero points per tensor: on these tiny weights they weigh
        assert out.stat().st_size < 0.7 * path.stat().st_size
    _close_to_reference(name, out, weights, evaluation, 0.99)


@pytest.mark.parametrize("pattern", ["unstructured", "2:4"])
def test_prune_zeroes_inner_weights(run_cli, case, tmp_path, pattern):
    name, path, data, layout, evaluation, weights = case
    out = tmp_path / "pruned.onnx"
    args = ["prune", path, "-o", out, "--json", "--prune-first", "--prune-last", "--min-params", "1"]
    args += ["-s", "0.5"] if pattern == "unstructured" else ["--pattern", "2:4"]
    result = run_cli(*args, "--calibration-data", data, "--data-layout", layout)
    assert result.exit_code == 0, result.stderr
    summary = json.loads(result.stdout)
    model = check_written(path, out)
    pruned = {layer["node"] for layer in summary["layers"]}
    inner_nodes = {node.name for scope in scopes(model.graph) if not scope.is_main for node in scope.graph.node}
    assert pruned & inner_nodes, "layers inside bodies are pruned"
    stored = inner_weights(model)
    for scope in scopes(model.graph)[1:]:
        for node in scope.graph.node:
            if node.name in pruned:  # its weight: a body-local copy when the dense one was an outer weight
                assert 0.45 <= np.mean(stored[node.input[1]] == 0) <= 0.55, node.name
    if name != "if":  # the If model's weights all live in its branches
        assert any("without refit" in note for note in summary["notes"])
    for index, feed in feeds(name, evaluation)[:2]:
        for got, want in zip(_run(out, feed), reference(name, weights, evaluation, index)):
            assert got.shape == want.shape and np.isfinite(got).all()


def test_channel_pruning_leaves_bodies_dense_and_says_why(run_cli, tmp_path):
    model, _ = if_model()
    path = tmp_path / "if.onnx"
    onnx.save_model(model, str(path))
    result = run_cli("prune", path, "-o", tmp_path / "out.onnx", "--pattern", "channel", "-s", "0.5", "--json")
    assert result.exit_code == 2, result.stderr
    assert "inside an If/Loop/Scan body" in result.stderr and "Traceback" not in result.stderr


def test_sensitivity_lists_inner_nodes(run_cli, case):
    name, path, data, layout, *_ = case
    result = run_cli("sensitivity", path, "-d", data, "--data-layout", layout, "--json")
    assert result.exit_code == 0, result.stderr
    ranked = {row["node"] for row in json.loads(result.stdout)["nodes"]}
    # Candidates are the nodes onnxruntime really runs as int8; a MatMul fused with its Add into a Gemm
    # that has no integer kernel here (loop_input, cell_*) is not one.
    inner = {"if": {"then_conv1", "then_conv2", "then_fc", "else_fc1", "else_fc2"}, "loop": {"loop_recurrent"},
             "loop_if": {"loop_recurrent", "odd_fc", "even_fc"}, "scan": {"cell_input", "cell_recurrent"}}[name]
    assert {row.split("/")[0] for row in ranked} & inner, ranked
    assert inner <= {row.split("/")[0] for row in ranked} or name == "scan", ranked


def test_static_with_the_speed_check_stays_honest(run_cli, tmp_path):
    """The usual rule holds inside branches: int8 is kept only where it measured faster; either way the
    written model runs, keeps its interface, and says what it did."""
    model, weights = loop_model()
    path = tmp_path / "loop.onnx"
    onnx.save_model(model, str(path))
    data = tmp_path / "calibration.npz"
    np.savez(data, **_loop_arrays(1))
    out = tmp_path / "out.onnx"
    result = run_cli("quantize", path, "-d", data, "-o", out, "--json")
    assert result.exit_code == 0, result.stderr
    summary = json.loads(result.stdout)
    check_written(path, out)
    evaluation = _loop_arrays(2)
    _close_to_reference("loop", out, weights, evaluation, 0.99)
    assert summary["speedup"] is None or summary["speedup"] > 0


def test_constant_folding_does_not_copy_a_weight_into_every_branch():
    """onnxruntime folds Unsqueeze(outer weight) in each branch that has one: both branches then held their
    own copy (the real voice-activity model came out 1 MB bigger). One copy is kept, where both can read it."""
    rng = np.random.default_rng(0)
    weight = _array(rng, 64, 64)

    def branch(tag: str) -> onnx.GraphProto:
        return helper.make_graph(
            [helper.make_node("Unsqueeze", ["W", "axis0"], [f"{tag}_w3"], name=f"{tag}_unsqueeze"),
             helper.make_node("MatMul", ["x", f"{tag}_w3"], [f"{tag}_y"], name=f"{tag}_fc")],
            tag, [], [helper.make_tensor_value_info(f"{tag}_y", TensorProto.FLOAT, [1, "batch", 64])])
    model = _model([helper.make_node("If", ["flag"], ["y"], name="choose", then_branch=branch("a"),
                                     else_branch=branch("b"))],
                   [helper.make_tensor_value_info("flag", TensorProto.BOOL, []),
                    helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 64])],
                   [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, "batch", 64])],
                   [numpy_helper.from_array(weight, "W"), numpy_helper.from_array(np.array([0], np.int64), "axis0")])
    from compressq.quantize.prepare import prepare_for_quantization
    prepared, _ = prepare_for_quantization(model)
    onnx.checker.check_model(prepared, full_check=True)
    stored = [t for scope in scopes(prepared.graph) for t in scope.graph.initializer if np.prod(t.dims) == 64 * 64]
    assert len(stored) == 1
    x = rng.standard_normal((3, 64)).astype(np.float32)
    for flag in (True, False):
        feed = {"flag": np.array(flag), "x": x}
        np.testing.assert_allclose(_run(prepared, feed)[0], _run(model, feed)[0], rtol=1e-5, atol=1e-5)


def _if_files(tmp_path: Path, rates: np.ndarray) -> tuple[Path, Path, dict]:
    model, weights = if_model()
    path = tmp_path / "if.onnx"
    onnx.save_model(model, str(path))
    arrays = _if_arrays(1)
    arrays["sr"] = rates
    data = tmp_path / "calibration.npz"
    np.savez(data, **arrays)
    return path, data, weights


def test_both_branches_calibrated_and_quantized_exclusions_reach_bodies(run_cli, tmp_path):
    path, data, weights = _if_files(tmp_path, np.tile(np.array([16000, 8000], np.int64), IF_SAMPLES // 2))
    out = tmp_path / "out.onnx"
    result = run_cli("quantize", path, "-d", data, "--data-layout", "stack", "--no-speed-check", "--exclude",
                     "then_fc", "--method", "percentile", "-o", out, "--json")
    assert result.exit_code == 0, result.stderr
    summary = json.loads(result.stdout)
    assert {"then_conv1", "then_conv2", "else_fc1", "else_fc2"} <= set(summary["quantized_nodes"])
    assert {"node": "then_fc", "op_type": "MatMul", "reason": "excluded by --exclude"} in summary["float_nodes"]
    assert any("inside If/Loop/Scan bodies: min/max ranges" in note for note in summary["notes"])
    _close_to_reference("if", out, weights, _if_arrays(2), 0.99)


def test_a_branch_no_sample_takes_stays_float_and_is_said(run_cli, tmp_path):
    path, data, weights = _if_files(tmp_path, np.full(IF_SAMPLES, 16000, np.int64))
    out = tmp_path / "out.onnx"
    result = run_cli("quantize", path, "-d", data, "--data-layout", "stack", "--no-speed-check", "-o", out, "--json")
    assert result.exit_code == 0, result.stderr
    summary = json.loads(result.stdout)
    assert "then_conv1" in summary["quantized_nodes"]
    assert not {"else_fc1", "else_fc2"} & set(summary["quantized_nodes"])
    assert any("never reached by the data" in note for note in summary["notes"])
    _close_to_reference("if", out, weights, _if_arrays(2), 0.99)


def test_a_saved_plan_replays_the_same_inner_decisions(run_cli, tmp_path):
    path, data, weights = _if_files(tmp_path, np.tile(np.array([16000, 8000], np.int64), IF_SAMPLES // 2))
    first, second, plan = tmp_path / "first.onnx", tmp_path / "second.onnx", tmp_path / "plan.json"
    made = run_cli("quantize", path, "-d", data, "--data-layout", "stack", "--no-speed-check", "-o", first,
                   "--save-plan", plan)
    assert made.exit_code == 0, made.stderr
    record = json.loads(plan.read_text())
    assert "then_conv1" in record["int8_nodes"] and {"t2", "f3"} <= set(record["activation_ranges"])
    replayed = run_cli("quantize", path, "--plan", plan, "-o", second)
    assert replayed.exit_code == 0, replayed.stderr
    assert first.read_bytes() == second.read_bytes()


@pytest.mark.parametrize("option", [["--method", "auto"], ["--method", "entropy"], ["--bias-correction"],
                                    ["--equalize"], ["--smoothquant", "0.5"], ["--activations", "int8"]])
def test_static_options_work_with_bodies(run_cli, tmp_path, option):
    """Statistics the main graph alone collects (range search, bias means, SmoothQuant maxima) leave the
    bodies on min/max ranges; none of them may fail on a model with a nested body."""
    model, weights = loop_model(nested_if=True)
    path, data, out = tmp_path / "loop.onnx", tmp_path / "calibration.npz", tmp_path / "out.onnx"
    onnx.save_model(model, str(path))
    np.savez(data, **_loop_arrays(1))
    result = run_cli("quantize", path, "-d", data, "--no-speed-check", "-o", out, "--json", *option)
    assert result.exit_code == 0, result.stderr
    assert "odd_fc" in json.loads(result.stdout)["quantized_nodes"]
    check_written(path, out)
    # entropy clips the main graph's input range hard on 32 samples (0.974 here): its own accuracy, not the bodies'
    _close_to_reference("loop_if", out, weights, _loop_arrays(2), 0.95 if "entropy" in option else 0.99)


def shared_weight_model() -> tuple[onnx.ModelProto, np.ndarray]:
    """An If on a scalar flag (the first input) whose two branches read the same outer weight."""
    weight = _array(np.random.default_rng(4), 256, 256, scale=0.1)

    def branch(tag: str) -> onnx.GraphProto:
        return helper.make_graph([helper.make_node("MatMul", ["x", "W"], [f"{tag}_h"], name=f"{tag}_fc"),
                                  helper.make_node("Relu", [f"{tag}_h"], [f"{tag}_y"], name=f"{tag}_relu")],
                                 tag, [], [helper.make_tensor_value_info(f"{tag}_y", TensorProto.FLOAT, ["b", 256])])
    model = _model([helper.make_node("If", ["flag"], ["y"], name="choose", then_branch=branch("a"),
                                     else_branch=branch("b"))],
                   [helper.make_tensor_value_info("flag", TensorProto.BOOL, []),
                    helper.make_tensor_value_info("x", TensorProto.FLOAT, ["b", 256])],
                   [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["b", 256])],
                   [numpy_helper.from_array(weight, "W")])
    return model, weight


@pytest.mark.parametrize("mode", ["static", "dynamic", "weight-only"])
def test_branches_sharing_an_outer_weight_share_its_quantized_copy(run_cli, tmp_path, mode):
    """Also: a scalar first input (the If's flag) goes through calibration, the speed check and the summary."""
    model, weight = shared_weight_model()
    path, data, out = tmp_path / "shared.onnx", tmp_path / "calibration.npz", tmp_path / "out.onnx"
    onnx.save_model(model, str(path))
    rng = np.random.default_rng(5)
    np.savez(data, flag=np.array([True, False] * 8), x=rng.standard_normal((16, 4, 256)).astype(np.float32))
    args = ["-d", data, "--data-layout", "stack"] if mode == "static" else ["--mode", mode, "--no-speed-check"]
    result = run_cli("quantize", path, "-o", out, "--json", *args)
    assert result.exit_code == 0, result.stderr
    written = check_written(path, out)
    if json.loads(result.stdout)["quantized_node_count"]:
        big = [t.name for scope in scopes(written.graph) for t in scope.graph.initializer if np.prod(t.dims) >= 1024]
        assert len(big) == (2 if mode == "weight-only" else 1), big  # codes (+ block scales): once, in the main graph
        assert {t.name for t in written.graph.initializer} >= set(big)
    x = rng.standard_normal((3, 256)).astype(np.float32)
    for flag in (True, False):
        (got,) = _run(out, {"flag": np.array(flag), "x": x})
        assert cosine(got, np.maximum(x @ weight, 0)) > 0.99


def test_scalar_first_if_model_through_report_and_an_accuracy_target(run_cli, tmp_path):
    """report (with and without data) and quantize --min-agreement on an If whose first input is its flag;
    the accuracy search measures nodes in bodies one by one (their own errors cannot leave the body)."""
    model, _ = shared_weight_model()
    path, data, out = tmp_path / "shared.onnx", tmp_path / "calibration.npz", tmp_path / "out.onnx"
    onnx.save_model(model, str(path))
    rng = np.random.default_rng(5)
    np.savez(data, flag=np.array([True, False] * 8), x=rng.standard_normal((16, 4, 256)).astype(np.float32))
    assert run_cli("report", path, "--runs", "2", "--warmup", "0", "--json").exit_code == 0
    result = run_cli("quantize", path, "-d", data, "--data-layout", "stack", "--no-speed-check",
                     "--min-agreement", "1.0", "-o", out, "--json")
    assert result.exit_code == 0, result.stderr
    summary = json.loads(result.stdout)
    assert any("inside If/Loop/Scan bodies: nodes measured one by one" in step for step in summary["speed_steps"])
    assert summary["returned_to_float"] and summary["accuracy"]["agreement"] == 1.0
    report = run_cli("report", path, out, "--data", data, "--data-layout", "stack", "--runs", "2", "--warmup", "0",
                     "--json")
    assert report.exit_code == 0, report.stderr
    assert json.loads(report.stdout)["candidates"][0]["outputs"][0]["top1_agreement"] == 1.0


def test_scan_model_through_the_speed_check_and_report_without_data(run_cli, tmp_path):
    """Stack-layout feeds (a Scan's [steps, batch, features] sequence) are timed as stored; report's synthetic
    inputs give a model whose first axis is fixed above 1 complete feeds, one symbolic size everywhere."""
    model, weights = scan_model()
    path, data, out = tmp_path / "scan.onnx", tmp_path / "calibration.npz", tmp_path / "out.onnx"
    onnx.save_model(model, str(path))
    np.savez(data, **_scan_arrays(1))
    result = run_cli("quantize", path, "-d", data, "--data-layout", "stack", "-o", out, "--json")
    assert result.exit_code == 0, result.stderr
    _close_to_reference("scan", out, weights, _scan_arrays(2), 0.99)
    report = run_cli("report", path, "--runs", "2", "--warmup", "0", "--json")
    assert report.exit_code == 0, report.stderr
    assert json.loads(report.stdout)["data"]["synthetic"] is True


def test_report_on_a_model_synthetic_inputs_cannot_run_says_pass_data(run_cli, tmp_path):
    """An audio front end that reflect-pads by more than a guessed frame length: one line, exit 2."""
    model = _model([helper.make_node("Pad", ["x", "pads"], ["y"], mode="reflect", name="frame_pad")],
                   [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, "samples"])],
                   [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, None])],
                   [numpy_helper.from_array(np.array([0, 64, 0, 64], np.int64), "pads")])
    path = tmp_path / "frontend.onnx"
    onnx.save_model(model, str(path))
    result = run_cli("report", path, "--runs", "1", "--warmup", "0")
    assert result.exit_code == 2, result.stderr
    assert "does not run on synthetic inputs" in result.stderr and "--data" in result.stderr
    assert "Traceback" not in result.stderr


def test_auto_ranges_for_body_models_take_one_statistics_pass(monkeypatch, tmp_path):
    """--method auto: the candidates, the bodies' min/max and the main-graph tensors only bodies quantize
    are all read in one collect() pass; the range search then judges the candidates in a second one, on its
    own graph (two passes in all, no min/max pass besides)."""
    from compressq.data import load_dataset
    from compressq.quantize import static
    from compressq.quantize.api import quantize_model
    from compressq.quantize.config import QuantizeConfig
    from compressq.stats import collect as collect_module

    model, _ = loop_model(nested_if=True)
    data = tmp_path / "calibration.npz"
    np.savez(data, **_loop_arrays(1))
    calls = []
    real = collect_module.collect
    monkeypatch.setattr(collect_module, "collect", lambda *a, **k: calls.append(1) or real(*a, **k))
    monkeypatch.setattr(static, "collect_ranges", lambda *a, **k: pytest.fail("a second min/max pass"))
    result = quantize_model(model, load_dataset(data, model), QuantizeConfig(method="auto", speed_check=False))
    assert "odd_fc" in result.summary.quantized_nodes and calls == [1, 1]
