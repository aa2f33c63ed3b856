"""compressq.data: reading .npz/.npy datasets, validating them against the model, batching."""

from __future__ import annotations

import numpy as np
import pytest
from onnx import TensorProto

from compressq.data import load_dataset, model_inputs, synthetic_dataset
from compressq.errors import DataError
from compressq.io import load_model


def concat(feeds: list[dict[str, np.ndarray]], name: str) -> np.ndarray:
    return np.concatenate([feed[name] for feed in feeds])


@pytest.fixture
def cnn(cnn_path):
    return load_model(cnn_path)


@pytest.fixture
def transformer(transformer_path):
    return load_model(transformer_path)


def samples(count: int, seed: int = 0, features: int = 4) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((count, features)).astype(np.float32)


# ---------------------------------------------------------------------------------------------------
# Layouts


def test_single_npz(cnn, calib_npz):
    dataset = load_dataset(calib_npz, cnn)
    expected = np.load(calib_npz)["input"]
    assert dataset.num_samples == len(expected) == 256
    assert not dataset.synthetic and not dataset.has_labels and dataset.notes == []
    feeds = list(dataset.batches(100))
    assert [len(f["input"]) for f in feeds] == [100, 100, 56]
    assert all(f.keys() == {"input"} for f in feeds)
    np.testing.assert_array_equal(concat(feeds, "input"), expected)
    assert [len(f["input"]) for f in dataset.batches(100, limit=150)] == [100, 50]


def test_labels_picked_up_by_default_key(cnn, eval_npz):
    dataset = load_dataset(eval_npz, cnn)
    archive = np.load(eval_npz)
    assert dataset.has_labels and dataset.labels_key == "labels"
    np.testing.assert_array_equal(dataset.labels(), archive["labels"])
    for feed, labels in dataset.labelled_batches(64, limit=200):
        assert len(feed["input"]) == len(labels)
        assert "labels" not in feed
    np.testing.assert_array_equal(dataset.labels(limit=10), archive["labels"][:10])


def test_labels_picked_up_by_custom_key(tmp_path, tiny_model):
    path = tmp_path / "d.npz"
    targets = np.arange(6)
    np.savez(path, x=samples(6), targets=targets)
    dataset = load_dataset(path, tiny_model(), labels_key="targets")
    assert dataset.labels_key == "targets"
    np.testing.assert_array_equal(dataset.labels(), targets)
    assert not load_dataset(path, tiny_model()).has_labels  # default key "labels" is absent


def test_folder_of_npz_shards(tmp_path, tiny_model):
    sizes = [5, 7, 3]
    shards = [samples(n, seed=i) for i, n in enumerate(sizes)]
    labels = [np.arange(n) + 100 * i for i, n in enumerate(sizes)]
    for i, (x, y) in enumerate(zip(shards, labels)):
        np.savez(tmp_path / f"shard_{i:02d}.npz", x=x, labels=y)
    dataset = load_dataset(tmp_path, tiny_model())
    assert dataset.num_samples == sum(sizes)
    batches = list(dataset.labelled_batches(4))
    # Batches span shard boundaries: only the very last one is short.
    assert [len(feed["x"]) for feed, _ in batches] == [4, 4, 4, 3]
    np.testing.assert_array_equal(concat([feed for feed, _ in batches], "x"), np.concatenate(shards))
    np.testing.assert_array_equal(np.concatenate([y for _, y in batches]), np.concatenate(labels))
    np.testing.assert_array_equal(dataset.labels(), np.concatenate(labels))
    limited = list(dataset.batches(4, limit=9))
    assert [len(f["x"]) for f in limited] == [4, 4, 1]
    np.testing.assert_array_equal(concat(limited, "x"), np.concatenate(shards)[:9])


def test_folder_of_npy_named_by_input(tmp_path, transformer, seq_eval_npz):
    archive = np.load(seq_eval_npz)
    for name in ("input", "mask", "labels"):
        np.save(tmp_path / f"{name}.npy", archive[name][:50])
    dataset = load_dataset(tmp_path, transformer)
    assert dataset.num_samples == 50 and dataset.has_labels
    feeds = list(dataset.batches(16))
    assert [len(f["input"]) for f in feeds] == [16, 16, 16, 2]
    np.testing.assert_array_equal(concat(feeds, "input"), archive["input"][:50])
    np.testing.assert_array_equal(concat(feeds, "mask"), archive["mask"][:50])
    np.testing.assert_array_equal(dataset.labels(), archive["labels"][:50])


