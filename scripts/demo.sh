#!/usr/bin/env bash
# The main job on bundled sample models; `make demo` runs this inside the project's .venv.
# Everything it writes goes to demo-output/ (git-ignored) and stays there: the README's examples use these
# files. Models are copied there first, so the committed sample models are never touched.
set -euo pipefail
cd "$(dirname "$0")/.."
BIN=.venv/bin
OUT=demo-output
mkdir -p "$OUT"
set -x

# 1. A trained transformer (digits as 8 rows of 8 pixels): accuracy is what matters here. The model is
#    tiny, so int8 barely changes its latency; the report says so and the gates check accuracy and size.
cp sample_models/digits_transformer.onnx "$OUT/transformer.onnx"
$BIN/compressq inspect "$OUT/transformer.onnx"
$BIN/compressq quantize "$OUT/transformer.onnx" --calibration-data sample_models/digits_seq_calib.npz \
  --latency-batch 32
$BIN/compressq report "$OUT/transformer.onnx" "$OUT/transformer.int8.onnx" \
  --data sample_models/digits_seq_eval.npz --batch-size 32 --max-accuracy-drop 0.5 --max-size-ratio 0.5
$BIN/compressq report "$OUT/transformer.onnx" "$OUT/transformer.int8.onnx" \
  --data sample_models/digits_seq_eval.npz --batch-size 32 --max-accuracy-drop 0.5 --max-size-ratio 0.5 \
  --format html --output "$OUT/transformer_report.html"

# 2. The digits CNN pruned to 50 % with a refit against the dense model, then quantized.
cp sample_models/digits_cnn.onnx "$OUT/digits_cnn.onnx"
$BIN/compressq prune "$OUT/digits_cnn.onnx" --sparsity 0.5 --calibration-data sample_models/digits_calib.npz
$BIN/compressq quantize "$OUT/digits_cnn.pruned.onnx" -d sample_models/digits_calib.npz --no-speed-check

# 3. A ResNet-18-sized CNN (random weights, random inputs): latency is what matters here.
$BIN/python -m sample_models.generated resnet "$OUT/resnet.onnx" --inputs "$OUT/resnet_inputs.npz" --samples 8
$BIN/compressq quantize "$OUT/resnet.onnx" --calibration-data "$OUT/resnet_inputs.npz"
$BIN/compressq report "$OUT/resnet.onnx" "$OUT/resnet.int8.onnx" --data "$OUT/resnet_inputs.npz" --runs 10 \
  --min-speedup 1.5 --min-cosine 0.99 --max-size-ratio 0.3
set +x

echo
echo "demo-output/ now holds:"
ls -lh "$OUT"
echo
echo "Open the HTML report:"
echo "  $BIN/python -m webbrowser \"file://$(pwd)/$OUT/transformer_report.html\""
