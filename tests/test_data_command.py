"""`compressq data`: the .npz that --calibration-data reads, built from images, .npy or .npz files.

Images are checked against numpy references computed here; .pgm/.ppm need no Pillow, so the image path is
tested without it too. Tests of other formats skip when Pillow is absent.
"""

from __future__ import annotations

import json
import zipfile
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper

from compressq.data import load_dataset
from compressq.data_build import ImageGeometry, ImageOptions, image_to_input, read_netpbm, resample_matrix, resize
from compressq.errors import DataError
from tests.conftest import make_model
from tests.helpers import write_pnm


def identity_model(shape, elem_type=TensorProto.FLOAT, extra: dict | None = None) -> onnx.ModelProto:
    """x -> y (Identity); every extra input `name` -> `name_out`."""
    inputs = [helper.make_tensor_value_info("x", elem_type, list(shape))]
    outputs = [helper.make_tensor_value_info("y", elem_type, list(shape))]
    nodes = [helper.make_node("Identity", ["x"], ["y"], name="id")]
    for name, (extra_shape, extra_type) in (extra or {}).items():
        inputs.append(helper.make_tensor_value_info(name, extra_type, list(extra_shape)))
        outputs.append(helper.make_tensor_value_info(f"{name}_out", extra_type, list(extra_shape)))
        nodes.append(helper.make_node("Identity", [name], [f"{name}_out"], name=f"id_{name}"))
    return make_model(nodes, inputs, outputs)


def save(model: onnx.ModelProto, path: Path) -> Path:
    onnx.save_model(model, str(path))
    return path


def digit_images(folder: Path, eval_npz: Path, count: int = 6) -> tuple[np.ndarray, np.ndarray]:
    """The first `count` digits of the eval split as 8-bit .pgm files in one subfolder per label.

    Returns inputs and labels in the order the files sort in (class folder, then file name)."""
    with np.load(eval_npz) as archive:
        inputs, labels = archive["input"][:count], archive["labels"][:count]
    for i, (image, label) in enumerate(zip(inputs, labels)):
        write_pnm(folder / f"class{label}" / f"{i:03d}.pgm", np.rint(image[0] * 255).astype(np.uint8))
    order = sorted(range(count), key=lambda i: (f"class{labels[i]}", i))
    return inputs[order], labels[order]


# ---------------------------------------------------------------------------------------------------
# Numpy kernels


@pytest.mark.parametrize("ascii_body", [False, True])
def test_netpbm_reader_matches_the_pixels_written(tmp_path, ascii_body):
    rng = np.random.default_rng(0)
    color = rng.integers(0, 256, (5, 7, 3))
    gray = rng.integers(0, 256, (4, 3))
    assert np.array_equal(read_netpbm(write_pnm(tmp_path / "c.ppm", color, ascii_body=ascii_body)), color)
    assert np.array_equal(read_netpbm(write_pnm(tmp_path / "g.pgm", gray, ascii_body=ascii_body)), gray[:, :, None])


def test_netpbm_16_bit_is_rescaled_to_0_255(tmp_path):
    pixels = np.array([[0, 1000], [65535, 32768]])
    read = read_netpbm(write_pnm(tmp_path / "deep.pgm", pixels, maxval=65535))
    assert np.allclose(read[:, :, 0], pixels * 255 / 65535)


def test_netpbm_reader_rejects_other_files(tmp_path):
    path = tmp_path / "fake.ppm"
    path.write_bytes(b"GIF89a not a netpbm")
    with pytest.raises(DataError, match="not a PGM/PPM"):
        read_netpbm(path)


@pytest.mark.parametrize(("source", "target"), [(8, 8), (9, 4), (4, 9), (224, 7), (5, 1)])
def test_resample_weights_are_a_partition_of_unity(source, target):
    weights = resample_matrix(source, target)
    assert weights.shape == (target, source)
    assert np.allclose(weights.sum(axis=1), 1.0)
    assert (weights >= 0).all()
    if source == target:
        assert np.allclose(weights, np.eye(source))


def test_halving_averages_neighbours_with_a_triangle_filter():
    # Shrinking by 2: output pixel o is centred at 2o + 1 in source pixels; a triangle filter twice as wide
    # gives the four nearest source pixels weights 1, 3, 3, 1 (edges renormalized).
    row = np.arange(8.0)
    out = resample_matrix(8, 4) @ row
    expected = [(0 * 3 + 1 * 3 + 2 * 1) / 7] + [(row[2 * o - 1] + 3 * row[2 * o] + 3 * row[2 * o + 1]
                                                 + row[2 * o + 2]) / 8 for o in (1, 2)]
    assert np.allclose(out[:3], expected)


