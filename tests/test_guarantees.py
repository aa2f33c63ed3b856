"""The bad-input corpus behind README's "Guarantees" (issue 15): nothing lost, nothing misleading.

Every case holds compressq to the same rule: no exit 3 (a bug of ours), no traceback, no file left behind
that the user did not ask for, and one `error:` line with exit 2 for what it refuses.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import stat
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest

from compressq.cli.views.console import printable
from tests.conftest import tiny
from tests.helpers import REPO_ROOT, assert_refused, error_lines, listing, run_python

ESC_CLEAR = "\x1b[2J"
ESC_TITLE = "\x1b]0;owned\x07"


@pytest.fixture
def model_dir(tmp_path) -> Path:
    folder = tmp_path / "work"
    folder.mkdir()
    onnx.save_model(tiny(input_shape=("batch", 16), features=16), str(folder / "m.onnx"))
    np.savez(folder / "calib.npz", x=np.random.default_rng(0).standard_normal((8, 16)).astype(np.float32))
    return folder


# ---------------------------------------------------------------------------------------------------
# Outputs: never replace what is not a regular file; symlinks are written through


PRUNE_ALL = ["-s", "0.5", "--prune-first", "--prune-last", "--min-params", "1"]  # the tiny model has one layer
WRITERS = {
    "prune": lambda m, o: ["prune", m, *PRUNE_ALL, "-o", o],
    "quantize": lambda m, o: ["quantize", m, "--mode", "dynamic", "-o", o],
    "report": lambda m, o: ["report", m, "--format", "json", "--runs", "1", "--warmup", "0", "-o", o],
}


@pytest.mark.parametrize("writer", list(WRITERS))
def test_fifo_target_is_refused(run_cli, model_dir, writer):
    fifo = model_dir / "out.pipe"
    os.mkfifo(fifo)
    before = listing(model_dir)
    result = run_cli(*WRITERS[writer](model_dir / "m.onnx", fifo))
    assert_refused(result, "not a regular file", "pipe")
    assert stat.S_ISFIFO(os.lstat(fifo).st_mode)
    assert listing(model_dir) == before


@pytest.mark.parametrize("writer", list(WRITERS))
def test_directory_target_is_refused(run_cli, model_dir, writer):
    (model_dir / "out").mkdir()
    before = listing(model_dir)
    assert_refused(run_cli(*WRITERS[writer](model_dir / "m.onnx", model_dir / "out")), "directory")
    assert listing(model_dir) == before


@pytest.mark.parametrize("writer", list(WRITERS))
def test_symlink_target_is_written_where_it_points(run_cli, model_dir, writer, tmp_path):
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    real = elsewhere / "real.out"
    real.write_bytes(b"old")
    link = model_dir / "link.out"
    link.symlink_to(real)
    result = run_cli(*WRITERS[writer](model_dir / "m.onnx", link))
    assert result.exit_code == 0, result.stderr
    assert link.is_symlink() and os.readlink(link) == str(real)
    assert real.read_bytes() != b"old"
    if writer == "report":
        assert json.loads(real.read_text())
    else:
        onnx.checker.check_model(onnx.load(str(real)))
    assert listing(elsewhere) == {"real.out"} and listing(model_dir) == {"m.onnx", "calib.npz", "link.out"}


def test_symlink_to_a_pipe_is_refused(run_cli, model_dir):
    fifo = model_dir / "out.pipe"
    os.mkfifo(fifo)
    (model_dir / "link.onnx").symlink_to(fifo)
    assert_refused(run_cli("prune", model_dir / "m.onnx", *PRUNE_ALL, "-o", model_dir / "link.onnx"), "pipe")
    assert (model_dir / "link.onnx").is_symlink() and stat.S_ISFIFO(os.lstat(fifo).st_mode)


def test_report_dash_is_stdout(run_cli, model_dir):
    result = run_cli("report", model_dir / "m.onnx", "--format", "json", "--runs", "1", "--warmup", "0", "-o", "-")
    assert result.exit_code == 0, result.stderr
    assert json.loads(result.stdout)
    assert not (model_dir / "-").exists() and not Path("-").exists()


DEVICE_SCRIPT = r"""
set -u
mount -t tmpfs none /dev
mknod -m 666 /dev/null c 1 3; mknod -m 666 /dev/full c 1 7; mknod -m 666 /dev/zero c 1 5
mknod -m 666 /dev/urandom c 1 9; ln -s /proc/self/fd/1 /dev/stdout
for target in /dev/null /dev/full /dev/stdout; do
  ( "$PYTHON" -m compressq prune "$MODEL" -s 0.5 --prune-first --prune-last --min-params 1 -o "$target" \
      2> "$OUT/$(basename $target).stderr"; echo "$target rc=$?" >> "$OUT/results" ) \
      | cat > "$OUT/$(basename $target).stdout"
done
"$PYTHON" -m compressq report "$MODEL" --format json --runs 1 --warmup 0 -o /dev/null > /dev/zero \
    2> "$OUT/report.stderr"
