"""Calibration and evaluation data: read `.npz`/`.npy` files, check them against the model, batch them.

Accepted files (first axis of every array = samples):
  * one `.npz` whose arrays are named after the model's inputs (plus optionally a labels array);
  * a folder of such `.npz` files (shards, read one at a time so memory stays flat);
  * a folder of `.npy` files named `<input name>.npy` (memory-mapped).
Arrays that are neither a model input nor the labels are ignored (one note says which).

Two layouts say what the first axis means (`--data-layout`):
  * `batch` (default): axis 0 is the model's own batch axis; samples are fed in batches along it;
  * `stack`: axis 0 indexes complete feeds, each fed exactly as stored: a scalar input is stored as `(N,)`
    and fed as `()`, a `[2, 1, 128]` state as `(N, 2, 1, 128)`. Samples then run one at a time (a model
    with scalar inputs or its batch on another axis cannot batch them).

Files are checked from their headers before any array is read: a declared size the file cannot hold,
object (pickled) or text arrays, and files that are not what their name says are refused in one line.
Non-finite values (NaN, inf) in float inputs are refused when a batch is read: nothing computed from
them (ranges, refit weights) may end up in a written model.
Synthetic inputs exist for latency work and are always flagged as such.
"""

from __future__ import annotations

import os
import zipfile
import zlib
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import onnx

from compressq.errors import DataError, UsageError
from compressq.graph.index import GraphIndex, TensorType, value_type

DEFAULT_LABELS_KEY = "labels"
SYNTHETIC_DYNAMIC_DIM = 16
DATA_LAYOUTS = ("batch", "stack")
DATA_LAYOUT_HELP = ("batch: axis 0 of every array is the model's batch axis | stack: axis 0 indexes complete "
                    "inputs, each fed as stored (scalars, batch on another axis; run one at a time).")
# dtype kinds an input array may have: bool, signed and unsigned integers, floats
NUMERIC_KINDS = "biuf"


@dataclass(frozen=True)
class InputSpec:
    name: str
    dtype: np.dtype
    shape: tuple[int | str | None, ...] | None

    @property
    def fixed_batch(self) -> int | None:
        """The first dimension when the model pins it (e.g. a batch of 1), else None."""
        if self.shape and isinstance(self.shape[0], int) and self.shape[0] > 0:
            return self.shape[0]
        return None


def model_inputs(model: onnx.ModelProto) -> list[InputSpec]:
    """The model's real inputs (graph inputs that are not initializers), with dtypes and shapes."""
    index = GraphIndex(model.graph)
    specs = []
    for value in model.graph.input:
        if value.name not in index.graph_inputs:
            continue
        kind: TensorType = value_type(value)
        if kind.dtype is None:
            raise DataError(f"model input '{value.name}' is not a plain tensor",
                            hint="compressq handles tensor inputs only (no sequences or maps)")
        specs.append(InputSpec(value.name, kind.dtype, kind.shape))
    return specs


@dataclass
class Shard:
    """One file's worth of samples, loaded only while it is being iterated."""

    source: str
    num_samples: int  # -1 when the arrays disagree (reported by validation)
    shapes: dict[str, tuple]
    read: Callable[[Sequence[str]], dict[str, np.ndarray]]  # the named arrays, and only those
    dtypes: dict[str, np.dtype] = field(default_factory=dict)  # from the headers, when known without reading

    def arrays(self, keys: Sequence[str]) -> dict[str, np.ndarray]:
        return self.read(keys)

    def dtype(self, key: str) -> np.dtype:
        return self.dtypes[key] if key in self.dtypes else self.arrays([key])[key].dtype


def _reader(arrays: dict[str, np.ndarray]) -> Callable[[Sequence[str]], dict[str, np.ndarray]]:
    """A Shard's reader over arrays already at hand (memory-mapped .npy files, synthetic data)."""
    return lambda keys: {key: arrays[key] for key in keys if key in arrays}


