"""Sweep axes: what ``--sweep=KEY=SPEC`` means, checked before anything compiles.

SPEC is one of
    [v1,v2,...]              the values listed (numbers, or names for a structural key)
    linspace(a,b,n)          numpy.linspace(a, b, n)
    logspace(a,b,n)          numpy.logspace(a, b, n): 10^a .. 10^b
    uniform(a,b,n)           n draws from U(a, b), seeded
    loguniform(a,b,n)        n draws whose log10 is U(log10 a, log10 b), seeded (a, b > 0)

A key is NUMERIC when it is a sweepable float of the config (``config.hparams``: every float
under ``rule.`` and ``optimizer.``): all numeric points and all seeds train as one vmapped
program. Any other config key (model widths, population size, ``rule.name``, ``data.name``)
is STRUCTURAL: one compiled program per structural point, and only a list can give its values.
Several axes form a grid (``points``).

``rule.name`` and ``model.name`` switch a whole config section, so the other axes are read
against each switched config (``plan``): an axis applies to the points whose rule or model has
its key (``rule.sigma`` to node perturbation, not to backprop) and is blank elsewhere; a key that
no point has is refused. ``rule.name=[weight_perturbation,node_perturbation]`` with
``rule.sigma=logspace(-3,-1,5)`` is 2 compilations of 5 points each; adding ``backprop`` to the
names adds one compilation of 1 point.
"""

from __future__ import annotations

import ast
import csv
import itertools
import json
import re
import shlex
import zlib
from pathlib import Path
from typing import Any, NamedTuple

import ml_collections
import numpy as np

from altlearn import config as config_lib
from altlearn import plotting, report

FORMS = "[v1,v2,...], linspace(a,b,n), logspace(a,b,n), uniform(a,b,n), loguniform(a,b,n)"
_RANGE = re.compile(r"^(linspace|logspace|uniform|loguniform)\((.*)\)$")


class Axis(NamedTuple):
    key: str  # dotted config key, e.g. optimizer.learning_rate
    values: tuple[Any, ...]
    numeric: bool  # a sweepable float: vmapped; else structural: compiled per point


def sweepable(config: ml_collections.ConfigDict) -> list[str]:
    """The numeric (vmapped) keys of ``config``."""
    return sorted(config_lib.hparams(config))


def _ignored(config: ml_collections.ConfigDict, key: str) -> bool:
    """Whether ``key`` lies in a section the config's rule does not read (the optimizer of a
    swarm): sweeping it would repeat identical runs."""
    return key.split(".")[0] in config_lib.ignored_sections(config)


def _applies(config: ml_collections.ConfigDict, key: str) -> bool:
    return config_lib.has_key(config, key) and not _ignored(config, key)


def _top_level_split(text: str) -> list[str]:
    """``text`` split at the commas outside brackets: ``(64,),(128,128)`` -> two items."""
    items, depth, start = [], 0, 0
    for i, ch in enumerate(text):
        depth += ch in "([{"
        depth -= ch in ")]}"
        if ch == "," and depth == 0:
            items.append(text[start:i])
            start = i + 1
    return [*items, text[start:]]


def parse_values(key: str, spec: str, seed: int = 0, flag: str = "--sweep") -> tuple[Any, ...]:
    """The values ``spec`` gives, or a one-line error naming the valid forms."""
    spec = spec.strip()
    match = _RANGE.match(spec)
    if match:
        form, inner = match.groups()
        try:
            a, b, n = (ast.literal_eval(part.strip()) for part in inner.split(","))
        except (ValueError, SyntaxError):
            raise ValueError(
                f"{flag} {key}={spec}: {form} takes (a,b,n) with numbers a, b and a count n; "
                f"valid forms: {FORMS}."
            ) from None
        if not isinstance(n, int) or isinstance(n, bool) or n < 1:
            raise ValueError(f"{flag} {key}={spec}: n must be an integer >= 1, got {n!r}.")
        if form == "loguniform" and not (a > 0 and b > 0):
            raise ValueError(f"{flag} {key}={spec}: loguniform needs a, b > 0.")
        rng = np.random.default_rng([seed, zlib.crc32(key.encode())])  # stable across runs
        values = {
            "linspace": lambda: np.linspace(a, b, n),
            "logspace": lambda: np.logspace(a, b, n),
            "uniform": lambda: rng.uniform(a, b, n),
            "loguniform": lambda: 10 ** rng.uniform(np.log10(a), np.log10(b), n),
        }[form]()
        return tuple(float(v) for v in values)
    if spec.startswith("[") and spec.endswith("]"):
        items = [item.strip() for item in _top_level_split(spec[1:-1]) if item.strip()]
        if not items:
            raise ValueError(f"{flag} {key}={spec}: an empty list; give at least one value.")
        out = []
        for item in items:
            try:
                out.append(ast.literal_eval(item))
            except (ValueError, SyntaxError):
                out.append(item)  # a bare name: rule.name=[backprop,node_perturbation]
        return tuple(out)
    raise ValueError(f"{flag} {key}={spec}: malformed SPEC; valid forms: {FORMS}.")


