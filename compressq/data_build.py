"""Build the `.npz` that `--calibration-data` / `--data` read, from the user's own files.

    dataset = build_dataset(model, BuildRequest(Path("photos/"), image=ImageOptions(mean=..., std=...)))
    write_npz(dataset, Path("calib.npz"), protect=[...])

Sources (first axis of every written array = samples, arrays named after the model's inputs, exactly what
`compressq.data.load_dataset` accepts):
  * a folder of images (.png/.jpg/... through Pillow, the optional `images` extra; .ppm/.pgm/.pnm are read
    without it): decoded to RGB, cropped and resized to the model's input size, scaled, normalized
    ((pixel / scale - mean) / std), ordered RGB or BGR, laid out NCHW / NHWC / HW as the model's input shape
    says, cast to the model's dtype;
  * a folder of `.npy` files, one sample each (or stacks of samples), for a one-input model;
  * a folder of `.npz` files, one sample each, keyed by input names (for models with several inputs);
  * one `.npy` file holding stacked samples.
Labels come from class subfolders (`folders`: sorted folder names -> 0, 1, ...) or a text file of
`file,label` lines. No typer or rich here: the CLI renders what comes back.
"""

from __future__ import annotations

import os
import zipfile
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import BinaryIO

import numpy as np
import onnx

from compressq.data import DATA_LAYOUTS, DEFAULT_LABELS_KEY, InputSpec, load_dataset, model_inputs
from compressq.errors import DataError, UsageError
from compressq.io import check_output_path, write_atomically

NETPBM_SUFFIXES = frozenset({".ppm", ".pgm", ".pnm"})
PILLOW_SUFFIXES = frozenset({".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff", ".webp"})
IMAGE_SUFFIXES = NETPBM_SUFFIXES | PILLOW_SUFFIXES
LAYOUTS = ("nchw", "nhwc")
CHANNEL_ORDERS = ("rgb", "bgr")
RESIZE_MODES = ("crop", "stretch")
LUMA = np.array([0.299, 0.587, 0.114])  # ITU-R 601, as Pillow's "L" conversion
PILLOW_HINT = "pip install 'compressq[images]' (from a clone: pip install -e '.[images]'), or convert the " \
              "images to .ppm/.pgm, which are read without Pillow"


@dataclass(frozen=True)
class ImageOptions:
    """How pixels become model input. None means: take it from the model's input."""

    size: tuple[int, int] | None = None  # (height, width)
    resize: str = "crop"  # crop: scale the shorter side, centre crop | stretch: ignore the aspect ratio
    scale: float | None = None  # pixels (0..255) are divided by this; None: 255 for float inputs, 1 for integer
    mean: tuple[float, ...] = (0.0,)
    std: tuple[float, ...] = (1.0,)
    channels: str = "rgb"  # rgb | bgr (3-channel inputs); 1-channel and HW inputs get grayscale
    layout: str | None = None  # nchw | nhwc

    def __post_init__(self):
        if self.resize not in RESIZE_MODES:
            raise UsageError(f"unknown resize mode '{self.resize}'", hint="use crop or stretch")
        if self.channels not in CHANNEL_ORDERS:
            raise UsageError(f"unknown channel order '{self.channels}'", hint="use rgb or bgr")
        if self.layout is not None and self.layout not in LAYOUTS:
            raise UsageError(f"unknown layout '{self.layout}'", hint="use nchw or nhwc")
        if self.size is not None and (len(self.size) != 2 or min(self.size) < 1):
            raise UsageError(f"bad image size {self.size}", hint="pass HEIGHTxWIDTH, e.g. 224x224")
        if self.scale is not None and not self.scale > 0:
            raise UsageError(f"--scale must be positive, got {self.scale}")
        if any(not s > 0 for s in self.std):
            raise UsageError(f"--std values must be positive, got {list(self.std)}")
        for name, values in (("mean", self.mean), ("std", self.std)):
            if len(values) not in (1, 3):
                raise UsageError(f"--{name} takes 1 or 3 values, got {len(values)}",
                                 hint="e.g. --mean 0.485,0.456,0.406")


