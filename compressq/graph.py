"""The one place that knows protobuf: loading and saving models safely, and a graph index.

Every command reads models through `load_model` and writes them through `save_model`, so the safety
rules live here once: external data may not point outside the model's folder, outputs are written to a
temporary file and renamed, an input file is never overwritten, and models over protobuf's 2 GB limit
are saved with external data.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections import defaultdict
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
from google.protobuf.message import DecodeError
from onnx import numpy_helper

from compressq import __version__
from compressq.errors import ModelError, OutputError

PROTOBUF_LIMIT = 2**31 - 1
# Leave headroom under the hard limit: serialisation adds framing that ByteSize() does not count.
EXTERNAL_DATA_THRESHOLD = int(1.8 * 2**30)
METADATA_PREFIX = "compressq."


# ---------------------------------------------------------------------------------------------------
# Loading


def load_model(path: str | os.PathLike, *, check: bool = True) -> onnx.ModelProto:
    """Read a model and its external data, refusing anything that is not a safe, valid ONNX file."""
    model_path = _existing_model_file(Path(path))
    model = _parse_model(model_path)
    _refuse_unsafe_external_data(model, model_path)
    _load_external_data(model, model_path)
    if check:
        check_model(model, model_path)
    return model


def _existing_model_file(path: Path) -> Path:
    if not path.exists():
        raise ModelError(f"model file not found: {path}", hint="check the path and the current directory")
    if path.is_dir():
        onnx_files = sorted(p.name for p in path.glob("*.onnx"))
        hint = f"pass a file inside it: {', '.join(onnx_files[:3])}" if onnx_files else "pass an .onnx file"
        raise ModelError(f"{path} is a directory, not an ONNX model file", hint=hint)
    if path.stat().st_size == 0:
        raise ModelError(f"{path} is empty", hint="re-export the model; the file was probably cut short")
    return path


def _parse_model(path: Path) -> onnx.ModelProto:
    try:
        model = onnx.load(str(path), load_external_data=False)
    except (DecodeError, RuntimeWarning, ValueError, UnicodeDecodeError) as exc:
        raise ModelError(
            f"{path} is not a readable ONNX model (protobuf could not be parsed: {_first_line(exc)})",
            hint="the file may be truncated or not an .onnx file; re-export or re-download it",
        ) from exc
    # Arbitrary bytes sometimes parse as a protobuf with only unknown fields; a real model has a graph.
    if model.ir_version == 0 or not model.HasField("graph") or not model.opset_import:
        raise ModelError(
            f"{path} is not an ONNX model (no IR version, graph or opset found)",
            hint="pass a file written by an ONNX exporter (torch.onnx, tf2onnx, paddle2onnx, ...)",
        )
    return model


def _refuse_unsafe_external_data(model: onnx.ModelProto, model_path: Path) -> None:
    base = model_path.parent.resolve()
    for tensor in iter_tensors(model.graph):
        if tensor.data_location != onnx.TensorProto.EXTERNAL:
            continue
        location = _external_location(tensor)
        if location is None:
            raise ModelError(f"tensor '{tensor.name}' is stored externally but names no file",
                             hint="re-export the model with its external data")
        if os.path.isabs(location) or Path(location).is_absolute():
            raise ModelError(
                f"tensor '{tensor.name}' points at an absolute external data path '{location}'; refused",
                hint="external data must sit next to the model; re-save it with a relative location",
            )
        resolved = (base / location).resolve()
        if base != resolved and base not in resolved.parents:
            raise ModelError(
                f"tensor '{tensor.name}' points at '{location}', outside the model's folder; refused",
                hint="a model may only read external data from its own folder",
            )


def _load_external_data(model: onnx.ModelProto, model_path: Path) -> None:
    if not any(t.data_location == onnx.TensorProto.EXTERNAL for t in iter_tensors(model.graph)):
        return
    try:
        onnx.external_data_helper.load_external_data_for_model(model, str(model_path.parent))
    except (OSError, ValueError, onnx.checker.ValidationError) as exc:
        raise ModelError(
            f"cannot read the external data of {model_path.name}: {_first_line(exc)}",
            hint="keep the model's .data files next to it, with the names the model records",
        ) from exc


def _external_location(tensor: onnx.TensorProto) -> str | None:
    for entry in tensor.external_data:
        if entry.key == "location":
            return entry.value
    return None


def check_model(model: onnx.ModelProto, model_path: Path | None = None) -> None:
    """Run onnx.checker; a model too big for an in-memory check is checked from its path."""
    try:
        if model.ByteSize() > EXTERNAL_DATA_THRESHOLD and model_path is not None:
            onnx.checker.check_model(str(model_path))
        else:
            onnx.checker.check_model(model)
    except (onnx.checker.ValidationError, ValueError) as exc:
        name = model_path.name if model_path else "the model"
        raise ModelError(
            f"{name} fails the ONNX checker: {_first_line(exc)}",
            hint="fix or re-export the model (run onnx.checker.check_model on it to see the details)",
        ) from exc


def iter_tensors(graph: onnx.GraphProto) -> Iterator[onnx.TensorProto]:
    """Every tensor stored in a graph: initializers, Constant values, and those of subgraphs."""
    yield from graph.initializer
    for node in graph.node:
        for attribute in node.attribute:
            if attribute.HasField("t"):
                yield attribute.t
            yield from attribute.tensors
            if attribute.HasField("g"):
                yield from iter_tensors(attribute.g)
            for subgraph in attribute.graphs:
                yield from iter_tensors(subgraph)


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip() or type(exc).__name__
    return text.splitlines()[0][:300]


# ---------------------------------------------------------------------------------------------------
# Saving


def save_model(
    model: onnx.ModelProto,
    path: str | os.PathLike,
    *,
    protect: Iterable[str | os.PathLike] = (),
    overwrite: bool = True,
) -> Path:
    """Write `model` atomically; models near protobuf's limit get their weights in `NAME.data`.

    `protect` lists input files that must never be replaced (the output path may not be one of them).
    """
    target = check_output_path(path, protect, overwrite=overwrite)
    folder = target.parent
    needs_external = model.ByteSize() > EXTERNAL_DATA_THRESHOLD
    staging = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=folder))
    try:
        staged = staging / target.name
        data_name = f"{target.name}.data"
        if needs_external:
            # onnx.save_model moves the weights out of the proto it is given: hand it a copy, not the caller's.
            detached = onnx.ModelProto()
            detached.CopyFrom(model)
            onnx.save_model(detached, str(staged), save_as_external_data=True, all_tensors_to_one_file=True,
                            location=data_name, size_threshold=1024)
            os.replace(staging / data_name, folder / data_name)
        else:
            onnx.save_model(model, str(staged))
        os.replace(staged, target)
    except OSError as exc:
        raise OutputError(f"cannot write {target}: {exc.strerror or exc}",
                          hint="check free disk space and permissions") from exc
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return target


def check_output_path(path: str | os.PathLike, protect: Iterable[str | os.PathLike] = (), *,
                      overwrite: bool = True) -> Path:
    """Refuse an output path before any work is done on it (commands call this first, save_model again)."""
    target = Path(path)
    _refuse_to_replace_inputs(target, protect)
    if target.exists() and not overwrite:
        raise OutputError(f"{target} already exists", hint="pass another -o path or remove the file")
    if target.is_dir():
        raise OutputError(f"{target} is a directory", hint="pass a file path such as model.int8.onnx")
    if not target.parent.exists():
        raise OutputError(f"output folder {target.parent} does not exist", hint="create it first")
    return target


def _refuse_to_replace_inputs(target: Path, protect: Iterable[str | os.PathLike]) -> None:
    resolved = target.resolve()
    for protected in protect:
        protected_path = Path(protected).resolve()
        data_path = protected_path.with_name(protected_path.name + ".data")
        if resolved in (protected_path, data_path):
            raise OutputError(f"refusing to overwrite the input file {target}",
                              hint="pass a different output path with -o")


def default_output_path(model_path: str | os.PathLike, suffix: str) -> Path:
    """`model.onnx` -> `model.<suffix>.onnx`, next to the input."""
    source = Path(model_path)
    stem = source.name[: -len(".onnx")] if source.name.endswith(".onnx") else source.name
    return source.with_name(f"{stem}.{suffix}.onnx")


def stamp(model: onnx.ModelProto, command: str, settings: dict) -> None:
    """Record what compressq did in the model's metadata (replaces an earlier stamp of ours)."""
    entries = {
        "version": __version__,
        "command": command,
        "settings": json.dumps(settings, sort_keys=True, default=str),
    }
    kept = [p for p in model.metadata_props if not p.key.startswith(METADATA_PREFIX)]
    del model.metadata_props[:]
    model.metadata_props.extend(kept)
    for key, value in entries.items():
        model.metadata_props.add(key=METADATA_PREFIX + key, value=value)


