"""The views print what users and models name things exactly as they are: no markup, no terminal control.

Also the layering that keeps rendering in one room: consoles are made in one place, and ruff's banned-api
rules (pyproject.toml, compressq/cli/ruff.toml) hold for the whole package.
"""

from __future__ import annotations

import ast
import shutil
import subprocess
import sys
from pathlib import Path

import onnx
import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "compressq"
MARKUP_NAMES = ["cnn[int8].onnx", "[bold]x[red].onnx", "r[link=a]v[dim].onnx"]


@pytest.mark.parametrize("name", MARKUP_NAMES)
def test_inspect_prints_bracketed_paths_as_they_are(run_cli, tmp_path, tiny_model, name):
    path = tmp_path / name
    onnx.save_model(tiny_model(), str(path))
    result = run_cli("inspect", path)
    assert result.exit_code == 0, result.stderr
    assert name in result.stdout


def test_inspect_a_path_with_a_closing_tag_in_its_folder(run_cli, tmp_path, tiny_model):
    folder = tmp_path / "d["
    folder.mkdir()
    path = folder / "x].onnx"  # the path reads d[/x].onnx: a closing tag if it ever reached markup
    onnx.save_model(tiny_model(), str(path))
    result = run_cli("inspect", path)
    assert result.exit_code == 0, result.stderr
    assert "d[/x].onnx" in result.stdout


def test_producer_and_metadata_markup_is_printed_not_applied(run_cli, tmp_path, tiny_model):
    model = tiny_model()
    model.producer_name = "[bold red]exporter[/]"
    onnx.helper.set_model_props(model, {"compressq.version": "[/]", "compressq.command": "[link=x]q",
                                        "compressq.settings": "[blink]"})
    path = tmp_path / "m.onnx"
    onnx.save_model(model, str(path))
    result = run_cli("inspect", path)
    assert result.exit_code == 0, result.stderr
    assert "[bold red]exporter[/]" in result.stdout


def test_node_names_with_markup_survive_quantize_output(run_cli, tmp_path, tiny_model):
    model = tiny_model()
    for node in model.graph.node:
        node.name = f"[/]{node.name}[bold]"
    path = tmp_path / "m.onnx"
    onnx.save_model(model, str(path))
    result = run_cli("quantize", path, "--mode", "dynamic", "--no-speed-check", "--exclude", "MatMul",
                     "-o", tmp_path / "q[1].onnx")
    assert result.exit_code == 0, result.stderr
    assert "q[1].onnx" in result.stdout
    assert "[/]matmul[bold]" in result.stdout  # listed in the kept-in-float table, as named
    assert (tmp_path / "q[1].onnx").exists()


def test_report_names_the_file_it_wrote(run_cli, tmp_path, tiny_model):
    path = tmp_path / "m.onnx"
    onnx.save_model(tiny_model(), str(path))
    target = tmp_path / "r[v2].html"
    result = run_cli("report", path, "--format", "html", "-o", target)
    assert result.exit_code == 0, result.stderr
    assert target.exists()
    assert "r[v2].html" in result.stderr


def test_error_lines_show_brackets(run_cli, tmp_path):
    missing = tmp_path / "no[such]/[/]m.onnx"
    result = run_cli("inspect", missing)
    assert result.exit_code == 2
    assert "no[such]/[/]m.onnx" in result.stderr


def test_control_characters_in_names_are_escaped(run_cli, tmp_path, tiny_model):
    model = tiny_model()
    model.producer_name = "evil\x1b]0;title\x07"
    path = tmp_path / "m.onnx"
    onnx.save_model(model, str(path))
    result = run_cli("inspect", path)
    assert result.exit_code == 0
    assert "\x1b" not in result.stdout and "\\x1b" in result.stdout


def test_help_shows_defaults(run_cli):
    result = run_cli("quantize", "--help")
    assert result.exit_code == 0
    assert "[default: " in result.stdout


def test_consoles_are_made_in_one_place():
    makers = []
    for path in PACKAGE.rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Call) and getattr(node.func, "id", getattr(node.func, "attr", None)) == "Console":
                makers.append(path.relative_to(PACKAGE).as_posix())
    assert makers == ["cli/views/console.py"]


RUFF = Path(sys.executable).parent / "ruff"
needs_ruff = pytest.mark.skipif(shutil.which("ruff", path=str(RUFF.parent)) is None, reason="ruff not installed")


