"""Sampled mutation testing of altlearn/rules/ and altlearn/driver.py with cosmic-ray.

    bash scripts/mutation                    # every module: the sample, run, docs/mutation/
    bash scripts/mutation persistent hybrid  # those modules only (the same mutants)
    bash scripts/mutation --baseline         # the same sample against the tests without the
                                             # pinned ones (tests/test_pinned_*.py)
    bash scripts/mutation --report           # rewrite docs/mutation/ from the sessions

What is mutated, which tests judge each module and how the sample is drawn live in
scripts/mutation.toml. For each module a cosmic-ray session (a SQLite database) enumerates
every mutant of the module; the mutants of the configured functions are grouped into mutation
sites (one operator family at one place in the source: ``a < b`` is one site with the variants
``<=``, ``>``, ...), the sample draws sites with a fixed seed, in proportion to each module's
site count (with a minimum per module), and one variant per site; the session marks every
other mutant skipped. Each sampled mutant is applied to a copy of the repository (never to the
working tree) and the module's test files run on it with ``pytest -x``.

A session is resumed where it stopped (an interrupted run loses at most the mutant it was
testing); it starts again when the module's source, the sample or its own tests change. When
only the pinned tests change, the mutants the module's own tests killed keep their result and
the others run again; a first run with the pinned tests starts from the ``--baseline`` run's
kills in the same way. Sessions, the copy of the repository (``$MUTATION_TREE`` to use another)
and the JAX compilation cache live under ``$MUTATION_WORKDIR`` (default
``$TMPDIR/altlearn-mutation``). Outputs: docs/mutation/mutation.json (every mutant and its
outcome, per-module counts before and after the pinned tests, provenance) and
docs/mutation/mutation.md (the per-module table).
"""

from __future__ import annotations

import argparse
import ast
import datetime
import hashlib
import json
import math
import os
import random
import re
import shutil
import subprocess
import sys
import tempfile
import time
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CONFIG = ROOT / "scripts" / "mutation.toml"
OUT = ROOT / "docs" / "mutation"
PINNED = re.compile(r"(^|/)test_pinned_[^/]*\.py")


def load_config() -> dict:
    return tomllib.loads(CONFIG.read_text())


def workdir() -> Path:
    default = Path(tempfile.gettempdir()) / "altlearn-mutation"
    return Path(os.environ.get("MUTATION_WORKDIR", default))


def digest(*parts: object) -> str:
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()


# ---------------------------------------------------------------------------------------------
# The copy of the repository the mutants are applied to.


def repository_files() -> list[str]:
    """Tracked and untracked (not ignored) files: what a checkout of the working tree holds."""
    out = subprocess.run(
        ["git", "ls-files", "-co", "--exclude-standard", "-z"],
        cwd=ROOT,
        check=True,
        capture_output=True,
    ).stdout.decode()
    return sorted(f for f in out.split("\0") if f and (ROOT / f).is_file())


def sync_tree(tree: Path) -> None:
    """Makes ``tree`` a copy of the working tree (files whose content differs are copied; a
    mutant left behind by an interrupted run is overwritten)."""
    files = repository_files()
    for name in files:
        src, dst = ROOT / name, tree / name
        data = src.read_bytes()
        if not dst.exists() or dst.read_bytes() != data:
            dst.parent.mkdir(parents=True, exist_ok=True)
            dst.write_bytes(data)
            shutil.copymode(src, dst)
    keep = set(files)
    for path in tree.rglob("*"):  # files deleted from the repository go from the copy
        rel = path.relative_to(tree).as_posix()
        if path.is_file() and rel not in keep and "__pycache__" not in rel:
            if rel.split("/")[0] in {"altlearn", "tests", "experiments", "benchmarks"}:
                path.unlink()


# ---------------------------------------------------------------------------------------------
# Mutants: enumerated by cosmic-ray, filtered to the configured functions, sampled by site.


def functions_by_line(source: str) -> list[tuple[int, int, str]]:
    """(first line, last line, qualified name) of every function and class, outer first."""
    spans = []

    def walk(node, prefix):
        for child in ast.iter_child_nodes(node):
            if isinstance(child, ast.FunctionDef | ast.AsyncFunctionDef | ast.ClassDef):
                name = prefix + child.name
                first = min([child.lineno] + [d.lineno for d in child.decorator_list])
                spans.append((first, child.end_lineno, name))
                walk(child, name + ".")
            else:
                walk(child, prefix)

    walk(ast.parse(source), "")
    return spans


