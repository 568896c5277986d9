"""Plots of training curves (matplotlib, no display needed)."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402


def plot_curves(records: Sequence[dict], path: str | Path, title: str = "") -> None:
    """Loss (and accuracy, if present) against steps for every split found in ``records``."""
    metrics = [m for m in ("loss", "accuracy") if any(f"test_{m}" in r for r in records)]
    fig, axes = plt.subplots(1, len(metrics), figsize=(5 * len(metrics), 3.6), squeeze=False)
    steps = [r["step"] for r in records]
    for ax, metric in zip(axes[0], metrics):
        for split in ("train", "val", "test"):
            key = f"{split}_{metric}"
            if any(key in r for r in records):
                ax.plot(steps, [r.get(key, float("nan")) for r in records], label=split)
        ax.set_xlabel("step")
        ax.set_ylabel(metric)
        if metric == "loss":
            ax.set_yscale("log")
        ax.grid(alpha=0.3)
        ax.legend()
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def plot_comparison(results: dict, path: str | Path, metric: str = "test_accuracy") -> None:
    """``metric`` against steps, mean over seeds with a min-max band; one panel per dataset.

    ``results[data][method]['curves']`` is a list of {'step': int, metric: [per seed]}.
    """
    fig, axes = plt.subplots(1, len(results), figsize=(6 * len(results), 4), squeeze=False)
    for ax, (data, methods) in zip(axes[0], results.items()):
        for method, r in methods.items():
            steps = [c["step"] for c in r["curves"]]
            values = [c[metric] for c in r["curves"]]
            mean = [sum(v) / len(v) for v in values]
            ax.plot(steps, mean, label=method)
            ax.fill_between(steps, [min(v) for v in values], [max(v) for v in values], alpha=0.15)
        ax.set_title(data)
        ax.set_xlabel("step")
        ax.set_ylabel(metric)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8, ncol=2)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
