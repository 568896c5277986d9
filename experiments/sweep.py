"""A hyperparameter sweep as one command: every numeric point and seed in one compiled program.

    python -m experiments.sweep --config=experiments/configs/digits.py --workdir=runs/lr \\
        --sweep='optimizer.learning_rate=logspace(-4,-2,8)' --seeds=3
    python -m experiments.sweep --config=experiments/configs/np_family.py:method=np \\
        --workdir=runs/np --sweep='rule.sigma=[1e-3,1e-2]' --sweep='model.widths=[(64,),(256,)]'

``--sweep=KEY=SPEC`` (repeatable; several form a grid; the SPEC forms and what is numeric or
structural: ``altlearn.sweep``). All numeric points times all seeds of a structural point train
as ONE program of the engine (``altlearn.driver``): ``--memory_budget_mb`` chunks it, several
devices share each chunk, ``--coordinator_address`` / ``--num_processes`` / ``--process_id``
(or SLURM / TPU environments) spread it over processes, each finished chunk is saved in
``chunks/`` so that a killed sweep rerun on its workdir skips it. ``--shard=i/n`` trains every
n-th point from the i-th (a job array); ``--merge=DIR,DIR,...`` joins the shards' outputs.
Seed s of a point uses the key and the data split of ``experiments.train --config.seed=s
--config.data.split_seed=SPLIT`` (SPLIT: the config's own seed), printed for the best point.

Outputs in the workdir: ``sweep.csv`` (a row per point and seed: every swept value, the seed,
the final figures, the step of the best validation loss), ``sweep.json`` (every evaluation's
figures, with the run's provenance), ``sweep.md`` (each point's mean, sample std and 95%
interval) and ``sweep.png`` (``altlearn.plotting.plot_sweep``).
"""

from __future__ import annotations

import sys

from altlearn.distributed import initialize_distributed


def _flag(argv: list[str], name: str) -> str:
    """The value of ``--name=V`` in ``argv`` ('' if absent)."""
    return next((a.split("=", 1)[1] for a in argv if a.startswith(f"--{name}=")), "")


if __name__ == "__main__":  # before anything touches a device (altlearn.distributed)
    try:
        initialize_distributed(
            _flag(sys.argv, "coordinator_address"),
            int(_flag(sys.argv, "num_processes") or 0),
            int(_flag(sys.argv, "process_id") or 0),
        )
    except ValueError as e:
        sys.exit(f"error: {e}")

import hashlib  # noqa: E402
import json  # noqa: E402
import re  # noqa: E402
from pathlib import Path  # noqa: E402
from typing import Any  # noqa: E402

import jax  # noqa: E402
import ml_collections  # noqa: E402
import numpy as np  # noqa: E402
from absl import app, flags  # noqa: E402

from altlearn import config as config_lib  # noqa: E402
from altlearn import driver, report  # noqa: E402
from altlearn import sweep as sweep_lib  # noqa: E402
from altlearn.data import MissingDataError  # noqa: E402
from altlearn.train import configure_jax, split_seed  # noqa: E402

DEFAULT_CONFIG = "experiments/configs/default.py"


def sweep_id(config: ml_collections.ConfigDict, sweeps: list[str], seeds: int) -> str:
    """What identifies a sweep (its config, axes and seeds): a rerun on a workdir must match."""
    text = json.dumps([config.to_json_best_effort(sort_keys=True), sweeps, seeds])
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def parse_shard(text: str) -> tuple[int, int]:
    """``i/n`` (this job's share of the points: every n-th point from the i-th, 0-based)."""
    match = re.fullmatch(r"(\d+)/(\d+)", text.strip())
    if not match or not 0 <= int(match[1]) < int(match[2]):
        raise ValueError(f"--shard={text}: give i/n with 0 <= i < n (e.g. 0/4 .. 3/4).")
    return int(match[1]), int(match[2])


def run_sweep(
    base: ml_collections.ConfigDict,
    sweeps: list[str],
    seeds: int,
    workdir: Path,
    memory_budget_mb: float = 0.0,
    shard: tuple[int, int] = (0, 1),
    provenance: report.Provenance | None = None,
) -> dict[str, Any]:
    """Runs (or resumes) the sweep, or with ``shard=(i, n)`` its i-th share of the points."""
    if seeds < 1:
        raise ValueError(f"--seeds must be >= 1, got {seeds}.")
    split = split_seed(base)
    # every structural point's config is built and checked here, before anything compiles
    axes, plan = sweep_lib.plan(base, sweeps, int(base.seed), split)
    offsets = np.cumsum([0] + [len(p.numeric) for p in plan])  # global index of each point
    mine = lambda si, ni: (offsets[si] + ni) % shard[1] == shard[0]
    if not any(mine(si, ni) for si, p in enumerate(plan) for ni in range(len(p.numeric))):
        raise ValueError(
            f"--shard={shard[0]}/{shard[1]} holds no point: the sweep has {offsets[-1]}; use "
            "at most that many shards."
        )
    spec = {"id": sweep_id(base, sweeps, seeds), "sweep": sweeps, "seeds": seeds}
    spec["shard"], spec["split_seed"] = list(shard), split
    report.prepare_workdir(workdir)
    spec_path = workdir / "sweep_spec.json"
    if spec_path.exists() and json.loads(spec_path.read_text()) != spec:
        raise ValueError(
            f"{workdir} holds another sweep (its config, --sweep, --seeds or --shard differ); "
            "use a new --workdir."
        )
    writer = jax.process_index() == 0  # only process 0 writes outputs
    if writer:
        spec_path.write_text(json.dumps(spec) + "\n")
    runs: list[dict[str, Any]] = []
    for si, point in enumerate(plan):
        if not any(mine(si, ni) for ni in range(len(point.numeric))):
            continue
        configure_jax(point.config)
        result = driver.run(
            point.config, point.numeric, range(seeds),
            memory_budget_mb=memory_budget_mb, select=lambda ni, si=si: mine(si, ni),
            save_dir=workdir / "chunks", name=str(si),
        )  # fmt: skip
        for m, (ni, seed) in enumerate(result.members):
            curve = result.member_curves(m)
            order = int(offsets[si] + ni) * seeds + seed  # the unsharded sweep's order
            row = sweep_lib.row({**point.values, **point.numeric[ni]}, seed, curve)
            runs.append({"order": order, "row": row, "curve": curve})
    axes_json = [{"key": a.key, "values": list(a.values), "numeric": a.numeric} for a in axes]
    return sweep_lib.write_outputs(
        workdir, axes_json, spec, runs, provenance or report.Provenance(), writer
    )