echo "report rc=$?" >> "$OUT/results"
for node in null full zero; do test -c /dev/$node && echo "/dev/$node char" >> "$OUT/results"; done
test -L /dev/stdout && echo "/dev/stdout link" >> "$OUT/results"
ls -a /dev > "$OUT/dev_listing"
"""


@pytest.mark.skipif(os.geteuid() != 0 or shutil.which("unshare") is None,
                    reason="device nodes are only replaceable as root; run inside a private mount namespace")
def test_device_targets_are_refused_in_a_private_dev(model_dir, tmp_path):
    probe = subprocess.run(["unshare", "-m", "true"], capture_output=True)
    if probe.returncode != 0:
        pytest.skip("unshare -m is not permitted here")
    out = tmp_path / "results"
    out.mkdir()
    env = {**os.environ, "PYTHON": sys.executable, "MODEL": str(model_dir / "m.onnx"), "OUT": str(out),
           "PYTHONPATH": str(REPO_ROOT)}
    env.pop("COMPRESSQ_DEBUG", None)
    done = subprocess.run(["unshare", "-m", "sh", "-c", DEVICE_SCRIPT], cwd=REPO_ROOT, env=env,
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    results = (out / "results").read_text().splitlines()
    for target in ("/dev/null", "/dev/full", "/dev/stdout"):
        assert f"{target} rc=2" in results, results
        stderr = (out / f"{Path(target).name}.stderr").read_text()
        lines = error_lines(stderr)
        assert len(lines) == 1 and "not a regular file" in lines[0], stderr
    assert "report rc=2" in results
    assert {"/dev/null char", "/dev/full char", "/dev/zero char", "/dev/stdout link"} <= set(results)
    staged = [name for name in (out / "dev_listing").read_text().split() if name.startswith(".")]
    assert set(staged) <= {".", ".."}, staged


# ---------------------------------------------------------------------------------------------------
# Interruption: SIGTERM cleans up like Ctrl-C; stale staging is removed; Ctrl-C while importing is quiet


INTERRUPTED_SAVE = """
import os, signal, sys, time
import onnx
from compressq.cli import app as cli
signum = getattr(signal, sys.argv[1])
real_save = onnx.save_model
def save_then_signal(model, path, *args, **kwargs):
    real_save(model, path, *args, **kwargs)          # a staged file exists now
    os.kill(os.getpid(), signum)
    time.sleep(30)                                   # the handler interrupts this
onnx.save_model = save_then_signal
sys.argv = ["compressq", "prune", sys.argv[2], "-s", "0.5", "--prune-first", "--prune-last", "--min-params", "1",
            "-o", sys.argv[3]]
cli.main()
"""


@pytest.mark.parametrize("signal_name,code,word", [("SIGTERM", 143, "terminated"), ("SIGINT", 130, "interrupted")])
def test_signal_during_save_removes_staging(model_dir, signal_name, code, word):
    before = listing(model_dir)
    done = run_python(INTERRUPTED_SAVE, signal_name, str(model_dir / "m.onnx"), str(model_dir / "out.onnx"),
                      cwd=model_dir)
    assert done.returncode == code, done.stderr
    lines = [line for line in error_lines(done.stderr) if not line.startswith("warning:")]  # prune's own
    assert len(lines) == 1 and lines[0].startswith(word), done.stderr
    assert "Traceback" not in done.stderr
    assert listing(model_dir) == before  # no staging folder, no partial output


def dead_pid() -> int:
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()
    return child.pid


def test_stale_staging_of_the_output_is_removed(run_cli, model_dir):
    stale = model_dir / f".out.onnx.compressq-{dead_pid()}-abcd1234"
    stale.mkdir()
    (stale / "out.onnx").write_bytes(b"partial model")
    live = model_dir / f".out.onnx.compressq-{os.getpid()}-efgh5678"  # a run still in progress: kept
    live.mkdir()
    other = model_dir / f".other.onnx.compressq-{dead_pid()}-ijkl9012"  # another output's: not ours to judge
    other.mkdir()
    result = run_cli("prune", model_dir / "m.onnx", *PRUNE_ALL, "-o", model_dir / "out.onnx")
    assert result.exit_code == 0, result.stderr
    assert not stale.exists() and live.exists() and other.exists()


QUIET_IMPORT = """
import builtins, os, signal, sys
signum = getattr(signal, sys.argv[1])
real_import = builtins.__import__
def interrupting_import(name, *args, **kwargs):
    if name == "typer":                              # compressq.cli is importing its heavy dependencies
        builtins.__import__ = real_import
        os.kill(os.getpid(), signum)
    return real_import(name, *args, **kwargs)
