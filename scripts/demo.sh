#!/usr/bin/env bash
# The main job on a bundled sample model; `make demo` runs this inside the project's .venv.
set -euo pipefail
cd "$(dirname "$0")/.."
BIN=.venv/bin
OUT=$(mktemp -d)
trap 'rm -rf "$OUT"' EXIT
cp sample_models/digits_cnn.onnx "$OUT/"
$BIN/compressq inspect "$OUT/digits_cnn.onnx"
