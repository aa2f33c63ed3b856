"""Shared fixtures: the sample models and data, tiny models built with onnx.helper, and a CLI runner."""

from __future__ import annotations

import os
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