@dataclass
class Dataset:
    inputs: list[InputSpec]
    shards: list[Shard]
    source: str
    synthetic: bool = False
    labels_key: str | None = None
    notes: list[str] = field(default_factory=list)
    layout: str = "batch"
    _first: dict[str, np.ndarray] | None = field(default=None, init=False, repr=False, compare=False)

    @property
    def num_samples(self) -> int:
        return sum(s.num_samples for s in self.shards)

    @property
    def has_labels(self) -> bool:
        return self.labels_key is not None

    def samples_in(self, feed: dict[str, np.ndarray]) -> int:
        """Samples in one of this dataset's feeds: a stack-layout feed is one complete sample (its first axis
        counts steps, and its first input may be a scalar); a batch feed has them on the first axis of its
        first input that has one."""
        if self.layout == "stack":
            return 1
        return next((int(np.shape(value)[0]) for value in feed.values() if np.ndim(value)), 1)

    def first_sample(self) -> dict[str, np.ndarray] | None:
        """The feed of the first sample alone (None without samples), copied out of its shard and kept: every
        data pass sizes itself on it first, and reading it from an .npz decompresses the whole shard."""
        if self._first is None:
            feed = next(iter(self.batches(1, 1)), None)
            self._first = None if feed is None else {name: np.array(value) for name, value in feed.items()}
        return None if self._first is None else dict(self._first)

    def batches(self, batch_size: int, limit: int | None = None) -> Iterator[dict[str, np.ndarray]]:
        """Model-input feeds of `batch_size` samples (the last may be smaller), `limit` samples in all."""
        yield from (feed for feed, _ in self.labelled_batches(batch_size, limit))

    def labelled_batches(self, batch_size: int, limit: int | None = None,
                         ) -> Iterator[tuple[dict[str, np.ndarray], np.ndarray | None]]:
        if self.layout == "stack":
            yield from self._stacked_feeds(limit)
            return
        batch_size = self._effective_batch_size(batch_size)
        remaining = self.num_samples if limit is None else min(limit, self.num_samples)
        keys = self._keys()
        # Batches span shard boundaries: samples left at a shard's end start the next batch.
        pieces: list[dict[str, np.ndarray]] = []
        pending = 0
        for shard in self.shards:
            if remaining <= 0:
                break
            arrays = shard.arrays(keys)
            take = min(shard.num_samples, remaining)
            start = 0
            while start < take:
                stop = min(start + batch_size - pending, take)
                pieces.append({key: arrays[key][start:stop] for key in keys})
                pending += stop - start
                start = stop
                if pending == batch_size:
                    yield self._assemble(pieces)
                    pieces, pending = [], 0
            # Copy the carried-over tail so this shard's arrays can be freed.
            pieces = [{key: np.array(part) for key, part in piece.items()} for piece in pieces]
            remaining -= take
        if pieces:
            yield self._assemble(pieces)

    def _stacked_feeds(self, limit: int | None) -> Iterator[tuple[dict[str, np.ndarray], np.ndarray | None]]:
        """Layout `stack`: one complete feed per index of axis 0, fed exactly as stored."""
        remaining = self.num_samples if limit is None else min(limit, self.num_samples)
        keys = self._keys()
        for shard in self.shards:
            if remaining <= 0:
                break
            arrays = shard.arrays(keys)
            for index in range(min(shard.num_samples, remaining)):
                feed = {spec.name: self._checked(_as_input(arrays[spec.name][index], spec), spec.name, shard.source)
                        for spec in self.inputs}
                yield feed, arrays[self.labels_key][index:index + 1] if self.labels_key else None
            remaining -= shard.num_samples

    def _keys(self) -> list[str]:
        return [spec.name for spec in self.inputs] + ([self.labels_key] if self.labels_key else [])

    def _assemble(self, pieces: list[dict[str, np.ndarray]]) -> tuple[dict[str, np.ndarray], np.ndarray | None]:
        def joined(key: str) -> np.ndarray:
            return pieces[0][key] if len(pieces) == 1 else np.concatenate([p[key] for p in pieces])

        feed = {spec.name: self._checked(_as_input(joined(spec.name), spec), spec.name, self.source)
                for spec in self.inputs}
        return feed, joined(self.labels_key) if self.labels_key else None

    def _checked(self, array: np.ndarray, name: str, source: str) -> np.ndarray:
        """Refuse NaN and inf: a range, a refit weight or a bias computed from them is not finite."""
        if self.synthetic or not np.issubdtype(array.dtype, np.floating) or np.isfinite(array).all():
            return array
        bad = int(array.size - np.count_nonzero(np.isfinite(array)))
        raise DataError(f"{source}: array '{name}' holds {bad} NaN or infinite values; refused",
                        hint="replace them (numpy.nan_to_num) or drop those samples: ranges and weights "
                             "computed from them would not be finite")

    def labels(self, limit: int | None = None) -> np.ndarray | None:
        if not self.labels_key:
            return None
        parts = [labels for _, labels in self.labelled_batches(4096, limit) if labels is not None]
        return np.concatenate(parts) if parts else None

    def _effective_batch_size(self, requested: int) -> int:
        if self.layout == "stack":
            return 1
        fixed = {batch for spec in self.inputs if (batch := spec.fixed_batch) is not None}
        return fixed.pop() if fixed else max(1, requested)


