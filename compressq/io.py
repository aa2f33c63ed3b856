"""Safe model I/O: the one place that reads and writes ONNX files.

Loading: every tensor a model can carry is found by one walk (`model_tensors`); each external location
is resolved against the model's folder and checked (relative, no `..`, no NUL byte, no symlink leaving
the folder, a regular file, offset and length inside it), and only then read into the proto. Nothing
else ever resolves a location: a loaded model points nowhere.

Saving: outputs are staged next to the target and renamed over it; a target that exists and is not a
regular file (a device, a pipe, a socket) is refused, a symlink is written where it points, an input file
is never replaced, and models near protobuf's 2 GB limit get their weights in `NAME.data`. A proto handed
in is never modified.
"""

from __future__ import annotations

import atexit
import contextlib
import functools
import hashlib
import json
import os
import re
import shutil
import socket
import stat
import tempfile
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

import numpy as np
import onnx
from google.protobuf.message import DecodeError
from onnx import numpy_helper

from compressq import __version__
from compressq.errors import ModelError, OutputError
from compressq.graph.index import all_nodes, scopes
from compressq.ops import WEIGHT_INPUTS

PROTOBUF_LIMIT = 2**31 - 1
# Leave headroom under the hard limit: serialisation adds framing that ByteSize() does not count.
EXTERNAL_DATA_THRESHOLD = int(1.8 * 2**30)
# A proto in memory (no file behind it: a model a command made) with more tensor bytes than this is checked as a
# skeleton: checking it whole serializes it and the checker parses that copy (BERT-6's int8 result: +350 MB).
IN_MEMORY_CHECK_LIMIT = 64 * 2**20
METADATA_PREFIX = "compressq."
# Tensors at least this big go to the .data file when a model is written with external data.
EXTERNAL_TENSOR_BYTES = 1024
# Staging folders are `.NAME.compressq-PID-xxxxxxxx`: a later run can tell its own leftovers apart.
STAGING_MARK = "compressq-"


# ---------------------------------------------------------------------------------------------------
# Every tensor a model carries


@dataclass(frozen=True)
class StoredTensor:
    """A tensor stored in a model, with where it sits in words (for messages)."""

    tensor: onnx.TensorProto
    where: str

    @property
    def label(self) -> str:
        return f"tensor '{self.tensor.name}' ({self.where})" if self.tensor.name else f"a tensor ({self.where})"


def model_tensors(model: onnx.ModelProto) -> Iterator[StoredTensor]:
    """Every TensorProto of a model: initializers, sparse initializers (values and indices), tensors in
    node attributes (Constant, ConstantOfShape, ...), in subgraphs, in functions and in training info."""
    yield from _graph_tensors(model.graph, "")
    for function in model.functions:
        yield from _nodes_tensors(function.node, f" in function '{function.name}'")
    for number, info in enumerate(model.training_info):
        yield from _graph_tensors(info.initialization, f" in training info {number} initialization")
        yield from _graph_tensors(info.algorithm, f" in training info {number} algorithm")


def iter_tensors(graph: onnx.GraphProto) -> Iterator[onnx.TensorProto]:
    """Every tensor stored in a graph and its subgraphs (use `model_tensors` for a whole model)."""
    for stored in _graph_tensors(graph, ""):
        yield stored.tensor


def _graph_tensors(graph: onnx.GraphProto, scope: str) -> Iterator[StoredTensor]:
    for tensor in graph.initializer:
        yield StoredTensor(tensor, f"initializer{scope}")
    for sparse in graph.sparse_initializer:
        yield StoredTensor(sparse.values, f"sparse initializer values{scope}")
        yield StoredTensor(sparse.indices, f"sparse initializer indices{scope}")
    yield from _nodes_tensors(graph.node, scope)


def _nodes_tensors(nodes: Iterable[onnx.NodeProto], scope: str) -> Iterator[StoredTensor]:
    for node in nodes:
        for attribute in node.attribute:
            where = f"attribute '{attribute.name}' of {node.op_type} node '{node.name}'{scope}"
            if attribute.HasField("t"):
                yield StoredTensor(attribute.t, where)
            for tensor in attribute.tensors:
                yield StoredTensor(tensor, where)
            sparse_tensors = [attribute.sparse_tensor] if attribute.HasField("sparse_tensor") else []
            for sparse in [*sparse_tensors, *attribute.sparse_tensors]:
                yield StoredTensor(sparse.values, f"sparse values of {where}")
                yield StoredTensor(sparse.indices, f"sparse indices of {where}")
            subgraphs = [attribute.g] if attribute.HasField("g") else []
            for subgraph in [*subgraphs, *attribute.graphs]:
                yield from _graph_tensors(subgraph, f" in a subgraph of node '{node.name}'{scope}")


def is_external(tensor: onnx.TensorProto) -> bool:
    return tensor.data_location == onnx.TensorProto.EXTERNAL


def external_tensors(model: onnx.ModelProto) -> list[StoredTensor]:
    return [stored for stored in model_tensors(model) if is_external(stored.tensor)]


def _external_entries(tensor: onnx.TensorProto) -> dict[str, str]:
    return {entry.key: entry.value for entry in tensor.external_data}


# ---------------------------------------------------------------------------------------------------
# Loading


def load_model(path: str | os.PathLike, *, check: bool = True, read_weights: bool = True) -> onnx.ModelProto:
    """Read a model and its external data, refusing anything that is not a safe, valid ONNX file.

    The returned proto holds all its weights: no tensor still points at a file. With `read_weights=False`
    the external data is checked but not read (a 7B model's summary needs no 28 GB in memory): its tensors
    become *mapped* (they point at their checked files by absolute path, see `is_mapped`), read one at a time
    with `tensor_array` or `tensor_chunks`, streamed by `save_model`; such a proto never runs as it is
    (`with_weights_read` makes a copy that does).
    """
    model_path = _existing_model_file(Path(path))
    # A file that references no external data is checked from disk before Python parses it: the checker's copy
    # and Python's are then never held at once (a 252 MB BERT loaded at 830 MB peak, checked in memory).
    checked_first = check and not _mentions(model_path, b"location") and _passes_checker(model_path)
    model = _parse_model(model_path)
    pieces = check_external_data(model, model_path)
    # onnx's checker cannot parse sparse tensors stored externally ("Cannot parse data from external tensors"):
    # such a model is read whole and checked in memory
    sparse = any("sparse" in piece.stored.where for piece in pieces)
    if read_weights or sparse:
        _read_external_data(pieces)
    if check and not checked_first:
        # With external data the file on disk is checked: checking the proto in memory serializes it, and the
        # checker parses that copy again (load peaked at 3x the weights, measured on the 0.5 GB decoder)
        check_model(model, model_path, from_path=bool(pieces) and not sparse)
    if not (read_weights or sparse):
        _map_external_data(pieces)
    from compressq.graph.normalize import normalize_at_load  # the one import step every command's model goes through

    return normalize_at_load(model, model_path)