def function_at(spans: list[tuple[int, int, str]], line: int) -> str:
    """The innermost function or class holding ``line`` ('' at module level)."""
    inside = [s for s in spans if s[0] <= line <= s[1]]
    return max(inside, key=lambda s: s[0])[2] if inside else ""


class Places:
    """Where in a module's source a mutant means nothing: annotations (never evaluated, the
    modules import ``annotations`` from ``__future__``), the text of an f-string (a message),
    and ``*``/``**`` that are no binary operator (``{**a, ...}``, ``f(*args)``)."""

    def __init__(self, source: str):
        self.quiet, self.binary = [], []
        for node in ast.walk(ast.parse(source)):
            if isinstance(node, ast.arg | ast.AnnAssign) and node.annotation is not None:
                self.quiet.append(self.span(node.annotation))
            elif isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef) and node.returns:
                self.quiet.append(self.span(node.returns))
            elif isinstance(node, ast.JoinedStr):
                self.quiet.append(self.span(node))
            elif isinstance(node, ast.BinOp):  # the operator lies between its operands
                left, right = self.span(node.left), self.span(node.right)
                self.binary.append((left[1], right[0]))

    @staticmethod
    def span(node) -> tuple[tuple[int, int], tuple[int, int]]:
        return (node.lineno, node.col_offset), (node.end_lineno, node.end_col_offset)

    def reason(self, position: tuple[int, int], family: str) -> str | None:
        """Why a mutant at ``position`` (line, column) is left out, or None."""
        if any(a <= position < b for a, b in self.quiet):
            return "annotation or message text"
        if family == "ReplaceBinaryOperator" and not any(a <= position < b for a, b in self.binary):
            return "unpacking, not a binary operator"
        return None


def selected(function: str, functions: list[str]) -> bool:
    return any(function == f or function.startswith(f + ".") for f in functions)


def operator_parts(name: str) -> tuple[str, str | None, str | None]:
    """(family, from, to) of a cosmic-ray operator name ('core/ReplaceBinaryOperator_Add_Sub'
    -> ('ReplaceBinaryOperator', 'Add', 'Sub'); 'core/NumberReplacer' -> (.., None, None))."""
    base = name.split("/", 1)[-1]
    parts = base.split("_")
    if len(parts) == 3 and parts[0].startswith("Replace") and parts[0].endswith("Operator"):
        family, a, b = parts
        if a == "Delete":  # ReplaceUnaryOperator_Delete_X: X removed
            return family, b, "Delete"
        return family, a, b
    return base, None, None


def allowed(name: str, families: list[list[str]]) -> bool:
    """A replacement within one family of the config (so that the mutant is well typed)."""
    _, a, b = operator_parts(name)
    if a is None:
        return True
    return any(a in f and b in f for f in families)


def enumerate_module(
    module: str, spec: dict, tree: Path, sessions: Path, cfg: dict, create: bool = True
) -> dict | None:
    """The module's session (created, or re-created when its source changed; None where it is
    missing or stale and ``create`` is False) and its candidate mutants: the configured
    functions' mutants grouped into sites."""
    from cosmic_ray.work_db import WorkDB, use_db

    source = (tree / spec["path"]).read_text()
    source_fp = digest(source, cosmic_ray_version())
    meta_path = sessions / f"{module}.json"
    db_path = sessions / f"{module}.sqlite"
    meta = json.loads(meta_path.read_text()) if meta_path.exists() else {}
    if meta.get("source") != source_fp or not db_path.exists():
        if not create:
            return None
        config = sessions / f"{module}.toml"
        write_session_config(config, spec["path"], "true", 60.0)
        if db_path.exists():
            db_path.unlink()
        subprocess.run(
            [sys.executable, "-m", "cosmic_ray.cli", "init", str(config), str(db_path)],
            cwd=tree,
            check=True,
            capture_output=True,
        )
        meta = {"source": source_fp}
        meta_path.write_text(json.dumps(meta))
    spans = functions_by_line(source)
    places = Places(source)
    families = cfg["operators"]["families"]
    sites: dict[tuple, list] = {}
    left_out: dict[str, int] = {}
    with use_db(str(db_path), WorkDB.Mode.open) as db:
        items = list(db.work_items)
    for item in items:
        m = item.mutations[0]
        function = function_at(spans, m.start_pos[0])
        if not selected(function, spec["functions"]):
            continue
        family = operator_parts(m.operator_name)[0]
        why = places.reason(tuple(m.start_pos), family)
        if why is None and not allowed(m.operator_name, families):
            why = "replacement across operator families"
        if why is not None:
            left_out[why] = left_out.get(why, 0) + 1
            continue
        key = (m.start_pos[0], m.start_pos[1], m.end_pos[0], m.end_pos[1], family)
        sites.setdefault(key, []).append((m.operator_name, m.occurrence, item.job_id, function))
    return {
        "sites": sites,
        "meta": meta,
        "db": db_path,
        "items": len(items),
        "in_functions": sum(len(v) for v in sites.values()) + sum(left_out.values()),
        "left_out": left_out,
    }


