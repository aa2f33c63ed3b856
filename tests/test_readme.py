"""The README is a test: every `compressq ...` command it shows runs here, in README order, and exits as the
README implies (0: each example shows a successful run, gates passed).

The examples run in a scratch folder laid out like `demo-output/` (what `make demo` leaves): the sample
models under the names the README uses, `sample_models/` beside them. Synopsis lines (MODEL, [OPTIONS]) are
not commands. A command is skipped only for a reason listed in SKIPPED.
"""

from __future__ import annotations

import re
import shlex
import shutil
from pathlib import Path

import numpy as np
import pytest

from tests.conftest import REPO_ROOT, SAMPLES

README = REPO_ROOT / "README.md"
COMMANDS = ("inspect", "data", "quantize", "prune", "report", "sensitivity")
PLACEHOLDER = re.compile(r"\b[A-Z][A-Z0-9_.]*[A-Z]\b|\[|\.\.\.")  # MODEL, CALIB.npz, [--json], ...
SKIPPED = {
    "resnet.onnx": "needs the 45 MB generated ResNet and a full speed check (make demo runs it)",
    "--min-speedup": "a speed gate depends on the machine's load; tests make no timed assertions",
}


def readme_commands() -> list[str]:
    """`compressq <command> ...` lines of the README's code blocks, `$ ` prompts and `\\` continuations folded."""
    commands = []
    for block in re.findall(r"```[a-z]*\n(.*?)```", README.read_text(), re.S):
        lines = block.splitlines()
        position = 0
        while position < len(lines):
            line = lines[position].strip().removeprefix("$ ")
            while line.endswith("\\") and position + 1 < len(lines):
                position += 1
                line = line[:-1].rstrip() + " " + lines[position].strip()
            position += 1
            words = line.split()
            if len(words) > 1 and words[0] == "compressq" and words[1] in COMMANDS:
                commands.append(line)
    return commands


def runnable(command: str) -> bool:
    return not PLACEHOLDER.search(command.split(None, 2)[2] if len(command.split()) > 2 else "")


def skip_reason(command: str) -> str | None:
    return next((why for marker, why in SKIPPED.items() if marker in command), None)


def demo_folder(folder: Path) -> None:
    """What `make demo` leaves in demo-output/, plus the inputs the README's examples name."""
    (folder / "sample_models").symlink_to(SAMPLES, target_is_directory=True)
    shutil.copy(SAMPLES / "digits_transformer.onnx", folder / "transformer.onnx")
    shutil.copy(SAMPLES / "digits_cnn.onnx", folder / "digits_cnn.onnx")
    (folder / "build").mkdir()
    with np.load(SAMPLES / "digits_eval.npz") as archive:  # the `compressq data` example's digits/ folder
        images, labels = archive["input"][:6], archive["labels"][:6]
    for number, (image, label) in enumerate(zip(images, labels)):
        path = folder / "digits" / f"class{label}" / f"{number:03d}.pgm"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(b"P5\n8 8\n255\n" + np.rint(image[0] * 255).astype(np.uint8).tobytes())


def test_the_readme_shows_commands_and_synopses_are_told_apart():
    commands = readme_commands()
    examples = [c for c in commands if runnable(c)]
    assert len(examples) >= 10
    assert {c.split()[1] for c in examples} == set(COMMANDS)
    assert not runnable("compressq quantize MODEL -d CALIB.npz")
    assert not runnable("compressq prune MODEL --sparsity S [-o OUT]")


def test_every_readme_example_runs_offline_and_exits_0(run_cli, tmp_path, monkeypatch):
    demo_folder(tmp_path)
    monkeypatch.chdir(tmp_path)
    # The README's report examples compare against "the digits CNN forced to int8 with --no-speed-check".
    setup = run_cli("quantize", "digits_cnn.onnx", "-d", "sample_models/digits_calib.npz", "--no-speed-check",
                    "-o", "digits_cnn.int8.onnx")
    assert setup.exit_code == 0, setup.stderr
    ran, skipped = [], []
    for command in filter(runnable, readme_commands()):
        if skip_reason(command):
            skipped.append(command)
            continue
        result = run_cli(*shlex.split(command)[1:])
        assert result.exit_code == 0, f"{command}\n{result.stderr}\n{result.stdout[-2000:]}"
        assert "Traceback" not in result.stderr, command
        ran.append(command)
    assert len(ran) >= 10 and len(skipped) <= 3, (ran, skipped)
    assert (tmp_path / "transformer.int8.onnx").exists() and (tmp_path / "digits_cnn.pruned.int8.onnx").exists()
    assert (tmp_path / "digits_calib.npz").exists()


@pytest.mark.parametrize("command", COMMANDS)
def test_every_command_takes_json_as_the_readme_says(run_cli, command):
    result = run_cli(command, "--help")
    assert result.exit_code == 0 and "--json" in result.stdout