def check_model_file(path: str | os.PathLike) -> Path:
    """Check a model file's external data without loading it (before a session is made from the path)."""
    model_path = _existing_model_file(Path(path))
    check_external_data(_parse_model(model_path), model_path)
    return model_path


def _existing_model_file(path: Path) -> Path:
    if "\x00" in str(path):
        raise ModelError("the model path contains a NUL byte", hint="pass a plain file path")
    if path.is_symlink() and not path.exists():
        raise ModelError(f"{path} is a symlink to nothing (a loop, or its target is gone)",
                         hint="point the link at the model file, or pass the file itself")
    if not path.exists():
        raise ModelError(f"model file not found: {path}", hint="check the path and the current directory")
    if path.is_dir():
        onnx_files = sorted(p.name for p in path.glob("*.onnx"))
        hint = f"pass a file inside it: {', '.join(onnx_files[:3])}" if onnx_files else "pass an .onnx file"
        raise ModelError(f"{path} is a directory, not an ONNX model file", hint=hint)
    if not path.is_file():
        raise ModelError(f"{path} is not a regular file", hint="pass an .onnx file, not a device or a pipe")
    if path.stat().st_size == 0:
        raise ModelError(f"{path} is empty", hint="re-export the model; the file was probably cut short")
    return path


def _parse_model(path: Path) -> onnx.ModelProto:
    try:
        model = onnx.load(str(path), load_external_data=False)
    except (DecodeError, RuntimeWarning, ValueError, UnicodeDecodeError) as exc:
        raise ModelError(
            f"{path} is not a readable ONNX model (protobuf could not be parsed: {first_line(exc)})",
            hint="the file may be truncated or not an .onnx file; re-export or re-download it",
        ) from exc
    # Arbitrary bytes sometimes parse as a protobuf with only unknown fields; a real model has a graph.
    if model.ir_version == 0 or not model.HasField("graph") or not model.opset_import:
        raise ModelError(
            f"{path} is not an ONNX model (no IR version, graph or opset found)",
            hint="pass a file written by an ONNX exporter (torch.onnx, tf2onnx, paddle2onnx, ...)",
        )
    return model


@dataclass(frozen=True)
class _ExternalPiece:
    stored: StoredTensor
    file: Path
    offset: int
    length: int


_WINDOWS_DRIVE = re.compile(r"^[A-Za-z]:")


def check_external_data(model: onnx.ModelProto, model_path: Path) -> list[_ExternalPiece]:
    """Resolve and check every external location of `model` against its folder; nothing is read."""
    base = model_path.parent.resolve()
    return [_checked_piece(stored, base) for stored in external_tensors(model)]


def _checked_piece(stored: StoredTensor, base: Path) -> _ExternalPiece:
    entries = _external_entries(stored.tensor)
    location = entries.get("location", "")
    label = stored.label
    if not location:
        raise ModelError(f"{label} is stored externally but names no file",
                         hint="re-export the model with its external data")
    shown = location.encode("unicode_escape").decode("ascii")
    if "\x00" in location:
        raise ModelError(f"{label} names an external data path with a NUL byte ('{shown}'); refused",
                         hint="the model file is corrupt or hostile; re-download it from its source")
    if os.path.isabs(location) or location.startswith(("/", "\\")) or _WINDOWS_DRIVE.match(location):
        raise ModelError(f"{label} points at an absolute external data path '{shown}'; refused",
                         hint="external data must sit next to the model; re-save it with a relative location")
    if ".." in re.split(r"[\\/]", location):
        raise ModelError(f"{label} points at '{shown}', outside the model's folder; refused",
                         hint="a model may only read external data from its own folder")
    resolved = (base / location).resolve()
    if base not in resolved.parents:
        raise ModelError(f"{label} points at '{shown}', which leads outside the model's folder; refused",
                         hint="a model may only read external data from its own folder (no symlinks out)")
    if not resolved.exists():
        raise ModelError(f"cannot read the external data of {label}: '{shown}' not found in {base}",
                         hint="keep the model's .data files next to it, with the names the model records")
    if not resolved.is_file():
        raise ModelError(f"{label} points at '{shown}', which is not a regular file; refused",
                         hint="external data must be a plain file next to the model")
    size = resolved.stat().st_size
    try:
        offset = int(entries.get("offset", "0"))
        length = int(entries["length"]) if "length" in entries else size - offset
    except ValueError as exc:
        raise ModelError(f"{label} has a malformed external data offset or length",
                         hint="the model file is corrupt; re-export it") from exc
    if offset < 0 or length < 0 or offset + length > size:
        raise ModelError(
            f"{label} asks for bytes {offset}..{offset + length} of '{shown}', which holds {size} bytes; refused",
            hint="the external data file is truncated or belongs to another model")
    expected = _expected_bytes(stored.tensor)
    if expected is not None and expected != length:
        raise ModelError(f"{label} stores {length} bytes externally but its shape and type need {expected}",
                         hint="the external data file belongs to another version of the model")
    return _ExternalPiece(stored, resolved, offset, length)


def _expected_bytes(tensor: onnx.TensorProto) -> int | None:
    if tensor.data_type in _PACKED_TYPES:
        return None
    try:
        itemsize = np.dtype(onnx.helper.tensor_dtype_to_np_dtype(tensor.data_type)).itemsize
    except (KeyError, TypeError, ValueError):
        return None
    if tensor.data_type == onnx.TensorProto.STRING:
        return None
    return int(np.prod(tensor.dims, dtype=object)) * itemsize if tensor.dims else itemsize


