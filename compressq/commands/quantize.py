from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import typer

from compressq import render
from compressq.commands.progress import stage_progress
from compressq.data import load_dataset
from compressq.errors import UsageError
from compressq.graph import check_output_path, default_output_path, file_size, load_model, save_model, stamp
from compressq.quantize.api import METHODS, MODES, quantize_model
from compressq.quantize.config import QuantizeConfig
from compressq.render_quantize import render_quantize_summary
from compressq.runtime import provider_chain


def quantize(
    model: Path = typer.Argument(..., help="ONNX model to quantize (never modified)."),
    output: Path = typer.Option(None, "-o", "--output", help="Output path [default: NAME.int8.onnx next to MODEL]."),
    calibration_data: Path = typer.Option(None, "--calibration-data", "-d",
                                          help=".npz keyed by input names, or a folder of .npz/.npy files."),
    mode: str = typer.Option(None, "--mode", help="static | dynamic | weight-only "
                             "[default: static with calibration data, else dynamic]."),
    method: str = typer.Option("minmax", "--method", help="Calibration: minmax | percentile | entropy | mse."),
    percentile: float = typer.Option(99.999, "--percentile", help="Percentile kept by --method percentile."),
    per_channel: bool = typer.Option(True, "--per-channel/--per-tensor", help="Weight scales per output channel."),
    activations: str = typer.Option("uint8", "--activations", help="uint8 (asymmetric) | int8 (symmetric)."),
    exclude: list[str] = typer.Option([], "--exclude", help="Node name or op type glob to keep float (repeatable)."),
    samples: int = typer.Option(None, "--samples", min=1, help="Calibration samples to use [default: all]."),
    batch_size: int = typer.Option(8, "--batch-size", min=1, help="Calibration batch size (memory grows with it)."),
    provider: str = typer.Option("cpu", "--provider", help="Execution provider the output is checked on: cpu | cuda."),
    speed_check: bool = typer.Option(True, "--speed-check/--no-speed-check",
                                     help="Time the output against the input and undo quantization that costs time."),
    latency_batch: int = typer.Option(1, "--latency-batch", min=1,
                                      help="Batch size the speed check times at (use your serving batch)."),
    equalize: bool = typer.Option(False, "--equalize", help="Cross-layer equalization first (depthwise CNNs)."),
    bias_correction: bool = typer.Option(False, "--bias-correction",
                                         help="Correct each layer's bias by its measured mean output shift."),
    smoothquant: float = typer.Option(None, "--smoothquant", min=0.0, max=1.0,
                                      help="SmoothQuant alpha: move activation outliers into weights (transformers)."),
    max_drop: float = typer.Option(None, "--max-drop", help="Accuracy target: top-1 drop in points vs fp32 "
                                   "(needs labels); the most sensitive nodes go back to float until it is met."),
    min_agreement: float = typer.Option(None, "--min-agreement", min=0.0, max=1.0,
                                        help="Accuracy target: share of samples whose prediction matches fp32."),
    eval_data: Path = typer.Option(None, "--eval-data", help="Evaluation data for the accuracy target "
                                   "[default: the calibration data]."),
    bits: int = typer.Option(4, "--bits", help="Weight-only mode: 4 or 8 bits."),
    block_size: int = typer.Option(32, "--block-size", help="Weight-only mode: weights per scale (32, 64, 128)."),
    as_json: bool = typer.Option(False, "--json", help="Print the summary as JSON on stdout, nothing else."),
) -> None:
    """Quantize a model to int8 (static QDQ with calibration data, else dynamic), never slower or bigger."""
    config = _config(mode, calibration_data, method, percentile, per_channel, activations, exclude, samples,
                     batch_size, provider, speed_check, latency_batch, bits, block_size)
    config = replace(config, equalize=equalize, bias_correction=bias_correction, smoothquant=smoothquant,
                     max_drop=max_drop, min_agreement=min_agreement)
    static_only = equalize or bias_correction or smoothquant is not None or max_drop is not None \
        or min_agreement is not None or eval_data is not None
    if static_only and config.mode != "static":
        raise UsageError("--equalize, --bias-correction, --smoothquant and accuracy targets apply to static "
                         "quantization", hint="pass --calibration-data (and drop --mode dynamic/weight-only)")
    target = output or default_output_path(model, "int8" if config.mode != "weight-only" else f"int{bits}")
    check_output_path(target, protect=[model])
    source = load_model(model)
    dataset = load_dataset(calibration_data, source) if calibration_data else None
    evaluation = load_dataset(eval_data, source, require_labels=max_drop is not None) if eval_data else None
    if config.mode == "dynamic" and calibration_data is None:
        render.stderr.print("no calibration data: static int8 needs real inputs, so quantizing dynamically "
                            "(int8 weights, activations quantized at run time)", highlight=False)
    with stage_progress() as progress:
        result = quantize_model(source, dataset, config, progress, eval_dataset=evaluation)
    stamp(result.model, "quantize", config.to_dict())
    save_model(result.model, target, protect=[model])
    sizes = {"input_bytes": file_size(model), "output_bytes": file_size(target)}
    if as_json:
        render.print_json({"output": str(target), **sizes, **result.summary.to_dict()})
    else:
        render_quantize_summary(result.summary, target, **sizes)


def _config(mode, calibration_data, method, percentile, per_channel, activations, exclude, samples, batch_size,
            provider, speed_check, latency_batch, bits, block_size) -> QuantizeConfig:
    chosen = mode or ("static" if calibration_data else "dynamic")
    if chosen not in MODES:
        raise UsageError(f"unknown --mode '{chosen}'", hint=f"use one of: {', '.join(MODES)}")
    if chosen == "static" and calibration_data is None:
        raise UsageError("--mode static needs --calibration-data",
                         hint="pass an .npz of real inputs, or use --mode dynamic")
    if method not in METHODS:
        raise UsageError(f"unknown --method '{method}'", hint=f"use one of: {', '.join(METHODS)}")
    if activations not in ("uint8", "int8"):
        raise UsageError(f"unknown --activations '{activations}'", hint="use uint8 or int8")
    if not 0 < percentile <= 100:
        raise UsageError(f"--percentile must be in (0, 100], got {percentile}")
    provider_chain(provider)  # fail before any work when the provider is missing
    return QuantizeConfig(mode=chosen, method=method, percentile=percentile, per_channel=per_channel,
                          activations=activations, exclude=tuple(exclude), samples=samples, batch_size=batch_size,
                          provider=provider, speed_check=speed_check, latency_batch=latency_batch, bits=bits,
                          block_size=block_size)