def merge(
    shard_dirs: list[Path], workdir: Path, provenance: report.Provenance | None = None
) -> dict[str, Any]:
    """Joins the outputs of the ``--shard=i/n`` jobs of one sweep into one sweep.csv (the
    unsharded sweep's); refuses shards of different sweeps, and missing or repeated shards."""
    documents = []
    for d in shard_dirs:
        if not (d / "sweep.json").exists():
            raise ValueError(f"--merge: {d} holds no finished sweep (no sweep.json).")
        documents.append(report.read(d / "sweep.json"))
    specs = [d["spec"] for d in documents]
    if len({s["id"] for s in specs}) != 1:
        raise ValueError(
            f"--merge: the directories hold shards of different sweeps "
            f"({len({s['id'] for s in specs})} sweep ids); merge the shards of one sweep only."
        )
    n = specs[0]["shard"][1]
    got = sorted(s["shard"][0] for s in specs)
    if got != list(range(n)) or any(s["shard"][1] != n for s in specs):
        raise ValueError(f"--merge: need shards 0..{n - 1} of {n} once each; got {got}.")
    report.prepare_workdir(workdir)
    runs = [run for document in documents for run in document["runs"]]
    for run in runs:  # JSON made the tuples of structural values lists
        run["row"] = {k: tuple(v) if isinstance(v, list) else v for k, v in run["row"].items()}
    spec = {**specs[0], "shard": [0, 1]}
    provenance = provenance or report.Provenance()
    return sweep_lib.write_outputs(workdir, documents[0]["axes"], spec, runs, provenance)


def main(argv: list[str]) -> None:
    del argv
    provenance = report.Provenance()
    try:
        if _MERGE.value:
            result = merge([Path(d) for d in _MERGE.value], Path(_WORKDIR.value), provenance)
        else:
            result = run_sweep(
                _CONFIG.value, _SWEEP.value, _SEEDS.value, Path(_WORKDIR.value),
                _MEMORY.value, parse_shard(_SHARD.value), provenance,
            )  # fmt: skip
    except (ValueError, MissingDataError) as e:
        sys.exit(f"error: {e}")
    if jax.process_index() != 0:
        return
    print(
        f"Best point by mean final {result['score_key']}: {result['best']} "
        f"({result['best_score']:.4f})."
    )
    if not _MERGE.value:
        overrides = [a for a in sys.argv[1:] if a.startswith("--config.")]
        command = sweep_lib.rerun_command(
            _CONFIG_SPEC, overrides, result["best"], result["split_seed"]
        )
        print("Rerun it alone: " + command)


if __name__ == "__main__":  # flags only for the binary: the module stays importable
    try:
        _CONFIG, _ARGV = config_lib.define_config_flag(sys.argv, DEFAULT_CONFIG)
    except ValueError as e:
        sys.exit(f"error: {e}")
    _CONFIG_SPEC = _flag(sys.argv, "config") or DEFAULT_CONFIG
    _WORKDIR = flags.DEFINE_string("workdir", None, "Where the sweep's outputs go.")
    flags.mark_flag_as_required("workdir")
    _SWEEP = flags.DEFINE_multi_string("sweep", [], "KEY=SPEC; repeat for a grid.")
    _SEEDS = flags.DEFINE_integer("seeds", 1, "Seeds 0..N-1 per point.")
    _MEMORY = flags.DEFINE_float(
        "memory_budget_mb", 0.0, "Run the points in chunks that fit this many MiB (0: no budget)."
    )
    flags.DEFINE_string(
        "coordinator_address", "", "jax.distributed coordinator HOST:PORT (several processes)."
    )
    flags.DEFINE_integer(
        "num_processes", 0, "Processes of the run (0: one, or detected from SLURM / TPU)."
    )
    flags.DEFINE_integer("process_id", 0, "This process's index.")
    _SHARD = flags.DEFINE_string("shard", "0/1", "i/n: this job's share of the points.")
    _MERGE = flags.DEFINE_list("merge", [], "Shard workdirs to join into --workdir (no training).")
    app.run(main, argv=_ARGV)