def read_stamp(model: onnx.ModelProto) -> dict[str, str]:
    return {p.key[len(METADATA_PREFIX):]: p.value for p in model.metadata_props
            if p.key.startswith(METADATA_PREFIX)}


def file_size(path: str | os.PathLike) -> int:
    """Bytes on disk of a model including the external data files it references."""
    model_path = Path(path)
    total = model_path.stat().st_size
    model = onnx.load(str(model_path), load_external_data=False)
    locations = {_external_location(t) for t in iter_tensors(model.graph)
                 if t.data_location == onnx.TensorProto.EXTERNAL}
    for location in locations - {None}:
        side_file = model_path.parent / location
        if side_file.exists():
            total += side_file.stat().st_size
    return total


# ---------------------------------------------------------------------------------------------------
# Reading graphs


class GraphIndex:
    """Producers, consumers and constants of one graph, built once and queried by name."""

    def __init__(self, graph: onnx.GraphProto):
        self.graph = graph
        self.initializers: dict[str, onnx.TensorProto] = {t.name: t for t in graph.initializer}
        self.producer: dict[str, onnx.NodeProto] = {}
        self.consumers: dict[str, list[onnx.NodeProto]] = defaultdict(list)
        for node in graph.node:
            for output in node.output:
                if output:
                    self.producer[output] = node
            for name in node.input:
                if name:
                    self.consumers[name].append(node)
        self.graph_inputs = [i.name for i in graph.input if i.name not in self.initializers]
        self.graph_outputs = [o.name for o in graph.output]

    def constant(self, name: str) -> np.ndarray | None:
        """The value of an initializer or a Constant node's output, else None."""
        if name in self.initializers:
            return numpy_helper.to_array(self.initializers[name])
        node = self.producer.get(name)
        if node is not None and node.op_type == "Constant":
            for attribute in node.attribute:
                if attribute.name == "value":
                    return numpy_helper.to_array(attribute.t)
        return None

    def is_constant(self, name: str) -> bool:
        return name in self.initializers or (
            name in self.producer and self.producer[name].op_type == "Constant")

    def single_consumer(self, name: str) -> onnx.NodeProto | None:
        users = self.consumers.get(name, [])
        if len(users) == 1 and name not in self.graph_outputs:
            return users[0]
        return None


