"""Issue 10 bars: accuracy where int8 breaks, on unseen inputs, next to onnxruntime's quantizer in the same run.

Per real model (bench/real_models.py; skipped where absent): calibration inputs (seed 0), a selection set
(seed 2) for accuracy targets, and unseen evaluation inputs (seed 1) that every figure is measured on.
compressq runs as a user would (speed check on); the rows show the default and the documented flags of
issue 10. Speeds are fp32 work / output work by CPU time (compressq.measure.speed), never wall clock.
First rows: what a sensitive layer costs in each wider form onnxruntime could run (item 3, measured before
choosing): only int8 and dynamic int8 (MatMul) beat fp32; 16-bit activations run as DQ + fp32 + Q.

    python -m bench.run accuracy            CQ_ACCURACY_MODELS=ocr_rec,ocr_cls to run some models only
"""

from __future__ import annotations

import os
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import onnx

from bench.table import Table
from compressq.data import load_dataset
from compressq.errors import CompressqError
from compressq.measure.speed import measure_speedup
from compressq.quantize.api import quantize_model
from compressq.quantize.config import QuantizeConfig
from compressq.runtime import create_session

SECTION = "accuracy (issue 10)"
COUNTS = {  # calibration, selection, evaluation samples
    # ocr_cls: a 99.5 % target read on 32 selection samples is "all 32 agree", met by a model at 99.0 % unseen
    "ocr_rec": (16, 32, 64), "ocr_cls": (32, 200, 200), "magika": (32, 32, 200), "ocr_det": (8, 8, 8),
    "captcha_det": (8, 8, 16), "minilm": (32, 32, 64),
}
VARIANTS: dict[str, dict] = {  # label -> QuantizeConfig options beyond the bench's defaults
    "compressq default": {},
    "compressq --method mse": {"method": "mse"},
    "compressq --method auto": {"method": "auto"},
}
TARGETED = {"ocr_rec": {"compressq --min-agreement 0.9 --method mse": {"method": "mse", "min_agreement": 0.9}},
            "ocr_cls": {"compressq --min-agreement 0.995": {"min_agreement": 0.995}},
            "minilm": {"compressq --outlier-channels 16": {"outlier_channels": 16}}}
DETECTION_SCORE = 0.25
ALSO_SHOWN = {"minilm": "embedding_cosine_mean", "captcha_det": "detections_kept"}  # second figure of a bar


# ---------------------------------------------------------------------------------------------------
# Which wider type a sensitive node could keep instead of float (issue 10 item 3: measure before choosing).
# One layer of a bench model's shape, in each form onnxruntime could run it; speed against that layer in fp32.

KERNEL_LAYERS = {  # label -> (op, weight shape, input shape)
    "MiniLM FFN MatMul [64,384]x[384,1536]": ("MatMul", (384, 1536), (1, 64, 384)),
    "PP-OCRv4 rec Conv 3x3 64->128 at 24x80": ("Conv", (128, 64, 3, 3), (1, 64, 24, 80)),
}