def test_crop_keeps_the_centre_of_the_longer_side():
    pixels = np.zeros((4, 8, 1))
    pixels[:, 2:6] = 1.0  # the centre 4x4 square
    assert np.allclose(resize(pixels, 4, 4, "crop"), 1.0)
    stretched = resize(pixels, 4, 4, "stretch")
    assert stretched.min() < 0.5 < stretched.max()


def test_image_to_input_bgr_nhwc_mean_std_against_numpy():
    pixels = np.random.default_rng(1).integers(0, 256, (3, 5, 3)).astype(np.float64)
    options = ImageOptions(mean=(0.1, 0.2, 0.3), std=(0.5, 0.25, 2.0), channels="bgr")
    got = image_to_input(pixels, ImageGeometry("nhwc", 3, 5, 3), options, np.dtype(np.float32))
    expected = (pixels[:, :, ::-1] / 255 - np.array([0.1, 0.2, 0.3])) / np.array([0.5, 0.25, 2.0])
    assert got.dtype == np.float32 and got.shape == (3, 5, 3)
    assert np.allclose(got, expected, atol=1e-6)
    nchw = image_to_input(pixels, ImageGeometry("nchw", 3, 5, 3), options, np.dtype(np.float32))
    assert np.allclose(nchw, expected.transpose(2, 0, 1), atol=1e-6)


def test_uint8_inputs_get_raw_pixels_and_gray_uses_luma():
    pixels = np.array([[[255, 0, 0], [0, 255, 0]], [[0, 0, 255], [10, 20, 30]]], dtype=np.float64)
    raw = image_to_input(pixels, ImageGeometry("nhwc", 2, 2, 3), ImageOptions(), np.dtype(np.uint8))
    assert raw.dtype == np.uint8 and np.array_equal(raw, pixels.astype(np.uint8))
    gray = image_to_input(pixels, ImageGeometry("hw", 2, 2, 1), ImageOptions(), np.dtype(np.float32))
    assert np.allclose(gray, (pixels @ [0.299, 0.587, 0.114]) / 255, atol=1e-6)


# ---------------------------------------------------------------------------------------------------
# The command


def test_digit_images_rebuild_the_eval_arrays_with_folder_labels(tmp_path, run_cli, cnn_path, eval_npz):
    inputs, labels = digit_images(tmp_path / "digits", eval_npz)
    out = tmp_path / "calib.npz"
    result = run_cli("data", cnn_path, tmp_path / "digits", "-o", out, "--labels", "folders")
    assert result.exit_code == 0, result.stderr
    assert "input" in result.stdout and "[6, 1, 8, 8]" in result.stdout and "float32" in result.stdout
    with np.load(out) as written:
        assert written["input"].dtype == np.float32
        assert np.abs(written["input"] - inputs).max() <= 0.5 / 255 + 1e-6
        classes = sorted(set(labels.tolist()))
        assert np.array_equal(written["labels"], [classes.index(label) for label in labels])
    dataset = load_dataset(out, onnx.load(str(cnn_path)), require_labels=True)
    assert dataset.num_samples == 6


def test_json_lists_arrays_shapes_and_ranges(tmp_path, run_cli, cnn_path, eval_npz):
    digit_images(tmp_path / "digits", eval_npz, count=3)
    result = run_cli("data", cnn_path, tmp_path / "digits", "-o", tmp_path / "c.npz", "--json")
    assert result.exit_code == 0, result.stderr
    report = json.loads(result.stdout)
    assert report["samples"] == 3 and report["kind"] == "images"
    assert report["image"] == {"layout": "nchw", "height": 8, "width": 8, "channels": 1}
    (row,) = report["arrays"]
    assert row["name"] == "input" and row["shape"] == [3, 1, 8, 8] and 0 <= row["min"] <= row["max"] <= 1


def test_color_ppm_to_nhwc_model_with_size_from_the_model(tmp_path, run_cli):
    model = save(identity_model(["N", 4, 6, 3]), tmp_path / "m.onnx")
    pixels = np.random.default_rng(2).integers(0, 256, (8, 12, 3))
    write_pnm(tmp_path / "imgs" / "a.ppm", pixels)
    out = tmp_path / "c.npz"
    result = run_cli("data", model, tmp_path / "imgs", "-o", out, "--mean", "0.5", "--std", "0.5")
    assert result.exit_code == 0, result.stderr
    expected = (resize(pixels.astype(np.float64), 4, 6) / 255 - 0.5) / 0.5
    with np.load(out) as written:
        assert written["x"].shape == (1, 4, 6, 3)
        assert np.allclose(written["x"][0], expected, atol=1e-5)