def test_float64_is_converted_and_noted(tmp_path, tiny_model):
    path = tmp_path / "d.npz"
    x = samples(5).astype(np.float64)
    np.savez(path, x=x)
    dataset = load_dataset(path, tiny_model())
    assert any("float64" in note and "float32" in note for note in dataset.notes)
    (feed,) = dataset.batches(8)
    assert feed["x"].dtype == np.float32
    assert feed["x"].flags["C_CONTIGUOUS"]
    np.testing.assert_allclose(feed["x"], x.astype(np.float32))


def test_fixed_batch_of_one(tmp_path, tiny_model):
    model = tiny_model(input_shape=(1, 4))
    assert model_inputs(model)[0].fixed_batch == 1
    path = tmp_path / "d.npz"
    np.savez(path, x=samples(5))
    dataset = load_dataset(path, model)
    assert [len(f["x"]) for f in dataset.batches(32)] == [1] * 5


def test_fixed_batch_across_shards(tmp_path, tiny_model):
    model = tiny_model(input_shape=(4, 4))
    for i, n in enumerate((5, 7)):
        np.savez(tmp_path / f"s{i}.npz", x=samples(n, seed=i))
    assert [len(f["x"]) for f in load_dataset(tmp_path, model).batches(32)] == [4, 4, 4]


# ---------------------------------------------------------------------------------------------------
# Errors


def data_error(path, model, **kwargs) -> DataError:
    with pytest.raises(DataError) as info:
        load_dataset(path, model, **kwargs)
    return info.value


def test_missing_input_array_lists_arrays_found(tmp_path, transformer):
    path = tmp_path / "d.npz"
    np.savez(path, input=np.zeros((3, 8, 8), np.float32), attention=np.ones((3, 8), np.float32))
    error = data_error(path, transformer)
    assert "'mask'" in error.message
    assert "attention, input" in error.hint


def test_wrong_rank(tmp_path, cnn):
    path = tmp_path / "d.npz"
    np.savez(path, input=np.zeros((3, 8, 8), np.float32))
    error = data_error(path, cnn)
    assert "rank 4" in error.message and "(3, 8, 8)" in error.message


def test_wrong_static_dim(tmp_path, cnn):
    path = tmp_path / "d.npz"
    np.savez(path, input=np.zeros((3, 1, 8, 9), np.float32))
    error = data_error(path, cnn)
    assert "axis 3" in error.message and "expects 8" in error.message


def test_int_array_for_float_input(tmp_path, cnn):
    path = tmp_path / "d.npz"
    np.savez(path, input=np.zeros((3, 1, 8, 8), np.int64))
    error = data_error(path, cnn)
    assert "int64" in error.message and "float32" in error.message


def test_different_sample_counts(tmp_path, transformer):
    path = tmp_path / "d.npz"
    np.savez(path, input=np.zeros((3, 8, 8), np.float32), mask=np.ones((4, 8), np.float32))
    error = data_error(path, transformer)
    assert "number of samples" in error.message
    assert "input: 3" in error.message and "mask: 4" in error.message


def test_labels_with_different_sample_count(tmp_path, cnn):
    path = tmp_path / "d.npz"
    np.savez(path, input=np.zeros((3, 1, 8, 8), np.float32), labels=np.zeros(5, np.int64))
    assert "number of samples" in data_error(path, cnn).message


def test_lone_npy_file(tmp_path, cnn):
    path = tmp_path / "input.npy"
    np.save(path, np.zeros((3, 1, 8, 8), np.float32))
    assert "single .npy" in data_error(path, cnn).message


def test_non_existent_path(tmp_path, cnn):
    error = data_error(tmp_path / "nowhere.npz", cnn)
    assert "not found" in error.message and "nowhere.npz" in error.message


def test_empty_folder(tmp_path, cnn):
    assert "no .npz or .npy" in data_error(tmp_path, cnn).message


def test_require_labels_without_labels(cnn, calib_npz):
    error = data_error(calib_npz, cnn, require_labels=True)
    assert "'labels'" in error.message
    assert "input" in error.hint


