"""Cost of one alternation of the ``closed_form`` rule (paper 002), and where the time goes.

Command (writes docs/bench/closed_form.json and docs/bench/closed_form.md, prints the tables):

    python -m benchmarks.closed_form

Problem: synthetic regression, so the dataset size n and the input size d are free. Inputs
x ~ N(0, 1) [n, d] (float32, as datasets are), targets from a random planted two-layer ReLU
teacher (``teacher_width`` hidden units, He-scaled weights) plus N(0, noise^2) noise, K outputs.
Student: ``make_model('mlp', (d,), K, widths=(h,), activation='relu')``, task regression with
``squared_error``, rule ``make_rule('closed_form', ...)`` with 64-bit mode on (float64 solves).
Defaults: d = 40 (mnist1d's input size), K = 10; the n grid (``--sizes``) at width ``--width``,
the h grid (``--widths``) at n = ``--n``.

Per grid point, all on the full batch:

1. *Whole step.* ``jax.jit(rule.step)`` compiled ahead of time (compile time reported apart),
   run once to move off the initialisation (one alternation), then timed on that fixed state:
   every timed call does the same work (the same line-search trials).
2. *Components,* each jitted on its own, on the inputs the timed step computes from the same
   state: the output ridge solve (``output_solve`` on the hidden features), the hidden layer's
   normal equations (``hidden_normal_equations``, with the chunk size the rule picks) and their
   Cholesky solve (``hidden_solve``).

After one untimed warm-up round, ``repeats`` rounds of output, normal matrix, solve, dispatch,
step and a float64 matmul alternate (``benchmarks.harness.timed_rounds``; each call blocks on
its results) so machine noise hits all alike; medians are reported. Fractions of the step:
normal matrix, solve, output solve (ONE output solve: the step does 1 + line-search trials of
them) and the rest ("other": the line search's re-solves and forward passes, the loss
evaluations, the casts). The fractions use the fastest call of each (the one least disturbed by
other processes on a shared machine; medians are reported beside) net of the dispatch time (a
jitted scalar add timed in the same rounds): every timed call pays one dispatch, so the
components timed apart pay three where the step pays one, which matters only at tiny sizes.
There, components run apart from their neighbours can still sum past the step
(``components_over_step`` > 1; "other" is then 0).

CPU note: the Cholesky factorisations run in LAPACK (scipy's OpenBLAS on CPU), outside XLA's
thread pool. OpenBLAS goes multithreaded above a size (about a 128 x 128 float64 matrix) and,
with the cores oversubscribed (XLA's threads, other processes), was seen to stall for 100+ ms
per factorisation where a single thread needs < 1 ms; compare a run with OPENBLAS_NUM_THREADS=1.
The JSON records the threading environment variables.

FLOP counts: the normal matrix 2 n (h(d+1))^2 (U^T U in full; XLA does not exploit its
symmetry), the Cholesky (h(d+1))^3 / 3. GFLOP/s are set against the machine's float64 peak: the
fastest of the jitted float64 ``matmul_size``^2 matmuls timed in every point's rounds
(``benchmarks.harness.matmul_peak``, the one definition every benchmark uses). Growth: log-log
slopes of time against n (at fixed h) and against h (at fixed n), fitted over each grid and
between neighbours. Expected: normal matrix n^1 h^2, Cholesky n^0 h^3, output solve n^1 h^2 (its
Gram n (h+1)^2), the step n^1 once the normal matrix dominates, between h^2 and h^3. The JSON
also records how many cores other processes kept busy during each point's timed rounds (Linux;
the top-level figure is the worst point's).
"""

from __future__ import annotations

import os
import statistics
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from absl import app

from altlearn import losses, models, report, rules
from altlearn.rules.closed_form import (
    hidden_normal_equations,
    hidden_solve,
    output_solve,
    sample_chunk_size,
    solve_dtype,
)
from benchmarks.harness import (
    Matmul,
    command_line,
    compile_ahead,
    machine_facts,
    matmul_peak,
    timed_rounds,
    write_json,
)