_PACKED_TYPES = {getattr(onnx.TensorProto, name) for name in
                 ("INT4", "UINT4", "FLOAT4E2M1", "INT2", "UINT2") if hasattr(onnx.TensorProto, name)}


def _read_external_data(pieces: list[_ExternalPiece]) -> None:
    for piece in pieces:
        try:
            with open(piece.file, "rb") as handle:
                handle.seek(piece.offset)
                data = handle.read(piece.length)
        except OSError as exc:
            raise ModelError(f"cannot read the external data of {piece.stored.label}: {exc.strerror or exc}",
                             hint="keep the model's .data files next to it, readable") from exc
        if len(data) != piece.length:
            raise ModelError(f"the external data of {piece.stored.label} is shorter than recorded",
                             hint="the .data file changed while it was read; retry")
        tensor = piece.stored.tensor
        tensor.raw_data = data
        del tensor.external_data[:]
        tensor.data_location = onnx.TensorProto.DEFAULT


def tensor_chunks(tensor: onnx.TensorProto, model_path: str | os.PathLike | None = None,
                  chunk_bytes: int = 64 * 2**20) -> Iterator[np.ndarray]:
    """The values of a tensor, flat, a chunk at a time: external data (mapped by `load_model(read_weights=False)`
    or a spill file, so already checked) is read from its file piece by piece, never whole. `model_path` is
    only needed for a tensor that still points at its file by a relative location."""
    if not is_external(tensor) or tensor.data_type in _PACKED_TYPES or tensor.data_type == onnx.TensorProto.STRING:
        if is_external(tensor):
            raise ModelError(f"tensor '{tensor.name}' is stored externally in a packed type; not read in chunks",
                             hint="load the model with its weights")
        yield numpy_helper.to_array(tensor).reshape(-1)
        return
    if is_mapped(tensor):
        file, offset, length = _mapped_location(tensor)
    elif model_path is None:
        raise ModelError(f"tensor '{tensor.name}' points at external data relative to an unknown folder",
                         hint="load the model with compressq's load_model")
    else:
        piece = _checked_piece(StoredTensor(tensor, "initializer"), Path(model_path).parent.resolve())
        file, offset, length = piece.file, piece.offset, piece.length
    dtype = _stored_dtype(tensor)
    step = max(dtype.itemsize, chunk_bytes - chunk_bytes % dtype.itemsize)
    with open(file, "rb") as handle:
        handle.seek(offset)
        for start in range(0, length, step):
            data = handle.read(min(step, length - start))
            yield np.frombuffer(data, dtype=dtype)


# ---------------------------------------------------------------------------------------------------
# Weights kept on disk: mapped tensors, read one at a time, and the spill file rewrites write into
#
# A *mapped* tensor is an external tensor whose location is the absolute path of a file compressq checked at
# load (or wrote itself: a SpillFile), with its offset and length. Only this module reads one: onnx's
# numpy_helper refuses absolute locations, so no other code can read it by mistake from the current folder,
# and no such location is ever written to a file (save_model streams the bytes into the output's .data).


def is_mapped(tensor: onnx.TensorProto) -> bool:
    return is_external(tensor) and os.path.isabs(_external_entries(tensor).get("location", ""))


def holds_mapped_weights(model: onnx.ModelProto) -> bool:
    return any(is_mapped(stored.tensor) for stored in model_tensors(model))


def _map_external_data(pieces: list[_ExternalPiece]) -> None:
    for piece in pieces:
        tensor = piece.stored.tensor
        del tensor.external_data[:]
        for key, value in (("location", str(piece.file)), ("offset", str(piece.offset)),
                           ("length", str(piece.length))):
            tensor.external_data.add(key=key, value=value)


def _mapped_location(tensor: onnx.TensorProto) -> tuple[Path, int, int]:
    entries = _external_entries(tensor)
    return Path(entries["location"]), int(entries.get("offset", "0")), int(entries["length"])


def _stored_dtype(tensor: onnx.TensorProto) -> np.dtype:
    return np.dtype(onnx.helper.tensor_dtype_to_np_dtype(tensor.data_type)).newbyteorder("<")


def tensor_array(tensor: onnx.TensorProto) -> np.ndarray:
    """The value of a tensor, read-only. A mapped tensor is memory-mapped: its pages are read as they are used
    and given back when the array goes, so a rewrite that takes one weight at a time holds one at a time."""
    if not is_mapped(tensor):
        if is_external(tensor):
            raise ModelError(f"tensor '{tensor.name}' points at external data relative to an unknown folder",
                             hint="load the model with compressq's load_model")
        return numpy_helper.to_array(tensor)
    if tensor.data_type in _PACKED_TYPES or tensor.data_type == onnx.TensorProto.STRING:
        return numpy_helper.to_array(_read_copy(tensor))
    file, offset, length = _mapped_location(tensor)
    shape = tuple(int(d) for d in tensor.dims)
    if length == 0:
        return np.zeros(shape, _stored_dtype(tensor))
    if Path(file).stat().st_size < offset + length:  # numpy would say "mmap length is greater than file size"
        raise ModelError(f"the external data of tensor '{tensor.name}' is shorter than recorded",
                         hint="the .data file changed or was cut after the model was loaded; retry")
    return np.asarray(np.memmap(file, dtype=_stored_dtype(tensor), mode="r", offset=offset, shape=shape))


def _read_copy(tensor: onnx.TensorProto) -> onnx.TensorProto:
    copy = onnx.TensorProto()
    copy.CopyFrom(tensor)
    read_mapped_tensor(copy)
    return copy


def read_mapped_tensor(tensor: onnx.TensorProto) -> None:
    """Read a mapped tensor's bytes into it (in place: only on a proto the caller owns)."""
    file, offset, length = _mapped_location(tensor)
    with open(file, "rb") as handle:
        handle.seek(offset)
        data = handle.read(length)
    if len(data) != length:
        raise ModelError(f"the external data of tensor '{tensor.name}' is shorter than recorded",
                         hint="the .data file changed while it was read; retry")
    tensor.raw_data = data
    del tensor.external_data[:]
    tensor.data_location = onnx.TensorProto.DEFAULT


