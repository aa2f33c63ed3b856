"""Hostile inputs (issue 14, item 5): every case ends in correct work or one `error:` line with exit 2.

A case fails on exit 3 (a bug of ours), a traceback, an input that changed, or a file left behind that
nobody asked for. Commands run in-process (CliRunner) unless a signal or a second process is the point.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from compressq.io import non_finite_weights
from tests.conftest import make_model, tiny
from tests.helpers import assert_refused, error_lines, listing, run_python, write_pnm

REPO_ROOT = Path(__file__).resolve().parents[1]
PRUNE_ALL = ["-s", "0.5", "--prune-first", "--prune-last", "--min-params", "1"]  # the tiny model has one layer
REPORT_QUICK = ["--runs", "1", "--warmup", "0", "--format", "json"]


@pytest.fixture
def work(tmp_path) -> Path:
    """A folder with a model, its calibration data, a model with external data and a stacked .npy."""
    folder = tmp_path / "work"
    folder.mkdir()
    onnx.save_model(tiny(input_shape=("batch", 16), features=16), str(folder / "m.onnx"))
    onnx.save_model(tiny(input_shape=("batch", 16), features=64), str(folder / "ext.onnx"),
                    save_as_external_data=True, location="weights.bin", size_threshold=0)
    rng = np.random.default_rng(0)
    np.savez(folder / "calib.npz", x=rng.standard_normal((8, 16)).astype(np.float32))
    np.save(folder / "src.npy", rng.standard_normal((8, 16)).astype(np.float32))
    return folder


def snapshot(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in folder.iterdir() if p.is_file() and not p.is_symlink()}


def assert_untouched(folder: Path, before: dict[str, bytes]) -> None:
    """Every input byte-identical and nothing new (no staging file, no probe, no partial output)."""
    assert snapshot(folder) == before
    assert not [name for name in listing(folder) if "compressq-" in name]


# ---------------------------------------------------------------------------------------------------
# An output is never a file the command reads


OUTPUT_ONTO_AN_INPUT = {
    "quantize -o calibration data": ["quantize", "m.onnx", "-d", "calib.npz", "-o", "calib.npz"],
    "quantize -o external data": ["quantize", "ext.onnx", "--mode", "dynamic", "-o", "weights.bin"],
    "quantize --save-plan onto calibration data": ["quantize", "m.onnx", "-d", "calib.npz", "--save-plan",
                                                  "calib.npz", "-o", "out.onnx"],
    "quantize -o evaluation data": ["quantize", "m.onnx", "-d", "calib.npz", "--eval-data", "calib.npz",
                                    "--min-agreement", "0.5", "-o", "calib.npz"],
    "prune -o calibration data": ["prune", "m.onnx", *PRUNE_ALL, "--calibration-data", "calib.npz",
                                  "-o", "calib.npz"],
    "prune -o external data": ["prune", "ext.onnx", *PRUNE_ALL, "-o", "weights.bin"],
    "report -o the model": ["report", "m.onnx", *REPORT_QUICK, "-o", "m.onnx"],
    "report -o its data": ["report", "m.onnx", "--data", "calib.npz", *REPORT_QUICK, "-o", "calib.npz"],
    "report -o external data": ["report", "ext.onnx", *REPORT_QUICK, "-o", "weights.bin"],
    "data -o the source .npy": ["data", "m.onnx", "src.npy", "-o", "src.npy"],
    "data -o the model": ["data", "m.onnx", "src.npy", "-o", "m.onnx"],
}


@pytest.mark.parametrize("case", list(OUTPUT_ONTO_AN_INPUT))
def test_an_output_is_never_an_input(run_cli, work, monkeypatch, case):
    monkeypatch.chdir(work)
    before = snapshot(work)
    result = run_cli(*OUTPUT_ONTO_AN_INPUT[case])
    assert_refused(result, "refusing to")
    assert_untouched(work, before)


def test_data_output_inside_its_source_folder_is_refused(run_cli, work, monkeypatch):
    monkeypatch.chdir(work)
    (work / "samples").mkdir()
    for index in range(2):
        np.save(work / "samples" / f"{index}.npy", np.ones(16, np.float32))
    assert_refused(run_cli("data", "m.onnx", "samples", "-o", "samples/calib.npz"), "a folder this command reads")
    assert listing(work / "samples") == {"0.npy", "1.npy"}


def test_external_data_of_another_model_is_not_guarded_by_name_alone(run_cli, work, monkeypatch):
    # A file merely named like external data, belonging to no input, may be written.
    monkeypatch.chdir(work)
    (work / "other.bin").write_bytes(b"not anyone's weights")
    result = run_cli("quantize", "ext.onnx", "--mode", "dynamic", "--no-speed-check", "-o", "other.bin")
    assert result.exit_code == 0, result.stderr
    onnx.checker.check_model(onnx.load(str(work / "other.bin")))


# ---------------------------------------------------------------------------------------------------
# The place to write is checked before the work


def test_unwritable_folder_fails_before_the_work(run_cli, work, monkeypatch):
    import compressq.prune as prune_package
    from compressq import io

    def no_staging(*args, **kwargs):
        raise OSError(30, "Read-only file system")

    def must_not_run(*args, **kwargs):
        raise AssertionError("pruned before the output was checked")

    monkeypatch.setattr(io.tempfile, "mkstemp", no_staging)
    monkeypatch.setattr(prune_package, "prune_model", must_not_run)
    monkeypatch.setattr("compressq.cli.prune.prune_model", must_not_run)
    before = snapshot(work)
    assert_refused(run_cli("prune", work / "m.onnx", *PRUNE_ALL, "-o", work / "out.onnx"), "Read-only file system")
    assert_untouched(work, before)


def writing_command(work: Path, command: str) -> list:
    """The arguments of a quick run of `command` that writes an output (`-o` is added by the caller)."""
    return {"prune": ["prune", work / "m.onnx", *PRUNE_ALL],
            "quantize": ["quantize", work / "m.onnx", "--mode", "dynamic"],
            "report": ["report", work / "m.onnx", *REPORT_QUICK],
            "data": ["data", work / "m.onnx", work / "src.npy"]}[command]


@pytest.mark.parametrize("target", ["/proc/x.onnx", "/sys/x.onnx", "/proc/self/fd/1"])
@pytest.mark.parametrize("command", ["prune", "quantize", "report", "data"])
def test_process_and_kernel_files_are_refused(run_cli, work, command, target):
    args = writing_command(work, command)
    target = target if command != "data" else target.replace(".onnx", ".npz")
    assert_refused(run_cli(*args, "-o", target))


# ---------------------------------------------------------------------------------------------------
# Symlink loops, dangling links and NUL bytes


@pytest.fixture
def loop(work) -> Path:
    (work / "loop_a").symlink_to(work / "loop_b")
    (work / "loop_b").symlink_to(work / "loop_a")
    return work / "loop_a"


@pytest.mark.parametrize("command", ["prune", "quantize", "report", "data"])
def test_symlink_loop_as_output_is_refused(run_cli, work, loop, command):
    args = writing_command(work, command)
    target = loop if command != "data" else loop.with_suffix(".npz")
    if command == "data":
        target.symlink_to(target)
    assert_refused(run_cli(*args, "-o", target), "symlink loop")


@pytest.mark.parametrize("args", [
    ["inspect", "{loop}"],
    ["quantize", "{loop}", "--mode", "dynamic", "-o", "{work}/o.onnx"],
    ["quantize", "{work}/m.onnx", "-d", "{loop}", "-o", "{work}/o.onnx"],
    ["prune", "{work}/m.onnx", *PRUNE_ALL, "--calibration-data", "{loop}", "-o", "{work}/o.onnx"],
    ["report", "{work}/m.onnx", "--data", "{loop}", *REPORT_QUICK],
])
def test_symlink_loop_as_an_input_is_refused(run_cli, work, loop, args):
    before = snapshot(work)
    assert_refused(run_cli(*[a.format(loop=loop, work=work) for a in args]))
    assert_untouched(work, before)


def test_dangling_model_link_says_so(run_cli, work):
    (work / "gone.onnx").symlink_to(work / "nowhere.onnx")
    assert_refused(run_cli("inspect", work / "gone.onnx"), "symlink to nothing")


def test_nul_byte_in_an_output_path_is_refused(work):
    from compressq.errors import ModelError, OutputError
    from compressq.io import check_output_path, load_model

    with pytest.raises(OutputError, match="NUL"):
        check_output_path(work / "out\x00.onnx")
    with pytest.raises(ModelError, match="NUL"):
        load_model(work / "m\x00.onnx")


def nul_and_markup_model(folder: Path) -> Path:
    model = tiny(input_shape=("batch", 16), features=16)
    model.producer_name = "exporter\x00[/] [bold red]x"
    model.doc_string = "[/]"
    model.graph.name = "[link=file:///etc/passwd]g[/link]\x00"
    model.metadata_props.add(key="[/]\x00", value="[/] [red]\x00")
    for node in model.graph.node:
        node.name = f"[/]{node.name}\x00[b]"
    path = folder / "[odd] name\x01.onnx"
    onnx.save_model(model, str(path))
    return path


@pytest.mark.parametrize("command", ["inspect", "quantize", "prune", "report", "sensitivity"])
def test_nul_bytes_and_markup_in_names_and_paths(run_cli, work, command):
    model = nul_and_markup_model(work)
    args = {"inspect": ["inspect", model],
            "quantize": ["quantize", model, "-d", work / "calib.npz", "-o", work / "[bold]out[x].onnx"],
            "prune": ["prune", model, *PRUNE_ALL, "-o", work / "[bold]out[x].onnx"],
            "report": ["report", model, "--runs", "1", "--warmup", "0"],
            "sensitivity": ["sensitivity", model, "-d", work / "calib.npz"]}[command]
    result = run_cli(*args)
    assert result.exit_code == 0, result.stderr
    assert "Traceback" not in result.stderr and "internal error" not in result.stderr
    assert "\x00" not in result.stdout + result.stderr


# ---------------------------------------------------------------------------------------------------
# No command writes a non-finite weight


def model_with_weight(folder: Path, weight: np.ndarray, name: str) -> Path:
    path = folder / name
    onnx.save_model(tiny(input_shape=("batch", 16), features=16, weight=weight), str(path))
    return path


@pytest.mark.parametrize("bad", [np.inf, -np.inf, np.nan])
@pytest.mark.parametrize("args", [
    ["quantize", "-d", "{work}/calib.npz"],
    ["quantize", "--mode", "dynamic"],
    ["quantize", "--mode", "weight-only"],
    ["prune", *PRUNE_ALL],
    ["prune", *PRUNE_ALL, "--calibration-data", "{work}/calib.npz"],
])
def test_non_finite_weights_are_refused_before_the_work(run_cli, work, bad, args):
    weight = np.random.default_rng(1).standard_normal((16, 16)).astype(np.float32)
    weight[3, 4] = bad
    model = model_with_weight(work, weight, "bad.onnx")
    before = snapshot(work)
    command, *rest = [a.format(work=work) for a in args]
    assert_refused(run_cli(command, model, *rest, "-o", work / "out.onnx"), "NaN or infinite", "'W'")
    assert_untouched(work, before)


def test_inspect_and_report_still_read_a_model_with_non_finite_weights(run_cli, work):
    weight = np.ones((16, 16), np.float32)
    weight[0, 0] = np.nan
    model = model_with_weight(work, weight, "bad.onnx")
    assert run_cli("inspect", model).exit_code == 0


def test_extreme_data_never_yields_a_non_finite_weight(run_cli, work):
    # Finite inputs so large that a refit's sums overflow float32: those layers keep their pruned weights.
    np.savez(work / "huge.npz", x=(np.random.default_rng(0).standard_normal((8, 16)) * 1e30).astype(np.float32))
    result = run_cli("prune", work / "m.onnx", *PRUNE_ALL, "--calibration-data", work / "huge.npz",
                     "-o", work / "out.onnx")
    assert result.exit_code == 0, result.stderr
    assert non_finite_weights(onnx.load(str(work / "out.onnx"))) == []


def test_save_model_refuses_a_non_finite_output(work):
    from compressq.errors import ModelError
    from compressq.io import save_model

    model = tiny(input_shape=("batch", 16), features=16)
    model.graph.initializer[0].CopyFrom(numpy_helper.from_array(np.full((16, 16), np.inf, np.float32), "W"))
    with pytest.raises(ModelError, match="nothing was written"):
        save_model(model, work / "out.onnx")
    assert not (work / "out.onnx").exists()


def test_non_finite_weights_found_in_every_float_type_and_in_constants():
    for dtype in (np.float16, np.float32, np.float64):
        model = tiny(input_shape=("batch", 4), features=3)
        assert non_finite_weights(model) == []
        bad = numpy_helper.from_array(np.full((4, 3), np.nan, dtype), "C")
        model.graph.node.append(helper.make_node("Constant", [], ["c"], value=bad, name="const"))
        model.graph.node.append(helper.make_node("MatMul", ["x", "c"], ["xc"], name="reads_c_as_weight"))
        assert len(non_finite_weights(model)) == 1


def test_infinite_constants_that_are_not_weights_are_allowed():
    """-inf as a Max bound (magika) or an attention mask is a value, not a broken weight."""
    model = tiny(input_shape=("batch", 4), features=3)
    bound = numpy_helper.from_array(np.array(-np.inf, np.float32), "lowest")
    model.graph.initializer.append(bound)
    model.graph.node.append(helper.make_node("Max", ["y", "lowest"], ["clamped"], name="max_bound"))
    mask = numpy_helper.from_array(np.array([0.0, -np.inf, -np.inf], np.float32), "mask")
    model.graph.node.append(helper.make_node("Constant", [], ["m"], value=mask, name="mask_const"))
    model.graph.node.append(helper.make_node("Add", ["y", "m"], ["masked"], name="add_mask"))
    assert non_finite_weights(model) == []


# ---------------------------------------------------------------------------------------------------
# Scalar inputs


def scalar_input_model(folder: Path) -> Path:
    weight = numpy_helper.from_array(np.random.default_rng(1).standard_normal((16, 16)).astype(np.float32), "W")
    model = make_model(
        [helper.make_node("MatMul", ["x", "W"], ["h"], name="mm"), helper.make_node("Mul", ["h", "s"], ["y"])],
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 16]),
         helper.make_tensor_value_info("s", TensorProto.FLOAT, [])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", 16])], [weight])
    path = folder / "scalar.onnx"
    onnx.save_model(model, str(path))
    return path


def test_report_and_inspect_on_a_scalar_input_model(run_cli, work):
    model = scalar_input_model(work)
    assert run_cli("inspect", model).exit_code == 0
    result = run_cli("report", model, "--runs", "1", "--warmup", "0")
    assert result.exit_code == 0, result.stderr


def test_data_builds_stacked_feeds_for_a_scalar_input(run_cli, work):
    model = scalar_input_model(work)
    rng = np.random.default_rng(0)
    (work / "feeds").mkdir()
    for index in range(3):
        np.savez(work / "feeds" / f"{index}.npz", x=rng.standard_normal((2, 16)).astype(np.float32),
                 s=np.float32(index + 1))
    assert_refused(run_cli("data", model, work / "feeds", "-o", work / "batch.npz"), "scalar", "--data-layout stack")
    assert not (work / "batch.npz").exists()
    result = run_cli("data", model, work / "feeds", "-o", work / "stack.npz", "--data-layout", "stack", "--json")
    assert result.exit_code == 0, result.stderr
    with np.load(work / "stack.npz") as written:
        assert written["x"].shape == (3, 2, 16) and written["s"].tolist() == [1.0, 2.0, 3.0]
    used = run_cli("quantize", model, "-d", work / "stack.npz", "--data-layout", "stack", "--no-speed-check",
                   "-o", work / "q.onnx")
    assert used.exit_code == 0, used.stderr


def test_data_layout_stack_takes_a_stacked_npy_of_complete_feeds(run_cli, work):
    # A [2, batch, 128]-style state: every feed carries its own batch axis inside.
    model = tiny(input_shape=(2, "batch", 16), features=4)
    path = work / "state.onnx"
    onnx.save_model(model, str(path))
    np.save(work / "states.npy", np.random.default_rng(0).standard_normal((5, 2, 1, 16)).astype(np.float32))
    result = run_cli("data", path, work / "states.npy", "-o", work / "s.npz", "--data-layout", "stack")
    assert result.exit_code == 0, result.stderr
    with np.load(work / "s.npz") as written:
        assert written["x"].shape == (5, 2, 1, 16)
    assert_refused(run_cli("data", path, work / "states.npy", "-o", work / "bad.npz", "--data-layout", "sideways"),
                   "sideways")


def test_data_layout_stack_refuses_images(run_cli, work, tmp_path):

    (work / "imgs").mkdir()
    write_pnm(work / "imgs" / "a.pgm", np.zeros((8, 8), dtype=np.uint8))
    model = tiny(input_shape=("batch", 1, 8, 8), features=4)
    onnx.save_model(model, str(work / "img.onnx"))
    assert_refused(run_cli("data", work / "img.onnx", work / "imgs", "-o", work / "c.npz", "--data-layout", "stack"),
                   "images")


# ---------------------------------------------------------------------------------------------------
# Ctrl-C at any moment, and runs racing for one output: a complete output or none


def cli_process(args: list[str], cwd: Path) -> subprocess.Popen:
    env = {k: v for k, v in os.environ.items() if k not in ("COMPRESSQ_DEBUG", "FORCE_COLOR")}
    env["PYTHONPATH"] = str(REPO_ROOT)
    return subprocess.Popen([sys.executable, "-m", "compressq", *args], cwd=cwd, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)


@pytest.fixture
def cnn_work(tmp_path, cnn_path, calib_npz) -> Path:
    folder = tmp_path / "cnn"
    folder.mkdir()
    (folder / "m.onnx").write_bytes(cnn_path.read_bytes())
    (folder / "calib.npz").write_bytes(calib_npz.read_bytes())
    return folder


# From a fresh interpreter: importing, loading, calibrating and timing, then writing (a few seconds in all).
SIGINT_DELAYS = (0.3, 0.8, 1.5, 2.5, 4.0)


@pytest.mark.parametrize("delay", SIGINT_DELAYS)
def test_ctrl_c_at_any_moment_leaves_a_complete_output_or_none(cnn_work, delay):
    before = snapshot(cnn_work)
    run = cli_process(["quantize", "m.onnx", "-d", "calib.npz", "-o", "out.onnx"], cnn_work)
    time.sleep(delay)
    run.send_signal(signal.SIGINT)
    stdout, stderr = run.communicate(timeout=300)
    assert "Traceback" not in stderr, stderr
    assert run.returncode in (0, 130), (run.returncode, stderr)
    if run.returncode == 130:
        assert error_lines(stderr) and error_lines(stderr)[-1].startswith("interrupted"), (stderr, stdout[-500:])
    written = listing(cnn_work) - set(before)
    assert written <= {"out.onnx"}, written  # no staging folder, no probe, no partial file
    if written or run.returncode == 0:  # interrupted after the rename (printing the summary): complete
        onnx.checker.check_model(onnx.load(str(cnn_work / "out.onnx")))
    assert snapshot(cnn_work).items() >= before.items()  # inputs untouched


@pytest.mark.parametrize("args,output", [
    (["prune", "m.onnx", "-s", "0.5", "-o", "race.onnx"], "race.onnx"),
    (["report", "m.onnx", "--runs", "2", "--format", "json", "-o", "race.json"], "race.json"),
])
def test_racing_runs_leave_one_complete_output(cnn_work, args, output):
    before = listing(cnn_work)
    runs = [cli_process(args, cnn_work) for _ in range(3)]
    for run in runs:
        _, stderr = run.communicate(timeout=300)
        assert run.returncode == 0 and "Traceback" not in stderr, stderr
    assert listing(cnn_work) == {*before, output}
    if output.endswith(".onnx"):
        onnx.checker.check_model(onnx.load(str(cnn_work / output)))


PACKAGE_IMPORT_INTERRUPTED = """
import builtins, os, signal, sys
real_import = builtins.__import__
def interrupting_import(name, *args, **kwargs):
    if name == "importlib":                          # compressq/__init__.py, before compressq.cli exists
        builtins.__import__ = real_import
        os.kill(os.getpid(), signal.SIGINT)
    return real_import(name, *args, **kwargs)
