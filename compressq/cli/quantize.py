from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import typer

from compressq.cli.views import console as render
from compressq.cli.views.progress import stage_progress
from compressq.cli.views.quantize import render_quantize_summary
from compressq.data import DATA_LAYOUT_HELP, load_dataset
from compressq.errors import UsageError
from compressq.io import (
    check_output_path,
    copy_unchanged_model,
    default_output_path,
    file_size,
    load_model,
    refuse_non_finite_weights,
    save_model,
    stamp,
    write_text_atomically,
)
from compressq.quantize.api import quantize_model
from compressq.quantize.config import QuantizeConfig
from compressq.quantize.plan_file import QuantizationPlan, check_plan_fits, read_plan, record_plan
from compressq.runtime import provider_chain


def quantize(
    model: Path = typer.Argument(..., help="ONNX model to quantize (never modified)."),
    output: Path = typer.Option(None, "-o", "--output", help="Output path [default: NAME.int8.onnx next to MODEL]."),
    calibration_data: Path = typer.Option(None, "--calibration-data", "-d",
                                          help=".npz keyed by input names, or a folder of .npz/.npy files."),
    data_layout: str = typer.Option("batch", "--data-layout", help=DATA_LAYOUT_HELP),
    mode: str = typer.Option(None, "--mode", help="static | dynamic | weight-only "
                             "[default: static with calibration data, else dynamic]."),
    method: str = typer.Option("minmax", "--method", help="Calibration: minmax | percentile | entropy | mse."),
    percentile: float = typer.Option(99.999, "--percentile", help="Percentile kept by --method percentile."),
    per_channel: bool = typer.Option(True, "--per-channel/--per-tensor", help="Weight scales per output channel."),
    activations: str = typer.Option("uint8", "--activations", help="uint8 (asymmetric) | int8 (symmetric)."),
    exclude: list[str] = typer.Option([], "--exclude", help="Keep float the layers whose node name, op type or "
                                                            "weight name matches this glob (repeatable)."),
    samples: int = typer.Option(None, "--samples", min=1, help="Calibration samples to use [default: all]."),
    batch_size: int = typer.Option(8, "--batch-size", min=1, help="Calibration batch size (memory grows with it)."),
    provider: str = typer.Option("cpu", "--provider", help="Execution provider the output is checked on: cpu | cuda."),
    speed_check: bool = typer.Option(True, "--speed-check/--no-speed-check",
                                     help="Time the output against the input and undo quantization that costs time."),
    latency_batch: int = typer.Option(1, "--latency-batch", min=1,
                                      help="Batch size the speed check times at (use your serving batch)."),
    threads: int = typer.Option(1, "--threads", min=1, help="Intra-op threads the speed check decides for "
                                "(use your serving threads); decisions use CPU time, never wall clock."),
    task_outputs: list[str] = typer.Option([], "--task-output",
                                           help="Output that carries the task, scored by the accuracy checks "
                                           "(repeatable) [default: chosen from names, types and shapes]."),
    save_plan: Path = typer.Option(None, "--save-plan", help="Write what was decided and measured as a "
                                   "reviewable JSON plan (static mode)."),
    plan: Path = typer.Option(None, "--plan", help="Re-apply a plan from --save-plan: no calibration data, "
                              "no timing, the same output bytes."),
    accuracy_check: bool = typer.Option(True, "--accuracy-check/--no-accuracy-check",
                                        help="Measure what int8 cost against fp32 after quantizing."),
    equalize: bool = typer.Option(False, "--equalize", help="Cross-layer equalization first (depthwise CNNs)."),
    bias_correction: bool = typer.Option(False, "--bias-correction",
                                         help="Correct each layer's bias by its measured mean output shift."),
    smoothquant: float = typer.Option(None, "--smoothquant", min=0.0, max=1.0,
                                      help="SmoothQuant alpha: move activation outliers into weights (transformers)."),
    outlier_channels: int = typer.Option(None, "--outlier-channels", min=1,
                                         help="At most N outlier channels per activation go to a small float MatMul "
                                         "beside the int8 layer (transformers: accuracy for ~15 % of the speed)."),
    max_drop: float = typer.Option(None, "--max-drop", help="Accuracy target: top-1 drop in points vs fp32 "
                                   "(needs labels); the most sensitive nodes go back to float until it is met."),
    min_agreement: float = typer.Option(None, "--min-agreement", min=0.0, max=1.0,
                                        help="Accuracy target: share of samples whose prediction matches fp32."),
    min_cosine: float = typer.Option(None, "--min-cosine", min=-1.0, max=1.0,
                                     help="Accuracy target: the worst task output's cosine to fp32. Static: "
                                     "sensitive nodes back to float; weight-only: sensitive layers to 8 bits."),
    eval_data: Path = typer.Option(None, "--eval-data", help="Evaluation data for the accuracy target "
                                   "[default: the calibration data]."),
    weight_reconstruction: str = typer.Option("none", "--weight-reconstruction",
                                              help="none | gptq: choose weight codes by GPTQ error feedback "
                                              "on calibration inputs (static and weight-only modes)."),
    bits: int = typer.Option(4, "--bits", help="Weight-only mode: 4 or 8 bits."),
    block_size: int = typer.Option(32, "--block-size", help="Weight-only mode: weights per scale (32, 64, 128)."),
    as_json: bool = typer.Option(False, "--json", help="Print the summary as JSON on stdout, nothing else."),
) -> None:
    """Quantize a model to int8 (static QDQ with calibration data, else dynamic), never slower or bigger."""
    pinned = read_plan(plan) if plan else None
    if pinned is not None:
        config = _config_from_plan(pinned, plan)
    else:
        config = _config(mode, calibration_data, method, percentile, per_channel, activations, exclude, samples,
                         batch_size, provider, speed_check, latency_batch, bits, block_size)
        config = replace(config, equalize=equalize, bias_correction=bias_correction, smoothquant=smoothquant,
                         outlier_channels=outlier_channels,
                         max_drop=max_drop, min_agreement=min_agreement, min_cosine=min_cosine, threads=threads,
                         task_outputs=tuple(task_outputs), accuracy_check=accuracy_check,
                         weight_reconstruction=weight_reconstruction)
    _refuse_options_of_other_modes(config, eval_data, save_plan)
    target = output or default_output_path(model, "int8" if config.mode != "weight-only" else f"int{bits}")
    read_paths = [p for p in (model, calibration_data, eval_data, plan) if p is not None]
    check_output_path(target, protect=read_paths)
    if save_plan is not None:
        check_output_path(save_plan, protect=[*read_paths, target])
    source = load_model(model, read_weights=False)  # weights stay in their files until a step needs them
    refuse_non_finite_weights(source, str(model))
    if pinned is not None:
        check_plan_fits(pinned, source, plan)
    dataset = load_dataset(calibration_data, source, layout=data_layout) \
        if calibration_data and pinned is None else None
    evaluation = load_dataset(eval_data, source, require_labels=max_drop is not None, layout=data_layout) \
        if eval_data else None
    if config.mode == "dynamic" and calibration_data is None:
        render.stderr.print("no calibration data: static int8 needs real inputs, so quantizing dynamically "
                            "(int8 weights, activations quantized at run time)", highlight=False)
    with stage_progress() as progress:
        result = quantize_model(source, dataset, config, progress, eval_dataset=evaluation, pinned=pinned)
    if result.model is not source:
        stamp(result.model, "quantize", config.to_dict())
        if result.plan is not None:
            record_plan(result.model, result.plan)
        save_model(result.model, target, protect=read_paths)
    elif not copy_unchanged_model(model, target, protect=read_paths):  # the user's own bytes: never bigger
        save_model(result.model, target, protect=read_paths)
    if save_plan is not None and result.plan is not None:
        write_text_atomically(save_plan, result.plan.to_json())
    sizes = {"input_bytes": file_size(model, loaded=source), "output_bytes": file_size(target)}
    if as_json:
        render.print_json({"output": str(target), **sizes, **result.summary.to_dict(),
                           "plan_file": str(save_plan) if save_plan else None})
    else:
        render_quantize_summary(result.summary, target, **sizes)
        if save_plan is not None:
            render.stdout.print(f"plan: {save_plan} (re-apply with --plan {save_plan})", highlight=False,
                                markup=False)