def allocate(counts: dict[str, int], size: int, minimum: int) -> dict[str, int]:
    """Mutants per module: in proportion to the site counts (largest remainders), at least
    ``minimum`` (or every site), at most every site."""
    total = sum(counts.values())
    quota = {m: size * c / total for m, c in counts.items()}
    alloc = {m: min(c, max(minimum, math.floor(quota[m]))) for m, c in counts.items()}
    order = sorted(counts, key=lambda m: (-(quota[m] - math.floor(quota[m])), m))
    while sum(alloc.values()) < size and any(alloc[m] < counts[m] for m in counts):
        for m in order:
            if sum(alloc.values()) >= size:
                break
            if alloc[m] < counts[m]:
                alloc[m] += 1
    return alloc


def draw(module: str, sites: dict[tuple, list], k: int, seed: int) -> list[tuple]:
    """``k`` sites of the module and one variant of each, reproducibly: (operator, occurrence,
    job id, function), ordered by their place in the source."""
    rng = random.Random(f"{seed}/{module}")
    chosen = sorted(rng.sample(sorted(sites), k))
    return [rng.choice(sorted(sites[s])) for s in chosen]


# ---------------------------------------------------------------------------------------------
# Running a module's sample.


def cosmic_ray_version() -> str:
    from importlib.metadata import version

    return version("cosmic-ray")


def write_session_config(path: Path, module_path: str, test_command: str, timeout: float):
    text = (
        "[cosmic-ray]\n"
        f"module-path = {json.dumps(module_path)}\n"
        f"timeout = {timeout:.1f}\n"
        "excluded-modules = []\n"
        f"test-command = {json.dumps(test_command)}\n\n"
        '[cosmic-ray.distributor]\nname = "local"\n'
    )
    path.write_text(text)


def test_files(spec: dict, tree: Path) -> tuple[list[str], list[str]]:
    """The module's own test files and its pinned ones (tests/test_pinned_*.py), those that
    exist (pytest node ids)."""
    own, pinned = [], []
    for t in spec["tests"]:
        if (tree / t.split("::")[0]).exists():
            (pinned if PINNED.search(t) else own).append(t)
    return own, pinned


def test_command(cfg: dict, tests: list[str]) -> list[str]:
    return [sys.executable, "-m", "pytest", *cfg["run"]["pytest_args"], *tests]


def clean_run(command: list[str], tree: Path) -> float:
    """Seconds of the module's tests on the unmutated copy (filling the compilation cache);
    raises if they fail."""
    probe = subprocess.run(
        [sys.executable, "-c", "import altlearn; print(altlearn.__file__)"],
        cwd=tree,
        capture_output=True,
        text=True,
        check=True,
    ).stdout.strip()
    if not Path(probe).resolve().is_relative_to(tree.resolve()):
        raise SystemExit(f"the tests would import altlearn from {probe}, not from the copy")
    t = time.perf_counter()
    done = subprocess.run(command, cwd=tree, capture_output=True, text=True)
    if done.returncode != 0:
        raise SystemExit("the module's tests fail on the unmutated code:\n" + done.stdout[-3000:])
    return time.perf_counter() - t


def killed_by_own_tests(result) -> bool:
    """Killed by one of the module's own tests (not a pinned one): adding tests after them
    cannot change that."""
    outcome, killer = classify(result)
    return outcome == "killed" and not PINNED.search(killer or "")