def read_mapped_body_weights(graph: onnx.GraphProto) -> None:
    """Read the mapped initializers of `graph`'s If/Loop/Scan bodies into them, in place (a graph the caller
    owns): graph.edit.share_duplicate_initializers compares bodies' weights by value through onnx, which refuses
    a mapped tensor. Weights in bodies are few; the main graph's stay mapped."""
    for scope in scopes(graph)[1:]:
        for tensor in scope.graph.initializer:
            if is_mapped(tensor):
                read_mapped_tensor(tensor)


def with_weights_read(model: onnx.ModelProto) -> onnx.ModelProto:
    """`model` itself when it holds all its weights, else a copy that does (for onnxruntime sessions and the
    passes that need every weight at once: static calibration, refit, channel pruning)."""
    if not holds_mapped_weights(model):
        return model
    copy = onnx.ModelProto()
    copy.CopyFrom(model)
    for stored in model_tensors(copy):
        if is_mapped(stored.tensor):
            read_mapped_tensor(stored.tensor)
    return copy


class SpillFile:
    """Tensors a rewrite makes, written to disk as they are made and handed back as mapped references, so that
    a model bigger than memory is rewritten with one new tensor in memory at a time. `save_model` copies them
    into the output's .data file. The file is removed when the process ends (a killed run's file is removed by
    the next run that spills into the same folder)."""

    def __init__(self, folder: Path):
        _remove_leftovers(folder, SPILL_PREFIX)
        handle, name = tempfile.mkstemp(prefix=f"{SPILL_PREFIX}{_owner_tag()}-", suffix=".spill", dir=folder)
        self.path = Path(name).resolve()
        self._stream = os.fdopen(handle, "wb")

    def tensor(self, array: np.ndarray, name: str) -> onnx.TensorProto:
        array = np.ascontiguousarray(array, dtype=np.asarray(array).dtype.newbyteorder("<"))
        tensor = onnx.TensorProto(name=name, dims=array.shape,
                                  data_type=onnx.helper.np_dtype_to_tensor_dtype(array.dtype))
        offset = self._stream.tell()
        self._stream.write(array.data)
        self._stream.flush()  # read back through the file system (memory-mapped) before it is closed
        tensor.data_location = onnx.TensorProto.EXTERNAL
        for key, value in (("location", str(self.path)), ("offset", str(offset)), ("length", str(array.nbytes))):
            tensor.external_data.add(key=key, value=value)
        return tensor

    def remove(self) -> None:
        self._stream.close()
        with contextlib.suppress(OSError):
            self.path.unlink()


SPILL_PREFIX = f".{STAGING_MARK}spill-"
_spills: dict[Path, SpillFile] = {}


@atexit.register
def _remove_spills() -> None:
    for spill in _spills.values():
        spill.remove()
    _spills.clear()


SESSIONS_PREFIX = f".{STAGING_MARK}sessions-"


def _remove_leftovers(folder: Path, prefix: str) -> None:
    """Spill files and session folders (`PREFIX<pid>-...`) of runs that were killed (their process is gone)."""
    with contextlib.suppress(OSError):
        for leftover in folder.glob(f"{prefix}*"):
            if not _left_by_a_dead_run(leftover.name[len(prefix):]) or leftover.is_symlink():
                continue
            if leftover.is_dir():
                shutil.rmtree(leftover, ignore_errors=True)
            else:
                with contextlib.suppress(OSError):
                    leftover.unlink()


def _spill_for(model: onnx.ModelProto) -> SpillFile:
    """One spill file per folder and process: next to the model's own external data when that folder is
    writable (the disk that holds a big model has room for its rewrite; /tmp may be memory), else the temp dir."""
    mapped = next(_mapped_location(s.tensor)[0] for s in model_tensors(model) if is_mapped(s.tensor))
    return _spill_for_folder(mapped.parent if os.access(mapped.parent, os.W_OK) else Path(tempfile.gettempdir()))


def _spill_for_folder(folder: Path) -> SpillFile:
    folder = folder.resolve()
    if folder not in _spills:
        _spills[folder] = SpillFile(folder)
    return _spills[folder]


@contextlib.contextmanager
def on_disk(*models: onnx.ModelProto) -> Iterator[list[Path]]:
    """Mapped models as files onnxruntime loads them from (a session made from a proto would need every weight read
    into memory first, then serialized); removed afterwards.

    When every mapped weight lives in one writable folder (the model's .data and this process's spill file), each
    model is written there as a hidden skeleton whose weights point at those files by name: nothing is copied.
    Otherwise the models go to a temporary folder with their weights copied a chunk at a time."""
    files = {_mapped_location(s.tensor)[0] for m in models for s in model_tensors(m) if is_mapped(s.tensor)}
    parent = next(iter(files)).parent
    if len({f.parent for f in files}) == 1 and os.access(parent, os.W_OK):
        with _skeletons_beside_weights(models, parent) as paths:
            yield paths
        return
    parent = parent if os.access(parent, os.W_OK) else Path(tempfile.gettempdir())
    _remove_leftovers(parent, SESSIONS_PREFIX)
    with tempfile.TemporaryDirectory(prefix=f"{SESSIONS_PREFIX}{_owner_tag()}-", dir=parent) as folder:
        paths = []
        for number, model in enumerate(models):
            path = Path(folder) / f"model{number}.onnx"
            write_with_external_data(model, path, f"{path.name}.data")
            paths.append(path)
        yield paths


@contextlib.contextmanager
def _skeletons_beside_weights(models: Sequence[onnx.ModelProto], folder: Path) -> Iterator[list[Path]]:
    _remove_leftovers(folder, SESSIONS_PREFIX)
    paths = [folder / f"{SESSIONS_PREFIX}{_owner_tag()}-{id(model)}-{number}.onnx"
             for number, model in enumerate(models)]
    try:
        for model, path in zip(models, paths):
            skeleton = onnx.ModelProto()
            skeleton.CopyFrom(model)  # mapped tensors are references: the copy holds no weight
            for stored in model_tensors(skeleton):
                if is_mapped(stored.tensor):
                    file, offset, length = _mapped_location(stored.tensor)
                    _point_at(stored.tensor, file.name, offset, length)
            with open(path, "wb") as stream:
                stream.write(skeleton.SerializeToString())
        yield paths
    finally:
        for path in paths:
            with contextlib.suppress(OSError):
                path.unlink()


