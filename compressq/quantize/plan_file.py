"""Quantization plans a person can review and a release job can re-apply without measuring.

A plan file holds everything a static quantization decided and everything it measured from data: which
nodes stay float and why, every activation range, the statistics of data-driven rescalings (SmoothQuant,
bias correction), and the speed measurements behind each decision. Re-applied to the same model, it gives
the same bytes without calibration data and without timing anything.

The file is JSON with one fact per line, sorted, so that a pull-request diff shows what changed.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import onnx

from compressq.errors import UsageError
from compressq.io import METADATA_PREFIX
from compressq.stats.collect import TensorRange

PLAN_FORMAT = "compressq-plan"
PLAN_VERSION = 1


@dataclass
class QuantizationPlan:
    model_sha256: str
    settings: dict                                  # QuantizeConfig.to_dict() of the run that made it
    int8_nodes: list[str]
    float_nodes: dict[str, str]                     # node -> why it stays float
    activation_ranges: dict[str, TensorRange]
    smoothquant_absmax: dict[str, np.ndarray] = field(default_factory=dict)
    outlier_absmax: dict[str, np.ndarray] = field(default_factory=dict)   # --outlier-channels' statistics
    bias_means: dict[str, np.ndarray] = field(default_factory=dict)
    decisions: list[dict] = field(default_factory=list)   # {"step", "speedup", "kept", "how"}

    @property
    def scales_digest(self) -> str:
        """sha256 over every range and rescaling statistic: equal digests quantize identically."""
        digest = hashlib.sha256()
        for name in sorted(self.activation_ranges):
            value = self.activation_ranges[name]
            digest.update(f"{name}:{value.low!r}:{value.high!r}:{value.finite}\n".encode())
        for label, table in (("smooth", self.smoothquant_absmax), ("bias", self.bias_means),
                             ("outliers", self.outlier_absmax)):
            for name in sorted(table):
                digest.update(f"{label}:{name}:{table[name].dtype}:".encode())
                digest.update(np.ascontiguousarray(table[name]).tobytes())
        return digest.hexdigest()

    def metadata(self) -> dict:
        """What the output model records of its plan: small, and the same bytes for the same decisions."""
        return {
            "format": f"{PLAN_FORMAT}/{PLAN_VERSION}",
            "model_sha256": self.model_sha256,
            "method": self.settings.get("method"),
            "int8_nodes": self.int8_nodes,
            "scales_sha256": self.scales_digest,
            "float_nodes": self.float_nodes,
            # How, not the numbers: timings differ by a percent between runs, and the same decisions must
            # give the same bytes. The numbers are in the plan file (--save-plan) and in --json.
            "decided_by": _decided_by(self.settings),
        }

    def to_json(self) -> str:
        document = {
            "format": PLAN_FORMAT,
            "version": PLAN_VERSION,
            "model_sha256": self.model_sha256,
            "scales_sha256": self.scales_digest,
            "settings": self.settings,
            "decisions": self.decisions,
            "int8_nodes": self.int8_nodes,
            "float_nodes": self.float_nodes,
            "activation_ranges": {name: ([r.low, r.high] if r.finite else "non-finite")
                                  for name, r in self.activation_ranges.items()},
            "smoothquant_absmax": _arrays_out(self.smoothquant_absmax),
            "outlier_absmax": _arrays_out(self.outlier_absmax),
            "bias_means": _arrays_out(self.bias_means),
        }
        return _one_fact_per_line(document) + "\n"


def _decided_by(settings: dict) -> str:
    if not settings.get("speed_check", True):
        return "no speed check (--no-speed-check)"
    threads = settings.get("threads", 1)
    clock = "calling thread's CPU time" if threads == 1 else "process CPU time"
    return (f"speed check: {clock}, {threads} thread(s), batch {settings.get('latency_batch', 1)}, "
            f"on {settings.get('provider', 'cpu')}")


def model_sha256(model: onnx.ModelProto) -> str:
    """A digest of the graph and its weights, piece by piece (works above protobuf's 2 GB limit)."""
    digest = hashlib.sha256()
    graph = model.graph
    for part in (*graph.input, *graph.output, *graph.node):
        digest.update(part.SerializeToString(deterministic=True))
    for tensor in graph.initializer:
        digest.update(tensor.SerializeToString(deterministic=True))
    for opset in model.opset_import:
        digest.update(f"{opset.domain}:{opset.version}".encode())
    return digest.hexdigest()


def read_plan(path: str | os.PathLike) -> QuantizationPlan:
    """A plan written by `--save-plan` (QuantizationPlan.to_json); any other file is a one-line UsageError."""
    source = Path(path)
    try:
        document = json.loads(source.read_text())
    except FileNotFoundError:
        raise UsageError(f"plan file not found: {source}", hint="write one with --save-plan FILE") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise UsageError(f"cannot read plan {source}: {exc}", hint="pass a file written by --save-plan") from None
    if not isinstance(document, dict) or document.get("format") != PLAN_FORMAT:
        raise UsageError(f"{source} is not a compressq plan", hint="pass a file written by --save-plan")
    if document.get("version") != PLAN_VERSION:
        raise UsageError(f"plan {source} has version {document.get('version')!r}; this compressq reads "
                         f"version {PLAN_VERSION}", hint="write the plan again with this compressq's --save-plan")
    try:
        return QuantizationPlan(
            model_sha256=str(document["model_sha256"]),
            settings=dict(document["settings"]),
            int8_nodes=[str(n) for n in document["int8_nodes"]],
            float_nodes={str(k): str(v) for k, v in document["float_nodes"].items()},
            activation_ranges={str(k): _range_in(v) for k, v in document["activation_ranges"].items()},
            smoothquant_absmax=_arrays_in(document.get("smoothquant_absmax", {})),
            outlier_absmax=_arrays_in(document.get("outlier_absmax", {})),
            bias_means=_arrays_in(document.get("bias_means", {})),
            decisions=list(document.get("decisions", [])),
        )
    except (KeyError, TypeError, ValueError, AttributeError) as exc:
        raise UsageError(f"plan {source} is damaged ({type(exc).__name__}: {exc})",
                         hint="write it again with --save-plan; plans are meant to be reviewed, not hand-edited"
                         ) from None


def check_plan_fits(plan: QuantizationPlan, model: onnx.ModelProto, path: str | os.PathLike) -> None:
    actual = model_sha256(model)
    if actual != plan.model_sha256:
        raise UsageError(f"plan {path} was made for another model (sha256 {plan.model_sha256[:12]}, this model "
                         f"{actual[:12]})", hint="make a new plan for this model with --save-plan")
    if plan.settings.get("mode") != "static":
        raise UsageError(f"plan {path} is for mode {plan.settings.get('mode')!r}; plans pin static quantization",
                         hint="make the plan with --mode static --calibration-data DATA --save-plan FILE")


def _range_in(value) -> TensorRange:
    if value == "non-finite":
        return TensorRange(0.0, 0.0, finite=False)
    low, high = value
    return TensorRange(float(low), float(high))


def _arrays_out(table: dict[str, np.ndarray]) -> dict:
    return {name: {"dtype": str(values.dtype), "shape": list(values.shape),
                   "values": [float(v) for v in values.reshape(-1)]} for name, values in table.items()}


def _arrays_in(table: dict) -> dict[str, np.ndarray]:
    return {str(name): np.asarray(entry["values"], dtype=np.dtype(entry["dtype"])).reshape(entry["shape"])
            for name, entry in table.items()}


def _one_fact_per_line(document: dict) -> str:
    """JSON with each dict entry on its own line and short lists kept on one line (readable diffs)."""
    def render(value, indent: int) -> str:
        if isinstance(value, dict) and value and not _is_array_entry(value):
            pad = "  " * (indent + 1)
            items = [f"{pad}{json.dumps(str(k))}: {render(v, indent + 1)}" for k, v in value.items()]
            return "{\n" + ",\n".join(items) + "\n" + "  " * indent + "}"
        if isinstance(value, list) and value and isinstance(value[0], dict):
            pad = "  " * (indent + 1)
            return "[\n" + ",\n".join(pad + render(v, indent + 1) for v in value) + "\n" + "  " * indent + "]"
        if isinstance(value, list) and value and isinstance(value[0], str):
            pad = "  " * (indent + 1)
            return "[\n" + ",\n".join(pad + json.dumps(v) for v in value) + "\n" + "  " * indent + "]"
        return json.dumps(value, sort_keys=True)
    return render(document, 0)


def _is_array_entry(value: dict) -> bool:
    return set(value) == {"dtype", "shape", "values"} or set(value) <= {"step", "speedup", "kept", "how", "ratio_q1",
                                                                          "ratio_q3"}


def record_plan(model: onnx.ModelProto, plan: QuantizationPlan) -> None:
    """Write the plan's summary into the model's metadata (after `stamp`, which clears our old entries)."""
    key = f"{METADATA_PREFIX}plan"
    kept = [p for p in model.metadata_props if p.key != key]
    del model.metadata_props[:]
    model.metadata_props.extend(kept)
    model.metadata_props.add(key=key, value=json.dumps(plan.metadata(), sort_keys=True))
