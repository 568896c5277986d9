"""The README's registry tables match the registries."""

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