class TensorSink:
    """Where a rewrite puts the tensors it makes: a model whose weights are mapped gets its big new tensors
    spilled to disk at once (and held as mapped references); a model in memory gets them in memory."""

    def __init__(self, model: onnx.ModelProto):
        self._spill = _spill_for(model) if holds_mapped_weights(model) else None

    @property
    def streams(self) -> bool:
        return self._spill is not None

    def tensor(self, array: np.ndarray, name: str) -> onnx.TensorProto:
        if self._spill is None or array.nbytes < EXTERNAL_TENSOR_BYTES:
            return numpy_helper.from_array(np.ascontiguousarray(array), name)
        return self._spill.tensor(array, name)


def refuse_external_references(model: onnx.ModelProto) -> None:
    """A model about to run from memory must hold all its weights: a location would be resolved by
    onnxruntime against the current directory."""
    pointing = external_tensors(model)
    if pointing:
        raise ModelError(f"{pointing[0].label} still points at external data; refused to run it from memory",
                         hint="load models with compressq's load_model, which reads and checks external data "
                              "(one loaded with read_weights=False: run io.with_weights_read(model) or io.on_disk)")


def check_model(model: onnx.ModelProto, model_path: Path | None = None, *, from_path: bool = False) -> None:
    """Run onnx.checker; a model too big for an in-memory check (or whose weights were not read) is checked
    from its path, or, without one, as a skeleton whose big tensors point at an empty file (the graph and every
    tensor's type and dims are checked; the bytes of tensors above EXTERNAL_TENSOR_BYTES are not)."""
    with _checker_errors(model_path.name if model_path else "the model"):
        if model_path is None and tensor_payload(model) > IN_MEMORY_CHECK_LIMIT:
            _check_skeleton(model)  # a model we made, checked without serializing its weights twice over
            return
        big = from_path or holds_mapped_weights(model) or model_bytes(model) > EXTERNAL_DATA_THRESHOLD
        if big and model_path is not None:
            onnx.checker.check_model(str(model_path))
        elif big:
            _check_skeleton(model)
        else:
            onnx.checker.check_model(model)


def tensor_payload(model: onnx.ModelProto) -> int:
    """The bytes of every tensor of `model`, from dims and types (ByteSize would encode the whole model)."""
    return sum(_payload_bytes(stored.tensor) for stored in model_tensors(model))


def _passes_checker(model_path: Path) -> bool:
    """The checker on the file itself; any complaint (or a file that is no model at all) is left to the usual
    parse-then-check path, which says what is wrong in its own words."""
    try:
        onnx.checker.check_model(str(model_path))
    except Exception:  # the checker's C++ raises several kinds; none may escape from here
        return False
    return True


@contextlib.contextmanager
def _checker_errors(name: str) -> Iterator[None]:
    """onnx.checker's complaints as one ModelError line."""
    try:
        yield
    except (onnx.checker.ValidationError, onnx.shape_inference.InferenceError, ValueError) as exc:
        raise ModelError(
            f"{name} fails the ONNX checker: {first_line(exc)}",
            hint="fix or re-export the model (run onnx.checker.check_model on it to see the details)",
        ) from exc


def model_bytes(model: onnx.ModelProto) -> int:
    """`model.ByteSize()`, safe past 2 GB: protobuf's ByteSize encodes the whole message (seconds per GB, and a
    transient copy) and raises EncodeError above its limit. Tensor payloads are summed from their shapes first;
    only a model below the threshold is measured exactly."""
    tensors = [stored.tensor for stored in model_tensors(model)]
    payload = sum(_payload_bytes(tensor) for tensor in tensors)
    if payload > EXTERNAL_DATA_THRESHOLD:
        return payload
    return model.ByteSize() + sum(_payload_bytes(tensor) for tensor in tensors if is_mapped(tensor))


def _payload_bytes(tensor: onnx.TensorProto) -> int:
    if is_mapped(tensor):
        return _mapped_location(tensor)[2]  # its bytes are part of the model, on disk until saved
    if not tensor.HasField("raw_data"):
        return 0  # typed fields (float_data, ...): small in practice; ByteSize counts them below the threshold
    expected = _expected_bytes(tensor)
    return expected if expected is not None else len(tensor.raw_data)


def _big_tensors_aside(model: onnx.ModelProto, data_name: str) -> onnx.ModelProto:
    """A copy of `model` without the bytes of its big initializers: each points at `data_name` instead (offsets
    as if the bytes were laid one after another). For the checker, which never reads external data."""
    skeleton = _copy_without(model, "graph")
    _copy_fields(model.graph, skeleton.graph, skip="initializer")
    offset = 0
    for tensor in model.graph.initializer:
        kept = skeleton.graph.initializer.add()
        length = _payload_bytes(tensor)
        if length < EXTERNAL_TENSOR_BYTES and not is_mapped(tensor):
            kept.CopyFrom(tensor)
            continue
        _copy_fields(tensor, kept, skip="raw_data")
        offset = _point_at(kept, data_name, offset, length)
    for stored in model_tensors(skeleton):  # mapped tensors in bodies and attributes: their absolute paths go too
        if is_mapped(stored.tensor):
            offset = _point_at(stored.tensor, data_name, offset, _mapped_location(stored.tensor)[2])
    return skeleton


def _point_at(tensor: onnx.TensorProto, data_name: str, offset: int, length: int) -> int:
    """Make `tensor` an external reference to bytes offset..offset+length of `data_name`; the next offset."""
    tensor.data_location = onnx.TensorProto.EXTERNAL
    del tensor.external_data[:]
    for key, value in (("location", data_name), ("offset", str(offset)), ("length", str(length))):
        tensor.external_data.add(key=key, value=value)
    return offset + length


def _check_skeleton(model: onnx.ModelProto) -> None:
    with tempfile.TemporaryDirectory(prefix="compressq-check-") as folder:
        path = Path(folder) / "model.onnx"
        (Path(folder) / "model.onnx.data").touch()
        onnx.save_model(_big_tensors_aside(model, "model.onnx.data"), str(path))
        onnx.checker.check_model(str(path))


def first_line(exc: BaseException) -> str:
    text = str(exc).strip() or type(exc).__name__
    return text.splitlines()[0][:300]