sys.argv = ["compressq", "inspect", "m.onnx"]        # what the console script's process looks like
builtins.__import__ = interrupting_import
from compressq.cli.app import main
main()
"""


def test_ctrl_c_while_the_package_itself_imports_is_quiet(work):

    done = run_python(PACKAGE_IMPORT_INTERRUPTED, cwd=work)
    assert done.returncode == 130, done.stderr
    assert error_lines(done.stderr) == ["interrupted"] and done.stdout == ""


def test_importing_compressq_keeps_the_importers_handlers(work):

    done = run_python("import signal, compressq; print(signal.getsignal(signal.SIGINT) is signal.default_int_handler)",
                      cwd=work)
    assert done.stdout.strip() == "True", done.stderr


def test_main_called_in_process_gives_the_callers_handlers_back(monkeypatch, work):
    from compressq.cli import app as cli

    before = signal.getsignal(signal.SIGINT), signal.getsignal(signal.SIGTERM)
    monkeypatch.setattr(sys, "argv", ["compressq", "inspect", str(work / "m.onnx")])
    with pytest.raises(SystemExit):
        cli.main()
    assert (signal.getsignal(signal.SIGINT), signal.getsignal(signal.SIGTERM)) == before


def test_the_program_ignores_signals_once_its_command_is_over(work):

    done = run_python("""
        import atexit, runpy, signal, sys
        atexit.register(lambda: print(signal.getsignal(signal.SIGINT) == signal.SIG_IGN))
        sys.argv = ["compressq", "inspect", "m.onnx"]
        runpy.run_module("compressq", run_name="__main__", alter_sys=True)
        """, cwd=work)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip().splitlines()[-1] == "True"