def test_dynamic_image_size_needs_size_option(tmp_path, run_cli):
    model = save(identity_model(["N", 3, "H", "W"]), tmp_path / "m.onnx")
    write_pnm(tmp_path / "imgs" / "a.ppm", np.zeros((10, 10, 3), dtype=np.uint8))
    result = run_cli("data", model, tmp_path / "imgs", "-o", tmp_path / "c.npz")
    assert result.exit_code == 2 and "--size" in result.stderr
    assert not (tmp_path / "c.npz").exists()
    result = run_cli("data", model, tmp_path / "imgs", "-o", tmp_path / "c.npz", "--size", "5x7")
    assert result.exit_code == 0, result.stderr
    with np.load(tmp_path / "c.npz") as written:
        assert written["x"].shape == (1, 3, 5, 7)


def test_npy_samples_are_stacked_and_subsampled(tmp_path, run_cli, tiny_model):
    model = save(tiny_model(("batch", 4)), tmp_path / "m.onnx")
    rng = np.random.default_rng(3)
    samples = [rng.standard_normal(4).astype(np.float32) for _ in range(10)]
    (tmp_path / "npy").mkdir()
    for i, sample in enumerate(samples):
        np.save(tmp_path / "npy" / f"s{i:02d}.npy", sample)
    out = tmp_path / "c.npz"
    assert run_cli("data", model, tmp_path / "npy", "-o", out).exit_code == 0
    with np.load(out) as written:
        assert np.array_equal(written["x"], np.stack(samples))
    assert run_cli("data", model, tmp_path / "npy", "-o", out, "--samples", "4", "--seed", "1").exit_code == 0
    with np.load(out) as written:
        picked = written["x"]
    assert picked.shape == (4, 4)
    rows = [next(i for i, s in enumerate(samples) if np.array_equal(s, row)) for row in picked]
    assert rows == sorted(rows)  # a subset, kept in file order


@pytest.mark.parametrize("name", ["file", "allow_pickle"])
def test_inputs_named_like_numpy_savez_parameters_are_written(tmp_path, run_cli, name):
    # np.savez(stream, **arrays) took these names for its own parameters: `file` crashed (exit 3) and
    # `allow_pickle` was dropped from the archive (found by mypy on data_build.py).
    model = identity_model(("batch", 3))
    model.graph.input[0].name = name
    model.graph.node[0].input[0] = name
    save(model, tmp_path / "m.onnx")
    samples = np.arange(12, dtype=np.float32).reshape(4, 3)
    (tmp_path / "npy").mkdir()
    for i, sample in enumerate(samples):
        np.save(tmp_path / "npy" / f"s{i}.npy", sample)
    out = tmp_path / "c.npz"
    result = run_cli("data", tmp_path / "m.onnx", tmp_path / "npy", "-o", out)
    assert result.exit_code == 0, result.output
    with np.load(out) as written:
        assert written.files == [name] and np.array_equal(written[name], samples)
    with zipfile.ZipFile(out) as archive:  # no clock inside: the same data gives the same bytes
        assert [member.date_time for member in archive.infolist()] == [(1980, 1, 1, 0, 0, 0)]


def test_npy_shapes_that_differ_are_an_error_naming_both(tmp_path, run_cli, tiny_model):
    model = save(tiny_model(("batch", "features")), tmp_path / "m.onnx")
    (tmp_path / "npy").mkdir()
    np.save(tmp_path / "npy" / "a.npy", np.zeros(4, np.float32))
    np.save(tmp_path / "npy" / "b.npy", np.zeros(5, np.float32))
    result = run_cli("data", model, tmp_path / "npy", "-o", tmp_path / "c.npz")
    assert result.exit_code == 2 and "a.npy" in result.stderr and "b.npy" in result.stderr
    assert "Traceback" not in result.stderr