def file_size(path: str | os.PathLike, loaded: onnx.ModelProto | None = None) -> int:
    """Bytes on disk of a model including the external data files (inside its folder) it references.

    The file is parsed only when it can reference external data: `loaded` (the model as load_model(read_weights=
    False) gave it) already holds the references, and a file that never says "location" references nothing (a
    model with its weights inline would otherwise be read whole once more: +175 MB on a 252 MB BERT)."""
    model_path = Path(path)
    total = model_path.stat().st_size
    if loaded is not None and holds_mapped_weights(loaded):
        model = loaded
    elif _mentions(model_path, b"location"):
        model = onnx.load(str(model_path), load_external_data=False)
    else:
        return total
    base = model_path.parent.resolve()
    locations = {_external_entries(s.tensor).get("location", "") for s in external_tensors(model)}
    for location in locations - {""}:
        side_file = (base / location).resolve()
        if base in side_file.parents and side_file.is_file():
            total += side_file.stat().st_size
    return total


def _mentions(path: Path, word: bytes, chunk_bytes: int = 16 * 2**20) -> bool:
    """Whether `word` occurs in the file, read a chunk at a time (each chunk is searched with the bytes before
    it that could start the word)."""
    with open(path, "rb") as stream:
        tail = b""
        while chunk := stream.read(chunk_bytes):
            window = tail + chunk
            if word in window:
                return True
            tail = window[-(len(word) - 1):] if len(word) > 1 else b""
    return False


# ---------------------------------------------------------------------------------------------------
# Saving


def save_model(
    model: onnx.ModelProto,
    path: str | os.PathLike,
    *,
    protect: Iterable[str | os.PathLike] = (),
    overwrite: bool = True,
) -> Path:
    """Write `model` atomically (never modifying it); models near protobuf's limit get `NAME.data`.

    `protect` lists input files that must never be replaced (the output path may not be one of them).
    Returns the path as given; a symlink target is written where the link points.
    """
    protect = list(protect)
    given = Path(path)
    target = check_output_path(given, protect, overwrite=overwrite)
    folder = target.parent
    remove_stale_staging(target)
    # A model whose weights came from external data (mapped) keeps them there: they are streamed, never held
    needs_external = holds_mapped_weights(model) or model_bytes(model) > EXTERNAL_DATA_THRESHOLD
    data_name = f"{target.name}.data"
    if needs_external:
        check_output_path(folder / data_name, protect)
    refuse_non_finite_weights(model, "the output")
    try:
        staging = Path(tempfile.mkdtemp(prefix=f".{target.name}.{STAGING_MARK}{_owner_tag()}-", dir=folder))
    except OSError as exc:
        raise OutputError(f"cannot write {given}: {exc.strerror or exc}",
                          hint="check free disk space and permissions") from exc
    try:
        staged = staging / target.name
        if needs_external:
            write_with_external_data(model, staged, data_name)
            os.replace(staging / data_name, folder / data_name)
        else:
            onnx.save_model(model, str(staged))
        os.replace(staged, target)
    except OSError as exc:
        raise OutputError(f"cannot write {given}: {exc.strerror or exc}",
                          hint="check free disk space and permissions") from exc
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return given


_FLOAT_TYPES: dict[int, type[np.floating]] = {onnx.TensorProto.FLOAT: np.float32, onnx.TensorProto.FLOAT16: np.float16,
                onnx.TensorProto.DOUBLE: np.float64}


def non_finite_weights(model: onnx.ModelProto) -> list[str]:
    """Labels of the weights in `model` (float tensors that layers read as parameters, ops.WEIGHT_INPUTS) that
    hold NaN or infinity; other constants may be infinite on purpose (masks, bounds). bfloat16/fp8 not read."""
    weights = _weight_names(model.graph)
    stored = [s for s in model_tensors(model) if s.tensor.name in weights]
    stored += [StoredTensor(t, f"Constant node '{name}'") for name, t in _constants_read_as(model.graph, weights)]
    return [s.label for s in stored if not _all_finite(s.tensor)]


def _all_finite(tensor: onnx.TensorProto) -> bool:
    dtype = _FLOAT_TYPES.get(tensor.data_type)
    if dtype is None or (is_external(tensor) and not is_mapped(tensor)):
        return True
    if is_mapped(tensor):  # a chunk at a time: the weights of a big model are never all in memory
        return all(bool(np.isfinite(chunk).all()) for chunk in tensor_chunks(tensor))
    if tensor.HasField("raw_data"):
        values = np.frombuffer(tensor.raw_data, dtype=np.dtype(dtype).newbyteorder("<"))
    else:
        values = numpy_helper.to_array(tensor)
    return bool(np.isfinite(values).all())


def _constants_read_as(graph: onnx.GraphProto, names: set[str]) -> Iterator[tuple[str, onnx.TensorProto]]:
    """(node name, value) of the Constant nodes, bodies included, whose output is read under one of `names`."""
    for node in all_nodes(graph):
        if node.op_type == "Constant" and node.output[0] in names:
            yield from ((node.name, a.t) for a in node.attribute if a.HasField("t"))


def _weight_names(graph: onnx.GraphProto) -> set[str]:
    """Names read as weights anywhere in the graph and its bodies (a body reads its enclosing weights too)."""
    return {node.input[i] for node in all_nodes(graph) for i in WEIGHT_INPUTS.get(node.op_type, ())
            if i < len(node.input) and node.input[i]}


def refuse_non_finite_weights(model: onnx.ModelProto, whose: str) -> None:
    """No command writes a NaN or infinite weight: checked on the input before the work and on every output."""
    found = non_finite_weights(model)
    if not found:
        return
    more = f" and {len(found) - 1} more" if len(found) > 1 else ""
    if whose == "the output":
        raise ModelError(f"the output would hold NaN or infinite values in {found[0]}{more}; nothing was written",
                         hint="check the model's weights and the data for extreme values, or --exclude that layer")
    raise ModelError(f"{whose} holds NaN or infinite values in {found[0]}{more}; refused",
                     hint="fix the exported weights first (numpy.nan_to_num on the initializer)")


