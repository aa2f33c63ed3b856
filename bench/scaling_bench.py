"""Calibration at scale (issue 12 item 2): memory flat in the number of samples, time per sample no worse than
onnxruntime's, on a BERT-6 encoder.

    python -m bench.run scaling
    CQ_SCALING_SAMPLES=16,1024 python -m bench.run scaling      (the issue's counts; about 11 minutes on 2 cores)

The model is generated once into .bench/scaling: sample_models/generated.bert_model at 6 layers with real shapes
(hidden 768, 12 heads, intermediate 3072, LayerNormalization, Erf-GELU, a 30522-token word table, seq 128) and
random weights; the calibration .npz holds int64 input_ids and an attention_mask of 1s then 0s (lengths drawn
between 32 and 128 tokens), so the data itself weighs about 1.5 KB a sample and cannot hide a growth in the tool.

Each run is a fresh process (bench/ort_baseline.run_fresh: the child's own VmHWM, imports included):
  * compressq as a user types it: `compressq quantize MODEL -d NPZ --no-speed-check` (the accuracy check stays
    on, as by default): the memory rows;
  * the same with --no-accuracy-check: the time rows. The self-check after quantizing runs the fp32 and the
    int8 model on up to 128 samples (on this BERT the fp32 outputs cannot come from calibration: its word table
    is quantized before it), which is not calibration and would land in the marginal cost (16 vs 256 samples:
    0.30 CPU s a sample with it, 0.13 without);
  * onnxruntime as its documentation suggests: quant_pre_process, then quantize_static (QDQ, MinMax, per-channel)
    fed batch-1 feeds (bench/ort_baseline.ort_quantize_files).
Bars: compressq's peak RSS at the largest count within 1.1x of that at the smallest; calibration CPU seconds per
sample <= onnxruntime's; static quantize's peak RSS (default, speed check on, and --no-speed-check) <= 2x the
model file + the peak of a process in which onnxruntime loads the model and runs one sample (issue 12 item 2).
Seconds per sample are marginal: (run at the largest count - run at the smallest) /
(difference in samples), so loading, pre-processing, the rewrite and saving (the same at both counts) drop out;
CPU seconds (user + system, every thread, from RUSAGE_CHILDREN) carry the bar, wall seconds are shown beside
them (the machine is shared: neighbours move wall time, not CPU time). The two tools do not calibrate the same
tensors: compressq measures the inputs of the layers it plans to quantize (24 on BERT-6), onnxruntime every tensor
its QDQ registry may quantize (about 200 QuantizeLinear in its output); the bar is on what a user waits for.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from bench.table import log, mb

SECTION = "scaling"
WORK = Path(".bench/scaling")
LAYERS = 6
VOCAB = 30522
SEQ_LEN = 128
DEFAULT_SAMPLES = (16, 256)  # about 4 minutes on 2 cores (234 s measured); the 1024 by CQ_SCALING_SAMPLES
RSS_GROWTH_BAR = 1.1
MIN_TOKENS = 32


def sample_counts() -> tuple[int, int]:
    """The two calibration sizes compared: CQ_SCALING_SAMPLES=SMALL,LARGE, else DEFAULT_SAMPLES."""
    text = os.environ.get("CQ_SCALING_SAMPLES", "")
    counts = [int(part) for part in text.split(",") if part.strip()] if text else list(DEFAULT_SAMPLES)
    if len(counts) != 2 or not 0 < counts[0] < counts[1]:
        raise SystemExit(f"CQ_SCALING_SAMPLES={text!r}: give two counts, smaller first (e.g. 16,1024)")
    return counts[0], counts[1]


# --------------------------------------------------------------------------------------------- inputs


def bert6_path() -> Path:
    """The generated BERT-6 (built once; about 265 MB, weights inside the .onnx)."""
    import onnx

    from sample_models.generated import bert_model

    path = WORK / f"bert{LAYERS}.onnx"
    if not path.exists():
        WORK.mkdir(parents=True, exist_ok=True)
        log(f"building {path}")
        model = bert_model(layers=LAYERS, vocab=VOCAB, seq_len=SEQ_LEN, seed=0)
        onnx.checker.check_model(model)
        partial = path.with_suffix(".partial")
        onnx.save(model, str(partial))
        partial.replace(path)
    return path


def calibration_arrays(count: int, seed: int = 0) -> dict[str, np.ndarray]:
    """Token ids and a padding mask as a tokenizer writes them: each sample 1s for its tokens, then 0s."""
    rng = np.random.default_rng(seed)
    lengths = rng.integers(MIN_TOKENS, SEQ_LEN + 1, count)
    mask = (np.arange(SEQ_LEN)[None, :] < lengths[:, None]).astype(np.float32)
    ids = rng.integers(1, VOCAB, (count, SEQ_LEN)).astype(np.int64) * mask.astype(np.int64)
    return {"input_ids": ids, "attention_mask": mask}


def calibration_npz(count: int) -> Path:
    path = WORK / f"bert{LAYERS}_calib{count}.npz"
    if not path.exists():
        np.savez(path, **calibration_arrays(count))
    return path


# --------------------------------------------------------------------------------------------- runs


def compressq_run(model: Path, count: int, accuracy_check: bool = True):
    from bench.ort_baseline import run_fresh

    out = WORK / f"bert{LAYERS}.cq{count}{'' if accuracy_check else '.nocheck'}.onnx"
    arguments = ["quantize", str(model), "-d", str(calibration_npz(count)), "-o", str(out), "--no-speed-check",
                 *([] if accuracy_check else ["--no-accuracy-check"])]
    return run_fresh("bench.llm_bench:compressq_cli", {"arguments": arguments})


def compressq_default_run(model: Path, count: int):
    """`compressq quantize MODEL -d NPZ` with nothing turned off (the speed check holds fp32 and int8 sessions)."""
    from bench.ort_baseline import run_fresh

    out = WORK / f"bert{LAYERS}.cqdefault{count}.onnx"
    return run_fresh("bench.llm_bench:compressq_cli", {"arguments": [
        "quantize", str(model), "-d", str(calibration_npz(count)), "-o", str(out)]})


def onnxruntime_once(model_path: str, calibration_npz: str) -> dict:
    """Entry point for a fresh process: onnxruntime loads the model and runs it on one sample, nothing else."""
    import onnxruntime

    with np.load(calibration_npz) as archive:
        feed = {name: archive[name][:1] for name in archive.files}
    session = onnxruntime.InferenceSession(model_path, providers=["CPUExecutionProvider"])
    session.run(None, feed)
    return {}


def onnxruntime_run(model: Path, count: int):
    from bench.ort_baseline import run_fresh

    out = WORK / f"bert{LAYERS}.ort{count}.onnx"
    arguments = {"model_path": str(model), "calibration_npz": str(calibration_npz(count)), "out_path": str(out),
                 "method": "minmax", "batch_size": 1}
    return run_fresh("bench.ort_baseline:ort_quantize_files", arguments)


def _remove_outputs() -> None:
    """The quantized models (about 70 MB each) are not kept: the model and the .npz files are."""
    for path in [*WORK.glob(f"bert{LAYERS}.*[0-9].onnx"), *WORK.glob(f"bert{LAYERS}.*.nocheck.onnx")]:
        path.unlink()


def _logged(label: str, run):
    """`run`, after saying how it went on stderr."""
    done = f"{mb(run.peak_rss_bytes)} MB, {run.process_seconds:.0f} s wall, {run.cpu_seconds:.0f} s CPU"
    log(f"{label}: {run.error or done}")
    return run


# --------------------------------------------------------------------------------------------- rows


def _rss_row(table, counts: tuple[int, int], cq: dict, ort: dict) -> None:
    small, large = counts
    ratio = cq[large].peak_rss_bytes / cq[small].peak_rss_bytes
    ort_ratio = ort[large].peak_rss_bytes / ort[small].peak_rss_bytes if not (ort[large].error or ort[small].error) \
        else float("nan")
    table.add(SECTION, f"BERT-{LAYERS}: peak RSS {large} / {small} samples (compressq quantize --no-speed-check "
              f"{mb(cq[large].peak_rss_bytes)} / {mb(cq[small].peak_rss_bytes)} MB; onnxruntime MinMax "
              f"{mb(ort[large].peak_rss_bytes)} / {mb(ort[small].peak_rss_bytes)} MB)",
              f"{ratio:.3f}", f"{ort_ratio:.3f}", f"<= {RSS_GROWTH_BAR}x", ratio <= RSS_GROWTH_BAR)
    for count in counts:
        table.add(SECTION, f"BERT-{LAYERS}: peak RSS MB at {count} samples, whole process, vs onnxruntime MinMax",
                  mb(cq[count].peak_rss_bytes), mb(ort[count].peak_rss_bytes))


def _static_memory_row(table, model: Path, count: int, default, no_speed_check, once) -> None:
    """Issue 12's bar for static quantize: peak RSS <= 2x the model + what onnxruntime needs to run it once."""
    bar = 2 * model.stat().st_size + once.peak_rss_bytes
    table.add(SECTION, f"BERT-{LAYERS}: static quantize peak RSS MB at {count} samples, whole process, compressq "
              f"default (--no-speed-check {mb(no_speed_check.peak_rss_bytes)}) vs 2x the model file "
              f"({mb(model.stat().st_size)} MB) + onnxruntime running it once ({mb(once.peak_rss_bytes)} MB)",
              mb(default.peak_rss_bytes), mb(bar), "<= 2x model + ORT once",
              max(default.peak_rss_bytes, no_speed_check.peak_rss_bytes) <= bar)


