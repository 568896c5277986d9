"""The experiment binary end to end: outputs, determinism, resume, NaN, bad input."""

import json
import os
import signal
import subprocess
import sys
import time

import jax
import numpy as np
import pytest
from conftest import FIGURES, ROOT, figures, run_binary, tiny_config

from altlearn import data, runner
from altlearn.config import base_config
from altlearn.train import Experiment
from experiments.configs import digits

DIGITS_FLAGS = (
    "--config=experiments/configs/digits.py",
    "--config.steps=60",
    "--config.eval_every=20",
    "--config.model.widths=(32,)",
)


@pytest.mark.slow
def test_binary_writes_every_output(tmp_path):
    result = run_binary(tmp_path, *DIGITS_FLAGS)
    assert result.returncode == 0, result.stderr[-3000:]
    config = json.loads((tmp_path / "config.json").read_text())
    assert config["rule"]["name"] == "backprop" and config["steps"] == 60
    records = [json.loads(x) for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [0, 20, 40, 60]
    assert {"train_loss", "val_accuracy", "test_accuracy", "steps_per_s"} <= set(records[-1])
    summary = json.loads((tmp_path / "summary.json").read_text())
    for key in (*FIGURES, "compile_time_s", "wall_time_s", "steps_per_s"):
        assert np.isfinite(summary[key]), key
    assert summary["step"] == 60 and summary["test_accuracy"] > 0.5
    assert (tmp_path / "curves.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert list((tmp_path / "tensorboard").glob("events.out.tfevents.*"))
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir() if p.name.isdigit()) == [
        "40",
        "60",
    ]
    assert "Results are in" in result.stdout


def test_same_config_gives_identical_numbers(tmp_path):
    config = tiny_config(steps=30)
    runner.run(config, tmp_path / "a")
    runner.run(config, tmp_path / "b")
    assert figures(tmp_path / "a") == figures(tmp_path / "b")


@pytest.mark.slow
def test_interrupted_run_resumes_to_the_same_numbers(tmp_path):
    config = tiny_config(steps=60, eval_every=10)
    runner.run(config, tmp_path / "whole")

    def interrupt(record):
        if record["step"] == 30:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        runner.run(config, tmp_path / "cut", on_eval=interrupt)
    assert not (tmp_path / "cut" / "summary.json").exists()
    runner.run(config, tmp_path / "cut")
    assert figures(tmp_path / "cut") == figures(tmp_path / "whole")
    steps = [
        json.loads(x)["step"] for x in (tmp_path / "cut" / "metrics.jsonl").read_text().splitlines()
    ]
    assert steps == [0, 10, 20, 30, 40, 50, 60]


@pytest.mark.slow
def test_killed_binary_resumes_to_the_same_numbers(tmp_path):
    flags = (*DIGITS_FLAGS, "--config.steps=400", "--config.eval_every=40")
    config = digits.get_config()  # what the flags give, trained whole in this process
    config.steps, config.eval_every, config.model.widths = 400, 40, (32,)
    runner.run(config, tmp_path / "whole")

    cmd = [sys.executable, "-m", "experiments.train", f"--workdir={tmp_path / 'cut'}", *flags]
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.Popen(
        cmd, cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    checkpoints = tmp_path / "cut" / "checkpoints"
    deadline = time.time() + 120
    while time.time() < deadline and proc.poll() is None:
        if checkpoints.exists() and any(
            p.name.isdigit() and p.name != "0" for p in checkpoints.iterdir()
        ):
            break
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not (tmp_path / "cut" / "summary.json").exists(), "killed too late to test resuming"
    resumed = run_binary(tmp_path / "cut", *flags)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "Resumed from the checkpoint" in resumed.stderr
    assert figures(tmp_path / "cut") == figures(tmp_path / "whole")


def _diverging_at_step_5():
    """Backprop (SGD) on diabetes with one training target set to 1e18, in the batch of step 4
    (epoch 0's permutation): that step's loss is finite (a squared error of 1e36 fits float32),
    its update sends the weights to ~1e14, and the loss of step 5 overflows. Every evaluation up
    to step 4 stays finite."""
    config = base_config(rule="backprop", model="mlp", data="diabetes")
    config.model.widths = (32,)
    config.batch_size = 32
    config.steps = 40
    config.eval_every = 2
    config.optimizer.name = "sgd"
    config.optimizer.learning_rate = 1e-2
    dataset = data.load_dataset("diabetes", seed=config.seed)
    experiment = Experiment(config, dataset)
    key = jax.jit(experiment.init)(jax.random.PRNGKey(config.seed)).key
    permutation = experiment.epoch_permutations(jax.random.split(key)[0], 0, 1)[0]
    y_train = dataset.y_train.copy()
    y_train[int(permutation[4 * experiment.batch_size])] = 1e18
    return config, dataset._replace(y_train=y_train)


def test_nan_stops_the_run_and_keeps_the_last_good_checkpoint(tmp_path):
    config, dataset = _diverging_at_step_5()
    with pytest.raises(
        runner.DivergenceError,
        match=r"became (inf|nan) at step 5 .*last good checkpoint \(step 4\)",
    ):
        runner.run(config, tmp_path, dataset=dataset)
    saved = sorted(int(p.name) for p in (tmp_path / "checkpoints").iterdir() if p.name.isdigit())
    assert saved == [2, 4]
    steps = [json.loads(x)["step"] for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert steps == [0, 2, 4]
    assert not (tmp_path / "summary.json").exists()


@pytest.mark.slow
def test_resuming_with_another_config_is_refused(tmp_path):
    runner.run(tiny_config(steps=10), tmp_path)
    with pytest.raises(ValueError, match="different config .*optimizer"):
        runner.run(tiny_config(steps=10, **{"optimizer.learning_rate": 0.5}), tmp_path)
    runner.run(tiny_config(steps=20), tmp_path)  # more steps: the run is extended
    assert json.loads((tmp_path / "summary.json").read_text())["step"] == 20
