"""Options of `compressq quantize`, as one frozen value built by the CLI and passed down whole."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

from compressq.errors import UsageError

MODES = ("static", "dynamic", "weight-only")
METHODS = ("minmax", "percentile", "entropy", "mse", "auto")
ACTIVATION_TYPES = ("uint8", "int8")
RECOVERY_SEARCHES = ("bisect", "one-by-one")
WEIGHT_RECONSTRUCTIONS = ("none", "gptq")


@dataclass(frozen=True)
class QuantizeConfig:
    mode: str = "static"              # static | dynamic | weight-only
    method: str = "minmax"            # minmax | percentile | entropy | mse | auto (per tensor, by error caused)
    percentile: float = 99.999
    per_channel: bool = True
    activations: str = "uint8"        # uint8 (asymmetric) | int8 (symmetric)
    exclude: tuple[str, ...] = ()     # glob patterns on node names, op types or weight names
    samples: int | None = None        # calibration samples to use (None: all)
    batch_size: int = 8
    provider: str = "cpu"
    speed_check: bool = True          # time the output against the input and undo what costs time
    latency_batch: int = 1            # batch size the speed check times at (the user's serving batch)
    threads: int = 1                  # intra-op threads the speed check decides for (the user's serving threads)
    quantize_depthwise: bool = True   # the speed check returns them to float where they cost time
    bias_correction: bool = False     # subtract each layer's measured mean output shift from its bias
    equalize: bool = False            # cross-layer equalization before quantizing (CNNs)
    smoothquant: float | None = None  # SmoothQuant migration strength alpha (transformers)
    outlier_channels: int | None = None  # at most this many outlier channels per activation go around int8
    max_drop: float | None = None     # accuracy target: top-1 drop in points on evaluation data
    min_agreement: float | None = None  # accuracy target: share of samples whose prediction matches fp32
    min_cosine: float | None = None   # accuracy target: the worst task output's cosine to fp32
    bits: int = 8                     # weight-only mode: 4 or 8
    block_size: int = 32              # weight-only mode
    task_outputs: tuple[str, ...] = ()  # outputs that carry the task (empty: chosen by measure.task's rule)
    accuracy_check: bool = True       # measure what int8 cost against fp32 after quantizing
    recovery: str = "bisect"          # accuracy target search: bisect (one-pass errors) | one-by-one
    weight_reconstruction: str = "none"  # none (round to nearest) | gptq (codes by error feedback, per layer)

    def __post_init__(self) -> None:
        _one_of("--mode", self.mode, MODES)
        _one_of("--method", self.method, METHODS)
        _one_of("--activations", self.activations, ACTIVATION_TYPES)
        _one_of("--recovery", self.recovery, RECOVERY_SEARCHES)
        _one_of("--weight-reconstruction", self.weight_reconstruction, WEIGHT_RECONSTRUCTIONS)
        if self.weight_reconstruction != "none" and self.mode == "dynamic":
            raise UsageError("--weight-reconstruction needs calibration data: it applies to static and "
                             "weight-only modes", hint="pass --calibration-data, or drop --weight-reconstruction")
        _finite_in("--percentile", self.percentile, 0.0, 100.0, low_open=True)
        _finite_in("--max-drop", self.max_drop, 0.0, 100.0)
        _finite_in("--min-agreement", self.min_agreement, 0.0, 1.0)
        _finite_in("--min-cosine", self.min_cosine, -1.0, 1.0)
        _finite_in("--smoothquant", self.smoothquant, 0.0, 1.0)
        for option, value in (("--samples", self.samples), ("--batch-size", self.batch_size),
                              ("--latency-batch", self.latency_batch), ("--threads", self.threads),
                              ("--block-size", self.block_size), ("--outlier-channels", self.outlier_channels)):
            if value is not None and (not isinstance(value, int) or value < 1):
                raise UsageError(f"{option} must be a whole number >= 1, got {value!r}")
        if self.mode == "weight-only" and self.bits not in (4, 8):
            raise UsageError(f"--bits must be 4 or 8, got {self.bits!r}")

    def to_dict(self) -> dict:
        return asdict(self)


def _one_of(option: str, value: str, allowed: tuple[str, ...]) -> None:
    if value not in allowed:
        raise UsageError(f"unknown {option} '{value}'", hint=f"use one of: {', '.join(allowed)}")


def _finite_in(option: str, value: float | None, low: float, high: float, low_open: bool = False) -> None:
    if value is None:
        return
    if not isinstance(value, (int, float)) or not math.isfinite(value):
        raise UsageError(f"{option} must be a finite number, got {value!r}")
    if value > high or value < low or (low_open and value == low):
        bracket = "(" if low_open else "["
        raise UsageError(f"{option} must be in {bracket}{low:g}, {high:g}], got {value:g}")
