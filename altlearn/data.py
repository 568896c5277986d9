"""Datasets for altlearn: offline loaders, fixed test splits, seeded validation splits.

``load_dataset(name, ...)`` returns a :class:`Dataset` of float32 inputs in their natural
shape -- tabular ``(N, D)``, 1-D signals ``(N, L, 1)``, images ``(N, H, W, C)`` -- and
int32 class labels ``(N,)`` or float32 regression targets ``(N, K)``.

Datasets (see ``DATASETS``; nothing is ever downloaded):

* ``mnist1d`` (default): generated with the ``mnist1d`` package (4000 train / 1000 test,
  40 samples, 10 classes). Generation takes ~2 s, so the arrays are cached in-process and,
  if ``ALTLEARN_CACHE_DIR`` is set or ``data_dir`` is passed explicitly, as the ``.npz`` file
  ``mnist1d_default_v1.npz`` there (``ALTLEARN_CACHE_DIR`` wins).
* scikit-learn bundled: ``digits`` (8x8x1 images scaled to [0, 1]), ``breast_cancer``,
  ``wine``, ``iris`` (classification), ``diabetes`` (regression).
* synthetic: ``moons``, ``circles`` (classification), ``friedman1`` (regression), ``kink``
  (1-D regression: a narrow tent y = max(0, 1 - 8 |x - 0.5|) on x ~ U(-1, 1), three sharp
  kinks that a small ReLU network from a random start often fails to fit).
* from files in the data directory: ``mnist``, ``fashion_mnist`` (IDX files, optionally
  ``.gz``, in ``<data_dir>/<name>/`` or ``<data_dir>/``) and ``cifar10`` (the python
  pickles of the official ``cifar-10-python.tar.gz``, in ``<data_dir>/cifar-10-batches-py/``,
  ``<data_dir>/cifar10/`` or ``<data_dir>/``). The data directory is ``data_dir`` if given,
  else ``$ALTLEARN_DATA_DIR``, else ``./data``.
* ``csv:<path>``: a CSV table with a header row whose last column is the target (relative
  paths are tried against the working directory, then the data directory). A non-numeric
  target, or an integer-valued one with at most 50 distinct values, means classification
  (labels encoded 0..K-1 in sorted order); anything else is regression.

Datasets without an official test split get a 20% test split with the fixed split seed 0
(stratified for classification), so the test set is the same whatever ``seed`` is.

Splits and preprocessing, identical for every dataset:

* ``validation_fraction`` of the training split is held out as validation data, chosen
  with ``np.random.default_rng(seed)``; both parts keep the original order.
  ``train_on_validation=True`` trains on the validation samples too (the split is still
  returned): a control with the same labels as a method that selects on them.
* Standardisation statistics are fitted on the remaining training split only and applied
  to train/val/test: ``'feature'`` standardises every input coordinate separately,
  ``'channel'`` every channel (last axis) over all other axes, ``'auto'`` is ``'channel'``
  for images and ``'feature'`` otherwise, ``'none'`` leaves the data untouched. Zero standard
  deviations are replaced by 1. Regression targets are standardised the same way per target
  (except with ``'none'``).

Same arguments always give bitwise-identical arrays. Bad arguments and malformed files raise
:class:`DataError` (a ``ValueError``); missing files raise :class:`MissingDataError` (a
``FileNotFoundError``) naming the expected files and the directories searched.
"""

from __future__ import annotations

import csv
import functools
import gzip
import os
import pickle
import random
import tempfile
import warnings
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import NamedTuple

import numpy as np

STANDARDIZE_MODES = ("auto", "feature", "channel", "none")
TEST_FRACTION = 0.2
SPLIT_SEED = 0
MAX_CSV_CLASSES = 50

_IDX_IMAGES_MAGIC = 2051
_IDX_LABELS_MAGIC = 2049
_CIFAR_TRAIN_FILES = tuple(f"data_batch_{i}" for i in range(1, 6))
_CIFAR_TEST_FILE = "test_batch"
_DATA_DIR_HINT = (
    "pass --config.data.data_dir=DIR (or the data_dir argument), "
    "or set the ALTLEARN_DATA_DIR environment variable"
)


