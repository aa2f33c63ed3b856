"""Bad input through the CLI: exit code 2, one `error:` line on stderr, never a traceback (unless --debug)."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import onnx
import pytest
from onnx import TensorProto, helper

from compressq import __version__
from compressq.cli import app as cli

REPO_ROOT = Path(__file__).resolve().parents[1]


def external(model: onnx.ModelProto, folder: Path, location: str | None = None) -> Path:
    """Save `model` with its weights in folder/w.data, then point the model at `location` instead."""
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "m.onnx"
    onnx.save_model(model, str(path), save_as_external_data=True, all_tensors_to_one_file=True,
                    location="w.data", size_threshold=0)
    if location is not None:
        proto = onnx.load(str(path), load_external_data=False)
        for tensor in proto.graph.initializer:
            for entry in tensor.external_data:
                if entry.key == "location":
                    entry.value = location
        onnx.save_model(proto, str(path))
    return path


def make_bad_input(kind: str, tmp_path: Path, cnn_path: Path, tiny_model) -> Path:
    if kind == "missing":
        return tmp_path / "absent.onnx"
    if kind == "directory":
        onnx.save_model(tiny_model(), str(tmp_path / "inside.onnx"))
        return tmp_path
    path = tmp_path / f"{kind}.onnx"
    if kind == "empty":
        path.write_bytes(b"")
    elif kind == "text":
        path.write_text("not a model at all\n" * 10)
    elif kind == "truncated":
        data = cnn_path.read_bytes()
        path.write_bytes(data[: len(data) // 2])
    elif kind == "checker":
        graph = helper.make_graph([helper.make_node("Relu", ["undefined"], ["y"])], "g",
                                  [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1])],
                                  [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1])])
        model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
        model.ir_version = 8
        onnx.save_model(model, str(path))
    elif kind == "external_escape":
        path = external(tiny_model(), tmp_path / "model", "../outside.data")
        shutil.move(tmp_path / "model" / "w.data", tmp_path / "outside.data")
    elif kind == "external_absolute":
        path = external(tiny_model(), tmp_path / "model", str(tmp_path / "outside.data"))
        shutil.move(tmp_path / "model" / "w.data", tmp_path / "outside.data")
    elif kind == "external_missing":
        path = external(tiny_model(), tmp_path)
        (tmp_path / "w.data").unlink()
    else:
        raise AssertionError(kind)
    return path


BAD_INPUTS = ["missing", "directory", "empty", "text", "truncated", "checker", "external_escape",
              "external_absolute", "external_missing"]
EXPECTED_WORDS = {
    "missing": "not found", "directory": "directory", "empty": "empty", "text": "not a readable ONNX model",
    "truncated": "not a readable ONNX model", "checker": "checker", "external_escape": "outside",
    "external_absolute": "absolute", "external_missing": "external data",
}


@pytest.mark.parametrize("kind", BAD_INPUTS)
@pytest.mark.parametrize("as_json", [False, True])
def test_bad_model_is_one_error_line(run_cli, tmp_path, cnn_path, tiny_model, kind, as_json):
    path = make_bad_input(kind, tmp_path, cnn_path, tiny_model)
    result = run_cli("inspect", path, *(["--json"] if as_json else []))
    assert result.exit_code == 2
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("error:")
    assert EXPECTED_WORDS[kind] in lines[0]
    assert "hint:" in lines[0]
    assert result.stdout == ""
    assert "Traceback" not in result.stderr + result.stdout


def test_internal_error_is_one_line_with_exit_3(run_cli, cnn_path, monkeypatch):
    import compressq.cli.inspect as inspect_command

    def broken(*args, **kwargs):
        raise KeyError("boom")

    monkeypatch.setattr(inspect_command, "summarize", broken)
    result = run_cli("inspect", cnn_path)
    assert result.exit_code == 3
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("internal error:") and "--debug" in lines[0]
    assert "Traceback" not in result.stderr


# ---------------------------------------------------------------------------------------------------
# --debug and --version


def run_module(*args: str | Path) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k not in ("COMPRESSQ_DEBUG", "FORCE_COLOR")}
    return subprocess.run([sys.executable, "-m", "compressq", *map(str, args)], capture_output=True, text=True,
                          cwd=REPO_ROOT, env=env, timeout=120)


@pytest.fixture
def debug_reset():
    saved = cli._debug["on"]
    cli._debug["on"] = False
    yield
    cli._debug["on"] = saved


def test_debug_after_command_in_process(tmp_path, monkeypatch, debug_reset, capsys):
    # --debug adds the traceback and keeps the exit code: 2 for bad input, as without it.
    monkeypatch.setattr(sys, "argv", ["compressq", "inspect", str(tmp_path / "absent.onnx"), "--debug"])
    with pytest.raises(SystemExit) as exited:
        cli.main()
    assert exited.value.code == 2
    stderr = capsys.readouterr().err
    assert "Traceback" in stderr and "ModelError" in stderr
    assert stderr.strip().splitlines()[-1].startswith("error: model file not found")


def test_debug_before_command_in_process(tmp_path, debug_reset):
    from typer.testing import CliRunner

    result = CliRunner().invoke(cli.app, ["--debug", "inspect", str(tmp_path / "absent.onnx")])
    assert result.exit_code == 2
    assert "Traceback" in result.stderr and "ModelError" in result.stderr


@pytest.mark.parametrize("debug", [False, True])
def test_debug_keeps_internal_error_code(run_cli, cnn_path, monkeypatch, debug):
    import compressq.cli.inspect as inspect_command

    def broken(*args, **kwargs):
        raise KeyError("boom")

    monkeypatch.setattr(inspect_command, "summarize", broken)
    result = run_cli(*(["--debug"] if debug else []), "inspect", cnn_path)
    assert result.exit_code == 3
    assert ("Traceback" in result.stderr) == debug


@pytest.mark.parametrize("debug_first", [True, False])
def test_debug_shows_traceback(tmp_path, debug_first):
    target = tmp_path / "absent.onnx"
    args = ["--debug", "inspect", target] if debug_first else ["inspect", target, "--debug"]
    result = run_module(*args)
    assert result.returncode == 2
    assert "Traceback" in result.stderr
    assert "ModelError" in result.stderr and "not found" in result.stderr


def test_without_debug_subprocess_is_clean(tmp_path):
    result = run_module("inspect", tmp_path / "absent.onnx")
    assert result.returncode == 2
    assert "Traceback" not in result.stderr
    assert [line for line in result.stderr.splitlines() if line.strip()][0].startswith("error:")


def test_version():
    result = run_module("--version")
    assert result.returncode == 0
    assert result.stdout.strip() == f"compressq {__version__}"
