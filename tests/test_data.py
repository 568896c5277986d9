"""Tests for altlearn.data: bundled loaders, splits, standardisation and file readers."""

import gzip
import pickle
import struct

import numpy as np
import pytest

from altlearn import data
from altlearn.data import (
    DATASETS,
    DataError,
    MissingDataError,
    dataset_names,
    load_dataset,
)

# name -> (task, num_outputs, input_shape, n_train_plus_val, n_test)
BUNDLED = {
    "mnist1d": ("classification", 10, (40, 1), 4000, 1000),
    "digits": ("classification", 10, (8, 8, 1), 1437, 360),
    "breast_cancer": ("classification", 2, (30,), 455, 114),
    "wine": ("classification", 3, (13,), 142, 36),
    "iris": ("classification", 3, (4,), 120, 30),
    "diabetes": ("regression", 1, (10,), 353, 89),
    "moons": ("classification", 2, (2,), 800, 200),
    "circles": ("classification", 2, (2,), 800, 200),
    "friedman1": ("regression", 1, (10,), 800, 200),
    "kink": ("regression", 1, (1,), 800, 200),
}


@pytest.fixture(autouse=True)
def _isolated_env(monkeypatch, tmp_path):
    """Keep the user's data/cache directories out of the tests."""
    monkeypatch.delenv("ALTLEARN_CACHE_DIR", raising=False)
    monkeypatch.setenv("ALTLEARN_DATA_DIR", str(tmp_path / "default_data"))


def test_registry_covers_bundled_datasets():
    offline = {name for name, info in DATASETS.items() if not info.needs_data_dir}
    assert offline == set(BUNDLED)
    assert {info.kind for info in DATASETS.values()} == {"tabular", "signal", "image"}
    assert dataset_names()[-1] == "csv:<path>"


@pytest.mark.parametrize("name", sorted(BUNDLED))
def test_bundled_loader_shapes(name):
    task, num_outputs, input_shape, n_train, n_test = BUNDLED[name]
    ds = load_dataset(name, validation_fraction=0.1)
    assert (ds.name, ds.task, ds.num_outputs, ds.input_shape) == (
        name,
        task,
        num_outputs,
        input_shape,
    )
    n_val = round(0.1 * n_train)
    assert len(ds.x_train) == len(ds.y_train) == n_train - n_val
    assert len(ds.x_val) == len(ds.y_val) == n_val
    assert len(ds.x_test) == len(ds.y_test) == n_test
    for x in (ds.x_train, ds.x_val, ds.x_test):
        assert x.dtype == np.float32 and x.shape[1:] == input_shape
    for y in (ds.y_train, ds.y_val, ds.y_test):
        if task == "classification":
            assert y.dtype == np.int32 and y.ndim == 1
            assert y.min() >= 0 and y.max() < num_outputs
        else:
            assert y.dtype == np.float32 and y.shape[1:] == (num_outputs,)


def test_mnist1d_sizes():
    ds = load_dataset("mnist1d")
    assert (len(ds.x_train), len(ds.x_val), len(ds.x_test)) == (3600, 400, 1000)
    assert set(np.unique(ds.y_train)) == set(range(10))


def test_mnist1d_npz_cache(tmp_path, monkeypatch):
    reference = load_dataset("mnist1d", standardize="none", validation_fraction=0.0)
    monkeypatch.setenv("ALTLEARN_CACHE_DIR", str(tmp_path / "cache"))
    cached = load_dataset("mnist1d", standardize="none", validation_fraction=0.0)
    for a, b in zip(reference, cached, strict=True):
        np.testing.assert_array_equal(a, b)
    cache_file = tmp_path / "cache" / "mnist1d_default_v1.npz"
    with np.load(cache_file) as arrays:
        arrays = dict(arrays)
    np.testing.assert_array_equal(arrays["x_test"], reference.x_test[..., 0])
    # A later process reads the file instead of regenerating: tag it to prove that.
    arrays["x"][0, 0] = 123.0
    np.savez(cache_file, **arrays)
    data._mnist1d_arrays.cache_clear()
    tagged = load_dataset("mnist1d", standardize="none", validation_fraction=0.0)
    assert tagged.x_train[0, 0, 0] == 123.0
    data._mnist1d_arrays.cache_clear()