def _as_input(array: np.ndarray, spec: InputSpec) -> np.ndarray:
    return np.asarray(array, dtype=spec.dtype, order="C")  # ascontiguousarray would make a scalar (1,)


# ---------------------------------------------------------------------------------------------------
# Reading


def load_dataset(path: str | os.PathLike, model: onnx.ModelProto, *,
                 labels_key: str | None = DEFAULT_LABELS_KEY, require_labels: bool = False,
                 layout: str = "batch") -> Dataset:
    """Open `path` and check every shard against the model's inputs before any inference runs."""
    if layout not in DATA_LAYOUTS:
        raise UsageError(f"unknown data layout '{layout}'", hint=f"pass one of: {', '.join(DATA_LAYOUTS)}")
    source = Path(path)
    specs = model_inputs(model)
    if not source.exists():
        what = "a symlink to nothing (a loop, or its target is gone)" if source.is_symlink() else "not found"
        raise DataError(f"data {what}: {source}", hint="pass an .npz file or a folder of .npz/.npy files")
    if source.is_dir():
        shards = _folder_shards(source, specs)
    elif source.suffix == ".npz":
        shards = [_npz_shard(source)]
    elif source.suffix == ".npy":
        raise DataError(f"{source} is a single .npy file; which input is it for?",
                        hint="put it in a folder as <input name>.npy, or save an .npz keyed by input names")
    else:
        raise DataError(f"{source} is not an .npz file or a folder", hint="save arrays with numpy.savez")
    dataset = Dataset(specs, shards, str(source), layout=layout)
    _validate(dataset, labels_key, require_labels)
    return dataset


def _npz_shard(path: Path) -> Shard:
    """An .npz described from its headers alone: nothing is decompressed until a batch is read."""
    headers = _npz_headers(path)
    shapes = {key: shape for key, (shape, _) in headers.items()}
    counts = {shape[0] if shape else 0 for shape in shapes.values()}

    def read(keys: Sequence[str]) -> dict[str, np.ndarray]:
        try:
            with np.load(path, allow_pickle=False) as archive:
                return {key: archive[key] for key in keys}
        except (OSError, ValueError, EOFError, zipfile.BadZipFile, zlib.error) as exc:
            raise DataError(f"cannot read {path}: {_reason(exc)}",
                            hint="the file changed or is damaged; save the data again with numpy.savez") from exc

    return Shard(str(path), counts.pop() if len(counts) == 1 else -1, shapes, read,
                 dtypes={key: dtype for key, (_, dtype) in headers.items()})


