"""Calibration and evaluation data: read `.npz`/`.npy` files, check them against the model, batch them.

Accepted layouts (first axis of every array = samples):
  * one `.npz` whose arrays are named after the model's inputs (plus optionally a labels array);
  * a folder of such `.npz` files (shards, read one at a time so memory stays flat);
  * a folder of `.npy` files named `<input name>.npy` (memory-mapped).
Synthetic inputs exist for latency work and are always flagged as such.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import onnx

from compressq.errors import DataError
from compressq.graph import GraphIndex, TensorType, value_type

DEFAULT_LABELS_KEY = "labels"
SYNTHETIC_DYNAMIC_DIM = 16


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
    load: Callable[[], dict[str, np.ndarray]]


@dataclass
class Dataset:
    inputs: list[InputSpec]
    shards: list[Shard]
    source: str
    synthetic: bool = False
    labels_key: str | None = None
    notes: list[str] = field(default_factory=list)

    @property
    def num_samples(self) -> int:
        return sum(s.num_samples for s in self.shards)

    @property
    def has_labels(self) -> bool:
        return self.labels_key is not None

    def batches(self, batch_size: int, limit: int | None = None) -> Iterator[dict[str, np.ndarray]]:
        """Model-input feeds of `batch_size` samples (the last may be smaller), `limit` samples in all."""
        yield from (feed for feed, _ in self.labelled_batches(batch_size, limit))

    def labelled_batches(self, batch_size: int, limit: int | None = None,
                         ) -> Iterator[tuple[dict[str, np.ndarray], np.ndarray | None]]:
        batch_size = self._effective_batch_size(batch_size)
        remaining = self.num_samples if limit is None else min(limit, self.num_samples)
        keys = [spec.name for spec in self.inputs] + ([self.labels_key] if self.labels_key else [])
        # Batches span shard boundaries: samples left at a shard's end start the next batch.
        pieces: list[dict[str, np.ndarray]] = []
        pending = 0
        for shard in self.shards:
            if remaining <= 0:
                break
            arrays = shard.load()
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

    def _assemble(self, pieces: list[dict[str, np.ndarray]]) -> tuple[dict[str, np.ndarray], np.ndarray | None]:
        def joined(key: str) -> np.ndarray:
            return pieces[0][key] if len(pieces) == 1 else np.concatenate([p[key] for p in pieces])

        feed = {spec.name: _as_input(joined(spec.name), spec) for spec in self.inputs}
        return feed, joined(self.labels_key) if self.labels_key else None

    def labels(self, limit: int | None = None) -> np.ndarray | None:
        if not self.labels_key:
            return None
        parts = [labels for _, labels in self.labelled_batches(4096, limit)]
        return np.concatenate(parts) if parts else None

    def _effective_batch_size(self, requested: int) -> int:
        fixed = {spec.fixed_batch for spec in self.inputs} - {None}
        return fixed.pop() if fixed else max(1, requested)


def _as_input(array: np.ndarray, spec: InputSpec) -> np.ndarray:
    return np.ascontiguousarray(array, dtype=spec.dtype)


# ---------------------------------------------------------------------------------------------------
# Reading


def load_dataset(path: str | os.PathLike, model: onnx.ModelProto, *,
                 labels_key: str | None = DEFAULT_LABELS_KEY, require_labels: bool = False) -> Dataset:
    """Open `path` and check every shard against the model's inputs before any inference runs."""
    source = Path(path)
    specs = model_inputs(model)
    if not source.exists():
        raise DataError(f"data not found: {source}", hint="pass an .npz file or a folder of .npz/.npy files")
    if source.is_dir():
        shards = _folder_shards(source, specs)
    elif source.suffix == ".npz":
        shards = [_npz_shard(source)]
    elif source.suffix == ".npy":
        raise DataError(f"{source} is a single .npy file; which input is it for?",
                        hint="put it in a folder as <input name>.npy, or save an .npz keyed by input names")
    else:
        raise DataError(f"{source} is not an .npz file or a folder", hint="save arrays with numpy.savez")
    dataset = Dataset(specs, shards, str(source))
    _validate(dataset, labels_key, require_labels)
    return dataset


