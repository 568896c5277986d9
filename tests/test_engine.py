"""The engine every binary runs through: the program (altlearn.train.make_train), the driver
(points x seeds, chunked, saved, resumed), the tuner and the report module."""

import json
import math
import subprocess

import jax
import numpy as np
import pytest
from conftest import run_program, tiny_config
from scipy import stats as scipy_stats

from altlearn import driver, report, runner, sweep, tune
from altlearn.train import eval_steps, make_train


def test_evaluation_steps():
    assert eval_steps(300, 15) == list(range(0, 301, 15))
    assert eval_steps(305, 15)[-2:] == [300, 305]  # the last, shorter interval kept
    assert eval_steps(10, 100, eval_at=()) == [0, 10]  # 0 and the end always
    with pytest.raises(ValueError, match=r"must lie in \[0, 10\]"):
        eval_steps(10, 5, eval_at=[11])


def test_the_program_evaluates_every_figure_at_the_given_steps_from_step_0():
    """Every split's loss and accuracy, grad_cosine, the rule's per-step metrics averaged over
    each interval and its reports, at step 0 and every step asked (an irregular schedule too)."""
    config = tiny_config("node_perturbation", steps=12, **{"rule.num_noise_samples": 1})
    curves = run_program(config, eval_at=[1, 2, 7])
    assert curves["step"].tolist() == [0, 1, 2, 7, 12]
    for split in ("train", "val", "test"):
        assert {f"{split}_loss", f"{split}_accuracy"} <= set(curves)
    assert "grad_cosine" in curves and "grad_cosine/layer_0" in curves
    assert np.isnan(curves["train_loss_running"][0]) and np.all(
        np.isfinite(curves["train_loss_running"][1:])
    )
    hybrid = tiny_config("hybrid", steps=6, **{"rule.es_every": 2, "rule.population_size": 2})
    curves = run_program(hybrid, eval_at=range(7))
    assert curves["rule/phases"].tolist() == [0, 0, 1, 1, 2, 2, 3]  # the rule's report
    phase = curves["rule/accepted"][1:]  # a per-step metric only the phase steps have
    assert np.all(np.isnan(phase[0::2])) and np.all(np.isfinite(phase[1::2]))


