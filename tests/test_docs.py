"""The generated documents (README tables, docs/RULES.md) match the code; the result tables
match their output files."""

import json
import re
import subprocess
from pathlib import Path

from altlearn import docs

README = Path(__file__).resolve().parents[1] / "README.md"


def test_readme_tables_match_the_registries():
    text = README.read_text()
    assert docs.START in text and docs.END in text
    assert docs.render_into(text) == text, "run: python -m altlearn.docs README.md"


def test_rules_document_matches_the_code():
    path = README.parent / "docs" / "RULES.md"
    assert path.read_text() == docs.rules_document(), (
        "run: python -m altlearn.docs --rules docs/RULES.md"
    )


DOCUMENTS = [README, *sorted((README.parent / "docs").glob("*.md"))]


def _sourced_tables():
    return [(doc, m) for doc in DOCUMENTS for m in docs.TABLE.finditer(doc.read_text())]


def test_result_tables_equal_their_output_files():
    """Every sourced table equals its output file's, and that file records how it was made."""
    assert _sourced_tables(), "no sourced table found"
    for doc in DOCUMENTS:
        drift = docs.table_drift(doc.read_text())
        assert not drift, f"{doc.name}: {drift}; run: python -m altlearn.docs --tables {doc.name}"
    for _doc, m in _sourced_tables():
        record = json.loads((docs.ROOT / m["path"]).with_suffix(".json").read_text())
        provenance = record.get("provenance", record)
        assert provenance.get("command") and re.fullmatch(
            "[0-9a-f]{40}", provenance.get("commit", "")
        ), f"{m['path']}: its JSON records no command or commit"


def test_a_changed_digit_in_a_result_table_is_drift():
    doc, m = _sourced_tables()[0]
    text = doc.read_text()
    digit = re.search(r"\d", m["body"])
    start = m.start("body") + digit.start()
    changed = text[:start] + str((int(text[start]) + 1) % 10) + text[start + 1 :]
    assert len(docs.table_drift(changed)) == 1
    assert docs.render_tables(changed) == text


# Tables of measured numbers that no output file backs yet, per document: a ratchet that only
# goes down (each is re-derived into a sourced table or removed).
UNSOURCED_LEFT = {"RESULTS.md": 0, "BENCHMARKS.md": 0, "SCALING.md": 0}


def test_no_measured_table_without_its_output_file():
    for doc in DOCUMENTS:
        if doc.name == "RULES.md":  # generated from the code (options and defaults, no results)
            continue
        lines = docs.unsourced_tables(doc.read_text())
        assert len(lines) <= UNSOURCED_LEFT.get(doc.name, 0), (
            f"{doc.name}: tables at lines {lines} hold numbers outside <!-- table: FILE --> blocks"
        )


def test_a_table_of_numbers_outside_the_markers_is_found():
    sourced = "<!-- table: a.md -->\n| x |\n|---|\n| 0.5 |\n<!-- end table -->\n"
    loose = "text\n| rule | acc |\n|---|---|\n| bp | 0.97 |\n\n| a | b |\n|---|---|\n| c | d |\n"
    assert docs.unsourced_tables(sourced) == []
    assert docs.unsourced_tables(sourced + loose) == [7]


def test_readme_and_ci_run_the_same_test_command():
    ci = (README.parent / ".ci" / "run").read_text()
    assert "bash scripts/test" in ci
    assert "\n    scripts/test\n" in README.read_text()


def test_gpu_bench_names_its_parts_on_a_bad_one():
    """scripts/gpu_bench (docs/BENCHMARKS.md, 'Measuring on a GPU') refuses an unknown part
    before it starts anything."""
    script = README.parent / "scripts" / "gpu_bench"
    done = subprocess.run(["bash", str(script), "speed"], capture_output=True, text=True)
    assert done.returncode == 2
    valid = "evolution, rules, pso, hybrid, sweep, feedback, all."
    assert f"Unknown part 'speed'; valid choices: {valid}" in done.stderr


def test_results_script_names_its_parts_and_writes_every_sourced_file():
    """scripts/results refuses an unknown part before it starts anything, and each output file
    a sourced table of docs/results names is one its parts write."""
    script = (README.parent / "scripts" / "results").read_text()
    done = subprocess.run(
        ["bash", str(README.parent / "scripts" / "results"), "speed"],
        capture_output=True,
        text=True,
    )
    assert done.returncode == 2 and "Unknown part 'speed'; valid choices: baseline" in done.stderr
    for _doc, m in _sourced_tables():
        stem = Path(m["path"]).stem
        if m["path"].startswith("docs/results/"):
            assert f"--name={stem} " in script or f"--name={stem}\n" in script, stem
        elif m["path"].startswith("docs/bench/"):  # a benchmark's: its --out or --name
            ways = (
                f"/{stem}.json",
                f"$b/{stem} ",
                f"$b/{stem}\n",
                f"--name={stem} ",
                f"--name={stem}\n",
            )
            assert any(way in script for way in ways), stem


def test_readme_rule_example_runs_and_learns():
    """The whole rule module shown in README's "Adding a learning rule" works as written: its
    stateful estimator keeps the fixed feedback matrices, and it learns the tiny digits task."""
    import jax
    import jax.numpy as jnp
    import numpy as np
    import optax

    from altlearn.rules import Sizes
    from altlearn.train import Experiment

    text = README.read_text()
    start = text.index("```python\n# altlearn/rules/drtp.py")
    code = text[start + len("```python\n") : text.index("```\n", start + 10)]
    namespace: dict = {}
    exec(compile(code, "README.md", "exec"), namespace)
    spec = namespace["SPEC"]
    experiment = Experiment(_tiny_backprop_config())
    model, task = experiment.model, experiment.task
    assert spec.cost(model, {}, Sizes(64)) == 2.0
    rule = spec.factory(model, task, optax.adam(1e-2), {})
    variables = model.init(jax.random.PRNGKey(0), experiment.x_train[:1])
    state = rule.init(jax.random.PRNGKey(1), variables)
    x, y = experiment.x_train[:512], experiment.y_train[:512]

    @jax.jit
    def run(variables, state):
        def body(carry, t):
            v, s = carry
            i = jax.random.permutation(jax.random.PRNGKey(t), x.shape[0])[:64]
            v, s, metrics = rule.step(jax.random.PRNGKey(t), v, s, (x[i], y[i]))
            return (v, s), metrics["loss"]

        return jax.lax.scan(body, (variables, state), jnp.arange(300))

    (variables_after, state_after), losses = run(variables, state)
    jax.tree.map(np.testing.assert_array_equal, state.estimator, state_after.estimator)
    assert float(losses[:10].mean()) > 1.5 and float(losses[-20:].mean()) < 0.3, losses
    key = jax.random.PRNGKey(2)
    grads, _, estimate_state = jax.jit(rule.estimate)(key, variables_after, state_after, (x, y))
    assert jax.tree.structure(estimate_state) == jax.tree.structure(state_after)
    assert jax.tree.structure(grads) == jax.tree.structure(variables["params"])


def _tiny_backprop_config():
    from conftest import tiny_config

    return tiny_config("backprop")