def test_per_sample_npz_for_a_two_input_model(tmp_path, run_cli, transformer_path, seq_eval_npz):
    with np.load(seq_eval_npz) as archive:
        inputs, masks, labels = archive["input"][:5], archive["mask"][:5], archive["labels"][:5]
    folder = tmp_path / "samples"
    folder.mkdir()
    for i in range(5):
        np.savez(folder / f"{i}.npz", input=inputs[i], mask=masks[i])
    (tmp_path / "labels.csv").write_text("file,label\n" + "".join(f"{i}.npz,{labels[i]}\n" for i in range(5)))
    out = tmp_path / "seq.npz"
    result = run_cli("data", transformer_path, folder, "-o", out, "--labels", tmp_path / "labels.csv")
    assert result.exit_code == 0, result.stderr
    with np.load(out) as written:
        assert np.array_equal(written["input"], inputs) and np.array_equal(written["mask"], masks)
        assert np.array_equal(written["labels"], labels)


def test_images_for_a_two_input_model_are_refused_with_the_npz_route(tmp_path, run_cli, transformer_path):
    write_pnm(tmp_path / "imgs" / "a.pgm", np.zeros((8, 8), dtype=np.uint8))
    result = run_cli("data", transformer_path, tmp_path / "imgs", "-o", tmp_path / "c.npz")
    assert result.exit_code == 2 and "2 inputs" in result.stderr and ".npz" in result.stderr


def test_never_overwrites_an_input_and_writes_nothing_on_failure(tmp_path, run_cli, tiny_model):
    model = save(tiny_model(("batch", 4)), tmp_path / "m.onnx")
    stack = tmp_path / "stack.npy"
    np.save(stack, np.ones((3, 4), np.float32))
    before = stack.read_bytes()
    result = run_cli("data", model, stack, "-o", model)
    assert result.exit_code == 2 and model.exists()
    onnx.load(str(model))  # still the model
    npz_source = tmp_path / "src"
    npz_source.mkdir()
    np.savez(npz_source / "a.npz", x=np.ones(4, np.float32))
    result = run_cli("data", model, npz_source, "-o", npz_source / "a.npz")
    assert result.exit_code == 2 and "overwrite" in result.stderr
    assert stack.read_bytes() == before
    wrong = tmp_path / "floats.npy"
    np.save(wrong, np.ones((3, 7), np.float32))  # 7 features, the model wants 4
    result = run_cli("data", model, wrong, "-o", tmp_path / "out.npz")
    assert result.exit_code == 2 and not (tmp_path / "out.npz").exists()
    assert not list(tmp_path.glob(".out.npz*"))  # no staging file left behind


def test_float_samples_for_an_integer_input_are_refused(tmp_path, run_cli, tiny_model):
    model = save(tiny_model(("batch", 4), input_dtype=TensorProto.INT64), tmp_path / "m.onnx")
    np.save(tmp_path / "ids.npy", np.ones((2, 4), np.float32))
    result = run_cli("data", model, tmp_path / "ids.npy", "-o", tmp_path / "c.npz")
    assert result.exit_code == 2 and "int64" in result.stderr


def test_png_without_pillow_is_one_line_naming_the_extra(tmp_path, run_cli, cnn_path, monkeypatch):
    (tmp_path / "imgs").mkdir()
    (tmp_path / "imgs" / "a.png").write_bytes(b"\x89PNG not really")
    monkeypatch.setitem(__import__("sys").modules, "PIL", None)  # import PIL now fails, as without the extra
    result = run_cli("data", cnn_path, tmp_path / "imgs", "-o", tmp_path / "c.npz")
    assert result.exit_code == 2
    assert "Pillow" in result.stderr and "compressq[images]" in result.stderr and "Traceback" not in result.stderr


def test_png_and_jpeg_through_pillow(tmp_path, run_cli):
    image_module = pytest.importorskip("PIL.Image")
    model = save(identity_model(["N", 3, 10, 10]), tmp_path / "m.onnx")
    rows, columns = np.mgrid[0:20, 0:30]
    pixels = np.stack([rows * 12, columns * 8, 255 - rows * 6], axis=2).astype(np.uint8)  # smooth: JPEG keeps it
    (tmp_path / "imgs").mkdir()
    image_module.fromarray(pixels).save(tmp_path / "imgs" / "a.png")
    image_module.fromarray(pixels).save(tmp_path / "imgs" / "b.jpg", quality=95)
    out = tmp_path / "c.npz"
    result = run_cli("data", model, tmp_path / "imgs", "-o", out, "--channels", "bgr")
    assert result.exit_code == 0, result.stderr
    expected = resize(pixels.astype(np.float64), 10, 10)[:, :, ::-1].transpose(2, 0, 1) / 255
    with np.load(out) as written:
        assert np.allclose(written["x"][0], expected, atol=1e-5)  # PNG is lossless
        assert np.abs(written["x"][1] - expected).mean() < 0.02  # JPEG is close