def test_the_program_and_the_checkpointed_runner_give_the_same_run(tmp_path):
    """The same steps and the same evaluation: the runner's records equal the program's curves
    (backprop on one device, bit for bit)."""
    config = tiny_config(steps=20)
    curves = run_program(config)
    runner.run(config, tmp_path)
    records = [json.loads(x) for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == curves["step"].tolist()
    for key in ("train_loss", "val_loss", "test_accuracy", "grad_cosine"):
        assert [r[key] for r in records] == curves[key].tolist(), key


def test_the_driver_trains_points_by_seeds_and_a_member_equals_its_run_alone(tmp_path):
    """2 points x 2 seeds in one program: each member equals the program run alone on its key
    and hyperparameters; chunked under a memory budget and resumed from saved chunks, the same
    numbers."""
    config = tiny_config(steps=6)
    points = [{"optimizer.learning_rate": 1e-3}, {"optimizer.learning_rate": 1e-2}]
    runs = driver.run(config, points, seeds=[0, 3], save_dir=tmp_path, name="lr")
    assert runs.members == [(0, 0), (0, 1), (1, 0), (1, 1)] and runs.steps == [0, 3, 6]
    assert runs.final("test_accuracy").shape == (2, 2)
    alone = run_program(config, key=3, hparams={"optimizer.learning_rate": 1e-2})
    np.testing.assert_allclose(runs.curves["train_loss"][3], alone["train_loss"], rtol=1e-6)
    assert runs.compile_s > 0 and runs.run_s > 0
    again = driver.run(config, points, seeds=[0, 3], save_dir=tmp_path, name="lr")
    assert again.compile_s == 0  # every chunk loaded: nothing compiled or trained
    np.testing.assert_array_equal(again.curves["train_loss"], runs.curves["train_loss"])
    one = driver.run(config, points[1:], seeds=[3], eval_at=())
    assert one.steps == [0, 6]
    np.testing.assert_allclose(one.final("val_loss")[0, 0], runs.final("val_loss")[1, 1], 1e-6)


def test_members_vmapped_or_mapped_give_the_same_runs():
    """members_per_batch 0 (all vmapped, an accelerator's default), 1 (one after another, a
    CPU's) and 2 (pairs vmapped, mapped over the pairs): the same curves. (1 against a run
    alone: test_the_driver_trains_points_by_seeds_and_a_member_equals_its_run_alone.)"""
    config = tiny_config(steps=4)
    points = [{"optimizer.learning_rate": 1e-3}, {"optimizer.learning_rate": 1e-2}]
    curves = [
        driver.run(config, points, seeds=[0, 1], members_per_batch=k).curves["train_loss"]
        for k in (0, 2)
    ]
    for other in curves[1:]:
        np.testing.assert_allclose(other, curves[0], rtol=1e-5)
    assert driver.default_members_per_batch() == 1  # the tests run on the CPU backend


def test_the_best_iterate_is_chosen_on_validation_per_member():
    """Lowest loss or highest accuracy, the first on ties, NaN never chosen."""
    nan = float("nan")
    runs = driver.Runs(
        curves={
            "val_loss": np.array([[3.0, 1.0, 2.0, 1.0], [nan, 5.0, 4.0, 6.0]]),
            "val_accuracy": np.array([[0.1, 0.5, 0.9, 0.2], [0.3, 0.3, 0.1, 0.2]]),
            "test_accuracy": np.array([[0.0, 0.1, 0.2, 0.3], [0.4, 0.5, 0.6, 0.7]]),
        },
        steps=[0, 10, 20, 30],
        members=[(0, 0), (0, 1)],
        points=[{}],
        seeds=[0, 1],
        compile_s=0.0,
        run_s=0.0,
        chunk_size=2,
        experiment=None,
    )
    values, steps = runs.best("test_accuracy")
    np.testing.assert_array_equal(values, [[0.1, 0.6]])
    np.testing.assert_array_equal(steps, [[10, 20]])
    values, steps = runs.best("test_accuracy", by="val_accuracy")
    np.testing.assert_array_equal(values, [[0.2, 0.4]])
    np.testing.assert_array_equal(steps, [[20, 0]])


def test_the_driver_refuses_what_train_refuses_before_compiling():
    config = tiny_config(steps=2)
    with pytest.raises(ValueError, match="learning_rate must be > 0"):
        driver.run(config, [{"optimizer.learning_rate": -1.0}])
    sigma = tiny_config("node_perturbation", steps=2)
    with pytest.raises(ValueError, match="point rule.sigma=0: sigma must be > 0"):
        driver.run(sigma, [{"rule.sigma": 0.0}])
    with pytest.raises(ValueError, match="Unknown hyperparameter 'rule.sigma'"):
        driver.run(config, [{"rule.sigma": 0.1}])


def test_budgets_in_forward_passes_and_seconds():
    config = tiny_config("node_perturbation", **{"rule.num_noise_samples": 1})
    assert driver.budget_steps(config, [0], forward_passes=51) == 25  # 2 passes a step
    assert driver.step_seconds(config, [0, 1]) > 0


@pytest.mark.slow
def test_the_tuner_chooses_by_validation_on_tuning_seeds_and_skips_keys_a_config_lacks():
    config = tiny_config("node_perturbation", steps=6, **{"rule.num_noise_samples": 1})
    specs = ["optimizer.learning_rate=[1e-6,1e-2]", "rule.sigma=[1e-2]"]
    tuned = tune.tune(config, specs, 2)
    assert tuned.seeds == [1000, 1001] and len(tuned.grid) == 2
    assert tuned.chosen == {"optimizer.learning_rate": 1e-2, "rule.sigma": 1e-2}
    assert tuned.scores[1] < tuned.scores[0]  # lr 1e-6 barely moves
    assert np.asarray(tuned.figures["val_accuracy"]).shape == (2, 2)
    by_accuracy = tune.tune(config, specs, 2, by="val_accuracy")
    assert by_accuracy.chosen == tuned.chosen and by_accuracy.scores[1] > by_accuracy.scores[0]
    with pytest.raises(ValueError, match="--tune_by=test_accuracy: valid choices: val_loss"):
        tune.tune(config, specs, 1, by="test_accuracy")
    backprop = tiny_config("backprop", steps=6)
    assert tune.tune(backprop, ["rule.sigma=[1e-2]"], 1) is None  # backprop has no sigma
    with pytest.raises(ValueError, match="'rule.sgima' is no method's sweepable float"):
        tune.check_specs([config, backprop], ["rule.sgima=[1]"])


def test_a_method_lacking_a_key_is_tuned_on_as_many_points():
    """backprop has no rule.sigma: its learning rates are refined between the same ends, so its
    grid has as many points as node perturbation's."""
    specs = ["optimizer.learning_rate=[1e-4,1e-3,1e-2]", "rule.sigma=[1e-3,1e-2]"]
    np_config = tiny_config("node_perturbation", steps=2)
    backprop = tiny_config("backprop", steps=2)
    assert tune.grid_size(np_config, specs) == 6 and tune.grid_size(backprop, specs) == 3
    axes = [sweep.parse_axis(backprop, specs[0], 0, "--tune")]
    (refined,) = tune.refine(axes, 6)
    np.testing.assert_allclose(refined.values, np.geomspace(1e-4, 1e-2, 6))
    assert tune.refine(axes, 3) == axes  # already that size
    two = [sweep.parse_axis(np_config, spec, 0, "--tune") for spec in specs]
    assert tune.refine(two, 6) == two


def test_statistics_use_the_sample_std_and_a_t_interval():
    values = [0.90, 0.92, 0.95, 0.91, 0.97]
    s = report.stats(values)
    assert s["std"] == pytest.approx(np.std(values, ddof=1))
    half = scipy_stats.t.ppf(0.975, 4) * s["std"] / math.sqrt(5)
    assert (s["low"], s["high"]) == pytest.approx((np.mean(values) - half, np.mean(values) + half))
    assert report.stats([1.0, float("nan"), 3.0])["nonfinite"] == 1
    d = report.paired([1.0, 2.0, 4.0], [0.5, 1.0, 3.0])
    assert d["mean"] == pytest.approx(5 / 6) and d["n"] == 3
    assert report.cell(report.stats([0.5, 0.7]), digits=2).startswith("0.60 ± 0.14 [")
    tiny = report.cell(report.stats([1e-7, 3e-7]), significant=True)  # not "0.000 ± 0.000"
    assert tiny.startswith("2e-07 ± 1.41e-07 [")
    with pytest.raises(ValueError, match="seeds must pair"):
        report.paired([1.0], [1.0, 2.0])
    assert d["p"] == pytest.approx(scipy_stats.ttest_1samp([0.5, 1.0, 1.0], 0.0).pvalue)


def test_holm_adjusts_the_smallest_p_most_and_keeps_the_order():
    adjusted = report.holm([0.04, 0.01, float("nan"), 0.03])
    # sorted 0.01, 0.03, 0.04 -> 3 x 0.01, 2 x 0.03, max(0.06, 1 x 0.04)
    assert adjusted[1] == pytest.approx(0.03) and adjusted[3] == pytest.approx(0.06)
    assert adjusted[0] == pytest.approx(0.06) and math.isnan(adjusted[2])
    assert report.holm([0.6, 0.7]) == [1.0, 1.0]


def test_every_output_records_its_provenance(tmp_path):
    provenance = report.Provenance("experiments.example")
    paths = report.write(tmp_path, "out", {"x": [1.0]}, "| a |", provenance, lambda p: p.touch())
    record = json.loads(paths["json"].read_text())["provenance"]
    assert record["command"].startswith("python -m experiments.example")
    assert set(record["versions"]) == {"jax", "jaxlib", "flax", "optax", "evosax"}
    assert len(record["commit"]) in (40, 4)  # a sha, or "none" outside a checkout
    assert record["machine"]["device_kind"] and "other_processes_busy_cores" in record
    md = paths["md"].read_text()
    assert md.startswith("`python -m experiments.example") and "| a |" in md
    assert paths["png"].exists()
    (tmp_path / "file").write_text("")
    with pytest.raises(ValueError, match="is a file; give a directory"):
        report.prepare_workdir(tmp_path / "file")


def test_a_changed_source_file_marks_the_commit_dirty_a_changed_document_does_not(
    tmp_path, monkeypatch
):
    git = lambda *a: subprocess.run(["git", *a], cwd=tmp_path, check=True, capture_output=True)
    git("init", "-q")
    (tmp_path / "docs").mkdir()
    (tmp_path / "docs" / "r.md").write_text("a")
    (tmp_path / "rule.py").write_text("a")
    git("add", ".")
    git("-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qm", "x")
    monkeypatch.setattr(report, "ROOT", tmp_path)
    assert report.git_commit()["dirty"] is False
    (tmp_path / "docs" / "r.md").write_text("b")  # an output file rewritten by a study
    assert report.git_commit()["dirty"] is False
    (tmp_path / "rule.py").write_text("b")
    record = report.git_commit()
    assert record["dirty"] is True and len(record["commit"]) == 40


@pytest.mark.slow
def test_vmapped_program_shards_over_devices():
    """The driver's member axis spreads over the 8 fake devices (and pads to them)."""
    assert jax.device_count() == 8
    config = tiny_config(steps=2)
    runs = driver.run(config, seeds=range(3), eval_at=())
    assert runs.chunk_size == 8 and runs.curves["train_loss"].shape == (3, 2)
    train = make_train(config, eval_at=())
    _, alone = jax.jit(train)(jax.random.PRNGKey(2))
    np.testing.assert_allclose(runs.curves["train_loss"][2], alone["train_loss"], rtol=1e-6)