def _npz_shard(path: Path) -> Shard:
    try:
        with np.load(path, allow_pickle=False) as archive:
            shapes = {key: archive[key].shape for key in archive.files}
    except (OSError, ValueError) as exc:
        raise DataError(f"cannot read {path}: {exc}", hint="save the data with numpy.savez") from exc
    counts = {shape[0] if shape else 0 for shape in shapes.values()}

    def load() -> dict[str, np.ndarray]:
        with np.load(path, allow_pickle=False) as archive:
            return {key: archive[key] for key in archive.files}

    return Shard(str(path), counts.pop() if len(counts) == 1 else -1, shapes, load)


def _npy_folder_shard(folder: Path, files: list[Path]) -> Shard:
    try:
        arrays = {f.stem: np.load(f, mmap_mode="r", allow_pickle=False) for f in files}
    except (OSError, ValueError) as exc:
        raise DataError(f"cannot read the .npy files in {folder}: {exc}") from exc
    counts = {a.shape[0] if a.ndim else 0 for a in arrays.values()}
    shapes = {k: a.shape for k, a in arrays.items()}
    return Shard(str(folder), counts.pop() if len(counts) == 1 else -1, shapes, lambda: arrays)


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
        shapes = shard.shapes
        for spec in dataset.inputs:
            _check_array(shard.source, spec, shapes)
        if shard.num_samples < 0:
            counts = ", ".join(f"{k}: {v[0] if v else 0}" for k, v in shapes.items())
            raise DataError(f"{shard.source}: arrays disagree on the number of samples ({counts})",
                            hint="the first axis of every array counts samples")
        if shard.num_samples == 0:
            raise DataError(f"{shard.source} holds no samples")
    _check_dtypes(dataset)
    dataset.labels_key = _labels_key(dataset, labels_key, require_labels)


def _check_array(source: str, spec: InputSpec, shapes: dict[str, tuple]) -> None:
    if spec.name not in shapes:
        found = ", ".join(sorted(shapes)) or "none"
        raise DataError(f"{source} has no array for model input '{spec.name}'",
                        hint=f"arrays found: {found}; name them after the model's inputs")
    shape = shapes[spec.name]
    if spec.shape is None:
        return
    if len(shape) != len(spec.shape):
        raise DataError(
            f"{source}: array '{spec.name}' has shape {tuple(shape)} but the model expects rank "
            f"{len(spec.shape)} {_shape_text(spec.shape)} (first axis = samples)",
            hint="stack samples along a new first axis so each array is [samples, ...model dims]",
        )
    for axis, (got, want) in enumerate(zip(shape[1:], spec.shape[1:]), start=1):
        if isinstance(want, int) and want > 0 and got != want:
            raise DataError(
                f"{source}: array '{spec.name}' has size {got} on axis {axis}, the model expects {want} "
                f"(model shape {_shape_text(spec.shape)})",
                hint="resize or re-export the data to the model's input shape",
            )


def _check_dtypes(dataset: Dataset) -> None:
    first = dataset.shards[0].load()
    for spec in dataset.inputs:
        got = first[spec.name].dtype
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
    """Random inputs shaped like the model's: for latency only, never evidence of accuracy."""
    specs = model_inputs(model)
    rng = np.random.default_rng(seed)
    arrays = {spec.name: _synthetic_array(spec, samples, rng) for spec in specs}
    shapes = {k: a.shape for k, a in arrays.items()}
    shard = Shard("synthetic", samples, shapes, lambda: arrays)
    return Dataset(specs, [shard], "synthetic inputs", synthetic=True,
                   notes=["inputs are synthetic (random): accuracy figures do not reflect real data"])


def _synthetic_array(spec: InputSpec, samples: int, rng: np.random.Generator) -> np.ndarray:
    dims = list(spec.shape or (None,))
    shape = [samples] + [d if isinstance(d, int) and d > 0 else SYNTHETIC_DYNAMIC_DIM for d in dims[1:]]
    if "mask" in spec.name.lower():
        return np.ones(shape, dtype=spec.dtype)
    if np.issubdtype(spec.dtype, np.floating):
        return rng.standard_normal(shape).astype(spec.dtype)
    if spec.dtype == np.bool_:
        return np.ones(shape, dtype=bool)
    # 0 and 1 are valid in any lookup table (token types have two rows, vocabularies more).
    return rng.integers(0, 2, size=shape).astype(spec.dtype)