@dataclass(frozen=True)
class BuildRequest:
    source: Path
    samples: int | None = None  # at most this many (a seeded random subset, kept in file order)
    seed: int = 0
    labels: str | None = None  # "folders" | path of a `file,label` text file
    image: ImageOptions = field(default_factory=ImageOptions)
    # batch: a file holds samples of the model's batch axis (one without it, or a stack with it);
    # stack: a file holds complete feeds exactly as fed (one as the model's shape, or a stack on a new axis 0)
    data_layout: str = "batch"

    def __post_init__(self):
        if self.data_layout not in DATA_LAYOUTS:
            raise UsageError(f"unknown data layout '{self.data_layout}'",
                             hint=f"pass one of: {', '.join(DATA_LAYOUTS)}")


@dataclass(frozen=True)
class ImageGeometry:
    """What the model's input shape says images must become."""

    layout: str  # nchw | nhwc | hw
    height: int
    width: int
    channels: int  # 1 or 3 (hw: 1)


@dataclass
class BuiltDataset:
    arrays: dict[str, np.ndarray]
    kind: str  # images | npy | npz
    files: list[Path]
    geometry: ImageGeometry | None = None
    notes: list[str] = field(default_factory=list)
    data_layout: str = "batch"  # how --calibration-data / --data must read the written file

    @property
    def num_samples(self) -> int:
        return next(iter(self.arrays.values())).shape[0]

    def describe(self) -> list[dict]:
        """One row per array: name, shape, dtype, min, max, mean (what the user checks before calibrating)."""
        rows = []
        for name, array in self.arrays.items():
            numeric = array.astype(np.float64) if array.size else np.zeros(1)
            rows.append({"name": name, "shape": list(array.shape), "dtype": str(array.dtype),
                         "min": float(numeric.min()), "max": float(numeric.max()), "mean": float(numeric.mean())})
        return rows


# ---------------------------------------------------------------------------------------------------
# Entry points


def build_dataset(model: onnx.ModelProto, request: BuildRequest) -> BuiltDataset:
    specs = model_inputs(model)
    files, kind = _source_files(request.source)
    files = _subset(files, request.samples, request.seed) if kind != "stack" else files
    stack = request.data_layout == "stack"
    if kind == "npz":
        arrays = _from_npz_files(files, specs, stack)
        built = BuiltDataset(arrays, kind, files, data_layout=request.data_layout)
    else:
        spec = _single_input(specs, kind)
        if kind == "images" and stack:
            raise UsageError("--data-layout stack is for inputs fed as stored (scalars, state tensors); images are "
                             "samples of the batch axis", hint="drop --data-layout stack for image folders")
        if kind == "images":
            geometry = image_geometry(spec, request.image)
            stacked = np.stack([image_to_input(read_image(f), geometry, request.image, spec.dtype) for f in files])
            built = BuiltDataset({spec.name: stacked}, kind, files, geometry)
        else:
            stacked = _stack_npy(files, spec, stack)
            if kind == "stack" and request.samples is not None and stacked.shape[0] > request.samples:
                stacked = stacked[_subset_indices(stacked.shape[0], request.samples, request.seed)]
            built = BuiltDataset({spec.name: stacked}, "npy", files, data_layout=request.data_layout)
    if request.labels is not None:
        if kind == "stack":
            raise UsageError("labels need one file per sample", hint="split the stack into per-sample .npy files")
        built.arrays[DEFAULT_LABELS_KEY] = _labels(request.labels, request.source, files)
    return built


def write_npz(dataset: BuiltDataset, target: Path, model: onnx.ModelProto,
              protect: Iterable[str | os.PathLike] = ()) -> Path:
    """Write atomically, after checking that `load_dataset` accepts the file for `model`."""
    target = Path(target)
    if target.suffix != ".npz":
        raise UsageError(f"output {target} must end in .npz", hint="e.g. -o calibration.npz")
    check_output_path(target, protect=[*protect, *dataset.files])
    # verified as --calibration-data reads it, with the layout it was built for
    write_atomically(target, lambda stream: _write_npz(stream, dataset.arrays),
                     verify=lambda staged: load_dataset(staged, model, layout=dataset.data_layout))
    return target


