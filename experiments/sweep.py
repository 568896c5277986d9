"""A hyperparameter sweep as one command: every numeric point and seed in one compiled program.

    python -m experiments.sweep --config=experiments/configs/digits.py --workdir=runs/lr \\
        --sweep='optimizer.learning_rate=logspace(-4,-2,8)' --seeds=3
    python -m experiments.sweep --config=experiments/configs/np_family.py:method=np \\
        --workdir=runs/np --sweep='rule.sigma=[1e-3,1e-2]' --sweep='model.widths=[(64,),(256,)]'

``--sweep=KEY=SPEC`` (repeatable; several form a grid; SPEC forms in ``altlearn.sweep``). The
sweepable floats (``rule.*``, ``optimizer.*``) are numeric axes: all numeric points times all
seeds train as ONE ``jax.jit(jax.vmap(train))`` program. Any other key is structural: one
compilation per structural point; ``rule.name`` (``model.name``) switches the section and a
rule's own keys apply to the points whose rule has them (``altlearn.sweep.plan``). Seed s of a
point uses the key ``experiments.train --config.seed=s`` uses (``PRNGKey(s)``) and the data
split of the config's own seed (``data.split_seed``, default the config's seed), so a row equals
that point trained alone with the printed command, to float rounding (vmap may reorder sums;
where it is bit-exact: the README, Sweeps).

``--memory_budget_mb``: the points of a structural point run in sequential chunks of one
compiled program whose XLA memory analysis fits the budget. With several devices each chunk's
member axis is sharded over them (padded to a multiple of the device count). Under
``jax.distributed`` (``--coordinator_address``, ``--num_processes``, ``--process_id``, or
detected from SLURM / TPU environments) the devices of every process share the points and only
process 0 writes. ``--shard=i/n`` trains every n-th point from the i-th (a job array);
``--merge=DIR,DIR,...`` joins the shards' outputs into the unsharded sweep's.

Outputs in the workdir: ``sweep.csv`` (a row per point and seed: every swept value, the seed,
the final train / val / test figures, the step of the best validation loss), ``sweep.json``
(every evaluation's figures), ``sweep.png`` (the final validation loss against each numeric
axis, a line per structural point with the seed spread; a heatmap for two numeric axes), and the
best point by mean final VALIDATION loss, printed with the ``experiments.train`` command that
reruns it. Each finished chunk is saved (``chunks/``): a killed sweep rerun on the same workdir
skips them and ends with the same ``sweep.csv``.
"""

from __future__ import annotations

import os
import sys

import jax


def initialize_distributed(address: str, num_processes: int, process_id: int) -> None:
    """``jax.distributed`` from the flags, or detected (SLURM, TPU pod slices) when
    ``num_processes`` is 0 and such an environment is present; nothing on one process."""
    if num_processes > 1:
        if not address:
            raise ValueError("--num_processes > 1 needs --coordinator_address=HOST:PORT.")
        if not 0 <= process_id < num_processes:
            raise ValueError(f"--process_id must be in 0..{num_processes - 1}, got {process_id}.")
        jax.config.update("jax_cpu_collectives_implementation", "gloo")  # CPU: gloo
        jax.distributed.initialize(address, num_processes, process_id)
    elif num_processes == 0 and (
        int(os.environ.get("SLURM_NTASKS", "1")) > 1 or "TPU_WORKER_HOSTNAMES" in os.environ
    ):
        jax.config.update("jax_cpu_collectives_implementation", "gloo")
        jax.distributed.initialize()  # JAX reads the cluster from the environment


def _flag(argv: list[str], name: str) -> str:
    """The value of ``--name=V`` in ``argv`` ('' if absent)."""
    return next((a.split("=", 1)[1] for a in argv if a.startswith(f"--{name}=")), "")


if __name__ == "__main__":
    # jax.distributed must start before anything touches a device, and importing evosax (which
    # the rules use) does: so here, before the imports below.
    initialize_distributed(
        _flag(sys.argv, "coordinator_address"),
        int(_flag(sys.argv, "num_processes") or 0),
        int(_flag(sys.argv, "process_id") or 0),
    )

import csv  # noqa: E402
import hashlib  # noqa: E402
import json  # noqa: E402
import re  # noqa: E402
import shlex  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402
from typing import Any  # noqa: E402