class DataError(ValueError):
    """Invalid dataset name or argument, or malformed data file."""


class MissingDataError(FileNotFoundError):
    """The files a dataset is read from are not in the data directory."""


class Dataset(NamedTuple):
    name: str
    task: str  # 'classification' or 'regression'
    num_outputs: int  # number of classes, or regression target dimension
    x_train: np.ndarray
    y_train: np.ndarray
    x_val: np.ndarray
    y_val: np.ndarray
    x_test: np.ndarray
    y_test: np.ndarray

    @property
    def input_shape(self) -> tuple[int, ...]:
        return self.x_train.shape[1:]


class _Raw(NamedTuple):
    """What a loader returns: the official (or fixed) train/test split, unprocessed."""

    task: str
    num_outputs: int
    x_train: np.ndarray
    y_train: np.ndarray
    x_test: np.ndarray
    y_test: np.ndarray


class DatasetInfo(NamedTuple):
    loader: Callable[[Path | None], _Raw]  # receives load_dataset's data_dir (None: default)
    description: str
    needs_data_dir: bool
    kind: str  # 'tabular', 'signal' or 'image'


# ---------------------------------------------------------------------------------------
# Helpers


def resolve_data_dir(data_dir: str | os.PathLike | None = None) -> Path:
    """``data_dir`` if given, else ``$ALTLEARN_DATA_DIR`` if set, else ``./data``."""
    if data_dir is not None:
        return Path(data_dir)
    return Path(os.environ.get("ALTLEARN_DATA_DIR") or "data")


def _classification(
    x: np.ndarray, y: np.ndarray, x_test: np.ndarray, y_test: np.ndarray, num_classes: int
) -> _Raw:
    return _Raw(
        "classification",
        num_classes,
        x.astype(np.float32),
        y.astype(np.int32),
        x_test.astype(np.float32),
        y_test.astype(np.int32),
    )


def _fixed_test_split(task: str, x: np.ndarray, y: np.ndarray) -> _Raw:
    """Carve the 20% test split with the fixed seed (stratified where possible)."""
    from sklearn.model_selection import train_test_split  # deferred: slow import

    if task == "classification":
        y = y.astype(np.int32)
        num_outputs = int(y.max()) + 1
        n_test = int(np.ceil(TEST_FRACTION * len(y)))
        stratifiable = (
            np.bincount(y).min() >= 2 and n_test >= num_outputs and len(y) - n_test >= num_outputs
        )
        stratify = y if stratifiable else None
    else:
        y = y.astype(np.float32).reshape(len(y), -1)
        num_outputs = y.shape[1]
        stratify = None
    x_train, x_test, y_train, y_test = train_test_split(
        x.astype(np.float32), y, test_size=TEST_FRACTION, random_state=SPLIT_SEED, stratify=stratify
    )
    return _Raw(task, num_outputs, x_train, y_train, x_test, y_test)


def _find_files(
    name: str, files: Sequence[str], dirs: Sequence[Path], allow_gz: bool
) -> list[Path]:
    """Paths of ``files`` (each optionally ``.gz``) in the first directory holding them all."""
    for directory in dirs:
        found = []
        for file in files:
            candidates = [directory / file] + ([directory / f"{file}.gz"] if allow_gz else [])
            path = next((p for p in candidates if p.is_file()), None)
            if path is None:
                break
            found.append(path)
        else:
            return found
    dirs = [d.absolute() for d in dirs]
    searched = ", ".join(f"{d}" + ("" if d.is_dir() else " (does not exist)") for d in dirs)
    gz = " (each optionally gzip-compressed with a .gz suffix)" if allow_gz else ""
    raise MissingDataError(
        f"Dataset {name!r} needs the files {', '.join(files)}{gz} together in one directory; "
        f"searched: {searched}. Put the files in {dirs[0]} or {_DATA_DIR_HINT}."
    )


# ---------------------------------------------------------------------------------------
# Generated and bundled datasets