def _layer_forms(op: str, weight: np.ndarray, input_shape: tuple) -> dict[str, onnx.ModelProto]:
    from onnx import TensorProto, helper, numpy_helper

    axis = 0 if op == "Conv" else 1
    reduced = tuple(i for i in range(weight.ndim) if i != axis)
    scale = (np.abs(weight).max(axis=reduced) / 127).astype(np.float32)
    codes = np.round(weight / np.expand_dims(scale, reduced)).astype(np.int8)
    int8 = {"w_q": codes, "w_s": scale, "w_z": np.zeros(scale.size, np.int8)}
    attributes = {"pads": [1, 1, 1, 1]} if op == "Conv" else {}

    def graph(nodes, initializers) -> onnx.ModelProto:
        body = helper.make_graph(nodes, "layer", [helper.make_tensor_value_info("x", TensorProto.FLOAT, input_shape)],
                                 [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)],
                                 [numpy_helper.from_array(v, k) for k, v in initializers.items()])
        return helper.make_model(body, opset_imports=[helper.make_opsetid("", 21),
                                                      helper.make_opsetid("com.microsoft", 1)])

    def qdq(code_type, zero) -> onnx.ModelProto:  # activations of code_type, int8 weights, output re-quantized
        levels = float(np.iinfo(code_type).max - np.iinfo(code_type).min)
        params = {"x_s": np.float32(8 / levels), "x_z": code_type(zero), "y_s": np.float32(16 / levels),
                  "y_z": code_type(zero)}
        return graph([helper.make_node("QuantizeLinear", ["x", "x_s", "x_z"], ["x_q"]),
                      helper.make_node("DequantizeLinear", ["x_q", "x_s", "x_z"], ["x_d"]),
                      helper.make_node("DequantizeLinear", ["w_q", "w_s", "w_z"], ["w_d"], axis=axis),
                      helper.make_node(op, ["x_d", "w_d"], ["y_f"], **attributes),
                      helper.make_node("QuantizeLinear", ["y_f", "y_s", "y_z"], ["y_q"]),
                      helper.make_node("DequantizeLinear", ["y_q", "y_s", "y_z"], ["y"])], {**int8, **params})

    forms = {"fp32": graph([helper.make_node(op, ["x", "w"], ["y"], **attributes)], {"w": weight}),
             "int8 QDQ (today)": qdq(np.uint8, 128), "uint16 activations QDQ": qdq(np.uint16, 32768),
             "int8 weights dequantized, fp32 activations":
                 graph([helper.make_node("DequantizeLinear", ["w_q", "w_s", "w_z"], ["w_d"], axis=axis),
                        helper.make_node(op, ["x", "w_d"], ["y"], **attributes)], int8)}
    if op == "MatMul":
        forms["dynamic int8 (DynamicQuantizeMatMul)"] = graph(
            [helper.make_node("DynamicQuantizeMatMul", ["x", "w_q", "w_s", "w_z"], ["y"], domain="com.microsoft")],
            int8)
    return forms


def _kernel_rows(table: Table) -> None:
    rng = np.random.default_rng(0)
    for label, (op, weight_shape, input_shape) in KERNEL_LAYERS.items():
        forms = _layer_forms(op, rng.standard_normal(weight_shape).astype(np.float32), input_shape)
        feeds = [{"x": rng.standard_normal(input_shape).astype(np.float32)}]
        for form, candidate in forms.items():
            if form != "fp32":
                speed = measure_speedup(forms["fp32"], candidate, feeds).ratio
                table.add(SECTION, f"kernel for a sensitive node, {label}: {form} (speed vs the fp32 layer)",
                          f"{speed:.2f}x")


def _log(message: str) -> None:
    print(message, flush=True)


def _outputs(model, feeds: list[dict]) -> list[np.ndarray]:
    session = create_session(model)
    return [session.run(None, feed)[0] for feed in feeds]


def _class_scores(name: str, reference: list[np.ndarray], test: list[np.ndarray]) -> dict[str, float]:
    """captcha_det (YOLOX layout [1, anchors, 4 box + 1 objectness + classes]): the class-score rows alone,
    and how many detections above DETECTION_SCORE in fp32 are still above it."""
    ref, got = np.concatenate(reference), np.concatenate(test)
    a, b = ref[..., 5:].astype(np.float64).ravel(), got[..., 5:].astype(np.float64).ravel()
    cosine = float(a @ b / (np.linalg.norm(a) * np.linalg.norm(b)))
    score_ref, score_got = ref[..., 4] * ref[..., 5:].max(-1), got[..., 4] * got[..., 5:].max(-1)
    fired = score_ref > DETECTION_SCORE
    kept = float(np.mean(score_got[fired] > DETECTION_SCORE)) if fired.any() else 1.0
    return {"class_cosine": cosine, "detections_kept": kept, "detections": int(fired.sum())}


def _figures(name: str, reference: list, test: list, feeds: list[dict]) -> dict[str, float]:
    from bench import real_models

    found = real_models.agreement(name, reference, test, feeds=feeds)
    if name == "captcha_det":
        found.update(_class_scores(name, reference, test))
    return found


BARS: dict[str, list[tuple[str, str, Callable[[dict], bool]]]] = {
    "ocr_rec": [("text_agreement", ">= 0.90 identical lines and >= 1.4x",
                 lambda f: f["text_agreement"] >= 0.90 and f["speedup"] >= 1.4)],
    "ocr_det": [("mask_iou", ">= 0.95", lambda f: f["mask_iou"] >= 0.95)],
    "ocr_cls": [("top1_agreement", ">= 0.995", lambda f: f["top1_agreement"] >= 0.995)],
    "magika": [("top1_agreement", ">= 0.995", lambda f: f["top1_agreement"] >= 0.995)],
    "minilm": [("neighbour_agreement", ">= 0.97, embedding cosine >= 0.995, speed >= onnxruntime's",
                lambda f: f["neighbour_agreement"] >= 0.97 and f["embedding_cosine_mean"] >= 0.995
                and f["speedup"] >= f.get("ort_speedup", 0.0))],
    "captcha_det": [("class_cosine", ">= 0.99 and every detection above 0.25 kept",
                     lambda f: f["class_cosine"] >= 0.99 and f["detections_kept"] >= 1.0)],
}