def _config_from_plan(pinned: QuantizationPlan, path: Path) -> QuantizeConfig:
    """The plan's own settings: a re-applied plan must not mix with options given today."""
    settings = dict(pinned.settings)
    for key in ("exclude", "task_outputs"):
        settings[key] = tuple(settings.get(key) or ())
    known = set(QuantizeConfig.__dataclass_fields__)
    try:
        return QuantizeConfig(**{k: v for k, v in settings.items() if k in known})
    except (TypeError, ValueError) as exc:
        raise UsageError(f"plan {path} has settings this compressq cannot use: {exc}",
                         hint="make a new plan with --save-plan") from None


def _refuse_options_of_other_modes(config: QuantizeConfig, eval_data, save_plan) -> None:
    targets = config.max_drop is not None or config.min_agreement is not None or config.min_cosine is not None
    static_only = config.equalize or config.bias_correction or config.smoothquant is not None \
        or config.outlier_channels is not None or save_plan is not None
    # 4-bit weight-only meets a target by giving its most sensitive layers 8-bit codes (quantize/precision.py)
    if not (config.mode == "weight-only" and config.bits == 4):
        static_only = static_only or targets or eval_data is not None
    if static_only and config.mode != "static":
        raise UsageError("--equalize, --bias-correction, --smoothquant, --outlier-channels, accuracy targets and "
                         "--save-plan apply to static quantization (accuracy targets also to --bits 4 weight-only)",
                         hint="pass --calibration-data (and drop --mode dynamic/weight-only)")


def _config(mode, calibration_data, method, percentile, per_channel, activations, exclude, samples, batch_size,
            provider, speed_check, latency_batch, bits, block_size) -> QuantizeConfig:
    chosen = mode or ("static" if calibration_data else "dynamic")
    if chosen == "static" and calibration_data is None:
        raise UsageError("--mode static needs --calibration-data",
                         hint="pass an .npz of real inputs, or use --mode dynamic")
    provider_chain(provider)  # fail before any work when the provider is missing
    return QuantizeConfig(mode=chosen, method=method, percentile=percentile, per_channel=per_channel,
                          activations=activations, exclude=tuple(exclude), samples=samples, batch_size=batch_size,
                          provider=provider, speed_check=speed_check, latency_batch=latency_batch, bits=bits,
                          block_size=block_size)
