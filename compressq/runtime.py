"""onnxruntime sessions: providers, threads, intermediate outputs and the optimizer's view of a graph.

onnxruntime never resolves an external data location on its own: a ModelProto must hold all its weights
(compressq.io.load_model reads them), and a model file is checked by compressq.io before its path is handed
over. A caller's ModelProto is never modified.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Iterable
from pathlib import Path

import onnx
import onnxruntime as ort

from compressq import io as model_io
from compressq.errors import ModelError, ProviderError

PROVIDER_NAMES = {
    "cpu": "CPUExecutionProvider",
    "cuda": "CUDAExecutionProvider",
    "tensorrt": "TensorrtExecutionProvider",
    "dml": "DmlExecutionProvider",
}

_ORT_STATE = ort.capi.onnxruntime_pybind11_state
ORT_ERRORS: tuple[type[Exception], ...] = tuple(
    getattr(_ORT_STATE, name) for name in
    ("Fail", "InvalidGraph", "InvalidArgument", "InvalidProtobuf", "NotImplemented", "NoSuchFile",
     "RuntimeException", "EPFail") if hasattr(_ORT_STATE, name))

# A ModelProto with more weights than this is handed to onnxruntime as a file with its weights in external
# data: onnxruntime maps that file instead of parsing a serialized copy and then copying every tensor out
# of it. Measured on MiniLM (86 MB): +52 MB resident after opening (+86 MB at the peak) against +212 MB
# (+261 MB) from serialized bytes; PP-OCR captcha recognizer: +67 (+99) against +141 (+173).
STAGE_ON_DISK_BYTES = 4 * 2**20

AS_WRITTEN = ort.GraphOptimizationLevel.ORT_DISABLE_ALL  # a graph run node by node, nothing fused

ort.set_default_logger_severity(3)  # onnxruntime's own warnings would drown our one-line messages


def provider_chain(provider: str) -> list[str]:
    """onnxruntime providers for a user-facing name, with CPU as the fallback for unsupported ops."""
    key = provider.lower()
    if key not in PROVIDER_NAMES:
        raise ProviderError(f"unknown provider '{provider}'", hint=f"use one of: {', '.join(PROVIDER_NAMES)}")
    name = PROVIDER_NAMES[key]
    available = ort.get_available_providers()
    if name not in available:
        hint = ("on a machine with an NVIDIA GPU, swap onnxruntime for onnxruntime-gpu: pip uninstall -y "
                "onnxruntime && pip install onnxruntime-gpu (from a clone: pip install -e '.[gpu]')"
                ) if key == "cuda" else f"available: {', '.join(available)}"
        raise ProviderError(f"{name} is not available in this onnxruntime build", hint=hint)
    return [name] if name == "CPUExecutionProvider" else [name, "CPUExecutionProvider"]


def session_options(threads: int | None = None, optimized_path: str | None = None,
                    level: ort.GraphOptimizationLevel = ort.GraphOptimizationLevel.ORT_ENABLE_ALL,
                    spinning: bool = True) -> ort.SessionOptions:
    options = ort.SessionOptions()
    if not spinning:  # idle pool threads sleep instead of burning CPU: process CPU time then counts work only
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
        options.add_session_config_entry("session.inter_op.allow_spinning", "0")
    options.graph_optimization_level = level
    options.log_severity_level = 3
    if threads:
        options.intra_op_num_threads = threads
        options.inter_op_num_threads = 1
    if optimized_path:
        options.optimized_model_filepath = optimized_path
    return options


def create_session(model: onnx.ModelProto | str | os.PathLike, provider: str = "cpu",
                   threads: int | None = None, *, optimized_path: str | None = None,
                   level: ort.GraphOptimizationLevel = ort.GraphOptimizationLevel.ORT_ENABLE_ALL,
                   spinning: bool = True) -> ort.InferenceSession:
    """An InferenceSession for a ModelProto or a path; a model with more than STAGE_ON_DISK_BYTES of weights
    is staged on disk first (external data: onnxruntime maps it instead of copying it, and above 2 GB a proto
    cannot be serialized at all).

    A ModelProto that still points at external data is refused (onnxruntime would resolve the location
    against the current directory); a path is checked like load_model checks it before onnxruntime reads it.
    """
    providers = provider_chain(provider)
    options = session_options(threads, optimized_path, level, spinning)
    if isinstance(model, onnx.ModelProto):
        model_io.refuse_external_references(model)
    else:
        model = model_io.check_model_file(model)
    staged = isinstance(model, onnx.ModelProto) and \
        model_io.tensor_payload(model) > min(STAGE_ON_DISK_BYTES, model_io.EXTERNAL_DATA_THRESHOLD)
    if optimized_path and (staged or not isinstance(model, onnx.ModelProto)):
        # Weights read from a .data file would otherwise stay references to it in the optimized model, and
        # that file may be a temporary one (or in another folder): write them next to the optimized model.
        options.add_session_config_entry("session.optimized_model_external_initializers_file_name",
                                         Path(optimized_path).name + ".data")
        options.add_session_config_entry("session.optimized_model_external_initializers_min_size_in_bytes",
                                         str(model_io.EXTERNAL_TENSOR_BYTES))
    try:
        if isinstance(model, onnx.ModelProto):
            if staged:
                return _session_via_disk(model, options, providers)
            return ort.InferenceSession(model.SerializeToString(), options, providers=providers)
        return ort.InferenceSession(str(model), options, providers=providers)
    except ORT_ERRORS as exc:
        raise ModelError(f"onnxruntime cannot load the model: {str(exc).splitlines()[0][:300]}",
                         hint="the graph may use an op or opset this onnxruntime version lacks") from exc


def _session_via_disk(model: onnx.ModelProto, options: ort.SessionOptions,
                      providers: list[str]) -> ort.InferenceSession:
    # The caller's proto is written as it is, not converted: onnx.save_model(save_as_external_data=True)
    # would repoint the caller's initializers at this temporary folder (issue 16).
    with tempfile.TemporaryDirectory(prefix="compressq-session-") as folder:
        path = Path(folder) / "model.onnx"
        model_io.write_with_external_data(model, path, "model.onnx.data")
        return ort.InferenceSession(str(path), options, providers=providers)


def with_outputs(model: onnx.ModelProto, names: Iterable[str]) -> onnx.ModelProto:
    """A copy of `model` that also returns the named intermediate tensors (no copy of weights is kept
    by the caller: the session owns the serialized graph)."""
    exposed = onnx.ModelProto()
    exposed.CopyFrom(model)
    present = {o.name for o in exposed.graph.output}
    for name in names:
        if name not in present:
            exposed.graph.output.append(onnx.ValueInfoProto(name=name))
            present.add(name)
    return exposed


def optimized_graph(model: onnx.ModelProto, provider: str = "cpu", *, basic: bool = False,
                    weights: bool = True) -> onnx.ModelProto:
    """The graph onnxruntime actually runs after its optimizer fused what it could (for `provider`); with
    `basic`, only the provider-independent clean-ups (constant folding, redundant nodes, BatchNorm folding).
    With `weights=False` the large initializers are left out (names, types and dims kept): enough to read
    which nodes were fused, without loading a copy of the weights."""
    level = ort.GraphOptimizationLevel.ORT_ENABLE_BASIC if basic else ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    with tempfile.TemporaryDirectory(prefix="compressq-optimized-") as folder:
        path = os.path.join(folder, "optimized.onnx")
        create_session(model, provider, threads=1, optimized_path=path, level=level)
        optimized = onnx.load(path, load_external_data=weights)
    if not weights:
        for tensor in optimized.graph.initializer:  # the folder is gone: no reference may point into it
            if tensor.data_location == onnx.TensorProto.EXTERNAL:
                del tensor.external_data[:]
                tensor.data_location = onnx.TensorProto.DEFAULT
    return optimized