THREAD_VARIABLES = ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS", "XLA_FLAGS")
COMPONENTS = ("normal_matrix", "cholesky_solve", "output_solve")
EXPECTED_EXPONENTS = {
    "n": {"normal_matrix": 1.0, "cholesky_solve": 0.0, "output_solve": 1.0, "step": 1.0},
    "h": {"normal_matrix": 2.0, "cholesky_solve": 3.0, "output_solve": 2.0, "step": "2 to 3"},
}


def make_problem(
    n: int, d: int, num_outputs: int, teacher_width: int, noise: float, seed: int
) -> tuple[np.ndarray, np.ndarray]:
    """x ~ N(0, 1) [n, d] and y = relu(x W1 + b1) W2 + b2 + noise [n, K] (float32, numpy)."""
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((n, d))
    w1 = rng.standard_normal((d, teacher_width)) * np.sqrt(2.0 / d)
    b1 = 0.1 * rng.standard_normal(teacher_width)
    w2 = rng.standard_normal((teacher_width, num_outputs)) / np.sqrt(teacher_width)
    b2 = 0.1 * rng.standard_normal(num_outputs)
    y = np.maximum(x @ w1 + b1, 0.0) @ w2 + b2 + noise * rng.standard_normal((n, num_outputs))
    return x.astype(np.float32), y.astype(np.float32)


def rule_chunk_size(n: int, h: int, d: int, chunk_size: int, memory_budget_mb: int) -> int:
    """The samples per accumulation chunk the rule uses on a batch of ``n`` (float64)."""
    return min(sample_chunk_size(h, d + 1, 8, chunk_size, memory_budget_mb), n)