builtins.__import__ = interrupting_import
sys.argv = ["compressq", "inspect", "m.onnx"]
from compressq.cli.app import main
main()
"""


@pytest.mark.parametrize("signal_name,code", [("SIGINT", 130), ("SIGTERM", 143)])
def test_interrupt_during_imports_prints_no_traceback(model_dir, signal_name, code):
    done = run_python(QUIET_IMPORT, signal_name, cwd=model_dir)
    assert done.returncode == code, done.stderr
    assert "Traceback" not in done.stderr and error_lines(done.stderr) == ["interrupted"]
    assert done.stdout == ""


# ---------------------------------------------------------------------------------------------------
# Terminal escapes in model and user strings are shown, never sent raw


def hostile_model(folder: Path) -> Path:
    model = tiny(input_shape=("batch", 16), features=16)
    renames = {"W": "W" + ESC_CLEAR, "B": "B" + ESC_TITLE}
    for tensor in model.graph.initializer:
        tensor.name = renames[tensor.name]
    for node in model.graph.node:
        node.input[:] = [renames.get(name, name) for name in node.input]
        node.name = node.name + ESC_TITLE
    onnx.checker.check_model(model)
    path = folder / "hostile.onnx"
    onnx.save_model(model, str(path))
    return path


def assert_no_raw_escapes(result) -> None:
    for stream in (result.stdout, result.stderr):
        assert "\x1b" not in stream and "\x07" not in stream, repr(stream[:500])


def test_inspect_shows_escapes_visibly(run_cli, model_dir):
    result = run_cli("inspect", hostile_model(model_dir))
    assert result.exit_code == 0, result.stderr
    assert_no_raw_escapes(result)
    assert printable("W" + ESC_CLEAR) in result.stdout  # the name is there, made visible


def test_quantize_and_sensitivity_show_escapes_visibly(run_cli, model_dir):
    model = hostile_model(model_dir)
    out = model_dir / f"out{ESC_CLEAR}.onnx"
    quantized = run_cli("quantize", model, "-d", model_dir / "calib.npz", "-o", out)
    assert quantized.exit_code in (0, 1), quantized.stderr
    assert_no_raw_escapes(quantized)
    assert printable(out.name) in quantized.stdout
    ranked = run_cli("sensitivity", model, "-d", model_dir / "calib.npz")
    assert ranked.exit_code == 0, ranked.stderr
    assert_no_raw_escapes(ranked)
    assert r"matmul\x1b]0;owned\x07" in re.sub(r"\s*\n\s*", "", ranked.stdout)


def test_error_line_shows_escapes_visibly(run_cli, model_dir):
    result = run_cli("inspect", model_dir / f"missing{ESC_TITLE}.onnx")
    assert_refused(result, r"missing\x1b]0;owned\x07.onnx")
    assert_no_raw_escapes(result)


def test_brackets_in_names_are_not_markup(run_cli, model_dir, cnn_path):
    path = model_dir / "cnn[int8].onnx"
    shutil.copy(cnn_path, path)
    result = run_cli("inspect", path)
    assert result.exit_code == 0, result.stderr
    assert "cnn[int8].onnx" in result.stdout
    assert_refused(run_cli("inspect", model_dir / "gone[bold].onnx"), "gone[bold].onnx")


# ---------------------------------------------------------------------------------------------------
# Usage errors: one line, exit 2, also under --debug; help shows its defaults


@pytest.mark.parametrize("args,words", [
    (["inspect"], "Missing argument"),
    (["inspect", "m.onnx", "--bogus"], "No such option"),
    (["report", "m.onnx", "--runs", "many"], "--runs"),
    (["no-such-command"], "No such command"),
    (["quantize", "m.onnx", "--mode", "bogus"], "bogus"),
])
@pytest.mark.parametrize("debug", [False, True])
def test_usage_errors_are_one_line(model_dir, args, words, debug):
    done = run_python("from compressq.cli.app import main; main()", *(["--debug"] if debug else []), *args,
                      cwd=model_dir)
    assert done.returncode == 2, done.stderr
    lines = [line for line in error_lines(done.stderr) if not debug or line.startswith("error:")]
    assert len(lines) == 1 and lines[0].startswith("error:") and "hint:" in lines[0], done.stderr
    assert words in lines[0]
    if args[0] != "quantize":  # option-parser errors point at the command's help
        assert "'compressq" in lines[0]
    if not debug:
        assert "Traceback" not in done.stderr and len(error_lines(done.stderr)) == 1


def test_quantize_help_shows_defaults(run_cli):
    result = run_cli("quantize", "--help")
    assert result.exit_code == 0
    assert "[default: NAME.int8.onnx next to MODEL]" in " ".join(result.stdout.split())


def test_output_of_a_bad_model_leaves_nothing(run_cli, model_dir):
    bad = model_dir / "bad.onnx"
    bad.write_text("not a model\n")
    before = listing(model_dir)
    for args in (["prune", bad, "-s", "0.5"], ["quantize", bad, "--mode", "dynamic"]):
        assert_refused(run_cli(*args), "not a readable ONNX model")
    assert listing(model_dir) == before


def test_hostile_model_is_valid_onnx(model_dir):
    # The corpus above is only meaningful if the hostile names survive the checker and a load.
    model = onnx.load(str(hostile_model(model_dir)))
    assert any(ESC_CLEAR in t.name for t in model.graph.initializer)