def prepare(module, spec, cfg, tree, work, found, k, baseline, run) -> dict | None:
    """The module's session holding exactly its sample, pending where not yet run; with
    ``run`` False only an existing session of this very sample and tests (else None).

    Each mutant runs the pinned tests first (they are quick), then the module's own tests. The
    session starts afresh when the source, the sample or the module's own tests change; when
    only the pinned tests change, the mutants the module's own tests killed keep their result
    (adding tests cannot revive them) and the rest run again. A first run of the sample with
    the pinned tests starts from the baseline's results (``--baseline``) in the same way."""
    from cosmic_ray.work_db import WorkDB, use_db
    from cosmic_ray.work_item import WorkerOutcome, WorkResult

    sessions = work / ("baseline" if baseline else "sessions")
    sample = draw(module, found["sites"], k, cfg["sample"]["seed"])
    own, pinned = test_files(spec, tree)
    text = lambda ts: [(t, (tree / t.split("::")[0]).read_text()) for t in ts]
    conftest = (tree / "tests" / "conftest.py").read_text()
    state = digest(
        found["meta"]["source"], [s[:2] for s in sample], text(own), conftest, cfg["run"]
    )
    pinned_state = None if baseline else digest(text(pinned))
    tests = own if baseline else [*pinned, *own]
    meta_path = sessions / f"{module}.json"
    meta = found["meta"]
    if meta.get("state") != state or meta.get("pinned") != pinned_state:
        if not run:
            return None
        keep = {}  # job id -> a result that stands
        if meta.get("state") == state:
            with use_db(str(found["db"]), WorkDB.Mode.open) as db:
                keep = {i.job_id: r for i, r in db.completed_work_items if killed_by_own_tests(r)}
        else:
            meta = {"source": meta["source"], "state": state, "seconds": {}}
            before = work / "baseline" / f"{module}.json"
            if not baseline and before.exists():  # the baseline's kills stand
                old = json.loads(before.read_text())
                if old.get("state") == state:
                    keep = seed_from(work / "baseline" / f"{module}.sqlite", sample, old, meta)
        _clear_results(found["db"])
        with use_db(str(found["db"]), WorkDB.Mode.open) as db:
            for job, result in keep.items():
                db.set_result(job, result)
            sampled = {s[2] for s in sample}
            skip = [item.job_id for item in db.work_items if item.job_id not in sampled]
            db.set_multiple_results(skip, WorkResult(worker_outcome=WorkerOutcome.SKIPPED))
        meta["seconds"] = {j: t for j, t in meta.get("seconds", {}).items() if j in keep}
        meta["pinned"] = pinned_state
    command = test_command(cfg, tests)
    if "clean_s" not in meta:
        print(f"{module}: clean run of {' '.join(tests)}", flush=True)
        meta["clean_s"] = clean_run(command, tree)
    clean = meta["clean_s"]
    limit = max(cfg["run"]["timeout_factor"] * clean, clean + cfg["run"]["timeout_floor_s"])
    meta.update(timeout_s=limit, command=command, tests=tests, sample=[list(s) for s in sample])
    meta_path.write_text(json.dumps(meta, indent=1))
    return meta


def seed_from(db_path: Path, sample: list, old: dict, meta: dict) -> dict:
    """The results of ``sample``'s mutants that the module's own tests killed in the cosmic-ray
    database at ``db_path`` (matched by operator and occurrence), keyed by the job ids of the
    database being filled; their seconds and the clean run's time go into ``meta``."""
    from cosmic_ray.work_db import WorkDB, use_db

    with use_db(str(db_path), WorkDB.Mode.open) as db:
        done = {
            (i.mutations[0].operator_name, i.mutations[0].occurrence): (i.job_id, r)
            for i, r in db.completed_work_items
        }
    keep = {}
    for operator, occurrence, job, _ in sample:
        old_job, result = done.get((operator, occurrence), (None, None))
        if result is not None and killed_by_own_tests(result):
            keep[job] = result
            meta["seconds"][job] = old.get("seconds", {}).get(old_job)
    meta["clean_s"] = old["clean_s"]
    return keep


def _clear_results(db_path: Path) -> None:
    import sqlite3

    with sqlite3.connect(db_path) as con:
        con.execute("DELETE FROM work_results")