def parse_axis(
    config: ml_collections.ConfigDict, flag: str, seed: int = 0, name: str = "--sweep"
) -> Axis:
    """``KEY=SPEC`` as an axis of ``config``: an unknown key names the sweepable ones; a range
    for a structural key is refused."""
    key, sep, spec = flag.partition("=")
    key = key.strip()
    if not sep or not key:
        raise ValueError(f"{name} {flag!r}: give KEY=SPEC; valid SPEC forms: {FORMS}.")
    if config_lib.has_key(config, key) and _ignored(config, key):
        raise ValueError(
            f"{name} {key}: rule {config.rule.name!r} does not use the "
            f"{key.split('.')[0]} section; its numeric keys: {', '.join(sweepable(config))}."
        )
    if not config_lib.has_key(config, key):
        raise ValueError(
            f"{name}: unknown config key {key!r}; the numeric (vmapped) keys of this config: "
            f"{', '.join(sweepable(config))}; any other config key is a structural axis."
        )
    numeric = key in config_lib.hparams(config)
    values = parse_values(key, spec, seed, name)
    if not numeric and _RANGE.match(spec.strip()):
        raise ValueError(
            f"{name} {key}={spec}: {key} is structural (one compilation per value), so give "
            f"its values as a list [v1,v2,...]; numeric ranges are for the sweepable floats: "
            f"{', '.join(sweepable(config))}."
        )
    if numeric:
        bad = [v for v in values if isinstance(v, bool) or not isinstance(v, int | float)]
        if bad:
            raise ValueError(f"{name} {key}: {key} takes numbers; got {bad}.")
        values = tuple(float(v) for v in values)
    return Axis(key, values, numeric)


def points(axes: list[Axis]) -> tuple[list[dict[str, Any]], list[dict[str, float]]]:
    """(structural points, numeric points): the grid of each kind, in the order given."""
    keys = [a.key for a in axes]
    if len(set(keys)) != len(keys):
        raise ValueError(f"--sweep: a key given twice: {keys}.")
    grid = lambda kind: [
        dict(zip([a.key for a in kind], combo))
        for combo in itertools.product(*(a.values for a in kind))
    ]
    return grid([a for a in axes if not a.numeric]), grid([a for a in axes if a.numeric])


NAME_KEYS = ("rule.name", "model.name")  # switch a section: other keys are read per point


class Point(NamedTuple):
    """One structural point of a sweep: its values, its config, and its numeric grid."""

    values: dict[str, Any]  # structural key -> value
    config: ml_collections.ConfigDict  # the base config with ``values`` set (validated)
    numeric: list[dict[str, float]]  # the numeric points that apply to it ([{}]: none)


def point_config(
    base: ml_collections.ConfigDict, point: dict[str, Any], split: int | None = None
) -> ml_collections.ConfigDict:
    """``base`` with a structural point's values (a rule or model name switches the section),
    the validation split pinned to seed ``split`` (where given), validated."""
    config = ml_collections.ConfigDict(base.to_dict())
    if split is not None:
        config.data.split_seed = split
    for kind in config_lib.SWITCHABLE:
        name = point.get(f"{kind}.name")
        if name is not None:
            config_lib.switch(config, **{kind: name})
    for key, value in point.items():
        if key not in NAME_KEYS:
            config_lib.set_key(config, key, value)
    config_lib.validate(config)
    return config


def plan(
    base: ml_collections.ConfigDict, flags: list[str], seed: int, split: int | None = None
) -> tuple[list[Axis], list[Point]]:
    """The sweep ``flags`` over ``base``: its axes and its structural points, each with the
    numeric grid of the axes its config has (module docstring). Each structural point's config
    is built and validated (``point_config``, the split pinned to ``split``) here, before
    anything compiles."""
    configure = lambda values: point_config(base, values, split)
    keys = [flag.partition("=")[0].strip() for flag in flags]
    if len(set(keys)) != len(keys):
        raise ValueError(f"--sweep: a key given twice: {keys}.")
    names = [parse_axis(base, f, seed) for f, k in zip(flags, keys) if k in NAME_KEYS]
    named = [configure(dict(zip([a.key for a in names], c))) for c in _product(names)]
    axes_by_key = {a.key: a for a in names}
    for flag, key in zip(flags, keys):
        if key in NAME_KEYS:
            continue
        having = [c for c in named if _applies(c, key)]
        if not having and not names:
            parse_axis(named[0], flag, seed)  # raises: unknown, or a section the rule ignores
        if not having:
            known = sorted({k for c in named for k in sweepable(c)})
            raise ValueError(
                f"--sweep: no swept rule reads the config key {key!r}; their numeric (vmapped) "
                f"keys: {', '.join(known)}; any other config key is a structural axis."
            )
        kinds = {key in config_lib.hparams(c) for c in having}
        if len(kinds) > 1:
            raise ValueError(f"--sweep {key}: numeric for some swept rules, not for others.")
        axes_by_key[key] = parse_axis(having[0], flag, seed)
    axes = [axes_by_key[k] for k in keys]
    points = []
    for name_values, config in zip(
        [dict(zip([a.key for a in names], c)) for c in _product(names)], named
    ):
        mine = [a for a in axes if a.key not in NAME_KEYS and _applies(config, a.key)]
        structural = [a for a in mine if not a.numeric]
        numeric = [a for a in mine if a.numeric]
        for combo in _product(structural):
            values = {**name_values, **dict(zip([a.key for a in structural], combo))}
            at = configure(values) if combo else config
            # a structural value may change what the rule reads (rule.strategy: the optimizer)
            reads = [a for a in numeric if _applies(at, a.key)]
            grid = [dict(zip([a.key for a in reads], c)) for c in _product(reads)]
            points.append(Point(values, at, grid))
    return axes, points