def copy_unchanged_model(source: str | os.PathLike, path: str | os.PathLike, *,
                         protect: Iterable[str | os.PathLike] = ()) -> bool:
    """Write the bytes of the model file `source` to `path` unchanged, atomically; False (nothing written)
    when the model keeps weights in external data files, whose relative locations a copy elsewhere would
    break: the caller then saves the loaded model instead.

    An output compressq decided not to change is the user's own file: never bigger, never re-encoded (the
    load-time normalization, e.g. names given to unnamed nodes, is not worth a byte more on disk)."""
    content = Path(source).read_bytes()  # load_model already parsed and checked this file
    if any(is_external(stored.tensor) for stored in model_tensors(onnx.load_model_from_string(content))):
        return False
    target = check_output_path(path, protect)
    write_atomically(target, lambda stream: stream.write(content))
    return True


def write_with_external_data(model: onnx.ModelProto, path: Path, data_name: str) -> None:
    """Write `model` to `path` with its large tensors in `path.parent / data_name`; `model` is untouched.

    Big initializers are streamed to the data file one at a time, so no second copy of the weights is
    ever held; mapped tensors (load_model(read_weights=False), spill files) are copied from their files a chunk
    at a time; the small remainder is copied and handed to onnx (which converts what it is given)."""
    skeleton = _copy_without(model, "graph")
    _copy_fields(model.graph, skeleton.graph, skip="initializer")
    data_path = path.parent / data_name
    with open(data_path, "wb") as data_file:
        for tensor in model.graph.initializer:
            kept = skeleton.graph.initializer.add()
            if is_mapped(tensor):
                _copy_fields(tensor, kept, skip="external_data")
                _point_at(kept, data_name, data_file.tell(), _copy_mapped_bytes(tensor, data_file))
            elif tensor.HasField("raw_data") and len(tensor.raw_data) >= EXTERNAL_TENSOR_BYTES:
                _copy_fields(tensor, kept, skip="raw_data")
                offset = data_file.tell()
                data_file.write(tensor.raw_data)
                _point_at(kept, data_name, offset, data_file.tell() - offset)
            else:
                kept.CopyFrom(tensor)
        for stored in model_tensors(skeleton):  # in bodies and attributes (the copy is ours to repoint)
            if is_mapped(stored.tensor):
                _point_at(stored.tensor, data_name, data_file.tell(), _copy_mapped_bytes(stored.tensor, data_file))
    # The skeleton is ours: onnx may move its remaining large tensors (Constants, subgraphs) out too,
    # appending to the same data file.
    onnx.save_model(skeleton, str(path), save_as_external_data=True, all_tensors_to_one_file=True,
                    location=data_name, size_threshold=EXTERNAL_TENSOR_BYTES)


def _copy_mapped_bytes(tensor: onnx.TensorProto, target: BinaryIO, chunk_bytes: int = 64 * 2**20) -> int:
    file, offset, length = _mapped_location(tensor)
    with open(file, "rb") as source:
        source.seek(offset)
        copied = 0
        while copied < length:
            data = source.read(min(chunk_bytes, length - copied))
            if not data:
                raise ModelError(f"the external data of tensor '{tensor.name}' is shorter than recorded",
                                 hint="the .data file changed while it was read; retry")
            target.write(data)
            copied += len(data)
    return length


def _copy_without(message, skip: str):
    copy = type(message)()
    _copy_fields(message, copy, skip=skip)
    return copy


def _copy_fields(source, target, *, skip: str) -> None:
    for field, value in source.ListFields():
        if field.name == skip:
            continue
        if _is_repeated(field):
            getattr(target, field.name).extend(value)
        elif field.message_type is not None:
            getattr(target, field.name).CopyFrom(value)
        else:
            setattr(target, field.name, value)


def _is_repeated(field) -> bool:
    # protobuf >= 5 has is_repeated; older versions only the label
    repeated = getattr(field, "is_repeated", None)
    return bool(repeated) if repeated is not None else field.label == field.LABEL_REPEATED


def check_output_path(path: str | os.PathLike, protect: Iterable[str | os.PathLike] = (), *,
                      overwrite: bool = True) -> Path:
    """Refuse an output path before any work is done on it (commands call this first, save_model again).

    `protect` names what the command reads (models, data files or folders, plans): the output may be none
    of them, nor a model's external data file, nor a file inside a data folder. The folder is probed with a
    staging file, so an unwritable place fails now, not after the work. Returns the file that will be
    written: the path itself, or where it points when it is a symlink.
    """
    target = Path(path)
    if "\x00" in str(target):
        raise OutputError("the output path contains a NUL byte", hint="pass a plain file path")
    _refuse_to_replace_inputs(target, protect)
    try:
        status = os.stat(target)  # follows symlinks: what a write would reach
    except FileNotFoundError:
        status = None
    except OSError as exc:
        raise OutputError(f"cannot use {target} as output: {exc.strerror or exc}",
                          hint="pass a file path in a folder you can write") from exc
    if status is not None:
        if stat.S_ISDIR(status.st_mode):
            raise OutputError(f"{target} is a directory", hint="pass a file path such as model.int8.onnx")
        if not stat.S_ISREG(status.st_mode):
            raise OutputError(f"{target} exists and is not a regular file ({_file_kind(status.st_mode)}); "
                              "refused, it is never replaced",
                              hint="pass a file path such as model.int8.onnx")
        if not overwrite:
            raise OutputError(f"{target} already exists", hint="pass another -o path or remove the file")
    written = _resolved(target) if target.is_symlink() else target
    absolute = Path(os.path.abspath(target))
    if any(Path(root) in (absolute, *absolute.parents, written, *written.parents)
           for root in ("/dev", "/proc", "/sys")):
        # /dev/stdout and /proc/self/fd/N name whatever this process has open: never renamed over
        raise OutputError(f"{target} is a device or process file; refused, it is never replaced",
                          hint="pass a file path such as model.int8.onnx")
    folder = written.parent
    if not folder.exists():
        raise OutputError(f"output folder {folder} does not exist", hint="create it first")
    if not folder.is_dir():
        raise OutputError(f"output folder {folder} is not a folder", hint="pass a path in a folder")
    _probe_writable(folder, written)
    return written


def _resolved(path: Path) -> Path:
    """`path.resolve()`, with a symlink loop said in one line instead of a RuntimeError."""
    try:
        return path.resolve()
    except (RuntimeError, OSError) as exc:  # Python < 3.13 raises RuntimeError on a loop, later OSError
        raise OutputError(f"{path} is a symlink loop (or too many links deep)",
                          hint="point the link at a real file, or pass another path") from exc