def _npz_headers(path: Path) -> dict[str, tuple[tuple[int, ...], np.dtype]]:
    """Shape and dtype of every array in an .npz, read from the .npy headers; a declared size the
    archive does not hold (a hostile or truncated file) is refused before anything is allocated."""
    try:
        archive = zipfile.ZipFile(path)
    except zipfile.BadZipFile as exc:
        raise DataError(f"{path} is not an .npz file (not a zip archive)",
                        hint="save the arrays with numpy.savez; a single array goes in a folder as NAME.npy") from exc
    except OSError as exc:
        raise DataError(f"cannot read {path}: {exc.strerror or exc}", hint="check the path and permissions") from exc
    headers = {}
    with archive:
        for info in archive.infolist():
            if not info.filename.endswith(".npy"):
                continue
            key = info.filename[: -len(".npy")]
            try:
                with archive.open(info) as member:
                    version = np.lib.format.read_magic(member)
                    shape, _, dtype = _read_header(member, version)
                    header_bytes = member.tell()
            except (OSError, ValueError, EOFError, zipfile.BadZipFile, zlib.error, NotImplementedError) as exc:
                raise DataError(f"cannot read array '{key}' in {path}: {_reason(exc)}",
                                hint="the file is damaged or not written by numpy.savez; save it again") from exc
            _check_header(path, key, shape, dtype, info.file_size - header_bytes)
            headers[key] = (tuple(shape), dtype)
    if not headers:
        raise DataError(f"{path} holds no arrays", hint="save the arrays with numpy.savez(path, NAME=array)")
    return headers


def _read_header(member, version: tuple[int, int]):
    if version == (1, 0):
        return np.lib.format.read_array_header_1_0(member)
    if version == (2, 0):
        return np.lib.format.read_array_header_2_0(member)
    return np.lib.format._read_array_header(member, version)  # type: ignore[attr-defined]  # 3.0: no public reader


def _check_header(path: Path, key: str, shape: tuple, dtype: np.dtype, stored_bytes: int) -> None:
    if dtype.hasobject:  # pickled: never read (refused if a model input or the labels, else ignored)
        return
    if any(not isinstance(d, int) or d < 0 for d in shape):
        raise DataError(f"{path}: array '{key}' declares an invalid shape {shape}", hint="save the data again")
    declared = int(np.prod(shape, dtype=object)) * dtype.itemsize
    if declared > stored_bytes:
        raise DataError(f"{path}: array '{key}' declares shape {tuple(shape)} {dtype} ({_bytes(declared)}) but the "
                        f"file holds {_bytes(max(stored_bytes, 0))} for it; refused",
                        hint="the file is truncated or damaged; save the data again with numpy.savez")


def _bytes(count: int) -> str:
    size = float(count)
    for unit in ("bytes", "KiB", "MiB", "GiB", "TiB"):
        if size < 1024 or unit == "TiB":
            return f"{size:.0f} {unit}" if unit == "bytes" else f"{size:.1f} {unit}"
        size /= 1024
    return f"{count} bytes"


def _reason(exc: BaseException) -> str:
    return (str(exc).strip().splitlines() or [type(exc).__name__])[0][:200]


def _npy_folder_shard(folder: Path, files: list[Path]) -> Shard:
    try:
        arrays = {f.stem: np.load(f, mmap_mode="r", allow_pickle=False) for f in files}
    except (OSError, ValueError, EOFError) as exc:
        raise DataError(f"cannot read the .npy files in {folder}: {_reason(exc)}",
                        hint="each file must be a numeric array saved with numpy.save") from exc
    counts = {a.shape[0] if a.ndim else 0 for a in arrays.values()}
    shapes = {k: a.shape for k, a in arrays.items()}
    return Shard(str(folder), counts.pop() if len(counts) == 1 else -1, shapes, _reader(arrays))


def _folder_shards(folder: Path, specs: list[InputSpec]) -> list[Shard]:
    npz_files = sorted(folder.glob("*.npz"))
    npy_files = sorted(folder.glob("*.npy"))
    if npz_files and npy_files:
        raise DataError(f"{folder} mixes .npz and .npy files", hint="use one layout per folder")
    if npz_files:
        return [_npz_shard(f) for f in npz_files]
    if npy_files:
        return [_npy_folder_shard(folder, npy_files)]
    raise DataError(f"{folder} holds no .npz or .npy files",
                    hint="save arrays keyed by input name with numpy.savez into that folder")