def test_errors_from_a_later_shard(tmp_path, tiny_model):
    np.savez(tmp_path / "a.npz", x=samples(3))
    np.savez(tmp_path / "b.npz", x=np.zeros((3, 5), np.float32))
    error = data_error(tmp_path, tiny_model())
    assert "b.npz" in error.message


def test_labels_missing_from_a_later_shard(tmp_path, tiny_model):
    np.savez(tmp_path / "a.npz", x=samples(3), labels=np.arange(3))
    np.savez(tmp_path / "b.npz", x=samples(3))
    error = data_error(tmp_path, tiny_model())
    assert "b.npz" in error.message and "'labels'" in error.message


# ---------------------------------------------------------------------------------------------------
# Synthetic


def test_synthetic_dataset_matches_model(transformer):
    dataset = synthetic_dataset(transformer, samples=10, seed=3)
    assert dataset.synthetic
    assert dataset.notes and "synthetic" in dataset.notes[0]
    assert dataset.num_samples == 10
    feeds = list(dataset.batches(4))
    assert [len(f["input"]) for f in feeds] == [4, 4, 2]
    for feed in feeds:
        assert feed["input"].shape[1:] == (8, 8) and feed["input"].dtype == np.float32
        assert feed["mask"].shape[1:] == (8,) and feed["mask"].dtype == np.float32
        np.testing.assert_array_equal(feed["mask"], 1.0)
    assert np.std(concat(feeds, "input")) > 0.5  # random, not constant
    again = synthetic_dataset(transformer, samples=10, seed=3)
    np.testing.assert_array_equal(concat(list(again.batches(10)), "input"), concat(feeds, "input"))


def test_synthetic_dataset_dynamic_dims_and_int_inputs(tiny_model):
    model = tiny_model(input_shape=("batch", 4),
                       extra_inputs={"ids": (("batch", "seq"), TensorProto.INT64),
                                     "attention_mask": (("batch", "seq"), TensorProto.INT64)})
    dataset = synthetic_dataset(model, samples=3)
    (feed,) = dataset.batches(8)
    assert feed["x"].shape == (3, 4) and feed["x"].dtype == np.float32
    assert feed["ids"].dtype == np.int64 and feed["ids"].shape[0] == 3 and feed["ids"].shape[1] > 0
    assert feed["attention_mask"].dtype == np.int64
    np.testing.assert_array_equal(feed["attention_mask"], 1)


# ---------------------------------------------------------------------------------------------------
# Layouts: stack (issue 14)


def stateful_model(tiny_model):
    """x[batch, 4] plus a scalar `sr` and a state [2, batch, 3] with its batch on axis 1."""
    return tiny_model(input_shape=("batch", 4), extra_inputs={"sr": ((), TensorProto.INT64),
                                                               "state": ((2, "batch", 3), TensorProto.FLOAT)})