def _model_rows(table: Table, name: str, path: Path, folder: Path) -> None:
    from bench import real_models
    from bench.ort_baseline import ort_quantize_static

    calib_count, select_count, eval_count = COUNTS[name]
    model = onnx.load(str(path))
    files = {}
    for tag, seed, count in (("calib", 0, calib_count), ("select", 2, select_count)):
        files[tag] = folder / f"{name}_{tag}.npz"
        np.savez(files[tag], **real_models.stack_feeds(real_models.calibration_feeds(name, count, seed=seed)))
    calibration, selection = load_dataset(files["calib"], model), load_dataset(files["select"], model)
    calib_feeds = list(calibration.batches(1))
    eval_feeds = real_models.calibration_feeds(name, eval_count, seed=1)
    reference = _outputs(model, eval_feeds)
    timing_feeds = eval_feeds[:4]

    rows: dict[str, dict] = {}
    ort_path = folder / f"{name}.ort.onnx"
    try:
        ort_quantize_static(path, calib_feeds, ort_path, "minmax")
        ort_model = onnx.load(str(ort_path))
        rows["onnxruntime MinMax QDQ"] = {**_figures(name, reference, _outputs(ort_model, eval_feeds), eval_feeds),
                                          "speedup": measure_speedup(model, ort_model, timing_feeds).ratio}
    except Exception as exc:  # onnxruntime fails on some graphs; the table says so
        _log(f"{name}: onnxruntime quantize_static failed: {type(exc).__name__}: {exc}")
    for label, options in {**VARIANTS, **TARGETED.get(name, {})}.items():
        started = time.process_time()
        try:
            result = quantize_model(model, calibration, QuantizeConfig(batch_size=1, **options),
                                    eval_dataset=selection)
        except CompressqError as exc:
            rows[label] = {"error": str(exc)}
            continue
        seconds = time.process_time() - started
        speedup = result.summary.speedup if result.summary.speedup is not None else 1.0
        rows[label] = {**_figures(name, reference, _outputs(result.model, eval_feeds), eval_feeds),
                       "speedup": speedup, "cpu_seconds": seconds,
                       "returned_to_float": len(result.summary.returned_to_float)}
    ort_speed = rows.get("onnxruntime MinMax QDQ", {}).get("speedup", 0.0)
    for key, bar, passes in BARS[name]:
        ort = rows.get("onnxruntime MinMax QDQ")
        ort_text = f"{ort[key]:.4f} at {ort['speedup']:.2f}x" if ort and key in ort else "n/a (failed)"
        for label, figures in rows.items():
            if label.startswith("onnxruntime"):
                continue
            if "error" in figures:
                table.add(SECTION, f"{name}: {label}", f"error: {figures['error'][:120]}", ort_text, bar, False)
                continue
            figures["ort_speedup"] = ort_speed
            extra = f", {figures['returned_to_float']} nodes back to float" if figures["returned_to_float"] else ""
            table.add(SECTION, f"{name} ({eval_count} unseen inputs): {key}, {label} "
                      f"({figures['cpu_seconds']:.0f} s CPU{extra}) | onnxruntime",
                      f"{figures[key]:.4f}{_also(name, figures)} at {figures['speedup']:.2f}x",
                      f"{ort_text}{_also(name, ort) if ort and key in ort else ''}", bar, passes(figures))


def _also(name: str, figures: dict) -> str:
    key = ALSO_SHOWN.get(name)
    return f" ({key} {figures[key]:.4f})" if key and key in figures else ""


def run(table: Table) -> None:
    from bench import real_models

    wanted = [n for n in os.environ.get("CQ_ACCURACY_MODELS", ",".join(COUNTS)).split(",") if n]
    _kernel_rows(table)
    found = real_models.present()
    with tempfile.TemporaryDirectory(prefix="compressq-accuracy-") as folder:
        for name in wanted:
            if name not in found:
                table.add(SECTION, f"{name}: not in .bench/models (python -m bench.real_models)", "skipped")
                continue
            started = time.perf_counter()
            _model_rows(table, name, found[name], Path(folder))
            _log(f"{name}: {time.perf_counter() - started:.0f} s")