def _validate(dataset: Dataset, labels_key: str | None, require_labels: bool) -> None:
    for shard in dataset.shards:
        for spec in dataset.inputs:
            if spec.name in shard.shapes:
                _check_numeric(shard, spec.name)
            _check_array(shard.source, spec, shard.shapes, dataset.layout)
    dataset.labels_key = _labels_key(dataset, labels_key, require_labels)
    used = dataset._keys()
    for shard in dataset.shards:
        counts = {key: shard.shapes[key][0] if shard.shapes[key] else 0 for key in used}
        if len(set(counts.values())) > 1:
            listed = ", ".join(f"{k}: {v}" for k, v in counts.items())
            raise DataError(f"{shard.source}: arrays disagree on the number of samples ({listed})",
                            hint="the first axis of every array counts samples")
        shard.num_samples = counts[used[0]] if used else 0
        if shard.num_samples == 0:
            raise DataError(f"{shard.source} holds no samples")
    ignored = sorted({key for shard in dataset.shards for key in shard.shapes} - set(used))
    if ignored:
        dataset.notes.append(f"arrays ignored (not model inputs{' or labels' if dataset.labels_key else ''}): "
                             f"{', '.join(ignored)}")
    _check_dtypes(dataset)


def _check_array(source: str, spec: InputSpec, shapes: dict[str, tuple], layout: str = "batch") -> None:
    if spec.name not in shapes:
        found = ", ".join(sorted(shapes)) or "none"
        raise DataError(f"{source} has no array for model input '{spec.name}'",
                        hint=f"arrays found: {found}; name them after the model's inputs")
    shape = shapes[spec.name]
    if spec.shape is None:
        return
    if layout == "stack":
        _check_stacked(source, spec.name, spec.shape, tuple(shape))
        return
    if not spec.shape:
        raise DataError(f"{source}: model input '{spec.name}' is a scalar: the batch layout cannot hold it "
                        f"(array shape {tuple(shape)})",
                        hint="pass --data-layout stack and store N scalars as shape (N,)")
    if len(shape) != len(spec.shape):
        stacked = len(shape) == len(spec.shape) + 1
        raise DataError(
            f"{source}: array '{spec.name}' has shape {tuple(shape)} but the model expects rank "
            f"{len(spec.shape)} {_shape_text(spec.shape)} (first axis = samples)",
            hint="each array holds complete inputs stacked on axis 0: pass --data-layout stack" if stacked else
            "stack samples along a new first axis so each array is [samples, ...model dims]",
        )
    for axis, (got, want) in enumerate(zip(shape[1:], spec.shape[1:]), start=1):
        if isinstance(want, int) and want > 0 and got != want:
            raise DataError(
                f"{source}: array '{spec.name}' has size {got} on axis {axis}, the model expects {want} "
                f"(model shape {_shape_text(spec.shape)})",
                hint="resize or re-export the data to the model's input shape",
            )


def _check_stacked(source: str, name: str, model_shape: tuple, shape: tuple) -> None:
    """Layout `stack`: [samples, *the model's input shape], every fixed size as the model has it."""
    if len(shape) != len(model_shape) + 1:
        raise DataError(
            f"{source}: array '{name}' has shape {shape}; with --data-layout stack it must be "
            f"[samples, *{_shape_text(model_shape)}] (rank {len(model_shape) + 1})",
            hint="stack complete inputs on a new first axis (a scalar input: shape (N,))")
    for axis, (got, want) in enumerate(zip(shape[1:], model_shape)):
        if isinstance(want, int) and want > 0 and got != want:
            raise DataError(
                f"{source}: array '{name}' has size {got} on axis {axis + 1}, the model expects {want} "
                f"on its axis {axis} (model shape {_shape_text(model_shape)}, data layout stack)",
                hint="resize or re-export the data to the model's input shape")


def _check_numeric(shard: Shard, key: str) -> None:
    dtype = shard.dtype(key)
    if dtype.hasobject:
        raise DataError(f"{shard.source}: array '{key}' holds Python objects (pickled data); refused",
                        hint="save plain numeric arrays (numpy.savez of float or int arrays)")
    if dtype.kind not in NUMERIC_KINDS:
        raise DataError(f"{shard.source}: array '{key}' holds {dtype} values, not numbers; refused",
                        hint="save numeric arrays (float or int) named after the model's inputs")