def _write_npz(stream: BinaryIO, arrays: Mapping[str, np.ndarray]) -> None:
    """numpy.savez's format (stored, zip64 members NAME.npy), written member by member: savez takes the names
    as keyword arguments, so a model input called `file` crashed it and one called `allow_pickle` was lost.
    Members carry a fixed date, so the same data gives the same bytes (savez stamps the current time)."""
    with zipfile.ZipFile(stream, "w", zipfile.ZIP_STORED, allowZip64=True) as archive:
        for name, array in arrays.items():
            member_info = zipfile.ZipInfo(f"{name}.npy", date_time=(1980, 1, 1, 0, 0, 0))
            with archive.open(member_info, "w", force_zip64=True) as member:
                np.lib.format.write_array(member, np.asanyarray(array), allow_pickle=False)


# ---------------------------------------------------------------------------------------------------
# Sources


def _source_files(source: Path) -> tuple[list[Path], str]:
    if not source.exists():
        raise DataError(f"{source} not found", hint="pass a folder of images, .npy or .npz files")
    if source.is_file():
        if source.suffix == ".npy":
            return [source], "stack"
        raise DataError(f"{source} is a single file", hint="pass a folder of images, .npy or .npz files, "
                                                           "or one .npy of stacked samples")
    files = sorted((f for f in source.rglob("*") if f.is_file() and not f.name.startswith(".")),
                   key=lambda f: f.relative_to(source).as_posix())
    kinds = {"images": [f for f in files if f.suffix.lower() in IMAGE_SUFFIXES],
             "npy": [f for f in files if f.suffix == ".npy"],
             "npz": [f for f in files if f.suffix == ".npz"]}
    present = [kind for kind, found in kinds.items() if found]
    if not present:
        raise DataError(f"{source} holds no images, .npy or .npz files",
                        hint=f"image types read: {', '.join(sorted(IMAGE_SUFFIXES))}")
    if len(present) > 1:
        raise DataError(f"{source} mixes {' and '.join(present)}", hint="use one kind of file per folder")
    return kinds[present[0]], present[0]


def _subset_indices(count: int, samples: int, seed: int) -> np.ndarray:
    if samples < 1:
        raise UsageError(f"--samples must be at least 1, got {samples}")
    if count <= samples:
        return np.arange(count)
    return np.sort(np.random.default_rng(seed).choice(count, size=samples, replace=False))


def _subset(files: list[Path], samples: int | None, seed: int) -> list[Path]:
    return files if samples is None else [files[i] for i in _subset_indices(len(files), samples, seed)]


def _single_input(specs: Sequence[InputSpec], kind: str) -> InputSpec:
    if len(specs) != 1:
        names = ", ".join(s.name for s in specs)
        filler = "images fill" if kind == "images" else ".npy files fill"
        raise UsageError(f"the model has {len(specs)} inputs ({names}); {filler} only one",
                         hint="save one .npz per sample keyed by input names and pass that folder instead "
                              "(see the README's recipe)")
    return specs[0]


def _cast(array: np.ndarray, spec: InputSpec, source: Path) -> np.ndarray:
    if array.dtype == spec.dtype:
        return array
    if np.issubdtype(array.dtype, np.floating) and not np.issubdtype(spec.dtype, np.floating):
        raise DataError(f"{source} holds {array.dtype} values, the model input '{spec.name}' is {spec.dtype}",
                        hint=f"convert the arrays with .astype(np.{spec.dtype}) first")
    return array.astype(spec.dtype)