def execute(module, meta, tree, sessions, db_path, progress) -> None:
    """Runs the module's pending mutants, one at a time, recording each result in the session."""
    from cosmic_ray.mutating import mutate_and_test
    from cosmic_ray.work_db import WorkDB, use_db

    meta_path = sessions / f"{module}.json"
    with use_db(str(db_path), WorkDB.Mode.open) as db:
        pending = sorted(db.pending_work_items, key=lambda w: w.job_id)
        order = {s[2]: i for i, s in enumerate(meta["sample"])}
        pending.sort(key=lambda w: order.get(w.job_id, len(order)))
        command = " ".join(_quote(a) for a in meta["command"])
        for item in pending:
            m = item.mutations[0]
            t = time.perf_counter()
            cwd = os.getcwd()
            os.chdir(tree)
            try:
                result = mutate_and_test(item.mutations, command, meta["timeout_s"])
            finally:
                os.chdir(cwd)
            seconds = time.perf_counter() - t
            db.set_result(item.job_id, result)
            meta["seconds"][item.job_id] = round(seconds, 1)
            meta_path.write_text(json.dumps(meta, indent=1))
            outcome, killer = classify(result)
            progress(
                f"{module}:{m.start_pos[0]} {m.operator_name.split('/')[-1]}: {outcome}"
                f"{' by ' + killer if killer else ''} ({seconds:.0f} s)"
            )


def _quote(arg: str) -> str:
    return arg if re.fullmatch(r"[\w./:=@+,-]+", arg) else "'" + arg.replace("'", "'\\''") + "'"


def classify(result) -> tuple[str, str | None]:
    """(killed | survived | timeout | incompetent, the first failing test or None)."""
    from cosmic_ray.work_item import TestOutcome, WorkerOutcome

    if result.worker_outcome != WorkerOutcome.NORMAL:
        return "incompetent", None
    if result.test_outcome == TestOutcome.SURVIVED:
        return "survived", None
    if result.test_outcome == TestOutcome.INCOMPETENT:
        return "incompetent", None
    if result.output == "timeout":
        return "timeout", None
    found = re.search(r"^(?:FAILED|ERROR) (\S+)", result.output or "", re.M)
    return "killed", found.group(1) if found else "the test run (no test reported)"


# ---------------------------------------------------------------------------------------------
# The report.


def mutated_line(source: str, operator: str, occurrence: int) -> str:
    """The source lines a mutant changes, 'old -> new'."""
    import difflib

    import cosmic_ray.plugins
    from cosmic_ray.mutating import mutate_code

    new = mutate_code(source, cosmic_ray.plugins.get_operator(operator)(), occurrence)
    if new is None:
        return "(no mutation)"
    diff = "\n".join(difflib.unified_diff(source.splitlines(), new.splitlines(), lineterm=""))
    old, mutated = diff_lines(diff)
    return f"{old} -> {mutated}"


def diff_lines(diff: str | None) -> tuple[str, str]:
    lines = (diff or "").splitlines()
    old = [ln[1:].strip() for ln in lines if ln[:1] == "-" and not ln.startswith("---")]
    new = [ln[1:].strip() for ln in lines if ln[:1] == "+" and not ln.startswith("+++")]
    old, new = [ln for ln in old if ln], [ln for ln in new if ln]
    return " / ".join(old), " / ".join(new)


def collect(module, spec, found, meta) -> list[dict]:
    from cosmic_ray.work_db import WorkDB, use_db

    out = []
    with use_db(str(found["db"]), WorkDB.Mode.open) as db:
        done = {item.job_id: (item, result) for item, result in db.completed_work_items}
    for operator, occurrence, job, function in meta["sample"]:
        item, result = done.get(job, (None, None))
        if result is None:
            continue
        m = item.mutations[0]
        outcome, killer = classify(result)
        original, mutated = diff_lines(result.diff)
        out.append(
            {
                "module": module,
                "path": spec["path"],
                "function": function,
                "line": m.start_pos[0],
                "column": m.start_pos[1],
                "operator": operator,
                "occurrence": occurrence,
                "original": original,
                "mutated": mutated,
                "outcome": outcome,
                "killed_by": killer,
                "seconds": meta.get("seconds", {}).get(job),
            }
        )
    return out