def _per_sample(runs: dict, counts: tuple[int, int], attribute: str) -> float:
    small, large = counts
    return (getattr(runs[large], attribute) - getattr(runs[small], attribute)) / (large - small)


def _time_rows(table, counts: tuple[int, int], calibrating: dict, ort: dict) -> None:
    small, large = counts
    cpu = _per_sample(calibrating, counts, "cpu_seconds"), _per_sample(ort, counts, "cpu_seconds")
    wall = _per_sample(calibrating, counts, "process_seconds"), _per_sample(ort, counts, "process_seconds")
    table.add(SECTION, f"BERT-{LAYERS}: calibration CPU s per sample ({large} vs {small} samples, marginal; compressq "
              f"--no-speed-check --no-accuracy-check; wall s per sample {wall[0]:.3f} vs {wall[1]:.3f}) vs onnxruntime "
              "MinMax", f"{cpu[0]:.3f}", f"{cpu[1]:.3f}", "<= ORT", cpu[0] <= cpu[1])
    table.add(SECTION, f"BERT-{LAYERS}: whole process at {large} samples, CPU s (compressq --no-accuracy-check; wall s "
              f"{calibrating[large].process_seconds:.0f} vs {ort[large].process_seconds:.0f})",
              f"{calibrating[large].cpu_seconds:.0f}", f"{ort[large].cpu_seconds:.0f}")