def _product(axes: list[Axis]) -> list[tuple[Any, ...]]:
    return list(itertools.product(*(a.values for a in axes)))


# ---------------------------------------------------------------------- results


def row(values: dict[str, Any], seed: int, curve: dict[str, list]) -> dict[str, Any]:
    """A ``sweep.csv`` row: the point's values, the seed, every final figure, and the step of
    the best validation loss (training loss without a validation split)."""
    score = np.asarray(curve.get("val_loss", curve["train_loss"]), np.float64)
    out = {**values, "seed": seed}
    for name in sorted(k for k in curve if k != "step"):
        out[name] = curve[name][-1]
    out["best_val_step"] = (
        int(curve["step"][int(np.nanargmin(score))]) if np.any(np.isfinite(score)) else None
    )
    return out


def write_outputs(
    workdir: Path,
    axes: list[dict],
    spec: dict,
    runs: list[dict],
    provenance: report.Provenance,
    writer: bool = True,
) -> dict[str, Any]:
    """``sweep.csv``, and ``sweep.json`` / ``sweep.md`` / ``sweep.png`` through
    ``altlearn.report`` from ``runs`` (each ``{"order", "row", "curve"}``, sorted here into the
    unsharded sweep's order); returns the rows and the best point by mean final validation
    loss (training loss without a validation split)."""
    runs = sorted(runs, key=lambda r: r["order"])
    rows = [r["row"] for r in runs]
    point_keys = [a["key"] for a in axes if not a["numeric"]]
    point_keys += [a["key"] for a in axes if a["numeric"]]
    score_key = "val_loss" if "val_loss" in rows[0] else "train_loss"
    key_of = lambda r: json.dumps([r.get(k) for k in point_keys], default=str)
    groups: dict[str, list[dict]] = {}
    for r in rows:
        groups.setdefault(key_of(r), []).append(r)
    mean = lambda g: report.stats([r[score_key] for r in groups[g]])["mean"]
    finite = [g for g in groups if np.isfinite(mean(g))] or list(groups)
    best = min(finite, key=mean)
    best_point = {k: groups[best][0][k] for k in point_keys if k in groups[best][0]}
    result = {
        "rows": rows,
        "best": best_point,
        "best_score": mean(best),
        "score_key": score_key,
        "split_seed": spec["split_seed"],
    }
    if not writer:
        return result
    # every row's keys: the axes, the seed, the figures; an axis a point's rule lacks: ""
    columns = list(dict.fromkeys(point_keys + [k for r in rows for k in r]))
    with open(workdir / "sweep.csv", "w", newline="") as f:
        table = csv.DictWriter(f, columns, restval="")
        table.writeheader()
        table.writerows(rows)
    figure = "test_accuracy" if "test_accuracy" in rows[0] else "test_loss"
    lines = [
        f"Best point by mean final {score_key}: {best_point} ({mean(best):.4f}).",
        "",
        "Final figures per point: mean ± sample std [95% t interval] over its seeds.",
        "",
        f"| point | seeds | {score_key} | {figure} |",
        "|---|---|---|---|",
    ]
    for members in groups.values():
        label = ", ".join(f"{k}={members[0][k]}" for k in point_keys if k in members[0])
        lines.append(
            f"| {label or '-'} | {len(members)} | "
            f"{report.cell(report.stats([r[score_key] for r in members]), digits=4)} | "
            f"{report.cell(report.stats([r[figure] for r in members]), digits=4)} |"
        )
    axes_ = [Axis(a["key"], tuple(a["values"]), a["numeric"]) for a in axes]
    report.write(
        workdir,
        "sweep",
        {"spec": spec, "axes": axes, "runs": runs},
        "\n".join(lines),
        provenance,
        lambda path: plotting.plot_sweep(rows, axes_, score_key, path),
    )
    return result


def rerun_command(config_spec: str, overrides: list[str], point: dict[str, Any], split: int):
    """The ``experiments.train`` command that trains ``point`` alone (seed S of the sweep)."""
    sets = [f"--config.{k}={v}" for k, v in point.items()]
    return shlex.join(
        [
            "python",
            "-m",
            "experiments.train",
            f"--config={config_spec}",
            *overrides,
            *sets,
            f"--config.data.split_seed={split}",
            "--config.seed=S",
            "--workdir=runs/best",
        ]
    )
