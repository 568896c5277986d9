"""The README's registry tables match the registries."""

import subprocess
from pathlib import Path

from altlearn import docs

README = Path(__file__).resolve().parents[1] / "README.md"


def test_readme_tables_match_the_registries():
    text = README.read_text()
    assert docs.START in text and docs.END in text
    assert docs.render_into(text) == text, "run: python -m altlearn.docs README.md"


def test_readme_and_ci_run_the_same_test_command():
    ci = (README.parent / ".ci" / "run").read_text()
    assert "bash scripts/test" in ci
    assert "\n    scripts/test\n" in README.read_text()


def test_gpu_bench_names_its_parts_on_a_bad_one():
    """scripts/gpu_bench (docs/BENCHMARKS.md, 'Measuring on a lent GPU') refuses an unknown
    part before it starts anything."""
    script = README.parent / "scripts" / "gpu_bench"
    done = subprocess.run(["bash", str(script), "speed"], capture_output=True, text=True)
    assert done.returncode == 2
    assert "Unknown part 'speed'; valid choices: evolution, rules, pso, all." in done.stderr