def run(table) -> None:
    from bench.ort_baseline import run_fresh

    counts = sample_counts()
    model = bert6_path()
    cq, calibrating, ort = {}, {}, {}
    for count in counts:
        cq[count] = _logged(f"compressq {count} samples", compressq_run(model, count))
        calibrating[count] = _logged(f"compressq --no-accuracy-check {count} samples",
                                     compressq_run(model, count, accuracy_check=False))
        ort[count] = _logged(f"onnxruntime {count} samples", onnxruntime_run(model, count))
    small = counts[0]
    default = _logged(f"compressq default {small} samples", compressq_default_run(model, small))
    once = _logged("onnxruntime runs it once", run_fresh("bench.scaling_bench:onnxruntime_once", {
        "model_path": str(model), "calibration_npz": str(calibration_npz(small))}))
    _remove_outputs()
    if default.error or once.error:
        table.add(SECTION, f"BERT-{LAYERS}: static quantize peak RSS", (default.error or once.error)[:200], None,
                  "compressq runs", False)
    else:
        _static_memory_row(table, model, small, default, cq[small], once)
    errors = [f"{who} {count}: {runs[count].error}" for who, runs in
              (("compressq", cq), ("compressq --no-accuracy-check", calibrating), ("onnxruntime", ort))
              for count in counts if runs[count].error]
    if any(runs[count].error for runs in (cq, calibrating) for count in counts):
        table.add(SECTION, f"BERT-{LAYERS}: quantize at {counts[0]} and {counts[1]} samples",
                  "; ".join(errors)[:200], None, "compressq runs", False)
        return
    if errors:  # onnxruntime failed where compressq ran: the memory rows still stand, said as such
        table.add(SECTION, f"BERT-{LAYERS}: onnxruntime", "; ".join(errors)[:200])
    _rss_row(table, counts, cq, ort)
    if not errors:
        _time_rows(table, counts, calibrating, ort)