def _as_samples(array: np.ndarray, spec: InputSpec, source: Path, stack: bool = False) -> np.ndarray:
    """One sample or a stack of them -> [samples, ...]. A sample is the model's shape without the batch
    axis (layout batch) or the whole feed as the model takes it, a scalar included (layout stack)."""
    if not stack and spec.shape is not None and len(spec.shape) == 0:
        raise DataError(f"input '{spec.name}' is a scalar: it has no batch axis to stack samples on",
                        hint="pass --data-layout stack (each file holds complete feeds, a scalar as it is fed)")
    one = len(spec.shape) - 1 + stack if spec.shape is not None else array.ndim  # unknown rank: one sample
    if array.ndim == one:
        array = array[None]
    elif array.ndim != one + 1:
        shape = _shape_text(spec.shape)
        raise DataError(f"{source}: array of shape {list(array.shape)} does not fit input '{spec.name}' "
                        f"(model shape {shape})",
                        hint=f"save one complete feed {shape} per file, or a stack of them on a new first axis"
                        if stack else "save one sample per file without the batch axis, or stacks with it")
    return _cast(array, spec, source)


def _concatenate(parts: list[np.ndarray], name: str, files: list[Path]) -> np.ndarray:
    shapes = {part.shape[1:] for part in parts}
    if len(shapes) > 1:
        first = next(i for i, p in enumerate(parts) if p.shape[1:] != parts[0].shape[1:])
        raise DataError(f"samples for '{name}' differ in shape: {files[0].name} is {list(parts[0].shape[1:])}, "
                        f"{files[first].name} is {list(parts[first].shape[1:])}",
                        hint="pad or crop every sample to one shape (e.g. a tokenizer's padding='max_length')")
    return np.concatenate(parts)


def _stack_npy(files: list[Path], spec: InputSpec, stack: bool) -> np.ndarray:
    parts = [_as_samples(_load_npy(f), spec, f, stack) for f in files]
    return _concatenate(parts, spec.name, files)


def _load_npy(path: Path) -> np.ndarray:
    try:
        return np.load(path, allow_pickle=False)
    except (OSError, ValueError) as exc:
        raise DataError(f"cannot read {path}: {exc}", hint="save arrays with numpy.save") from exc


def _from_npz_files(files: list[Path], specs: Sequence[InputSpec], stack: bool) -> dict[str, np.ndarray]:
    parts: dict[str, list[np.ndarray]] = {spec.name: [] for spec in specs}
    for path in files:
        try:
            with np.load(path, allow_pickle=False) as archive:
                arrays = {key: archive[key] for key in archive.files}
        except (OSError, ValueError) as exc:
            raise DataError(f"cannot read {path}: {exc}", hint="save arrays with numpy.savez") from exc
        for spec in specs:
            if spec.name not in arrays:
                raise DataError(f"{path} has no array for model input '{spec.name}'",
                                hint=f"arrays found: {', '.join(sorted(arrays)) or 'none'}")
            parts[spec.name].append(_as_samples(arrays[spec.name], spec, path, stack))
    return {name: _concatenate(found, name, files) for name, found in parts.items()}


def _labels(labels: str, source: Path, files: list[Path]) -> np.ndarray:
    if labels == "folders":
        classes = [f.parent.relative_to(source).as_posix() for f in files]
        if "." in classes:
            loose = files[classes.index(".")].name
            raise DataError(f"--labels folders: {loose} is not in a class subfolder",
                            hint="put each class in its own subfolder of the source folder")
        names = sorted(set(classes))
        return np.array([names.index(c) for c in classes], dtype=np.int64)
    table = _read_label_file(Path(labels))
    values = []
    for f in files:
        relative = f.relative_to(source).as_posix() if source.is_dir() else f.name
        for key in (relative, f.name, f.stem):
            if key in table:
                values.append(table[key])
                break
        else:
            raise DataError(f"{labels} has no label for {relative}", hint="one 'file,label' line per sample")
    return np.array(values, dtype=np.int64)


