"""compressq.data: reading .npz/.npy datasets, validating them against the model, batching."""

from __future__ import annotations

import numpy as np
import pytest
from onnx import TensorProto

from compressq.data import load_dataset, model_inputs, synthetic_dataset
from compressq.errors import DataError
from compressq.graph import load_model


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