def stacked_arrays(count: int, seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {"x": rng.standard_normal((count, 1, 4)).astype(np.float32),
            "sr": rng.choice([8000, 16000], count).astype(np.int64),
            "state": rng.standard_normal((count, 2, 1, 3)).astype(np.float32)}


def test_stack_layout_feeds_each_sample_as_stored(tmp_path, tiny_model):
    path = tmp_path / "d.npz"
    arrays = stacked_arrays(5)
    np.savez(path, **arrays, labels=np.arange(5))
    dataset = load_dataset(path, stateful_model(tiny_model), layout="stack")
    assert dataset.num_samples == 5 and dataset.layout == "stack"
    feeds = list(dataset.labelled_batches(32))
    assert len(feeds) == 5
    for index, (feed, labels) in enumerate(feeds):
        assert feed["sr"].shape == () and feed["sr"] == arrays["sr"][index]
        assert feed["state"].shape == (2, 1, 3)
        np.testing.assert_array_equal(feed["state"], arrays["state"][index])
        np.testing.assert_array_equal(feed["x"], arrays["x"][index])
        np.testing.assert_array_equal(labels, [index])
    assert len(list(dataset.batches(8, limit=2))) == 2


def test_stack_layout_runs_in_onnxruntime(tmp_path, tiny_model):
    import onnxruntime as ort

    model = stateful_model(tiny_model)
    path = tmp_path / "d.npz"
    np.savez(path, **stacked_arrays(3))
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    for feed in load_dataset(path, model, layout="stack").batches(1):
        outputs = dict(zip([o.name for o in session.get_outputs()], session.run(None, feed)))
        np.testing.assert_array_equal(outputs["state_out"], feed["state"])
        assert outputs["sr_out"].shape == ()


def test_stack_layout_checks_fixed_dims_and_rank(tmp_path, tiny_model):
    model = stateful_model(tiny_model)
    arrays = stacked_arrays(4)
    path = tmp_path / "d.npz"
    np.savez(path, **{**arrays, "state": np.zeros((4, 3, 1, 3), np.float32)})
    assert "size 3 on axis 1, the model expects 2 on its axis 0" in data_error(path, model, layout="stack").message
    np.savez(path, **{**arrays, "sr": np.zeros((4, 1), np.int64)})
    error = data_error(path, model, layout="stack")
    assert "'sr' has shape (4, 1)" in error.message and "(N,)" in error.hint


def test_batch_layout_refuses_a_scalar_input_and_points_at_stack(tmp_path, tiny_model):
    path = tmp_path / "d.npz"
    np.savez(path, x=samples(4), sr=np.full(4, 16000), state=np.zeros((2, 4, 3), np.float32))
    error = data_error(path, stateful_model(tiny_model))
    assert "model input 'sr' is a scalar" in error.message and "--data-layout stack" in error.hint


def test_batch_layout_hint_names_stack_when_an_axis_is_added(tmp_path, tiny_model):
    path = tmp_path / "d.npz"
    np.savez(path, x=np.zeros((4, 1, 4), np.float32))
    assert "--data-layout stack" in data_error(path, tiny_model()).hint


def test_unknown_layout_is_a_usage_error(calib_npz, cnn):
    from compressq.errors import UsageError

    with pytest.raises(UsageError, match="unknown data layout 'rows'"):
        load_dataset(calib_npz, cnn, layout="rows")


def test_arrays_that_are_not_inputs_are_ignored_with_one_note(tmp_path, tiny_model):
    path = tmp_path / "d.npz"
    np.savez(path, x=samples(6), labels=np.arange(6), clip_id=np.arange(2), names=np.array(["a", "b"]),
             meta=np.array([{"a": 1}], dtype=object))
    dataset = load_dataset(path, tiny_model())
    assert dataset.num_samples == 6 and dataset.has_labels
    assert dataset.notes == ["arrays ignored (not model inputs or labels): clip_id, meta, names"]
    (feed,) = dataset.batches(8)
    assert feed.keys() == {"x"}


def test_stack_layout_over_shards(tmp_path, tiny_model):
    model = stateful_model(tiny_model)
    for i, n in enumerate((2, 3)):
        np.savez(tmp_path / f"s{i}.npz", **stacked_arrays(n, seed=i))
    feeds = list(load_dataset(tmp_path, model, layout="stack").batches(4, limit=4))
    assert len(feeds) == 4
    np.testing.assert_array_equal(feeds[2]["x"], stacked_arrays(3, seed=1)["x"][0])


def test_synthetic_inputs_keep_scalar_and_fixed_dims(tiny_model):
    dataset = synthetic_dataset(stateful_model(tiny_model), samples=3)
    assert dataset.layout == "stack"
    feeds = list(dataset.batches(8))
    assert len(feeds) == 3
    for feed in feeds:
        assert feed["sr"].shape == () and feed["state"].shape[0] == 2 and feed["state"].ndim == 3
        assert feed["state"].shape[1] == feed["x"].shape[0]  # the same symbolic 'batch', the same size


# ---------------------------------------------------------------------------------------------------
# Hostile and damaged files (issue 14): one DataError each, nothing allocated from a lying header


def hostile_npz(path, shape, payload: int = 60_000, descr: str = "<f4") -> None:
    import io
    import zipfile

    header = io.BytesIO()
    np.lib.format.write_array_header_1_0(header, {"descr": descr, "fortran_order": False, "shape": shape})
    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as archive:
        archive.writestr("x.npy", header.getvalue() + b"\0" * payload)


@pytest.mark.parametrize("rows", [1 << 20, 1 << 40])
def test_a_declared_size_the_file_cannot_hold_is_refused_before_reading(tmp_path, tiny_model, rows):
    path = tmp_path / "huge.npz"
    hostile_npz(path, (rows, 4))
    assert path.stat().st_size < 64 * 1024
    error = data_error(path, tiny_model())
    assert f"declares shape ({rows}, 4) float32" in error.message and "refused" in error.message


def test_object_arrays_are_refused(tmp_path, tiny_model):
    path = tmp_path / "d.npz"
    np.savez(path, x=np.array([[{"a": 1}] * 4] * 2, dtype=object))
    assert "Python objects" in data_error(path, tiny_model()).message


@pytest.mark.parametrize("values", [np.full((3, 4), b"ab"), np.full((3, 4), "ab")])
def test_byte_and_text_arrays_are_refused(tmp_path, tiny_model, values):
    path = tmp_path / "d.npz"
    np.savez(path, x=values)
    error = data_error(path, tiny_model())
    assert "'x' holds" in error.message and "not numbers" in error.message


@pytest.mark.parametrize("content", [b"", b"PK\x03\x04 truncated", b"not a zip at all" * 40])
def test_a_file_named_npz_that_is_not_a_zip(tmp_path, tiny_model, content):
    path = tmp_path / "d.npz"
    path.write_bytes(content)
    assert isinstance(data_error(path, tiny_model()), DataError)


def test_a_truncated_npz(tmp_path, tiny_model):
    path = tmp_path / "d.npz"
    np.savez_compressed(path, x=samples(500))
    path.write_bytes(path.read_bytes()[:-200])
    assert "d.npz" in data_error(path, tiny_model()).message


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_non_finite_inputs_are_refused_when_read(tmp_path, tiny_model, bad):
    path = tmp_path / "d.npz"
    x = samples(10)
    x[7, 2] = bad
    np.savez(path, x=x)
    dataset = load_dataset(path, tiny_model())
    assert len(list(dataset.batches(4, limit=4))) == 1  # finite samples are served
    with pytest.raises(DataError, match="holds 1 NaN or infinite values"):
        list(dataset.batches(4))


# ---------------------------------------------------------------------------------------------------
# Bad-input corpus through every command that reads data: exit 2, one error line, no traceback, and the
# folder holds afterwards exactly what it held before (no output, no staging left behind)


def _corpus(folder) -> dict[str, object]:
    """name -> a writer of one bad data file for the tiny model (input x[batch, 4])."""
    def nan_inputs(path):
        x = samples(12)
        x[5, 1] = np.nan
        np.savez(path, x=x)

    def inf_inputs(path):
        x = samples(12)
        x[0, 0] = -np.inf
        np.savez(path, x=x)

    return {
        "huge_declared.npz": lambda path: hostile_npz(path, (1 << 40, 4)),
        "object.npz": lambda path: np.savez(path, x=np.array([[None] * 4] * 3, dtype=object)),
        "bytes.npz": lambda path: np.savez(path, x=np.full((3, 4), b"ab")),
        "not_a_zip.npz": lambda path: path.write_bytes(b"\x89PNG not a zip" * 20),
        "empty.npz": lambda path: path.write_bytes(b""),
        "nan.npz": nan_inputs,
        "inf.npz": inf_inputs,
        "no_arrays.npz": lambda path: np.savez(path),
        "scalar_input.npz": lambda path: np.savez(path, x=np.float32(1.0)),
    }


CORPUS = tuple(_corpus(None))
COMMANDS = ("quantize-static", "prune-refit", "report", "sensitivity")


@pytest.mark.parametrize("command", COMMANDS)
@pytest.mark.parametrize("case", CORPUS)
def test_bad_data_is_one_line_and_exit_2(run_cli, tmp_path, tiny_model, command, case):
    import onnx

    model = tmp_path / "m.onnx"
    onnx.save_model(tiny_model(input_shape=("batch", 4), features=8), str(model))
    data = tmp_path / case
    _corpus(tmp_path)[case](data)
    before = sorted(p.name for p in tmp_path.iterdir())
    out = tmp_path / "out.onnx"
    args = {"quantize-static": ["quantize", model, "-d", data, "-o", out, "--no-speed-check"],
            "prune-refit": ["prune", model, "-s", "0.5", "--calibration-data", data, "-o", out, "--prune-first",
                            "--prune-last", "--min-params", "1"],
            "report": ["report", model, "--data", data, "--runs", "1", "--warmup", "0"],
            "sensitivity": ["sensitivity", model, "-d", data]}[command]
    result = run_cli(*args)
    assert result.exit_code == 2, (result.exit_code, result.stderr, result.exception)
    assert "Traceback" not in result.stderr + result.stdout
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "hint:" in errors[0], result.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == before