@functools.cache
def _generate_mnist1d() -> tuple[np.ndarray, ...]:
    """(x, y, x_test, y_test) of MNIST-1D with the package's default arguments."""
    from mnist1d.data import get_dataset_args, make_dataset  # deferred: slow import

    # make_dataset reseeds the global RNGs; restore them so callers are not affected.
    np_state, py_state = np.random.get_state(), random.getstate()
    try:
        data = make_dataset(get_dataset_args())
    finally:
        np.random.set_state(np_state)
        random.setstate(py_state)
    return (
        data["x"].astype(np.float32),
        data["y"].astype(np.int32),
        data["x_test"].astype(np.float32),
        data["y_test"].astype(np.int32),
    )


@functools.cache
def _mnist1d_arrays(cache_dir: Path | None) -> tuple[np.ndarray, ...]:
    """MNIST-1D from the .npz cache in ``cache_dir``, else generated (and cached there)."""
    if cache_dir is None:
        return _generate_mnist1d()
    keys = ("x", "y", "x_test", "y_test")
    shapes = [(4000, 40), (4000,), (1000, 40), (1000,)]
    cache_file = cache_dir / "mnist1d_default_v1.npz"
    if cache_file.is_file():
        try:
            with np.load(cache_file, allow_pickle=False) as cached:
                arrays = tuple(cached[k] for k in keys)
            if [a.shape for a in arrays] == shapes:
                return arrays
        except (OSError, ValueError, KeyError):
            pass  # unreadable or stale cache: regenerate and overwrite it below
    arrays = _generate_mnist1d()
    try:
        cache_dir.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=cache_dir, suffix=".npz", delete=False) as f:
            np.savez(f, **dict(zip(keys, arrays, strict=True)))
        os.replace(f.name, cache_file)  # atomic: concurrent readers never see a partial file
    except OSError as e:
        warnings.warn(f"Could not write the MNIST-1D cache {cache_file}: {e}", stacklevel=2)
    return arrays


def _load_mnist1d(data_dir: Path | None) -> _Raw:
    cache_dir = os.environ.get("ALTLEARN_CACHE_DIR") or data_dir
    x, y, x_test, y_test = _mnist1d_arrays(None if cache_dir is None else Path(cache_dir))
    return _classification(x[..., None], y, x_test[..., None], y_test, 10)


def _sklearn_loader(loader_name: str, task: str, image: bool = False) -> Callable:
    def load(data_dir: Path | None) -> _Raw:
        import sklearn.datasets  # deferred: slow import

        bunch = getattr(sklearn.datasets, loader_name)()
        x = bunch.images[..., None] / 16.0 if image else bunch.data
        return _fixed_test_split(task, x, bunch.target)

    return load


def _synthetic_loader(maker_name: str, task: str, **kwargs) -> Callable:
    def load(data_dir: Path | None) -> _Raw:
        import sklearn.datasets  # deferred: slow import

        x, y = getattr(sklearn.datasets, maker_name)(
            n_samples=1000, random_state=SPLIT_SEED, **kwargs
        )
        return _fixed_test_split(task, x, y)

    return load


def _kink(data_dir: Path | None) -> _Raw:
    """x ~ U(-1, 1) (1000 points, fixed seed), y = max(0, 1 - 8 |x - 0.5|): zero but for a tent
    of half-width 1/8 at 0.5. Trained from random starts, a 1-8-8-1 ReLU network ends in the
    flat fit (half the target's variance left) about half the time (docs/RESULTS.md)."""
    del data_dir
    rng = np.random.default_rng(SPLIT_SEED)
    x = rng.uniform(-1.0, 1.0, size=(1000, 1))
    y = np.maximum(0.0, 1.0 - 8.0 * np.abs(x - 0.5))
    return _fixed_test_split("regression", x, y)


# ---------------------------------------------------------------------------------------
# MNIST / Fashion-MNIST (IDX files)