def test_standardize_feature_uses_train_statistics_only():
    ds = load_dataset("breast_cancer", standardize="feature")
    np.testing.assert_allclose(ds.x_train.mean(0), 0, atol=1e-5)
    np.testing.assert_allclose(ds.x_train.std(0), 1, atol=1e-4)
    assert np.abs(ds.x_test.mean(0)).max() > 1e-3
    raw = load_dataset("breast_cancer", standardize="none")
    mean, std = raw.x_train.mean(0), raw.x_train.std(0)
    np.testing.assert_allclose(ds.x_test, (raw.x_test - mean) / std, rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(ds.x_val, (raw.x_val - mean) / std, rtol=1e-4, atol=1e-4)


def test_standardize_regression_targets():
    ds = load_dataset("diabetes")
    np.testing.assert_allclose(ds.y_train.mean(0), 0, atol=1e-5)
    np.testing.assert_allclose(ds.y_train.std(0), 1, atol=1e-5)
    raw = load_dataset("diabetes", standardize="none")
    assert raw.y_train.mean() > 10  # raw disease progression scores


def test_standardize_signal_auto_is_per_position():
    ds = load_dataset("mnist1d")
    np.testing.assert_allclose(ds.x_train.mean(0), 0, atol=1e-5)
    np.testing.assert_allclose(ds.x_train.std(0), 1, atol=1e-4)


def test_standardize_channel_on_images():
    ds = load_dataset("digits", standardize="channel")
    assert abs(ds.x_train.mean()) < 1e-5 and abs(ds.x_train.std() - 1) < 1e-4
    # Per-pixel statistics are not equalised in channel mode (a corner pixel is always 0).
    assert np.abs(ds.x_train.mean(0)).max() > 0.5
    auto = load_dataset("digits")
    np.testing.assert_array_equal(auto.x_train, ds.x_train)
    raw = load_dataset("digits", standardize="none")
    assert raw.x_train.min() == 0 and raw.x_train.max() == 1


def test_constant_feature_is_not_divided_by_zero():
    ds = load_dataset("digits", standardize="feature")
    assert np.isfinite(ds.x_train).all() and np.isfinite(ds.x_test).all()


def test_splits_depend_on_seed_only_for_validation():
    a = load_dataset("wine", seed=0)
    b = load_dataset("wine", seed=0)
    c = load_dataset("wine", seed=1)
    for x, y in zip(a, b, strict=True):
        np.testing.assert_array_equal(x, y)
    raw_a = load_dataset("wine", seed=0, standardize="none")
    raw_c = load_dataset("wine", seed=1, standardize="none")
    np.testing.assert_array_equal(raw_a.x_test, raw_c.x_test)
    np.testing.assert_array_equal(raw_a.y_test, raw_c.y_test)
    assert not np.array_equal(raw_a.x_val, raw_c.x_val)
    assert not np.array_equal(a.x_test, c.x_test)  # same rows, different train statistics


def test_train_on_validation_trains_on_the_same_labels_the_split_holds():
    plain = load_dataset("wine", seed=2, standardize="none")
    both = load_dataset("wine", seed=2, standardize="none", train_on_validation=True)
    assert len(both.x_train) == len(plain.x_train) + len(plain.x_val)
    np.testing.assert_array_equal(both.x_val, plain.x_val)  # the split itself is unchanged
    trained = {tuple(row) for row in both.x_train}
    assert all(tuple(row) in trained for row in plain.x_val)
    np.testing.assert_array_equal(both.x_test, plain.x_test)


def test_fixed_test_split_is_stratified():
    ds = load_dataset("iris")
    np.testing.assert_array_equal(np.bincount(ds.y_test), [10, 10, 10])


def test_zero_validation_fraction():
    ds = load_dataset("diabetes", validation_fraction=0.0)
    assert ds.x_val.shape == (0, 10) and ds.y_val.shape == (0, 1)
    assert len(ds.x_train) == 353


@pytest.mark.parametrize("fraction", [-0.1, 1.0, 1.5])
def test_bad_validation_fraction(fraction):
    with pytest.raises(DataError, match=r"\[0, 1\)"):
        load_dataset("iris", validation_fraction=fraction)


def test_bad_standardize_mode():
    with pytest.raises(DataError, match="feature, channel, none"):
        load_dataset("iris", standardize="zscore")


def test_unknown_name_lists_valid_names():
    with pytest.raises(DataError) as info:
        load_dataset("imagenet")
    message = str(info.value)
    for name in ("mnist1d", "digits", "mnist", "cifar10", "csv:<path>"):
        assert name in message


# ---------------------------------------------------------------------------------------
# MNIST / Fashion-MNIST IDX files


def _idx_bytes(array: np.ndarray, magic: int) -> bytes:
    header = struct.pack(">I", magic) + b"".join(struct.pack(">I", n) for n in array.shape)
    return header + array.astype(np.uint8).tobytes()


def _write_idx_dataset(directory, n_train=5, n_test=3, gz=False, image_magic=2051):
    directory.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    arrays = {}
    for prefix, n in (("train", n_train), ("t10k", n_test)):
        images = rng.integers(0, 256, size=(n, 28, 28), dtype=np.uint8)
        labels = np.arange(n, dtype=np.uint8) % 10
        arrays[prefix] = images, labels
        for suffix, payload in (
            ("images-idx3-ubyte", _idx_bytes(images, image_magic)),
            ("labels-idx1-ubyte", _idx_bytes(labels, 2049)),
        ):
            path = directory / f"{prefix}-{suffix}"
            if gz:
                path.with_name(path.name + ".gz").write_bytes(gzip.compress(payload))
            else:
                path.write_bytes(payload)
    return arrays


@pytest.mark.parametrize("gz", [False, True])
def test_mnist_idx_reader(tmp_path, gz):
    arrays = _write_idx_dataset(tmp_path, gz=gz)
    ds = load_dataset("mnist", data_dir=tmp_path, validation_fraction=0.0, standardize="none")
    assert (ds.task, ds.num_outputs, ds.input_shape) == ("classification", 10, (28, 28, 1))
    assert ds.x_train.dtype == np.float32 and ds.y_train.dtype == np.int32
    np.testing.assert_allclose(ds.x_train[..., 0], arrays["train"][0] / 255.0, rtol=1e-6)
    np.testing.assert_array_equal(ds.y_train, arrays["train"][1])
    np.testing.assert_allclose(ds.x_test[..., 0], arrays["t10k"][0] / 255.0, rtol=1e-6)
    np.testing.assert_array_equal(ds.y_test, arrays["t10k"][1])


def test_fashion_mnist_from_named_subdirectory(tmp_path):
    _write_idx_dataset(tmp_path / "fashion_mnist", gz=True)
    ds = load_dataset("fashion_mnist", data_dir=tmp_path, validation_fraction=0.2)
    assert (len(ds.x_train), len(ds.x_val), len(ds.x_test)) == (4, 1, 3)
    assert ds.x_train.shape[1:] == (28, 28, 1)
    np.testing.assert_allclose(ds.x_train.mean(), 0, atol=1e-5)


def test_idx_bad_magic(tmp_path):
    _write_idx_dataset(tmp_path, image_magic=2049)
    with pytest.raises(DataError, match=r"train-images-idx3-ubyte.*magic number 2049.*2051"):
        load_dataset("mnist", data_dir=tmp_path)


def test_idx_size_mismatch(tmp_path):
    _write_idx_dataset(tmp_path)
    path = tmp_path / "t10k-labels-idx1-ubyte"
    path.write_bytes(path.read_bytes()[:-1])
    with pytest.raises(DataError, match=r"t10k-labels-idx1-ubyte has 10 bytes, expected 11"):
        load_dataset("mnist", data_dir=tmp_path)


def test_missing_mnist_files(tmp_path):
    with pytest.raises(MissingDataError) as info:
        load_dataset("mnist", data_dir=tmp_path)
    message = str(info.value)
    for expected in (
        "train-images-idx3-ubyte",
        "train-labels-idx1-ubyte",
        "t10k-images-idx3-ubyte",
        "t10k-labels-idx1-ubyte",
        str(tmp_path),
        str(tmp_path / "mnist"),
        "data_dir",
        "ALTLEARN_DATA_DIR",
    ):
        assert expected in message


def test_missing_files_default_dir_from_env(tmp_path, monkeypatch):
    monkeypatch.setenv("ALTLEARN_DATA_DIR", str(tmp_path / "elsewhere"))
    with pytest.raises(MissingDataError, match="elsewhere"):
        load_dataset("fashion_mnist")
    _write_idx_dataset(tmp_path / "elsewhere")
    assert load_dataset("fashion_mnist").num_outputs == 10


# ---------------------------------------------------------------------------------------
# CIFAR-10 pickles


def _write_cifar(directory, rows_per_batch=2):
    directory.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    names = [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]
    for i, name in enumerate(names):
        data = rng.integers(0, 256, size=(rows_per_batch, 3072), dtype=np.uint8)
        if i == 0:  # pixel (row 3, column 5) of the first image has R, G, B = 10, 20, 30
            for channel, value in enumerate((10, 20, 30)):
                data[0, channel * 1024 + 3 * 32 + 5] = value
        labels = [(i + j) % 10 for j in range(rows_per_batch)]
        with open(directory / name, "wb") as f:
            pickle.dump({b"data": data, b"labels": labels, b"batch_label": name.encode()}, f)


@pytest.mark.parametrize("subdir", ["", "cifar10", "cifar-10-batches-py"])
def test_cifar10_reader(tmp_path, subdir):
    _write_cifar(tmp_path / subdir if subdir else tmp_path)
    ds = load_dataset("cifar10", data_dir=tmp_path, validation_fraction=0.0, standardize="none")
    assert (ds.task, ds.num_outputs, ds.input_shape) == ("classification", 10, (32, 32, 3))
    assert (len(ds.x_train), len(ds.x_test)) == (10, 2)
    assert ds.x_train.dtype == np.float32 and ds.y_train.dtype == np.int32
    np.testing.assert_allclose(ds.x_train[0, 3, 5], np.array([10, 20, 30]) / 255.0, rtol=1e-6)
    np.testing.assert_array_equal(ds.y_train[:4], [0, 1, 1, 2])


def test_cifar10_bad_batch(tmp_path):
    _write_cifar(tmp_path)
    with open(tmp_path / "test_batch", "wb") as f:
        pickle.dump({b"data": np.zeros((2, 100), np.uint8), b"labels": [0, 1]}, f)
    with pytest.raises(DataError, match="test_batch.*3072"):
        load_dataset("cifar10", data_dir=tmp_path)


def test_missing_cifar10_files(tmp_path):
    with pytest.raises(MissingDataError) as info:
        load_dataset("cifar10", data_dir=tmp_path)
    message = str(info.value)
    for expected in (
        "data_batch_1",
        "data_batch_5",
        "test_batch",
        str(tmp_path / "cifar-10-batches-py"),
    ):
        assert expected in message


# ---------------------------------------------------------------------------------------
# CSV tables


def _write_csv(path, header, rows):
    path.write_text("\n".join([",".join(header)] + [",".join(map(str, r)) for r in rows]) + "\n")
    return path


def test_csv_classification_with_string_labels(tmp_path):
    rng = np.random.default_rng(0)
    labels = ["setosa", "virginica", "versicolor"]
    rows = [[*np.round(rng.normal(size=2), 3), labels[i % 3]] for i in range(60)]
    path = _write_csv(tmp_path / "table.csv", ["a", "b", "species"], rows)
    ds = load_dataset(f"csv:{path}")
    assert (ds.task, ds.num_outputs, ds.input_shape) == ("classification", 3, (2,))
    assert (len(ds.x_train) + len(ds.x_val), len(ds.x_test)) == (48, 12)
    np.testing.assert_array_equal(np.bincount(ds.y_test), [4, 4, 4])
    raw = load_dataset(f"csv:{path}", standardize="none", validation_fraction=0.0)
    # Labels are encoded in sorted order: setosa=0, versicolor=1, virginica=2.
    by_value = {tuple(np.round(r[:2], 3)): r[2] for r in rows}
    for x, y in zip(raw.x_train, raw.y_train, strict=True):
        assert sorted(labels)[y] == by_value[tuple(np.round(x.astype(float), 3))]


def test_csv_integer_target_is_classification(tmp_path):
    rows = [[i, i % 2, 7 + 2 * (i % 3)] for i in range(30)]
    path = _write_csv(tmp_path / "ints.csv", ["x1", "x2", "label"], rows)
    ds = load_dataset(f"csv:{path}", standardize="none", validation_fraction=0.0)
    assert (ds.task, ds.num_outputs) == ("classification", 3)
    # Targets 7, 9, 11 become classes 0, 1, 2.
    np.testing.assert_array_equal(ds.y_train, (ds.x_train[:, 0].astype(int) % 3))


def test_csv_regression_relative_to_data_dir(tmp_path):
    rows = [[i, 0.5 * i + 0.25] for i in range(40)]
    _write_csv(tmp_path / "reg.csv", ["x", "y"], rows)
    ds = load_dataset("csv:reg.csv", data_dir=tmp_path)
    assert (ds.task, ds.num_outputs, ds.input_shape) == ("regression", 1, (1,))
    assert ds.y_train.shape == (len(ds.x_train), 1) and ds.y_train.dtype == np.float32
    np.testing.assert_allclose(ds.y_train.mean(0), 0, atol=1e-5)


def test_csv_non_numeric_feature(tmp_path):
    path = _write_csv(
        tmp_path / "bad.csv",
        ["size", "colour", "y"],
        [[1, "red", 0], [2, "blue", 1], [3, "red", 0]],
    )
    with pytest.raises(DataError, match="'colour'.*'red'"):
        load_dataset(f"csv:{path}")


def test_csv_ragged_row(tmp_path):
    path = tmp_path / "ragged.csv"
    path.write_text("a,b,y\n1,2,0\n3,1\n4,5,1\n")
    with pytest.raises(DataError, match="data row 2"):
        load_dataset(f"csv:{path}")


def test_csv_missing_file(tmp_path):
    with pytest.raises(MissingDataError, match="nope.csv"):
        load_dataset("csv:nope.csv", data_dir=tmp_path)
