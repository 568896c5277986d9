"""Plots of training curves (matplotlib, no display needed)."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np


def pyplot():
    """matplotlib.pyplot on the Agg backend, imported on first use: importing it costs about a
    third of a second, which every process that never plots (a bad flag, a worker) would pay."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def save(fig, path: str | Path, dpi: int = 100) -> None:
    """Lays ``fig`` out, writes it to ``path`` and frees it."""
    fig.tight_layout()
    fig.savefig(path, dpi=dpi)
    pyplot().close(fig)


def plot_curves(records: Sequence[dict], path: str | Path, title: str = "") -> None:
    """Loss (and accuracy, if present) against steps for every split found in ``records``."""
    metrics = [m for m in ("loss", "accuracy") if any(f"test_{m}" in r for r in records)]
    fig, axes = pyplot().subplots(1, len(metrics), figsize=(5 * len(metrics), 3.6), squeeze=False)
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
    save(fig, path, 100)


def plot_comparison(results: dict, path: str | Path, metric: str = "test_accuracy") -> None:
    """``metric`` against steps, mean over seeds with a min-max band; one panel per dataset.

    ``results[data][method]['curves']`` is a list of {'step': int, metric: [per seed]}.
    """
    fig, axes = pyplot().subplots(1, len(results), figsize=(6 * len(results), 4), squeeze=False)
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
    save(fig, path, 100)


def plot_sweep(rows: list[dict[str, Any]], axes: list[Any], score: str, path: str | Path) -> None:
    """The final ``score`` against each numeric axis, a line per structural point (a rule, a
    width): the mean over seeds at the other numeric axes' best values, the seeds' range shaded.
    With two numeric axes or more, a heatmap per structural point of the seed mean over the
    first two it has (best over any further ones)."""
    numeric = [a for a in axes if a.numeric]
    if not numeric:
        return

    def wide(values) -> bool:
        """Positive figures spanning more than 20x: shown on a log scale."""
        values = np.asarray(list(values), np.float64)
        values = values[np.isfinite(values)]
        return values.size > 0 and values.min() > 0 and values.max() / values.min() > 20

    structural = [a.key for a in axes if not a.numeric]
    label = lambda r: ", ".join(
        str(r[k]) if k in ("rule.name", "model.name") else f"{k.split('.')[-1]}={r[k]}"
        for k in structural
        if k in r
    )
    groups: dict[str, list[dict[str, Any]]] = {}
    for r in rows:
        groups.setdefault(label(r), []).append(r)

    def seed_means(group, keys):
        """{values of ``keys``: [score per seed]} over the group's rows."""
        out: dict[tuple, list[float]] = {}
        for r in group:
            out.setdefault(tuple(r.get(k) for k in keys), []).append(r[score])
        return out

    maps = [(g, [a.key for a in numeric if a.key in grp[0]]) for g, grp in groups.items()]
    maps = [(g, keys) for g, keys in maps if len(keys) >= 2]
    cols = len(numeric) + len(maps)
    fig, panels = pyplot().subplots(1, cols, figsize=(5 * cols, 3.8), squeeze=False)
    for ax, axis in zip(panels[0], numeric):
        for color, (name, group) in enumerate(groups.items()):
            others = [a.key for a in numeric if a.key != axis.key and a.key in group[0]]
            if axis.key not in group[0]:
                continue
            by = seed_means(group, [axis.key, *others])
            values = sorted({key[0] for key in by})
            best = [min((v for k, v in by.items() if k[0] == x), key=np.mean) for x in values]
            mean = [np.mean(b) for b in best]
            ax.plot(values, mean, "o-", color=f"C{color}", label=name or None)
            ax.fill_between(
                values, [min(b) for b in best], [max(b) for b in best], color=f"C{color}", alpha=0.2
            )
        every = [r[axis.key] for r in rows if axis.key in r]
        if min(every) > 0 and max(every) / min(every) > 20:
            ax.set_xscale("log")
        if wide(r[score] for r in rows):  # a diverged point would flatten the others
            ax.set_yscale("log")
        ax.set_xlabel(axis.key)
        ax.set_ylabel(f"final {score}")
        if len(groups) > 1:
            ax.legend(fontsize=7)
    for ax, (name, keys) in zip(panels[0][len(numeric) :], maps):
        by = seed_means(groups[name], keys)
        xs, ys = sorted({k[0] for k in by}), sorted({k[1] for k in by})
        grid = np.full((len(ys), len(xs)), np.nan)
        for k, v in by.items():
            i, j = ys.index(k[1]), xs.index(k[0])
            grid[i, j] = np.nanmin([grid[i, j], np.mean(v)])
        norm = _log_norm() if wide(grid[np.isfinite(grid)]) else None
        image = ax.imshow(grid, origin="lower", aspect="auto", cmap="viridis", norm=norm)
        ax.set_xticks(range(len(xs)), [f"{x:.3g}" for x in xs], rotation=45, fontsize=7)
        ax.set_yticks(range(len(ys)), [f"{y:.3g}" for y in ys], fontsize=7)
        ax.set_xlabel(keys[0])
        ax.set_ylabel(keys[1])
        ax.set_title(f"final {score}" + (f" ({name})" if name else ""), fontsize=9)
        fig.colorbar(image, ax=ax)
    save(fig, path, 90)


def plot_leaderboard(results: dict, path: str | Path, budgets: dict[str, str]) -> None:
    """Each method's final test figure, mean and 95% t interval over seeds, a panel per budget
    and a row per setting; ``results[setting][method]['final'][budget][metric]`` holds the
    seeds' figures (accuracy in %, or the loss)."""
    from altlearn import report  # the statistics, one definition

    rows = len(results)
    fig, axes = pyplot().subplots(
        rows, len(budgets), figsize=(5 * len(budgets), 0.3 * 20 * rows), squeeze=False
    )
    for row, (setting, methods) in zip(axes, results.items()):
        first = next(iter(methods.values()))["final"]
        metric = "test_accuracy" if "test_accuracy" in next(iter(first.values())) else "test_loss"
        scale = 100.0 if metric == "test_accuracy" else 1.0
        names = list(methods)
        for ax, (budget, label) in zip(row, budgets.items()):
            s = [report.stats(methods[m]["final"][budget][metric]) for m in names]
            mean = np.array([x["mean"] for x in s]) * scale
            low = np.array([x["low"] for x in s]) * scale
            high = np.array([x["high"] for x in s]) * scale
            y = np.arange(len(names))[::-1]
            ax.errorbar(
                mean, y, xerr=[np.nan_to_num(mean - low), np.nan_to_num(high - mean)],
                fmt="o", capsize=3,
            )  # fmt: skip
            ax.set_yticks(y, names, fontsize=8)
            ax.set_title(f"{setting}: {label}", fontsize=9)
            ax.set_xlabel(metric + (" (%)" if scale == 100.0 else ""))
            ax.grid(alpha=0.3)
    save(fig, path, 100)


def _log_norm():
    from matplotlib.colors import LogNorm

    return LogNorm()