def _read_idx(path: Path, magic: int, ndim: int) -> np.ndarray:
    """Read an unsigned-byte IDX file with the given magic number and number of dims."""
    opener = gzip.open if path.suffix == ".gz" else open
    try:
        with opener(path, "rb") as f:
            raw = f.read()
    except (OSError, EOFError) as e:
        raise DataError(f"Could not read IDX file {path}: {e}") from e
    header_len = 4 * (1 + ndim)
    if len(raw) < header_len:
        raise DataError(
            f"IDX file {path} is truncated: {len(raw)} bytes, expected a {header_len}-byte header."
        )
    found_magic = int.from_bytes(raw[:4], "big")
    if found_magic != magic:
        raise DataError(
            f"IDX file {path} has magic number {found_magic}, expected {magic} "
            f"({'images' if magic == _IDX_IMAGES_MAGIC else 'labels'})."
        )
    shape = tuple(int.from_bytes(raw[4 * i : 4 * i + 4], "big") for i in range(1, ndim + 1))
    expected = header_len + int(np.prod(shape))
    if len(raw) != expected:
        raise DataError(
            f"IDX file {path} has {len(raw)} bytes, expected {expected} for shape {shape}."
        )
    return np.frombuffer(raw, dtype=np.uint8, offset=header_len).reshape(shape)


def _idx_loader(name: str) -> Callable:
    def load(data_dir: Path | None) -> _Raw:
        root = resolve_data_dir(data_dir)
        files = (
            "train-images-idx3-ubyte",
            "train-labels-idx1-ubyte",
            "t10k-images-idx3-ubyte",
            "t10k-labels-idx1-ubyte",
        )
        paths = _find_files(name, files, [root / name, root], allow_gz=True)
        arrays = []
        for images_path, labels_path in (paths[:2], paths[2:]):
            images = _read_idx(images_path, _IDX_IMAGES_MAGIC, 3)
            labels = _read_idx(labels_path, _IDX_LABELS_MAGIC, 1)
            if len(images) != len(labels):
                raise DataError(
                    f"{images_path} has {len(images)} images but {labels_path} "
                    f"has {len(labels)} labels."
                )
            if labels.size and labels.max() >= 10:
                raise DataError(f"{labels_path} has label {labels.max()}, expected 0..9.")
            arrays += [images[..., None] / np.float32(255), labels]
        return _classification(*arrays, num_classes=10)

    return load


# ---------------------------------------------------------------------------------------
# CIFAR-10 (python pickles)


def _read_cifar_batch(path: Path) -> tuple[np.ndarray, np.ndarray]:
    try:
        with open(path, "rb") as f:
            batch = pickle.load(f, encoding="bytes")
        data = np.asarray(batch[b"data"], dtype=np.uint8)
        labels = np.asarray(batch[b"labels"], dtype=np.int32)
    except (OSError, pickle.UnpicklingError, EOFError, KeyError, TypeError, ValueError) as e:
        raise DataError(
            f'CIFAR-10 batch {path} is not a pickled dict with b"data" and b"labels": {e!r}'
        ) from e
    if data.ndim != 2 or data.shape[1] != 3 * 32 * 32 or labels.shape != (len(data),):
        raise DataError(
            f"CIFAR-10 batch {path}: expected data of shape (N, 3072) and N labels, "
            f"got data {data.shape} and labels {labels.shape}."
        )
    if labels.size and (labels.min() < 0 or labels.max() >= 10):
        raise DataError(f"CIFAR-10 batch {path} has labels outside 0..9.")
    # Rows hold the R, G, B planes of a 32x32 image one after the other: convert to HWC.
    images = data.reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1)
    return images / np.float32(255), labels


def _load_cifar10(data_dir: Path | None) -> _Raw:
    root = resolve_data_dir(data_dir)
    dirs = [root / "cifar-10-batches-py", root / "cifar10", root]
    paths = _find_files("cifar10", _CIFAR_TRAIN_FILES + (_CIFAR_TEST_FILE,), dirs, allow_gz=False)
    train = [_read_cifar_batch(p) for p in paths[:-1]]
    x_test, y_test = _read_cifar_batch(paths[-1])
    x = np.concatenate([images for images, _ in train])
    y = np.concatenate([labels for _, labels in train])
    return _classification(x, y, x_test, y_test, 10)


# ---------------------------------------------------------------------------------------
# CSV tables


def _parse_float(value: str) -> float | None:
    try:
        return float(value)
    except ValueError:
        return None