def _read_label_file(path: Path) -> dict[str, int]:
    try:
        lines = path.read_text().splitlines()
    except OSError as exc:
        raise DataError(f"cannot read labels file {path}: {exc.strerror or exc}",
                        hint="pass 'folders' or a text file of 'file,label' lines") from exc
    table = {}
    for number, line in enumerate(lines, start=1):
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        name, _, label = line.replace("\t", ",").rpartition(",")
        try:
            table[name.strip()] = int(label)
        except ValueError:
            if number == 1:  # a header line such as `file,label`
                continue
            raise DataError(f"{path}:{number}: '{line}' is not 'file,label' with an integer label") from None
    return table


# ---------------------------------------------------------------------------------------------------
# Images


def image_geometry(spec: InputSpec, options: ImageOptions) -> ImageGeometry:
    """Layout, size and channel count from the model's input shape, overridden by explicit options."""
    shape = spec.shape
    if shape is None or len(shape) not in (3, 4):
        raise DataError(f"input '{spec.name}' has shape {_shape_text(shape)}, not an image batch",
                        hint="images fill inputs shaped [batch, C, H, W], [batch, H, W, C] or [batch, H, W]")

    def known(dim) -> int | None:
        return dim if isinstance(dim, int) and dim > 0 else None

    if len(shape) == 3:
        layout, dims, channels = "hw", (shape[1], shape[2]), 1
    else:
        layout = options.layout or _guess_layout(shape)
        dims = (shape[2], shape[3]) if layout == "nchw" else (shape[1], shape[2])
        channels = known(shape[1] if layout == "nchw" else shape[3]) or 3
        if channels not in (1, 3):
            raise DataError(f"input '{spec.name}' {_shape_text(shape)} has {channels} channels in {layout}",
                            hint="images give 1 (grayscale) or 3 (RGB/BGR) channels; pass --layout if it is wrong")
    height, width = options.size or (known(dims[0]), known(dims[1]))
    if height is None or width is None:
        raise UsageError(f"input '{spec.name}' {_shape_text(shape)} does not fix the image size",
                         hint="pass --size HEIGHTxWIDTH, e.g. --size 224x224")
    return ImageGeometry(layout, height, width, channels)


def _guess_layout(shape: tuple) -> str:
    second, last = shape[1], shape[3]
    if last in (1, 3) and second not in (1, 3):
        return "nhwc"
    return "nchw"


def read_image(path: Path) -> np.ndarray:
    """Pixels as float64 [H, W, 3] (or [H, W, 1] for grayscale files) in 0..255."""
    if path.suffix.lower() in NETPBM_SUFFIXES:
        return read_netpbm(path)
    try:
        from PIL import Image, ImageOps
    except ImportError:
        raise DataError(f"reading {path.suffix} images needs Pillow, which is not installed",
                        hint=PILLOW_HINT) from None
    try:
        with Image.open(path) as image:
            image = ImageOps.exif_transpose(image)
            gray = image.mode in ("L", "I", "I;16", "1")
            pixels = np.asarray(image.convert("L" if gray else "RGB"), dtype=np.float64)
    except OSError as exc:
        raise DataError(f"cannot read image {path}: {exc}") from exc
    return pixels[:, :, None] if gray else pixels


def read_netpbm(path: Path) -> np.ndarray:
    """Binary or ASCII PGM/PPM (P2, P3, P5, P6) without Pillow; values rescaled to 0..255."""
    data = path.read_bytes()
    tokens: list[bytes] = []
    position = 0
    while len(tokens) < 4:  # magic, width, height, maxval; '#' starts a comment in the header
        while position < len(data) and data[position:position + 1].isspace():
            position += 1
        if data[position:position + 1] == b"#":
            position = data.find(b"\n", position) + 1 or len(data)
            continue
        start = position
        while position < len(data) and not data[position:position + 1].isspace():
            position += 1
        if start == position:
            raise DataError(f"{path} is not a PGM/PPM image (truncated header)")
        tokens.append(data[start:position])
    magic = tokens[0]
    if magic not in (b"P2", b"P3", b"P5", b"P6"):
        raise DataError(f"{path} is not a PGM/PPM image (magic {magic!r})", hint=PILLOW_HINT)
    try:
        width, height, maxval = (int(t) for t in tokens[1:])
    except ValueError:
        raise DataError(f"{path}: bad PGM/PPM header") from None
    channels = 3 if magic in (b"P3", b"P6") else 1
    count = width * height * channels
    if magic in (b"P5", b"P6"):
        dtype = np.dtype(">u2") if maxval > 255 else np.dtype("u1")
        body = data[position + 1:]
        if len(body) < count * dtype.itemsize:
            raise DataError(f"{path}: image data is truncated")
        values = np.frombuffer(body, dtype=dtype, count=count)
    else:
        values = np.array(data[position:].split()[:count], dtype=np.int64)
        if values.size < count:
            raise DataError(f"{path}: image data is truncated")
    return values.reshape(height, width, channels).astype(np.float64) * (255.0 / maxval)


