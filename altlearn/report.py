"""What every binary writes, written one way: provenance, statistics, and the output files.

A binary's result is a JSON-able dict; ``write(workdir, name, result, text, plot)`` stores it as
``NAME.json`` (the result and its ``provenance``), ``NAME.md`` (the text under a header giving
the command and provenance) and ``NAME.png`` (``plot(path)``, where given).

Provenance (``Provenance``, started when a binary starts and read when it writes): the command
line, the git commit of the source (or ``"none"`` outside a git checkout, with ``dirty`` when
the tree has uncommitted changes), the versions of jax, jaxlib, flax, optax and evosax, the
platform and device kind, the machine, and how many cores OTHER processes kept busy while it
ran (from ``/proc/stat`` less this process's CPU time; Linux only): the first thing to check
before trusting a timing.

Statistics: ``stats(values)`` is the mean with the SAMPLE standard deviation (ddof = 1) and a
95% Student-t interval for the mean; ``paired(a, b)`` the same for the per-seed differences
a - b, for figures whose seeds pair (seed s gives every method the same initialisation and
batches). ``cell`` formats either for a table.
"""

from __future__ import annotations

import json
import math
import os
import platform
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from importlib import metadata
from pathlib import Path
from typing import Any

import jax
import numpy as np

PACKAGES = ("jax", "jaxlib", "flax", "optax", "evosax")
ROOT = Path(__file__).resolve().parent.parent  # the source tree altlearn was loaded from


# ---------------------------------------------------------------------- the machine


def cpu_seconds() -> tuple[float, float] | None:
    """(CPU seconds busy on the whole machine, CPU seconds of this process), Linux only."""
    try:
        fields = Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]
    except OSError:
        return None
    user, nice, system, _idle, _iowait, irq, softirq, steal = map(int, fields[:8])
    ticks = os.sysconf("SC_CLK_TCK")
    own = os.times()
    return (user + nice + system + irq + softirq + steal) / ticks, own.user + own.system


def other_load_cores(start: tuple[float, float] | None, wall: float) -> float | None:
    """Mean number of cores other processes kept busy since ``start`` (None off Linux)."""
    end = cpu_seconds()
    if start is None or end is None or wall <= 0:
        return None
    return max(0.0, ((end[0] - start[0]) - (end[1] - start[1])) / wall)


def machine_facts() -> dict[str, Any]:
    """The processor, core count, platform, Python and JAX backend of this machine."""
    model_name = ""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model_name = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    device = jax.devices()[0]
    return {
        "processor": platform.processor() or platform.machine(),
        "cpu_model_name": model_name,
        "cpu_count": os.cpu_count(),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "jax_version": jax.__version__,
        "backend": jax.default_backend(),
        "device_kind": device.device_kind,
        "num_devices": jax.device_count(),
        "load_average_at_end_incl_this_run": list(os.getloadavg()),
    }


def command_line(module: str | None = None) -> str:
    """The command that ran this process: ``python -m MODULE ARGS`` (``module`` defaults to
    the module of the running script, read from its path)."""
    if module is None:
        script = Path(sys.argv[0]).resolve()
        try:
            module = ".".join(script.relative_to(ROOT).with_suffix("").parts)
        except ValueError:
            module = script.stem
    return " ".join([f"python -m {module}", *sys.argv[1:]])


def git_commit() -> dict[str, Any]:
    """``{"commit": sha or "none", "dirty": bool}`` of the source tree altlearn runs from.
    ``dirty``: tracked files changed since the commit, docs/ aside (documents and the output
    files studies write there change no number a run computes)."""
    try:
        sha = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True, timeout=10
        )
        if sha.returncode != 0:
            return {"commit": "none", "dirty": False}
        status = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no", "--", ".", ":(exclude)docs"],
            cwd=ROOT,
            capture_output=True,
            text=True,
            timeout=10,
        )
        return {"commit": sha.stdout.strip(), "dirty": bool(status.stdout.strip())}
    except (OSError, subprocess.SubprocessError):
        return {"commit": "none", "dirty": False}


def versions() -> dict[str, str]:
    out = {}
    for package in PACKAGES:
        try:
            out[package] = metadata.version(package)
        except metadata.PackageNotFoundError:
            out[package] = "not installed"
    return out


class Provenance:
    """Started when a run starts; ``record()`` gives what the output files record of it."""

    def __init__(self, module: str | None = None):
        self.command = command_line(module)
        self._source = git_commit()  # the code that runs: as it is now, not when it ends
        self._cpu = cpu_seconds()
        self._wall = time.perf_counter()
        self._started = time.strftime("%Y-%m-%dT%H:%M:%S%z")

    def record(self) -> dict[str, Any]:
        wall = time.perf_counter() - self._wall
        return {
            "command": self.command,
            **self._source,
            "versions": versions(),
            "machine": machine_facts(),
            "started": self._started,
            "wall_time_s": wall,
            "other_processes_busy_cores": other_load_cores(self._cpu, wall),
        }


def provenance_line(record: dict[str, Any]) -> str:
    """One line of a provenance record for a markdown file."""
    m = record["machine"]
    busy = record.get("other_processes_busy_cores")
    commit = record["commit"][:12] + (" (uncommitted changes)" if record.get("dirty") else "")
    versions_text = ", ".join(f"{k} {v}" for k, v in record["versions"].items())
    return (
        f"commit {commit}; {versions_text}; {m['backend']} ({m['device_kind']}, "
        f"{m['cpu_count']} cores{f', {busy:.2f} busy with other work' if busy is not None else ''}"
        f"); {record['wall_time_s']:.0f} s"
    )


