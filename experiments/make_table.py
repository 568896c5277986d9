r"""Writes a stand-in for the UCI Rice (Cammeo and Osmancik) table when the real file is absent.

Paper 000 evaluates on the UCI Rice and Dry Bean tables. They need a download, so the comparison
uses the user's own file when present (``csv:<path>``, header row, class in the last column) and
this generated table otherwise: same shape as Rice (3,810 rows, 7 numeric features with Rice's
column names and magnitudes, 2 string classes), drawn by scikit-learn's ``make_classification``
(5 informative and 2 redundant features, 3% label noise), so it is as hard as a real table of that
size rather than trivially separable. Deterministic in ``--seed``.

    python -m experiments.make_table --out=data/rice_like.csv
"""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np
from absl import app, flags
from sklearn.datasets import make_classification

COLUMNS = (
    "Area",
    "Perimeter",
    "Major_Axis_Length",
    "Minor_Axis_Length",
    "Eccentricity",
    "Convex_Area",
    "Extent",
)
# Rice's column means and spreads, so the features need the standardisation a real table needs.
SCALE = np.array([12667.7, 454.2, 188.8, 86.3, 0.887, 12952.5, 0.662])
SPREAD = np.array([1732.4, 35.6, 17.4, 5.7, 0.021, 1776.9, 0.077])
CLASSES = ("Cammeo", "Osmancik")


def rice_like(seed: int = 0, rows: int = 3810) -> tuple[np.ndarray, np.ndarray]:
    """(features (rows, 7), class names (rows,)): a Rice-shaped two-class table."""
    x, y = make_classification(
        n_samples=rows,
        n_features=len(COLUMNS),
        n_informative=5,
        n_redundant=2,
        n_clusters_per_class=2,
        class_sep=1.0,
        flip_y=0.03,
        random_state=seed,
    )
    return SCALE + SPREAD * x, np.array(CLASSES)[y]


def write_table(path: Path, seed: int = 0, rows: int = 3810) -> Path:
    x, y = rice_like(seed, rows)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow([*COLUMNS, "Class"])
        for features, label in zip(x, y, strict=True):
            writer.writerow([f"{v:.6g}" for v in features] + [label])
    return path


def main(argv: list[str]) -> None:
    del argv
    path = write_table(Path(_OUT.value), _SEED.value, _ROWS.value)
    print(f"wrote {path} ({_ROWS.value} rows, {len(COLUMNS)} features + Class)")


if __name__ == "__main__":
    _OUT = flags.DEFINE_string("out", "data/rice_like.csv", "Where to write the CSV table.")
    _SEED = flags.DEFINE_integer("seed", 0, "Generator seed.")
    _ROWS = flags.DEFINE_integer("rows", 3810, "Number of rows (Rice has 3,810).")
    app.run(main)