def _load_csv(path_spec: str, data_dir: Path | None) -> _Raw:
    path = Path(path_spec)
    if not path.is_file() and not path.is_absolute():
        path = resolve_data_dir(data_dir) / path_spec
    if not path.is_file():
        raise MissingDataError(
            f"CSV file {path_spec!r} not found (tried {Path(path_spec).resolve()} and {path}). "
            f"Give an existing path as csv:<path>, relative to the working directory or to the "
            f"data directory ({_DATA_DIR_HINT})."
        )
    with open(path, newline="") as f:
        rows = [row for row in csv.reader(f) if any(cell.strip() for cell in row)]
    if not rows:
        raise DataError(f"CSV file {path} is empty; expected a header row and data rows.")
    header, rows = [h.strip() for h in rows[0]], rows[1:]
    if len(header) < 2 or len(rows) < 2:
        raise DataError(
            f"CSV file {path} needs a header row, at least one feature column plus "
            f"the target column (last), and at least 2 data rows; got "
            f"{len(header)} column(s) and {len(rows)} data row(s)."
        )
    for index, row in enumerate(rows, start=1):
        if len(row) != len(header):
            raise DataError(
                f"CSV file {path}, data row {index}: {len(row)} fields, expected "
                f"{len(header)} (one per header column)."
            )
    columns = list(zip(*[[cell.strip() for cell in row] for row in rows], strict=True))

    features = []
    for name, column in zip(header[:-1], columns[:-1], strict=True):
        values = [_parse_float(v) for v in column]
        bad = next(
            (v for v, f in zip(column, values, strict=True) if f is None or not np.isfinite(f)),
            None,
        )
        if bad is not None:
            raise DataError(
                f"CSV file {path}: feature column {name!r} has the non-numeric or "
                f"non-finite value {bad!r}; all feature columns must be numeric."
            )
        features.append(values)
    x = np.array(features, dtype=np.float64).T

    target_name, target = header[-1], columns[-1]
    numeric = [_parse_float(v) for v in target]
    if any(v is None for v in numeric):
        _, y = np.unique(np.array(target), return_inverse=True)
        return _fixed_test_split("classification", x, y)
    y = np.array(numeric, dtype=np.float64)
    if not np.isfinite(y).all():
        raise DataError(f"CSV file {path}: target column {target_name!r} has non-finite values.")
    classes = np.unique(y)
    if np.all(y == np.round(y)) and len(classes) <= MAX_CSV_CLASSES:
        return _fixed_test_split("classification", x, np.searchsorted(classes, y))
    return _fixed_test_split("regression", x, y)


# ---------------------------------------------------------------------------------------
# Registry and entry point


DATASETS: dict[str, DatasetInfo] = {
    "mnist1d": DatasetInfo(
        _load_mnist1d,
        "MNIST-1D, generated: 4000/1000 signals of length 40, 10 classes",
        False,
        "signal",
    ),
    "digits": DatasetInfo(
        _sklearn_loader("load_digits", "classification", image=True),
        "scikit-learn 8x8 digits, 10 classes",
        False,
        "image",
    ),
    "breast_cancer": DatasetInfo(
        _sklearn_loader("load_breast_cancer", "classification"),
        "scikit-learn breast cancer, 30 features, 2 classes",
        False,
        "tabular",
    ),
    "wine": DatasetInfo(
        _sklearn_loader("load_wine", "classification"),
        "scikit-learn wine, 13 features, 3 classes",
        False,
        "tabular",
    ),
    "iris": DatasetInfo(
        _sklearn_loader("load_iris", "classification"),
        "scikit-learn iris, 4 features, 3 classes",
        False,
        "tabular",
    ),
    "diabetes": DatasetInfo(
        _sklearn_loader("load_diabetes", "regression"),
        "scikit-learn diabetes, 10 features, 1 regression target",
        False,
        "tabular",
    ),
    "moons": DatasetInfo(
        _synthetic_loader("make_moons", "classification", noise=0.1),
        "two moons, 1000 points, 2 classes",
        False,
        "tabular",
    ),
    "circles": DatasetInfo(
        _synthetic_loader("make_circles", "classification", noise=0.1, factor=0.5),
        "concentric circles, 1000 points, 2 classes",
        False,
        "tabular",
    ),
    "friedman1": DatasetInfo(
        _synthetic_loader("make_friedman1", "regression", noise=1.0),
        "Friedman #1, 1000 points, 10 features, 1 regression target",
        False,
        "tabular",
    ),
    "kink": DatasetInfo(
        _kink, "a narrow tent on [-1, 1], 1000 points, 1 regression target", False, "tabular"
    ),
    "mnist": DatasetInfo(
        _idx_loader("mnist"), "MNIST from IDX files, 28x28x1, 10 classes", True, "image"
    ),
    "fashion_mnist": DatasetInfo(
        _idx_loader("fashion_mnist"),
        "Fashion-MNIST from IDX files, 28x28x1, 10 classes",
        True,
        "image",
    ),
    "cifar10": DatasetInfo(
        _load_cifar10, "CIFAR-10 from the python pickles, 32x32x3, 10 classes", True, "image"
    ),
}


