"""Train and export the sample digit classifiers used by compressq's tests and demos.

Run from anywhere: ``python sample_models/build.py``. Torch is needed only here, at
build time; the committed .onnx and .npz files are what the rest of the project uses.
Everything is seeded, so rebuilding on the same library versions reproduces the
same accuracies.
"""

from __future__ import annotations

import random
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import torch
import torch.nn.functional as F
from sklearn.datasets import load_digits
from sklearn.model_selection import train_test_split
from torch import nn

OUT_DIR = Path(__file__).resolve().parent
SEED = 0
OPSET = 17
NUM_THREADS = 2
NUM_CLASSES = 10
CALIB_SAMPLES = 256
TEST_FRACTION = 0.3

CNN_BAR = 0.97
MOBILENET_BAR = 0.96
TRANSFORMER_BAR = 0.96


# --------------------------------------------------------------------------- setup


def make_deterministic(seed: int = SEED) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    torch.set_num_threads(NUM_THREADS)
    torch.use_deterministic_algorithms(True)
    # The TorchScript exporter is chosen on purpose (no onnxscript dependency, and it emits
    # the Shape/Gather/Reshape-heavy graphs that real exported models have), so its
    # deprecation notice is noise here.
    warnings.filterwarnings("ignore", message="You are using the legacy TorchScript-based ONNX export")


@dataclass(frozen=True)
class DigitSplits:
    train_images: np.ndarray  # float32 [N, 8, 8] in [0, 1]
    train_labels: np.ndarray  # int64 [N]
    test_images: np.ndarray
    test_labels: np.ndarray


def load_digit_splits() -> DigitSplits:
    digits = load_digits()
    images = (digits.images / 16.0).astype(np.float32)
    labels = digits.target.astype(np.int64)
    x_train, x_test, y_train, y_test = train_test_split(
        images, labels, test_size=TEST_FRACTION, random_state=SEED, stratify=labels
    )
    return DigitSplits(x_train, y_train, x_test, y_test)


def as_channel_images(images: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(images[:, None, :, :], dtype=np.float32)


def all_rows_kept(images: np.ndarray) -> np.ndarray:
    return np.ones(images.shape[:2], dtype=np.float32)


def write_datasets(splits: DigitSplits) -> None:
    calib = splits.train_images[:CALIB_SAMPLES]
    np.savez(OUT_DIR / "digits_calib.npz", input=as_channel_images(calib))
    np.savez(
        OUT_DIR / "digits_eval.npz",
        input=as_channel_images(splits.test_images),
        labels=splits.test_labels,
    )
    np.savez(OUT_DIR / "digits_seq_calib.npz", input=calib, mask=all_rows_kept(calib))
    np.savez(
        OUT_DIR / "digits_seq_eval.npz",
        input=splits.test_images,
        mask=all_rows_kept(splits.test_images),
        labels=splits.test_labels,
    )


# --------------------------------------------------------------------------- models


def conv_bn_relu(in_channels: int, out_channels: int) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(in_channels, out_channels, 3, padding=1, bias=False),
        nn.BatchNorm2d(out_channels),
        nn.ReLU(),
    )


class DigitsCNN(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.features = nn.Sequential(conv_bn_relu(1, 16), conv_bn_relu(16, 32), nn.MaxPool2d(2))
        self.classifier = nn.Sequential(
            nn.Flatten(),
            nn.Linear(32 * 4 * 4, 64),
            nn.ReLU(),
            nn.Dropout(0.2),
            nn.Linear(64, NUM_CLASSES),
        )

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.features(images))


def conv_bn_relu6(conv: nn.Conv2d) -> nn.Sequential:
    return nn.Sequential(conv, nn.BatchNorm2d(conv.out_channels), nn.ReLU6())