def summarise(mutants: list[dict], modules: list[str]) -> dict:
    rows = {}
    for module in modules:
        ms = [m for m in mutants if m["module"] == module]
        killed = sum(m["outcome"] in ("killed", "timeout") for m in ms)
        survived = sum(m["outcome"] == "survived" for m in ms)
        incompetent = sum(m["outcome"] == "incompetent" for m in ms)
        rows[module] = {
            "mutants": len(ms),
            "killed": killed,
            "timeout": sum(m["outcome"] == "timeout" for m in ms),
            "survived": survived,
            "incompetent": incompetent,
            "kill_rate": round(killed / (killed + survived), 4) if killed + survived else None,
        }
    killed = sum(r["killed"] for r in rows.values())
    survived = sum(r["survived"] for r in rows.values())
    rows["total"] = {
        "mutants": sum(r["mutants"] for r in rows.values()),
        "killed": killed,
        "timeout": sum(r["timeout"] for r in rows.values()),
        "survived": survived,
        "incompetent": sum(r["incompetent"] for r in rows.values()),
        "kill_rate": round(killed / (killed + survived), 4) if killed + survived else None,
    }
    return rows


def table(rows: dict) -> str:
    lines = [
        "| module | mutants | killed | survived (after new tests) | kill rate |",
        "| --- | ---: | ---: | ---: | ---: |",
    ]
    for module, r in rows.items():
        done = r["killed"] + r["survived"]
        rate = f"{100 * r['killed'] / done:.1f}%" if done else "n/a"
        name = "**total**" if module == "total" else f"`{module}`"
        lines.append(f"| {name} | {r['mutants']} | {r['killed']} | {r['survived']} | {rate} |")
    return "\n".join(lines) + "\n"


def provenance(results: dict) -> dict:
    """What the output records of the run: the command, the commit, versions, the machine and
    the time spent (every mutant's test run and the clean runs, summed over resumed runs)."""
    sys.path.insert(0, str(ROOT))
    from altlearn import report

    return {
        "command": "bash scripts/mutation",
        **report.git_commit(),
        "versions": {**report.versions(), "cosmic-ray": cosmic_ray_version()},
        "machine": report.machine_facts(),
        "cores_used": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None,
        "date": datetime.date.today().isoformat(),
        "wall_time_s": round(sum(r["seconds"] + r["clean_s"] for r in results.values()), 1),
    }


def section_of(results: dict, modules: list[str]) -> dict:
    """The per-module counts, every mutant, and how each module ran."""
    present = [m for m in modules if m in results]
    mutants = [m for module in present for m in results[module]["mutants"]]
    return {
        "modules": summarise(mutants, present),
        "mutants": mutants,
        "commands": {m: results[m]["command"] for m in present},
        "timeouts_s": {m: round(results[m]["timeout_s"], 1) for m in present},
        "clean_run_s": {m: round(results[m]["clean_s"], 1) for m in present},
        "mutant_run_s": {m: round(results[m]["seconds"], 1) for m in present},
    }


def write_report(cfg, final: dict, before: dict) -> None:
    """docs/mutation/mutation.json (every mutant of the run with the pinned tests, the counts
    before them, the sample, provenance) and mutation.md (the per-module table)."""
    modules = list(cfg["modules"])
    both = {**before, **final}
    doc = {
        "provenance": provenance(final),
        "tool": f"cosmic-ray {cosmic_ray_version()}",
        "rerun": "bash scripts/mutation",
        "config": "scripts/mutation.toml",
        "sample": {
            "seed": cfg["sample"]["seed"],
            "size": cfg["sample"]["size"],
            "min_per_module": cfg["sample"]["min_per_module"],
            "per_module": {m: both[m]["k"] for m in modules if m in both},
            "sites_per_module": {m: both[m]["sites"] for m in modules if m in both},
            "mutants_enumerated_per_module": {
                m: both[m]["enumerated"] for m in modules if m in both
            },
            "left_out_in_functions": {m: both[m]["left_out"] for m in modules if m in both},
        },
        "functions": {m: cfg["modules"][m]["functions"] for m in modules},
        "tests": {m: cfg["modules"][m]["tests"] for m in modules},
        "operators": {
            "tool_operators": "cosmic-ray core operators that take no arguments",
            "families": cfg["operators"]["families"],
        },
        "pytest_args": cfg["run"]["pytest_args"],
        "timeout": {k: cfg["run"][k] for k in ("timeout_factor", "timeout_floor_s")},
    }
    final_section, before_section = section_of(final, modules), section_of(before, modules)
    rates = {m: r["kill_rate"] for m, r in before_section["modules"].items()}
    doc["kill_rates"] = {
        m: {"before_pinned_tests": rates.get(m), "after": r["kill_rate"]}
        for m, r in final_section["modules"].items()
    }
    doc["final"] = final_section
    doc["baseline"] = before_section
    OUT.mkdir(parents=True, exist_ok=True)
    (OUT / "mutation.json").write_text(json.dumps(doc, indent=1) + "\n")
    (OUT / "mutation.md").write_text(table(final_section["modules"]))