def node_attributes(node: onnx.NodeProto) -> dict:
    return {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}


def opset_version(model: onnx.ModelProto, domain: str = "") -> int:
    for entry in model.opset_import:
        if entry.domain in (domain, "ai.onnx" if domain == "" else domain):
            return entry.version
    return 0


def ensure_opset(model: onnx.ModelProto, minimum: int) -> onnx.ModelProto:
    """A copy of `model` at default-domain opset >= `minimum` (converted when older)."""
    if opset_version(model) >= minimum:
        return model
    try:
        return onnx.version_converter.convert_version(model, minimum)
    except Exception as exc:  # the converter raises bare RuntimeErrors for unsupported ops
        raise ModelError(
            f"the model uses opset {opset_version(model)}; converting it to {minimum} failed: "
            f"{_first_line(exc)}",
            hint=f"re-export the model with opset >= {minimum}",
        ) from exc


@dataclass(frozen=True)
class TensorType:
    elem_type: int
    shape: tuple[int | str | None, ...] | None

    @property
    def dtype(self) -> np.dtype | None:
        try:
            return np.dtype(onnx.helper.tensor_dtype_to_np_dtype(self.elem_type))
        except (KeyError, TypeError, ValueError):
            return None


def value_type(value: onnx.ValueInfoProto) -> TensorType:
    tensor = value.type.tensor_type
    if not tensor.HasField("shape"):
        return TensorType(tensor.elem_type, None)
    dims: list[int | str | None] = []
    for dim in tensor.shape.dim:
        if dim.HasField("dim_value"):
            dims.append(dim.dim_value)
        elif dim.HasField("dim_param"):
            dims.append(dim.dim_param)
        else:
            dims.append(None)
    return TensorType(tensor.elem_type, tuple(dims))