@needs_ruff
def test_layering_rules_hold():
    """Only runtime.py imports onnxruntime, only cli/ imports typer/click/rich, nothing imports cli/; the
    foundation imports no sibling (quantize/, prune/, evaluate/) and no sibling imports another."""
    done = subprocess.run([str(RUFF), "check", "--select", "TID251", str(PACKAGE)], capture_output=True, text=True)
    assert done.returncode == 0, done.stdout


def test_each_siblings_ruff_config_bans_what_the_package_bans_but_itself():
    """ruff's `extend` replaces a banned-api table: each sibling's copy must stay the package's list less its own
    ban (compressq/cli/ruff.toml lifts the terminal and sibling bans on purpose)."""
    tomllib = pytest.importorskip("tomllib")  # Python 3.11+

    root = tomllib.loads((PACKAGE.parent / "pyproject.toml").read_text())
    package = root["tool"]["ruff"]["lint"]["flake8-tidy-imports"]["banned-api"]
    for sibling in ("quantize", "prune", "evaluate"):
        config = tomllib.loads((PACKAGE / sibling / "ruff.toml").read_text())
        banned = config["lint"]["flake8-tidy-imports"]["banned-api"]
        assert set(banned) == set(package) - {f"compressq.{sibling}"}, sibling


@needs_ruff
@pytest.mark.parametrize(("where", "statement", "banned"), [
    ("stats/probe.py", "from compressq.quantize.api import quantize_model", True),
    ("measure/probe.py", "from compressq.evaluate.report import build_report", True),
    ("probe.py", "import compressq.prune", True),
    ("quantize/probe.py", "from compressq.prune.refit import RefitTarget", True),
    ("prune/probe.py", "from compressq.quantize.qdq import rewrite_qdq", True),
    ("evaluate/probe.py", "from compressq.quantize.api import quantize_model", True),
    ("quantize/probe.py", "from compressq.cli.app import app", True),
    ("quantize/probe.py", "from compressq.stats.collect import collect", False),
    ("evaluate/probe.py", "from compressq.measure.metrics import cosine_similarity", False),
    ("cli/probe.py", "from compressq.quantize.api import quantize_model", False),
])
def test_the_layering_rules_catch_an_import_across_rooms(tmp_path, where, statement, banned):
    """The rules bite: the package's ruff configuration, on a file that makes the import."""
    root = PACKAGE.parent
    (tmp_path / "pyproject.toml").write_text((root / "pyproject.toml").read_text())
    for config in PACKAGE.rglob("ruff.toml"):
        target = tmp_path / "compressq" / config.relative_to(PACKAGE)
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_text(config.read_text())
    probe = tmp_path / "compressq" / where
    probe.parent.mkdir(parents=True, exist_ok=True)
    probe.write_text(f"{statement}\n\nprint({statement.split()[-1]})\n")
    done = subprocess.run([str(RUFF), "check", "--no-cache", "--select", "TID251", str(probe)], cwd=tmp_path,
                          capture_output=True, text=True)
    assert (done.returncode != 0 and "TID251" in done.stdout) == banned, done.stdout


def test_no_blank_lines_on_stderr_when_it_is_not_a_terminal(run_cli, tmp_path, tiny_model):
    """Progress bars draw on terminals only: a pipe or a CI log gets the messages and nothing else."""
    path = tmp_path / "m.onnx"
    onnx.save_model(tiny_model(), str(path))
    result = run_cli("quantize", path, "--mode", "dynamic", "-o", tmp_path / "q.onnx")
    assert result.exit_code == 0, result.stderr
    assert "" not in result.stderr.splitlines()
    assert not result.stderr.startswith("\n")


def test_data_names_the_layout_in_its_use_it_line(run_cli, tmp_path, tiny_model):
    """The command `data` suggests must read the file the way it was written."""
    import numpy as np

    path = tmp_path / "state.onnx"
    onnx.save_model(tiny_model(input_shape=(2, "batch", 16), features=4), str(path))
    np.save(tmp_path / "states.npy", np.zeros((3, 2, 1, 16), np.float32))
    stacked = run_cli("data", path, tmp_path / "states.npy", "-o", tmp_path / "s.npz", "--data-layout", "stack")
    assert stacked.exit_code == 0, stacked.stderr
    assert "--calibration-data" in stacked.stdout and "--data-layout stack" in stacked.stdout