# ---------------------------------------------------------------------- statistics


def t_quantile(n: int) -> float:
    """The 97.5% quantile of Student's t with n - 1 degrees of freedom (a 95% interval)."""
    from scipy import stats as scipy_stats  # on first use: importing it costs half a second

    return float(scipy_stats.t.ppf(0.975, n - 1)) if n > 1 else math.nan


def stats(values: Sequence[float]) -> dict[str, float]:
    """Mean, SAMPLE std (ddof = 1), n, the 95% t interval [low, high] of the mean and ``p``, the
    two-sided t test's p-value of a zero mean (for paired differences), over the finite values
    (a diverged seed is counted in ``nonfinite``, not averaged)."""
    v = np.asarray(values, np.float64).ravel()
    finite = v[np.isfinite(v)]
    n = int(finite.size)
    mean = float(finite.mean()) if n else math.nan
    std = float(finite.std(ddof=1)) if n > 1 else math.nan
    half = t_quantile(n) * std / math.sqrt(n) if n > 1 else math.nan
    p = math.nan
    if n > 1:
        from scipy import stats as scipy_stats

        p = (
            1.0
            if std == 0 and mean == 0
            else 0.0
            if std == 0
            else float(2 * scipy_stats.t.sf(abs(mean) / (std / math.sqrt(n)), n - 1))
        )
    return {
        "mean": mean,
        "std": std,
        "n": n,
        "low": mean - half,
        "high": mean + half,
        "p": p,
        "nonfinite": int(v.size - n),
    }


def holm(pvalues: Sequence[float]) -> list[float]:
    """Holm's step-down adjusted p-values (family-wise error over the intervals read together):
    the k-th smallest p times (m - k + 1), running maximum, at most 1; NaN stays NaN."""
    p = np.asarray(pvalues, np.float64)
    finite = np.flatnonzero(np.isfinite(p))
    out = np.full(p.shape, np.nan)
    order = finite[np.argsort(p[finite], kind="stable")]
    m, running = len(order), 0.0
    for k, i in enumerate(order):
        running = max(running, min(1.0, (m - k) * p[i]))
        out[i] = running
    return out.tolist()


def paired(a: Sequence[float], b: Sequence[float]) -> dict[str, float]:
    """``stats`` of the per-seed differences a - b (both in seed order)."""
    a, b = np.asarray(a, np.float64).ravel(), np.asarray(b, np.float64).ravel()
    if a.shape != b.shape:
        raise ValueError(f"paired: {a.size} values against {b.size}; seeds must pair.")
    return stats(a - b)


def cell(
    s: dict[str, float],
    scale: float = 1.0,
    digits: int = 3,
    sign: bool = False,
    std: bool = True,
    significant: bool = False,
) -> str:
    """``mean ± std [low, high]`` of a ``stats`` record, times ``scale`` (``std=False``:
    ``mean [low, high]``); ``digits`` decimals, or significant digits with ``significant``
    (figures that span orders of magnitude, such as a training loss near 0)."""
    if s["n"] == 0:
        return "diverged"
    kind = "g" if significant else "f"
    f = f"{{:{'+' if sign else ''}.{digits}{kind}}}"
    text = f.format(scale * s["mean"])
    if s["n"] > 1:
        text += f" ± {s['std'] * scale:.{digits}{kind}}" if std else ""
        text += f" [{f.format(scale * s['low'])}, {f.format(scale * s['high'])}]"
    if s["nonfinite"]:
        text += f" ({s['nonfinite']} diverged)"
    return text


# ---------------------------------------------------------------------- files


def prepare_workdir(path: str | Path) -> Path:
    """``path`` as a directory that exists and can be written; a one-line ValueError if not."""
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise ValueError(f"--workdir {path} is a file; give a directory (new or existing).")
    try:
        path.mkdir(parents=True, exist_ok=True)
        probe = path / ".write-test"
        probe.write_text("")
        probe.unlink()
    except OSError as e:
        raise ValueError(f"--workdir {path} cannot be written: {e.strerror or e}.") from None
    return path


def _jsonable(value: Any) -> Any:
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_jsonable(v) for v in value]
    if isinstance(value, np.ndarray):
        return _jsonable(value.tolist())
    if isinstance(value, np.generic):
        return value.item()
    return value


def write(
    workdir: str | Path,
    name: str,
    result: dict[str, Any],
    text: str,
    provenance: Provenance | dict[str, Any],
    plot: Callable[[Path], None] | None = None,
) -> dict[str, Path]:
    """``NAME.json`` (``result`` with its provenance), ``NAME.md`` (``text`` under the command
    and provenance) and ``NAME.png`` (``plot(path)``) in ``workdir``; returns the paths.
    ``provenance``: this run's, or the record of the run whose result is written again."""
    workdir = prepare_workdir(workdir)
    record = provenance.record() if isinstance(provenance, Provenance) else provenance
    paths = {"json": workdir / f"{name}.json", "md": workdir / f"{name}.md"}
    document = {**result, "provenance": record}
    paths["json"].write_text(json.dumps(_jsonable(document), indent=1) + "\n")
    header = f"`{record['command']}`\n\n{provenance_line(record)}\n\n"
    paths["md"].write_text(header + text.rstrip() + "\n")
    if plot is not None:
        paths["png"] = workdir / f"{name}.png"
        plot(paths["png"])
    return paths


def read(path: str | Path) -> dict[str, Any]:
    """A result written by ``write`` (its ``NAME.json``)."""
    return json.loads(Path(path).read_text())
