"""The runner's edges: divergence before any evaluation checkpoint, a clamped batch size,
damaged checkpoints, and population rules sharded over the devices through the runner."""

import json
import logging
import shutil
import sys
from pathlib import Path

import numpy as np
import pytest
from conftest import FIGURES, ROOT, figures, tiny_config

from altlearn import data, runner

sys.path.insert(0, str(ROOT / "experiments" / "configs"))
import population  # noqa: E402


def _checkpoints(workdir):
    return sorted(
        int(p.name) for p in (Path(workdir) / "checkpoints").iterdir() if p.name.isdigit()
    )


def _interrupt_at(step):
    def on_eval(record):
        if record["step"] == step:
            raise KeyboardInterrupt

    return on_eval


def test_divergence_in_the_first_chunk_keeps_the_initial_checkpoint(tmp_path):
    # SGD with learning rate 1e30: the first update sends the weights to ~1e28, so the loss of
    # step 1 overflows.
    config = tiny_config(
        steps=10, eval_every=2, **{"optimizer.name": "sgd", "optimizer.learning_rate": 1e30}
    )
    with pytest.raises(runner.DivergenceError) as error:
        runner.run(config, tmp_path)
    message = str(error.value)
    assert "at step 1 " in message and "last good checkpoint (step 0)" in message, message
    assert "None" not in message
    assert _checkpoints(tmp_path) == [0]
    assert not (tmp_path / "summary.json").exists()


def test_non_finite_initial_evaluation_says_no_checkpoint_was_written(tmp_path):
    config = tiny_config(steps=10, eval_every=2)
    dataset = data.load_dataset("digits", seed=config.seed)
    x_test = dataset.x_test.copy()
    x_test[0, 0] = np.nan
    with pytest.raises(runner.DivergenceError) as error:
        runner.run(config, tmp_path, dataset=dataset._replace(x_test=x_test))
    message = str(error.value)
    assert "Evaluation at step 0 gave non-finite test_loss" in message, message
    assert "No checkpoint was written before it." in message and "None" not in message
    assert _checkpoints(tmp_path) == []


def test_batch_size_larger_than_the_training_split_is_said_and_recorded(tmp_path, caplog):
    config = tiny_config(steps=2, eval_every=2, batch_size=100_000)
    with caplog.at_level(logging.WARNING):
        summary = runner.run(config, tmp_path)
    warnings = [r.getMessage() for r in caplog.records if "batch_size" in r.getMessage()]
    assert len(warnings) == 1, warnings
    num_train = summary["batch_size"]
    assert (
        f"batch_size 100000 is larger than the training split ({num_train} samples)"
        in (warnings[0])
    )
    assert 1000 < num_train < 100_000
    assert summary["batch_size_requested"] == 100_000
    assert json.loads((tmp_path / "summary.json").read_text())["batch_size"] == num_train


def _garble_data(step_dir: Path) -> None:
    """Overwrites a checkpoint's array data files (tensorstore's ``d/`` chunks) with junk."""
    files = [p for p in step_dir.rglob("*") if p.is_file() and p.parent.name == "d"]
    assert files
    for path in files:
        path.write_bytes(b"\x00garbled" * max(1, path.stat().st_size // 8))


def _truncate(step_dir: Path) -> None:
    """Truncates every file of a checkpoint (data and metadata) to nothing."""
    for path in step_dir.rglob("*"):
        if path.is_file():
            path.write_bytes(b"")


def test_damaged_newest_checkpoint_resumes_from_an_older_one(tmp_path, caplog):
    config = tiny_config(steps=40, eval_every=10, keep_checkpoints=2)
    runner.run(config, tmp_path / "whole")
    cut = tmp_path / "cut"
    with pytest.raises(KeyboardInterrupt):
        runner.run(config, cut, on_eval=_interrupt_at(30))
    assert _checkpoints(cut) == [20, 30]
    _garble_data(cut / "checkpoints" / "30")

    with caplog.at_level(logging.INFO):
        runner.run(config, cut)
    skipped = [r.getMessage() for r in caplog.records if "Skipped the checkpoint" in r.getMessage()]
    assert len(skipped) == 1 and "at step 30: unreadable (" in skipped[0], skipped
    assert "\n" not in skipped[0]
    assert any("Resumed from the checkpoint at step 20" in r.getMessage() for r in caplog.records)
    assert figures(cut) == figures(tmp_path / "whole")
    assert (cut / "checkpoints.unreadable" / "30").is_dir()  # moved aside, not deleted
    steps = [json.loads(x)["step"] for x in (cut / "metrics.jsonl").read_text().splitlines()]
    assert steps == [0, 10, 20, 30, 40]


def test_no_readable_checkpoint_is_a_one_line_error_that_keeps_the_files(tmp_path):
    config = tiny_config(steps=40, eval_every=10, keep_checkpoints=2)
    with pytest.raises(KeyboardInterrupt):
        runner.run(config, tmp_path, on_eval=_interrupt_at(30))
    _garble_data(tmp_path / "checkpoints" / "30")
    _truncate(tmp_path / "checkpoints" / "20")
    before = sorted(str(p.relative_to(tmp_path)) for p in tmp_path.rglob("*"))

    with pytest.raises(ValueError, match="No checkpoint in .* can be read") as error:
        runner.run(config, tmp_path)
    message = str(error.value)
    assert "\n" not in message and "step 30: " in message and "step 20: " in message
    assert len(message) < 800, message
    assert sorted(str(p.relative_to(tmp_path)) for p in tmp_path.rglob("*")) == before


# Every population rule, sharded over the 8 (fake) devices, through the runner: several chunks,
# a checkpoint, an interruption and a resume; against the same run unsharded.
POPULATION_RULES = {
    "open_es": {"rule.population_size": 16},
    "pso": {"rule.population_size": 16},
    "neuron_pso": {"rule.particles_per_neuron": 8},
}


def _population_config(method, shard):
    config = population.get_config(f"method={method},data=moons")
    config.steps = 6
    config.eval_every = 2
    config.model.widths = (8,)
    config.batch_size = 32
    for key, value in POPULATION_RULES[method].items():
        config.rule[key.split(".", 1)[1]] = value
    config.rule.shard = shard
    return config


@pytest.mark.slow
# One rule through the runner (the sharded step is the rule's own: tests/test_evolution.py and
# tests/test_swarm.py check sharded against unsharded for each population rule).
@pytest.mark.parametrize("method", ["neuron_pso"])
def test_sharded_population_rule_runs_and_resumes_through_the_runner(tmp_path, method):
    single = tmp_path / "single"
    runner.run(_population_config(method, shard=False), single)
    sharded, whole, cut = (
        _population_config(method, shard=True),
        tmp_path / "whole",
        tmp_path / "cut",
    )

    def copy_at_step_2(record):  # what a run interrupted after its step-2 checkpoint leaves
        if record["step"] == 2:
            shutil.copytree(whole, cut)

    runner.run(sharded, whole, on_eval=copy_at_step_2)
    assert _checkpoints(cut) == [0, 2] and not (cut / "summary.json").exists()
    runner.run(sharded, cut)  # resumes at step 2: two more chunks

    assert figures(cut) == figures(whole)  # a resumed sharded run is bit-exact
    a, b = figures(single), figures(whole)
    assert b["step"] == 6
    np.testing.assert_allclose([b[k] for k in FIGURES], [a[k] for k in FIGURES], rtol=1e-5)