import jax.numpy as jnp  # noqa: E402
import ml_collections  # noqa: E402
import numpy as np  # noqa: E402
from absl import app, flags, logging  # noqa: E402
from jax.sharding import Mesh, NamedSharding, PartitionSpec  # noqa: E402

from altlearn import config as config_lib  # noqa: E402
from altlearn import sweep as sweep_lib  # noqa: E402
from altlearn.train import Experiment, split_seed  # noqa: E402

DEFAULT_CONFIG = "experiments/configs/default.py"


def point_config(base: ml_collections.ConfigDict, point: dict[str, Any], split: int):
    """``base`` with a structural point's values (a rule or model name switches the section)
    and the validation split pinned to seed ``split``."""
    config = ml_collections.ConfigDict(base.to_dict())
    config.data.split_seed = split
    for kind in config_lib.SWITCHABLE:
        name = point.get(f"{kind}.name")
        if name is not None:
            config_lib.switch(config, **{kind: name})
    for key, value in point.items():
        if key not in sweep_lib.NAME_KEYS:
            config_lib.set_key(config, key, value)
    config_lib.validate(config)
    return config


def make_program(experiment: Experiment, on_trace=None):
    """``run(key, hparams) -> figures [evaluations]``: one point and seed, evaluated every
    ``eval_every`` steps on every split (as ``experiments.train`` trains and evaluates)."""
    config = experiment.config
    steps, every = int(config.steps), int(config.eval_every)
    sizes = [every] * (steps // every) + ([steps % every] if steps % every else [])

    def figures(state):
        return {
            f"{split}_{name}": value
            for split in experiment.splits
            for name, value in experiment.evaluate_split(state.variables, split).items()
        }

    def run(key: jax.Array, hparams: dict[str, jax.Array]):
        if on_trace is not None:
            on_trace()  # tests count compilations
        state = experiment.init(key, hparams)
        out = []
        for size in sorted(set(sizes), reverse=True):  # at most two chunk lengths
            count = sizes.count(size)

            def body(s, _, size=size):
                s, _ = experiment.train_steps(s, size)
                return s, {**figures(s), "step": s.step}

            state, curve = jax.lax.scan(body, state, None, length=count)
            out.append(curve)
        return jax.tree.map(lambda *a: jnp.concatenate(a), *out)

    return run


def chunk_size(program, keys, hparams, budget_mb: float, devices: int) -> int:
    """Members per chunk whose compiled program fits ``budget_mb`` (XLA's memory analysis of
    one- and two-member programs: a fixed part and a part per member); all if no budget."""
    total = keys.shape[0]
    padded = -(-total // devices) * devices  # a multiple of the device count
    if budget_mb <= 0:
        return padded

    def need(n):
        lowered = jax.jit(jax.vmap(program)).lower(keys[:n], jax.tree.map(lambda a: a[:n], hparams))
        m = lowered.compile().memory_analysis()
        return m.temp_size_in_bytes + m.argument_size_in_bytes + m.output_size_in_bytes

    one, budget = need(1), budget_mb * 2**20
    if one > budget:
        raise ValueError(
            f"--memory_budget_mb={budget_mb:g} is below one point's need, "
            f"{one / 2**20:.1f} MiB; raise it (or 0: no budget)."
        )
    two = need(2)
    per, fixed = max(two - one, 1), max(2 * one - two, 0)
    size = int((budget - fixed) // per)
    return min(max(devices, size // devices * devices), padded)


def global_arrays(args: Any, sharding: NamedSharding | None) -> Any:
    """Host arrays as arrays laid out by ``sharding`` over every process's devices (each process
    holds the whole host array and hands over its devices' slices)."""
    if sharding is None:
        return jax.tree.map(jnp.asarray, args)
    return jax.tree.map(
        lambda a: jax.make_array_from_callback(a.shape, sharding, lambda idx: a[idx]), args
    )


def gathered(out: dict[str, jax.Array]) -> dict[str, np.ndarray]:
    """Every process's share of ``out`` on every process, as host arrays."""
    if jax.process_count() == 1:
        return {k: np.asarray(v) for k, v in out.items()}
    from jax.experimental import multihost_utils

    return {k: np.asarray(v) for k, v in multihost_utils.process_allgather(out, tiled=True).items()}


def sweep_id(config: ml_collections.ConfigDict, sweeps: list[str], seeds: int) -> str:
    """What identifies a sweep (its config, axes and seeds): a rerun on a workdir must match."""
    text = json.dumps([config.to_json_best_effort(sort_keys=True), sweeps, seeds])
    return hashlib.sha256(text.encode()).hexdigest()[:16]


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
) -> dict[str, Any]:
    """Runs (or resumes) the sweep, or with ``shard=(i, n)`` its i-th share of the points;
    writes sweep.csv, sweep.json and sweep.png (``write_outputs``)."""
    if seeds < 1:
        raise ValueError(f"--seeds must be >= 1, got {seeds}.")
    split = split_seed(base)
    # every structural point's config is built and checked here, before anything compiles
    axes, plan = sweep_lib.plan(
        base, sweeps, int(base.seed), lambda v: point_config(base, v, split)
    )
    offsets = np.cumsum([0] + [len(p.numeric) for p in plan])  # global point index of each
    mine = lambda si, ni: (offsets[si] + ni) % shard[1] == shard[0]
    total = sum(mine(si, ni) for si, p in enumerate(plan) for ni in range(len(p.numeric))) * seeds
    if total == 0:
        raise ValueError(
            f"--shard={shard[0]}/{shard[1]} holds no point: the sweep has "
            f"{offsets[-1]}; use at most that many shards."
        )
    spec = {"id": sweep_id(base, sweeps, seeds), "sweep": sweeps, "seeds": seeds}
    spec["shard"], spec["split_seed"] = list(shard), split
    workdir.mkdir(parents=True, exist_ok=True)
    spec_path = workdir / "sweep_spec.json"
    if spec_path.exists() and json.loads(spec_path.read_text()) != spec:
        raise ValueError(
            f"{workdir} holds another sweep (its config, --sweep, --seeds or --shard differ); "
            "use a new --workdir."
        )
    writer = jax.process_index() == 0  # only process 0 writes outputs
    if writer:
        spec_path.write_text(json.dumps(spec) + "\n")
    devices = jax.devices()
    runs: list[dict[str, Any]] = []
    started, done = time.perf_counter(), 0
    for si, (spoint, config, numeric) in enumerate(plan):
        members = [(ni, s) for ni in range(len(numeric)) if mine(si, ni) for s in range(seeds)]
        if not members:
            continue
        program = make_program(Experiment(config))
        keys = np.stack([jax.random.PRNGKey(s) for _, s in members])  # experiments.train's key
        hparams = {
            k: np.asarray([numeric[ni][k] for ni, _ in members], np.float32) for k in numeric[0]
        }
        size = chunk_size(program, keys, hparams, memory_budget_mb, len(devices))
        sharding = None
        if len(devices) > 1:  # the member axis sharded over every device of every process
            sharding = NamedSharding(Mesh(np.array(devices), ("points",)), PartitionSpec("points"))
        compiled = jax.jit(jax.vmap(program), in_shardings=sharding and (sharding, sharding))
        for ci, first in enumerate(range(0, len(members), size)):
            path = workdir / "chunks" / f"{si}_{ci}.npz"
            index = np.arange(first, first + size) % len(members)  # the last chunk padded
            if path.exists():
                out = dict(np.load(path))
            else:
                args = (keys[index], jax.tree.map(lambda a, i=index: a[i], hparams))
                out = gathered(compiled(*global_arrays(args, sharding)))
                if writer:
                    path.parent.mkdir(exist_ok=True)
                    tmp = path.with_name(path.stem + ".tmp.npz")
                    np.savez(tmp, **out)
                    tmp.rename(path)  # a chunk is saved whole or not at all
            real = min(size, len(members) - first)
            for j in range(real):
                ni, seed = members[first + j]
                curve = {k: v[j].tolist() for k, v in out.items()}
                score = np.asarray(curve.get("val_loss", curve["train_loss"]), np.float64)
                row = {**spoint, **numeric[ni], "seed": seed}
                for name in sorted(k for k in curve if k != "step"):
                    row[name] = curve[name][-1]
                row["best_val_step"] = int(curve["step"][int(np.nanargmin(score))])
                order = int(offsets[si] + ni) * seeds + seed  # the unsharded sweep's order
                runs.append({"order": order, "row": row, "curve": curve})
            done += real
            elapsed = time.perf_counter() - started
            logging.info(
                "structural point %d/%d, chunk %d: %d/%d runs done, ETA %.0f s",
                si + 1, len(plan), ci + 1, done, total, elapsed / done * (total - done),
            )  # fmt: skip
    axes_json = [{"key": a.key, "values": list(a.values), "numeric": a.numeric} for a in axes]
    return write_outputs(workdir, axes_json, spec, runs, writer)


def write_outputs(
    workdir: Path, axes: list[dict], spec: dict, runs: list[dict], writer: bool = True
) -> dict[str, Any]:
    """sweep.csv, sweep.json and sweep.png from ``runs`` (in the unsharded sweep's order), and
    the best point by mean final validation loss."""
    runs = sorted(runs, key=lambda r: r["order"])
    rows = [r["row"] for r in runs]
    point_keys = [a["key"] for a in axes if not a["numeric"]] + [
        a["key"] for a in axes if a["numeric"]
    ]
    if writer:
        # every row's keys: the axes, the seed, the figures; an axis a point's rule lacks: ""
        columns = list(dict.fromkeys(point_keys + [k for r in rows for k in r]))
        with open(workdir / "sweep.csv", "w", newline="") as f:
            table = csv.DictWriter(f, columns, restval="")
            table.writeheader()
            table.writerows(rows)
        document = {"spec": spec, "axes": axes, "runs": runs}
        (workdir / "sweep.json").write_text(json.dumps(document, default=str) + "\n")
    score_key = "val_loss" if "val_loss" in rows[0] else "train_loss"
    groups: dict[str, list[float]] = {}
    for row in rows:
        groups.setdefault(json.dumps([row.get(k) for k in point_keys], default=str), []).append(
            row[score_key]
        )
    best = min(groups, key=lambda g: float(np.mean(groups[g])))
    best_point = next(
        {k: row[k] for k in point_keys if k in row}
        for row in rows
        if json.dumps([row.get(k) for k in point_keys], default=str) == best
    )
    if writer:
        plot(rows, [sweep_lib.Axis(a["key"], tuple(a["values"]), a["numeric"]) for a in axes],
             score_key, workdir / "sweep.png")  # fmt: skip
    return {
        "rows": rows,
        "best": best_point,
        "best_score": float(np.mean(groups[best])),
        "score_key": score_key,
        "split_seed": spec["split_seed"],
    }


def merge(shard_dirs: list[Path], workdir: Path) -> dict[str, Any]:
    """Joins the outputs of the ``--shard=i/n`` jobs of one sweep into one sweep.csv (the
    unsharded sweep's); refuses shards of different sweeps, and missing or repeated shards."""
    specs, documents = [], []
    for d in shard_dirs:
        if not (d / "sweep.json").exists():
            raise ValueError(f"--merge: {d} holds no finished sweep (no sweep.json).")
        documents.append(json.loads((d / "sweep.json").read_text()))
        specs.append(documents[-1]["spec"])
    ids = {s["id"] for s in specs}
    if len(ids) != 1:
        raise ValueError(
            f"--merge: the directories hold shards of different sweeps ({len(ids)} sweep ids); "
            "merge the shards of one sweep only."
        )
    n = specs[0]["shard"][1]
    got = sorted(s["shard"][0] for s in specs)
    if got != list(range(n)) or any(s["shard"][1] != n for s in specs):
        raise ValueError(f"--merge: need shards 0..{n - 1} of {n} once each; got {got}.")
    workdir.mkdir(parents=True, exist_ok=True)
    spec = {**specs[0], "shard": [0, 1]}
    runs = [run for document in documents for run in document["runs"]]
    for run in runs:  # JSON made the tuples of structural values lists
        run["row"] = {k: tuple(v) if isinstance(v, list) else v for k, v in run["row"].items()}
    return write_outputs(workdir, documents[0]["axes"], spec, runs)


def plot(rows: list[dict[str, Any]], axes: list[sweep_lib.Axis], score: str, path: Path) -> None:
    """The final ``score`` against each numeric axis, a line per structural point (a rule, a
    width): the mean over seeds at the other numeric axes' best values, the seeds' range shaded.
    With two numeric axes or more, a heatmap per structural point of the seed mean over the
    first two it has (best over any further ones)."""
    numeric = [a for a in axes if a.numeric]
    if not numeric:
        return
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.colors import LogNorm

    def wide(values) -> bool:
        """Positive figures spanning more than 20x: shown on a log scale."""
        values = np.asarray(list(values), np.float64)
        values = values[np.isfinite(values)]
        return values.size > 0 and values.min() > 0 and values.max() / values.min() > 20

    structural = [a.key for a in axes if not a.numeric]
    label = lambda r: ", ".join(
        str(r[k]) if k in sweep_lib.NAME_KEYS else f"{k.split('.')[-1]}={r[k]}"
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
    fig, panels = plt.subplots(1, cols, figsize=(5 * cols, 3.8), squeeze=False)
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
        norm = LogNorm() if wide(grid[np.isfinite(grid)]) else None
        image = ax.imshow(grid, origin="lower", aspect="auto", cmap="viridis", norm=norm)
        ax.set_xticks(range(len(xs)), [f"{x:.3g}" for x in xs], rotation=45, fontsize=7)
        ax.set_yticks(range(len(ys)), [f"{y:.3g}" for y in ys], fontsize=7)
        ax.set_xlabel(keys[0])
        ax.set_ylabel(keys[1])
        ax.set_title(f"final {score}" + (f" ({name})" if name else ""), fontsize=9)
        fig.colorbar(image, ax=ax)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


def main(argv: list[str]) -> None:
    del argv
    try:
        if _MERGE.value:
            result = merge([Path(d) for d in _MERGE.value], Path(_WORKDIR.value))
        else:
            result = run_sweep(
                _CONFIG.value,
                _SWEEP.value,
                _SEEDS.value,
                Path(_WORKDIR.value),
                _MEMORY.value,
                parse_shard(_SHARD.value),
            )
    except ValueError as e:
        sys.exit(f"error: {e}")
    if jax.process_index() != 0:
        return
    if _MERGE.value:
        print(f"Best point by mean final {result['score_key']}: {result['best']}.")
        return
    overrides = [a for a in sys.argv[1:] if a.startswith("--config.")]
    print(
        f"Best point by mean final {result['score_key']}: {result['best']} "
        f"({result['best_score']:.4f})."
    )
    command = rerun_command(_CONFIG_SPEC, overrides, result["best"], result["split_seed"])
    print("Rerun it alone: " + command)


if __name__ == "__main__":  # flags only for the binary: the module stays importable
    try:
        _CONFIG, _ARGV = config_lib.define_config_flag(sys.argv, DEFAULT_CONFIG)
    except ValueError as e:
        sys.exit(f"error: {e}")
    _CONFIG_SPEC = next(
        (a.split("=", 1)[1] for a in sys.argv if a.startswith("--config=")), DEFAULT_CONFIG
    )
    _WORKDIR = flags.DEFINE_string("workdir", None, "Where the sweep's outputs go.")
    flags.mark_flag_as_required("workdir")
    _SWEEP = flags.DEFINE_multi_string("sweep", [], "KEY=SPEC; repeat for a grid.")
    _SEEDS = flags.DEFINE_integer("seeds", 1, "Seeds 0..N-1 per point.")
    _MEMORY = flags.DEFINE_float(
        "memory_budget_mb", 0.0, "Run the points in chunks that fit this many MiB (0: no budget)."
    )
    _ADDRESS = flags.DEFINE_string(
        "coordinator_address", "", "jax.distributed coordinator HOST:PORT (several processes)."
    )
    _NUM_PROCESSES = flags.DEFINE_integer(
        "num_processes", 0, "Processes of the run (0: one, or detected from SLURM / TPU)."
    )
    _PROCESS_ID = flags.DEFINE_integer("process_id", 0, "This process's index.")
    _SHARD = flags.DEFINE_string("shard", "0/1", "i/n: this job's share of the points.")
    _MERGE = flags.DEFINE_list("merge", [], "Shard workdirs to join into --workdir (no training).")
    app.run(main, argv=_ARGV)