def _check_dtypes(dataset: Dataset) -> None:
    first = dataset.shards[0]
    if dataset.labels_key:
        for shard in dataset.shards:
            _check_numeric(shard, dataset.labels_key)
    for spec in dataset.inputs:
        got = first.dtype(spec.name)
        if got == spec.dtype:
            continue
        same_kind = (np.issubdtype(got, np.floating) and np.issubdtype(spec.dtype, np.floating)) or (
            np.issubdtype(got, np.integer) and np.issubdtype(spec.dtype, np.integer))
        if not same_kind:
            raise DataError(f"{dataset.source}: array '{spec.name}' is {got}, the model expects {spec.dtype}",
                            hint=f"convert it with .astype(np.{spec.dtype})")
        dataset.notes.append(f"'{spec.name}' converted from {got} to {spec.dtype}")


def _labels_key(dataset: Dataset, labels_key: str | None, require_labels: bool) -> str | None:
    shapes = dataset.shards[0].shapes
    if labels_key and labels_key in shapes:
        unlabelled = [s.source for s in dataset.shards if labels_key not in s.shapes]
        if unlabelled:
            raise DataError(f"{unlabelled[0]} has no labels array '{labels_key}' (other shards have one)",
                            hint="every shard needs the same arrays")
        return labels_key
    if require_labels:
        found = ", ".join(sorted(shapes))
        raise DataError(f"{dataset.source} has no labels array '{labels_key}'",
                        hint=f"arrays found: {found}; pass --labels NAME")
    return None


def _shape_text(shape: tuple) -> str:
    return "[" + ", ".join("?" if d is None else str(d) for d in shape) + "]"


# ---------------------------------------------------------------------------------------------------
# Synthetic inputs


def synthetic_dataset(model: onnx.ModelProto, samples: int = 32, seed: int = 0) -> Dataset:
    """Random inputs shaped like the model's: for latency only, never evidence of accuracy.

    Scalar and fixed dims are kept as the model declares them: a model with a scalar input, or an input whose
    first axis is fixed above 1 (a sequence [5, batch, 16] into a Scan, a state [2, batch, 128]), gets the
    stack layout (complete feeds, one at a time, a symbolic dim the same size everywhere); others get samples
    on their batch axis.
    """
    specs = model_inputs(model)
    rng = np.random.default_rng(seed)
    stacked = any(spec.shape is not None and (not spec.shape or (isinstance(spec.shape[0], int) and spec.shape[0] > 1))
                  for spec in specs)
    layout = "stack" if stacked else "batch"
    arrays = {spec.name: _synthetic_array(spec, samples, rng, layout) for spec in specs}
    shapes = {k: a.shape for k, a in arrays.items()}
    shard = Shard("synthetic", samples, shapes, _reader(arrays))
    return Dataset(specs, [shard], "synthetic inputs", synthetic=True, layout=layout,
                   notes=["inputs are synthetic (random): accuracy figures do not reflect real data"])


def _synthetic_array(spec: InputSpec, samples: int, rng: np.random.Generator, layout: str = "batch") -> np.ndarray:
    def size(d) -> int:
        return d if isinstance(d, int) and d > 0 else SYNTHETIC_DYNAMIC_DIM

    if layout == "stack":
        shape = [samples] + [size(d) for d in (spec.shape if spec.shape is not None else (None,))]
    else:
        dims = list(spec.shape or (None,))
        shape = [samples] + [size(d) for d in dims[1:]]
    if "mask" in spec.name.lower():
        return np.ones(shape, dtype=spec.dtype)
    if np.issubdtype(spec.dtype, np.floating):
        return rng.standard_normal(shape).astype(spec.dtype)
    if spec.dtype == np.bool_:
        return np.ones(shape, dtype=bool)
    # 0 and 1 are valid in any lookup table (token types have two rows, vocabularies more).
    return rng.integers(0, 2, size=shape).astype(spec.dtype)