class DepthwiseSeparableBlock(nn.Module):
    """Depthwise 3x3 + pointwise 1x1; adds the input back when shapes allow (inverted residual)."""

    def __init__(self, in_channels: int, out_channels: int, stride: int = 1) -> None:
        super().__init__()
        depthwise = nn.Conv2d(in_channels, in_channels, 3, stride=stride, padding=1, groups=in_channels, bias=False)
        pointwise = nn.Conv2d(in_channels, out_channels, 1, bias=False)
        self.depthwise = conv_bn_relu6(depthwise)
        self.pointwise = conv_bn_relu6(pointwise)
        self.has_skip = stride == 1 and in_channels == out_channels

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.pointwise(self.depthwise(x))
        return x + y if self.has_skip else y


class DigitsMobileNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.stem = conv_bn_relu6(nn.Conv2d(1, 16, 3, padding=1, bias=False))
        self.blocks = nn.Sequential(
            DepthwiseSeparableBlock(16, 32),
            DepthwiseSeparableBlock(32, 32),
            DepthwiseSeparableBlock(32, 64, stride=2),
            DepthwiseSeparableBlock(64, 64),
        )
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.head = nn.Linear(64, NUM_CLASSES)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        x = self.pool(self.blocks(self.stem(images)))
        return self.head(torch.flatten(x, 1))


class MultiHeadSelfAttention(nn.Module):
    def __init__(self, d_model: int, heads: int) -> None:
        super().__init__()
        self.heads = heads
        self.head_dim = d_model // heads
        self.query = nn.Linear(d_model, d_model)
        self.key = nn.Linear(d_model, d_model)
        self.value = nn.Linear(d_model, d_model)
        self.out = nn.Linear(d_model, d_model)

    def split_heads(self, x: torch.Tensor) -> torch.Tensor:
        batch, seq, _ = x.shape
        return x.reshape(batch, seq, self.heads, self.head_dim).transpose(1, 2)

    def forward(self, x: torch.Tensor, additive_mask: torch.Tensor) -> torch.Tensor:
        q, k, v = (self.split_heads(proj(x)) for proj in (self.query, self.key, self.value))
        scores = torch.matmul(q, k.transpose(-1, -2)) / (self.head_dim**0.5)
        weights = torch.softmax(scores + additive_mask, dim=-1)
        context = torch.matmul(weights, v).transpose(1, 2)
        return self.out(context.reshape(x.shape))


class EncoderLayer(nn.Module):
    """Post-LayerNorm (BERT-style) encoder layer built from plain ops so it exports flat."""

    def __init__(self, d_model: int, heads: int, mlp_dim: int, dropout: float) -> None:
        super().__init__()
        self.attention = MultiHeadSelfAttention(d_model, heads)
        self.attention_norm = nn.LayerNorm(d_model)
        self.mlp = nn.Sequential(
            nn.Linear(d_model, mlp_dim),
            nn.GELU(approximate="none"),
            nn.Linear(mlp_dim, d_model),
        )
        self.mlp_norm = nn.LayerNorm(d_model)
        self.dropout = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor, additive_mask: torch.Tensor) -> torch.Tensor:
        x = self.attention_norm(x + self.dropout(self.attention(x, additive_mask)))
        return self.mlp_norm(x + self.dropout(self.mlp(x)))