# ---------------------------------------------------------------------------------------------


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("modules", nargs="*", help="modules to run (default: all)")
    parser.add_argument(
        "--baseline", action="store_true", help="without the pinned tests (tests/test_pinned_*)"
    )
    parser.add_argument("--report", action="store_true", help="only rewrite docs/mutation/")
    parser.add_argument("--list", action="store_true", help="print the sample and stop")
    args = parser.parse_args(argv)
    cfg = load_config()
    unknown = sorted(set(args.modules) - set(cfg["modules"]))
    if unknown:
        raise SystemExit(f"unknown modules {unknown}; configured: {', '.join(cfg['modules'])}")
    work = workdir()
    tree = Path(os.environ.get("MUTATION_TREE", work / "tree"))
    sessions = work / ("baseline" if args.baseline else "sessions")
    sessions.mkdir(parents=True, exist_ok=True)
    tree.mkdir(parents=True, exist_ok=True)
    sync_tree(tree)
    os.environ.setdefault("JAX_PLATFORMS", "cpu")
    os.environ["JAX_COMPILATION_CACHE_DIR"] = str(work / "jax-cache")
    os.environ["PYTHONPATH"] = str(tree)

    found = {m: enumerate_module(m, s, tree, sessions, cfg) for m, s in cfg["modules"].items()}
    counts = {m: len(f["sites"]) for m, f in found.items()}
    alloc = allocate(counts, cfg["sample"]["size"], cfg["sample"]["min_per_module"])
    if args.list:
        for m in cfg["modules"]:
            sample = draw(m, found[m]["sites"], alloc[m], cfg["sample"]["seed"])
            print(f"{m}: {alloc[m]} of {counts[m]} sites ({found[m]['items']} mutants in module)")
            source = (tree / cfg["modules"][m]["path"]).read_text()
            for op, occ, _, fn in sample:
                print(f"    {fn}: {op} #{occ}: {mutated_line(source, op, occ)}")
        print(f"total: {sum(alloc.values())}")
        return
    chosen = args.modules or list(cfg["modules"])
    log = (work / "progress.log").open("a")

    def progress(line: str) -> None:
        stamp = time.strftime("%H:%M:%S")
        text = f"[{stamp}] {line}"
        print(text, flush=True)
        log.write(text + "\n")
        log.flush()

    for module in chosen if not args.report else []:
        spec = cfg["modules"][module]
        meta = prepare(
            module, spec, cfg, tree, work, found[module], alloc[module], args.baseline, True
        )
        execute(module, meta, tree, sessions, found[module]["db"], progress)
    final = results_of(cfg, tree, work, alloc, counts, baseline=False)
    before = results_of(cfg, tree, work, alloc, counts, baseline=True)
    for module, r in final.items():  # without pinned tests the run is its own baseline
        if module not in before and not r["pinned"]:
            before[module] = r
    write_report(cfg, final, before)
    rows = summarise([m for r in final.values() for m in r["mutants"]], list(final))
    print(table(rows))


def results_of(cfg, tree, work, alloc, counts, baseline: bool) -> dict:
    """Every module's results in the sessions of the current sample and tests (with the pinned
    tests, or without them for ``baseline``); modules without such a session are left out."""
    sessions = work / ("baseline" if baseline else "sessions")
    results = {}
    for module, spec in cfg["modules"].items():
        found = enumerate_module(module, spec, tree, sessions, cfg, create=False)
        if found is None:
            continue
        meta = prepare(module, spec, cfg, tree, work, found, alloc[module], baseline, False)
        if meta is None:
            continue
        results[module] = {
            "mutants": collect(module, spec, found, meta),
            "command": " ".join(_quote(a) for a in meta["command"]),
            "pinned": [t for t in meta["tests"] if PINNED.search(t)],
            "timeout_s": meta["timeout_s"],
            "clean_s": meta["clean_s"],
            "seconds": sum(v or 0.0 for v in meta.get("seconds", {}).values()),
            "k": alloc[module],
            "sites": counts[module],
            "enumerated": found["items"],
            "left_out": found["left_out"],
        }
    return results


if __name__ == "__main__":
    main()