def resample_matrix(source: int, target: int) -> np.ndarray:
    """[target, source] weights of a linear (triangle) filter, widened when shrinking so it averages
    every source pixel (antialiasing, as Pillow's resize does)."""
    scale = source / target
    support = max(scale, 1.0)
    centers = (np.arange(target) + 0.5) * scale
    distance = np.abs((np.arange(source) + 0.5)[None, :] - centers[:, None]) / support
    weights = np.clip(1.0 - distance, 0.0, None)
    return weights / weights.sum(axis=1, keepdims=True)


def resize(pixels: np.ndarray, height: int, width: int, mode: str = "crop") -> np.ndarray:
    """[H, W, C] -> [height, width, C]; `crop` keeps the aspect ratio and cuts the longer side's centre."""
    source_h, source_w = pixels.shape[:2]
    if mode == "crop":
        ratio = min(source_h / height, source_w / width)
        crop_h, crop_w = max(1, round(height * ratio)), max(1, round(width * ratio))
        top, left = (source_h - crop_h) // 2, (source_w - crop_w) // 2
        pixels = pixels[top:top + crop_h, left:left + crop_w]
    if pixels.shape[:2] == (height, width):
        return pixels
    rows = resample_matrix(pixels.shape[0], height)
    columns = resample_matrix(pixels.shape[1], width)
    return np.einsum("oh,hwc,pw->opc", rows, pixels, columns, optimize=True)


def image_to_input(pixels: np.ndarray, geometry: ImageGeometry, options: ImageOptions,
                   dtype: np.dtype) -> np.ndarray:
    """One decoded image -> one sample of the model input (no batch axis)."""
    pixels = resize(pixels, geometry.height, geometry.width, options.resize)
    if geometry.channels == 1 and pixels.shape[2] == 3:
        pixels = (pixels @ LUMA)[:, :, None]
    elif geometry.channels == 3 and pixels.shape[2] == 1:
        pixels = np.repeat(pixels, 3, axis=2)
    if geometry.channels == 3 and options.channels == "bgr":
        pixels = pixels[:, :, ::-1]
    integer = not np.issubdtype(dtype, np.floating)
    scale = options.scale if options.scale is not None else (1.0 if integer else 255.0)
    mean, std = _per_channel(options.mean, geometry.channels), _per_channel(options.std, geometry.channels)
    values = (pixels / scale - mean) / std
    if integer:
        limits = np.iinfo(dtype)
        values = np.clip(np.rint(values), limits.min, limits.max)
    if geometry.layout == "nchw":
        values = values.transpose(2, 0, 1)
    elif geometry.layout == "hw":
        values = values[:, :, 0]
    return values.astype(dtype)


def _per_channel(values: tuple[float, ...], channels: int) -> np.ndarray:
    if len(values) == 3 and channels == 1:
        raise UsageError("3 mean/std values given for a 1-channel input", hint="pass one value")
    return np.broadcast_to(np.asarray(values, dtype=np.float64), (channels,))


def _shape_text(shape) -> str:
    return "[?]" if shape is None else "[" + ", ".join("?" if d is None else str(d) for d in shape) + "]"
