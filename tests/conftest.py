"""Shared fixtures: the sample models and data, tiny models built with onnx.helper, and a CLI runner."""

from __future__ import annotations

import os
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import NamedTuple

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper
from typer.testing import CliRunner

from compressq.cli import app as cli
from compressq.graph import passes

# Every pass proves its postcondition (checker clean, interface unchanged) in the tests, in-process and in the
# CLI subprocesses they start.
os.environ["COMPRESSQ_CHECK_PASSES"] = "1"
passes.enable_checks()

REPO_ROOT = Path(__file__).resolve().parents[1]
SAMPLES = REPO_ROOT / "sample_models"
SAMPLE_MODELS = ("digits_cnn", "digits_mobilenet", "digits_transformer")
OPSET = 17
IR_VERSION = 8

Shape = Sequence[int | str | None]


# ---------------------------------------------------------------------------------------------------
# Sample files


@pytest.fixture(scope="session")
def samples_dir() -> Path:
    return SAMPLES


@pytest.fixture(scope="session")
def cnn_path() -> Path:
    return SAMPLES / "digits_cnn.onnx"


@pytest.fixture(scope="session")
def mobilenet_path() -> Path:
    return SAMPLES / "digits_mobilenet.onnx"


@pytest.fixture(scope="session")
def transformer_path() -> Path:
    return SAMPLES / "digits_transformer.onnx"


@pytest.fixture(scope="session")
def calib_npz() -> Path:
    return SAMPLES / "digits_calib.npz"


@pytest.fixture(scope="session")
def eval_npz() -> Path:
    return SAMPLES / "digits_eval.npz"


@pytest.fixture(scope="session")
def seq_calib_npz() -> Path:
    return SAMPLES / "digits_seq_calib.npz"


@pytest.fixture(scope="session")
def seq_eval_npz() -> Path:
    return SAMPLES / "digits_seq_eval.npz"


# ---------------------------------------------------------------------------------------------------
# Tiny models


def make_model(nodes: Sequence[onnx.NodeProto], inputs: Sequence[onnx.ValueInfoProto],
               outputs: Sequence[onnx.ValueInfoProto], initializers: Sequence[onnx.TensorProto] = (),
               opset: int = OPSET, name: str = "tiny") -> onnx.ModelProto:
    """A model from parts, at the opset and IR version the sample models use."""
    graph = helper.make_graph(list(nodes), name, list(inputs), list(outputs), list(initializers))
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)], producer_name="tests")
    model.ir_version = IR_VERSION
    return model


@pytest.fixture
def build_model() -> Callable[..., onnx.ModelProto]:
    """`build_model(nodes, inputs, outputs, initializers=())` -> ModelProto."""
    return make_model


def tiny(input_shape: Shape = ("batch", 4), features: int = 3, input_dtype: int = TensorProto.FLOAT,
         weight: np.ndarray | None = None, extra_inputs: dict[str, tuple[Shape, int]] | None = None,
         seed: int = 0) -> onnx.ModelProto:
    """`y = Relu(x @ W + B)` on input `x`; every extra input `name` is passed through to `name_out`.

    `input_shape` is the shape of `x` (its last dim must match W's first); `weight` overrides W.
    """
    rng = np.random.default_rng(seed)
    in_features = input_shape[-1] if isinstance(input_shape[-1], int) else 4
    w = weight if weight is not None else rng.standard_normal((in_features, features)).astype(np.float32)
    b = rng.standard_normal(w.shape[1]).astype(np.float32)
    out_shape = [*input_shape[:-1], w.shape[1]]
    x = "x"
    nodes = []
    if input_dtype != TensorProto.FLOAT:
        nodes.append(helper.make_node("Cast", ["x"], ["x_float"], to=TensorProto.FLOAT, name="cast"))
        x = "x_float"
    nodes += [
        helper.make_node("MatMul", [x, "W"], ["xw"], name="matmul"),
        helper.make_node("Add", ["xw", "B"], ["xwb"], name="add"),
        helper.make_node("Relu", ["xwb"], ["y"], name="relu"),
    ]
    inputs = [helper.make_tensor_value_info("x", input_dtype, list(input_shape))]
    outputs = [helper.make_tensor_value_info("y", TensorProto.FLOAT, out_shape)]
    for name, (shape, elem_type) in (extra_inputs or {}).items():
        inputs.append(helper.make_tensor_value_info(name, elem_type, list(shape)))
        outputs.append(helper.make_tensor_value_info(f"{name}_out", elem_type, list(shape)))
        nodes.append(helper.make_node("Identity", [name], [f"{name}_out"], name=f"pass_{name}"))
    initializers = [numpy_helper.from_array(w, "W"), numpy_helper.from_array(b, "B")]
    model = make_model(nodes, inputs, outputs, initializers)
    onnx.checker.check_model(model)
    return model


