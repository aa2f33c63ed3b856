"""The public Python API: what `import compressq` promises, and that it works end to end."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

import compressq

SAMPLES = Path(__file__).resolve().parents[1] / "sample_models"


def test_every_public_name_resolves_and_is_documented():
    for name in compressq.__all__:
        value = getattr(compressq, name)
        if name != "__version__":
            assert value.__doc__, f"compressq.{name} has no docstring"
    assert "quantize_model" in dir(compressq)


def test_unknown_names_are_attribute_errors():
    with pytest.raises(AttributeError):
        compressq.does_not_exist  # noqa: B018


def test_import_is_light():
    """`import compressq` must not pull onnxruntime in: the command line's first second depends on it."""
    code = "import sys, compressq; print('onnxruntime' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", code], capture_output=True, text=True).stdout.strip() == "False"


def test_the_version_lives_in_one_place():
    text = (Path(__file__).resolve().parents[1] / "pyproject.toml").read_text()
    assert 'dynamic = ["version"]' in text and f'version = "{compressq.__version__}"' not in text


def test_quantize_through_the_api(tmp_path):
    model = compressq.load_model(SAMPLES / "digits_transformer.onnx")
    data = compressq.load_dataset(SAMPLES / "digits_seq_calib.npz", model)
    result = compressq.quantize_model(model, data, compressq.QuantizeConfig(speed_check=False, samples=32))
    assert result.summary.quantized_nodes
    compressq.save_model(result.model, tmp_path / "out.onnx")
    assert compressq.load_model(tmp_path / "out.onnx").graph.node
    summary = compressq.inspect_model(compressq.load_model(tmp_path / "out.onnx"), tmp_path / "out.onnx")
    assert summary.parameters > 0


def test_errors_are_one_kind():
    with pytest.raises(compressq.CompressqError):
        compressq.QuantizeConfig(method="nope")


def test_all_lists_exactly_the_lazy_names():
    assert set(compressq.__all__) == {"__version__", *compressq._PUBLIC}