def dataset_names() -> list[str]:
    """The registry names plus the ``csv:<path>`` form."""
    return [*DATASETS, "csv:<path>"]


def _lookup(name: str) -> tuple[str, Callable[[Path | None], _Raw]]:
    """(kind, loader) for a registry name or ``csv:<path>``."""
    if name.startswith("csv:"):
        path_spec = name[len("csv:") :]
        if not path_spec:
            raise DataError("Empty CSV path: use csv:<path>, e.g. csv:data/table.csv.")
        return "tabular", functools.partial(_load_csv, path_spec)
    if name not in DATASETS:
        raise DataError(f"Unknown dataset {name!r}. Valid names: {', '.join(dataset_names())}.")
    info = DATASETS[name]
    return info.kind, info.loader


def _standardize(train: np.ndarray, *others: np.ndarray, axes: tuple[int, ...]) -> list[np.ndarray]:
    """Standardise all arrays with the mean/std of ``train`` over ``axes`` (std 0 -> 1)."""
    mean = train.mean(axis=axes, keepdims=True, dtype=np.float64)
    std = train.std(axis=axes, keepdims=True, dtype=np.float64)
    std[std == 0] = 1.0
    return [((a - mean) / std).astype(np.float32) for a in (train, *others)]


def load_dataset(
    name: str,
    *,
    data_dir: str | os.PathLike | None = None,
    seed: int = 0,
    validation_fraction: float = 0.1,
    standardize: str = "auto",
    train_on_validation: bool = False,
) -> Dataset:
    """Load dataset ``name``, hold out a seeded validation split, and standardise it.

    ``train_on_validation``: the training split holds the validation samples as well (the
    validation split is still returned, now data the model trains on): the control for a method
    that uses the validation labels while training.
    See the module docstring for the names, the data directory and the preprocessing.
    """
    if standardize not in STANDARDIZE_MODES:
        raise DataError(
            f"Unknown standardize mode {standardize!r}; valid choices: "
            f"{', '.join(STANDARDIZE_MODES)}."
        )
    if not 0 <= validation_fraction < 1:
        raise DataError(f"validation_fraction must be in [0, 1), got {validation_fraction!r}.")
    kind, loader = _lookup(name)
    raw = loader(None if data_dir is None else Path(data_dir))

    n = len(raw.x_train)
    n_val = min(int(round(n * validation_fraction)), n - 1)
    held_out = np.zeros(n, dtype=bool)
    held_out[np.random.default_rng(seed).permutation(n)[:n_val]] = True
    x_train, y_train = raw.x_train[~held_out], raw.y_train[~held_out]
    x_val, y_val = raw.x_train[held_out], raw.y_train[held_out]
    if train_on_validation:
        x_train, y_train = raw.x_train, raw.y_train
    x_test, y_test = raw.x_test.copy(), raw.y_test.copy()

    if standardize == "auto":
        standardize = "channel" if kind == "image" else "feature"
    if standardize != "none":
        axes = (0,) if standardize == "feature" else tuple(range(x_train.ndim - 1))
        x_train, x_val, x_test = _standardize(x_train, x_val, x_test, axes=axes)
        if raw.task == "regression":
            y_train, y_val, y_test = _standardize(y_train, y_val, y_test, axes=(0,))
    return Dataset(name, raw.task, raw.num_outputs, x_train, y_train, x_val, y_val, x_test, y_test)