@pytest.fixture
def tiny_model() -> Callable[..., onnx.ModelProto]:
    """Factory for a checker-clean `y = Relu(x @ W + B)` model; see `tiny` for the options."""
    return tiny


@pytest.fixture
def tiny_model_path(tmp_path: Path) -> Path:
    path = tmp_path / "tiny.onnx"
    onnx.save_model(tiny(), str(path))
    return path


# ---------------------------------------------------------------------------------------------------
# CLI


class CliResult(NamedTuple):
    exit_code: int
    stdout: str
    stderr: str
    exception: BaseException | None


@pytest.fixture
def run_cli() -> Callable[..., CliResult]:
    """Run `compressq ARGS...` in-process; stdout and stderr come back separately.

    typer >= 0.2x's CliRunner always captures the two streams apart (`result.stderr`; no `mix_stderr`).
    The --debug switch is module state in compressq.cli.app; it is reset around every call.
    """
    runner = CliRunner()

    def invoke(*args: str | Path) -> CliResult:
        saved = cli._debug["on"]
        cli._debug["on"] = False
        try:
            result = runner.invoke(cli.app, [str(a) for a in args])
        finally:
            cli._debug["on"] = saved
        return CliResult(result.exit_code, result.stdout, result.stderr, result.exception)

    return invoke


# ---------------------------------------------------------------------------------------------------
# A model with one fragile layer (accuracy fallback, recovery search, sensitivity)


class Fragile(NamedTuple):
    model: onnx.ModelProto
    data: object            # compressq.data.Dataset over data_path
    model_path: Path
    data_path: Path


def fragile_mlp(first_activation: str = "Tanh") -> onnx.ModelProto:
    """fc1 -> act1 -> fc2 -> Tanh -> fc3; fc2's weight has one huge entry, so per-tensor int8 rounds all its
    other weights to zero: the one node a fallback or recovery search must find."""
    rng = np.random.default_rng(0)
    w1 = rng.normal(size=(16, 32)).astype(np.float32) * 0.3
    w2 = rng.normal(size=(32, 32)).astype(np.float32) * 0.3
    w2[0, 0] = 500.0
    w3 = rng.normal(size=(32, 10)).astype(np.float32) * 0.3
    nodes = [
        helper.make_node("MatMul", ["x", "w1"], ["h1"], name="fc1"),
        helper.make_node(first_activation, ["h1"], ["a1"], name="act1"),
        helper.make_node("MatMul", ["a1", "w2"], ["h2"], name="fc2"),
        helper.make_node("Tanh", ["h2"], ["a2"], name="act2"),
        helper.make_node("MatMul", ["a2", "w3"], ["logits"], name="fc3"),
    ]
    graph = helper.make_graph(
        nodes, "fragile", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 16])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch", 10])],
        [numpy_helper.from_array(w, n) for w, n in ((w1, "w1"), (w2, "w2"), (w3, "w3"))])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)


def write_fragile(folder: Path, samples: int = 256, first_activation: str = "Tanh") -> Fragile:
    from compressq.data import load_dataset

    model = fragile_mlp(first_activation)
    data_path, model_path = folder / "data.npz", folder / "fragile.onnx"
    np.savez(data_path, x=np.random.default_rng(1).normal(size=(samples, 16)).astype(np.float32))
    onnx.save(model, str(model_path))
    return Fragile(model, load_dataset(data_path, model), model_path, data_path)


@pytest.fixture
def fragile(tmp_path) -> Fragile:
    return write_fragile(tmp_path)


SIZE_LIMITS = ("EXTERNAL_DATA_THRESHOLD", "IN_MEMORY_CHECK_LIMIT")
BIG_THRESHOLD = 64 * 1024  # the tiny decoder holds ~100 KB of weights


@pytest.fixture
def size_limits(monkeypatch) -> Callable[..., None]:
    """Lower compressq's size limits wherever they were imported by name: a small model then counts as big."""
    def lower(threshold: int, names: Sequence[str] = SIZE_LIMITS) -> None:
        for module_name, module in list(sys.modules.items()):
            if module_name.startswith("compressq"):
                for limit in names:
                    if hasattr(module, limit):
                        monkeypatch.setattr(module, limit, threshold)
    return lower


@pytest.fixture
def big_threshold(size_limits) -> None:
    """Every size limit lowered to BIG_THRESHOLD."""
    size_limits(BIG_THRESHOLD)