def infer_shapes(model: onnx.ModelProto) -> onnx.ModelProto:
    """Shape-inferred copy; falls back to the unannotated model when inference rejects it."""
    try:
        return onnx.shape_inference.infer_shapes(model, strict_mode=False, data_prop=True)
    except Exception:  # shape inference fails on some custom-domain ops; shapes are a nicety there
        return model


def tensor_types(model: onnx.ModelProto) -> dict[str, TensorType]:
    """Element type and shape of every named tensor that shape inference could type."""
    inferred = infer_shapes(model)
    graph = inferred.graph
    types = {v.name: value_type(v) for v in [*graph.input, *graph.value_info, *graph.output]}
    for tensor in graph.initializer:
        types[tensor.name] = TensorType(tensor.data_type, tuple(tensor.dims))
    return types


# ---------------------------------------------------------------------------------------------------
# Editing graphs


class NameGenerator:
    """Fresh tensor/node names that collide with nothing in the graph."""

    def __init__(self, graph: onnx.GraphProto):
        self.taken: set[str] = set()
        for node in graph.node:
            self.taken.update(node.output)
            self.taken.update(node.input)
            self.taken.add(node.name)
        self.taken.update(t.name for t in graph.initializer)
        self.taken.update(v.name for v in [*graph.input, *graph.output, *graph.value_info])

    def __call__(self, base: str) -> str:
        name, counter = base, 1
        while name in self.taken:
            name = f"{base}_{counter}"
            counter += 1
        self.taken.add(name)
        return name


def toposort(graph: onnx.GraphProto) -> None:
    """Reorder graph.node so that every node follows the producers of its inputs (in place)."""
    available = {i.name for i in graph.input} | {t.name for t in graph.initializer} | {""}
    pending = list(graph.node)
    ordered: list[onnx.NodeProto] = []
    while pending:
        still_pending = []
        for node in pending:
            if all(name in available for name in _node_dependencies(node)):
                ordered.append(node)
                available.update(node.output)
            else:
                still_pending.append(node)
        if len(still_pending) == len(pending):
            missing = sorted({n for node in pending for n in _node_dependencies(node)} - available)
            raise ModelError(f"graph has a cycle or dangling inputs: {', '.join(missing[:5])}")
        pending = still_pending
    del graph.node[:]
    graph.node.extend(ordered)


def _node_dependencies(node: onnx.NodeProto) -> list[str]:
    # A subgraph body (If/Loop/Scan) may read tensors of the enclosing graph: those count too.
    names = list(node.input)
    for attribute in node.attribute:
        for subgraph in [attribute.g] if attribute.HasField("g") else list(attribute.graphs):
            produced = {n for sub in subgraph.node for n in sub.output}
            local = produced | {i.name for i in subgraph.input} | {t.name for t in subgraph.initializer}
            names.extend(n for sub in subgraph.node for n in sub.input if n and n not in local)
    return names


def remove_unused(graph: onnx.GraphProto) -> None:
    """Drop nodes, initializers and value_info that no graph output depends on (in place)."""
    needed = {o.name for o in graph.output}
    kept_nodes = []
    for node in reversed(list(graph.node)):
        if any(o in needed for o in node.output):
            kept_nodes.append(node)
            needed.update(_node_dependencies(node))
    kept_nodes.reverse()
    del graph.node[:]
    graph.node.extend(kept_nodes)
    kept_inits = [t for t in graph.initializer if t.name in needed]
    del graph.initializer[:]
    graph.initializer.extend(kept_inits)
    produced = {n for node in graph.node for n in node.output}
    kept_info = [v for v in graph.value_info if v.name in produced]
    del graph.value_info[:]
    graph.value_info.extend(kept_info)