def _probe_writable(folder: Path, target: Path) -> None:
    """Create and remove a staging file where the output will be staged: permissions, read-only file systems
    and full inode tables show up before the work, not after it."""
    try:
        handle, probe = tempfile.mkstemp(prefix=f".{target.name}.{STAGING_MARK}{_owner_tag()}-", dir=folder)
    except OSError as exc:
        raise OutputError(f"cannot write in {folder}: {exc.strerror or exc}",
                          hint="pass an output path in a folder you can write") from exc
    try:
        os.close(handle)
    finally:
        os.unlink(probe)


def _file_kind(mode: int) -> str:
    for test, kind in ((stat.S_ISCHR, "a character device"), (stat.S_ISBLK, "a block device"),
                       (stat.S_ISFIFO, "a pipe"), (stat.S_ISSOCK, "a socket")):
        if test(mode):
            return kind
    return "not a plain file"


def _refuse_to_replace_inputs(target: Path, protect: Iterable[str | os.PathLike]) -> None:
    resolved = _resolved(target)
    for protected in protect:
        protected_path = _resolved(Path(protected))
        if protected_path.is_dir():
            if protected_path == resolved or protected_path in resolved.parents:
                raise OutputError(f"refusing to write {target} inside {protected}, a folder this command reads",
                                  hint="pass an output path outside the data folder with -o")
            continue
        data_path = protected_path.with_name(protected_path.name + ".data")
        if resolved in (protected_path, data_path):
            raise OutputError(f"refusing to overwrite the input file {target}",
                              hint="pass a different output path with -o")
        if resolved in _external_files_of(protected_path, resolved):
            raise OutputError(f"refusing to overwrite {target}: it holds the external data of the model "
                              f"{protected}", hint="pass a different output path with -o")


def _external_files_of(model_path: Path, candidate: Path) -> set[Path]:
    """The external data files of the model at `model_path`, looked up only when `candidate` could be one:
    an existing file inside the model's folder (a missing file is no input; data never sits elsewhere)."""
    if model_path.suffix != ".onnx" or not candidate.is_file() or model_path.parent not in candidate.parents:
        return set()
    try:
        stamp_ = model_path.stat()
    except OSError:
        return set()
    return _cached_external_files(model_path, stamp_.st_mtime_ns, stamp_.st_size)


@functools.lru_cache(maxsize=16)
def _cached_external_files(model_path: Path, mtime_ns: int, size: int) -> set[Path]:
    try:
        model = onnx.load(str(model_path), load_external_data=False)
    except Exception:  # not a model: load_model says so in its own words
        return set()
    base = model_path.parent
    locations = {_external_entries(s.tensor).get("location", "") for s in external_tensors(model)}
    found = set()
    for location in locations - {""}:
        with contextlib.suppress(OSError, RuntimeError, ValueError):
            found.add((base / location).resolve())
    return found


def remove_stale_staging(target: Path) -> list[Path]:
    """Remove staging folders of `target`'s name left by runs that were killed (their process is gone)."""
    removed: list[Path] = []
    prefix = f".{target.name}.{STAGING_MARK}"
    try:
        candidates = [p for p in target.parent.iterdir() if p.name.startswith(prefix)]
    except OSError:
        return removed
    for folder in candidates:
        if not _left_by_a_dead_run(folder.name[len(prefix):]) or folder.is_symlink() or not folder.is_dir():
            continue
        shutil.rmtree(folder, ignore_errors=True)
        removed.append(folder)
    return removed


@functools.cache
def _owner_tag() -> str:
    """`PID@HOST` in the names of staging and spill files: another machine sharing the folder (two CI containers
    on one volume) is not judged by this machine's process table."""
    host = hashlib.sha256(socket.gethostname().encode()).hexdigest()[:8]
    return f"{os.getpid()}@{host}"


def _left_by_a_dead_run(rest_of_name: str) -> bool:
    """Whether a `PID@HOST-...` (or older `PID-...`) name was left by a process of this machine that is gone."""
    owner = rest_of_name.split("-", 1)[0]
    pid_text, _, host = owner.partition("@")
    if not pid_text.isdigit() or (host and host != _owner_tag().partition("@")[2]):
        return False
    return not _process_alive(int(pid_text))


def _process_alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    except OverflowError:
        return False
    return True


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


# ---------------------------------------------------------------------------------------------------
# Writing files other than models: the one atomic writer


def write_atomically(path: str | os.PathLike, write: Callable[[BinaryIO], object], *,
                     verify: Callable[[Path], object] | None = None) -> Path:
    """Stage `write`'s bytes next to `path`, optionally `verify` the staged file, then rename over `path`.

    Readers see the old file or the whole new one, never half of it; a failure leaves nothing behind.
    """
    path = Path(path)
    folder = path.parent if str(path.parent) else Path(".")
    if path.is_dir():
        raise OutputError(f"{path} is a directory", hint=f"pass a file path such as {folder / ('out' + path.suffix)}")
    if not folder.is_dir():
        raise OutputError(f"output folder {folder} does not exist", hint="create it first")
    try:
        handle, staged = tempfile.mkstemp(prefix=f".{path.name}.{STAGING_MARK}{_owner_tag()}-",
                                          suffix=path.suffix or ".tmp", dir=folder)
    except OSError as exc:
        raise OutputError(f"cannot write {path}: {exc.strerror or exc}", hint="check permissions and free space") \
            from exc
    try:
        with os.fdopen(handle, "wb") as stream:
            write(stream)
        if verify is not None:
            verify(Path(staged))
        os.chmod(staged, 0o666 & ~_current_umask())  # mkstemp makes 0600; outputs are as readable as any file
        os.replace(staged, path)
    except OSError as exc:
        raise OutputError(f"cannot write {path}: {exc.strerror or exc}", hint="check permissions and free space") \
            from exc
    finally:
        if os.path.exists(staged):
            os.unlink(staged)
    return path


def write_text_atomically(path: str | os.PathLike, text: str) -> Path:
    return write_atomically(path, lambda stream: stream.write(text.encode("utf-8")))


def _current_umask() -> int:
    current = os.umask(0)
    os.umask(current)
    return current
