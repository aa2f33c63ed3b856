"""Helpers several test modules share (test modules do not import each other)."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np

REPO_ROOT = Path(__file__).resolve().parents[1]

# Every command that rewrites a decoder's weights, as a user types it ({model}, {out} filled in by the test)
BIG_MODEL_COMMANDS = {
    "dynamic": ["quantize", "{model}", "--mode", "dynamic", "--no-speed-check", "-o", "{out}"],
    "weight-only": ["quantize", "{model}", "--mode", "weight-only", "--block-size", "16", "--no-speed-check",
                    "-o", "{out}"],
    "prune": ["prune", "{model}", "-s", "0.3", "-o", "{out}"],
}


def cosine(a: np.ndarray, b: np.ndarray) -> float:
    """The numpy reference: cosine of the two arrays flattened, in float64."""
    a, b = np.asarray(a, np.float64).ravel(), np.asarray(b, np.float64).ravel()
    return float(a @ b / (np.linalg.norm(a) * np.linalg.norm(b)))


def error_lines(text: str) -> list[str]:
    return [line for line in text.splitlines() if line.strip()]


def assert_refused(result, *words: str) -> None:
    """Exit 2, one `error:` line with a hint, no traceback."""
    assert result.exit_code == 2, (result.exit_code, result.stderr)
    lines = error_lines(result.stderr)
    assert len(lines) == 1 and lines[0].startswith("error:") and "hint:" in lines[0], result.stderr
    for word in words:
        assert word in lines[0], lines[0]
    assert "Traceback" not in result.stderr + result.stdout


def run_python(code: str, *args: str, cwd: Path, timeout: int = 180) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k not in ("COMPRESSQ_DEBUG", "FORCE_COLOR")}
    env["PYTHONPATH"] = str(REPO_ROOT)
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code), *args], cwd=cwd, capture_output=True,
                          text=True, timeout=timeout, env=env)


def listing(folder: Path) -> set[str]:
    return {p.name for p in folder.iterdir()}


def write_pnm(path: Path, pixels: np.ndarray, maxval: int = 255, ascii_body: bool = False) -> Path:
    """Pixels [H, W] (PGM) or [H, W, 3] (PPM) as a binary or ASCII netpbm file with a header comment."""
    color = pixels.ndim == 3
    magic = ("P3" if color else "P2") if ascii_body else ("P6" if color else "P5")
    header = f"{magic}\n# made by a test\n{pixels.shape[1]} {pixels.shape[0]}\n{maxval}\n".encode()
    if ascii_body:
        body = " ".join(str(int(v)) for v in pixels.ravel()).encode()
    else:
        body = pixels.astype(">u2" if maxval > 255 else np.uint8).tobytes()
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(header + body)
    return path
