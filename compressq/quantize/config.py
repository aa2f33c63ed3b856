"""Options of `compressq quantize`, as one frozen value built by the CLI and passed down whole."""

from __future__ import annotations

from dataclasses import asdict, dataclass


@dataclass(frozen=True)
class QuantizeConfig:
    mode: str = "static"              # static | dynamic | weight-only
    method: str = "minmax"            # minmax | percentile | entropy | mse
    percentile: float = 99.999
    per_channel: bool = True
    activations: str = "uint8"        # uint8 (asymmetric) | int8 (symmetric)
    exclude: tuple[str, ...] = ()     # glob patterns on node names or op types
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
    max_drop: float | None = None     # accuracy target: top-1 drop in points on evaluation data
    min_agreement: float | None = None  # accuracy target: share of samples whose prediction matches fp32
    bits: int = 8                     # weight-only mode: 4 or 8
    block_size: int = 32              # weight-only mode
    task_outputs: tuple[str, ...] = ()  # outputs that carry the task (empty: chosen by measure.task's rule)
    accuracy_check: bool = True       # measure what int8 cost against fp32 after quantizing

    def to_dict(self) -> dict:
        return asdict(self)