class DigitsTransformer(nn.Module):
    """Reads an 8x8 digit as a sequence of 8 rows; `mask` marks real (1) vs padded (0) rows."""

    def __init__(
        self,
        rows: int = 8,
        row_width: int = 8,
        d_model: int = 64,
        heads: int = 4,
        layers: int = 2,
        mlp_dim: int = 128,
        dropout: float = 0.1,
    ) -> None:
        super().__init__()
        self.embed = nn.Linear(row_width, d_model)
        self.position = nn.Parameter(torch.randn(1, rows, d_model) * 0.02)
        self.layers = nn.ModuleList(EncoderLayer(d_model, heads, mlp_dim, dropout) for _ in range(layers))
        self.head = nn.Linear(d_model, NUM_CLASSES)

    def forward(self, rows: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        # Same additive-mask construction as Hugging Face exports, so compressq sees the
        # huge-negative constant that real transformer graphs carry.
        additive_mask = (1.0 - mask)[:, None, None, :] * torch.finfo(torch.float32).min
        x = self.embed(rows) + self.position
        for layer in self.layers:
            x = layer(x, additive_mask)
        keep = mask.unsqueeze(-1)
        pooled = (x * keep).sum(dim=1) / keep.sum(dim=1).clamp(min=1.0)
        return self.head(pooled)


# --------------------------------------------------------------------------- training


Batch = tuple[torch.Tensor, ...]
Augment = Callable[[Batch, torch.Generator], Batch]


def pad_trailing_rows(batch: Batch, generator: torch.Generator) -> Batch:
    """Blank out and mask the last 0-2 rows so the mask path is trained, not just wired."""
    rows, mask = batch
    rows, mask = rows.clone(), mask.clone()
    seq = rows.shape[1]
    padded_rows = torch.randint(0, 3, (rows.shape[0],), generator=generator)
    is_padding = torch.arange(seq)[None, :] >= (seq - padded_rows)[:, None]
    rows[is_padding] = 0.0
    mask[is_padding] = 0.0
    return rows, mask


def train_classifier(
    model: nn.Module,
    inputs: Batch,
    labels: torch.Tensor,
    epochs: int,
    lr: float,
    batch_size: int = 64,
    augment: Augment | None = None,
) -> None:
    generator = torch.Generator().manual_seed(SEED)
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=1e-4)
    steps_per_epoch = -(-len(labels) // batch_size)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=lr, total_steps=epochs * steps_per_epoch)
    model.train()
    for _ in range(epochs):
        order = torch.randperm(len(labels), generator=generator)
        for start in range(0, len(labels), batch_size):
            index = order[start : start + batch_size]
            batch = tuple(tensor[index] for tensor in inputs)
            if augment is not None:
                batch = augment(batch, generator)
            loss = F.cross_entropy(model(*batch), labels[index])
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            schedule.step()
    model.eval()


def parameter_count(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


# --------------------------------------------------------------------------- export + verify


def export_onnx(
    model: nn.Module,
    example: Batch,
    input_names: list[str],
    path: Path,
    keep_batchnorm: bool = False,
) -> None:
    dynamic_axes = {name: {0: "batch"} for name in [*input_names, "logits"]}
    # TorchScript exporter: EVAL mode folds BatchNorm into the preceding Conv; PRESERVE
    # (with folding off, as the exporter recommends) keeps BatchNormalization nodes.
    training = torch.onnx.TrainingMode.PRESERVE if keep_batchnorm else torch.onnx.TrainingMode.EVAL
    with torch.no_grad():
        torch.onnx.export(
            model,
            example,
            str(path),
            input_names=input_names,
            output_names=["logits"],
            dynamic_axes=dynamic_axes,
            opset_version=OPSET,
            training=training,
            do_constant_folding=not keep_batchnorm,
            dynamo=False,
        )


def check_onnx(path: Path) -> onnx.ModelProto:
    model = onnx.load(str(path))
    onnx.checker.check_model(model, full_check=True)
    return model


def onnxruntime_session(path: Path) -> ort.InferenceSession:
    options = ort.SessionOptions()
    options.intra_op_num_threads = NUM_THREADS
    options.inter_op_num_threads = 1
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def onnxruntime_accuracy(path: Path, feeds: dict[str, np.ndarray], labels: np.ndarray) -> float:
    (logits,) = onnxruntime_session(path).run(["logits"], feeds)
    return float((np.argmax(logits, axis=1) == labels).mean())


def op_types(model: onnx.ModelProto) -> set[str]:
    return {node.op_type for node in model.graph.node}


def require(condition: bool, message: str) -> None:
    if not condition:
        raise SystemExit(f"build failed: {message}")


# --------------------------------------------------------------------------- per-model builds


@dataclass(frozen=True)
class BuildResult:
    filename: str
    parameters: int
    torch_accuracy: float
    onnx_accuracy: float
    seconds: float


def torch_accuracy(model: nn.Module, inputs: Batch, labels: torch.Tensor) -> float:
    with torch.no_grad():
        return float((model(*inputs).argmax(dim=1) == labels).float().mean())


def build_image_model(
    model: nn.Module,
    filename: str,
    splits: DigitSplits,
    bar: float,
    epochs: int,
    lr: float,
    keep_batchnorm: bool = False,
) -> BuildResult:
    started = time.perf_counter()
    train_x = torch.from_numpy(as_channel_images(splits.train_images))
    test_x = as_channel_images(splits.test_images)
    train_classifier(model, (train_x,), torch.from_numpy(splits.train_labels), epochs, lr)
    path = OUT_DIR / filename
    export_onnx(model, (train_x[:2],), ["input"], path, keep_batchnorm=keep_batchnorm)
    exported = check_onnx(path)
    if keep_batchnorm:
        require("BatchNormalization" in op_types(exported), f"{filename} lost its BatchNorm nodes")
    accuracy = onnxruntime_accuracy(path, {"input": test_x}, splits.test_labels)
    require(accuracy >= bar, f"{filename} test accuracy {accuracy:.4f} < {bar}")
    return BuildResult(
        filename,
        parameter_count(model),
        torch_accuracy(model, (torch.from_numpy(test_x),), torch.from_numpy(splits.test_labels)),
        accuracy,
        time.perf_counter() - started,
    )


def build_transformer(splits: DigitSplits) -> BuildResult:
    started = time.perf_counter()
    filename = "digits_transformer.onnx"
    model = DigitsTransformer()
    train_rows = torch.from_numpy(splits.train_images)
    train_mask = torch.from_numpy(all_rows_kept(splits.train_images))
    train_classifier(
        model,
        (train_rows, train_mask),
        torch.from_numpy(splits.train_labels),
        epochs=60,
        lr=2e-3,
        augment=pad_trailing_rows,
    )
    path = OUT_DIR / filename
    export_onnx(model, (train_rows[:2], train_mask[:2]), ["input", "mask"], path)
    exported = check_onnx(path)
    missing = {"LayerNormalization", "Erf", "Softmax"} - op_types(exported)
    require(not missing, f"{filename} is missing {sorted(missing)}")
    test_feeds = {"input": splits.test_images, "mask": all_rows_kept(splits.test_images)}
    accuracy = onnxruntime_accuracy(path, test_feeds, splits.test_labels)
    require(accuracy >= TRANSFORMER_BAR, f"{filename} test accuracy {accuracy:.4f} < {TRANSFORMER_BAR}")
    test_inputs = tuple(torch.from_numpy(test_feeds[name]) for name in ("input", "mask"))
    return BuildResult(
        filename,
        parameter_count(model),
        torch_accuracy(model, test_inputs, torch.from_numpy(splits.test_labels)),
        accuracy,
        time.perf_counter() - started,
    )


def print_summary(results: list[BuildResult]) -> None:
    header = f"{'model':<26} {'params':>8} {'torch acc':>10} {'onnx acc':>9} {'size KiB':>9} {'secs':>6}"
    print(header)
    print("-" * len(header))
    for r in results:
        size_kib = (OUT_DIR / r.filename).stat().st_size / 1024
        print(
            f"{r.filename:<26} {r.parameters:>8,} {r.torch_accuracy:>10.4f} "
            f"{r.onnx_accuracy:>9.4f} {size_kib:>9.1f} {r.seconds:>6.1f}"
        )


def main() -> None:
    make_deterministic()
    splits = load_digit_splits()
    write_datasets(splits)
    results = []
    make_deterministic()
    results.append(build_image_model(DigitsCNN(), "digits_cnn.onnx", splits, CNN_BAR, epochs=30, lr=3e-3))
    make_deterministic()
    results.append(
        build_image_model(
            DigitsMobileNet(),
            "digits_mobilenet.onnx",
            splits,
            MOBILENET_BAR,
            epochs=40,
            lr=5e-3,
            keep_batchnorm=True,
        )
    )
    make_deterministic()
    results.append(build_transformer(splits))
    print_summary(results)


if __name__ == "__main__":
    main()