def measure_point(
    n: int,
    h: int,
    d: int = 40,
    num_outputs: int = 10,
    repeats: int = 3,
    teacher_width: int = 32,
    noise: float = 0.1,
    ridge: float = 1e-8,
    chunk_size: int = 0,
    memory_budget_mb: int = 512,
    seed: int = 0,
    matmul: Matmul | None = None,
) -> dict[str, Any]:
    """Times one alternation and its components at dataset size ``n`` and hidden width ``h``
    (and ``matmul``, if given, in the same rounds: its times are ``matmul_times_s``)."""
    dt = solve_dtype("auto")
    if dt != jnp.float64:
        raise ValueError(
            "benchmarks.closed_form times the float64 solves: turn JAX's 64-bit mode on first "
            "(jax.config.update('jax_enable_x64', True), or `with jax.enable_x64(True):`) on a "
            f"CPU or GPU backend (backend here: {jax.default_backend()})."
        )
    # Set-up in numpy or jitted: eager op-by-op JAX would cost more than the tiny points' timing.
    x_np, y_np = make_problem(n, d, num_outputs, teacher_width, noise, seed)
    x, y = jnp.asarray(x_np), jnp.asarray(y_np)
    model = models.make_model("mlp", (d,), num_outputs, widths=(h,), activation="relu")
    task = losses.make_task("regression", "squared_error")
    options = dict(ridge=ridge, chunk_size=chunk_size, memory_budget_mb=memory_budget_mb)
    rule = rules.make_rule("closed_form", model, task, optax.identity(), **options)
    key = jax.random.PRNGKey(seed + 1)
    variables = jax.jit(model.init)(key, x[:1])
    state = rule.init(key, variables)
    batch = (x, y)

    # The whole step: compile, then one alternation off the initialisation; time on that state.
    step, step_compile_s = compile_ahead(rule.step, key, variables, state, batch)
    variables, state, _ = jax.block_until_ready(step(key, variables, state, batch))

    # The components' inputs, as the step computes them from this state (set up in numpy).
    chunk = rule_chunk_size(n, h, d, chunk_size, memory_budget_mb)
    hidden = state.hidden
    xb_np = np.concatenate([x_np.astype(np.float64), np.ones((n, 1))], axis=1)
    pre = xb_np @ np.asarray(hidden).T
    s_np = np.where(pre > 0, 1.0, 0.0)
    xb, s, features = jnp.asarray(xb_np), jnp.asarray(s_np), jnp.asarray(pre * s_np)
    targets = jnp.asarray(y_np.astype(np.float64))
    output_fn, output_compile_s = compile_ahead(
        lambda f, t: output_solve(f, t, ridge), features, targets
    )
    out = np.asarray(output_fn(features, targets))
    v, residual = jnp.asarray(out[:-1]), jnp.asarray(y_np.astype(np.float64) - out[-1])
    build_fn, build_compile_s = compile_ahead(
        lambda xb, s, r, v: hidden_normal_equations(xb, s, r, v, chunk), xb, s, residual, v
    )
    a, b = build_fn(xb, s, residual, v)
    solve_fn, solve_compile_s = compile_ahead(
        lambda a, b, w: hidden_solve(a, b, w, ridge), a, b, hidden
    )
    scalar = jnp.zeros((), dt)
    dispatch_fn, _ = compile_ahead(lambda z: z + 1, scalar)

    compile_s = {
        "step": step_compile_s,
        "output_solve": output_compile_s,
        "normal_matrix": build_compile_s,
        "cholesky_solve": solve_compile_s,
    }
    calls: dict[str, tuple[Any, tuple[Any, ...]]] = {
        "output_solve": (output_fn, (features, targets)),
        "normal_matrix": (build_fn, (xb, s, residual, v)),
        "cholesky_solve": (solve_fn, (a, b, hidden)),
        "dispatch": (dispatch_fn, (scalar,)),
    }
    calls["step"] = (step, (key, variables, state, batch))
    metrics = jax.block_until_ready(step(key, variables, state, batch))[2]  # as every timed call

    timed = {name: (lambda fn=fn, args=args: fn(*args)) for name, (fn, args) in calls.items()}
    if matmul is not None:
        timed["matmul"] = matmul
    rounds = timed_rounds(timed, repeats)
    times = {name: rounds.times[name] for name in calls}

    median = {name: statistics.median(ts) for name, ts in times.items()}
    size = h * (d + 1)
    flops = {"normal_matrix": 2.0 * n * size**2, "cholesky_solve": size**3 / 3.0}
    # The fractions compare the fastest call of each (the one least disturbed by other processes
    # on a shared machine), net of the one dispatch every timed call pays.
    fastest = {name: min(ts) for name, ts in times.items()}
    net = {name: max(0.0, fastest[name] - fastest["dispatch"]) for name in (*COMPONENTS, "step")}
    fractions = {name: net[name] / max(net["step"], 1e-12) for name in COMPONENTS}
    components_over_step = sum(fractions.values())  # > 1: per-call overheads dominate
    fractions["other"] = max(0.0, 1.0 - components_over_step)
    backtracks = int(metrics["backtracks"])
    return {
        "n": n,
        "h": h,
        "d": d,
        "num_outputs": num_outputs,
        "normal_matrix_size": size,
        "chunk_size": chunk,
        "num_chunks": -(-n // chunk),
        "dtype": jnp.dtype(dt).name,
        "compile_s": compile_s,
        "times_s": times,
        "median_s": median,
        "fastest_s": fastest,
        "fastest_net_of_dispatch_s": net,
        "fractions_of_step": fractions,
        "components_over_step": components_over_step,
        "flops": flops,
        "gflops": {name: flops[name] / median[name] / 1e9 for name in flops},
        "line_search": {
            "backtracks": backtracks,
            "trials": backtracks + 1,
            "output_solves_per_step": backtracks + 2,
            "step_length": float(metrics["step_length"]),
        },
        "loss": float(metrics["loss"]),
        "loss_after": float(metrics["loss_after"]),
        "other_processes_busy_cores": rounds.other_load_cores,
        "matmul_times_s": rounds.times.get("matmul", []),
    }


def growth_exponents(points: Sequence[dict[str, Any]], variable: str) -> dict[str, Any]:
    """Log-log slopes of the median times against ``variable`` ('n' or 'h'): fitted over all
    points (least squares) and between neighbours (how the slope changes along the grid)."""
    points = sorted(points, key=lambda p: p[variable])
    xs = np.log([p[variable] for p in points])
    out: dict[str, Any] = {}
    for name in ("step", *COMPONENTS):
        ys = np.log([p["median_s"][name] for p in points])
        if len(points) < 2:
            out[name] = {"fitted": None, "local": []}
            continue
        local = [float((ys[i + 1] - ys[i]) / (xs[i + 1] - xs[i])) for i in range(len(xs) - 1)]
        out[name] = {"fitted": float(np.polyfit(xs, ys, 1)[0]), "local": local}
    return out


def measure(
    sizes: Sequence[int] = (1000, 2000, 4000, 8000),
    width: int = 32,
    widths: Sequence[int] = (16, 32, 64),
    n_fixed: int = 4000,
    d: int = 40,
    num_outputs: int = 10,
    repeats: int = 3,
    teacher_width: int = 32,
    noise: float = 0.1,
    ridge: float = 1e-8,
    chunk_size: int = 0,
    memory_budget_mb: int = 512,
    seed: int = 0,
    matmul_size: int = 1024,
) -> dict[str, Any]:
    """Both grids (n at ``width``, h at ``n_fixed``); every number as a JSON-able dict.

    Needs JAX's 64-bit mode on. A point on both grids is measured once.
    """
    if repeats <= 0 or not sizes or not widths:
        raise ValueError(f"repeats, sizes and widths must be non-empty/positive, got {repeats}.")
    matmul = Matmul(matmul_size, jnp.float64) if matmul_size > 0 else None
    cache: dict[tuple[int, int], dict[str, Any]] = {}

    def point(n: int, h: int) -> dict[str, Any]:
        if (n, h) not in cache:
            cache[(n, h)] = measure_point(
                n,
                h,
                d,
                num_outputs,
                repeats,
                teacher_width,
                noise,
                ridge,
                chunk_size,
                memory_budget_mb,
                seed,
                matmul,
            )
        return cache[(n, h)]

    by_n = [point(int(n), int(width)) for n in sizes]
    by_h = [point(int(n_fixed), int(h)) for h in widths]
    peak = None
    if matmul is not None:  # the fastest float64 matmul of every point's rounds
        peak = matmul_peak(matmul, [t for p in cache.values() for t in p.pop("matmul_times_s")])
    loads = [p["other_processes_busy_cores"] for p in cache.values()]
    other_load = None if None in loads else max(loads)  # the worst point's
    if peak is not None:
        for p in cache.values():
            p["fraction_of_float64_peak"] = {
                name: g / peak["gflops"] for name, g in p["gflops"].items()
            }
    return {
        "grids": {
            "n": {"fixed": {"h": int(width)}, "points": by_n},
            "h": {"fixed": {"n": int(n_fixed)}, "points": by_h},
        },
        "growth_exponents": {
            "n": growth_exponents(by_n, "n"),
            "h": growth_exponents(by_h, "h"),
        },
        "expected_exponents": EXPECTED_EXPONENTS,
        "float64_matmul_peak": peak,
        "repeats": repeats,
        "problem": {
            "inputs": "x ~ N(0, 1), float32",
            "d": d,
            "num_outputs": num_outputs,
            "teacher": f"two-layer ReLU, width {teacher_width}, He-scaled; noise std {noise}",
            "model": f"mlp {d}-h-{num_outputs} relu",
            "rule_options": {
                "ridge": ridge,
                "chunk_size": chunk_size,
                "memory_budget_mb": memory_budget_mb,
            },
            "seed": seed,
        },
        "other_processes_busy_cores": other_load,
        "environment": {var: os.environ.get(var) for var in THREAD_VARIABLES},
        "machine": machine_facts(),
    }


def machine_line(result: dict[str, Any]) -> str:
    m = result["machine"]
    line = (
        f"Machine: {m['cpu_model_name'] or m['processor']}, {m['cpu_count']} cores, "
        f"{m['backend']} ({m['device_kind']}), jax {m['jax_version']}"
    )
    if result.get("other_processes_busy_cores") is not None:
        line += f"; other processes kept {result['other_processes_busy_cores']:.2f} cores busy"
    return line + "."


def _ms(seconds: float) -> str:
    """Milliseconds with three significant digits (at least one decimal), no exponent."""
    ms = 1e3 * seconds
    return f"{ms:.{max(1, 2 - int(np.floor(np.log10(ms))))}f}" if ms > 0 else "0"


def _fmt_exponent(value: Any) -> str:
    return "n/a" if value is None else f"{value:.2f}"


def markdown_tables(result: dict[str, Any]) -> str:
    """The command and machine, one table per grid, then the growth exponents."""
    lines = []
    if result.get("command"):
        lines += [f"`{result['command']}`", ""]
    lines.append(machine_line(result))
    peak = result["float64_matmul_peak"]
    if peak is not None:
        lines.append(
            f"float64 matmul peak ({peak['n']}^2, fastest of the calls): "
            f"{peak['gflops']:.1f} GFLOP/s."
        )
    prob = result["problem"]
    lines.append(
        f"Problem: d={prob['d']}, K={prob['num_outputs']}, {prob['teacher']}; float64 solves; "
        f"times are medians of {result['repeats']} timed rounds after a warm-up round (GFLOP/s "
        "from them); the % columns compare the fastest calls net of one dispatch."
    )
    env = {k: v for k, v in result.get("environment", {}).items() if v is not None}
    if env:
        lines.append("Environment: " + ", ".join(f"{k}={v}" for k, v in env.items()) + ".")
    header = (
        "| n | h | h(d+1) | step compile (s) | step (ms) | normal matrix (ms) | Cholesky (ms) "
        "| output solve (ms) | % normal | % Cholesky | % output | % other | normal GFLOP/s "
        "| Cholesky GFLOP/s | components / step | trials | busy cores (others) |"
    )
    for variable, title in (("n", "Dataset size n"), ("h", "Hidden width h")):
        grid = result["grids"][variable]
        fixed = ", ".join(f"{k}={v}" for k, v in grid["fixed"].items())
        lines += ["", f"**{title}** ({fixed})", "", header, "|" + "---:|" * 17]
        for p in grid["points"]:
            med, frac, gf = p["median_s"], p["fractions_of_step"], p["gflops"]
            load = p["other_processes_busy_cores"]
            lines.append(
                f"| {p['n']} | {p['h']} | {p['normal_matrix_size']} | "
                f"{p['compile_s']['step']:.2f} | {_ms(med['step'])} | "
                f"{_ms(med['normal_matrix'])} | {_ms(med['cholesky_solve'])} | "
                f"{_ms(med['output_solve'])} | {100 * frac['normal_matrix']:.0f} | "
                f"{100 * frac['cholesky_solve']:.0f} | {100 * frac['output_solve']:.0f} | "
                f"{100 * frac['other']:.0f} | {gf['normal_matrix']:.1f} | "
                f"{gf['cholesky_solve']:.1f} | {p['components_over_step']:.2f} | "
                f"{p['line_search']['trials']} | "
                f"{'n/a' if load is None else f'{load:.2f}'} |"
            )
    lines += [
        "",
        "**Growth exponents** (log-log slope of the median time; fitted over the grid, then "
        "between neighbouring points)",
        "",
        "| against | component | fitted | between neighbours | expected |",
        "|---|---|---:|---|---:|",
    ]
    for variable in ("n", "h"):
        exps = result["growth_exponents"][variable]
        for name in ("step", *COMPONENTS):
            local = ", ".join(f"{s:.2f}" for s in exps[name]["local"]) or "-"
            lines.append(
                f"| {variable} | {name} | {_fmt_exponent(exps[name]['fitted'])} | {local} | "
                f"{result['expected_exponents'][variable][name]} |"
            )
    lines += [
        "",
        "% output is ONE output solve; the step does 1 + trials of them (the line search "
        "re-solves the output layer per trial), which with the forward passes make up % other. "
        "components / step > 1 (tiny sizes, or a noisy machine): the components timed apart cost "
        "more than the fused step; % other is then 0.",
    ]
    return "\n".join(lines)


def summary(result: dict[str, Any]) -> str:
    """One line per grid: fitted step exponent against the expected one."""
    out = []
    for variable in ("n", "h"):
        exps = result["growth_exponents"][variable]
        parts = ", ".join(
            f"{name} {_fmt_exponent(exps[name]['fitted'])} "
            f"(expected {result['expected_exponents'][variable][name]})"
            for name in ("step", *COMPONENTS)
        )
        out.append(f"time ~ {variable}^x: {parts}")
    return "\n".join(out)


def write_outputs(result: dict[str, Any], prefix: str | Path, provenance=None) -> tuple[Path, Path]:
    """``prefix``.json and ``prefix``.md."""
    prefix = Path(prefix)
    json_path = prefix.with_name(prefix.name + ".json")
    write_json(result, json_path, markdown_tables(result), provenance)
    return json_path, json_path.with_suffix(".md")


def main(argv: list[str]) -> None:
    if len(argv) > 1:
        raise app.UsageError(f"Unexpected arguments: {' '.join(argv[1:])}")
    jax.config.update("jax_enable_x64", True)  # before anything is built, as configure_jax does
    provenance = report.Provenance("benchmarks.closed_form")
    try:
        result = measure(
            sizes=tuple(int(n) for n in _SIZES.value),
            width=_WIDTH.value,
            widths=tuple(int(h) for h in _WIDTHS.value),
            n_fixed=_N.value,
            d=_D.value,
            num_outputs=_OUTPUTS.value,
            repeats=_REPEATS.value,
            teacher_width=_TEACHER_WIDTH.value,
            noise=_NOISE.value,
            ridge=_RIDGE.value,
            chunk_size=_CHUNK_SIZE.value,
            memory_budget_mb=_MEMORY_BUDGET_MB.value,
            seed=_SEED.value,
            matmul_size=_MATMUL_SIZE.value,
        )
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(1)
    result["command"] = command_line("benchmarks.closed_form")
    json_path, md_path = write_outputs(result, _OUT.value, provenance)
    print(markdown_tables(result))
    print()
    print(summary(result))
    print(f"\nWrote {json_path} and {md_path}.")


if __name__ == "__main__":
    # Flags are defined only when run as a binary: importing the module defines none.
    from absl import flags

    _SIZES = flags.DEFINE_list("sizes", ["1000", "2000", "4000", "8000"], "Dataset sizes n.")
    _WIDTH = flags.DEFINE_integer("width", 32, "Hidden width h of the n grid.")
    _WIDTHS = flags.DEFINE_list("widths", ["16", "32", "64"], "Hidden widths h.")
    _N = flags.DEFINE_integer("n", 4000, "Dataset size n of the h grid.")
    _D = flags.DEFINE_integer("d", 40, "Input size d (mnist1d's is 40).")
    _OUTPUTS = flags.DEFINE_integer("outputs", 10, "Number of outputs K.")
    _REPEATS = flags.DEFINE_integer("repeats", 3, "Timed rounds per point (after a warm-up).")
    _TEACHER_WIDTH = flags.DEFINE_integer("teacher_width", 32, "Hidden width of the teacher.")
    _NOISE = flags.DEFINE_float("noise", 0.1, "Std of the target noise.")
    _RIDGE = flags.DEFINE_float("ridge", 1e-8, "rule.ridge (relative ridge of both solves).")
    _CHUNK_SIZE = flags.DEFINE_integer("chunk_size", 0, "rule.chunk_size (0: the rule picks).")
    _MEMORY_BUDGET_MB = flags.DEFINE_integer("memory_budget_mb", 512, "rule.memory_budget_mb.")
    _SEED = flags.DEFINE_integer("seed", 0, "Seed of the data, teacher and student.")
    _MATMUL_SIZE = flags.DEFINE_integer(
        "matmul_size", 1024, "Side of the float64 peak matmul (0: skip)."
    )
    _OUT = flags.DEFINE_string("out", "docs/bench/closed_form", "Output prefix (.json, .md).")
    app.run(main)
